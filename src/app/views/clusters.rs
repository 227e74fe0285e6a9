//! Clusters: the MDL merge clustering of the open decomposition. Co-activation matrix of the
//! alive subcomponents in cluster order (drawn by the heatmap shader, uploaded only when k or the data
//! changes), a slider over the merge history, a clickable cluster table, and the description
//! length curve. Without a stored clustering, "Run clustering" runs one on the worker (a job
//! with progress and cancel).

use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints, Points, VLine};

use crate::app::cluster_data::ClusterData;
use crate::app::view::{Action, CsvJob, View, ViewCtx};
use crate::app::heatmap;
use crate::app::widgets::{CLUSTER_COLOR, short_members};
use crate::cluster::ClusterOptions;

#[derive(Default)]
pub struct ClustersView {
    /// Options of the next "Run clustering".
    pub options: ClusterOptions,
    values: Option<heatmap::Data>,
    key: Option<u64>,
    /// Alive indices in the texture's row/column order.
    pub order: Vec<usize>,
    pub uploads: u64,
}

impl View for ClustersView {
    fn name(&self) -> &'static str {
        "clusters"
    }
    fn label(&self) -> &'static str {
        "Clusters"
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let d = cx
            .clusters
            .data
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no clustering yet: run one first"))?;
        let (rows, k) = (cx.clusters.rows.clone(), cx.clusters.k);
        Ok(Box::new(move || {
            Ok(crate::app::cluster_data::clusters_csv(&d, &rows, k))
        }))
    }
}

impl ClustersView {
    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let Some(d) = cx.clusters.data.clone() else {
            ui.label("This decomposition has no stored clustering.");
            self.run_controls(cx, ui);
            return;
        };
        let (lo, hi) = d.k_range();
        let mut k = cx.clusters.k;
        ui.horizontal_wrapped(|ui| {
            if ui
                .add_enabled(k > lo, egui::Button::new("fewer").small())
                .on_hover_text("one merge further (k - 1)")
                .clicked()
            {
                k -= 1;
            }
            ui.add(egui::Slider::new(&mut k, lo..=hi.max(lo)).text("groups (k)"));
            if ui
                .add_enabled(k < hi, egui::Button::new("more").small())
                .on_hover_text("one merge back (k + 1)")
                .clicked()
            {
                k += 1;
            }
            if ui
                .button(format!("best k = {}", d.result.best_k))
                .on_hover_text("minimum description length")
                .clicked()
            {
                k = d.result.best_k;
            }
            ui.separator();
            ui.label(format!(
                "{} alive, {} dead subcomponents; co-activation on {} samples (CI > {})",
                d.n_alive(),
                d.result.dead.len(),
                d.n_samples,
                d.result.options.activation_threshold
            ));
        });
        cx.clusters.set_k(k, cx.selection);
        ui.collapsing("Run clustering again", |ui| self.run_controls(cx, ui));

