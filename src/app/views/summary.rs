//! Summary: L0 per layer, alive/dead counts, mean CI per component (sorted, log option).

use eframe::egui;
use egui_plot::{Bar, BarChart, Legend, Plot, PlotPoints, Points};

use crate::app::view::{CsvJob, View, ViewCtx};
use crate::app::widgets::module_picker;

/// L0 and alive counts per layer, mean CI per subcomponent.
pub struct SummaryView;

impl View for SummaryView {
    fn name(&self) -> &'static str {
        "summary"
    }
    fn label(&self) -> &'static str {
        "Summary"
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        show(cx, ui)
    }
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let s = cx.require_snapshot()?.clone();
        Ok(Box::new(move || Ok(crate::app::export::summary_csv(&s))))
    }
}

fn show(cx: &mut ViewCtx, ui: &mut egui::Ui) {
    let Some(s) = cx.snapshot().cloned() else {
        return;
    };
    // (alive count, L0) per module on the snapshot's batch, computed by the worker.
    let stats: Vec<(usize, f64)> = s.modules.iter().map(|m| (m.alive, m.l0)).collect();
    egui::Grid::new("summary").striped(true).show(ui, |ui| {
        ui.strong("module");
        ui.strong("C");
        ui.strong("alive (fires on a batch input)");
        ui.strong("L0 on the batch");
        ui.end_row();
        for (m, &(alive, l0)) in s.modules.iter().zip(&stats) {
            ui.label(&m.name);
            ui.label(m.c.to_string());
            ui.label(format!("{alive} alive, {} dead", m.c - alive));
            ui.label(format!("{l0:.3}"));
            ui.end_row();
        }
    });
    let h = (ui.available_height() - 60.0) / 3.0;
    let bars: Vec<Bar> = s
        .modules
        .iter()
        .zip(&stats)
        .enumerate()
        .map(|(i, (m, &(_, l0)))| Bar::new(i as f64, l0).name(&m.name).width(0.6))
        .collect();
    let names: Vec<String> = s.modules.iter().map(|m| m.name.clone()).collect();
    Plot::new("l0bars")
        .height(h.max(80.0))
        .legend(Legend::default())
        .y_axis_label("L0")
        .x_axis_formatter(move |mark, _| {
            let i = mark.value.round();
            if (mark.value - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .show(ui, |p| p.bar_chart(BarChart::new("L0 per layer", bars)));
    module_picker(cx, ui);
    let log = ui
        .ctx()
        .data_mut(|d| *d.get_persisted_mut_or_default::<bool>(egui::Id::unique("meanci-log")));
    let mut log_v = log;
    ui.checkbox(&mut log_v, "log scale");
    ui.ctx()
        .data_mut(|d| d.insert_persisted(egui::Id::unique("meanci-log"), log_v));
    let j = cx.selection.module.min(s.modules.len() - 1);
    let m = &s.modules[j];
    let mut v: Vec<f32> = m.mean_ci.clone();
    v.sort_by(|a, b| b.total_cmp(a));
    let pts: Vec<[f64; 2]> = v
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            [
                i as f64,
                if log_v {
                    (x.max(1e-8) as f64).log10()
                } else {
                    x as f64
                },
            ]
        })
        .collect();
    // CI histogram of the chosen module on the snapshot's batch (counted by the worker).
    let bins = m.ci_hist.len().max(1);
    let total: u32 = m.ci_hist.iter().sum();
    let hist: Vec<Bar> = m
        .ci_hist
        .iter()
        .enumerate()
        .map(|(b, &n)| {
            let frac = n as f64 / total.max(1) as f64;
            let y = if log_v {
                (frac.max(1e-6)).log10() + 6.0
            } else {
                frac
            };
            Bar::new((b as f64 + 0.5) / bins as f64, y)
                .width(0.9 / bins as f64)
                .name(format!(
                    "CI in [{:.2}, {:.2}): {n} of {total}",
                    b as f64 / bins as f64,
                    (b + 1) as f64 / bins as f64
                ))
        })
        .collect();
    Plot::new("cihist")
        .height(h.max(80.0))
        .x_axis_label(format!("lower-leaky CI of {} on the batch", m.name))
        .y_axis_label(if log_v {
            "fraction of values (log10, +6)"
        } else {
            "fraction of values"
        })
        .show(ui, |p| p.bar_chart(BarChart::new(format!("CI histogram {}", m.name), hist)));
    Plot::new("meanci")
        .height(h.max(80.0))
        .x_axis_label("subcomponent (sorted)")
        .y_axis_label(if log_v { "mean CI (log10)" } else { "mean CI" })
        .show(ui, |p| {
            p.points(Points::new(format!("mean CI {}", m.name), PlotPoints::from(pts)).radius(2.5))
        });
}
