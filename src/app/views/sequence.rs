//! Sequence CI (sequence models): for one token sequence, tokens along x and the alive
//! subcomponents of each module along y (by density, or by cluster), one panel per module.
//! The CI comes from the worker (`Command::Sequence`); hover shows token, position,
//! subcomponent and CI; a click selects the subcomponent.

use std::sync::Arc;

use eframe::egui;

use crate::app::heatmap;
use crate::app::sequence_picker::{ProbeLink, SequencePicker, token_labels};
use crate::app::view::{CsvJob, View, ViewCtx};
use crate::app::widgets::component_color;
use crate::worker::Event;

/// One module's panel: (probe key, rows by cluster) it was built for, the heatmap data and
/// the subcomponent of each row.
type Panel = (u64, bool, heatmap::Data, Vec<usize>);

#[derive(Default)]
pub struct SequenceView {
    pub picker: SequencePicker,
    /// Order rows by cluster (members together) instead of by density.
    pub by_cluster: bool,
    /// The worker's answer for the shown sequence.
    pub link: ProbeLink,
    /// Per module: the drawn panel.
    panels: Vec<Option<Panel>>,
}

impl View for SequenceView {
    fn name(&self) -> &'static str {
        "sequence"
    }
    fn label(&self) -> &'static str {
        "Sequence CI"
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
            let mut out = String::from("module,component,position,token,ci\n");
            for (j, m) in p.modules.iter().enumerate() {
                let c = p.c[j];
                for k in 0..c {
                    for pos in 0..s {
                        out.push_str(&format!(
                            "{m},{k},{pos},{},{}\n",
                            p.tokens[pos],
                            p.ci[j][pos * c + k]
                        ));
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

/// Rows of a module's panel: its subcomponents that fire on the batch (mean CI > 0), by
/// mean CI (densest first) or grouped by cluster.
fn panel_rows(cx: &ViewCtx, j: usize, by_cluster: bool) -> Vec<usize> {
    let Some(s) = cx.snapshot() else {
        return vec![];
    };
    let m = &s.modules[j];
    let mut rows: Vec<usize> = (0..m.c).filter(|&c| m.mean_ci[c] > 0.0).collect();
    rows.sort_by(|&a, &b| m.mean_ci[b].total_cmp(&m.mean_ci[a]));
    if by_cluster && let Some(cl) = &s.clusters {
        let key = |c: usize| {
            cl.assignment
                .get(&format!("{}:{c}", m.name))
                .copied()
                .unwrap_or(usize::MAX)
        };
        rows.sort_by_key(|&c| key(c));
    }
    rows
}

impl SequenceView {
    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let Some(s) = cx.snapshot().cloned() else {
            return;
        };
        let Some(dims) = s.sequence else {
            ui.label(
                "This view shows sequence models (e.g. the ih preset): open or train one. \
                 For toy models the Causal importance tab shows CI per input.",
            );
            return;
        };
        self.picker.ui(ui, &s, &dims);
        ui.horizontal(|ui| {
            ui.checkbox(&mut self.by_cluster, "rows by cluster")
                .on_hover_text("group each module's subcomponents by their cluster (else by density)");
            if let Some(p) = &self.link.probe
                && let Some((pos, m)) = p.induction
            {
                ui.label(format!(
                    "induction: position {pos} must predict {m}; the target predicts {} (p = {:.2})",
                    p.top_target[pos][0].0, p.top_target[pos][0].1
                ));
            }
        });
        // Ask the worker once per (snapshot, sequence); one request at a time.
        self.link
            .request(cx, &self.picker.tokens, self.picker.version, "");
        let Some(p) = self.link.probe.clone() else {
            ui.label("computing the sequence's CI...");
            return;
        };
        let seq = p.tokens.len();
        let nm = p.modules.len();
        self.panels.resize(nm, None);
        // Token strip over the panels: every token where they fit, the induction pair marked.
        let label_w = 170.0;
        let avail_w = ui.available_width() - label_w;
        let cell_w = avail_w / seq as f32;
        let (strip, _) = ui.allocate_exact_size(egui::vec2(ui.available_width(), 16.0), egui::Sense::hover());
        let every = ((26.0 / cell_w).ceil() as usize).max(1);
        let text = token_labels(p.tokens.iter().map(|&t| t as usize), &dims);
        for (pos, t) in text.iter().enumerate() {
            let special = t == "S" || p.induction.is_some_and(|(_, m)| pos > 0 && p.tokens[pos - 1] as usize == dims.induction_token() && p.tokens[pos] == m);
            if pos % every == 0 || special {
                ui.painter().text(
                    egui::pos2(strip.left() + label_w + (pos as f32 + 0.5) * cell_w, strip.center().y),
                    egui::Align2::CENTER_CENTER,
                    t,
                    egui::FontId::monospace(9.0),
                    if special {
                        egui::Color32::from_rgb(240, 150, 40)
                    } else {
                        ui.visuals().text_color()
                    },
                );
            }
        }
        let panel_h = ((ui.available_height() - 30.0) / nm as f32 - 4.0).max(28.0);
        egui::ScrollArea::vertical().show(ui, |ui| {
            for j in 0..nm {
                let rows = panel_rows(cx, j, self.by_cluster);
                let c = p.c[j];
                let fresh = matches!(&self.panels[j], Some((k, b, _, r)) if *k == self.link.shown && *b == self.by_cluster && *r == rows);
                if !fresh {
                    let mut v = Vec::with_capacity(rows.len() * seq);
                    for &k in &rows {
                        for pos in 0..seq {
                            v.push(p.ci[j][pos * c + k]);
                        }
                    }
                    let version = self.link.shown * 64 + j as u64 * 2 + self.by_cluster as u64;
                    let data = heatmap::Data::new(Arc::new(v), rows.len(), seq, version);
                    self.panels[j] = Some((self.link.shown, self.by_cluster, data, rows.clone()));
                }
                let Some((_, _, data, rows)) = &self.panels[j] else { continue };
                ui.horizontal(|ui| {
                    let (lr, _) = ui.allocate_exact_size(egui::vec2(label_w - 8.0, panel_h), egui::Sense::hover());
                    ui.painter().text(
                        lr.left_center(),
                        egui::Align2::LEFT_CENTER,
                        format!("{}\n{} alive of {c}", p.modules[j], rows.len()),
                        egui::FontId::proportional(11.0),
                        ui.visuals().text_color(),
                    );
                    let (rect, resp) = ui.allocate_exact_size(egui::vec2(avail_w, panel_h), egui::Sense::click());
                    if rows.is_empty() {
                        ui.painter().text(rect.center(), egui::Align2::CENTER_CENTER, "no subcomponent fires on the batch", egui::FontId::proportional(11.0), ui.visuals().weak_text_color());
                        return;
                    }
                    heatmap::paint(ui, rect, egui::Id::unique(("sequence-ci", j)), data, heatmap::Style::sequential(0.0, 1.0));
                    // Colour tick of each row's subcomponent at the left edge.
                    let rh = rect.height() / rows.len() as f32;
                    if rh >= 2.0 {
                        for (r, &k) in rows.iter().enumerate() {
                            ui.painter().rect_filled(
                                egui::Rect::from_min_size(egui::pos2(rect.left() - 4.0, rect.top() + r as f32 * rh), egui::vec2(3.0, rh)),
                                0.0,
                                component_color(k),
                            );
                        }
                    }
                    if cx.selection.module == j
                        && let Some(sel) = cx.selection.component
                        && let Some(r) = rows.iter().position(|&k| k == sel)
                    {
                        let band = egui::Rect::from_min_size(egui::pos2(rect.left(), rect.top() + r as f32 * rh), egui::vec2(rect.width(), rh));
                        ui.painter().rect_stroke(band, 0.0, egui::Stroke::new(1.5, egui::Color32::from_rgb(230, 80, 20)), egui::StrokeKind::Inside);
                    }
                    if let Some(pos) = resp.hover_pos()
                        && let Some((r, x)) = heatmap::cell_at(rect, rows.len(), seq, pos)
                    {
                        let k = rows[r];
                        resp.clone().on_hover_text(format!(
                            "position {x}, token {}\n{}:{k}\nCI = {:.4}",
                            text.get(x).map_or("?", String::as_str),
                            p.modules[j],
                            p.ci[j][x * c + k]
                        ));
                        if resp.clicked() {
                            cx.selection.module = j;
                            cx.selection.component = Some(k);
                        }
                    }
                });
            }
        });
    }
}
