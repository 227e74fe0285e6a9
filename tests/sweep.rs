//! `spdlab sweep` end to end with the real binary: a sweep killed with SIGKILL halfway and run
//! again finishes without recomputing a finished point and with every file intact, and equals
//! an uninterrupted sweep; the emitted Slurm job array passes `bash -n`, and running its task
//! command for every index gives the local pool's summaries; bad grids fail before anything
//! runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spdlab")
}

fn sweep(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .arg("--threads")
        .arg("1")
        .arg("sweep")
        .args(args)
        .output()
        .unwrap()
}

/// Each point's summary without the timing fields (seconds, steps/s) and the output path.
fn summaries(dir: &Path, n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let f = dir.join(format!("points/p{i:03}/summary.json"));
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("steps_per_second");
            o.remove("out");
            v
        })
        .collect()
}

const GRID: [&str; 6] = [
    "--preset",
    "tms-5-2",
    "--grid",
    "loss.ImportanceMinimalityLoss.coeff=1e-4,3e-3",
    "--grid",
    "seed=0..1",
];

#[test]
fn killed_sweep_resumes_without_recomputing_or_losing_files() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("sw");
    let dir_s = dir.to_str().unwrap();
    // Long enough points that the kill lands inside one (recovery every second).
    let mut args: Vec<&str> = GRID.to_vec();
    args.extend([
        "--steps",
        "3000",
        "--out",
        dir_s,
        "--jobs",
        "1",
        "--autosave-secs",
        "1",
    ]);
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new(bin())
            .args(["--threads", "1", "sweep"])
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    // Wait until the first point is finished and the second has a recovery file.
    let t0 = Instant::now();
    let p1 = dir.join("points/p001");
    while !(dir.join("points/p000/summary.json").exists()
        && p1.join("run.spdlab.recovery").exists())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "the sweep did not get going"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGKILL the whole process group (the pool and its point), as a crash or kill -9 would.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    child.wait().unwrap();
    assert!(
        !p1.join("summary.json").exists(),
        "the kill landed inside point 1"
    );
    let first = dir.join("points/p000");
    // Point 0's files and their modification time.
    let state = |p: &Path| {
        (
            std::fs::read(p.join("summary.json")).unwrap(),
            std::fs::read(p.join("run.spdlab")).unwrap(),
            std::fs::metadata(p.join("run.spdlab"))
                .unwrap()
                .modified()
                .unwrap(),
        )
    };
    let before = state(&first);
    // The interrupted point's recovery file is a complete, loadable run.
    spdlab::io::spdlab_file::load(&p1.join("run.spdlab.recovery"), &candle_core::Device::Cpu)
        .expect("the recovery file is intact");
    // Rerun the same command: it continues.
    let out = sweep(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = state(&first);
    assert!(
        before == after,
        "the finished point was not recomputed or rewritten"
    );
    for i in 0..4 {
        let p = dir.join(format!("points/p{i:03}"));
        assert!(p.join("summary.json").exists());
        assert!(
            !p.join("run.spdlab.recovery").exists(),
            "recovery removed when done"
        );
        spdlab::io::spdlab_file::load(&p.join("run.spdlab"), &candle_core::Device::Cpu).unwrap();
        let names: Vec<String> = std::fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains(".tmp")),
            "no temporary files left: {names:?}"
        );
    }
    // Equal to a sweep that was never interrupted (resuming is exact).
    let clean = d.path().join("clean");
    let mut args2: Vec<&str> = GRID.to_vec();
    args2.extend([
        "--steps",
        "3000",
        "--out",
        clean.to_str().unwrap(),
        "--jobs",
        "2",
    ]);
    let out = sweep(&args2);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summaries(&dir, 4), summaries(&clean, 4));
    // A rerun of a finished sweep runs nothing and reports every point.
    let out = sweep(&[dir_s, "--json"]);
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["state"]["state"] == "finished"));
    assert_eq!(rows[3]["values"]["seed"], 1);
}

#[test]
fn slurm_tasks_give_the_local_pools_summaries() {
    let d = tempfile::tempdir().unwrap();
    let pool = d.path().join("pool");
    let arr = d.path().join("array dir");
    for dir in [&pool, &arr] {
        let mut args: Vec<&str> = GRID.to_vec();
        args.extend(["--steps", "400", "--out", dir.to_str().unwrap()]);
        if dir == &pool {
            args.extend(["--jobs", "2"]);
        } else {
            args.extend(["--emit", "slurm"]);
        }
        let out = sweep(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let script: PathBuf = arr.join("slurm.sh");
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains("#SBATCH --array=0-3"));
    assert!(
        Command::new("bash")
            .arg("-n")
            .arg(&script)
            .status()
            .unwrap()
            .success()
    );
    assert!(
        !arr.join("points/p000/summary.json").exists(),
        "--emit runs nothing"
    );
    for i in 0..4 {
        let st = Command::new("bash")
            .arg(&script)
            .env("SLURM_ARRAY_TASK_ID", i.to_string())
            .env("SLURM_CPUS_PER_TASK", "1")
            .env("SPDLAB", bin())
            .status()
            .unwrap();
        assert!(st.success(), "task {i}");
    }
    assert_eq!(summaries(&pool, 4), summaries(&arr, 4));
    // Outside a job array the script refuses to guess a task.
    let out = Command::new("bash")
        .arg(&script)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn bad_grids_fail_before_running() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("sw");
    let dir_s = dir.to_str().unwrap();
    for (grid, says) in [
        (
            "loss.ImportanceMinimalityLos.coeff=1",
            "no loss ImportanceMinimalityLos",
        ),
        ("sede=0..2", "no field \"sede\""),
        ("batch_size=0", "batch_size"),
        ("seed=0..99999", "too long"),
    ] {
        let out = sweep(&["--preset", "tms-5-2", "--grid", grid, "--out", dir_s]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{grid}: {err}");
        assert!(!dir.join("points").exists(), "nothing created for {grid}");
    }
    // A folder holding another sweep is refused, not mixed.
    let out = sweep(&[
        "--preset", "tms-5-2", "--grid", "seed=0", "--steps", "20", "--out", dir_s,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sweep(&[
        "--preset", "tms-5-2", "--grid", "seed=1", "--steps", "20", "--out", dir_s,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds another sweep"));
    let out = sweep(&[dir_s, "--point", "7"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the sweep has 1 points"));
}

#[test]
fn compare_matches_runs_and_refuses_other_architectures() {
    let d = tempfile::tempdir().unwrap();
    let tms = d.path().join("tms.spdlab");
    let days = d.path().join("days.spdlab");
    std::fs::write(&tms, spdlab::assets::default_decomposition()).unwrap();
    std::fs::write(&days, spdlab::assets::decomposition("days").unwrap()).unwrap();
    let out = Command::new(bin())
        .args(["compare"])
        .arg(&tms)
        .arg(&tms)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: spdlab::compare::Comparison = serde_json::from_slice(&out.stdout).unwrap();
    for m in &c.modules {
        assert!(
            m.pairs
                .iter()
                .all(|p| p.0 == p.1 && (p.2 - 1.0).abs() < 1e-5)
        );
    }
    let out = Command::new(bin())
        .args(["compare"])
        .arg(&tms)
        .arg(&days)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("days.spdlab") && err.contains("no module linear1"),
        "{err}"
    );
}
