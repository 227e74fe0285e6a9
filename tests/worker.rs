//! The background worker: trains without blocking, and shuts down promptly mid-training.

use std::time::{Duration, Instant};

use spdlab::worker::{Command, Event, JobKind, RunState, Source, WorkerHandle};

fn wait_for(w: &WorkerHandle, pred: impl Fn(&Event) -> bool, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(e) = w.rx.recv_timeout(Duration::from_millis(50))
            && pred(&e)
        {
            return true;
        }
    }
    false
}

#[test]
fn trains_live_and_stops_within_two_seconds() {
    let w = WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
    let mut cfg = spdlab::presets::spd_config("tms-5-2").unwrap();
    cfg.steps = 1_000_000;
    cfg.faithfulness_warmup_steps = 5;
    w.send(Command::Load(Source::Preset {
        name: "tms-5-2".into(),
        config: Box::new(cfg),
    }));
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::Loaded { .. }),
        Duration::from_secs(30)
    ));
    w.send(Command::Start);
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::State(RunState::Running)),
        Duration::from_secs(30)
    ));
    // Steps and snapshots stream in while training.
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::Step(r) if r.step >= 5),
        Duration::from_secs(60)
    ));
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::Snapshot(_)),
        Duration::from_secs(10)
    ));
    w.send(Command::Pause);
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::State(RunState::Paused)),
        Duration::from_secs(10)
    ));
    w.send(Command::Resume);
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::State(RunState::Running)),
        Duration::from_secs(10)
    ));
    // Closing the window drops the handle: the thread must stop mid-run quickly.
    let t0 = Instant::now();
    drop(w);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        t0.elapsed()
    );
}

#[test]
fn load_errors_are_reported_not_panicked() {
    let w = WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
    w.send(Command::Load(Source::File(
        "/nonexistent/run.spdlab".into(),
    )));
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::Error(m) if m.contains("run.spdlab")),
        Duration::from_secs(10)
    ));
    w.send(Command::Start);
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::Error(m) if m.contains("nothing loaded")),
        Duration::from_secs(10)
    ));
}

/// Loads the shipped tms-5-2 decomposition and waits for it, and for the job that rebuilds
/// its stored clustering to end.
fn loaded_worker() -> WorkerHandle {
    let w = WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
    w.send(Command::Load(Source::Default));
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::Snapshot(_)),
        Duration::from_secs(30)
    ));
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::JobEnded { .. }),
        Duration::from_secs(60)
    ));
    w
}

/// Clustering is a worker job: progress reports, the result, then the end of the job.
#[test]
fn clustering_job_reports_progress_and_its_result() {
    let w = loaded_worker();
    w.send(Command::Cluster(spdlab::cluster::ClusterOptions::default()));
    let t0 = Instant::now();
    let (mut stages, mut result, mut ended) = (vec![], None, false);
    while !ended && t0.elapsed() < Duration::from_secs(120) {
        match w.rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Progress {
                kind: JobKind::Clustering,
                stage,
                fraction,
                ..
            }) => stages.push((stage, fraction)),
            Ok(Event::Clusters { data, stored }) => {
                assert!(!stored);
                result = Some(data);
            }
            Ok(Event::JobEnded { cancelled, .. }) => {
                assert!(!cancelled);
                ended = true;
            }
            Ok(Event::Error(m)) => panic!("{m}"),
            _ => {}
        }
    }
    assert!(ended, "the job ended");
    // The merge reports its steps: several "merging" reports, the fraction never falls.
    assert!(stages.windows(2).all(|w| w[0].1 <= w[1].1), "{stages:?}");
    let merging = stages.iter().filter(|s| s.0 == "merging").count();
    assert!(merging > 3, "{stages:?}");
    let mut names: Vec<&str> = stages.iter().map(|s| s.0).collect();
    names.dedup();
    assert_eq!(names, ["activations", "merging", "co-activation counts"]);
    assert_eq!(result.expect("a clustering").result.best_k, 5);
}

/// A cancelled clustering ends at once and its result never arrives.
#[test]
fn clustering_job_can_be_cancelled() {
    let w = loaded_worker();
    w.send(Command::Cluster(spdlab::cluster::ClusterOptions::default()));
    w.send(Command::Cancel(JobKind::Clustering));
    assert!(wait_for(
        &w,
        |e| matches!(
            e,
            Event::JobEnded {
                cancelled: true,
                ..
            }
        ),
        Duration::from_secs(30)
    ));
    assert!(!wait_for(
        &w,
        |e| matches!(e, Event::Clusters { .. }),
        Duration::from_secs(3)
    ));
}

/// The Hungarian column order of a snapshot's module is computed on the worker.
#[test]
fn column_order_is_answered_by_the_worker() {
    let w = WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
    w.send(Command::Load(Source::Default));
    let t0 = Instant::now();
    let snap = loop {
        assert!(t0.elapsed() < Duration::from_secs(30), "no snapshot");
        if let Ok(Event::Snapshot(s)) = w.rx.recv_timeout(Duration::from_millis(50)) {
            break s;
        }
    };
    w.send(Command::ColumnOrder {
        key: 42,
        module: 0,
        snapshot: snap.clone(),
    });
    let m = &snap.modules[0];
    let want = spdlab::metrics::toy_metrics::permute_to_identity(&m.ci_probe, snap.n_probe, m.c);
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::ColumnOrder { key: 42, module: 0, order } if *order == want),
        Duration::from_secs(10)
    ));
}

/// Exports are worker jobs: the bytes are computed and written there (atomically), then
/// `Exported` names the file; a failing job is an error naming the file and writes nothing.
#[test]
fn exports_are_computed_and_written_by_the_worker() {
    use spdlab::worker::ExportJob;
    let w = WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("out.csv");
    w.commands().send(Command::Export {
        path: p.clone(),
        job: ExportJob::new(|| Ok(b"a,b\n1,2\n".to_vec())),
    });
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::Exported(q) if q.ends_with("out.csv")),
        Duration::from_secs(30)
    ));
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "a,b\n1,2\n");
    let bad = d.path().join("bad.csv");
    w.send(Command::Export {
        path: bad.clone(),
        job: ExportJob::new(|| anyhow::bail!("the view has nothing to export")),
    });
    assert!(wait_for(
        &w,
        |e| matches!(e, Event::Error(m) if m.contains("bad.csv") && m.contains("nothing to export")),
        Duration::from_secs(30)
    ));
    assert!(!bad.exists());
}
