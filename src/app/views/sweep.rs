//! Sweep: a phase map of a sweep folder (`spdlab sweep`). Two chosen axes make a grid, a
//! third gives small multiples, further axes are held at chosen values; each cell is coloured
//! by a chosen metric of its finished point, running cells show their progress, hover shows
//! every number, and a click opens that point's decomposition in every view. The folder is
//! watched: points fill in as they finish. "Compare two" picks two finished points instead and
//! shows their subcomponents matched (Hungarian on the similarity of the rank-one matrices,
//! computed on a background thread) with both sides' directions.

use std::sync::{Arc, Mutex};

use eframe::egui;

use crate::app::heatmap::Style;
use crate::app::view::{Action, CsvJob, View, ViewCtx};
use crate::sweep::{PointRow, PointState, SweepTable};
use crate::worker::Source;

/// Where the background comparison leaves its answer (None while it computes).
pub type ComparisonSlot = Arc<Mutex<Option<Result<Arc<crate::compare::Comparison>, String>>>>;

#[derive(Default)]
pub struct SweepView {
    /// Axis along x, along y (None: one row), of the small multiples (None: one map).
    pub x: usize,
    pub y: Option<usize>,
    pub multiples: Option<usize>,
    /// The value (index) each other axis is held at.
    pub fixed: Vec<usize>,
    pub metric: String,
    pub log: bool,
    /// The point whose decomposition was opened last.
    pub opened: Option<usize>,
    /// "Compare two" mode: clicks pick points A and B instead of opening them.
    pub compare_mode: bool,
    pub compare: Vec<usize>,
    /// The comparison of the two picked points (computed off the UI thread).
    pub comparison: Option<ComparisonSlot>,
    /// The module shown in the comparison.
    pub compare_module: usize,
    /// Axes chosen for this folder (set on the first table).
    initialised: Option<std::path::PathBuf>,
}

fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if f != 0.0 && (f.abs() < 1e-2 || f.abs() >= 1e5) => format!("{f:.0e}"),
            _ => n.to_string(),
        },
        v => v.to_string(),
    }
}

impl View for SweepView {
    fn name(&self) -> &'static str {
        "sweep"
    }
    fn label(&self) -> &'static str {
        "Sweep"
    }
    fn needs_snapshot(&self) -> bool {
        false
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let t = cx
            .session
            .sweep
            .as_ref()
            .and_then(|w| w.table())
            .ok_or_else(|| anyhow::anyhow!("no sweep folder open"))?;
        Ok(Box::new(move || Ok(csv_text(&t))))
    }
}

/// One row per point: its axis values, state, progress and every metric.
fn csv_text(t: &SweepTable) -> String {
    let mut s = String::from("point");
    for a in &t.axes {
        s.push_str(&format!(",\"{}\"", a.path));
    }
    s.push_str(",state,step,total");
    for m in &t.metric_names {
        s.push_str(&format!(",\"{m}\""));
    }
    s.push('\n');
    for r in &t.rows {
        s.push_str(&r.point.index.to_string());
        for (_, v) in &r.point.values {
            s.push_str(&format!(",{}", value_text(v)));
        }
        let (state, step, total) = match &r.state {
            PointState::Finished => ("finished", String::new(), String::new()),
            PointState::Running { step, total } => ("running", step.to_string(), total.to_string()),
            PointState::Pending => ("pending", String::new(), String::new()),
        };
        s.push_str(&format!(",{state},{step},{total}"));
        for m in &t.metric_names {
            s.push(',');
            if let Some(v) = r.metrics.get(m) {
                s.push_str(&v.to_string());
            }
        }
        s.push('\n');
    }
    s
}

impl SweepView {
    /// Axes and metric for a newly opened folder: the first two axes, the third as small
    /// multiples, the target-solution error if there is one (else the total loss).
    fn init(&mut self, t: &SweepTable) {
        if self.initialised.as_ref() == Some(&t.dir) {
            return;
        }
        self.initialised = Some(t.dir.clone());
        self.x = 0;
        self.y = (t.axes.len() > 1).then_some(1);
        self.multiples = (t.axes.len() > 2).then_some(2);
        self.fixed = vec![0; t.axes.len()];
        self.metric.clear();
        self.opened = None;
    }

