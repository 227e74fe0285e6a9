//! Read (V_c) and write (U_c) directions of each subcomponent; arrows where a space is 2-D
//! (the paper's TMS figure), strips otherwise. For an attention query or key projection, the
//! attention-score change the selected subcomponent induces on a chosen token sequence.

use eframe::egui;
use egui_plot::{Arrows, Legend, Plot, PlotPoints};

use crate::app::heatmap;
use crate::app::sequence_picker::{ProbeLink, QueryKeyMap, SequencePicker, token_labels};
use crate::app::view::{CsvJob, View, ViewCtx};
use crate::app::widgets::{CLUSTER_COLOR, component_color, module_picker};
use crate::worker::{Event, ModuleSnapshot, Snapshot};

/// Subcomponents ordered by weight norm (descending), and the number of negligible ones
/// (norm below 1% of the largest).
pub fn order_by_norm(m: &ModuleSnapshot) -> (Vec<usize>, usize) {
    let mut idx: Vec<usize> = (0..m.c).collect();
    idx.sort_by(|&a, &b| m.norms[b].total_cmp(&m.norms[a]));
    let max = m.norms.iter().copied().fold(0f32, f32::max);
    let negligible = m.norms.iter().filter(|&&n| n < 0.01 * max).count();
    (idx, negligible)
}

/// Directions view; the strips' values (drawn by the heatmap shader) are rebuilt only when the
/// snapshot or module changes.
#[derive(Default)]
pub struct DirectionsView {
    values: Option<heatmap::Data>,
    key: Option<(u64, usize)>,
    pub uploads: u64,
    /// Sequence models: the sequence the score change is shown on, the worker's answer and
    /// its maps (answer key, one per head of the module's block).
    pub picker: SequencePicker,
    pub link: ProbeLink,
    maps: (u64, Vec<(QueryKeyMap, String)>),
}

/// The block of an attention query/key projection (`blocks.{l}.attn.q_proj` / `k_proj`).
pub fn query_key_block(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("blocks.")?;
    let (l, tail) = rest.split_once('.')?;
    matches!(tail, "attn.q_proj" | "attn.k_proj")
        .then(|| l.parse().ok())
        .flatten()
}

impl View for DirectionsView {
    fn name(&self) -> &'static str {
        "directions"
    }
    fn label(&self) -> &'static str {
        "Read/write directions"
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let s = cx.require_snapshot()?.clone();
        Ok(Box::new(move || Ok(crate::app::export::directions_csv(&s))))
    }
    fn on_event(&mut self, e: &Event) {
        if let Event::Loaded { .. } = e {
            self.picker = SequencePicker::default();
            self.maps = (0, vec![]);
        }
        self.link.on_event(e);
    }
}

impl DirectionsView {
    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        module_picker(cx, ui);
        let Some(s) = cx.snapshot().cloned() else {
            return;
        };
        let j = cx.selection.module.min(s.modules.len() - 1);
        let m = &s.modules[j];
        let (order, negligible) = order_by_norm(m);
        ui.label(format!(
        "{}: C = {}, d_in = {}, d_out = {}; {} negligible subcomponents (norm < 1% of the largest) hidden",
        m.name, m.c, m.d_in, m.d_out, negligible
    ));
        let max = m.norms.iter().copied().fold(0f32, f32::max);
        let shown: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&c| m.norms[c] >= 0.01 * max)
            .collect();
        if m.d_out == 2 || m.d_in == 2 {
            arrows_2d(cx, ui, m, &shown);
        } else if s.sequence.is_some() && query_key_block(&m.name).is_some() {
            ui.columns(2, |cols| {
                self.strips(cx, &mut cols[0], m, &shown);
                self.score_change(cx, &mut cols[1], &s, m);
            });
        } else {
            self.strips(cx, ui, m, &shown);
        }
    }

    /// The attention-score change (scores before the softmax: all subcomponents minus all but
    /// the selected one) of the selected query/key subcomponent on a chosen sequence, per head
    /// of its block, computed by the worker.
    fn score_change(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui, s: &Snapshot, m: &ModuleSnapshot) {
        let (Some(dims), Some(block)) = (s.sequence, query_key_block(&m.name)) else {
            return;
        };
        ui.strong("Induced attention-score change");
        self.picker.ui(ui, s, &dims);
        let Some(c) = cx.selection.component.filter(|&c| c < m.c) else {
            ui.label("Select a subcomponent (click a row) to see how it changes the attention scores.");
            return;
        };
        let select = format!("{}:{c}", m.name);
        self.link.request(cx, &self.picker.tokens, self.picker.version, &select);
        let Some(p) = self.link.probe.clone().filter(|p| p.selection == [select.clone()]) else {
            ui.label("computing...");
            return;
        };
        let Some(change) = p.attention.get(block).and_then(|a| a.score_change.as_ref()) else {
            return;
        };
        let seq = p.tokens.len();
        let text = token_labels(p.tokens.iter().map(|&t| t as usize), &dims);
        if self.maps.0 != self.link.shown || self.maps.1.is_empty() {
            let per_head = |h: usize| {
                // The largest change, named.
                let (mut best, mut at) = (0f32, (0, 0));
                for q in 0..seq {
                    for k in 0..=q {
                        let v = change[(h * seq + q) * seq + k];
                        if v.abs() > best.abs() {
                            (best, at) = (v, (q, k));
                        }
                    }
                }
                let label = format!(
                    "head {h}: largest change {best:+.3} at query {} ({}) -> key {} ({})",
                    at.0, text[at.0], at.1, text[at.1]
                );
                (QueryKeyMap::score_change(change, h, seq, self.link.shown), label)
            };
            self.maps = (self.link.shown, (0..p.heads).map(per_head).collect());
        }
        ui.label(format!(
            "{select} in block {block}: q·k/√d_head with all subcomponents minus without it (red: it raises the score, blue: lowers it); rows: query position, columns: key position"
        ));
        let side = (ui.available_width() - 10.0)
            .min((ui.available_height() - 40.0) / p.heads as f32 - 24.0)
            .max(60.0);
        for (h, (map, label)) in self.maps.1.iter().enumerate() {
            ui.label(label);
            map.show(ui, egui::Id::unique(("score-change", h)), side, &text);
        }
    }
}

