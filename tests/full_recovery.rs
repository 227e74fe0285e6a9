//! Full-budget recovery checks with the reference configs (slow: run with `--ignored`,
//! preferably `cargo test --release -- --ignored`).

use candle_core::Device;
use spdlab::presets;
use spdlab::spd::trainer::Trainer;

fn train_full(preset: &str) -> spdlab::metrics::EvalReport {
    let cfg = presets::spd_config(preset).unwrap();
    let target = presets::target_model(preset, &Device::Cpu).unwrap();
    let mut tr = Trainer::new(target, cfg).unwrap();
    tr.faithfulness_warmup().unwrap();
    while !tr.is_done() {
        tr.step().unwrap();
    }
    spdlab::runner::final_eval(&mut tr).unwrap()
}

#[test]
#[ignore = "full 10k-step run"]
fn tms_5_2_full() {
    let r = train_full("tms-5-2");
    assert_eq!(r.target_solution_error.as_ref().unwrap().total, 0, "{r:?}");
    assert!(r.mmcs["linear1"] >= 0.99);
    assert!((0.95..=1.05).contains(&r.ml2r["linear1"]));
    assert!(
        (r.l0["linear1"] - 0.20).abs() <= 0.1 && (r.l0["linear2"] - 0.24).abs() <= 0.1,
        "{:?}",
        r.l0
    );
}

#[test]
#[ignore = "full 10k-step run"]
fn tms_5_2_id_full() {
    let r = train_full("tms-5-2-id");
    assert_eq!(r.target_solution_error.as_ref().unwrap().total, 0, "{r:?}");
    assert!(r.mmcs["linear1"] >= 0.99);
}

#[test]
#[ignore = "full 10k-step run"]
fn tms_40_10_full() {
    let r = train_full("tms-40-10");
    assert_eq!(r.target_solution_error.as_ref().unwrap().total, 0, "{r:?}");
    assert!(r.mmcs["linear1"] >= 0.99);
}

#[test]
#[ignore = "full 20k-step run"]
fn resid_mlp_1_full() {
    let r = train_full("resid-mlp-1");
    assert!(
        r.target_solution_error.as_ref().unwrap().total <= 5,
        "{r:?}"
    );
}