    fn pick_metric(&mut self, t: &SweepTable) {
        if !self.metric.is_empty() && t.metric_names.contains(&self.metric) {
            return;
        }
        for want in ["target-solution error", "loss total"] {
            if t.metric_names.iter().any(|m| m == want) {
                self.metric = want.into();
                return;
            }
        }
        if let Some(m) = t.metric_names.first() {
            self.metric = m.clone();
        }
    }

    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let Some(w) = cx.session.sweep.as_ref() else {
            ui.label("Open a sweep folder (made by `spdlab sweep`) to see its phase map: `spdlab DIR`, or Open folder... above.");
            return;
        };
        if let Some(e) = w.error() {
            ui.colored_label(egui::Color32::from_rgb(220, 60, 60), e);
        }
        let Some(t) = w.table() else {
            ui.label(format!("reading {} ...", w.dir.display()));
            return;
        };
        self.init(&t);
        self.pick_metric(&t);
        let (fin, run, pend) = t.counts();
        ui.horizontal_wrapped(|ui| {
            ui.strong(format!("{}", t.dir.display()));
            ui.label(format!(
                "{} points: {fin} finished, {run} running, {pend} pending",
                t.rows.len()
            ));
        });
        self.controls(ui, &t);
        if t.axes.is_empty() {
            return;
        }
        // The points shown: those at the fixed values of the other axes.
        let shown: Vec<&PointRow> = t
            .rows
            .iter()
            .filter(|r| {
                (0..t.axes.len()).all(|a| {
                    Some(a) == Some(self.x)
                        || Some(a) == self.y
                        || Some(a) == self.multiples
                        || t.axes[a].values.get(self.fixed[a]) == Some(&r.point.values[a].1)
                })
            })
            .collect();
        let vals: Vec<f64> = shown
            .iter()
            .filter_map(|r| r.metrics.get(&self.metric).copied())
            .filter(|v| v.is_finite() && (!self.log || *v > 0.0))
            .collect();
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let style = if vals.is_empty() {
            Style::sequential(0.0, 1.0)
        } else {
            let mut s = Style::sequential(lo as f32, (hi.max(lo + 1e-12)) as f32);
            s.log = self.log && lo > 0.0;
            s
        };
        ui.horizontal(|ui| {
            ui.label(format!("{}: {lo:.3e} .. {hi:.3e}", self.metric));
            let (r, _) = ui.allocate_exact_size(egui::vec2(160.0, 12.0), egui::Sense::hover());
            for i in 0..32 {
                let f = i as f32 / 31.0;
                let v = if style.log {
                    (style.lo.ln() + f * (style.hi.ln() - style.lo.ln())).exp()
                } else {
                    style.lo + f * (style.hi - style.lo)
                };
                let cell = egui::Rect::from_min_size(
                    r.min + egui::vec2(i as f32 * 5.0, 0.0),
                    egui::vec2(5.0, 12.0),
                );
                ui.painter().rect_filled(cell, 0.0, style.color(v));
            }
        });
        let m_values: Vec<Option<usize>> = match self.multiples {
            Some(a) => (0..t.axes[a].values.len()).map(Some).collect(),
            None => vec![None],
        };
        let nx = t.axes[self.x].values.len();
        let ny = self.y.map_or(1, |a| t.axes[a].values.len());
        let per_row = (m_values.len() as f32).sqrt().ceil().max(1.0) as usize;
        let avail = ui.available_size();
        let label_w = 70.0;
        let cell = ((avail.x / per_row as f32 - label_w - 16.0) / nx as f32)
            .min((avail.y / m_values.len().div_ceil(per_row) as f32 - 60.0) / ny as f32)
            .clamp(14.0, 90.0);
        let mut clicked: Option<usize> = None;
        egui::ScrollArea::both().id_salt("sweep-maps").show(ui, |ui| {
            for chunk in m_values.chunks(per_row) {
                ui.horizontal_top(|ui| {
                    for mv in chunk {
                        ui.vertical(|ui| {
                            if let (Some(a), Some(k)) = (self.multiples, mv) {
                                ui.strong(format!(
                                    "{} = {}",
                                    t.axes[a].path,
                                    value_text(&t.axes[a].values[*k])
                                ));
                            }
                            if let Some(i) = self.grid(ui, &t, &shown, *mv, cell, label_w, &style) {
                                clicked = Some(i);
                            }
                        });
                        ui.add_space(12.0);
                    }
                });
            }
        });
        if let Some(i) = clicked
            && let Some(r) = t.rows.get(i)
            && r.state == PointState::Finished
        {
            if self.compare_mode {
                self.pick_for_comparison(&t, i, ui.ctx());
            } else {
                self.opened = Some(i);
                cx.request(Action::Load(Source::File(r.run.clone())));
            }
        }
        if self.compare_mode {
            self.comparison_panel(ui, &t);
        }
        if let Some(i) = self.opened {
            ui.label(format!(
                "opened point {i} ({}) in every view",
                t.rows.get(i).map(|r| r.point.label()).unwrap_or_default()
            ));
        }
    }

    fn controls(&mut self, ui: &mut egui::Ui, t: &SweepTable) {
        let names: Vec<&str> = t.axes.iter().map(|a| a.path.as_str()).collect();
        ui.horizontal_wrapped(|ui| {
            egui::ComboBox::from_label("x")
                .selected_text(names.get(self.x).copied().unwrap_or("-"))
                .show_ui(ui, |ui| {
                    for (i, n) in names.iter().enumerate() {
                        ui.selectable_value(&mut self.x, i, *n);
                    }
                });
            let opt = |ui: &mut egui::Ui, label: &str, v: &mut Option<usize>| {
                egui::ComboBox::from_label(label)
                    .selected_text(v.and_then(|i| names.get(i).copied()).unwrap_or("none"))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(v, None, "none");
                        for (i, n) in names.iter().enumerate() {
                            ui.selectable_value(v, Some(i), *n);
                        }
                    });
            };
            opt(ui, "y", &mut self.y);
            opt(ui, "small multiples", &mut self.multiples);
            egui::ComboBox::from_label("colour by")
                .selected_text(self.metric.clone())
                .show_ui(ui, |ui| {
                    for m in &t.metric_names {
                        ui.selectable_value(&mut self.metric, m.clone(), m);
                    }
                });
            ui.checkbox(&mut self.log, "log scale");
            ui.separator();
            if ui
                .checkbox(&mut self.compare_mode, "compare two")
                .on_hover_text("click two finished points to match their subcomponents")
                .changed()
            {
                self.compare.clear();
                self.comparison = None;
            }
        });
        // One axis per role.
        if self.y == Some(self.x) {
            self.y = None;
        }
        if self.multiples == Some(self.x) || (self.multiples.is_some() && self.multiples == self.y) {
            self.multiples = None;
        }
        let others: Vec<usize> = (0..t.axes.len())
            .filter(|&a| a != self.x && Some(a) != self.y && Some(a) != self.multiples)
            .collect();
        if !others.is_empty() {
            ui.horizontal_wrapped(|ui| {
                ui.label("held at:");
                for a in others {
                    let vals = &t.axes[a].values;
                    let k = &mut self.fixed[a];
                    egui::ComboBox::from_label(&t.axes[a].path)
                        .selected_text(vals.get(*k).map(value_text).unwrap_or_default())
                        .show_ui(ui, |ui| {
                            for (i, v) in vals.iter().enumerate() {
                                ui.selectable_value(k, i, value_text(v));
                            }
                        });
                }
            });
        }
    }

    /// One map (the points at multiples value `mv`); returns the clicked point.
    #[allow(clippy::too_many_arguments)]
    fn grid(
        &self,
        ui: &mut egui::Ui,
        t: &SweepTable,
        shown: &[&PointRow],
        mv: Option<usize>,
        cell: f32,
        label_w: f32,
        style: &Style,
    ) -> Option<usize> {
        let xa = &t.axes[self.x];
        let ny = self.y.map_or(1, |a| t.axes[a].values.len());
        let nx = xa.values.len();
        let size = egui::vec2(label_w + cell * nx as f32, cell * ny as f32 + 34.0);
        let (rect, _) = ui.allocate_exact_size(size, egui::Sense::hover());
        let p = ui.painter_at(rect);
        let origin = rect.min + egui::vec2(label_w, 0.0);
        let text_color = ui.visuals().text_color();
        let small = egui::FontId::proportional(10.0);
        let at = |r: &PointRow, axis: Option<usize>, k: usize| {
            axis.is_none_or(|a| t.axes[a].values.get(k) == Some(&r.point.values[a].1))
        };
        let mut clicked = None;
        for yi in 0..ny {
            if let Some(ya) = self.y {
                p.text(
                    egui::pos2(origin.x - 4.0, origin.y + (yi as f32 + 0.5) * cell),
                    egui::Align2::RIGHT_CENTER,
                    value_text(&t.axes[ya].values[yi]),
                    small.clone(),
                    text_color,
                );
            }
            for xi in 0..nx {
                let r = egui::Rect::from_min_size(
                    origin + egui::vec2(xi as f32 * cell, yi as f32 * cell),
                    egui::vec2(cell - 1.0, cell - 1.0),
                );
                let row = shown.iter().find(|r| {
                    at(r, Some(self.x), xi) && at(r, self.y, yi) && mv.is_none_or(|k| at(r, self.multiples, k))
                });
                let Some(row) = row else {
                    continue;
                };
                let (fill, text) = match (&row.state, row.metrics.get(&self.metric)) {
                    (PointState::Finished, Some(v)) => (style.color(*v as f32), short_num(*v)),
                    (PointState::Finished, None) => (egui::Color32::from_gray(70), "-".into()),
                    (PointState::Running { step, total }, _) => (
                        egui::Color32::from_gray(55),
                        if *total > 0 {
                            format!("{}%", 100 * step / total)
                        } else {
                            "…".into()
                        },
                    ),
                    (PointState::Pending, _) => (egui::Color32::from_gray(35), String::new()),
                };
                p.rect_filled(r, 2.0, fill);
                if let PointState::Running { step, total } = row.state
                    && total > 0
                {
                    // Progress bar along the cell's bottom.
                    let f = step as f32 / total as f32;
                    let bar = egui::Rect::from_min_size(
                        r.left_bottom() - egui::vec2(0.0, 3.0),
                        egui::vec2(r.width() * f, 3.0),
                    );
                    p.rect_filled(bar, 0.0, egui::Color32::from_rgb(90, 170, 90));
                }
                if let Some(k) = self.compare.iter().position(|&c| c == row.point.index) {
                    let color = [egui::Color32::from_rgb(230, 80, 20), egui::Color32::from_rgb(60, 200, 230)][k.min(1)];
                    p.rect_stroke(r, 2.0, egui::Stroke::new(2.5, color), egui::StrokeKind::Inside);
                    p.text(r.left_top() + egui::vec2(3.0, 2.0), egui::Align2::LEFT_TOP, ["A", "B"][k.min(1)], small.clone(), color);
                } else if self.opened == Some(row.point.index) {
                    p.rect_stroke(
                        r,
                        2.0,
                        egui::Stroke::new(2.0, egui::Color32::from_rgb(230, 80, 20)),
                        egui::StrokeKind::Inside,
                    );
                }
                if cell >= 30.0 && !text.is_empty() {
                    let lum = fill.r() as u32 + fill.g() as u32 + fill.b() as u32;
                    let tc = if lum > 380 { egui::Color32::BLACK } else { egui::Color32::WHITE };
                    // Big cells also name the regime (single-feature answers), one part a line.
                    let label = (cell >= 70.0)
                        .then(|| crate::sweep::regime_label(&row.metrics))
                        .flatten();
                    match label {
                        Some(l) => {
                            let lines = format!("{text}\n{}", l.replace(" · ", "\n"));
                            p.text(r.center(), egui::Align2::CENTER_CENTER, lines, egui::FontId::proportional(9.0), tc);
                        }
                        None => {
                            p.text(r.center(), egui::Align2::CENTER_CENTER, text, small.clone(), tc);
                        }
                    }
                }
                // Each cell is its own widget (hover, click, and a name for screen readers
                // and UI tests: "point N").
                let id = egui::Id::unique(("sweep-cell", mv, row.point.index));
                let resp = ui.interact(r, id, egui::Sense::click());
                ui.ctx().accesskit_node_builder(resp.id, |n| {
                    n.set_label(format!("point {}", row.point.index))
                });
                if resp.clicked() {
                    clicked = Some(row.point.index);
                }
                resp.on_hover_ui(|ui| hover_details(ui, row));
            }
        }
        for xi in 0..nx {
            p.text(
                egui::pos2(origin.x + (xi as f32 + 0.5) * cell, origin.y + ny as f32 * cell + 2.0),
                egui::Align2::CENTER_TOP,
                value_text(&xa.values[xi]),
                small.clone(),
                text_color,
            );
        }
        p.text(
            egui::pos2(origin.x, origin.y + ny as f32 * cell + 16.0),
            egui::Align2::LEFT_TOP,
            match self.y {
                Some(ya) => format!("x: {}, y: {}", xa.path, t.axes[ya].path),
                None => format!("x: {}", xa.path),
            },
            small,
            ui.visuals().weak_text_color(),
        );
        clicked
    }
}

