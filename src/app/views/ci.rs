//! Causal-importance heatmap: inputs × subcomponents of one layer, uploaded as a texture once
//! per snapshot/setting change (not per frame), hoverable and clickable.

use eframe::egui;

use super::{module_picker, sequential};
use crate::app::SpdApp;
use crate::metrics::toy_metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InputSet {
    #[default]
    Probes,
    Batch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Order {
    AsIs,
    #[default]
    Hungarian,
    Density,
}

#[derive(Default)]
pub struct CiViewState {
    pub input_set: InputSet,
    pub order: Order,
    pub vmax: f32,
    texture: Option<egui::TextureHandle>,
    key: Option<(u64, usize, InputSet, Order, u32)>,
    /// Column order used for the current texture.
    pub columns: Vec<usize>,
    pub rows: usize,
    pub uploads: u64,
}

pub fn show(app: &mut SpdApp, ui: &mut egui::Ui) {
    module_picker(app, ui);
    let Some(s) = app.snapshot.clone() else {
        return;
    };
    let st = &mut app.views.ci;
    if st.vmax <= 0.0 {
        st.vmax = 1.0;
    }
    ui.horizontal_wrapped(|ui| {
        ui.label("inputs:");
        ui.selectable_value(
            &mut st.input_set,
            InputSet::Probes,
            format!("one-hot probes (value {})", s.probe_value),
        );
        ui.selectable_value(
            &mut st.input_set,
            InputSet::Batch,
            format!("data batch ({})", s.n_batch),
        );
        ui.separator();
        ui.label("columns:");
        ui.selectable_value(&mut st.order, Order::AsIs, "as is");
        ui.selectable_value(&mut st.order, Order::Hungarian, "Hungarian to diagonal");
        ui.selectable_value(&mut st.order, Order::Density, "by density");
    });
    let mut probe = app.settings.probe_value;
    ui.horizontal(|ui| {
        ui.add(egui::Slider::new(&mut app.views.ci.vmax, 0.05..=1.0).text("colour max"));
        ui.separator();
        if ui
            .add(egui::Slider::new(&mut probe, 0.05..=1.0).text("probe value"))
            .drag_stopped()
        {
            app.send(crate::worker::Command::SetProbeValue(probe));
        }
    });
    app.settings.probe_value = probe;
    let st = &mut app.views.ci;
    let j = app.selection.module.min(s.modules.len() - 1);
    let m = &s.modules[j];
    let (data, rows) = match st.input_set {
        InputSet::Probes => (&m.ci_probe, s.n_probe),
        InputSet::Batch => (&m.ci_batch, s.n_batch),
    };
    let key = (
        app.snapshot_version,
        j,
        st.input_set,
        st.order,
        st.vmax.to_bits(),
    );
    if st.key != Some(key) {
        st.columns = match st.order {
            Order::AsIs => (0..m.c).collect(),
            Order::Hungarian => toy_metrics::permute_to_identity(&m.ci_probe, s.n_probe, m.c),
            Order::Density => {
                let mut idx: Vec<usize> = (0..m.c).collect();
                idx.sort_by(|&a, &b| m.mean_ci[b].total_cmp(&m.mean_ci[a]));
                idx
            }
        };
        let mut pixels = Vec::with_capacity(rows * m.c);
        for r in 0..rows {
            for &c in &st.columns {
                pixels.push(sequential(data[r * m.c + c] / st.vmax));
            }
        }
        let img = egui::ColorImage::new([m.c, rows], pixels);
        match &mut st.texture {
            Some(t) => t.set(img, egui::TextureOptions::NEAREST),
            None => {
                st.texture = Some(ui.ctx().load_texture(
                    "ci-heatmap",
                    img,
                    egui::TextureOptions::NEAREST,
                ))
            }
        }
        st.key = Some(key);
        st.rows = rows;
        st.uploads += 1;
    }
    let Some(tex) = &st.texture else { return };
    let avail = ui.available_size() - egui::vec2(0.0, 24.0);
    let (rect, resp) =
        ui.allocate_exact_size(avail.max(egui::vec2(50.0, 50.0)), egui::Sense::click());
    ui.painter().image(
        tex.id(),
        rect,
        egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
        egui::Color32::WHITE,
    );
    let cell = |pos: egui::Pos2| -> Option<(usize, usize)> {
        let uv = (pos - rect.min) / rect.size();
        let (x, y) = ((uv.x * m.c as f32) as usize, (uv.y * rows as f32) as usize);
        (x < m.c && y < rows).then_some((y, x))
    };
    if let Some(sel) = app.selection.component
        && let Some(col) = st.columns.iter().position(|&c| c == sel)
    {
        let w = rect.width() / m.c as f32;
        let r = egui::Rect::from_min_size(
            egui::pos2(rect.left() + col as f32 * w, rect.top()),
            egui::vec2(w, rect.height()),
        );
        ui.painter().rect_stroke(
            r,
            0.0,
            egui::Stroke::new(1.5, egui::Color32::from_rgb(230, 80, 20)),
            egui::StrokeKind::Inside,
        );
    }
    if let Some(pos) = resp.hover_pos()
        && let Some((r, x)) = cell(pos)
    {
        let c = st.columns[x];
        let input = match st.input_set {
            InputSet::Probes => s.probe_labels.get(r).cloned().unwrap_or_default(),
            InputSet::Batch => {
                let row = &s.batch_inputs[r * s.n_features..(r + 1) * s.n_features];
                let active: Vec<String> = row
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0.0)
                    .map(|(i, v)| format!("f{i}={v:.2}"))
                    .collect();
                format!(
                    "batch row {r}: {}",
                    if active.is_empty() {
                        "all zero".into()
                    } else {
                        active.join(" ")
                    }
                )
            }
        };
        let v = data[r * m.c + c];
        resp.clone()
            .on_hover_text(format!("{input}\n{}:{c}\nCI = {v:.4}", m.name));
        if resp.clicked() {
            app.selection.component = Some(c);
        }
    }
    ui.label(format!(
        "{} rows x {} subcomponents of {} (lower-leaky CI; colour scale 0 to {:.2})",
        rows, m.c, m.name, st.vmax
    ));
}
