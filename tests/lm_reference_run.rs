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
        let lower =
            spdlab::runner::ci_report(&tr.model, std::slice::from_ref(&row), false).unwrap();
        let upper = spdlab::runner::ci_report(&tr.model, std::slice::from_ref(&row), true).unwrap();
        for m in &tr.model.modules {
            let e = &exp["modules"][&m.name];
            worst_ci = worst_ci.max(max_diff(&lower.ci[&m.name], &e["ci_lower_leaky"], seq));
            worst_ci = worst_ci.max(max_diff(&upper.ci[&m.name], &e["ci_upper_leaky"], seq));
            worst_acts = worst_acts.max(max_diff(
                &lower.component_acts[&m.name],
                &e["component_acts"],
                seq,
            ));
        }
        worst_logits = worst_logits.max(max_diff(&lower.target_output, &exp["target_logits"], seq));
        worst_logits = worst_logits.max(max_diff(
            &lower.ci_masked_output,
            &exp["ci_masked_logits"],
            seq,
        ));
        worst_logits = worst_logits.max(max_diff(
            &lower.unmasked_output,
            &exp["unmasked_logits"],
            seq,
        ));
    }
    eprintln!(
        "max |diff|: CI {worst_ci:e}, component acts {worst_acts:e}, logits {worst_logits:e}"
    );
    assert!(worst_ci <= 1e-5, "CI differs by {worst_ci}");
    assert!(worst_acts <= 1e-4, "component acts differ by {worst_acts}");
    assert!(worst_logits <= 1e-4, "logits differ by {worst_logits}");
}

#[test]
fn ce_and_kl_equal_the_references_metric() {
    let (tr, _, _) = spdlab::io::load_any(&dir().join("spd-run"), &Device::Cpu).unwrap();
    let exp = expected();
    let tokens: Vec<Vec<u32>> = serde_json::from_value(exp["tokens"].clone()).unwrap();
    let flat: Vec<f32> = tokens.concat().iter().map(|&v| v as f32).collect();
    let x = candle_core::Tensor::from_vec(flat, (2, 32), &Device::Cpu).unwrap();
    let mut rng = spdlab::rng::Rng::new(0);
    let got = spdlab::metrics::ce_and_kl_losses(&tr.model, &x, 0.0, true, &mut rng).unwrap();
    let want = &exp["ce_and_kl_losses"];
    let keys: Vec<String> =
        serde_json::from_value(exp["ce_and_kl_losses_deterministic_keys"].clone()).unwrap();
    assert_eq!(keys.len(), 10);
    let mut worst = 0f64;
    for k in &keys {
        let (g, w) = (got[k], want[k].as_f64().unwrap());
        eprintln!("{k}: spdlab {g:.6} reference {w:.6}");
        // The rounded masks flip where a pre-sigmoid CI is within float error of 0 (one entry
        // of this run is +1.3e-6): compared loosely.
        let tol = if k.contains("rounded") { 2e-2 } else { 1e-4 };
        assert!((g - w).abs() <= tol, "{k}: {g} vs {w}");
        if !k.contains("rounded") {
            worst = worst.max((g - w).abs());
        }
    }
    eprintln!("max |diff| over the deterministic keys but rounded: {worst:e}");
    // Every key of the reference is reported.
    for k in want.as_object().unwrap().keys() {
        assert!(got.contains_key(k), "{k}");
    }
}

/// Runs the spdlab binary; (success, stdout, stderr).
fn spdlab(args: &[&std::ffi::OsStr]) -> (bool, Vec<u8>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), out.stdout, err)
}

