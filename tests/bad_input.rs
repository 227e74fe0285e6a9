//! Bad input never panics or hangs: the CLI exits non-zero with one clear line naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{RUN, copy_run};

fn spdlab(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `eval` on `path` and checks the failure mode.
fn expect_clean_error(path: &Path, must_contain: &str) -> String {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    expect_clean_error_naming(path, &name, must_contain)
}

/// As [`expect_clean_error`], where the file at fault is `culprit` (e.g. a companion file).
fn expect_clean_error_naming(path: &Path, culprit: &str, must_contain: &str) -> String {
    let (code, _, err) = spdlab(&["eval", path.to_str().unwrap()]);
    assert_ne!(code, 0, "expected failure for {}", path.display());
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(!err.contains("stack backtrace"), "backtrace: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(
        err.contains(culprit),
        "message does not name {culprit}: {err}"
    );
    assert!(
        err.to_lowercase().contains(&must_contain.to_lowercase()),
        "expected '{must_contain}' in: {err}"
    );
    err
}

fn good_spdlab(dir: &Path) -> PathBuf {
    let p = dir.join("good.spdlab");
    let (code, _, err) = spdlab(&["import", RUN, "--out", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    p
}

#[test]
fn truncated_and_corrupt_spdlab_files() {
    let d = tempfile::tempdir().unwrap();
    let good = good_spdlab(d.path());
    let bytes = std::fs::read(&good).unwrap();
    let t = d.path().join("truncated.spdlab");
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    expect_clean_error(&t, "truncated.spdlab");
    let c = d.path().join("corrupt.spdlab");
    std::fs::write(&c, b"\x07\x00\x00\x00\x00\x00\x00\x00garbage!").unwrap();
    expect_clean_error(&c, "safetensors");
    let h = d.path().join("huge-header.spdlab");
    let mut hb = (u64::MAX / 2).to_le_bytes().to_vec();
    hb.extend_from_slice(b"{}");
    std::fs::write(&h, hb).unwrap();
    expect_clean_error(&h, "safetensors");
    let e = d.path().join("empty.spdlab");
    std::fs::write(&e, b"").unwrap();
    expect_clean_error(&e, "empty.spdlab");
}

#[test]
fn nan_weights_are_refused_with_the_tensor_name() {
    let d = tempfile::tempdir().unwrap();
    let good = good_spdlab(d.path());
    let mut bytes = std::fs::read(&good).unwrap();
    // Overwrite the first value of components.linear1.V with NaN.
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
    let off = header["components.linear1.V"]["data_offsets"][0]
        .as_u64()
        .unwrap() as usize;
    bytes[8 + hlen + off..8 + hlen + off + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let p = d.path().join("nan.spdlab");
    std::fs::write(&p, bytes).unwrap();
    let err = expect_clean_error(&p, "non-finite");
    assert!(err.contains("components.linear1.V"), "{err}");
}

#[test]
fn truncated_checkpoint_and_non_torch_zip() {
    let d = tempfile::tempdir().unwrap();
    let run = copy_run(d.path());
    let ck = run.join("model_10000.pth");
    let bytes = std::fs::read(&ck).unwrap();
    std::fs::write(&ck, &bytes[..bytes.len() * 2 / 3]).unwrap();
    expect_clean_error(&ck, "model_10000.pth");
    // A zip that is not a torch checkpoint.
    let z = run.join("model_10000.pth");
    {
        let f = std::fs::File::create(&z).unwrap();
        let mut w = zip::ZipWriter::new(f);
        w.start_file(
            "hello.txt",
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        std::io::Write::write_all(&mut w, b"not a checkpoint").unwrap();
        w.finish().unwrap();
    }
    expect_clean_error(&z, "data.pkl");
}

#[test]
fn config_problems_in_reference_runs() {
    let d = tempfile::tempdir().unwrap();
    // Wrong shapes between config and tensors.
    let run = copy_run(d.path());
    let cfgp = run.join("final_config.yaml");
    let cfg = std::fs::read_to_string(&cfgp).unwrap();
    std::fs::write(&cfgp, cfg.replacen("C: 20", "C: 10", 1)).unwrap();
    expect_clean_error(&run.join("model_10000.pth"), "shape");
    // Unknown ci_fn_type.
    std::fs::write(
        &cfgp,
        cfg.replace("ci_fn_type: mlp", "ci_fn_type: transformer"),
    )
    .unwrap();
    expect_clean_error_naming(
        &run.join("model_10000.pth"),
        "final_config.yaml",
        "transformer",
    );
    // Unknown sigmoid_type.
    std::fs::write(
        &cfgp,
        cfg.replace("sigmoid_type: leaky_hard", "sigmoid_type: wobbly"),
    )
    .unwrap();
    expect_clean_error_naming(&run.join("model_10000.pth"), "final_config.yaml", "wobbly");
    // Missing companion file.
    std::fs::remove_file(&cfgp).unwrap();
    expect_clean_error_naming(
        &run.join("model_10000.pth"),
        "final_config.yaml",
        "missing companion file",
    );
    // Empty folder.
    let empty = d.path().join("empty-run");
    std::fs::create_dir(&empty).unwrap();
    expect_clean_error(&empty, "no model_<step>.pth");
}

#[test]
fn missing_file_and_bad_inputs_json() {
    let d = tempfile::tempdir().unwrap();
    expect_clean_error(&d.path().join("nope.spdlab"), "nope.spdlab");
    let inp = d.path().join("inputs.json");
    std::fs::write(&inp, r#"{"inputs": [[1, 2]]}"#).unwrap();
    let (code, _, err) = spdlab(&["ci", RUN, "--inputs", inp.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("inputs.json") && err.contains("5 features"),
        "{err}"
    );
}

#[test]
fn unknown_preset_is_a_clean_error() {
    let (code, _, err) = spdlab(&["train", "--preset", "nope"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown preset 'nope'") && err.contains("tms-5-2"),
        "{err}"
    );
}
