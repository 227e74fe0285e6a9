//! Attention patterns (sequence models): for one token sequence, every head of every block
//! as query × key heatmaps, side by side: the target, the full decomposition, and the model
//! with a selection of subcomponents ablated, and the attention-score change the selection
//! induces (scores before the softmax, full minus ablated). Below: what the ablation does per position
//! (KL against the target) and the top-3 predictions before and after at the chosen position.


use eframe::egui;
use egui_plot::{Line, Plot, PlotPoints, VLine};

use crate::app::sequence_picker::{ProbeLink, QueryKeyMap, SequencePicker, token_labels};
use crate::app::view::{CsvJob, View, ViewCtx};
use crate::worker::Event;

#[derive(Default)]
pub struct AttentionView {
    pub picker: SequencePicker,
    /// What to ablate (`module:index`, `module:a-b`, `cluster:id`, ...); empty: follow the
    /// selected subcomponent.
    pub select: String,
    /// The worker's answer for the shown sequence and selection.
    pub link: ProbeLink,
    /// The heatmaps of the shown answer (its key), per (block, head, target/full/ablated/
    /// score change).
    patterns: (u64, Vec<Option<QueryKeyMap>>),
    /// The query position whose predictions are listed.
    pub position: Option<usize>,
}

impl View for AttentionView {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn label(&self) -> &'static str {
        "Attention"
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, _cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let p = self
            .link
            .probe
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no sequence computed yet"))?;
        Ok(Box::new(move || {
            let s = p.tokens.len();
            let mut out = String::from("block,head,query,key,target,full,ablated,score_change\n");
            for (l, a) in p.attention.iter().enumerate() {
                for h in 0..p.heads {
                    for q in 0..s {
                        for k in 0..s {
                            let i = (h * s + q) * s + k;
                            let opt = |v: &Option<Vec<f32>>| {
                                v.as_ref().map_or(String::new(), |v| v[i].to_string())
                            };
                            out.push_str(&format!(
                                "{l},{h},{q},{k},{},{},{},{}\n",
                                a.target[i],
                                a.full[i],
                                opt(&a.ablated),
                                opt(&a.score_change)
                            ));
                        }
                    }
                }
            }
            Ok(out)
        }))
    }
    fn on_event(&mut self, e: &Event) {
        if let Event::Loaded { .. } = e {
            self.picker = SequencePicker::default();
        }
        self.link.on_event(e);
    }
}

