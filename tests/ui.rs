//! UI tests of every view with egui_kittest (headless wgpu on lavapipe; no window needed).

use std::sync::Arc;

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use spdlab::app::cluster_data::ClusterData;
use spdlab::app::views::{
    ci::CiView, clusters::ClustersView, days::DaysView, interventions::InterventionsView,
};
use spdlab::app::{SpdApp, StartOptions};
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

fn ci<'a>(h: &'a Harness<'static, SpdApp>) -> &'a CiView {
    h.state().view::<CiView>().unwrap()
}

fn iv<'a>(h: &'a Harness<'static, SpdApp>) -> &'a InterventionsView {
    h.state().view::<InterventionsView>().unwrap()
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
    for v in spdlab::app::views::registry() {
        h.get_by_label(v.label()).click();
        h.run();
        assert_eq!(h.state().settings.view, v.name());
        assert_eq!(h.state().current_view(), v.name());
    }
    let _ = h.render().expect("render");
}

#[test]
fn directions_view_shows_the_tms_plane_and_selects() {
    let mut h = harness();
    h.state_mut().set_view("directions");
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
    h.state_mut().set_view("ci");
    h.run();
    let uploads = ci(&h).uploads;
    assert!(uploads >= 1);
    for _ in 0..5 {
        h.run();
    }
    assert_eq!(ci(&h).uploads, uploads, "no re-upload without new data");
    // Hungarian ordering puts the five live subcomponents on the diagonal first.
    assert_eq!(ci(&h).rows, 5);
    // A new column order hands the heatmap a new order, not new values.
    let orders = ci(&h).orders;
    h.get_by_label("by density").click();
    h.run();
    assert_eq!(ci(&h).uploads, uploads);
    assert_eq!(ci(&h).orders, orders + 1);
}

/// The Hungarian column order is the worker's job: the view asks once per (snapshot, module),
/// shows the columns as is until the answer arrives, then shows it (a new column order, the
/// same values).
#[test]
fn ci_hungarian_order_comes_from_the_worker() {
    let mut h = harness();
    h.state_mut().set_view("ci");
    h.run();
    let c = h.state().session.snapshot.as_ref().unwrap().modules[0].c;
    assert_eq!(
        ci(&h).columns,
        (0..c).collect::<Vec<_>>(),
        "as is until answered"
    );
    h.get_by_label_contains("waiting for the worker");
    let (uploads, orders) = (ci(&h).uploads, ci(&h).orders);
    // No worker in this test: answer as the worker would.
    let snap = h.state().session.snapshot.clone().unwrap();
    let m = &snap.modules[0];
    let order = spdlab::metrics::toy_metrics::permute_to_identity(&m.ci_probe, snap.n_probe, m.c);
    assert_ne!(order, (0..c).collect::<Vec<_>>());
    let key = h.state().session.snapshot_version;
    // A stale answer (another snapshot) is ignored.
    h.state_mut().apply(Event::ColumnOrder {
        key: key + 7,
        module: 0,
        order: (0..c).rev().collect(),
    });
    h.run();
    assert_eq!(ci(&h).orders, orders);
    h.state_mut().apply(Event::ColumnOrder {
        key,
        module: 0,
        order: order.clone(),
    });
    h.run();
    assert_eq!(ci(&h).columns, order);
    assert_eq!(ci(&h).orders, orders + 1);
    assert_eq!(ci(&h).uploads, uploads);
}

/// With the real worker, the CI view's Hungarian order arrives as an event and is shown.
#[test]
fn ci_hungarian_order_with_the_worker() {
    use std::time::{Duration, Instant};
    let mut h = Harness::builder()
        .with_size(egui::vec2(1100.0, 700.0))
        .wgpu()
        .build_eframe(|cc| {
            let w = spdlab::worker::WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
            SpdApp::new(
                cc,
                Some(w),
                StartOptions {
                    view: Some("ci".into()),
                    ..Default::default()
                },
            )
        });
    let t0 = Instant::now();
    while ci(&h).hungarian.is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no Hungarian order");
        std::thread::sleep(Duration::from_millis(20));
        h.step();
    }
    h.step();
    let snap = h.state().session.snapshot.clone().unwrap();
    let m = &snap.modules[0];
    let want = spdlab::metrics::toy_metrics::permute_to_identity(&m.ci_probe, snap.n_probe, m.c);
    assert_eq!(ci(&h).columns, want);
    assert!(h.state().session.error.is_none());
}

