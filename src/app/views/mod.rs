//! The views: one file each, all reading the same snapshot and highlighting the selection.

mod ci;
pub use ci::InputSet as CiInputSet;
mod clusters;
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
    Clusters,
    Interventions,
    Days,
}

impl View {
    pub const ALL: [View; 7] = [
        View::Training,
        View::Directions,
        View::CausalImportance,
        View::Summary,
        View::Clusters,
        View::Interventions,
        View::Days,
    ];
    pub fn label(self) -> &'static str {
        match self {
            View::Training => "Training curves",
            View::Directions => "Read/write directions",
            View::CausalImportance => "Causal importance",
            View::Summary => "Summary",
            View::Clusters => "Clusters",
            View::Interventions => "Interventions",
            View::Days => "Days demo",
        }
    }
    /// Short name for the command line (`--view`).
    pub fn name(self) -> &'static str {
        match self {
            View::Training => "training",
            View::Directions => "directions",
            View::CausalImportance => "ci",
            View::Summary => "summary",
            View::Clusters => "clusters",
            View::Interventions => "interventions",
            View::Days => "days",
        }
    }
    pub fn from_name(s: &str) -> Option<View> {
        View::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// View-local state that outlives a frame (textures uploaded once per snapshot).
#[derive(Default)]
pub struct ViewState {
    pub ci: ci::CiViewState,
    pub directions: directions::DirectionsViewState,
    pub interventions: interventions::InterventionsViewState,
    pub days: days::DaysViewState,
    pub clusters: clusters::ClustersViewState,
    /// Where the current view was drawn last frame (PNG export crops to it).
    pub rect: Option<egui::Rect>,
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
        View::Clusters => clusters::show(app, ui),
    }
}

/// CSV of the current view's data.
pub fn export_csv(app: &SpdApp, path: &std::path::Path) -> anyhow::Result<()> {
    use crate::app::export;
    let snap = || {
        app.snapshot
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no decomposition loaded"))
    };
    let text = match app.settings.view {
        View::Training => return training::export_csv(app, path),
        View::Directions => export::directions_csv(snap()?.as_ref()),
        View::CausalImportance => ci::csv(app)?,
        View::Summary => {
            let thr = app
                .config
                .as_ref()
                .map(|c| c.ci_alive_threshold)
                .unwrap_or(0.1);
            export::summary_csv(snap()?.as_ref(), thr)
        }
        View::Clusters => {
            let d = app
                .clusters
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no clustering yet: run one first"))?;
            crate::app::cluster_data::clusters_csv(d, &app.cluster_rows, app.cluster_k)
        }
        View::Interventions => interventions::csv(app)?,
        View::Days => days::csv(app)?,
    };
    export::write_atomic(path, text.as_bytes())
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
        if let Some(c) = app.selection.cluster
            && let Some(row) = app.cluster_rows.get(c)
        {
            ui.separator();
            ui.colored_label(
                CLUSTER_COLOR,
                format!(
                    "cluster {c} (k = {}): {}",
                    app.cluster_k,
                    short_members(&row.members, 6)
                ),
            );
            if ui.small_button("clear cluster").clicked() {
                app.selection.cluster = None;
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
