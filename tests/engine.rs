//! End-to-end engine tests: determinism, file round trip, reduced-budget recovery.

use candle_core::Device;
use spdlab::io::spdlab_file::{self, FileExtras};
use spdlab::presets;
use spdlab::spd::trainer::Trainer;

fn trainer(preset: &str, steps: usize, seed: u64) -> Trainer {
    let mut cfg = presets::spd_config(preset).unwrap();
    cfg.steps = steps;
    cfg.seed = seed;
    let target = presets::target_model(preset, &Device::Cpu).unwrap();
    Trainer::new(target, cfg).unwrap()
}

fn params(tr: &Trainer) -> Vec<Vec<f32>> {
    let mut out = vec![];
    for m in &tr.model.modules {
        out.push(m.v.as_tensor().flatten_all().unwrap().to_vec1().unwrap());
        out.push(m.u.as_tensor().flatten_all().unwrap().to_vec1().unwrap());
        for (w, b) in &m.ci_layers {
            out.push(w.as_tensor().flatten_all().unwrap().to_vec1().unwrap());
            out.push(b.as_tensor().flatten_all().unwrap().to_vec1().unwrap());
        }
    }
    out
}

#[test]
fn same_seed_same_result() {
    let run = |seed| {
        let mut tr = trainer("tms-5-2", 30, seed);
        tr.config.faithfulness_warmup_steps = 20;
        tr.faithfulness_warmup().unwrap();
        while !tr.is_done() {
            tr.step().unwrap();
        }
        (params(&tr), tr.history.last().unwrap().losses.clone())
    };
    let (a, la) = run(3);
    let (b, lb) = run(3);
    assert_eq!(a, b, "same seed must give bit-identical parameters");
    assert_eq!(la, lb);
    let (c, _) = run(4);
    assert_ne!(a, c, "a different seed must give a different run");
}

#[test]
fn spdlab_file_round_trip_is_bit_exact() {
    let mut tr = trainer("tms-5-2", 5, 0);
    tr.config.faithfulness_warmup_steps = 3;
    tr.faithfulness_warmup().unwrap();
    while !tr.is_done() {
        tr.step().unwrap();
    }
    let extras = FileExtras {
        preset: Some("tms-5-2".into()),
        warmup_done: true,
        extra: Default::default(),
    };
    let bytes = spdlab_file::to_bytes(&tr, &extras).unwrap();
    let (tr2, ex2) = spdlab_file::from_bytes(&bytes, &Device::Cpu).unwrap();
    assert_eq!(ex2.preset.as_deref(), Some("tms-5-2"));
    assert_eq!(params(&tr), params(&tr2));
    assert_eq!(tr.step, tr2.step);
    assert_eq!(tr.history.len(), tr2.history.len());
    let bytes2 = spdlab_file::to_bytes(&tr2, &ex2).unwrap();
    assert_eq!(
        bytes, bytes2,
        "save → load → save must give identical bytes"
    );
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
    let mut a = trainer("tms-5-2", 20, 1);
    a.config.faithfulness_warmup_steps = 0;
    for _ in 0..10 {
        a.step().unwrap();
    }
    let bytes = spdlab_file::to_bytes(&a, &FileExtras::default()).unwrap();
    while !a.is_done() {
        a.step().unwrap();
    }
    let (mut b, _) = spdlab_file::from_bytes(&bytes, &Device::Cpu).unwrap();
    while !b.is_done() {
        b.step().unwrap();
    }
    assert_eq!(
        params(&a),
        params(&b),
        "resume from a save must continue the same run"
    );
}

/// Reduced-budget twin of the full TMS 5-2 recovery (the full one is `--ignored`).
#[test]
fn tms_5_2_recovers_features_reduced_budget() {
    let mut tr = trainer("tms-5-2", 1500, 0);
    tr.faithfulness_warmup().unwrap();
    while !tr.is_done() {
        tr.step().unwrap();
    }
    let mm = spdlab::metrics::mmcs_ml2r(&tr.model).unwrap();
    let l1 = &mm["linear1"];
    assert!(l1.mmcs >= 0.99, "MMCS {}", l1.mmcs);
    assert!((0.9..=1.1).contains(&l1.ml2r), "ML2R {}", l1.ml2r);
}