        let avail = ui.available_size();
        let plot_h = (avail.y * 0.3).clamp(90.0, 220.0);
        let side = (avail.y - plot_h - 16.0).min(avail.x * 0.45).max(60.0);
        ui.horizontal_top(|ui| {
            self.matrix(cx, ui, &d, side);
            ui.vertical(|ui| {
                ui.set_max_height(side);
                // Long member lists scroll instead of widening the view.
                ui.set_max_width((avail.x - side - 16.0).max(100.0));
                table(cx, ui);
            });
        });
        // Below: the description length, the score against the known answer (if the target
        // has one) and the merge tree.
        let n = if d.result.score.is_some() { 3 } else { 2 };
        ui.columns(n, |cols| {
            dl_plot(cx, &mut cols[0], &d, plot_h);
            if let Some(sc) = &d.result.score {
                score_plot(cx, &mut cols[1], sc, plot_h);
            }
            dendrogram(cx, &mut cols[n - 1], &d, plot_h);
        });
    }

    fn run_controls(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let job = cx.clusters.job.clone();
        let running = job.is_some();
        let mut run = None;
        let mut cancel = false;
        let o = &mut self.options;
        ui.horizontal_wrapped(|ui| {
            ui.add(
                egui::DragValue::new(&mut o.alpha)
                    .range(0.0..=100.0)
                    .speed(0.01)
                    .prefix("alpha "),
            )
            .on_hover_text("rank weight of the description length");
            ui.add(
                egui::DragValue::new(&mut o.activation_threshold)
                    .range(0.0..=1.0)
                    .speed(0.001)
                    .prefix("threshold "),
            )
            .on_hover_text("CI above which a subcomponent counts as firing");
            ui.add(egui::DragValue::new(&mut o.seed).prefix("seed "));
            ui.add(
                egui::DragValue::new(&mut o.n_samples)
                    .range(64..=65536)
                    .prefix("samples "),
            );
            if ui
                .add_enabled(!running, egui::Button::new("Run clustering"))
                .clicked()
            {
                run = Some(o.clone());
            }
            if let Some(j) = &job {
                ui.spinner();
                ui.add(
                    egui::ProgressBar::new(j.fraction)
                        .desired_width(160.0)
                        .text(format!("clustering: {}", j.stage)),
                );
                cancel = ui
                    .add_enabled(j.id.is_some(), egui::Button::new("Cancel"))
                    .clicked();
            }
        });
        if let Some(opts) = run {
            cx.request(Action::RunClustering(opts));
        }
        if cancel {
            cx.request(Action::CancelClustering);
        }
    }

    fn matrix(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui, d: &ClusterData, side: f32) {
        let na = d.n_alive();
        let st = self;
        if na == 0 {
            ui.label("no alive subcomponents");
            return;
        }
        if st.key != Some(cx.clusters.version) {
            st.order = ClusterData::cluster_order(&cx.clusters.rows);
            let mut values = Vec::with_capacity(na * na);
            for &i in &st.order {
                for &j in &st.order {
                    values.push(d.coact_norm(i, j));
                }
            }
            st.uploads += 1;
            st.values = Some(heatmap::Data::new(
                std::sync::Arc::new(values),
                na,
                na,
                st.uploads,
            ));
            st.key = Some(cx.clusters.version);
        }
        let Some(values) = &st.values else { return };
        let (rect, resp) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::click());
        heatmap::paint(
            ui,
            rect,
            egui::Id::unique("coactivation"),
            values,
            heatmap::Style::sequential(0.0, 1.0),
        );
        let painter = ui.painter_at(rect.expand(2.0));
        let cell = side / na as f32;
        // Cluster blocks on the diagonal.
        let mut start = 0usize;
        for (ci, r) in cx.clusters.rows.iter().enumerate() {
            let block = egui::Rect::from_min_size(
                rect.min + egui::vec2(start as f32 * cell, start as f32 * cell),
                egui::vec2(r.rank as f32 * cell, r.rank as f32 * cell),
            );
            let selected = cx.selection.cluster == Some(ci);
            let stroke = if selected {
                egui::Stroke::new(2.5, CLUSTER_COLOR)
            } else {
                egui::Stroke::new(1.0, egui::Color32::from_rgb(230, 80, 20))
            };
            painter.rect_stroke(block, 0.0, stroke, egui::StrokeKind::Middle);
            start += r.rank;
        }
        if let Some(pos) = resp.hover_pos() {
            let x = ((pos.x - rect.left()) / cell) as usize;
            let y = ((pos.y - rect.top()) / cell) as usize;
            if x < na && y < na {
                let (i, j) = (st.order[y], st.order[x]);
                let labels = &d.result.labels_alive;
                let both = d.coact[i * na + j];
                let rows = &cx.clusters.rows;
                let cluster_of = |a: usize| rows.iter().position(|r| r.alive.contains(&a));
                resp.clone().on_hover_text(format!(
                "{} (cluster {}) and {} (cluster {})\nfire together on {both} of {} samples\nnormalised co-activation {:.3}",
                labels[i],
                cluster_of(i).map(|c| c.to_string()).unwrap_or_default(),
                labels[j],
                cluster_of(j).map(|c| c.to_string()).unwrap_or_default(),
                d.n_samples,
                d.coact_norm(i, j)
            ));
                if resp.clicked() {
                    cx.selection.cluster = cluster_of(i);
                }
            }
        }
    }
}

fn table(cx: &mut ViewCtx, ui: &mut egui::Ui) {
    egui::ScrollArea::both()
        .id_salt("cluster-table")
        .auto_shrink([false, true])
        .show(ui, |ui| {
            egui::Grid::new("cluster-grid")
                .striped(true)
                .num_columns(5)
                .show(ui, |ui| {
                    ui.strong("cluster");
                    ui.strong("rank");
                    ui.strong("fires");
                    ui.strong("layers");
                    ui.strong("members");
                    ui.end_row();
                    let mut clicked = None;
                    for (i, r) in cx.clusters.rows.iter().enumerate() {
                        let selected = cx.selection.cluster == Some(i);
                        if ui
                            .selectable_label(selected, format!("cluster {}", r.id))
                            .clicked()
                        {
                            clicked = Some(if selected { None } else { Some(i) });
                        }
                        ui.label(r.rank.to_string());
                        ui.label(format!("{:.2}%", 100.0 * r.firing_fraction));
                        ui.label(r.layers.join(", "));
                        let text = short_members(&r.members, 8);
                        let l = if selected {
                            ui.colored_label(CLUSTER_COLOR, text)
                        } else {
                            ui.label(text)
                        };
                        if r.members.len() > 8 {
                            l.on_hover_text(r.members.join(" "));
                        }
                        ui.end_row();
                    }
                    if let Some(c) = clicked {
                        cx.selection.cluster = c;
                    }
                });
        });
}

