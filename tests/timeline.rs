//! Timeline frames: a frame at step s equals a checkpoint saved at step s; the bound thins
//! frames evenly and keeps the first and the last; frames survive the file.

use candle_core::Device;
use spdlab::io::spdlab_file::{self, FileExtras};
use spdlab::spd::trainer::Trainer;
use spdlab::timeline::{TimelineOptions, frame_trainer};

fn trainer(preset: &str, steps: usize) -> Trainer {
    let dev = Device::Cpu;
    let target = spdlab::presets::target_model(preset, &dev).unwrap();
    let mut cfg = spdlab::presets::spd_config(preset).unwrap();
    cfg.steps = steps;
    cfg.batch_size = cfg.batch_size.min(256);
    Trainer::new(target, cfg).unwrap()
}

fn extras() -> FileExtras {
    FileExtras {
        preset: None,
        warmup_done: false,
        extra: Default::default(),
    }
}

/// Every parameter of a trainer's decomposition, by name.
fn params(tr: &Trainer) -> Vec<(String, Vec<f32>)> {
    spdlab::timeline::decomposition_params(&tr.model)
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// Largest difference between two decompositions' parameters, absolute and relative to
/// max(1, |value|).
fn max_diff(a: &Trainer, b: &Trainer) -> (f32, f32) {
    let (pa, pb) = (params(a), params(b));
    assert_eq!(pa.len(), pb.len());
    let (mut abs, mut rel) = (0f32, 0f32);
    for ((ka, va), (kb, vb)) in pa.iter().zip(&pb) {
        assert_eq!(ka, kb);
        assert_eq!(va.len(), vb.len(), "{ka}");
        for (x, y) in va.iter().zip(vb) {
            abs = abs.max((x - y).abs());
            rel = rel.max((x - y).abs() / y.abs().max(1.0));
        }
    }
    (abs, rel)
}

/// Trains `tr` to the end (warm-up first), as `spdlab train` does.
fn train(tr: &mut Trainer) {
    let mut ex = extras();
    spdlab::runner::run_training(
        tr,
        &mut ex,
        &spdlab::runner::RunOptions { autosave: None },
        |_, _| {},
    )
    .unwrap();
}

/// A checkpoint of a second, identical run saved at step `s` (through a file).
fn checkpoint_at(preset: &str, steps: usize, s: usize, dir: &std::path::Path) -> Trainer {
    let mut tr = trainer(preset, steps);
    let mut ex = extras();
    tr.faithfulness_warmup().unwrap();
    ex.warmup_done = true;
    while tr.step < s {
        tr.step().unwrap();
    }
    let p = dir.join(format!("ckpt-{s}.spdlab"));
    spdlab_file::save(&tr, &ex, &p).unwrap();
    spdlab_file::load(&p, &Device::Cpu).unwrap().0
}

fn frames_equal_checkpoints(f16: bool, tol_rel: f32) {
    let d = tempfile::tempdir().unwrap();
    let steps = 300;
    let mut tr = trainer("tms-5-2", steps);
    tr.set_timeline(TimelineOptions {
        max_frames: 40,
        f16,
        cap_bytes: 1 << 30,
    });
    train(&mut tr);
    // Through the file, as a researcher opens it.
    let p = d.path().join("run.spdlab");
    spdlab_file::save(&tr, &extras(), &p).unwrap();
    let (run, _) = spdlab_file::load(&p, &Device::Cpu).unwrap();
    let tl = run.timeline.as_ref().expect("the file keeps its timeline");
    let steps_kept: Vec<usize> = tl.frames.iter().map(|f| f.step).collect();
    assert_eq!(steps_kept[0], 0);
    assert_eq!(*steps_kept.last().unwrap(), steps + 1, "the finished run");
    assert!(
        steps_kept.len() <= 40 && steps_kept.len() >= 20,
        "{steps_kept:?}"
    );
    // The last frame is the final decomposition.
    let last = frame_trainer(&run, tl, tl.frames.last().unwrap()).unwrap();
    let (abs, rel) = max_diff(&last, &run);
    assert!(rel <= tol_rel, "last frame vs final: abs {abs} rel {rel}");
    for &s in [
        steps_kept[0],
        steps_kept[1],
        steps_kept[steps_kept.len() / 2],
    ]
    .iter()
    {
        let ck = checkpoint_at("tms-5-2", steps, s, d.path());
        let fr = frame_trainer(&run, tl, tl.frame_at(s).unwrap()).unwrap();
        assert_eq!(fr.step, s);
        let (abs, rel) = max_diff(&fr, &ck);
        assert!(
            rel <= tol_rel,
            "frame at step {s} vs checkpoint at step {s}: abs {abs} rel {rel}"
        );
        if !f16 {
            assert!(abs <= 1e-6, "f32 frame at step {s}: {abs}");
        }
    }
}

#[test]
fn f32_frame_equals_checkpoint_at_its_step() {
    frames_equal_checkpoints(false, 1e-6);
}

#[test]
fn f16_frame_equals_checkpoint_within_1e_3() {
    frames_equal_checkpoints(true, 1e-3);
}

#[test]
fn thinning_keeps_first_last_and_an_even_spread() {
    let mut tr = trainer("tms-5-2", 1000);
    // Spaced for 1000 steps, then the run turns out longer: thinning keeps the bound.
    tr.set_timeline(TimelineOptions {
        max_frames: 12,
        f16: true,
        cap_bytes: 1 << 30,
    });
    tr.config.steps = 4000;
    tr.faithfulness_warmup().unwrap();
    while !tr.is_done() {
        tr.step().unwrap();
        let tl = tr.timeline.as_ref().unwrap();
        assert!(tl.frames.len() <= 12, "{} frames", tl.frames.len());
    }
    let tl = tr.timeline.as_ref().unwrap();
    let steps: Vec<usize> = tl.frames.iter().map(|f| f.step).collect();
    assert_eq!(steps[0], 0);
    assert_eq!(*steps.last().unwrap(), 4001);
    let inner = &steps[..steps.len() - 1];
    let gaps: Vec<usize> = inner.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|&g| g == tl.every),
        "{steps:?} every {}",
        tl.every
    );
    assert!(steps.len() >= 6, "{steps:?}");
    // The stats are those of the frame's decomposition on the fixed batch.
    let fr = frame_trainer(&tr, tl, &tl.frames[steps.len() / 2]).unwrap();
    let st = spdlab::timeline::frame_stats(&fr).unwrap();
    let kept = &tl.frames[steps.len() / 2].stats;
    for (a, b) in st.iter().zip(kept.iter()) {
        for (x, y) in a.mean_ci.iter().zip(&b.mean_ci) {
            assert!((x - y).abs() < 2e-3, "mean CI {x} vs {y}");
        }
    }
}

