//! The day-of-week demonstration: days on a circle, the rotation mechanism's read/write
//! directions in the day plane, a chosen (day, operation) moving through the mechanism, the CI
//! of every (day, operation) input, and the unlearning toggle (ablate the mechanism).

use eframe::egui;
use egui_plot::{Arrows, Corner, Legend, Line, Plot, PlotPoints, Points, Text};

use crate::app::view::{Action, CsvJob, View, ViewCtx};
use crate::app::heatmap;
use crate::metrics::days::DaysViewData;
use crate::model::days::{OP_NAMES, answer, day_angle, day_name};

pub struct DaysView {
    pub day: usize,
    pub op: usize,
    /// Position along the mechanism path (0 = mechanism off, 1 = fully on).
    pub t: f32,
    pub playing: bool,
    pub ablate: bool,
}

impl Default for DaysView {
    fn default() -> Self {
        DaysView {
            day: 0,
            op: 1,
            t: 1.0,
            playing: false,
            ablate: false,
        }
    }
}

const READ: egui::Color32 = egui::Color32::from_rgb(44, 160, 44);
const WRITE: egui::Color32 = egui::Color32::from_rgb(230, 80, 20);

impl View for DaysView {
    fn name(&self) -> &'static str {
        "days"
    }
    fn label(&self) -> &'static str {
        "Days demo"
    }
    fn needs_snapshot(&self) -> bool {
        false
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let d = cx
            .snapshot()
            .and_then(|s| s.days.clone())
            .ok_or_else(|| anyhow::anyhow!("no days decomposition loaded"))?;
        Ok(Box::new(move || Ok(csv(&d))))
    }
}

impl DaysView {
    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let Some(d) = cx.snapshot().and_then(|s| s.days.clone()) else {
            ui.label("This view shows a decomposition of the 'days' preset: 7 days on a circle, and 'next day' as a rotation mechanism.");
            ui.horizontal(|ui| {
                if ui.button("Open the shipped days decomposition").clicked() {
                    cx.request(Action::Load(crate::worker::Source::Asset("days".into())));
                }
                if ui.button("New run of the days preset").clicked() {
                    cx.settings.preset = "days".into();
                    if let Ok(c) = crate::presets::spd_config("days") {
                        cx.settings.steps = c.steps;
                        cx.settings.lr = c.lr_schedule.start_val;
                    }
                    cx.request(Action::NewRun);
                }
            });
            return;
        };
        let st = &mut *self;
        st.day = st.day.min(d.n_days - 1);
        st.op = st.op.min(d.n_ops - 1);
        if st.playing {
            st.t += ui.ctx().input(|i| i.stable_dt).min(0.1) / 1.5;
            if st.t >= 1.0 {
                st.t = 1.0;
                st.playing = false;
            }
            ui.ctx().request_repaint();
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("day:");
            for day in 0..d.n_days {
                ui.selectable_value(&mut st.day, day, day_name(d.n_days, day));
            }
            ui.separator();
            ui.label("operation:");
            for (op, name) in OP_NAMES.iter().enumerate().take(d.n_ops) {
                ui.selectable_value(&mut st.op, op, *name);
            }
            ui.separator();
            if ui
                .button("Play")
                .on_hover_text("dial the mechanism from 0 to 1")
                .clicked()
            {
                st.t = 0.0;
                st.playing = true;
            }
            ui.add(egui::Slider::new(&mut st.t, 0.0..=1.0).text("mechanism mask"));
            ui.separator();
            ui.checkbox(&mut st.ablate, "ablate the rotation mechanism (unlearn)");
        });
        let st = &*self;
        ui.columns(2, |cols| {
            circle_plot(&mut cols[0], &d, st);
            answers_table(&mut cols[1], &d, st);
        });
        ui.separator();
        ci_grid(cx, ui, &d);
    }
}

