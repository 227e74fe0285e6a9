//! The prompt view (language models): type text, see its tokens, a CI heatmap of tokens ×
//! subcomponents for each module, and at a chosen token the next-token predictions of the
//! target and of the CI-masked decomposition. A click on a cell selects that subcomponent
//! (every view highlights it) and that token. All maths on the worker (`Command::Prompt`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use eframe::egui;

use crate::app::view::{CsvJob, View, ViewCtx};
use crate::app::widgets;
use crate::text::PromptResult;
use crate::worker::{Command, Event};

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

pub struct PromptView {
    pub text: String,
    /// What to intervene on (`layer:index`, `cluster:id`, ...; empty: nothing) and its mask.
    pub select: String,
    pub scale: f32,
    /// The request in flight (key, what it asked for) and the answer shown.
    asked: Option<(u64, (String, String, u32), u64)>,
    pub result: Option<Arc<PromptResult>>,
    /// The token whose predictions are shown.
    pub position: usize,
    /// The heatmap texture and what it shows (result key, module).
    texture: Option<(egui::TextureHandle, (u64, usize))>,
    shown_key: u64,
    /// The component page asked for (key, module, index, snapshot version) and shown.
    page_asked: Option<(u64, usize, usize, u64)>,
    pub page: Option<Arc<crate::text::ComponentPage>>,
    /// The running harvest's progress (0..1), if one runs.
    pub harvesting: Option<f32>,
    /// A tiny-lm run (its planted rules can be unlearned here).
    pub tiny_lm: bool,
    /// The rule to unlearn, the running search's progress (stage, 0..1) and its last answer.
    pub unlearn_rule: crate::tinylm::Rule,
    pub unlearning: Option<(&'static str, f32)>,
    pub unlearned: Option<Arc<crate::tinylm::Unlearning>>,
    /// Held-out stories the search scores on.
    pub unlearn_stories: usize,
}

/// The tiny-lm story a run starts on: a day pair whose continuation is predicted at the
/// last token, after a count and a copied name.
pub const TINY_LM_STORY: &str =
    "There was a girl named Mia. Then Mia counted: three, four, five. It was Wednesday. The next day was";

impl Default for PromptView {
    fn default() -> Self {
        PromptView {
            text: "On Monday, Anna went to the market. The next day was".into(),
            select: String::new(),
            scale: 0.0,
            asked: None,
            result: None,
            // The last token (where the prompt's continuation is predicted) until one is
            // clicked.
            position: usize::MAX,
            texture: None,
            shown_key: 0,
            page_asked: None,
            page: None,
            harvesting: None,
            tiny_lm: false,
            unlearn_rule: crate::tinylm::Rule::DayAfter,
            unlearning: None,
            unlearned: None,
            unlearn_stories: 100,
        }
    }
}

impl View for PromptView {
    fn name(&self) -> &'static str {
        "prompt"
    }
    fn label(&self) -> &'static str {
        "Prompt"
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, _cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let r = self
            .result
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no prompt has run yet"))?;
        Ok(Box::new(move || Ok(csv(&r))))
    }
    fn on_event(&mut self, e: &Event) {
        match e {
            Event::Loaded { config, .. } => {
                // A tiny-lm run starts on a story of its own language (the rules at work),
                // unless the user has typed something else.
                let story = TINY_LM_STORY;
                let generic = PromptView::default().text;
                self.tiny_lm = config.tokenizer_name.as_deref() == Some(crate::tinylm::BUILTIN);
                self.unlearned = None;
                self.unlearning = None;
                if self.tiny_lm {
                    if self.text == generic {
                        self.text = story.into();
                    }
                } else if self.text == story {
                    self.text = generic;
                }
                self.result = None;
                self.asked = None;
                self.page = None;
                self.page_asked = None;
            }
            Event::Component { key, page }
                if self.page_asked.as_ref().is_some_and(|a| a.0 == *key) =>
            {
                self.page = Some(page.clone());
            }
            Event::Prompt { key, result } if self.asked.as_ref().is_some_and(|a| a.0 == *key) => {
                self.result = Some(result.clone());
                self.shown_key = *key;
                self.position = self.position.min(result.ids.len().saturating_sub(1));
            }
            Event::Progress {
                kind: crate::worker::JobKind::Harvest,
                fraction,
                ..
            } => self.harvesting = Some(*fraction),
            Event::Progress {
                kind: crate::worker::JobKind::Unlearn,
                stage,
                fraction,
                ..
            } => self.unlearning = Some((stage, *fraction)),
            Event::JobEnded {
                kind: crate::worker::JobKind::Unlearn,
                ..
            } => self.unlearning = None,
            Event::Unlearned(u) => {
                // The prompt's interventions show the result at once: the clusters found,
                // ablated.
                self.select = u
                    .chosen
                    .iter()
                    .map(|(id, _)| format!("cluster:{id}"))
                    .collect::<Vec<_>>()
                    .join(",");
                self.scale = 0.0;
                self.unlearned = Some(u.clone());
            }
            Event::JobEnded {
                kind: crate::worker::JobKind::Harvest,
                ..
            } => {
                self.harvesting = None;
                // Ask again: the page now comes from the harvest.
                self.page_asked = None;
            }
            Event::Error(_) => {
                self.unlearning = None;
                // A failed prompt (no tokenizer, ...) is not waited for.
                if let Some(a) = self.asked.as_mut() {
                    a.0 = 0;
                }
            }
            _ => {}
        }
    }
}

