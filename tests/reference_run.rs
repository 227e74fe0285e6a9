//! The shared reference run of goodfire-ai/spd (TMS 5-2): spdlab must reproduce the
//! reference's causal importances and outputs on its 10 fixed inputs within 1e-5.

use std::path::Path;

use candle_core::Device;
use serde_json::Value;

const RUN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ref-tms_5-2");

fn reference() -> Value {
    let text = std::fs::read_to_string(Path::new(RUN).join("ci_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn mat(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn assert_close(name: &str, a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) {
    assert_eq!(a.len(), b.len(), "{name}: row count");
    let mut worst = 0f32;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len(), "{name}: row length");
        for (x, y) in ra.iter().zip(rb) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= tol, "{name}: max abs difference {worst} > {tol}");
}

#[test]
fn ci_matches_reference_within_1e5() {
    let r = reference();
    let (tr, _, warnings) = spdlab::io::load_any(Path::new(RUN), &Device::Cpu).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let inputs = mat(&r["inputs"]);
    let lower = spdlab::runner::ci_report(&tr.model, &inputs, false).unwrap();
    let upper = spdlab::runner::ci_report(&tr.model, &inputs, true).unwrap();
    for m in ["linear1", "linear2"] {
        assert_close(
            &format!("{m} component_acts"),
            &lower.component_acts[m],
            &mat(&r["component_acts"][m]),
            1e-5,
        );
        assert_close(
            &format!("{m} pre_sigmoid"),
            &lower.pre_sigmoid[m],
            &mat(&r["ci_pre_sigmoid"][m]),
            1e-5,
        );
        assert_close(
            &format!("{m} lower"),
            &lower.ci[m],
            &mat(&r["ci_lower_leaky"][m]),
            1e-5,
        );
        assert_close(
            &format!("{m} upper"),
            &upper.ci[m],
            &mat(&r["ci_upper_leaky"][m]),
            1e-5,
        );
    }
    assert_close(
        "target output",
        &lower.target_output,
        &mat(&r["target_output"]),
        1e-5,
    );
    assert_close(
        "unmasked output",
        &lower.unmasked_output,
        &mat(&r["component_model_unmasked_output"]),
        1e-5,
    );
    assert_close(
        "ci-masked output",
        &lower.ci_masked_output,
        &mat(&r["component_model_ci_masked_output"]),
        1e-5,
    );
}

#[test]
fn eval_of_reference_run_matches_its_final_eval() {
    let (mut tr, _, _) = spdlab::io::load_any(Path::new(RUN), &Device::Cpu).unwrap();
    let rep = spdlab::metrics::evaluate(&mut tr, 5, 4096).unwrap();
    // Reference final eval: target_solution_error total 0, L0 0.1967 / 0.2415.
    let tse = rep.target_solution_error.unwrap();
    assert_eq!(tse.total, 0);
    assert_eq!(tse.total_0p2, 0);
    assert!((rep.l0["linear1"] - 0.1967).abs() < 0.02, "{:?}", rep.l0);
    assert!((rep.l0["linear2"] - 0.2415).abs() < 0.02, "{:?}", rep.l0);
    assert!(rep.mmcs["linear1"] > 0.999);
}