fn arrows_2d(cx: &mut ViewCtx, ui: &mut egui::Ui, m: &ModuleSnapshot, shown: &[usize]) {
    // Write side 2-D (TMS linear1): subcomponent c writes U_c·‖V_c‖ into the plane; the target's
    // feature f writes W[:, f]. Read side 2-D (TMS linear2): c reads V_c·‖U_c‖, feature f is
    // read along W[f, :].
    let write_side = m.d_out == 2;
    // U_c ⊗ V_c is unchanged when both flip sign, so orient each arrow by the sign of the
    // other side's largest entry: then a subcomponent that implements feature f lies on top
    // of the target's column for f.
    let signed_norm = |xs: &mut dyn Iterator<Item = f32>| -> f32 {
        let (mut sq, mut big) = (0f32, 0f32);
        for x in xs {
            sq += x * x;
            if x.abs() > big.abs() {
                big = x;
            }
        }
        sq.sqrt() * if big < 0.0 { -1.0 } else { 1.0 }
    };
    let vec_of = |c: usize| -> [f64; 2] {
        if write_side {
            let vn = signed_norm(&mut (0..m.d_in).map(|i| m.v[i * m.c + c]));
            [(m.u[c * 2] * vn) as f64, (m.u[c * 2 + 1] * vn) as f64]
        } else {
            let un = signed_norm(&mut (0..m.d_out).map(|o| m.u[c * m.d_out + o]));
            [(m.v[c] * un) as f64, (m.v[m.c + c] * un) as f64]
        }
    };
    let targets: Vec<[f64; 2]> = if write_side {
        (0..m.d_in)
            .map(|f| [m.target_w[f] as f64, m.target_w[m.d_in + f] as f64])
            .collect()
    } else {
        (0..m.d_out)
            .map(|f| [m.target_w[f * 2] as f64, m.target_w[f * 2 + 1] as f64])
            .collect()
    };
    ui.label(if write_side {
        "write directions U_c (scaled by |V_c|) in the 2-D hidden space; grey: the target's feature columns"
    } else {
        "read directions V_c (scaled by |U_c|) in the 2-D hidden space; grey: the target's feature rows"
    });
    let sel = cx.selection.component;
    let members = cx.selected_cluster_members(
        cx.selection.module.min(
            cx.snapshot()
                .map(|s| s.modules.len())
                .unwrap_or(1)
                .saturating_sub(1),
        ),
    );
    let r = targets
        .iter()
        .copied()
        .chain(shown.iter().map(|&c| vec_of(c)))
        .map(|p| p[0].hypot(p[1]))
        .fold(0.1f64, f64::max)
        * 1.15;
    let resp = Plot::new(("dir2d", m.name.as_str()))
        .legend(Legend::default())
        .data_aspect(1.0)
        .include_x(-r)
        .include_x(r)
        .include_y(-r)
        .include_y(r)
        .show(ui, |p| {
            let origins: Vec<[f64; 2]> = vec![[0.0, 0.0]; targets.len()];
            p.arrows(
                Arrows::new(
                    "target features",
                    PlotPoints::from(origins),
                    PlotPoints::from(targets.clone()),
                )
                .color(egui::Color32::from_gray(150)),
            );
            for &c in shown {
                let tip = vec_of(c);
                let color = if sel == Some(c) {
                    egui::Color32::from_rgb(230, 80, 20)
                } else if members.contains(&c) {
                    CLUSTER_COLOR
                } else {
                    component_color(c)
                };
                p.arrows(
                    Arrows::new(
                        format!("{}:{c}", m.name),
                        PlotPoints::from(vec![[0.0, 0.0]]),
                        PlotPoints::from(vec![tip]),
                    )
                    .color(color),
                );
            }
            p.pointer_coordinate()
        });
    if resp.response.clicked()
        && let Some(pt) = resp.inner
    {
        // Select the subcomponent whose tip is nearest to the click.
        let best = shown.iter().copied().min_by(|&a, &b| {
            let da = dist(vec_of(a), [pt.x, pt.y]);
            let db = dist(vec_of(b), [pt.x, pt.y]);
            da.total_cmp(&db)
        });
        cx.selection.component = best;
    }
}

