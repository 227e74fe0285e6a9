//! Watching a goodfire-ai/spd run folder while it is written (as a reference training job
//! would): metrics.jsonl lines appended (one arriving in two pieces) extend the training
//! curves, a new checkpoint is loaded once complete, and a checkpoint written slowly in pieces
//! (with a pause long enough for its size to look settled) is never loaded half-written.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use eframe::egui;
use spdlab::app::SpdApp;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ref-ih-tiny")
        .join(name)
}

mod common;
use common::wait;

fn line(step: usize) -> String {
    format!(
        "{{\"step\": {step}, \"train/loss/total\": {}, \"train/loss/StochasticReconLoss\": 0.5, \"train/l0/blocks.0.attn.q_proj\": 3.0, \"train/schedules/lr\": 0.001}}\n",
        1.0 / (step as f64 + 1.0)
    )
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn a_run_folder_being_written_updates_live_and_never_loads_a_partial_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    std::fs::create_dir(&run).unwrap();
    for f in ["final_config.yaml", "ih.pth", "ih_train_config.yaml"] {
        std::fs::copy(fixture(f), run.join(f)).unwrap();
    }
    let ck = std::fs::read(fixture("model_2000.pth")).unwrap();
    std::fs::write(run.join("model_100.pth"), &ck).unwrap();
    let metrics = run.join("metrics.jsonl");
    append(&metrics, &(line(0) + &line(50)));
    let mut h = common::app_on(run.clone(), Some("training"), egui::vec2(1100.0, 700.0));
    let loaded = |a: &SpdApp, name: &str| {
        a.session.snapshot.is_some() && a.session.description.ends_with(name)
    };
    wait(&mut h, "the first checkpoint", |a| {
        loaded(a, "model_100.pth")
    });
    wait(&mut h, "the first curve points", |a| {
        a.session.history.len() == 2
    });
    // A line arriving in two pieces counts once it is complete.
    let l = line(100);
    append(&metrics, &l[..20]);
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(25));
        h.step();
    }
    assert_eq!(
        h.state().session.history.len(),
        2,
        "half a line is not a point"
    );
    append(&metrics, &(l[20..].to_string() + &line(150)));
    wait(&mut h, "the appended points", |a| {
        a.session.history.len() == 4
    });
    assert_eq!(h.state().session.history[3].step, 150);
    h.run();
    let _ = h.render().expect("render");
    // model_200.pth written slowly, in four pieces over ~3 s: never loaded half-written.
    let slow = run.join("model_200.pth");
    let n = ck.len();
    for k in 0..4 {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slow)
            .unwrap();
        f.write_all(&ck[k * n / 4..((k + 1) * n / 4).min(n - 1)])
            .unwrap();
        drop(f);
        // One pause longer than two looks of the watcher: the size is stable then, and only
        // the missing end of the zip archive keeps it from loading.
        let pause = Duration::from_millis(if k == 1 { 2600 } else { 800 });
        let t0 = Instant::now();
        while t0.elapsed() < pause {
            std::thread::sleep(Duration::from_millis(20));
            h.step();
            assert!(
                loaded(h.state(), "model_100.pth"),
                "still on the complete checkpoint while model_200.pth is written ({})",
                h.state().session.description
            );
            assert!(
                h.state().session.error.is_none(),
                "{:?}",
                h.state().session.error
            );
        }
    }
    // The last byte: now complete.
    append_bytes(&slow, &ck[n - 1..]);
    wait(&mut h, "the new checkpoint", |a| loaded(a, "model_200.pth"));
    // The curves survive the reload (a reference checkpoint has no history of its own).
    assert_eq!(h.state().session.history.len(), 4);
}

fn append_bytes(path: &Path, b: &[u8]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(b).unwrap();
}

/// A spdlab run training elsewhere (`spdlab train --out X` autosaves X.recovery): opening the
/// recovery file follows its autosaves and then the final file.
#[test]
fn a_spdlab_run_being_trained_elsewhere_is_followed() {
    use spdlab::io::spdlab_file::{FileExtras, save};
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run.spdlab");
    let rec = d.path().join("run.spdlab.recovery");
    let dev = candle_core::Device::Cpu;
    let mut cfg = spdlab::presets::spd_config("tms-5-2").unwrap();
    cfg.steps = 60;
    let mut tr = spdlab::spd::trainer::Trainer::new(
        spdlab::presets::target_model("tms-5-2", &dev).unwrap(),
        cfg,
    )
    .unwrap();
    let ex = FileExtras {
        preset: Some("tms-5-2".into()),
        ..Default::default()
    };
    let train = |tr: &mut spdlab::spd::trainer::Trainer, n: usize| {
        for _ in 0..n {
            tr.step().unwrap();
        }
    };
    train(&mut tr, 10);
    save(&tr, &ex, &rec).unwrap();
    let mut h = common::app_on(rec.clone(), Some("training"), egui::vec2(1000.0, 700.0));
    // The snapshot's step (the file's training step) and the file it came from.
    let at = |a: &SpdApp, step: usize, name: &str| {
        a.session.snapshot.as_ref().is_some_and(|s| s.step == step)
            && a.session.description.ends_with(name)
    };
    wait(&mut h, "the recovery file", |a| {
        at(a, 10, "run.spdlab.recovery")
    });
    // Another autosave (atomic, as spdlab writes it).
    train(&mut tr, 20);
    save(&tr, &ex, &rec).unwrap();
    wait(&mut h, "the next autosave", |a| {
        at(a, 30, "run.spdlab.recovery")
    });
    assert!(
        !h.state().session.history.is_empty(),
        "the file's own history"
    );
    // The run ends: its final file is written and the recovery file removed.
    train(&mut tr, 31);
    save(&tr, &ex, &out).unwrap();
    std::fs::remove_file(&rec).unwrap();
    wait(&mut h, "the final file", |a| at(a, 61, "run.spdlab"));
    assert!(h.state().session.error.is_none());
}
