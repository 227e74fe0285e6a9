//! kill -9 during `spdlab train`, then `--resume`: training continues from the last autosave.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn kill_9_then_resume_finishes_the_run() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run.spdlab");
    let recovery = d.path().join("run.spdlab.recovery");
    let mut child = Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .args([
            "train",
            "--preset",
            "tms-5-2",
            "--steps",
            "100000",
            "--autosave-secs",
            "1",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first autosave, then a bit more, then kill -9.
    let t0 = Instant::now();
    while !recovery.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no recovery file was written"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists(), "the run should not have finished");
    // The recovery file is complete (atomic writes) and holds a partly trained run.
    let (tr, extras) = spdlab::io::spdlab_file::load(&recovery, &candle_core::Device::Cpu).unwrap();
    assert!(extras.warmup_done);
    let saved_step = tr.step;
    assert!(saved_step > 0 && saved_step < 100_000, "step {saved_step}");
    // Shorten the remaining run: resume with a file whose total steps end soon after.
    let mut tr = tr;
    tr.config.steps = saved_step + 20;
    spdlab::io::spdlab_file::save(&tr, &extras, &recovery).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .args(["train", "--resume"])
        .arg(&recovery)
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["out"].as_str().unwrap(), out.to_str().unwrap());
    let (done, _) = spdlab::io::spdlab_file::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(done.step, saved_step + 21);
    assert!(
        !recovery.exists(),
        "the recovery file is removed after a successful save"
    );
}