impl AttentionView {
    /// The selection to ablate: the typed one, else the selected subcomponent.
    fn selection(&self, cx: &ViewCtx) -> String {
        if !self.select.trim().is_empty() {
            return self.select.trim().to_string();
        }
        match (cx.snapshot(), cx.selection.component) {
            (Some(s), Some(c)) => s
                .modules
                .get(cx.selection.module)
                .map(|m| format!("{}:{c}", m.name))
                .unwrap_or_default(),
            _ => String::new(),
        }
    }

    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let Some(s) = cx.snapshot().cloned() else {
            return;
        };
        let Some(dims) = s.sequence else {
            ui.label("This view shows the attention of sequence models (e.g. the ih preset).");
            return;
        };
        self.picker.ui(ui, &s, &dims);
        let select = self.selection(cx);
        ui.horizontal(|ui| {
            ui.label("ablate:");
            let r = ui.add(
                egui::TextEdit::singleline(&mut self.select)
                    .desired_width(260.0)
                    .hint_text(if select.is_empty() {
                        "e.g. blocks.1.attn.q_proj:3 or cluster:2".to_string()
                    } else {
                        select.clone()
                    }),
            );
            ui.ctx()
                .accesskit_node_builder(r.id, |n| n.set_label("ablate".to_string()));
            r.on_hover_text(
                "subcomponents to ablate (others kept, no delta component); empty: the selected subcomponent",
            );
        });
        self.link
            .request(cx, &self.picker.tokens, self.picker.version, &select);
        let Some(p) = self.link.probe.clone() else {
            ui.label("computing the attention patterns...");
            return;
        };
        let seq = p.tokens.len();
        let text = token_labels(p.tokens.iter().map(|&t| t as usize), &dims);
        let titles = [
            "target",
            "full decomposition",
            "selection ablated",
            "score change (full − ablated)",
        ];
        // One map per (block, head, kind), built once per answer.
        if self.patterns.0 != self.link.shown || self.patterns.1.is_empty() {
            let key = self.link.shown;
            let mut v = vec![];
            for a in &p.attention {
                for h in 0..p.heads {
                    v.push(Some(QueryKeyMap::weights(&a.target, h, seq, key)));
                    v.push(Some(QueryKeyMap::weights(&a.full, h, seq, key)));
                    v.push(a.ablated.as_ref().map(|x| QueryKeyMap::weights(x, h, seq, key)));
                    v.push(
                        a.score_change
                            .as_ref()
                            .map(|x| QueryKeyMap::score_change(x, h, seq, key)),
                    );
                }
            }
            self.patterns = (key, v);
        }
        let n_blocks = p.attention.len() * p.heads;
        let cell = ((ui.available_width() - 40.0) / 4.0 - 10.0)
            .min((ui.available_height() - 200.0) / n_blocks as f32 - 20.0)
            .max(60.0);
        for l in 0..p.attention.len() {
            for h in 0..p.heads {
                ui.label(format!("block {l}, head {h} (rows: query position, columns: key position)"));
                ui.horizontal(|ui| {
                    for (w, title) in titles.iter().enumerate() {
                        let data = self.patterns.1[(l * p.heads + h) * 4 + w].as_ref();
                        ui.vertical(|ui| {
                            ui.label(*title);
                            let Some(map) = data else {
                                let (rect, _) = ui.allocate_exact_size(egui::vec2(cell, cell), egui::Sense::hover());
                                ui.painter().text(rect.center(), egui::Align2::CENTER_CENTER, "nothing selected", egui::FontId::proportional(11.0), ui.visuals().weak_text_color());
                                return;
                            };
                            if let Some(q) = map.show(ui, egui::Id::unique(("attention", l, h, w)), cell, &text) {
                                self.position = Some(q);
                            }
                        });
                    }
                });
            }
        }
        ui.separator();
        if p.selection.is_empty() {
            ui.label("Select a subcomponent (or type a selection) to see what ablating it changes.");
        } else {
            ui.label(format!("ablated: {}", crate::app::widgets::short_members(&p.selection, 8)));
        }
        let pos = self.position.or(p.induction.map(|(q, _)| q)).unwrap_or(seq - 1).min(seq - 1);
        ui.horizontal(|ui| {
            Plot::new("kl-per-position")
                .height(110.0)
                .width((ui.available_width() * 0.6).max(200.0))
                .x_axis_label("position")
                .y_axis_label("KL vs target (nats)")
                .show(ui, |pl| {
                    let pts = |v: &[f32]| PlotPoints::from_iter(v.iter().enumerate().map(|(i, &y)| [i as f64, y as f64]));
                    pl.line(Line::new("full decomposition", pts(&p.kl_full)));
                    if !p.selection.is_empty() {
                        pl.line(Line::new("selection ablated", pts(&p.kl_ablated)));
                    }
                    pl.vline(VLine::new("shown position", pos as f64));
                });
            ui.vertical(|ui| {
                ui.strong(format!("position {pos} (token {})", text[pos]));
                if let Some((q, m)) = p.induction
                    && q == pos
                {
                    ui.label(format!("induction: the answer is {m}"));
                }
                let fmt = |t: &[(u32, f32); 3]| {
                    t.iter()
                        .map(|(k, pr)| format!("{k} ({pr:.2})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                ui.label(format!("target top 3: {}", fmt(&p.top_target[pos])));
                ui.label(format!(
                    "{} top 3: {}",
                    if p.selection.is_empty() { "decomposition" } else { "ablated" },
                    fmt(&p.top_ablated[pos])
                ));
                ui.label(format!("KL {:.3e}", p.kl_ablated[pos]));
            });
        });
    }
}
