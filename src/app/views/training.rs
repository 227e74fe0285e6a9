//! Training curves: every loss term, total, L0 per layer, learning rate (log y).

use eframe::egui;
use egui_plot::{Legend, Line, Plot, PlotPoints, VLine};

use crate::app::view::{CsvJob, View, ViewCtx};
use crate::spd::trainer::StepRecord;

/// At most ~`max` points: keeps the min and max of each bucket so spikes survive.
pub fn thin(points: &[[f64; 2]], max: usize) -> Vec<[f64; 2]> {
    if points.len() <= max || max < 4 {
        return points.to_vec();
    }
    let bucket = points.len().div_ceil(max / 2);
    let mut out = Vec::with_capacity(max + 2);
    for ch in points.chunks(bucket) {
        let (mut lo, mut hi) = (ch[0], ch[0]);
        for p in ch {
            if p[1] < lo[1] {
                lo = *p;
            }
            if p[1] > hi[1] {
                hi = *p;
            }
        }
        if lo[0] <= hi[0] {
            out.push(lo);
            out.push(hi);
        } else {
            out.push(hi);
            out.push(lo);
        }
    }
    out
}

fn smooth(points: &mut [[f64; 2]], alpha: f32) {
    if alpha <= 0.0 {
        return;
    }
    let a = alpha.min(0.999) as f64;
    let mut acc = points.first().map(|p| p[1]).unwrap_or(0.0);
    for p in points.iter_mut() {
        acc = a * acc + (1.0 - a) * p[1];
        p[1] = acc;
    }
}

fn log_formatter(mark: egui_plot::GridMark, _r: &std::ops::RangeInclusive<f64>) -> String {
    let v = mark.value;
    if (v - v.round()).abs() < 1e-9 {
        format!("1e{}", v.round() as i64)
    } else {
        format!("{:.2e}", 10f64.powf(v))
    }
}

/// Training curves (their smoothing is a persisted setting).
pub struct TrainingView;

impl View for TrainingView {
    fn name(&self) -> &'static str {
        "training"
    }
    fn label(&self) -> &'static str {
        "Training curves"
    }
    fn needs_snapshot(&self) -> bool {
        false
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        show(cx, ui)
    }
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let history = cx.session.history.clone();
        Ok(Box::new(move || Ok(csv(&history))))
    }
}