#[test]
fn size_cap_bounds_the_frames() {
    let mut tr = trainer("tms-5-2", 200);
    tr.set_timeline(TimelineOptions {
        max_frames: 300,
        f16: false,
        cap_bytes: 1 << 30,
    });
    let per = tr.timeline.as_ref().unwrap().frame_bytes();
    let cap = 10 * per + per / 2;
    tr.set_timeline(TimelineOptions {
        max_frames: 300,
        f16: false,
        cap_bytes: cap,
    });
    train(&mut tr);
    let tl = tr.timeline.as_ref().unwrap();
    assert!(tl.bytes() <= cap, "{} bytes, cap {cap}", tl.bytes());
    assert!(tl.frames.len() >= 6, "{}", tl.frames.len());
    assert_eq!(tl.frames.last().unwrap().step, 201);
}

#[test]
fn a_corrupt_timeline_is_refused_naming_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let mut tr = trainer("tms-5-2", 20);
    tr.set_timeline(TimelineOptions::default());
    train(&mut tr);
    let p = d.path().join("run.spdlab");
    spdlab_file::save(&tr, &extras(), &p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    // Claim one more frame than the file holds.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let steps = tr.timeline.as_ref().unwrap().frames.len();
    let bad = header.replace("\\\"steps\\\":[0,", "\\\"steps\\\":[0,1,");
    assert_ne!(bad, header, "{steps} frames");
    let mut out = (bad.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(bad.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    let p2 = d.path().join("bad.spdlab");
    std::fs::write(&p2, out).unwrap();
    let e = match spdlab_file::load(&p2, &Device::Cpu) {
        Ok(_) => panic!("a corrupt timeline loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("bad.spdlab") && e.contains("timeline"), "{e}");
}

#[test]
fn a_reference_run_has_one_frame_per_checkpoint() {
    // goodfire-ai/spd at 3f0bb61, tms 5-2, 600 steps, save_freq 200.
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref-tms-timeline");
    let dev = Device::Cpu;
    let (run, _, warnings) = spdlab::io::load_any(&dir, &dev).unwrap();
    assert!(
        warnings.iter().all(|w| !w.contains("timeline")),
        "{warnings:?}"
    );
    let tl = run
        .timeline
        .as_ref()
        .expect("three checkpoints make a timeline");
    let steps: Vec<usize> = tl.frames.iter().map(|f| f.step).collect();
    assert_eq!(steps, vec![200, 400, 600]);
    // The newest frame is the run as loaded; an older frame is that checkpoint exactly.
    let last = frame_trainer(&run, tl, &tl.frames[2]).unwrap();
    assert_eq!(max_diff(&last, &run).0, 0.0);
    let (old, _, _) = spdlab::io::load_any(&dir.join("model_200.pth"), &dev).unwrap();
    let first = frame_trainer(&run, tl, &tl.frames[0]).unwrap();
    assert_eq!(max_diff(&first, &old).0, 0.0);
    assert!(max_diff(&first, &run).0 > 1e-3, "the checkpoints differ");
    // Statistics per frame: norms of the frame's subcomponents.
    let st = spdlab::timeline::frame_stats(&old).unwrap();
    assert_eq!(st[0].norm, tl.frames[0].stats[0].norm);
}
