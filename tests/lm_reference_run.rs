//! A goodfire-ai/spd language-model decomposition run (made with the reference library at
//! 3f0bb61: a 2-layer LlamaSimpleMLP pretrained with its pretraining script, decomposed with
//! `lm_decomposition.py`, 12 modules, C = 16; `tests/reference/make_lm_run.py`) opens as it is,
//! and spdlab's component acts, causal importances and logits equal the reference's.

use std::path::{Path, PathBuf};

use candle_core::Device;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref-lm-run")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

fn max_diff(got: &[Vec<f32>], want: &serde_json::Value, seq: usize) -> f32 {
    let want: Vec<Vec<f32>> = serde_json::from_value(want[seq].clone()).unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0f32;
    for (a, b) in got.iter().zip(&want) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}

#[test]
fn reference_lm_run_matches_per_token() {
    let (tr, _, warnings) = spdlab::io::load_any(&dir().join("spd-run"), &Device::Cpu).unwrap();
    eprintln!("warnings: {warnings:?}");
    assert_eq!(tr.model.modules.len(), 12);
    let exp = expected();
    let tokens: Vec<Vec<u32>> = serde_json::from_value(exp["tokens"].clone()).unwrap();
    let (mut worst_ci, mut worst_acts, mut worst_logits) = (0f32, 0f32, 0f32);
    for (seq, t) in tokens.iter().enumerate() {
        let row: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let lower = spdlab::runner::ci_report(&tr.model, std::slice::from_ref(&row), false).unwrap();
        let upper = spdlab::runner::ci_report(&tr.model, std::slice::from_ref(&row), true).unwrap();
        for m in &tr.model.modules {
            let e = &exp["modules"][&m.name];
            worst_ci = worst_ci.max(max_diff(&lower.ci[&m.name], &e["ci_lower_leaky"], seq));
            worst_ci = worst_ci.max(max_diff(&upper.ci[&m.name], &e["ci_upper_leaky"], seq));
            worst_acts = worst_acts.max(max_diff(&lower.component_acts[&m.name], &e["component_acts"], seq));
        }
        worst_logits = worst_logits.max(max_diff(&lower.target_output, &exp["target_logits"], seq));
        worst_logits = worst_logits.max(max_diff(&lower.ci_masked_output, &exp["ci_masked_logits"], seq));
        worst_logits = worst_logits.max(max_diff(&lower.unmasked_output, &exp["unmasked_logits"], seq));
    }
    eprintln!("max |diff|: CI {worst_ci:e}, component acts {worst_acts:e}, logits {worst_logits:e}");
    assert!(worst_ci <= 1e-5, "CI differs by {worst_ci}");
    assert!(worst_acts <= 1e-4, "component acts differ by {worst_acts}");
    assert!(worst_logits <= 1e-4, "logits differ by {worst_logits}");
}
