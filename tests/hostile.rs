//! Hostile and careless input, part 2: sizes from files, configs and flags are bounded; output
//! paths cannot destroy anything; surprises are errors. The corpus is generated here. Every
//! case asserts a non-zero exit with one line naming the file (or flag) and the problem, no
//! abort or hang (each run has a time limit), and no input changed or lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

mod common;
use common::{RUN, copy_run};
const LIMIT: Duration = Duration::from_secs(60);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs spdlab with a time limit (killed and failed past it).
fn spdlab(args: &[&str]) -> Out {
    spdlab_in(args, None)
}

fn spdlab_in(args: &[&str], cwd: Option<&Path>) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spdlab"));
    cmd.args(args)
        .env("RUST_BACKTRACE", "1")
        .env("SPDLAB_MAX_MEMORY_MB", "8000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("spdlab {args:?} ran past {LIMIT:?} (hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A clean failure: non-zero exit, no panic or abort, one error line containing every `want`.
fn fails(o: &Out, want: &[&str]) -> String {
    assert_ne!(o.code, 0, "expected failure; stderr: {}", o.stderr);
    assert!(
        !o.stderr.contains("panicked") && !o.stderr.contains("memory allocation"),
        "{}",
        o.stderr
    );
    let lines: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| !l.starts_with("warning:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {}", o.stderr);
    for w in want {
        assert!(o.stderr.contains(w), "expected '{w}' in: {}", o.stderr);
    }
    o.stderr.clone()
}

fn ok(o: &Out) {
    assert_eq!(o.code, 0, "expected success; stderr: {}", o.stderr);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Bytes of every file under `dir` (to show that nothing changed).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        if path.is_file() {
            m.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    m
}

fn good_spdlab(dir: &Path) -> PathBuf {
    let f = dir.join("good.spdlab");
    ok(&spdlab(&["import", RUN, "--out", p(&f)]));
    f
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Rewrites a `.spdlab` file with its tensors and metadata edited.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Tensors, &mut Value)) {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: Value = serde_json::from_str(&md.metadata().as_ref().unwrap()["spdlab"]).unwrap();
    // f32 tensors are edited; others (f16 timeline frames) are kept as they are.
    let mut other: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![];
    let mut ts: Tensors = Tensors::new();
    for (k, v) in st.tensors() {
        if v.dtype() != safetensors::Dtype::F32 {
            other.push((k, v.dtype(), v.shape().to_vec(), v.data().to_vec()));
            continue;
        }
        let d = v
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        ts.insert(k, (v.shape().to_vec(), d));
    }
    edit(&mut ts, &mut meta);
    let raw: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = ts
        .into_iter()
        .map(|(k, (s, d))| {
            (
                k,
                safetensors::Dtype::F32,
                s,
                d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .chain(other)
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(k, dt, s, d)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let mut m = std::collections::HashMap::new();
    m.insert("spdlab".to_string(), meta.to_string());
    let out = safetensors::serialize(views, Some(m)).unwrap();
    std::fs::write(dst, out).unwrap();
}

/// Sets a config field in a `.spdlab` file's metadata.
fn with_config(src: &Path, dst: &Path, field: &str, v: Value) {
    rewrite(src, dst, |_, meta| {
        set_path(&mut meta["config"], field, v);
    });
}

/// Sets `a.b[0].c`-style paths.
fn set_path(root: &mut Value, path: &str, v: Value) {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (name, idx) = match part.split_once('[') {
            Some((n, rest)) => (
                n,
                Some(rest.trim_end_matches(']').parse::<usize>().unwrap()),
            ),
            None => (*part, None),
        };
        let last = i + 1 == parts.len();
        if last && idx.is_none() {
            cur[name] = v;
            return;
        }
        cur = &mut cur[name];
        if let Some(j) = idx {
            if last {
                cur[j] = v;
                return;
            }
            cur = &mut cur[j];
        }
    }
}

const HUGE_CASES: &[(&str, &str)] = &[
    ("module_info[0].C", "1000000000000"),
    ("ci_fn_hidden_dims[0]", "1000000000"),
    ("eval_batch_size", "1000000000000"),
    ("batch_size", "1000000000"),
    ("n_eval_steps", "1000000000000"),
    ("faithfulness_warmup_steps", "1000000000000"),
];

#[test]
fn huge_sizes_in_spdlab_files_are_refused_by_every_command() {
    let d = tempfile::tempdir().unwrap();
    let good = good_spdlab(d.path());
    for (field, v) in HUGE_CASES {
        let f = d.path().join(format!(
            "huge-{}.spdlab",
            field.replace(['[', ']', '.'], "_")
        ));
        with_config(&good, &f, field, serde_json::from_str(v).unwrap());
        let before = snapshot(d.path());
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        for args in [
            vec!["eval", p(&f)],
            vec!["ci", p(&f), "--inputs", "probes"],
            vec!["ablate", p(&f), "--select", "linear1:0"],
            vec!["cluster", p(&f)],
            vec![
                "train",
                "--resume",
                p(&f),
                "--out",
                "/nonexistent/never.spdlab",
            ],
        ] {
            let o = spdlab(&args);
            fails(&o, &[&name, v]);
        }
        assert_eq!(before, snapshot(d.path()), "a file changed");
    }
    // Metadata modules that disagree with the stored tensors (C = 10^12 in `modules`).
    let f = d.path().join("modules-c.spdlab");
    rewrite(&good, &f, |_, meta| {
        meta["modules"][0]["C"] = json!(1_000_000_000_000u64)
    });
    fails(
        &spdlab(&["eval", p(&f)]),
        &[
            "modules-c.spdlab",
            "components.linear1.V",
            "C = 1000000000000",
        ],
    );
    // A target whose sizes loop forever.
    let f = d.path().join("layers.spdlab");
    rewrite(&good, &f, |_, meta| {
        meta["target"]["n_hidden_layers"] = json!(1_000_000_000_000u64)
    });
    fails(
        &spdlab(&["eval", p(&f)]),
        &["layers.spdlab", "n_hidden_layers"],
    );
}

#[test]
fn huge_sizes_in_reference_runs_and_configs_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let run = copy_run(d.path());
    let cfg_path = run.join("final_config.yaml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    for (field, v) in HUGE_CASES {
        let mut y: Value = serde_yaml_ng::from_str(&text).unwrap();
        set_path(&mut y, field, serde_json::from_str(v).unwrap());
        std::fs::write(&cfg_path, serde_yaml_ng::to_string(&y).unwrap()).unwrap();
        let before = snapshot(&run);
        fails(&spdlab(&["eval", p(&run)]), &["final_config.yaml", v]);
        let out = d.path().join("x.spdlab");
        fails(
            &spdlab(&["import", p(&run), "--out", p(&out)]),
            &["final_config.yaml", v],
        );
        assert!(!out.exists());
        assert_eq!(before, snapshot(&run));
    }
    // The same in `train --config`: refused before the first step.
    let shown = spdlab(&["presets", "--show", "tms-5-2"]);
    ok(&shown);
    let base: Value = serde_json::from_str(&shown.stdout).unwrap();
    for (field, v) in HUGE_CASES {
        let mut c = base.clone();
        set_path(&mut c, field, serde_json::from_str(v).unwrap());
        let cf = d.path().join("cfg.json");
        std::fs::write(&cf, c.to_string()).unwrap();
        let out = d.path().join("never.spdlab");
        fails(
            &spdlab(&["train", "--config", p(&cf), "--out", p(&out)]),
            &["cfg.json", v],
        );
        assert!(!out.exists());
    }
    // Misspelt fields, and zero steps.
    let mut c = base.clone();
    c["batch_sizee"] = json!(16);
    let cf = d.path().join("typo.json");
    std::fs::write(&cf, c.to_string()).unwrap();
    fails(
        &spdlab(&["train", "--config", p(&cf)]),
        &[
            "typo.json",
            "unknown field 'batch_sizee'",
            "did you mean 'batch_size'",
        ],
    );
    let mut c = base.clone();
    c["steps"] = json!(0);
    std::fs::write(&cf, c.to_string()).unwrap();
    fails(
        &spdlab(&["train", "--config", p(&cf)]),
        &["typo.json", "steps must be at least 1"],
    );
    fails(
        &spdlab(&["train", "--preset", "tms-5-2", "--steps", "0"]),
        &["--steps must be at least 1"],
    );
}

#[test]
fn bad_flags_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let good = good_spdlab(d.path());
    for (flag, v, want) in [
        ("--alpha", "NaN", "--alpha"),
        ("--alpha", "inf", "--alpha"),
        ("--threshold", "NaN", "--threshold"),
        ("--k", "0", "--k"),
        ("--samples", "0", "--samples"),
        ("--samples", "100000000", "samples = 100000000"),
    ] {
        fails(&spdlab(&["cluster", p(&good), flag, v]), &[want]);
    }
    // Inputs near f32's maximum would give inf targets and NaN changes.
    let inp = d.path().join("big.json");
    std::fs::write(&inp, r#"{"inputs": [[3.0e38, 0, 0, 0, 0]]}"#).unwrap();
    for cmd in ["ci", "ablate"] {
        let mut args = vec![cmd, p(&good), "--inputs", p(&inp)];
        if cmd == "ablate" {
            args.extend(["--select", "linear1:0"]);
        }
        fails(&spdlab(&args), &["big.json", "outside"]);
    }
    // --threads is global: it goes before or after the subcommand.
    ok(&spdlab(&["--threads", "1", "eval", p(&good)]));
    ok(&spdlab(&["eval", p(&good), "--threads", "1"]));
}

#[test]
fn inconsistent_files_are_refused() {
    let d = tempfile::tempdir().unwrap();
    // A trained file with optimizer state.
    let f = d.path().join("t.spdlab");
    ok(&spdlab(&[
        "train",
        "--preset",
        "tms-5-2",
        "--steps",
        "3",
        "--out",
        p(&f),
    ]));
    let tied = d.path().join("tied.spdlab");
    rewrite(&f, &tied, |ts, _| {
        ts.get_mut("components.linear2.U").unwrap().1[0] += 1.0;
    });
    fails(
        &spdlab(&["eval", p(&tied)]),
        &["tied.spdlab", "components.linear2.U", "transpose"],
    );
    let half = d.path().join("half.spdlab");
    rewrite(&f, &half, |ts, _| {
        ts.remove("optim.0.m");
    });
    let e = fails(
        &spdlab(&["train", "--resume", p(&half), "--steps", "5"]),
        &[
            "half.spdlab",
            "optim.0.v",
            "optim.0.m",
            "--drop-optimizer-state",
        ],
    );
    assert!(e.contains("is missing"), "{e}");
    let nan = d.path().join("nan.spdlab");
    rewrite(&f, &nan, |ts, _| {
        ts.get_mut("optim.1.v").unwrap().1[0] = f32::NAN;
    });
    let before = snapshot(d.path());
    fails(
        &spdlab(&["train", "--resume", p(&nan), "--steps", "5"]),
        &[
            "nan.spdlab",
            "optim.1.v",
            "non-finite",
            "--drop-optimizer-state",
        ],
    );
    assert_eq!(before, snapshot(d.path()));
    // The offer works: the run resumes without the optimizer state.
    let out = d.path().join("resumed.spdlab");
    ok(&spdlab(&[
        "train",
        "--resume",
        p(&nan),
        "--steps",
        "5",
        "--drop-optimizer-state",
        "--out",
        p(&out),
    ]));
    // A step counter near 2^63.
    let late = d.path().join("late.spdlab");
    rewrite(&f, &late, |_, meta| {
        meta["train_state"]["step"] = json!(1u64 << 63)
    });
    fails(
        &spdlab(&["train", "--resume", p(&late)]),
        &["late.spdlab", "train_state.step = 9223372036854775808"],
    );
}

#[test]
fn resume_steps_extend_or_shorten_the_run() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("r.spdlab");
    ok(&spdlab(&[
        "train",
        "--preset",
        "tms-5-2",
        "--steps",
        "4",
        "--out",
        p(&f),
    ]));
    let o = spdlab(&["train", "--resume", p(&f), "--steps", "9", "--json"]);
    ok(&o);
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["steps"], 9);
    let o = spdlab(&["train", "--resume", p(&f), "--steps", "9", "--json"]);
    ok(&o);
    assert!(
        o.stderr.is_empty() || !o.stderr.contains("error"),
        "{}",
        o.stderr
    );
    fails(
        &spdlab(&["train", "--resume", p(&f), "--steps", "3"]),
        &["r.spdlab", "already trained 10 steps", "--steps 3"],
    );
}

#[test]
fn not_reference_runs_say_so() {
    let d = tempfile::tempdir().unwrap();
    let good = good_spdlab(d.path());
    let out = d.path().join("o.spdlab");
    fails(
        &spdlab(&["import", p(&good), "--out", p(&out)]),
        &["good.spdlab", "not a goodfire-ai/spd run"],
    );
    let junk = d.path().join("junk.pth");
    std::fs::write(&junk, [0x13u8; 4096]).unwrap();
    fails(
        &spdlab(&["import", p(&junk), "--out", p(&out)]),
        &["junk.pth", "not a PyTorch checkpoint"],
    );
    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(
        &spdlab(&["import", p(&empty), "--out", p(&out)]),
        &["empty", "not a goodfire-ai/spd run folder"],
    );
    // A folder named like a newer checkpoint is not a checkpoint.
    let run = copy_run(d.path());
    std::fs::create_dir(run.join("model_20000.pth")).unwrap();
    ok(&spdlab(&["import", p(&run), "--out", p(&out)]));
    // A 2 GB sparse file is refused from its header, not read whole.
    let sparse = d.path().join("sparse.spdlab");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let t0 = Instant::now();
    fails(
        &spdlab(&["eval", p(&sparse)]),
        &["sparse.spdlab", "not a .spdlab file"],
    );
    assert!(t0.elapsed() < Duration::from_secs(20));
    // Without the target's train config, tying is read off the checkpoint, and said.
    std::fs::remove_file(run.join("tms_train_config.yaml")).unwrap();
    let o = spdlab(&["eval", p(&run)]);
    ok(&o);
    assert!(
        o.stderr
            .contains("tms_train_config.yaml: missing companion file; tied_weights = true"),
        "{}",
        o.stderr
    );
}

#[cfg(unix)]
#[test]
fn outputs_never_destroy_anything() {
    let d = tempfile::tempdir().unwrap();
    let good = good_spdlab(d.path());
    let good_bytes = std::fs::read(&good).unwrap();
    // A FIFO, a folder, a symlink to a FIFO: refused, left as they are.
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(p(&fifo)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let link_fifo = d.path().join("to-fifo.spdlab");
    std::os::unix::fs::symlink(&fifo, &link_fifo).unwrap();
    let folder = d.path().join("folder.spdlab");
    std::fs::create_dir(&folder).unwrap();
    for (out, what) in [
        (&fifo, "a FIFO"),
        (&link_fifo, "a FIFO"),
        (&folder, "a folder"),
    ] {
        for args in [
            vec![
                "train",
                "--preset",
                "tms-5-2",
                "--steps",
                "2",
                "--force",
                "--out",
                p(out),
            ],
            vec!["import", RUN, "--force", "--out", p(out)],
            vec!["cluster", p(&good), "--force", "--save", p(out)],
        ] {
            fails(&spdlab(&args), &[what, "refusing to replace it"]);
        }
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(
        std::fs::symlink_metadata(&link_fifo)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(folder.is_dir());
    fails(
        &spdlab(&["train", "--preset", "tms-5-2", "--steps", "2", "--out", "/"]),
        &["a folder"],
    );
    // The run's own checkpoint as the output of import.
    let run = copy_run(d.path());
    let before = snapshot(&run);
    for target in ["model_10000.pth", "final_config.yaml"] {
        fails(
            &spdlab(&["import", p(&run), "--force", "--out", p(&run.join(target))]),
            &[target, "is one of this command's inputs"],
        );
    }
    assert_eq!(before, snapshot(&run));
    // An existing result needs --force; with it, it is replaced.
    let out = d.path().join("res.spdlab");
    std::fs::write(&out, b"precious").unwrap();
    fails(
        &spdlab(&["import", RUN, "--out", p(&out)]),
        &["res.spdlab", "exists; pass --force"],
    );
    fails(
        &spdlab(&[
            "train",
            "--preset",
            "tms-5-2",
            "--steps",
            "2",
            "--out",
            p(&out),
        ]),
        &["res.spdlab", "exists; pass --force"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    ok(&spdlab(&["import", RUN, "--force", "--out", p(&out)]));
    assert_eq!(std::fs::read(&out).unwrap(), good_bytes);
    // A symlink to a regular file is written through: the link stays a link.
    let link = d.path().join("link.spdlab");
    std::os::unix::fs::symlink("res.spdlab", &link).unwrap();
    std::fs::write(&out, b"old").unwrap();
    ok(&spdlab(&["import", RUN, "--force", "--out", p(&link)]));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(&out).unwrap(), good_bytes);
    // Clustering into its own input is the documented in-place update.
    let own = d.path().join("own.spdlab");
    std::fs::copy(&good, &own).unwrap();
    ok(&spdlab(&[
        "cluster",
        p(&own),
        "--samples",
        "256",
        "--save",
        p(&own),
    ]));
    // Stale temp files of killed saves are cleaned by the next save into the folder.
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let stale = d.path().join(format!(".res.spdlab.tmp-{dead}"));
    std::fs::write(&stale, b"half a save").unwrap();
    let unrelated = d.path().join(".notes.tmp-x");
    std::fs::write(&unrelated, b"keep").unwrap();
    ok(&spdlab(&["import", RUN, "--force", "--out", p(&out)]));
    assert!(!stale.exists(), "stale temp file not cleaned");
    assert!(unrelated.exists());
}

#[test]
fn two_runs_cannot_write_one_output() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("shared.spdlab");
    let mut first = Command::new(env!("CARGO_BIN_EXE_spdlab"))
        .args([
            "train",
            "--preset",
            "tms-5-2",
            "--steps",
            "100000",
            "--out",
            p(&out),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run holds the lock.
    let lock = d.path().join(".shared.spdlab.lock");
    let t0 = Instant::now();
    while !lock.exists() && t0.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = spdlab(&[
        "train",
        "--preset",
        "tms-5-2",
        "--steps",
        "2",
        "--out",
        p(&out),
    ]);
    let _ = first.kill();
    let _ = first.wait();
    fails(
        &o,
        &[
            "shared.spdlab",
            "another spdlab process is writing this file",
        ],
    );
}

#[cfg(unix)]
#[test]
fn unwritable_output_folders_fail_before_training() {
    // Root writes into read-only folders anyway; the check is then moot.
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let ro = d.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let t0 = Instant::now();
    let o = spdlab(&[
        "train",
        "--preset",
        "tms-5-2",
        "--out",
        p(&ro.join("x.spdlab")),
    ]);
    fails(&o, &["cannot write into this folder"]);
    // Refused before the first of 10,000 steps.
    assert!(t0.elapsed() < Duration::from_secs(20));
}