/// Everything about one point, for its hover.
impl SweepView {
    /// Picks point `i` as A (or B once A is picked; a third pick starts over), and starts
    /// the comparison when both are picked.
    fn pick_for_comparison(&mut self, t: &SweepTable, i: usize, ctx: &egui::Context) {
        if self.compare.len() >= 2 || self.compare.contains(&i) {
            self.compare.clear();
            self.comparison = None;
        }
        self.compare.push(i);
        if let [a, b] = self.compare[..] {
            let (pa, pb) = (t.rows[a].run.clone(), t.rows[b].run.clone());
            let slot = Arc::new(Mutex::new(None));
            let (out, ctx) = (slot.clone(), ctx.clone());
            std::thread::spawn(move || {
                let r = crate::compare::compare_files(&pa, &pb)
                    .map(Arc::new)
                    .map_err(|e| format!("{e:#}"));
                *out.lock().unwrap() = Some(r);
                ctx.request_repaint();
            });
            self.comparison = Some(slot);
            self.compare_module = 0;
        }
    }

    /// The picked points' matched subcomponents, per module.
    fn comparison_panel(&mut self, ui: &mut egui::Ui, t: &SweepTable) {
        ui.separator();
        let label = |i: usize| t.rows.get(i).map(|r| r.point.label()).unwrap_or_default();
        match self.compare[..] {
            [] => {
                ui.label("Compare two: click a finished point (A), then another (B).");
                return;
            }
            [a] => {
                ui.label(format!("A = point {a} ({}); now click B.", label(a)));
                return;
            }
            _ => {}
        }
        let (a, b) = (self.compare[0], self.compare[1]);
        ui.strong(format!("A = point {a} ({}), B = point {b} ({})", label(a), label(b)));
        let state = self.comparison.as_ref().and_then(|c| c.lock().unwrap().clone());
        let cmp = match state {
            None => {
                ui.label("matching subcomponents...");
                return;
            }
            Some(Err(e)) => {
                ui.colored_label(egui::Color32::from_rgb(220, 60, 60), e);
                return;
            }
            Some(Ok(c)) => c,
        };
        ui.horizontal_wrapped(|ui| {
            for (j, m) in cmp.modules.iter().enumerate() {
                let text = format!(
                    "{}: {} pairs, {} >= 0.9",
                    m.name,
                    m.pairs.len(),
                    m.matched_above(0.9)
                );
                if ui.selectable_label(self.compare_module == j, text).clicked() {
                    self.compare_module = j;
                }
            }
        });
        let Some(m) = cmp.modules.get(self.compare_module) else {
            return;
        };
        ui.weak("pairs matched by the Hungarian assignment on |cos| of the rank-one matrices U_c V_c^T, most similar first; strips: read V / write U of A, then of B");
        let v_of = |v: &[f32], c: usize, k: usize| -> Vec<f32> {
            (0..m.d_in).map(|i| v[i * c + k]).collect()
        };
        let u_of = |u: &[f32], k: usize| u[k * m.d_out..(k + 1) * m.d_out].to_vec();
        let cell = |ui: &mut egui::Ui, text: String, w: f32| {
            ui.add_sized([w, 16.0], egui::Label::new(text));
        };
        ui.horizontal(|ui| {
            for (h, w) in [("A", 40.0), ("B", 40.0), ("similarity", 70.0)] {
                ui.add_sized([w, 16.0], egui::Label::new(egui::RichText::new(h).strong()));
            }
            ui.strong("V, U of A  |  V, U of B    CI on the probe inputs: A | B");
        });
        // Compact strips (six per row); only the visible rows are built (a module may have
        // hundreds of pairs).
        let strip = |ui: &mut egui::Ui, v: &[f32]| crate::app::widgets::value_strip_cells(ui, v, 14);
        egui::ScrollArea::vertical()
            .id_salt("sweep-compare")
            .show_rows(ui, 18.0, m.pairs.len(), |ui, rows| {
                for &(i, j, sim) in &m.pairs[rows] {
                    ui.horizontal(|ui| {
                        cell(ui, i.to_string(), 40.0);
                        cell(ui, j.to_string(), 40.0);
                        cell(ui, format!("{sim:.3}"), 70.0);
                        strip(ui, &v_of(&m.v_a, m.c_a, i));
                        strip(ui, &u_of(&m.u_a, i));
                        ui.label("|");
                        strip(ui, &v_of(&m.v_b, m.c_b, j));
                        strip(ui, &u_of(&m.u_b, j));
                        // CI over the probe inputs (one per feature), A then B.
                        if m.n_probe > 0 && !m.ci_a.is_empty() && !m.ci_b.is_empty() {
                            ui.label("  CI:");
                            let ci = |c: &[f32], cc: usize, k: usize| -> Vec<f32> {
                                (0..m.n_probe).map(|r| c[r * cc + k]).collect()
                            };
                            strip(ui, &ci(&m.ci_a, m.c_a, i));
                            ui.label("|");
                            strip(ui, &ci(&m.ci_b, m.c_b, j));
                        }
                    });
                }
            });
    }
}

fn hover_details(ui: &mut egui::Ui, row: &PointRow) {
    ui.strong(format!("point {}: {}", row.point.index, row.point.label()));
    if let Some(l) = crate::sweep::regime_label(&row.metrics) {
        ui.label(format!("regime: {l}"));
    }
    match &row.state {
        PointState::Finished => {
            egui::Grid::new("sweep-hover").show(ui, |ui| {
                for (k, v) in &row.metrics {
                    ui.label(k);
                    ui.label(format!("{v:.4e}"));
                    ui.end_row();
                }
            });
            ui.weak("click: open this decomposition in every view");
        }
        PointState::Running { step, total } => {
            ui.label(format!("running: step {step} of {total}"));
            if let Some(pr) = &row.progress {
                ui.label(format!("{:.0} steps/s", pr.steps_per_second));
                for (k, v) in &pr.losses {
                    ui.label(format!("{k} {v:.3e}"));
                }
            }
        }
        PointState::Pending => {
            ui.label("pending");
        }
    }
}

fn short_num(v: f64) -> String {
    if v == v.round() && v.abs() < 1e5 {
        format!("{v:.0}")
    } else if v.abs() >= 0.01 && v.abs() < 1000.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}
