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

fn app_with(cc: &eframe::CreationContext<'_>, asset: &str, cluster: bool) -> SpdApp {
    let mut app = SpdApp::new(cc, None, StartOptions::default());
    let (mut tr, extras) = spdlab_file::from_bytes(
        spdlab::assets::decomposition(asset).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut clusters = spdlab::interventions::stored_clusters(&extras.extra).unwrap();
    if cluster && clusters.is_none() {
        let opts = spdlab::cluster::ClusterOptions::default();
        let h = spdlab::cluster::cluster(&mut tr, &opts).unwrap();
        clusters = Some(spdlab::cluster::summarize(&h, &opts, h.best_k()));
    }
    let clusters = clusters.map(Arc::new);
    let snap = spdlab::worker::snapshot_with_extras(&tr, clusters.clone(), 0.75, 256).unwrap();
    app.apply(Event::Loaded {
        description: asset.into(),
        config: Box::new(tr.config.clone()),
        step: tr.step,
        history: tr.history.clone(),
    });
    app.apply(Event::Snapshot(Arc::new(snap)));
    app.apply(Event::State(RunState::Finished));
    // The worker's answers, computed here (the harness runs without a worker thread).
    let req = spdlab::worker::InterventionRequest {
        select: if asset == "days" {
            "cluster:0"
        } else {
            "cluster:0"
        }
        .into(),
        selected_mode: spdlab::interventions::MaskMode::Ablate,
        other_mode: spdlab::interventions::MaskMode::Keep,
        delta: false,
        inputs: spdlab::worker::InputSet::Probes(0.75),
        seed: 0,
    };
    let out = spdlab::worker::intervene(&tr, clusters.as_deref(), req).unwrap();
    let trace =
        spdlab::interventions::trace(&tr.model, &out.result.inputs[0], 0.1, clusters.as_deref())
            .unwrap();
    app.apply(Event::Intervened(Arc::new(out)));
    app.apply(Event::Traced(Arc::new(trace)));
    app
}

#[test]
fn interventions_view_ranks_what_breaks_and_traces() {
    let mut h = Harness::builder()
        .with_size(egui::vec2(1200.0, 800.0))
        .wgpu()
        .build_eframe(|cc| app_with(cc, "tms-5-2", true));
    h.state_mut().settings.view = View::Interventions;
    h.run();
    h.get_by_label_contains("What breaks");
    h.get_by_label_contains("delta component off");
    // The ablated cluster's feature is the top row; choose another input.
    let first = h
        .state()
        .intervention
        .as_ref()
        .unwrap()
        .result
        .what_breaks()[0];
    let other = (first + 1) % 5;
    h.get_by_label(&format!(
        "{other}: {}",
        h.state().intervention.as_ref().unwrap().input_labels[other]
    ))
    .click();
    h.run();
    assert_eq!(h.state().views.interventions.row, other);
    // The trace lists the subcomponents that fire (CI above the threshold).
    h.get_by_label_contains("Mechanism trace");
    // Switching the selection mode re-describes the request.
    h.state_mut().views.interventions.select = "linear1:*".into();
    h.run();
    let _ = h.render().expect("render");
}

#[test]
fn days_view_shows_the_rotation_and_unlearning() {
    let mut h = Harness::builder()
        .with_size(egui::vec2(1300.0, 900.0))
        .wgpu()
        .build_eframe(|cc| app_with(cc, "days", false));
    h.state_mut().settings.view = View::Days;
    h.run();
    h.get_by_label("Answers of the decomposition");
    assert_eq!(
        h.get_all_by_label("7/7").count(),
        2,
        "same and next all correct"
    );
    h.get_by_label("ablate the rotation mechanism (unlearn)")
        .click();
    h.run();
    assert!(h.state().views.days.ablate);
    h.get_by_label("Answers with the rotation mechanism ablated");
    // Unlearning: every "next" answer collapses to the same day; "same" stays right.
    h.get_by_label("0/7");
    h.get_by_label("7/7");
    h.get_all_by_label("Tue").next().unwrap().click();
    h.run();
    assert_eq!(h.state().views.days.day, 1);
    let _ = h.render().expect("render");
}