/// One registry: tab labels, `--view` names and export names all come from it.
#[test]
fn the_view_registry_names_every_view_once() {
    let names = spdlab::app::view_names();
    // The `--view` names of earlier versions still open their views.
    for old in [
        "training",
        "directions",
        "ci",
        "summary",
        "clusters",
        "interventions",
        "days",
    ] {
        assert!(names.contains(&old), "{old}");
    }
    let unique: std::collections::BTreeSet<_> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "names are unique");
    for n in &names {
        assert_eq!(spdlab::app::view_from_name(n).as_deref(), Some(*n));
    }
    assert_eq!(spdlab::app::view_from_name("nope"), None);
    let labels: std::collections::BTreeSet<_> = spdlab::app::views::registry()
        .iter()
        .map(|v| v.label())
        .collect();
    assert_eq!(labels.len(), names.len());
    // The `--view` help comes from the registry.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for n in &names {
        assert!(help.contains(n), "--view help lacks {n}: {help}");
    }
}

/// Settings persisted when the view setting was an enum variant name still open that view.
#[test]
fn old_persisted_view_names_still_resolve() {
    let mut h = harness();
    for (old, now) in [
        ("CausalImportance", "ci"),
        ("Days", "days"),
        ("Training", "training"),
        ("gone", "directions"),
    ] {
        h.state_mut().settings.view = old.into();
        assert_eq!(h.state().current_view(), now);
    }
}

#[test]
fn training_view_with_history_and_controls() {
    let mut h = harness();
    h.state_mut().set_view("training");
    h.run();
    assert!(
        !h.state().session.history.is_empty(),
        "the shipped decomposition carries its loss history"
    );
    h.get_by_label("New run").click();
    h.run();
    assert!(
        h.state().session.history.is_empty(),
        "a new run starts a fresh history"
    );
}

