//! Widgets and colours shared by the views.

use eframe::egui;

use super::view::ViewCtx;

/// Module picker shared by the per-module views.
pub fn module_picker(cx: &mut ViewCtx, ui: &mut egui::Ui) {
    let Some(s) = cx.snapshot().cloned() else {
        return;
    };
    let sel = &mut *cx.selection;
    // Wrapped: a transformer has many modules, and a row wider than the view would widen
    // everything below it.
    ui.horizontal_wrapped(|ui| {
        ui.label("decomposed module:");
        for (i, m) in s.modules.iter().enumerate() {
            if ui.selectable_label(sel.module == i, &m.name).clicked() {
                sel.module = i;
                sel.component = None;
            }
        }
        if let Some(c) = sel.component {
            ui.separator();
            ui.label(format!(
                "selected: {}:{c}",
                s.modules[sel.module.min(s.modules.len() - 1)].name
            ));
            if ui.small_button("clear").clicked() {
                sel.component = None;
            }
        }
        if let Some(c) = sel.cluster
            && let Some(row) = cx.clusters.rows.get(c)
        {
            ui.separator();
            ui.colored_label(
                CLUSTER_COLOR,
                format!(
                    "cluster {c} (k = {}): {}",
                    cx.clusters.k,
                    short_members(&row.members, 6)
                ),
            );
            if ui.small_button("clear cluster").clicked() {
                sel.cluster = None;
            }
        }
    });
}

/// Highlight colour of the selected cluster's members in every view.
pub const CLUSTER_COLOR: egui::Color32 = egui::Color32::from_rgb(40, 160, 60);

/// Up to `n` member labels, then a count of the rest.
pub fn short_members(members: &[String], n: usize) -> String {
    if members.len() <= n {
        members.join(" ")
    } else {
        format!("{} ... (+{})", members[..n].join(" "), members.len() - n)
    }
}

/// Diverging colour for a value in [-1, 1] (blue – white – red).
pub fn diverging(x: f32) -> egui::Color32 {
    let x = x.clamp(-1.0, 1.0);
    let (r, g, b) = if x >= 0.0 {
        (1.0, 1.0 - x, 1.0 - x)
    } else {
        (1.0 + x, 1.0 + x, 1.0)
    };
    egui::Color32::from_rgb((r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8)
}

/// Sequential colour for a value in [0, 1] (white → dark blue).
pub fn sequential(x: f32) -> egui::Color32 {
    let x = if x.is_finite() {
        x.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let lerp = |a: f32, b: f32| (a + (b - a) * x) as u8;
    egui::Color32::from_rgb(lerp(255.0, 8.0), lerp(255.0, 48.0), lerp(255.0, 107.0))
}

/// The colour of subcomponent `c` (the same in every view): a categorical palette (Tableau
/// 10 with a light blue for its grey, used by target columns, and without its orange,
/// which marks the selection), cycling.
pub fn component_color(c: usize) -> egui::Color32 {
    const P: [egui::Color32; 9] = [
        egui::Color32::from_rgb(31, 119, 180),
        egui::Color32::from_rgb(44, 160, 44),
        egui::Color32::from_rgb(214, 39, 40),
        egui::Color32::from_rgb(148, 103, 189),
        egui::Color32::from_rgb(140, 86, 75),
        egui::Color32::from_rgb(227, 119, 194),
        egui::Color32::from_rgb(174, 199, 232),
        egui::Color32::from_rgb(188, 189, 34),
        egui::Color32::from_rgb(23, 190, 207),
    ];
    P[c % P.len()]
}

/// A small diverging-colour strip of a vector (at most 32 cells; longer vectors are pooled by
/// taking the largest magnitude per cell).
pub fn value_strip(ui: &mut egui::Ui, v: &[f32]) {
    value_strip_cells(ui, v, 32)
}

/// [`value_strip`] with at most `cells` cells.
pub fn value_strip_cells(ui: &mut egui::Ui, v: &[f32], cells: usize) {
    let n = v.len().min(cells.max(1));
    if n == 0 {
        return;
    }
    let per = v.len().div_ceil(n);
    let cells: Vec<f32> = v
        .chunks(per)
        .map(|c| {
            c.iter()
                .copied()
                .fold(0f32, |a, b| if b.abs() > a.abs() { b } else { a })
        })
        .collect();
    let scale = cells.iter().fold(1e-12f32, |a, b| a.max(b.abs()));
    let w = 6.0;
    let (rect, _) = ui.allocate_exact_size(
        egui::vec2(w * cells.len() as f32, 12.0),
        egui::Sense::hover(),
    );
    let p = ui.painter_at(rect);
    for (i, c) in cells.iter().enumerate() {
        let r = egui::Rect::from_min_size(
            rect.min + egui::vec2(i as f32 * w, 0.0),
            egui::vec2(w, 12.0),
        );
        p.rect_filled(r, 0.0, diverging(c / scale));
    }
    p.rect_stroke(
        rect,
        0.0,
        egui::Stroke::new(0.5, egui::Color32::from_gray(160)),
        egui::StrokeKind::Inside,
    );
}

/// A running job's progress bar and its Cancel button; true when Cancel was clicked.
pub fn job_progress(ui: &mut egui::Ui, fraction: f32, text: &str) -> bool {
    ui.add(
        egui::ProgressBar::new(fraction)
            .desired_width(220.0)
            .text(format!("{text} {:.0}%", 100.0 * fraction)),
    );
    ui.button("Cancel").clicked()
}