fn dist(a: [f64; 2], b: [f64; 2]) -> f64 {
    (a[0] - b[0]).hypot(a[1] - b[1])
}

impl DirectionsView {
    fn strips(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui, m: &ModuleSnapshot, shown: &[usize]) {
        ui.label("each row: one subcomponent (by weight norm); left: read direction V_c over inputs, right: write direction U_c over outputs; one colour scale per side");
        let key = (cx.snapshot_version(), cx.selection.module);
        let st = self;
        let gap = (m.d_in + m.d_out).div_ceil(100).max(1);
        let width = m.d_in + gap + m.d_out;
        if st.key != Some(key) {
            let vmax = m.v.iter().fold(1e-12f32, |a, x| a.max(x.abs()));
            let umax = m.u.iter().fold(1e-12f32, |a, x| a.max(x.abs()));
            // Each side scaled to ±1 by its own largest |value|; the gap between them is 0.
            let mut values = Vec::with_capacity(shown.len().max(1) * width);
            for &c in shown {
                values.extend((0..m.d_in).map(|i| m.v[i * m.c + c] / vmax));
                values.extend(std::iter::repeat_n(0.0, gap));
                values.extend((0..m.d_out).map(|o| m.u[c * m.d_out + o] / umax));
            }
            if shown.is_empty() {
                values.extend(std::iter::repeat_n(0.0, width));
            }
            st.uploads += 1;
            st.values = Some(heatmap::Data::new(
                std::sync::Arc::new(values),
                shown.len().max(1),
                width,
                st.uploads,
            ));
            st.key = Some(key);
        }
        let Some(values) = st.values.clone() else {
            return;
        };
        let row_h = 14f32
            .min((ui.available_height() - 20.0) / shown.len().max(1) as f32)
            .max(2.0);
        let w = ui.available_width() - 60.0;
        ui.horizontal(|ui| {
            // Row labels.
            ui.vertical(|ui| {
                ui.spacing_mut().item_spacing.y = 0.0;
                if row_h >= 12.0 {
                    for &c in shown {
                        let selected = cx.selection.component == Some(c);
                        let (r, resp) =
                            ui.allocate_exact_size(egui::vec2(40.0, row_h), egui::Sense::click());
                        let color = if selected {
                            egui::Color32::from_rgb(230, 80, 20)
                        } else {
                            component_color(c)
                        };
                        ui.painter().text(
                            r.right_center(),
                            egui::Align2::RIGHT_CENTER,
                            c.to_string(),
                            egui::FontId::monospace(10.0),
                            color,
                        );
                        if resp.clicked() {
                            cx.selection.component = Some(c);
                        }
                    }
                }
            });
            let (rect, resp) = ui.allocate_exact_size(
                egui::vec2(w.max(50.0), row_h * shown.len().max(1) as f32),
                egui::Sense::click(),
            );
            heatmap::paint(
                ui,
                rect,
                egui::Id::unique("directions"),
                &values,
                heatmap::Style::diverging(1.0),
            );
            for mc in cx.selected_cluster_members(cx.selection.module) {
                if let Some(row) = shown.iter().position(|&c| c == mc) {
                    let r = egui::Rect::from_min_size(
                        egui::pos2(rect.left(), rect.top() + row as f32 * row_h),
                        egui::vec2(rect.width(), row_h),
                    );
                    ui.painter().rect_stroke(
                        r,
                        0.0,
                        egui::Stroke::new(2.0, CLUSTER_COLOR),
                        egui::StrokeKind::Inside,
                    );
                }
            }
            if let Some(sel) = cx.selection.component
                && let Some(row) = shown.iter().position(|&c| c == sel)
            {
                let r = egui::Rect::from_min_size(
                    egui::pos2(rect.left(), rect.top() + row as f32 * row_h),
                    egui::vec2(rect.width(), row_h),
                );
                ui.painter().rect_stroke(
                    r,
                    0.0,
                    egui::Stroke::new(1.5, egui::Color32::from_rgb(230, 80, 20)),
                    egui::StrokeKind::Inside,
                );
            }
            if let Some(pos) = resp.hover_pos() {
                let row = ((pos.y - rect.top()) / row_h) as usize;
                let col = ((pos.x - rect.left()) / rect.width() * width as f32) as usize;
                if row < shown.len() && col < width {
                    let c = shown[row];
                    let text = if col < m.d_in {
                        format!("{}:{c}  V[{col}] = {:.4}", m.name, m.v[col * m.c + c])
                    } else if col >= m.d_in + gap {
                        let o = col - m.d_in - gap;
                        format!("{}:{c}  U[{o}] = {:.4}", m.name, m.u[c * m.d_out + o])
                    } else {
                        format!("{}:{c}", m.name)
                    };
                    resp.clone().on_hover_text(text);
                    if resp.clicked() {
                        cx.selection.component = Some(c);
                    }
                }
            }
        });
    }
}
