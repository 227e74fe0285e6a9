//! The views: one file each, all reading the same snapshot and highlighting the selection.

mod ci;
mod days;
mod directions;
mod interventions;
mod summary;
mod training;

use eframe::egui;
use serde::{Deserialize, Serialize};

use super::SpdApp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum View {
    Training,
    Directions,
    CausalImportance,
    Summary,
    Interventions,
    Days,
}

impl View {
    pub const ALL: [View; 6] = [
        View::Training,
        View::Directions,
        View::CausalImportance,
        View::Summary,
        View::Interventions,
        View::Days,
    ];
    /// Name on the command line (`--view`).
    pub fn cli_name(self) -> &'static str {
        match self {
            View::Training => "training",
            View::Directions => "directions",
            View::CausalImportance => "ci",
            View::Summary => "summary",
            View::Interventions => "interventions",
            View::Days => "days",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            View::Training => "Training curves",
            View::Directions => "Read/write directions",
            View::CausalImportance => "Causal importance",
            View::Summary => "Summary",
            View::Interventions => "Interventions",
            View::Days => "Days demo",
        }
    }
}

/// View-local state that outlives a frame (textures uploaded once per snapshot).
#[derive(Default)]
pub struct ViewState {
    pub ci: ci::CiViewState,
    pub directions: directions::DirectionsViewState,
    pub interventions: interventions::InterventionsViewState,
    pub days: days::DaysViewState,
}

pub fn show(app: &mut SpdApp, ui: &mut egui::Ui) {
    if app.snapshot.is_none() && !matches!(app.settings.view, View::Training | View::Days) {
        ui.label("no decomposition loaded yet");
        return;
    }
    match app.settings.view {
        View::Training => training::show(app, ui),
        View::Directions => directions::show(app, ui),
        View::CausalImportance => ci::show(app, ui),
        View::Summary => summary::show(app, ui),
        View::Interventions => interventions::show(app, ui),
        View::Days => days::show(app, ui),
    }
}

/// Module picker shared by the per-module views.
pub fn module_picker(app: &mut SpdApp, ui: &mut egui::Ui) {
    let Some(s) = app.snapshot.clone() else {
        return;
    };
    ui.horizontal(|ui| {
        ui.label("decomposed module:");
        for (i, m) in s.modules.iter().enumerate() {
            if ui
                .selectable_label(app.selection.module == i, &m.name)
                .clicked()
            {
                app.selection.module = i;
                app.selection.component = None;
            }
        }
        if let Some(c) = app.selection.component {
            ui.separator();
            ui.label(format!(
                "selected: {}:{c}",
                s.modules[app.selection.module.min(s.modules.len() - 1)].name
            ));
            if ui.small_button("clear").clicked() {
                app.selection.component = None;
            }
        }
    });
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
