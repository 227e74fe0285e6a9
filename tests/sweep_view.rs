//! The sweep view on a sweep folder that changes while the app watches it: finished points
//! fill in, a point that starts running shows its progress, a point that finishes later
//! appears, the CSV lists every point, and a click on a cell opens that decomposition.

use eframe::egui;
use egui_kittest::kittest::Queryable;
use spdlab::app::SpdApp;
use spdlab::app::views::sweep::SweepView;
use spdlab::sweep::{PointState, Progress, Sweep, SweepSpec, parse_axis};

mod common;
use common::wait;

fn table(a: &SpdApp) -> Option<std::sync::Arc<spdlab::sweep::SweepTable>> {
    a.session.sweep.as_ref().and_then(|w| w.table())
}

#[test]
fn sweep_view_watches_the_folder_and_opens_points() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("sw");
    let mut base = spdlab::presets::config_file_json("tms-5-2").unwrap();
    base["steps"] = 30.into();
    let sweep = Sweep::create(
        &dir,
        SweepSpec {
            base,
            axes: vec![
                parse_axis("seed=0..1").unwrap(),
                parse_axis("C.linear1=10,20").unwrap(),
            ],
        },
    )
    .unwrap();
    let dev = candle_core::Device::Cpu;
    sweep.run_point(0, &dev).unwrap();
    sweep.run_point(1, &dev).unwrap();
    let mut h = common::app_on(dir.clone(), None, egui::vec2(1200.0, 800.0));
    assert_eq!(h.state().current_view(), "sweep");
    wait(&mut h, "the first table", |a| table(a).is_some());
    let t = table(h.state()).unwrap();
    assert_eq!(t.rows.len(), 4);
    assert_eq!(t.counts(), (2, 0, 2));
    // The view starts on the target-solution error, seed along x, C along y.
    h.run();
    assert_eq!(
        h.state().view::<SweepView>().unwrap().metric,
        "target-solution error"
    );
    h.get_by_label_contains("4 points: 2 finished, 0 running, 2 pending");
    // Point 2 starts (its progress file appears): the cell shows it running.
    let p2 = sweep.point_dir(2);
    std::fs::create_dir_all(&p2).unwrap();
    let prog = Progress {
        step: 12,
        total: 31,
        steps_per_second: 100.0,
        losses: Default::default(),
    };
    std::fs::write(
        p2.join("progress.json"),
        serde_json::to_string(&prog).unwrap(),
    )
    .unwrap();
    wait(&mut h, "point 2 running", |a| {
        table(a).is_some_and(|t| {
            t.rows[2].state
                == PointState::Running {
                    step: 12,
                    total: 31,
                }
        })
    });
    // Point 3 finishes while the app watches.
    sweep.run_point(3, &dev).unwrap();
    wait(&mut h, "point 3 finished", |a| {
        table(a).is_some_and(|t| t.counts() == (3, 1, 0))
    });
    h.run();
    h.get_by_label_contains("4 points: 3 finished, 1 running, 0 pending");
    let _ = h.render().expect("render");
    // The CSV: one line per point with its axis values and metrics.
    let csv = d.path().join("sweep.csv");
    h.state_mut().export_csv(&csv).unwrap();
    wait(&mut h, "the CSV", |_| csv.exists());
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 5);
    assert!(
        text.lines()
            .next()
            .unwrap()
            .contains("\"target-solution error\"")
    );
    assert!(text.lines().nth(3).unwrap().contains(",running,12,31"));
    // A click on point 3's cell opens its decomposition.
    h.get_by_label("point 3").click();
    h.run();
    wait(&mut h, "point 3's decomposition", |a| {
        a.session
            .snapshot
            .as_ref()
            .is_some_and(|s| s.modules[0].c == 20)
    });
    assert_eq!(h.state().view::<SweepView>().unwrap().opened, Some(3));
    assert!(
        h.state().session.error.is_none(),
        "{:?}",
        h.state().session.error
    );
    // Still the sweep view, still watching.
    assert_eq!(h.state().current_view(), "sweep");
    assert!(h.state().session.sweep.is_some());
    // Compare two: points 0 (C 10) and 3 (C 20) matched module by module.
    h.state_mut().view_mut::<SweepView>().unwrap().compare_mode = true;
    h.run();
    h.get_by_label("point 0").click();
    h.run();
    h.get_by_label("point 3").click();
    h.run();
    let done = |a: &SpdApp| {
        a.view::<SweepView>()
            .and_then(|v| v.comparison.as_ref())
            .and_then(|c| c.lock().unwrap().clone())
    };
    wait(&mut h, "the comparison", |a| done(a).is_some());
    let cmp = done(h.state()).unwrap().expect("compared");
    assert_eq!(cmp.modules.len(), 2);
    assert_eq!(
        (cmp.modules[0].c_a, cmp.modules[0].c_b),
        (10, 20),
        "linear1: C 10 vs 20"
    );
    for m in &cmp.modules {
        assert!(!m.pairs.is_empty(), "{}", m.name);
        assert!(m.pairs.len() <= m.c_a.min(m.c_b), "at most the smaller C");
        assert_eq!(
            (m.n_probe, m.ci_b.len()),
            (5, 5 * m.c_b),
            "CI on the probes"
        );
        assert!(m.pairs.iter().all(|p| (0.0..=1.0001).contains(&p.2)));
        assert!(
            m.pairs.windows(2).all(|w| w[0].2 >= w[1].2),
            "most similar first"
        );
    }
    h.run();
    h.get_by_label_contains("A = point 0");
    let _ = h.render().expect("render");
    assert_eq!(
        h.state().view::<SweepView>().unwrap().opened,
        Some(3),
        "compare mode does not open points"
    );
}