fn circle_plot(ui: &mut egui::Ui, d: &DaysViewData, st: &DaysView) {
    let row = st.day * d.n_ops + st.op;
    Plot::new("days_circle")
        .legend(Legend::default().position(Corner::LeftBottom))
        .data_aspect(1.0)
        .height(ui.available_height().clamp(260.0, 420.0))
        // Room left of the circle for the legend, so it covers no day.
        .include_x(-3.0)
        .include_x(1.4)
        .include_y(-1.4)
        .include_y(1.4)
        .allow_scroll(false)
        .show(ui, |p| {
            let circle: Vec<[f64; 2]> = (0..=128)
                .map(|i| {
                    let a = std::f64::consts::TAU * i as f64 / 128.0;
                    [a.cos(), a.sin()]
                })
                .collect();
            p.line(Line::new("", PlotPoints::from(circle)).color(egui::Color32::from_gray(190)));
            let pts: Vec<[f64; 2]> = (0..d.n_days)
                .map(|k| {
                    let (s, c) = day_angle(d.n_days, k).sin_cos();
                    [c as f64, s as f64]
                })
                .collect();
            p.points(
                Points::new("days", PlotPoints::from(pts.clone()))
                    .radius(5.0)
                    .color(egui::Color32::from_gray(90)),
            );
            for (k, pt) in pts.iter().enumerate() {
                p.text(Text::new(
                    "",
                    [pt[0] * 1.18, pt[1] * 1.18].into(),
                    day_name(d.n_days, k),
                ));
            }
            // The mechanism's read (mlp_in) and write (mlp_out) directions in the plane.
            if st.op > 0
                && let Some(arrows) = d.arrows.get(st.op - 1)
            {
                for (label, is_write, v) in arrows {
                    let norm = (v[0].hypot(v[1])).max(1e-6);
                    // Unit length: the direction matters, the size is the mechanism's.
                    let tip = [(v[0] / norm) as f64 * 0.9, (v[1] / norm) as f64 * 0.9];
                    let _ = label;
                    p.arrows(
                        Arrows::new(
                            if *is_write {
                                "write directions U (mlp_out)"
                            } else {
                                "read directions V (mlp_in)"
                            },
                            PlotPoints::from(vec![[0.0, 0.0]]),
                            PlotPoints::from(vec![tip]),
                        )
                        .color(if *is_write { WRITE } else { READ }),
                    );
                }
            }
            // The chosen input: from its embedding through the mechanism.
            let start = d.plane_embed[row];
            let path = &d.paths[row];
            let (cur, trail): ([f32; 2], Vec<[f64; 2]>) = if st.ablate {
                (d.plane_ablated[row], vec![])
            } else if path.len() > 1 {
                let f = st.t.clamp(0.0, 1.0) * (path.len() - 1) as f32;
                let i = (f.floor() as usize).min(path.len() - 2);
                let a = f - i as f32;
                let cur = [
                    path[i][0] * (1.0 - a) + path[i + 1][0] * a,
                    path[i][1] * (1.0 - a) + path[i + 1][1] * a,
                ];
                let mut trail: Vec<[f64; 2]> = path[..=i]
                    .iter()
                    .map(|q| [q[0] as f64, q[1] as f64])
                    .collect();
                trail.push([cur[0] as f64, cur[1] as f64]);
                (cur, trail)
            } else {
                (path[0], vec![])
            };
            if trail.len() > 1 {
                p.line(
                    Line::new("path as the mask goes 0 -> 1", PlotPoints::from(trail))
                        .color(WRITE)
                        .width(2.0),
                );
            }
            p.points(
                Points::new(
                    "embedding (before the MLP)",
                    PlotPoints::from(vec![[start[0] as f64, start[1] as f64]]),
                )
                .radius(7.0)
                .filled(false)
                .color(egui::Color32::from_rgb(31, 119, 180)),
            );
            p.points(
                Points::new(
                    if st.ablate {
                        "output (mechanism ablated)"
                    } else {
                        "output"
                    },
                    PlotPoints::from(vec![[cur[0] as f64, cur[1] as f64]]),
                )
                .radius(7.0)
                .color(egui::Color32::from_rgb(31, 119, 180)),
            );
        });
}