fn show(cx: &mut ViewCtx, ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        ui.add(egui::Slider::new(&mut cx.settings.smoothing, 0.0..=0.99).text("smoothing"));
    });
    let history = &cx.session.history;
    let markers = &cx.session.markers;
    let smoothing = cx.settings.smoothing;
    // The timeline frame the other views show, marked on the curves.
    let frame = cx.session.shown_frame();
    if history.is_empty() {
        ui.label("no training steps yet: press Start");
        return;
    }
    let (names, layers) = series_names(history);
    let link = egui::Id::unique("train-x");
    let h = (ui.available_height() - 40.0) / 3.0;
    Plot::new("losses")
        .legend(Legend::default())
        .height(h.max(80.0))
        .link_axis(link, [true, false])
        .y_axis_formatter(log_formatter)
        .y_axis_label("loss (log10)")
        .show(ui, |p| {
            for (i, n) in names.iter().enumerate() {
                let mut pts: Vec<[f64; 2]> = history
                    .iter()
                    .filter_map(|r| {
                        r.losses
                            .get(n)
                            .map(|v| [r.step as f64, v.max(1e-30).log10()])
                    })
                    .collect();
                smooth(&mut pts, smoothing);
                let line = Line::new(n.clone(), PlotPoints::from(thin(&pts, 2000))).color(color(i));
                p.line(line);
            }
            // Live changes of the running config, where they took effect.
            for (step, what) in markers {
                p.vline(
                    VLine::new(format!("changed: {what}"), *step as f64)
                        .color(egui::Color32::from_rgb(150, 150, 150)),
                );
            }
            if let Some(s) = frame {
                p.vline(VLine::new(format!("frame shown: step {s}"), s as f64).color(egui::Color32::WHITE));
            }
        });
    Plot::new("l0")
        .legend(Legend::default())
        .height(h.max(80.0))
        .link_axis(link, [true, false])
        .y_axis_label("L0 (CI > threshold)")
        .show(ui, |p| {
            for (i, n) in layers.iter().enumerate() {
                let mut pts: Vec<[f64; 2]> = history
                    .iter()
                    .filter_map(|r| r.l0.get(n).map(|v| [r.step as f64, *v]))
                    .collect();
                smooth(&mut pts, smoothing);
                p.line(
                    Line::new(format!("L0 {n}"), PlotPoints::from(thin(&pts, 2000)))
                        .color(color(i + 3)),
                );
            }
            if let Some(s) = frame {
                p.vline(VLine::new("frame shown", s as f64).color(egui::Color32::WHITE));
            }
        });
    // (Watched reference runs log the rate only on some lines.)
    let pts: Vec<[f64; 2]> = history
        .iter()
        .filter(|r| r.lr.is_finite())
        .map(|r| [r.step as f64, r.lr])
        .collect();
    // From 0 to just above the largest rate: a constant rate would otherwise get a
    // degenerate axis.
    let top = pts.iter().map(|p| p[1]).fold(0f64, f64::max);
    Plot::new("lr")
        .legend(Legend::default())
        .height(h.max(60.0))
        .link_axis(link, [true, false])
        .x_axis_label("step")
        .include_y(0.0)
        .include_y(if top > 0.0 { top * 1.1 } else { 1.0 })
        .show(ui, |p| {
            p.line(Line::new(
                "learning rate",
                PlotPoints::from(thin(&pts, 2000)),
            ));
        });
}

fn color(i: usize) -> egui::Color32 {
    const C: [egui::Color32; 8] = [
        egui::Color32::from_rgb(31, 119, 180),
        egui::Color32::from_rgb(255, 127, 14),
        egui::Color32::from_rgb(44, 160, 44),
        egui::Color32::from_rgb(214, 39, 40),
        egui::Color32::from_rgb(148, 103, 189),
        egui::Color32::from_rgb(140, 86, 75),
        egui::Color32::from_rgb(227, 119, 194),
        egui::Color32::from_rgb(127, 127, 127),
    ];
    C[i % C.len()]
}

/// Loss-term and layer names of the latest step record (BTreeMap keys: already sorted).
fn series_names(history: &[StepRecord]) -> (Vec<String>, Vec<String>) {
    let last = history.last();
    let names = last
        .map(|r| r.losses.keys().cloned().collect())
        .unwrap_or_default();
    let layers = last
        .map(|r| r.l0.keys().cloned().collect())
        .unwrap_or_default();
    (names, layers)
}

/// One row per step: learning rate, every loss term, L0 per layer.
fn csv(history: &[StepRecord]) -> String {
    let (names, layers) = series_names(history);
    let mut s = String::from("step,lr");
    for n in &names {
        s += &format!(",loss/{n}");
    }
    for l in &layers {
        s += &format!(",l0/{l}");
    }
    s.push('\n');
    for r in history {
        s += &format!("{},{}", r.step, r.lr);
        for n in &names {
            s += &format!(",{}", r.losses.get(n).copied().unwrap_or(f64::NAN));
        }
        for l in &layers {
            s += &format!(",{}", r.l0.get(l).copied().unwrap_or(f64::NAN));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinning_keeps_extremes() {
        let pts: Vec<[f64; 2]> = (0..10_000)
            .map(|i| [i as f64, if i == 5_000 { 100.0 } else { 0.0 }])
            .collect();
        let t = thin(&pts, 200);
        assert!(t.len() <= 202);
        assert!(t.iter().any(|p| p[1] == 100.0));
    }
}
