//! The day-of-week demonstration: a constructed target, SPD recovering its rotation
//! mechanism, and unlearning "next day" by ablating that mechanism.

use std::process::Command;

use candle_core::Device;
use spdlab::cluster::{ClusterOptions, cluster, summarize};
use spdlab::metrics::days::{DaysReport, days_report};
use spdlab::spd::trainer::Trainer;

fn train(steps: usize, seed: u64) -> Trainer {
    let dev = Device::Cpu;
    let mut cfg = spdlab::presets::spd_config("days").unwrap();
    cfg.steps = steps;
    cfg.seed = seed;
    let target = spdlab::presets::target_model("days", &dev).unwrap();
    let mut tr = Trainer::new(target, cfg).unwrap();
    tr.faithfulness_warmup().unwrap();
    while !tr.is_done() {
        tr.step().unwrap();
    }
    tr
}

fn report(tr: &mut Trainer) -> DaysReport {
    // Default options (α = 2). Measured on full runs of seeds 0-9: the mechanism is one cluster
    // on every seed but 8, where it splits in two.
    let opts = ClusterOptions::default();
    let h = cluster(tr, &opts).unwrap();
    let res = summarize(&h, &opts, h.best_k());
    days_report(&tr.model, Some(&res)).unwrap()
}

/// Checks the mechanism properties and the per-day embedding; returns the problems found
/// (empty = recovered).
fn problems(r: &DaysReport, max_plane_error: f32, min_embed_mmcs: f64) -> Vec<String> {
    let mut p = vec![];
    if r.embed_mmcs < min_embed_mmcs {
        p.push(format!("embedding MMCS {:.4}", r.embed_mmcs));
    }
    for (op, k) in &r.full_correct {
        if *k != 7 {
            p.push(format!("full decomposition answers {op}: {k}/7"));
        }
    }
    let m = &r.mechanisms[0];
    if m.clusters.len() != 1 {
        p.push(format!("mechanism spans clusters {:?}", m.clusters));
    }
    if m.mechanism_min_ci_on_op < 0.9 {
        p.push(format!("mechanism CI on next {}", m.mechanism_min_ci_on_op));
    }
    if m.mechanism_max_ci_on_same > 0.1 {
        p.push(format!(
            "mechanism CI on same {}",
            m.mechanism_max_ci_on_same
        ));
    }
    if m.plane_map_rel_error > max_plane_error {
        p.push(format!("plane map error {}", m.plane_map_rel_error));
    }
    let same = &m.ablated_answers[0];
    let next = &m.ablated_answers[1];
    if same.1 != 7 || next.1 != 0 || next.2 != 7 {
        p.push(format!("ablation answers {:?}", m.ablated_answers));
    }
    p
}

/// Reduced budget (4k of 10k steps): the embedding already has one subcomponent per day, and
/// the rotation is one mechanism that fires on every "next" input and never on "same",
/// composes to R − I (measured 7.6% here, 2.5% at the full budget), and ablating it unlearns
/// "next day".
#[test]
fn reduced_run_recovers_the_rotation_mechanism() {
    let mut tr = train(4000, 0);
    let r = report(&mut tr);
    let p = problems(&r, 0.10, 0.99);
    assert!(p.is_empty(), "{p:?}\n{r:#?}");
}

/// Full budget, default seed and five more: the default seed and at least 4 of the other 5
/// recover the mechanism and one embedding subcomponent per day (MMCS ≥ 0.99).
#[test]
#[ignore = "full-budget SPD runs (about 1 min each in release)"]
fn full_runs_recover_the_rotation_mechanism_across_seeds() {
    let mut ok = 0;
    let mut default_ok = false;
    for seed in 0..6 {
        let steps = spdlab::presets::spd_config("days").unwrap().steps;
        let mut tr = train(steps, seed);
        let r = report(&mut tr);
        let p = problems(&r, 0.05, 0.99);
        eprintln!(
            "seed {seed}: {} | embed MMCS {:.4}",
            if p.is_empty() {
                "recovered".into()
            } else {
                format!("{p:?}")
            },
            r.embed_mmcs
        );
        ok += p.is_empty() as usize;
        default_ok |= seed == 0 && p.is_empty();
    }
    assert!(default_ok, "the default seed did not recover the mechanism");
    assert!(ok >= 5, "{ok}/6 seeds recovered the mechanism");
}