fn answers_table(ui: &mut egui::Ui, d: &DaysViewData, st: &DaysView) {
    let ablated = if st.ablate && st.op > 0 {
        d.answers_ablated.get(st.op - 1)
    } else if st.ablate {
        d.answers_ablated.first()
    } else {
        None
    };
    ui.strong(if ablated.is_some() {
        "Answers with the rotation mechanism ablated"
    } else {
        "Answers of the decomposition"
    });
    let answers = ablated.unwrap_or(&d.answers_full);
    egui::Grid::new("days_answers")
        .striped(true)
        .show(ui, |ui| {
            ui.label("");
            for name in OP_NAMES.iter().take(d.n_ops) {
                ui.strong(*name);
            }
            ui.end_row();
            let mut correct = vec![0usize; d.n_ops];
            for day in 0..d.n_days {
                ui.label(day_name(d.n_days, day));
                for op in 0..d.n_ops {
                    let got = answers[day * d.n_ops + op];
                    let ok = got == answer(d.n_days, day, op);
                    correct[op] += ok as usize;
                    let text = egui::RichText::new(day_name(d.n_days, got)).color(if ok {
                        egui::Color32::from_rgb(40, 150, 40)
                    } else {
                        egui::Color32::from_rgb(210, 50, 50)
                    });
                    ui.label(text);
                }
                ui.end_row();
            }
            ui.strong("correct");
            for c in correct {
                ui.strong(format!("{c}/{}", d.n_days));
            }
            ui.end_row();
        });
    if let Some(m) = d.mechanisms.get(st.op.max(1) - 1) {
        ui.add_space(6.0);
        ui.label(format!(
            "'{}' mechanism: {} subcomponents in mlp_in/mlp_out{}; plane map vs R - I: {:.1}% error",
            m.op,
            m.members.len(),
            if m.clusters.is_empty() {
                String::new()
            } else {
                format!(", cluster(s) {:?}", m.clusters)
            },
            100.0 * m.plane_map_rel_error
        ));
        ui.label(format!(
            "mechanism CI: >= {:.2} on every '{}' input, <= {:.2} on 'same'",
            m.mechanism_min_ci_on_op, m.op, m.mechanism_max_ci_on_same
        ));
    }
}

