//! UI tests of every view with egui_kittest (headless wgpu on lavapipe; no window needed).

use std::sync::Arc;

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use spdlab::app::{SpdApp, StartOptions, View};
use spdlab::io::spdlab_file;
use spdlab::worker::{Event, RunState, build_snapshot};

fn loaded_app(cc: &eframe::CreationContext<'_>) -> SpdApp {
    let mut app = SpdApp::new(cc, None, StartOptions::default());
    let (tr, _) = spdlab_file::from_bytes(
        spdlab::assets::default_decomposition(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let snap = build_snapshot(&tr, 0.75, 256).unwrap();
    app.apply(Event::Loaded {
        description: "embedded tms-5-2 decomposition".into(),
        config: Box::new(tr.config.clone()),
        step: tr.step,
        history: tr.history.clone(),
    });
    app.apply(Event::Snapshot(Arc::new(snap)));
    app.apply(Event::State(RunState::Finished));
    app
}

fn harness() -> Harness<'static, SpdApp> {
    Harness::builder()
        .with_size(egui::vec2(1100.0, 700.0))
        .wgpu()
        .build_eframe(|cc| loaded_app(cc))
}

#[test]
fn every_view_renders_and_tabs_switch() {
    let mut h = harness();
    h.run();
    for v in View::ALL {
        h.get_by_label(v.label()).click();
        h.run();
        assert_eq!(h.state().settings.view, v);
    }
    let _ = h.render().expect("render");
}

#[test]
fn directions_view_shows_the_tms_plane_and_selects() {
    let mut h = harness();
    h.state_mut().settings.view = View::Directions;
    h.run();
    // The 2-D write directions of linear1 (five features recovered, the rest negligible).
    h.get_by_label_contains("negligible subcomponents");
    h.get_by_label("linear2").click();
    h.run();
    assert_eq!(h.state().selection.module, 1);
}

#[test]
fn ci_heatmap_uploads_once_per_snapshot() {
    let mut h = harness();
    h.state_mut().settings.view = View::CausalImportance;
    h.run();
    let uploads = h.state().views.ci.uploads;
    assert!(uploads >= 1);
    for _ in 0..5 {
        h.run();
    }
    assert_eq!(
        h.state().views.ci.uploads,
        uploads,
        "no re-upload without new data"
    );
    // Hungarian ordering puts the five live subcomponents on the diagonal first.
    assert_eq!(h.state().views.ci.rows, 5);
    h.get_by_label("by density").click();
    h.run();
    assert_eq!(h.state().views.ci.uploads, uploads + 1);
}

#[test]
fn training_view_with_history_and_controls() {
    let mut h = harness();
    h.state_mut().settings.view = View::Training;
    h.run();
    assert!(
        !h.state().history.is_empty(),
        "the shipped decomposition carries its loss history"
    );
    h.get_by_label("New run").click();
    h.run();
    assert!(
        h.state().history.is_empty(),
        "a new run starts a fresh history"
    );
}
