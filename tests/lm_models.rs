//! The reference's language-model families (LlamaSimpleMLP, LlamaSimple, GPT2Simple) against
//! logits computed by goodfire-ai/spd at 3f0bb61 (`tests/reference/make_lm_fixtures.py`: tiny
//! configs, random weights with every norm weight and bias exercised, grouped-query attention
//! for the Llama families).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use spdlab::model::lm;

fn fixture(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ref-lm")
        .join(family)
}

/// A folder holding only the gpt2_simple fixture's weights (the test writes the config).
fn gpt2_weights_alone() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("gpt2_simple").join("model.safetensors"),
        d.path().join("model.safetensors"),
    )
    .unwrap();
    d
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Largest |logit − reference logit| of `model` on the fixture's tokens.
fn max_logit_diff(model: &lm::LmModel, dir: &Path) -> f32 {
    let tokens: Vec<Vec<u32>> =
        serde_json::from_value(json(&dir.join("tokens.json"))["tokens"].clone()).unwrap();
    let want: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(json(&dir.join("logits.json"))["logits"].clone()).unwrap();
    let (b, s) = (tokens.len(), tokens[0].len());
    let ids = Tensor::from_vec(tokens.concat(), (b, s), &Device::Cpu).unwrap();
    let got = model.forward(&ids).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for i in 0..b {
        for p in 0..s {
            for (x, y) in got[i * s + p].iter().zip(&want[i][p]) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    worst
}

fn check_family(family: &str) {
    let dir = fixture(family);
    // The reference's pretraining layout: a run folder (newest checkpoint) or the checkpoint.
    for path in [dir.join("run"), dir.join("run/checkpoints/model_step_0.pt")] {
        let m = lm::load(&path, &Device::Cpu).unwrap();
        let d = max_logit_diff(&m, &dir);
        eprintln!("{family}: max logit diff {d:e}");
        assert!(
            d < 1e-4,
            "{family} ({}): logits differ by {d}",
            path.display()
        );
    }
    // safetensors with config.json beside it.
    let m = lm::load(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(max_logit_diff(&m, &dir) < 1e-4);
}

#[test]
fn llama_simple_mlp_matches_the_reference() {
    check_family("llama_simple_mlp");
}

#[test]
fn llama_simple_matches_the_reference() {
    check_family("llama_simple");
}

#[test]
fn gpt2_simple_matches_the_reference() {
    check_family("gpt2_simple");
}

#[test]
fn decomposable_linears_are_the_references_modules() {
    let m = lm::load(&fixture("llama_simple").join("run"), &Device::Cpu).unwrap();
    let names: Vec<String> = m.config.linear_modules().into_iter().map(|l| l.0).collect();
    assert_eq!(
        names[..7],
        [
            "h.0.attn.q_proj",
            "h.0.attn.k_proj",
            "h.0.attn.v_proj",
            "h.0.attn.o_proj",
            "h.0.mlp.gate_proj",
            "h.0.mlp.up_proj",
            "h.0.mlp.down_proj"
        ]
    );
    assert_eq!(names.len(), 14);
    // A hook that returns each linear's own output changes nothing; one that zeroes the MLP's
    // output of block 1 changes the logits.
    let ids = Tensor::from_vec((0u32..16).collect::<Vec<_>>(), (1, 16), &Device::Cpu).unwrap();
    let base = m.forward(&ids).unwrap();
    let same = m
        .forward_hooked(&ids, &mut |i, x| m.linear(i, x).map(Some), None)
        .unwrap();
    assert_eq!(
        base.to_vec2::<f32>().unwrap(),
        same.to_vec2::<f32>().unwrap()
    );
    let cut = m
        .forward_hooked(
            &ids,
            &mut |i, x| {
                if i == 13 {
                    Ok(Some(m.linear(i, x)?.zeros_like()?))
                } else {
                    Ok(None)
                }
            },
            None,
        )
        .unwrap();
    let d = (cut - base)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d > 1e-3);
}

#[test]
fn bad_checkpoints_say_what_is_wrong() {
    let d = gpt2_weights_alone();
    // A config that disagrees with the tensors.
    std::fs::write(
        d.path().join("config.json"),
        r#"{"model_type": "GPT2Simple", "block_size": 16, "vocab_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 48}"#,
    )
    .unwrap();
    let e = lm::load(&d.path().join("model.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("wte.weight") && e.contains("shape"),
        "{e}"
    );
    // An unknown field or family.
    std::fs::write(d.path().join("config.json"), r#"{"model_type": "Mamba"}"#).unwrap();
    let e = lm::load(&d.path().join("model.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("config.json") && e.contains("Mamba"), "{e}");
    // No config at all.
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = lm::load(&d.path().join("model.safetensors"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model_config.yaml"), "{e}");
}

/// The llama_simple_mlp fixture as an SPD target over 16-token sequences.
fn lm_target() -> spdlab::model::TargetModel {
    let dir = fixture("llama_simple_mlp");
    let m = lm::load(&dir.join("run"), &Device::Cpu).unwrap();
    let named: Vec<(String, Tensor)> =
        spdlab::io::pth::read_pth(&dir.join("run/checkpoints/model_step_0.pt"))
            .unwrap()
            .into_iter()
            .map(|t| {
                (
                    t.name,
                    Tensor::from_vec(t.data, t.shape, &Device::Cpu).unwrap(),
                )
            })
            .collect();
    spdlab::model::TargetModel::new(
        spdlab::model::TargetSpec::Lm {
            model: m.config.clone(),
            seq_len: 16,
        },
        named,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn spd_trains_on_a_language_model() {
    use spdlab::spd::config::{CiFnType, ModuleInfo, OutputLossType};
    let target = lm_target();
    // The target inside spdlab gives the reference's logits.
    let dir = fixture("llama_simple_mlp");
    let tokens: Vec<Vec<u32>> =
        serde_json::from_value(json(&dir.join("tokens.json"))["tokens"].clone()).unwrap();
    let x: Vec<f32> = tokens.concat().iter().map(|&t| t as f32).collect();
    let xt = Tensor::from_vec(x, (2, 16), &Device::Cpu).unwrap();
    let got = target.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
    let want: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(json(&dir.join("logits.json"))["logits"].clone()).unwrap();
    for p in 0..16 {
        for (a, b) in got[16 + p].iter().zip(&want[1][p]) {
            assert!((a - b).abs() < 1e-4);
        }
    }
    // An SPD run of every attention and MLP linear, KL output loss.
    let mut cfg = spdlab::presets::spd_config("ih").unwrap();
    cfg.module_info = vec![
        ModuleInfo {
            module_pattern: "h.*.attn.*".into(),
            c: 8,
        },
        ModuleInfo {
            module_pattern: "h.*.mlp.*".into(),
            c: 8,
        },
    ];
    cfg.ci_fn_type = CiFnType::VectorMlp;
    cfg.ci_fn_hidden_dims = vec![16];
    cfg.output_loss_type = OutputLossType::Kl;
    cfg.batch_size = 8;
    cfg.eval_batch_size = 8;
    cfg.steps = 30;
    cfg.faithfulness_warmup_steps = 20;
    let mut tr = spdlab::spd::trainer::Trainer::new(target, cfg).unwrap();
    assert_eq!(tr.model.modules.len(), 12);
    assert_eq!(tr.model.modules[0].name, "h.0.attn.q_proj");
    tr.faithfulness_warmup().unwrap();
    let first = tr.step().unwrap().losses["total"];
    let mut last = first;
    while !tr.is_done() {
        last = tr.step().unwrap().losses["total"];
        assert!(last.is_finite());
    }
    assert!(last < first, "total loss {first} -> {last}");
    // CI per position: one row per token.
    let rep = spdlab::runner::ci_report(
        &tr.model,
        &[tokens[0].iter().map(|&t| t as f32).collect()],
        false,
    )
    .unwrap();
    assert_eq!(rep.ci["h.1.mlp.down_proj"].len(), 16);
    assert_eq!(rep.kl_ci_masked.len(), 16);
}

#[test]
fn hostile_language_model_sizes_are_refused_before_allocating() {
    let d = gpt2_weights_alone();
    let src = fixture("gpt2_simple");
    for (cfg, want) in [
        (
            r#"{"model_type": "GPT2Simple", "vocab_size": 4000000000, "n_embd": 32, "n_head": 4, "n_layer": 2, "block_size": 16}"#,
            "vocab_size",
        ),
        (
            r#"{"model_type": "GPT2Simple", "vocab_size": 64, "n_embd": 32, "n_head": 4, "n_layer": 100000, "block_size": 16}"#,
            "n_layer",
        ),
        (
            r#"{"model_type": "LlamaSimpleMLP", "vocab_size": 64, "n_embd": 32, "n_head": 4, "n_layer": 2, "n_key_value_heads": 3}"#,
            "n_key_value_heads",
        ),
        (
            r#"{"model_type": "GPT2Simple", "vocab_size": 64, "n_embd": 30, "n_head": 4, "n_layer": 2}"#,
            "multiple",
        ),
    ] {
        std::fs::write(d.path().join("config.json"), cfg).unwrap();
        let e = lm::load(&d.path().join("model.safetensors"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json") && e.contains(want), "{want}: {e}");
    }
    // A sequence length whose attention scores would not fit is refused as a spec.
    let m = lm::load(&src.join("run"), &Device::Cpu).unwrap();
    let mut cfg = m.config.clone();
    cfg.block_size = 1 << 20;
    let spec = spdlab::model::TargetSpec::Lm {
        model: cfg,
        seq_len: 1 << 20,
    };
    let e = spec.check_limits().unwrap_err().to_string();
    assert!(e.contains("seq_len"), "{e}");
}