/// Two top-k lists side by side (token, probability); right-hand tokens that differ from the
/// left-hand ones at the same rank in orange.
fn top_table(
    ui: &mut egui::Ui,
    id: impl egui::AsIdSalt,
    left: (&str, &[(String, f32)]),
    right: (&str, &[(String, f32)]),
) {
    egui::Grid::new(id).striped(true).show(ui, |ui| {
        ui.label(left.0);
        ui.label("p");
        ui.label(right.0);
        ui.label("p");
        ui.end_row();
        for ((a, pa), (b, pb)) in left.1.iter().zip(right.1) {
            ui.label(format!("\"{a}\""));
            ui.label(format!("{pa:.3}"));
            let col = if a == b {
                ui.visuals().text_color()
            } else {
                egui::Color32::from_rgb(230, 120, 90)
            };
            ui.colored_label(col, format!("\"{b}\""));
            ui.label(format!("{pb:.3}"));
            ui.end_row();
        }
    });
}

/// One row per (token, module, subcomponent): position, token, module, component, CI.
pub fn csv(r: &PromptResult) -> String {
    let mut out = String::from("position,token_id,token,module,component,ci\n");
    for (j, m) in r.modules.iter().enumerate() {
        let c = r.c[j];
        for (p, (id, t)) in r.ids.iter().zip(&r.tokens).enumerate() {
            for k in 0..c {
                out.push_str(&format!(
                    "{p},{id},{:?},{m},{k},{}\n",
                    t.replace(',', " "),
                    r.ci[j][p * c + k]
                ));
            }
        }
    }
    out
}