fn dl_plot(cx: &ViewCtx, ui: &mut egui::Ui, d: &ClusterData, h: f32) {
    let pts: Vec<[f64; 2]> = d
        .result
        .description_length
        .iter()
        .map(|&(k, v)| [k as f64, v])
        .collect();
    let best = d
        .result
        .description_length
        .iter()
        .find(|(k, _)| *k == d.result.best_k)
        .map(|&(k, v)| [k as f64, v]);
    Plot::new("dl-curve")
        .height(h.max(80.0))
        .legend(Legend::default().position(egui_plot::Corner::RightBottom))
        .x_axis_label("groups k")
        .y_axis_label("DL per sample")
        .show(ui, |p| {
            p.line(Line::new("description length", PlotPoints::from(pts)));
            if let Some(b) = best {
                p.points(
                    Points::new(format!("minimum (k = {})", b[0]), PlotPoints::from(vec![b]))
                        .radius(5.0)
                        .color(egui::Color32::from_rgb(230, 80, 20)),
                );
            }
            p.vline(
                VLine::new(format!("shown k = {}", cx.clusters.k), cx.clusters.k as f64)
                    .color(CLUSTER_COLOR),
            );
        });
}

/// Purity and adjusted Rand index against the known answer along the merge history.
fn score_plot(cx: &ViewCtx, ui: &mut egui::Ui, sc: &crate::cluster::score::ScoreCurve, h: f32) {
    let shown = sc.at(cx.clusters.k);
    let best = sc.best();
    ui.label(match (shown, best) {
        (Some((k, p, a)), Some((bk, _, ba))) => format!(
            "vs the known answer: k = {k}: purity {p:.3}, ARI {a:.3}; best cut k = {bk} (ARI {ba:.3})"
        ),
        _ => "vs the known answer".into(),
    })
    .on_hover_text(&sc.description);
    let line = |f: fn(&(usize, f64, f64)) -> f64| {
        PlotPoints::from(sc.points.iter().map(|p| [p.0 as f64, f(p)]).collect::<Vec<_>>())
    };
    Plot::new("score-curve")
        .height((h - 20.0).max(60.0))
        .legend(Legend::default().position(egui_plot::Corner::RightBottom))
        .x_axis_label("groups k")
        .include_y(0.0)
        .include_y(1.0)
        .show(ui, |p| {
            p.line(Line::new("purity", line(|p| p.1)));
            p.line(Line::new("adjusted Rand index", line(|p| p.2)));
            p.vline(
                VLine::new(format!("shown k = {}", cx.clusters.k), cx.clusters.k as f64)
                    .color(CLUSTER_COLOR),
            );
        });
}

/// The merge tree: leaves (alive subcomponents) along x with their known class as a colour
/// strip (when the target has a known answer), merges upwards; the shown k is the cut line.
fn dendrogram(cx: &ViewCtx, ui: &mut egui::Ui, d: &ClusterData, h: f32) {
    let dg = &d.dendrogram;
    let n = dg.order.len();
    if n == 0 || dg.n_steps == 0 {
        return;
    }
    ui.label("merge tree (leaves coloured by their known class)");
    let (rect, resp) = ui.allocate_exact_size(
        egui::vec2(ui.available_width(), (h - 20.0).max(60.0)),
        egui::Sense::hover(),
    );
    let p = ui.painter_at(rect);
    let strip = 8.0;
    let plot = egui::Rect::from_min_max(rect.min, egui::pos2(rect.max.x, rect.max.y - strip - 2.0));
    let sx = |x: f32| plot.left() + (x + 0.5) / n as f32 * plot.width();
    let sy = |y: f32| plot.bottom() - y / dg.n_steps as f32 * plot.height();
    let stroke = egui::Stroke::new(1.0, ui.visuals().weak_text_color());
    for s in &dg.segments {
        p.line_segment([egui::pos2(sx(s[0]), sy(s[1])), egui::pos2(sx(s[2]), sy(s[3]))], stroke);
    }
    let cut = d.n_alive().saturating_sub(cx.clusters.k) as f32;
    p.line_segment(
        [egui::pos2(plot.left(), sy(cut)), egui::pos2(plot.right(), sy(cut))],
        egui::Stroke::new(1.5, CLUSTER_COLOR),
    );
    let classes = d.result.score.as_ref().map(|s| &s.class_of_alive);
    let w = plot.width() / n as f32;
    for (pos, &leaf) in dg.order.iter().enumerate() {
        let c = classes.and_then(|c| c.get(leaf).copied().flatten());
        let color = c.map_or(egui::Color32::from_gray(80), |c| {
            crate::app::widgets::component_color(c as usize)
        });
        let r = egui::Rect::from_min_size(
            egui::pos2(plot.left() + pos as f32 * w, rect.max.y - strip),
            egui::vec2(w.max(1.0), strip),
        );
        p.rect_filled(r, 0.0, color);
    }
    if let Some(pos) = resp.hover_pos() {
        let i = (((pos.x - plot.left()) / plot.width()) * n as f32).floor();
        if i >= 0.0 && (i as usize) < n {
            let leaf = dg.order[i as usize];
            let class = d
                .result
                .score
                .as_ref()
                .and_then(|s| s.class_of_alive.get(leaf).copied().flatten().map(|c| s.class_names[c as usize].clone()))
                .unwrap_or_else(|| "-".into());
            resp.on_hover_text(format!("{} (known class: {class})", d.result.labels_alive[leaf]));
        }
    }
}