/// CI of every (day, op) row: the mechanism's subcomponents first, then the other live ones.
fn ci_grid(cx: &mut ViewCtx, ui: &mut egui::Ui, d: &DaysViewData) {
    let mut members: Vec<String> = d
        .mechanisms
        .iter()
        .flat_map(|m| m.ablated.clone())
        .collect();
    members.dedup();
    let mut cols: Vec<(usize, usize, bool)> = vec![]; // (module, comp, in a mechanism)
    for (j, (name, rows)) in d.ci.iter().enumerate() {
        let c = rows.first().map_or(0, |r| r.len());
        for k in 0..c {
            let label = format!("{name}:{k}");
            let live = rows.iter().any(|r| r[k] > 0.1);
            let mech = members.contains(&label);
            if mech || live {
                cols.push((j, k, mech));
            }
        }
    }
    cols.sort_by_key(|&(j, k, mech)| (!mech, j, k));
    ui.strong(
        "Causal importance per (day, operation); mechanism subcomponents first (orange header)",
    );
    let cell = egui::vec2(18.0, 14.0);
    let label_w = 90.0;
    let n_rows = d.rows.len();
    let head = 12.0;
    let (rect, resp) = ui.allocate_exact_size(
        egui::vec2(
            label_w + cell.x * cols.len() as f32,
            head + cell.y * (n_rows + 1) as f32,
        ),
        egui::Sense::click(),
    );
    let p = ui.painter_at(rect);
    let font = egui::FontId::proportional(10.0);
    // Module name over each run of columns (shortened where the run is narrow).
    let mut start = 0;
    while start < cols.len() {
        let j = cols[start].0;
        let len = cols[start..].iter().take_while(|c| c.0 == j).count();
        let name = &d.ci[j].0;
        let text = if len as f32 * cell.x >= 6.0 * name.len() as f32 {
            name.as_str()
        } else if name.ends_with("_in") {
            "in"
        } else if name.ends_with("_out") {
            "out"
        } else {
            &name[..name.len().min(3)]
        };
        // One column is too narrow for even a short name: its first letter.
        let text = if len == 1 { &text[..1] } else { text };
        p.text(
            egui::pos2(
                rect.min.x + label_w + start as f32 * cell.x,
                rect.min.y + head - 1.0,
            ),
            egui::Align2::LEFT_BOTTOM,
            text,
            font.clone(),
            ui.visuals().weak_text_color(),
        );
        start += len;
    }
    for (ci, &(_, _, mech)) in cols.iter().enumerate() {
        let r = egui::Rect::from_min_size(
            rect.min + egui::vec2(label_w + ci as f32 * cell.x, head),
            egui::vec2(cell.x - 1.0, cell.y - 3.0),
        );
        p.rect_filled(
            r,
            0.0,
            if mech {
                WRITE
            } else {
                egui::Color32::from_gray(200)
            },
        );
    }
    let mut values = Vec::with_capacity(d.rows.len() * cols.len());
    for (ri, &(day, op)) in d.rows.iter().enumerate() {
        let y = rect.min.y + head + cell.y * (ri + 1) as f32;
        p.text(
            egui::pos2(rect.min.x, y),
            egui::Align2::LEFT_TOP,
            format!("{} {}", day_name(d.n_days, day), OP_NAMES[op]),
            font.clone(),
            ui.visuals().text_color(),
        );
        values.extend(cols.iter().map(|&(j, k, _)| d.ci[j].1[ri][k]));
    }
    // The grid through the heatmap shader; its version is the values' hash (a few hundred
    // cells), so it uploads only when they change.
    let version = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (d.rows.len(), cols.len()).hash(&mut h);
        values.iter().for_each(|v| v.to_bits().hash(&mut h));
        h.finish()
    };
    let grid = egui::Rect::from_min_size(
        egui::pos2(rect.min.x + label_w, rect.min.y + head + cell.y),
        egui::vec2(cell.x * cols.len() as f32, cell.y * d.rows.len() as f32),
    );
    heatmap::paint(
        ui,
        grid,
        egui::Id::unique("days-ci-grid"),
        &heatmap::Data::new(std::sync::Arc::new(values), d.rows.len(), cols.len(), version),
        heatmap::Style::sequential(0.0, 1.0),
    );
    if let Some(pos) = resp.hover_pos() {
        let ci = ((pos.x - rect.min.x - label_w) / cell.x).floor();
        let ri = ((pos.y - rect.min.y - head) / cell.y).floor() as isize - 1;
        if ci >= 0.0 && (ci as usize) < cols.len() && ri >= 0 && (ri as usize) < n_rows {
            let (j, k, _) = cols[ci as usize];
            let (day, op) = d.rows[ri as usize];
            let text = format!(
                "{}:{k} on {} {}: CI {:.3}",
                d.ci[j].0,
                day_name(d.n_days, day),
                OP_NAMES[op],
                d.ci[j].1[ri as usize][k]
            );
            resp.clone().on_hover_text(text);
            if resp.clicked()
                && let Some(mj) = cx
                    .snapshot()
                    .and_then(|s| s.modules.iter().position(|m| m.name == d.ci[j].0))
            {
                cx.selection.module = mj;
                cx.selection.component = Some(k);
            }
        }
    }
}

/// CSV of the days view: one row per (day, operation) with the answers (full and with each
/// mechanism ablated), plane positions, and the CI of every subcomponent.
fn csv(d: &crate::metrics::days::DaysViewData) -> String {
    let mut s = String::from("day,op,correct,answer_full");
    for m in &d.mechanisms {
        s.push_str(&format!(",answer_{}_ablated", m.op));
    }
    s.push_str(",embed_x,embed_y,out_x,out_y,ablated_x,ablated_y");
    for (name, rows) in &d.ci {
        for k in 0..rows.first().map_or(0, |r| r.len()) {
            s.push_str(&format!(",ci_{name}:{k}"));
        }
    }
    s.push('\n');
    for (i, &(day, op)) in d.rows.iter().enumerate() {
        s.push_str(&format!(
            "{},{},{},{}",
            day_name(d.n_days, day),
            OP_NAMES[op],
            day_name(d.n_days, answer(d.n_days, day, op)),
            day_name(d.n_days, d.answers_full[i])
        ));
        for a in &d.answers_ablated {
            s.push_str(&format!(",{}", day_name(d.n_days, a[i])));
        }
        let out = d.paths[i].last().copied().unwrap_or([f32::NAN; 2]);
        for p in [d.plane_embed[i], out, d.plane_ablated[i]] {
            s.push_str(&format!(",{},{}", p[0], p[1]));
        }
        for (_, rows) in &d.ci {
            for v in &rows[i] {
                s.push_str(&format!(",{v}"));
            }
        }
        s.push('\n');
    }
    s
}