impl PromptView {
    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let Some(snap) = cx.snapshot().cloned() else {
            return;
        };
        if snap.positions <= 1 || snap.sequence.is_some() {
            ui.label("This view shows language models: open a goodfire-ai/spd LM run (its target's model_config.yaml and its tokenizer on this machine).");
            return;
        }
        ui.horizontal(|ui| {
            let name = ui.label("prompt");
            ui.add(
                egui::TextEdit::singleline(&mut self.text)
                    .desired_width(ui.available_width() - 10.0),
            )
            .labelled_by(name.id);
        });
        ui.horizontal(|ui| {
            let name = ui.label("intervene on");
            ui.add(egui::TextEdit::singleline(&mut self.select).desired_width(260.0))
                .labelled_by(name.id)
                .on_hover_text("layer:index, layer:a-b, layer:*, cluster:id (comma-separated); empty: no intervention");
            if let Some(k) = cx.selection.component
                && let Some(m) = snap.modules.get(cx.selection.module)
                && ui.button("the selection").clicked()
            {
                self.select = format!("{}:{k}", m.name);
            }
            if let Some(cl) = cx.selection.cluster
                && ui.button("the selected cluster").clicked()
            {
                self.select = format!("cluster:{cl}");
            }
            ui.add(
                egui::Slider::new(&mut self.scale, 0.0..=2.0)
                    .text("its mask: 0 ablate, 1 keep, 2 boost"),
            );
        });
        if self.tiny_lm {
            self.rules_bar(cx, ui);
        }
        self.harvest_bar(cx, ui);
        // Ask for the prompt when it (or the decomposition shown, or the intervention) changed
        // and nothing is in flight.
        let version = cx.snapshot_version();
        let current = (
            (self.text.clone(), self.select.trim().to_string(), self.scale.to_bits()),
            version,
        );
        let in_flight = self
            .asked
            .as_ref()
            .is_some_and(|a| a.0 != 0 && a.0 != self.shown_key);
        let stale = self
            .asked
            .as_ref()
            .is_none_or(|a| (a.1.clone(), a.2) != current);
        if stale && !in_flight && !self.text.trim().is_empty() {
            let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
            if cx.send(Command::Prompt {
                key,
                text: self.text.clone(),
                select: self.select.trim().to_string(),
                scale: self.scale,
            }) {
                self.asked = Some((key, current.0, current.1));
            }
        }
        let Some(r) = self.result.clone() else {
            ui.label("tokenizing...");
            return;
        };
        let n = r.ids.len();
        ui.horizontal_wrapped(|ui| {
            ui.label(format!("{n} tokens:"));
            for (p, t) in r.tokens.iter().enumerate() {
                let label = format!("\"{t}\"");
                if ui
                    .selectable_label(self.position == p, label)
                    .on_hover_text(format!("position {p}, token id {}", r.ids[p]))
                    .clicked()
                {
                    self.position = p;
                }
            }
            if r.dropped > 0 {
                ui.colored_label(
                    egui::Color32::from_rgb(230, 160, 60),
                    format!("({} more tokens beyond the model's sequence length left out)", r.dropped),
                );
            }
        });
        widgets::module_picker(cx, ui);
        let j = cx.selection.module.min(r.modules.len().saturating_sub(1));
        let c = r.c[j];
        ui.columns(2, |cols| {
            self.heatmap(cx, &mut cols[0], &r, j, c);
            egui::ScrollArea::vertical()
                .id_salt("prompt-right")
                .show(&mut cols[1], |ui| {
                    self.predictions(ui, &r);
                    self.component_page(cx, ui);
                });
        });
    }

    /// The selected subcomponent's page: top-activating contexts over the run's text and the
    /// tokens its write direction promotes and suppresses.
    fn component_page(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let Some(k) = cx.selection.component else {
            ui.separator();
            ui.label("select a subcomponent (click the heatmap) for its page");
            return;
        };
        let j = cx.selection.module;
        let version = cx.snapshot_version();
        let want = (j, k, version);
        if self
            .page_asked
            .as_ref()
            .is_none_or(|a| (a.1, a.2, a.3) != want)
        {
            let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
            if cx.send(Command::Component {
                key,
                module: j,
                index: k,
                max_windows: 4096,
            }) {
                self.page_asked = Some((key, j, k, version));
            }
        }
        ui.separator();
        let Some(p) = self.page.as_ref().filter(|p| {
            cx.snapshot()
                .and_then(|s| s.modules.get(j))
                .is_some_and(|m| m.name == p.module)
                && p.c == k
        }) else {
            ui.label("component page: scanning the text...");
            return;
        };
        ui.strong(format!("{}:{}", p.module, p.c));
        ui.label(format!(
            "fires (CI > 0.5) on {:.1}% of {} positions ({} windows of {})",
            100.0 * p.firing,
            p.positions,
            p.windows,
            p.source
        ));
        if !p.fires_on.is_empty() {
            let list: Vec<String> = p
                .fires_on
                .iter()
                .map(|(t, n)| format!("\"{t}\" {n}"))
                .collect();
            ui.label(format!("fires on: {}", list.join("  ")));
        }
        ui.label("top-activating contexts:");
        for (g, before, at, after) in p.contexts.iter().take(12) {
            ui.horizontal(|ui| {
                ui.monospace(format!("{g:.2}"));
                ui.label(egui::RichText::new(before.replace('\n', " ")).weak());
                ui.label(
                    egui::RichText::new(format!("[{at}]"))
                        .strong()
                        .color(egui::Color32::YELLOW),
                );
                ui.label(egui::RichText::new(after.replace('\n', " ")).weak());
            });
        }
        if !p.promoted.is_empty() {
            let list = |v: &[(String, f32)]| {
                v.iter()
                    .map(|(t, x)| format!("\"{t}\" {x:+.2}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            ui.label(format!("promotes: {}", list(&p.promoted)));
            ui.label(format!("suppresses: {}", list(&p.suppressed)));
        }
    }

    /// Targeted unlearning of a planted rule (tiny-lm runs): a rule, a button that searches
    /// the stored clusters for those carrying it (a worker job with progress), and the
    /// result, which becomes the prompt's intervention (the found clusters ablated).
    fn rules_bar(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        use crate::tinylm::Rule;
        ui.horizontal(|ui| {
            let name = ui.label("unlearn");
            egui::ComboBox::from_id_salt("unlearn-rule")
                .selected_text(rule_label(self.unlearn_rule))
                .show_ui(ui, |ui| {
                    for r in Rule::ALL {
                        ui.selectable_value(&mut self.unlearn_rule, r, rule_label(r));
                    }
                })
                .response
                .labelled_by(name.id);
            match self.unlearning {
                Some((stage, f)) => {
                    if widgets::job_progress(ui, f, stage) {
                        cx.send(Command::Cancel(crate::worker::JobKind::Unlearn));
                        self.unlearning = None;
                    }
                }
                None => {
                    if ui
                        .button("Find its clusters")
                        .on_hover_text(
                            "Search the stored clustering for the clusters whose ablation takes this rule to ≤ 0.2 on held-out stories while the other rules stay ≥ 0.9 (minutes); the result is ablated in this prompt",
                        )
                        .clicked()
                        && cx.send(Command::Unlearn {
                            rule: self.unlearn_rule,
                            stories: self.unlearn_stories,
                        })
                    {
                        self.unlearning = Some(("starting", 0.0));
                    }
                }
            }
        });
        if let Some(u) = &self.unlearned {
            let a = &u.accuracy;
            let ok = Rule::parse(u.rule).is_ok_and(|r| a.get(r) <= 0.2);
            let text = format!(
                "{} cluster(s), {} subcomponents ablated: day after {:.2}, copy {:.2}, count {:.2} on {} held-out stories{}",
                u.chosen.len(),
                u.ablated.len(),
                a.day_after,
                a.copy,
                a.count,
                self.unlearn_stories,
                if ok { "" } else { " (not isolated: the rule survives in part)" }
            );
            ui.label(egui::RichText::new(text).weak());
        }
    }

    /// The harvest: a button that starts one (all subcomponents over up to 1M tokens of the
    /// run's text, on the worker, stored with the file) and its progress.
    fn harvest_bar(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        ui.horizontal(|ui| match self.harvesting {
            Some(f) => {
                if widgets::job_progress(ui, f, "harvesting") {
                    cx.send(Command::Cancel(crate::worker::JobKind::Harvest));
                    self.harvesting = None;
                }
            }
            None => {
                let from = self
                    .page
                    .as_ref()
                    .and_then(|p| p.harvested)
                    .map(|s| format!("pages from the stored harvest (step {s})"))
                    .unwrap_or_else(|| "pages scan 4,096 windows on demand".into());
                if ui
                    .button("Harvest")
                    .on_hover_text(
                        "Scan up to 1M tokens of the run's text once for every subcomponent (top contexts, firing tokens); kept in the file when saved",
                    )
                    .clicked()
                    && cx.send(Command::Harvest {
                        max_tokens: 1_000_000,
                    })
                {
                    self.harvesting = Some(0.0);
                }
                ui.label(egui::RichText::new(from).weak());
            }
        });
    }

    fn heatmap(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui, r: &PromptResult, j: usize, c: usize) {
        let n = r.ids.len();
        ui.label(format!(
            "CI of {} (rows: tokens, columns: its {c} subcomponents); click to select",
            r.modules[j]
        ));
        let key = (self.shown_key, j);
        if self.texture.as_ref().is_none_or(|(_, k)| *k != key) {
            let pixels = r.ci[j]
                .iter()
                .map(|&v| crate::app::heatmap::Style::sequential(0.0, 1.0).color(v))
                .collect();
            let img = egui::ColorImage::new([c, n], pixels);
            let tex = ui
                .ctx()
                .load_texture("prompt-ci", img, egui::TextureOptions::NEAREST);
            self.texture = Some((tex, key));
        }
        let Some((tex, _)) = &self.texture else {
            return;
        };
        let label_w = 90.0;
        let row_h = ((ui.available_height() - 20.0) / n as f32).clamp(4.0, 22.0);
        let size = egui::vec2(ui.available_width(), row_h * n as f32);
        let (rect, resp) = ui.allocate_exact_size(size, egui::Sense::click());
        let map = egui::Rect::from_min_max(rect.min + egui::vec2(label_w, 0.0), rect.max);
        let p = ui.painter();
        p.image(
            tex.id(),
            map,
            egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
            egui::Color32::WHITE,
        );
        for (i, t) in r.tokens.iter().enumerate() {
            if row_h >= 9.0 {
                p.text(
                    egui::pos2(rect.left() + label_w - 4.0, rect.top() + (i as f32 + 0.5) * row_h),
                    egui::Align2::RIGHT_CENTER,
                    format!("\"{t}\""),
                    egui::FontId::monospace((row_h * 0.7).min(13.0)),
                    if i == self.position {
                        egui::Color32::YELLOW
                    } else {
                        ui.visuals().text_color()
                    },
                );
            }
        }
        if cx.selection.module == j
            && let Some(k) = cx.selection.component
            && k < c
        {
            let x = map.left() + (k as f32 + 0.5) / c as f32 * map.width();
            p.vline(x, map.y_range(), egui::Stroke::new(1.0, egui::Color32::WHITE));
        }
        let cell = |pos: egui::Pos2| -> Option<(usize, usize)> {
            map.contains(pos).then(|| {
                let k = (((pos.x - map.left()) / map.width()) * c as f32) as usize;
                let i = (((pos.y - map.top()) / map.height()) * n as f32) as usize;
                (i.min(n - 1), k.min(c - 1))
            })
        };
        if let Some((i, k)) = resp.hover_pos().and_then(cell) {
            resp.clone().on_hover_text(format!(
                "token {i} \"{}\", {}:{k}: CI {:.3}",
                r.tokens[i],
                r.modules[j],
                r.ci[j][i * c + k]
            ));
        }
        if resp.clicked()
            && let Some((i, k)) = resp.interact_pointer_pos().and_then(cell)
        {
            cx.selection.module = j;
            cx.selection.component = Some(k);
            self.position = i;
        }
    }

    fn predictions(&self, ui: &mut egui::Ui, r: &PromptResult) {
        let p = self.position.min(r.ids.len().saturating_sub(1));
        ui.label(format!(
            "after token {p} \"{}\": next-token predictions (KL target||CI-masked {:.4} nats)",
            r.tokens[p], r.kl[p]
        ));
        top_table(
            ui,
            "prompt-top",
            ("target", &r.top_target[p]),
            ("CI-masked decomposition", &r.top_masked[p]),
        );
        let mean: f32 = r.kl.iter().sum::<f32>() / r.kl.len().max(1) as f32;
        ui.label(format!("mean KL over the prompt: {mean:.4} nats/token"));
        let Some(iv) = &r.intervention else {
            return;
        };
        ui.separator();
        ui.label(format!(
            "{} (mask {}) at token {p}: {}",
            iv.select,
            iv.scale,
            crate::app::widgets::short_members(&iv.labels, 6)
        ));
        for (g, reg) in iv.regimes.iter().enumerate() {
            let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
            ui.label(format!(
                "{}: KL(target||.) here {:.4} -> {:.4}; over the prompt {:.4} -> {:.4}",
                reg.name,
                reg.kl_before[p],
                reg.kl_after[p],
                mean(&reg.kl_before),
                mean(&reg.kl_after)
            ));
            top_table(
                ui,
                ("prompt-iv", g),
                ("before", &reg.top_before[p]),
                ("after", &reg.top_after[p]),
            );
        }
        ui.label("(the adversarial, PGD worst-case regime is not built yet)");
    }
}

fn rule_label(r: crate::tinylm::Rule) -> &'static str {
    match r {
        crate::tinylm::Rule::DayAfter => "day after",
        crate::tinylm::Rule::Copy => "copying the name",
        crate::tinylm::Rule::Count => "counting",
    }
}