/// The shipped decomposition meets the full criteria, and `spdlab ablate` shows the
/// unlearning: with the mechanism's cluster ablated every "next" answer becomes the same day.
#[test]
fn shipped_decomposition_and_ablate_cli_unlearn_next_day() {
    let (tr, extras) = spdlab::io::spdlab_file::from_bytes(
        spdlab::assets::decomposition("days").unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let clusters = spdlab::interventions::stored_clusters(&extras.extra)
        .unwrap()
        .expect("the shipped days decomposition carries its clustering");
    let r = days_report(&tr.model, Some(&clusters)).unwrap();
    let p = problems(&r, 0.05, 0.99);
    assert!(p.is_empty(), "{p:?}\n{r:#?}");
    let id = r.mechanisms[0].clusters[0];

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("days.spdlab");
    std::fs::write(&file, spdlab::assets::decomposition("days").unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .args(["ablate", file.to_str().unwrap()])
        .args(["--select", &format!("cluster:{id}"), "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let per = v["result"]["per_feature"].as_array().unwrap();
    let acc = |name: &str| {
        let f = per.iter().find(|f| f["name"] == name).unwrap();
        (
            f["baseline"].as_f64().unwrap(),
            f["intervened"].as_f64().unwrap(),
        )
    };
    assert_eq!(acc("op same"), (1.0, 1.0));
    assert_eq!(acc("op next"), (1.0, 0.0));
    // Every "next" answer is the input's own day.
    let inputs = v["result"]["inputs"].as_array().unwrap();
    let outs = v["result"]["intervened"].as_array().unwrap();
    for (x, o) in inputs.iter().zip(outs) {
        let x: Vec<f64> = serde_json::from_value(x.clone()).unwrap();
        let o: Vec<f64> = serde_json::from_value(o.clone()).unwrap();
        let day = x[..7].iter().position(|&v| v == 1.0).unwrap();
        let ans = (0..7).max_by(|&a, &b| o[a].total_cmp(&o[b])).unwrap();
        assert_eq!(ans, day, "{x:?} -> {o:?}");
    }
    // The text report names the mechanism.
    let out = Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .args(["days", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("operation 'next'"), "{text}");
    assert!(
        text.contains("next 0/7 correct (7 answered as same day)"),
        "{text}"
    );
}

/// Per-module CI-function types (an spdlab extension) are built, saved and loaded per module.
#[test]
fn per_module_ci_function_types_round_trip() {
    use spdlab::spd::config::{CiFnOverride, CiFnType};
    let dev = Device::Cpu;
    let mut cfg = spdlab::presets::spd_config("days").unwrap();
    cfg.ci_fn_type = CiFnType::VectorMlp;
    cfg.ci_fn_type_overrides = vec![CiFnOverride {
        module_pattern: "embed".into(),
        ci_fn_type: CiFnType::Mlp,
    }];
    cfg.steps = 3;
    let target = spdlab::presets::target_model("days", &dev).unwrap();
    let mut tr = Trainer::new(target, cfg).unwrap();
    tr.step().unwrap();
    let types: Vec<CiFnType> = tr.model.modules.iter().map(|m| m.ci_fn_type).collect();
    assert_eq!(
        types,
        [CiFnType::Mlp, CiFnType::VectorMlp, CiFnType::VectorMlp]
    );
    let extras = spdlab::io::spdlab_file::FileExtras::default();
    let bytes = spdlab::io::spdlab_file::to_bytes(&tr, &extras).unwrap();
    let (back, _) = spdlab::io::spdlab_file::from_bytes(&bytes, &dev).unwrap();
    let again = spdlab::io::spdlab_file::to_bytes(&back, &extras).unwrap();
    assert_eq!(bytes, again, "save -> load -> save is bit-exact");
    let x = spdlab::inputs::probe_inputs(&back.model.target.spec, 1.0);
    let xt = candle_core::Tensor::new(x, &dev).unwrap();
    let a = spdlab::interventions::lower_ci(&tr.model, &xt).unwrap();
    let b = spdlab::interventions::lower_ci(&back.model, &xt).unwrap();
    for (p, q) in a.iter().zip(&b) {
        assert_eq!(p.to_vec2::<f32>().unwrap(), q.to_vec2::<f32>().unwrap());
    }
}

/// A report piped into a reader that has gone (`spdlab days FILE | head -0`) ends quietly,
/// the way command-line tools do (SIGPIPE), instead of panicking in println!.
#[cfg(unix)]
#[test]
fn closed_stdout_pipe_does_not_panic() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("days.spdlab");
    std::fs::write(&file, spdlab::assets::decomposition("days").unwrap()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .args(["days", file.to_str().unwrap(), "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the report (written after loading and analysing) arrives.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc_sigpipe()),
        "{:?} {stderr}",
        out.status
    );
}

#[cfg(unix)]
fn libc_sigpipe() -> i32 {
    13 // SIGPIPE on Linux and the BSDs
}