fn app_with(cc: &eframe::CreationContext<'_>, asset: &str, cluster: bool) -> SpdApp {
    let mut app = SpdApp::new(cc, None, StartOptions::default());
    let (tr, extras) = spdlab_file::from_bytes(
        spdlab::assets::decomposition(asset).unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut clusters = spdlab::interventions::stored_clusters(&extras.extra).unwrap();
    if cluster && clusters.is_none() {
        let opts = spdlab::cluster::ClusterOptions::default();
        let h = spdlab::cluster::cluster(&tr, &opts).unwrap();
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
        select: "cluster:0".into(),
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
    h.state_mut().set_view("interventions");
    h.run();
    h.get_by_label_contains("What breaks");
    h.get_by_label_contains("delta component off");
    // The ablated cluster's feature is the top row; choose another input.
    let first = iv(&h).outcome.as_ref().unwrap().result.what_breaks()[0];
    let other = (first + 1) % 5;
    h.get_by_label(&format!(
        "{other}: {}",
        iv(&h).outcome.as_ref().unwrap().input_labels[other]
    ))
    .click();
    h.run();
    assert_eq!(iv(&h).row, other);
    // The trace lists the subcomponents that fire (CI above the threshold).
    h.get_by_label_contains("Mechanism trace");
    // Switching the selection mode re-describes the request.
    h.state_mut()
        .view_mut::<InterventionsView>()
        .unwrap()
        .select = "linear1:*".into();
    h.run();
    let _ = h.render().expect("render");
}

#[test]
fn days_view_shows_the_rotation_and_unlearning() {
    let mut h = Harness::builder()
        .with_size(egui::vec2(1300.0, 900.0))
        .wgpu()
        .build_eframe(|cc| app_with(cc, "days", false));
    h.state_mut().set_view("days");
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
    assert!(h.state().view::<DaysView>().unwrap().ablate);
    h.get_by_label("Answers with the rotation mechanism ablated");
    // Unlearning: every "next" answer collapses to the same day; "same" stays right.
    h.get_by_label("0/7");
    h.get_by_label("7/7");
    h.get_all_by_label("Tue").next().unwrap().click();
    h.run();
    assert_eq!(h.state().view::<DaysView>().unwrap().day, 1);
    let _ = h.render().expect("render");
}

/// The app with a clustering of the shipped decomposition (run here, as `spdlab cluster` does).
fn clustered_harness() -> Harness<'static, SpdApp> {
    let mut h = harness();
    let (tr, _) = spdlab_file::from_bytes(
        spdlab::assets::default_decomposition(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let opts = spdlab::cluster::ClusterOptions {
        n_samples: 2048,
        ..Default::default()
    };
    let (acts, labels) =
        spdlab::cluster::activations(&tr, opts.n_samples, opts.ci, opts.seed).unwrap();
    let input = spdlab::worker::ClusterInput {
        stored: None,
        truth: spdlab::cluster::score::ground_truth(&tr.model).unwrap(),
        options: opts.clone(),
        acts,
        labels,
        n_samples: opts.n_samples,
    };
    let data = ClusterData::build(&input).unwrap();
    h.state_mut().set_clusters(data);
    h
}

#[test]
fn clusters_view_selects_a_cluster_and_slides_k() {
    let mut h = clustered_harness();
    h.state_mut().set_view("clusters");
    h.run();
    let k0 = h.state().clusters.k;
    // tms-5-2: five features, each implemented by one subcomponent per layer.
    assert_eq!(k0, 5, "minimum description length at five groups");
    assert_eq!(h.state().clusters.rows.len(), 5);
    assert!(h.state().clusters.rows.iter().all(|r| r.rank == 2));
    // Scored against the known answer (the feature each subcomponent reads or writes): the
    // stopping point is the answer; one merge further is not.
    let d = h.state().clusters.data.clone().unwrap();
    let sc = d.result.score.as_ref().expect("tms has a known answer");
    assert_eq!(sc.n_classes, 5);
    assert_eq!(sc.at(5).map(|p| (p.1, p.2)), Some((1.0, 1.0)));
    assert!(sc.at(4).unwrap().2 < 1.0);
    assert_eq!(sc.best().unwrap().0, 5);
    h.get_by_label_contains("vs the known answer: k = 5: purity 1.000, ARI 1.000");
    // The merge tree has every alive subcomponent as a leaf and one join per merge.
    assert_eq!(d.dendrogram.order.len(), d.n_alive());
    assert_eq!(d.dendrogram.segments.len(), 3 * d.dendrogram.n_steps);
    let uploads = h.state().view::<ClustersView>().unwrap().uploads;
    assert_eq!(uploads, 1);
    h.run();
    assert_eq!(
        h.state().view::<ClustersView>().unwrap().uploads,
        uploads,
        "no re-upload per frame"
    );

    h.get_by_label("cluster 2").click();
    h.run();
    assert_eq!(h.state().selection.cluster, Some(2));
    let members = h.state().clusters.rows[2].members.clone();
    let l1 = h.state().selected_cluster_members(0);
    assert_eq!(l1.len(), 1, "one linear1 member: {members:?}");

    // One merge further: four groups, matrix re-uploaded once, the selection follows its members.
    h.get_by_label("fewer").click();
    h.run();
    assert_eq!(h.state().clusters.k, 4);
    assert_eq!(h.state().clusters.rows.len(), 4);
    assert_eq!(
        h.state().view::<ClustersView>().unwrap().uploads,
        uploads + 1
    );
    let sel = h.state().selection.cluster.expect("selection kept");
    assert!(
        members
            .iter()
            .all(|m| h.state().clusters.rows[sel].members.contains(m))
    );
    h.get_by_label("more").click();
    h.run();
    assert_eq!(h.state().clusters.k, 5);

    // The other views highlight the selected cluster; the CI view orders by cluster.
    h.state_mut().set_view("ci");
    h.run();
    h.get_by_label("by cluster").click();
    h.run();
    let cols = ci(&h).columns.clone();
    let first: Vec<usize> = h.state().clusters.rows[0]
        .members
        .iter()
        .filter_map(|m| m.strip_prefix("linear1:").and_then(|i| i.parse().ok()))
        .collect();
    assert_eq!(cols[0], first[0], "cluster 0 first");
    h.state_mut().set_view("directions");
    h.run();
    h.get_by_label_contains("cluster 2 (k = 5)");
}

#[test]
fn clusters_view_without_clustering_offers_to_run_one() {
    let mut h = harness();
    h.state_mut().set_view("clusters");
    h.run();
    h.get_by_label_contains("no stored clustering");
    h.get_by_label("Run clustering");
}

#[test]
fn exports_write_parsable_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = clustered_harness();
    // The interventions view exports the latest result: give it one.
    let (tr, _) = spdlab_file::from_bytes(
        spdlab::assets::default_decomposition(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let req = spdlab::worker::InterventionRequest {
        select: "linear1:0-4".into(),
        selected_mode: spdlab::interventions::MaskMode::Ablate,
        other_mode: spdlab::interventions::MaskMode::Keep,
        delta: false,
        inputs: spdlab::worker::InputSet::Probes(0.75),
        seed: 0,
    };
    let out = spdlab::worker::intervene(&tr, None, req).unwrap();
    h.state_mut().apply(Event::Intervened(Arc::new(out)));
    for v in spdlab::app::view_names() {
        if v == "days" {
            continue; // needs a days model: covered by days_view_exports_csv
        }
        if v == "sequence" || v == "attention" {
            continue; // need a sequence model: covered in tests/sequence_views.rs
        }
        if v == "sweep" {
            continue; // needs a sweep folder: covered in tests/sweep_view.rs
        }
        if v == "trajectories" {
            continue; // needs a timeline: covered in tests/timeline_ui.rs
        }
        if v == "prompt" {
            continue; // needs a language model: covered in tests/prompt_view.rs
        }
        h.state_mut().set_view(v);
        h.run();
        let csv = dir.path().join(format!("{v}.csv"));
        h.state_mut().export_csv(&csv).unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        let mut lines = text.lines();
        let n_cols = lines.next().unwrap().split(',').count();
        assert!(n_cols >= 2, "{v:?}: header");
        let mut rows = 0;
        for l in lines {
            assert_eq!(l.split(',').count(), n_cols, "{v:?}: rectangular: {l}");
            rows += 1;
        }
        assert!(rows > 0, "{v:?}: has rows");

        let png = dir.path().join(format!("{v}.png"));
        let ctx = h.ctx.clone();
        h.state_mut().export_png(&ctx, png.clone());
        // The screenshot is taken after the next frame and encoded on a thread.
        for _ in 0..100 {
            h.run();
            if png.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let img = image::open(&png).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        let rect = h.state().view_rect.unwrap();
        assert!(
            (img.width() as f32 - rect.width()).abs() <= 2.0,
            "{v:?}: {} vs {}",
            img.width(),
            rect.width()
        );
        assert!(img.height() > 50);
        assert!(h.state().session.error.is_none());
    }
    // The clusters CSV has every subcomponent: 10 alive in 5 clusters and 30 dead.
    let text = std::fs::read_to_string(dir.path().join("clusters.csv")).unwrap();
    assert_eq!(text.lines().count(), 1 + 40);
    // An unwritable path is an error in the GUI, not a panic.
    let bad = dir.path().join("missing").join("x.csv");
    assert!(h.state_mut().export_csv(&bad).is_err());
}

#[test]
fn custom_input_row_shows_the_workers_answer() {
    let mut h = harness();
    h.state_mut().set_view("ci");
    h.run();
    h.get_by_label("custom").click();
    h.run();
    assert_eq!(ci(&h).custom_input.len(), 5);
    // No worker in this test: answer as the worker would.
    let (tr, _) = spdlab_file::from_bytes(
        spdlab::assets::default_decomposition(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let input = vec![0.0, 0.0, 0.9, 0.0, 0.0];
    let answer = spdlab::worker::custom_ci(&tr, &input).unwrap();
    h.state_mut().apply(Event::CustomCi { input, ci: answer });
    h.run();
    assert_eq!(ci(&h).rows, 1);
    let csv = ci(&h).columns.len();
    assert_eq!(csv, 20);
}

/// The real worker: "Run clustering" is a worker job (progress, then the result), the result is
/// stored in the file extras by the worker; reopening the saved file shows it again.
#[test]
fn run_clustering_with_the_worker_and_reopen_it() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::builder()
        .with_size(egui::vec2(1100.0, 700.0))
        .wgpu()
        .build_eframe(|cc| {
            let w = spdlab::worker::WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
            SpdApp::new(
                cc,
                Some(w),
                StartOptions {
                    view: Some("clusters".into()),
                    ..Default::default()
                },
            )
        });
    let wait = |h: &mut Harness<'static, SpdApp>, what: &str, f: &dyn Fn(&SpdApp) -> bool| {
        let t0 = Instant::now();
        while !f(h.state()) {
            assert!(t0.elapsed() < Duration::from_secs(60), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
            h.step();
        }
    };
    wait(&mut h, "load", &|a| a.session.snapshot.is_some());
    // The shipped decomposition carries a clustering: run it again from the collapsed controls.
    wait(&mut h, "stored clustering", &|a| {
        a.clusters.data.is_some() && !a.clustering_running()
    });
    h.run();
    h.get_by_label("Run clustering again").click();
    h.run();
    h.get_by_label("Run clustering").click();
    h.step();
    assert!(h.state().clustering_running());
    wait(&mut h, "clustering", &|a| a.clusters.data.is_some());
    wait(&mut h, "job end", &|a| !a.clustering_running());
    assert_eq!(h.state().clusters.k, 5);
    let saved = dir.path().join("c.spdlab");
    h.state()
        .send_command(spdlab::worker::Command::Save(saved.clone()));
    wait(&mut h, "save", &|_| saved.exists());
    std::thread::sleep(Duration::from_millis(200));
    h.state_mut().open(saved);
    h.step();
    // The reload resets the clusters and the worker's stored-clustering job may answer in
    // the same frame: wait for the new description, then the clustering after it.
    wait(&mut h, "reload", &|a| {
        a.session.description.ends_with("c.spdlab")
    });
    wait(&mut h, "stored clustering", &|a| {
        a.clusters.data.is_some() && !a.clustering_running()
    });
    assert_eq!(h.state().clusters.rows.len(), 5);
    assert!(
        h.state().session.error.is_none(),
        "{:?}",
        h.state().session.error
    );
}

#[test]
fn days_view_exports_csv() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::builder()
        .with_size(egui::vec2(1300.0, 900.0))
        .wgpu()
        .build_eframe(|cc| app_with(cc, "days", false));
    h.state_mut().set_view("days");
    h.run();
    let csv = dir.path().join("days.csv");
    h.state_mut().export_csv(&csv).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    // Header + 7 days x 2 operations, rectangular, answers named.
    assert_eq!(text.lines().count(), 15);
    let n = text.lines().next().unwrap().split(',').count();
    assert!(text.lines().all(|l| l.split(',').count() == n));
    assert!(text.contains("Mon,next,Tue,Tue"), "{text}");
}

/// The config editor in the real app: edit the minimality coefficient and C of a module, start
/// a run (the real worker), save it: the saved config has them. An invalid value shows its
/// message and disables "New run". A coefficient changed while training applies live and is
/// marked on the curves.
#[test]
fn config_editor_edits_start_a_run_with_that_config() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::builder()
        .with_size(egui::vec2(1300.0, 1000.0))
        .wgpu()
        .build_eframe(|cc| {
            let w = spdlab::worker::WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
            let mut app = SpdApp::new(cc, Some(w), StartOptions::default());
            app.settings.preset = "tms-5-2".into();
            app.settings.steps = 400;
            app.reset_editor();
            app
        });
    let wait = |h: &mut Harness<'static, SpdApp>, what: &str, f: &dyn Fn(&SpdApp) -> bool| {
        let t0 = Instant::now();
        while !f(h.state()) {
            assert!(t0.elapsed() < Duration::from_secs(120), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
            h.step();
        }
    };
    wait(&mut h, "first load", &|a| a.session.snapshot.is_some());
    h.run();
    // An invalid value: its message, and no run can start.
    h.get_by_label("C.linear1").set_text_value_accesskit("zero");
    h.run();
    h.get_by_label_contains("'zero' is not a number");
    assert!(h.get_by_label("New run").accesskit_node().is_disabled());
    for (field, v) in [
        ("C.linear1", "24"),
        ("C.linear2", "24"),
        ("ImportanceMinimalityLoss.coeff", "0.005"),
    ] {
        h.get_by_label(field).set_text_value_accesskit(v);
        h.run();
    }
    assert!(!h.get_by_label("New run").accesskit_node().is_disabled());
    h.get_by_label("New run").click();
    h.run();
    wait(&mut h, "new run loaded", &|a| {
        a.session
            .config
            .as_ref()
            .is_some_and(|c| c.module_info[0].c == 24)
    });
    h.get_by_label("Start").click();
    h.run();
    wait(&mut h, "training", &|a| a.session.step() > 20);
    // A live change of a coefficient: applied by the worker, marked on the curves.
    h.get_by_label("StochasticReconLoss.coeff")
        .set_text_value_accesskit("2");
    h.run();
    h.get_by_label("Apply now").click();
    h.run();
    wait(&mut h, "live change", &|a| {
        a.session
            .config
            .as_ref()
            .and_then(|c| c.loss("StochasticReconLoss"))
            .and_then(|l| l.coeff())
            == Some(2.0)
    });
    assert_eq!(h.state().session.markers.len(), 1);
    assert!(
        h.state().session.markers[0]
            .1
            .contains("StochasticReconLoss 2e0")
    );
    h.get_by_label("Pause").click();
    h.run();
    let saved = dir.path().join("edited.spdlab");
    h.state()
        .send_command(spdlab::worker::Command::Save(saved.clone()));
    wait(&mut h, "save", &|_| saved.exists());
    std::thread::sleep(Duration::from_millis(200));
    let (tr, _) = spdlab_file::load(&saved, &candle_core::Device::Cpu).unwrap();
    assert_eq!(tr.config.module_info[0].c, 24);
    assert_eq!(tr.config.module_info[1].c, 24);
    assert_eq!(
        tr.config
            .loss("ImportanceMinimalityLoss")
            .and_then(|l| l.coeff()),
        Some(0.005)
    );
    assert_eq!(
        tr.config
            .loss("StochasticReconLoss")
            .and_then(|l| l.coeff()),
        Some(2.0)
    );
    assert_eq!(tr.model.modules[0].c, 24);
    h.get_by_label("Stop").click();
    h.run();
}

/// Keyboard shortcuts move the selection (Left/Right: subcomponent, Up/Down: module).
#[test]
fn arrow_keys_move_the_selection() {
    let mut h = harness();
    h.run();
    assert_eq!(h.state().selection.component, None);
    h.key_press(egui::Key::ArrowRight);
    h.run();
    assert_eq!(h.state().selection.component, Some(0));
    h.key_press(egui::Key::ArrowLeft);
    h.run();
    assert_eq!(h.state().selection.component, Some(19));
    h.key_press(egui::Key::ArrowDown);
    h.run();
    assert_eq!(h.state().selection.module, 1);
    assert_eq!(h.state().selection.component, None);
}