#[test]
fn cli_ci_text_and_eval_on_a_reference_lm_run() {
    let run = dir().join("spd-run");
    let text = "On Monday, Anna went to the market.";
    let (ok, stdout, err) = spdlab(&[
        "ci".as_ref(),
        run.as_ref(),
        "--text".as_ref(),
        text.as_ref(),
        "--json".as_ref(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["ids"].clone()).unwrap();
    let n = ids.len();
    assert!(n > 5 && v["tokens"].as_array().unwrap().len() == n);
    // The CLI's CI per token equals the library's on the same tokens (padded with EOS, which
    // a causal model's earlier positions never see).
    let (tr, _, _) = spdlab::io::load_any(&run, &Device::Cpu).unwrap();
    let mut row: Vec<f32> = ids.iter().map(|&t| t as f32).collect();
    row.resize(32, 0.0);
    let rep = spdlab::runner::ci_report(&tr.model, &[row], false).unwrap();
    for m in &tr.model.modules {
        let got: Vec<Vec<f32>> = serde_json::from_value(v["ci"][&m.name].clone()).unwrap();
        assert_eq!(got.len(), n);
        for (a, b) in got.iter().zip(&rep.ci[&m.name]) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-6);
            }
        }
    }
    // eval reports the reference's CE/KL keys on the run's own test text.
    let (ok, stdout, err) = spdlab(&["eval".as_ref(), run.as_ref(), "--json".as_ref()]);
    assert!(ok, "{err}");
    assert!(!err.contains("random tokens"));
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let ce = v["ce_kl"]["ce_target"].as_f64().unwrap();
    assert!(
        ce > 0.1 && ce < 2.0,
        "target CE on the run's test text: {ce}"
    );
    assert!(v["ce_kl"]["kl_ci_masked"].as_f64().unwrap() > 0.0);
    // A toy run refuses --text, naming the file.
    let toy = dir().join("../ref-tms_5-2");
    let (ok, _, err) = spdlab(&["ci".as_ref(), toy.as_ref(), "--text".as_ref(), "x".as_ref()]);
    assert!(!ok);
    assert!(err.contains("language-model"), "{err}");
}

#[test]
fn spdlab_trains_spd_on_a_reference_language_model() {
    // The reference run's target (its pretraining checkpoint), text and tokenizer, decomposed
    // by spdlab from a config file.
    let d = tempfile::tempdir().unwrap();
    let fx = dir();
    let model: serde_json::Value = serde_json::to_value(
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(
            &std::fs::read_to_string(fx.join("target/model_config.yaml")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let mut cfg = serde_json::from_str::<serde_json::Value>(
        &spdlab::presets::config_file_json("ih").unwrap().to_string(),
    )
    .unwrap();
    cfg.as_object_mut().unwrap().remove("preset");
    cfg["target"] = serde_json::json!({"kind": "lm", "model": model, "seq_len": 32});
    cfg["target_path"] = fx
        .join("target/checkpoints/model_step_599.pt")
        .display()
        .to_string()
        .into();
    cfg["tokenizer_name"] = fx.join("tokenizer").display().to_string().into();
    cfg["task_config"]["task_name"] = "lm".into();
    cfg["task_config"]["dataset_name"] = fx.join("data").display().to_string().into();
    cfg["task_config"]["column_name"] = "story".into();
    cfg["module_info"] = serde_json::json!([
        {"module_pattern": "h.*.mlp.*", "C": 8},
        {"module_pattern": "h.*.attn.*", "C": 8}
    ]);
    cfg["ci_fn_hidden_dims"] = serde_json::json!([16]);
    cfg["batch_size"] = 8.into();
    cfg["eval_batch_size"] = 8.into();
    cfg["n_eval_steps"] = 2.into();
    cfg["faithfulness_warmup_steps"] = 20.into();
    let cf = d.path().join("lm.json");
    std::fs::write(&cf, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let out = d.path().join("lm.spdlab");
    let (ok, stdout, err) = spdlab(&[
        "train".as_ref(),
        "--config".as_ref(),
        cf.as_ref(),
        "--steps".as_ref(),
        "30".as_ref(),
        "--json".as_ref(),
        "--out".as_ref(),
        out.as_ref(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("text: ") && !err.contains("random tokens"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(v["l0"].as_object().unwrap().len(), 12);
    // The saved decomposition reopens with its text and reports CE/KL.
    let (ok, stdout, err) = spdlab(&["eval".as_ref(), out.as_ref(), "--json".as_ref()]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let ce = v["ce_kl"]["ce_target"].as_f64().unwrap();
    assert!(ce > 0.1 && ce < 2.0, "target CE on its training text: {ce}");
}
