//! The background worker: trains without blocking, and shuts down promptly mid-training.

use std::time::{Duration, Instant};

use spdlab::worker::{Command, Event, RunState, Source, WorkerHandle};

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
