//! Sweeps: a grid over config fields, one folder per point. Points run in separate processes
//! (`spdlab sweep DIR --point I`), either from this machine's pool (`--jobs N`) or from a
//! cluster's job array (`--emit slurm` writes the script; each task runs the same command).
//!
//! Layout of a sweep folder:
//! - `sweep.json`: the base config (the `train --config` format, target path absolute), the
//!   axes and the points' values.
//! - `points/pNNN/`: `config.json` (the point's full config), `run.spdlab` (the result),
//!   `run.spdlab.recovery` while training (every 30 s, `--autosave-secs`), `progress.json` (step, total,
//!   losses, steps/s; rewritten every second), `summary.json` (the schema of `train --json`,
//!   written last: a point with it is finished).
//!
//! Every write is atomic, so killing a sweep at any moment leaves finished points finished
//! and an interrupted point resumable from its recovery file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::io::atomic::write_atomic;

/// One axis of the grid: a config field by path and its values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    pub path: String,
    pub values: Vec<Value>,
}

/// Most points a sweep may have (a typo like `seed=0..100000` is refused, not started).
pub const MAX_POINTS: usize = 10_000;

/// Parses `PATH=V1,V2,...` or `PATH=A..B` (integers, both ends included). Values that parse
/// as numbers (or true/false) are numbers (booleans); others are strings.
pub fn parse_axis(spec: &str) -> anyhow::Result<Axis> {
    let (path, vals) = spec
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("--grid {spec:?}: expected PATH=V1,V2,... or PATH=A..B"))?;
    let path = path.trim();
    if path.is_empty() {
        anyhow::bail!("--grid {spec:?}: the field path is empty");
    }
    let vals = vals.trim();
    let values: Vec<Value> = if let Some((a, b)) = vals.split_once("..")
        && let (Ok(a), Ok(b)) = (a.trim().parse::<i64>(), b.trim().parse::<i64>())
    {
        if b < a || (b - a) as usize >= MAX_POINTS {
            anyhow::bail!("--grid {spec:?}: the range {a}..{b} is empty or too long");
        }
        (a..=b).map(Value::from).collect()
    } else {
        vals.split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| match serde_json::from_str::<Value>(v) {
                Ok(n @ (Value::Number(_) | Value::Bool(_))) => n,
                _ => Value::String(v.to_string()),
            })
            .collect()
    };
    if values.is_empty() {
        anyhow::bail!("--grid {spec:?}: no values");
    }
    Ok(Axis {
        path: path.to_string(),
        values,
    })
}

/// Sets the field at `path` of a config (the reference's JSON field names) to `v`:
/// - `loss.<classname>.<field>`: the `loss_metric_configs` entry of that class
///   (e.g. `loss.ImportanceMinimalityLoss.coeff`);
/// - `C.<module_pattern>`: that `module_info` entry's C (the pattern as written, or the one
///   entry whose pattern contains it: `C.linear1`);
/// - `lr`: the learning rate (`lr_schedule.start_val`);
/// - anything else: a dotted path of object keys (`seed`, `steps`, `batch_size`,
///   `lr_schedule.fn_type`, `task_config.feature_probability`, ...).
///
/// The field must exist in the config (a misspelt path is an error, not a new field).
pub fn set_path(cfg: &mut Value, path: &str, v: Value) -> anyhow::Result<()> {
    let parts: Vec<&str> = path.split('.').collect();
    match parts.as_slice() {
        ["loss", class, field @ ..] if !field.is_empty() => {
            let entries = cfg
                .get_mut("loss_metric_configs")
                .and_then(Value::as_array_mut)
                .ok_or_else(|| anyhow::anyhow!("{path}: the config has no loss_metric_configs"))?;
            let names: Vec<String> = entries
                .iter()
                .filter_map(|e| e.get("classname").and_then(Value::as_str).map(String::from))
                .collect();
            let entry = entries
                .iter_mut()
                .find(|e| e.get("classname").and_then(Value::as_str) == Some(class))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{path}: no loss {class} in the config (it has {})",
                        names.join(", ")
                    )
                })?;
            set_keys(entry, field, v).map_err(|e| anyhow::anyhow!("{path}: {e}"))
        }
        ["C", pattern @ ..] if !pattern.is_empty() => {
            let pattern = pattern.join(".");
            let entries = cfg
                .get_mut("module_info")
                .and_then(Value::as_array_mut)
                .ok_or_else(|| anyhow::anyhow!("{path}: the config has no module_info"))?;
            let pat = |e: &Value| {
                e.get("module_pattern")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            let all: Vec<String> = entries.iter().map(pat).collect();
            let exact = all.iter().position(|p| *p == pattern);
            let containing: Vec<usize> = (0..all.len())
                .filter(|&i| all[i].contains(&pattern))
                .collect();
            let i = match (exact, containing.as_slice()) {
                (Some(i), _) => i,
                (None, [i]) => *i,
                _ => anyhow::bail!(
                    "{path}: {} module pattern matches {pattern:?} (the config has {})",
                    if containing.is_empty() {
                        "no"
                    } else {
                        "more than one"
                    },
                    all.join(", ")
                ),
            };
            set_keys(&mut entries[i], &["C"], v).map_err(|e| anyhow::anyhow!("{path}: {e}"))
        }
        ["lr"] => set_keys(cfg, &["lr_schedule", "start_val"], v)
            .map_err(|e| anyhow::anyhow!("{path}: {e}")),
        keys => set_keys(cfg, keys, v).map_err(|e| anyhow::anyhow!("{path}: {e}")),
    }
}

fn set_keys(obj: &mut Value, keys: &[&str], v: Value) -> Result<(), String> {
    let (last, head) = keys.split_last().ok_or("empty path")?;
    let mut cur = obj;
    for k in head {
        cur = cur
            .get_mut(*k)
            .filter(|c| c.is_object())
            .ok_or_else(|| format!("no field {k:?} in the config"))?;
    }
    let map = cur.as_object_mut().ok_or("not an object")?;
    match map.get_mut(*last) {
        Some(slot) => {
            *slot = v;
            Ok(())
        }
        None => {
            let mut fields: Vec<&String> = map.keys().collect();
            fields.sort();
            Err(format!(
                "no field {last:?} in the config (fields here: {})",
                fields
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

/// A sweep: its base config and grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    /// The base config (the `train --config` format, with "preset" or an absolute
    /// "target_path").
    pub base: Value,
    pub axes: Vec<Axis>,
}

/// One point: its index and the value on each axis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub index: usize,
    pub values: Vec<(String, Value)>,
}

impl Point {
    /// `path=value` pairs, for tables and folder notes.
    pub fn label(&self) -> String {
        self.values
            .iter()
            .map(|(p, v)| format!("{p}={}", short(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

impl SweepSpec {
    /// Every point of the grid (the first axis varies slowest).
    pub fn points(&self) -> Vec<Point> {
        let mut out = vec![vec![]];
        for a in &self.axes {
            let mut next = vec![];
            for p in &out {
                for v in &a.values {
                    let mut q: Vec<(String, Value)> = p.clone();
                    q.push((a.path.clone(), v.clone()));
                    next.push(q);
                }
            }
            out = next;
        }
        out.into_iter()
            .enumerate()
            .map(|(index, values)| Point { index, values })
            .collect()
    }

    /// The full config of a point.
    pub fn config_of(&self, p: &Point) -> anyhow::Result<Value> {
        let mut cfg = self.base.clone();
        for (path, v) in &p.values {
            set_path(&mut cfg, path, v.clone())?;
        }
        Ok(cfg)
    }

    /// Checks the grid: at most [`MAX_POINTS`] points, every path settable, and every
    /// point's config valid (so a typo fails before anything runs).
    pub fn check(&self) -> anyhow::Result<()> {
        let n: usize = self
            .axes
            .iter()
            .try_fold(1usize, |n, a| n.checked_mul(a.values.len()))
            .unwrap_or(usize::MAX);
        if n > MAX_POINTS {
            anyhow::bail!("the grid has {n} points; at most {MAX_POINTS}");
        }
        let mut seen = std::collections::HashSet::new();
        for a in &self.axes {
            if !seen.insert(a.path.as_str()) {
                anyhow::bail!("--grid {} is given twice", a.path);
            }
        }
        for p in self.points() {
            let cfg = self.config_of(&p)?;
            let cf: crate::runner::ConfigFile = serde_json::from_value(cfg.clone())
                .map_err(|e| anyhow::anyhow!("point {} ({}): {e}", p.index, p.label()))?;
            cf.spd
                .validate()
                .map_err(|e| anyhow::anyhow!("point {} ({}): {e}", p.index, p.label()))?;
        }
        Ok(())
    }
}

/// A sweep folder.
/// The timeline every sweep point keeps: up to 100 frames, at most 32 MB, f16.
pub const SWEEP_TIMELINE: crate::timeline::TimelineOptions = crate::timeline::TimelineOptions {
    max_frames: 100,
    f16: true,
    cap_bytes: 32 << 20,
};

pub struct Sweep {
    pub dir: PathBuf,
    pub spec: SweepSpec,
    /// Interval of a running point's recovery saves (default 30 s).
    pub autosave: Duration,
}

/// Where a point is in its life.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum PointState {
    Pending,
    /// Started (a recovery file or progress exists) but not finished.
    Running {
        step: usize,
        total: usize,
    },
    Finished,
}

/// Progress of a running point (`progress.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    pub steps_per_second: f64,
    pub losses: std::collections::BTreeMap<String, f64>,
}

impl Sweep {
    /// Creates the folder for `spec`, or opens it when it already holds the same sweep
    /// (rerunning the command continues it); a folder with another sweep is refused.
    pub fn create(dir: &Path, spec: SweepSpec) -> anyhow::Result<Sweep> {
        spec.check()?;
        let file = dir.join("sweep.json");
        if file.exists() {
            let old = Sweep::open(dir)?;
            if old.spec != spec {
                anyhow::bail!(
                    "{}: holds another sweep (different base config or grid); choose another --out or open it with `spdlab sweep {}`",
                    dir.display(),
                    dir.display()
                );
            }
            return Ok(old);
        }
        if dir.exists() && !dir.is_dir() {
            anyhow::bail!("{}: exists and is not a folder", dir.display());
        }
        std::fs::create_dir_all(dir.join("points"))
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
        write_atomic(&file, serde_json::to_string_pretty(&spec)?.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", file.display()))?;
        Ok(Sweep {
            dir: dir.to_path_buf(),
            spec,
            autosave: Duration::from_secs(30),
        })
    }

    pub fn open(dir: &Path) -> anyhow::Result<Sweep> {
        let file = dir.join("sweep.json");
        let text = std::fs::read_to_string(&file).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot read ({e}); is this a sweep folder?",
                file.display()
            )
        })?;
        let spec: SweepSpec = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a sweep description: {e}", file.display()))?;
        spec.check()
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        Ok(Sweep {
            dir: dir.to_path_buf(),
            spec,
            autosave: Duration::from_secs(30),
        })
    }

    pub fn points(&self) -> Vec<Point> {
        self.spec.points()
    }

    pub fn point_dir(&self, i: usize) -> PathBuf {
        self.dir.join("points").join(format!("p{i:03}"))
    }

    pub fn state(&self, i: usize) -> PointState {
        let d = self.point_dir(i);
        if d.join("summary.json").exists() {
            return PointState::Finished;
        }
        match read_progress(&d) {
            Some(p) => PointState::Running {
                step: p.step,
                total: p.total,
            },
            None if d.join("run.spdlab.recovery").exists() => {
                PointState::Running { step: 0, total: 0 }
            }
            None => PointState::Pending,
        }
    }

    /// The finished point's summary (the `train --json` object), if it is finished.
    pub fn summary(&self, i: usize) -> Option<crate::runner::TrainSummary> {
        let text = std::fs::read_to_string(self.point_dir(i).join("summary.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Runs point `i` in this process: skips it when finished, continues it from its
    /// recovery file when interrupted, else trains it from its config.
    pub fn run_point(&self, i: usize, dev: &candle_core::Device) -> anyhow::Result<()> {
        let points = self.points();
        let p = points.get(i).ok_or_else(|| {
            anyhow::anyhow!(
                "point {i}: the sweep has {} points (0..{})",
                points.len(),
                points.len().saturating_sub(1)
            )
        })?;
        let d = self.point_dir(i);
        if d.join("summary.json").exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&d)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", d.display()))?;
        crate::io::output::clean_stale_temps(&d);
        let out = d.join("run.spdlab");
        let recovery = d.join("run.spdlab.recovery");
        let (mut tr, mut extras) = if recovery.exists() {
            crate::io::spdlab_file::load(&recovery, dev)?
        } else if out.exists() {
            // Trained and saved, killed before the summary: evaluate again, no training.
            crate::io::spdlab_file::load(&out, dev)?
        } else {
            let cfg = self.spec.config_of(p)?;
            let cfg_path = d.join("config.json");
            write_atomic(&cfg_path, serde_json::to_string_pretty(&cfg)?.as_bytes())
                .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", cfg_path.display()))?;
            let (spd, target, preset) = crate::runner::load_config_file(&cfg_path, dev)?;
            let tr = crate::spd::trainer::Trainer::new(target, spd)?;
            let extras = crate::io::spdlab_file::FileExtras {
                preset,
                ..Default::default()
            };
            (tr, extras)
        };
        if tr.timeline.is_none() {
            tr.set_timeline(SWEEP_TIMELINE);
        }
        let opts = crate::runner::RunOptions {
            autosave: Some((recovery.clone(), self.autosave)),
        };
        let total = tr.config.steps;
        let start = tr.step;
        let t0 = Instant::now();
        let mut last = Instant::now() - Duration::from_secs(10);
        let mut write_err: Option<anyhow::Error> = None;
        let secs = crate::runner::run_training(&mut tr, &mut extras, &opts, |t, rec| {
            if last.elapsed() >= Duration::from_secs(1) || t.is_done() {
                last = Instant::now();
                let done = (rec.step + 1).saturating_sub(start) as f64;
                let prog = Progress {
                    step: rec.step + 1,
                    total: total + 1,
                    steps_per_second: done / t0.elapsed().as_secs_f64().max(1e-9),
                    losses: rec.losses.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                };
                if let Err(e) = write_atomic(
                    &d.join("progress.json"),
                    serde_json::to_string(&prog).unwrap_or_default().as_bytes(),
                ) {
                    write_err.get_or_insert(anyhow::anyhow!("progress.json: {e}"));
                }
            }
        })?;
        if let Some(e) = write_err {
            return Err(e.context(d.display().to_string()));
        }
        let report = crate::runner::final_eval(&mut tr)?;
        crate::io::spdlab_file::save(&tr, &extras, &out)?;
        let mut summary = crate::runner::TrainSummary::new(
            &report,
            extras.preset.clone(),
            (total, start, secs),
            out.clone(),
        );
        // Where the answer is known, the clustering's score is one of the point's numbers.
        summary.clustering = crate::runner::ClusteringScore::of(&tr)?;
        let sp = d.join("summary.json");
        write_atomic(&sp, serde_json::to_string_pretty(&summary)?.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", sp.display()))?;
        let _ = std::fs::remove_file(&recovery);
        Ok(())
    }

    /// Runs every unfinished point as a child process (`exe sweep DIR --point I --threads
    /// T`), at most `jobs` at a time, `threads` each; `report` sees (finished, total) after
    /// each point. Returns the points that failed, with their error output.
    pub fn run_pool(
        &self,
        exe: &Path,
        jobs: usize,
        threads: usize,
        mut report: impl FnMut(usize, usize, Option<&str>),
    ) -> anyhow::Result<Vec<(usize, String)>> {
        let n = self.points().len();
        let mut todo: std::collections::VecDeque<usize> = (0..n)
            .filter(|&i| self.state(i) != PointState::Finished)
            .collect();
        let mut done = n - todo.len();
        report(done, n, None);
        let mut running: Vec<(usize, std::process::Child)> = vec![];
        let mut failed = vec![];
        while !todo.is_empty() || !running.is_empty() {
            while running.len() < jobs.max(1)
                && let Some(i) = todo.pop_front()
            {
                let log = self.point_dir(i);
                std::fs::create_dir_all(&log)?;
                let err = std::fs::File::create(log.join("stderr.log"))?;
                let child = std::process::Command::new(exe)
                    .arg("sweep")
                    .arg(&self.dir)
                    .arg("--point")
                    .arg(i.to_string())
                    .arg("--threads")
                    .arg(threads.max(1).to_string())
                    .arg("--autosave-secs")
                    .arg(self.autosave.as_secs().max(1).to_string())
                    .stdout(std::process::Stdio::null())
                    .stderr(err)
                    .spawn()
                    .map_err(|e| anyhow::anyhow!("{}: cannot start: {e}", exe.display()))?;
                running.push((i, child));
            }
            std::thread::sleep(Duration::from_millis(100));
            let mut k = 0;
            while k < running.len() {
                if let Some(status) = running[k].1.try_wait()? {
                    let (i, _) = running.swap_remove(k);
                    done += 1;
                    if status.success() {
                        report(done, n, None);
                    } else {
                        let log = std::fs::read_to_string(self.point_dir(i).join("stderr.log"))
                            .unwrap_or_default();
                        let msg = log.lines().last().unwrap_or("failed").to_string();
                        report(done, n, Some(&format!("point {i}: {msg}")));
                        failed.push((i, msg));
                    }
                } else {
                    k += 1;
                }
            }
        }
        Ok(failed)
    }

    /// A Slurm job-array script: task i runs `spdlab sweep DIR --point i` with the task's
    /// CPUs as threads. `exe` is the spdlab binary to call (overridable with `$SPDLAB`).
    pub fn slurm_script(&self, exe: &Path, cpus: usize) -> String {
        let n = self.points().len();
        let dir = std::path::absolute(&self.dir).unwrap_or_else(|_| self.dir.clone());
        let q = |p: &Path| shell_quote(&p.display().to_string());
        format!(
            "#!/usr/bin/env bash\n\
             # spdlab sweep: {n} points, one job-array task each. Submit with: sbatch {script}\n\
             # Each task runs the same command as the local pool; rerunning a finished point is\n\
             # a no-op and an interrupted one continues from its recovery file.\n\
             #SBATCH --job-name=spdlab-sweep\n\
             #SBATCH --array=0-{last}\n\
             #SBATCH --cpus-per-task={cpus}\n\
             #SBATCH --output={out}\n\
             set -euo pipefail\n\
             SPDLAB=\"${{SPDLAB:-{exe}}}\"\n\
             \"$SPDLAB\" sweep {dir} --point \"${{SLURM_ARRAY_TASK_ID:?not a job-array task}}\" --threads \"${{SLURM_CPUS_PER_TASK:-{cpus}}}\"\n",
            script = q(&dir.join("slurm.sh")),
            last = n.saturating_sub(1),
            out = dir.join("points").join("slurm-%A_%a.out").display(),
            exe = exe.display(),
            dir = q(&dir),
        )
    }
}

/// One point as a sweep table shows it.
#[derive(Clone, Debug)]
pub struct PointRow {
    pub point: Point,
    pub state: PointState,
    pub progress: Option<Progress>,
    /// Named numbers of a finished point (see [`summary_metrics`]).
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Its decomposition (present once finished).
    pub run: PathBuf,
}

/// A sweep folder as read at one moment: what the sweep view draws.
#[derive(Clone, Debug)]
pub struct SweepTable {
    pub dir: PathBuf,
    pub axes: Vec<Axis>,
    pub rows: Vec<PointRow>,
    /// Every metric name of the finished points, sorted.
    pub metric_names: Vec<String>,
}

impl SweepTable {
    /// Finished, running and pending points.
    pub fn counts(&self) -> (usize, usize, usize) {
        let f = |s: fn(&PointState) -> bool| self.rows.iter().filter(|r| s(&r.state)).count();
        (
            f(|s| *s == PointState::Finished),
            f(|s| matches!(s, PointState::Running { .. })),
            f(|s| *s == PointState::Pending),
        )
    }
}

/// A finished point's regime in a few words, where its target answers single features: per
/// module the monosemantic count (`mlp_in mono 100`) or, where subcomponents mostly answer
/// several features, the size of that shared block (`mlp_out block 50`), and the silent
/// (dead for single features) count. E.g. resid-mlp-1 at 1e-5: `mlp_in mono 100 · mlp_out
/// block 50 · silent 50`.
pub fn regime_label(metrics: &std::collections::BTreeMap<String, f64>) -> Option<String> {
    let mut parts = vec![];
    let mut silent = 0.0;
    for (k, mono) in metrics.range("monosemantic ".to_string().."monosemantic~".to_string()) {
        let module = &k["monosemantic ".len()..];
        let shared = metrics
            .get(&format!("shared {module}"))
            .copied()
            .unwrap_or(0.0);
        silent += metrics
            .get(&format!("silent {module}"))
            .copied()
            .unwrap_or(0.0);
        let short = module.rsplit('.').next().unwrap_or(module);
        parts.push(if shared > *mono {
            format!("{short} block {shared}")
        } else {
            format!("{short} mono {mono}")
        });
    }
    if parts.is_empty() {
        return None;
    }
    parts.push(format!("silent {silent}"));
    Some(parts.join(" · "))
}

/// A finished point's numbers by name: `loss <name>`, `L0 <module>`, `L0 total`, `MMCS
/// <module>`, `ML2R <module>`, `target-solution error`, `steps/s`, for targets with a known
/// answer the clustering's `clusters k`, `clustering purity`, `clustering ARI` and
/// `clustering best-cut ARI`, and for single-feature targets `monosemantic <module>`,
/// `features covered <module>`, `shared <module>`, `silent <module>`.
pub fn summary_metrics(s: &crate::runner::TrainSummary) -> std::collections::BTreeMap<String, f64> {
    let mut m = std::collections::BTreeMap::new();
    for (k, v) in &s.losses {
        m.insert(format!("loss {k}"), *v);
    }
    for (k, v) in &s.l0 {
        m.insert(format!("L0 {k}"), *v);
    }
    if !s.l0.is_empty() {
        m.insert("L0 total".into(), s.l0.values().sum());
    }
    for (k, v) in &s.mmcs {
        m.insert(format!("MMCS {k}"), *v);
    }
    for (k, v) in &s.ml2r {
        m.insert(format!("ML2R {k}"), *v);
    }
    if let Some(t) = &s.target_solution_error {
        m.insert("target-solution error".into(), t.total as f64);
    }
    if let Some(fr) = &s.feature_response {
        for (k, r) in fr {
            m.insert(format!("monosemantic {k}"), r.monosemantic as f64);
            m.insert(format!("features covered {k}"), r.features_covered as f64);
            m.insert(format!("shared {k}"), r.shared as f64);
            m.insert(format!("silent {k}"), r.silent as f64);
        }
    }
    if let Some(c) = &s.clustering {
        m.insert("clusters k".into(), c.k as f64);
        m.insert("clustering purity".into(), c.purity);
        m.insert("clustering ARI".into(), c.ari);
        m.insert("clustering best-cut ARI".into(), c.best_ari);
    }
    m.insert("steps/s".into(), s.steps_per_second);
    m
}

impl Sweep {
    /// Reads every point's state, progress and summary.
    pub fn table(&self) -> SweepTable {
        let mut names = std::collections::BTreeSet::new();
        let rows: Vec<PointRow> = self
            .points()
            .into_iter()
            .map(|p| {
                let d = self.point_dir(p.index);
                let metrics = self
                    .summary(p.index)
                    .map(|s| summary_metrics(&s))
                    .unwrap_or_default();
                names.extend(metrics.keys().cloned());
                PointRow {
                    state: self.state(p.index),
                    progress: read_progress(&d),
                    metrics,
                    run: d.join("run.spdlab"),
                    point: p,
                }
            })
            .collect();
        SweepTable {
            dir: self.dir.clone(),
            axes: self.spec.axes.clone(),
            rows,
            metric_names: names.into_iter().collect(),
        }
    }
}

fn read_progress(d: &Path) -> Option<Progress> {
    serde_json::from_str(&std::fs::read_to_string(d.join("progress.json")).ok()?).ok()
}

/// Single-quotes a string for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        crate::presets::config_file_json("tms-5-2").unwrap()
    }

    #[test]
    fn axes_parse_lists_and_ranges() {
        let a = parse_axis("seed=0..3").unwrap();
        assert_eq!(a.values, vec![Value::from(0), 1.into(), 2.into(), 3.into()]);
        let a = parse_axis("loss.ImportanceMinimalityLoss.coeff=1e-4, 3e-4,1e-3").unwrap();
        assert_eq!(a.path, "loss.ImportanceMinimalityLoss.coeff");
        assert_eq!(a.values[0].as_f64(), Some(1e-4));
        let a = parse_axis("lr_schedule.fn_type=constant,cosine").unwrap();
        assert_eq!(a.values[1], Value::from("cosine"));
        assert!(parse_axis("seed").is_err());
        assert!(parse_axis("seed=").is_err());
        assert!(parse_axis("seed=5..1").is_err());
    }

    #[test]
    fn paths_set_losses_modules_lr_and_plain_fields() {
        let mut c = base();
        set_path(&mut c, "loss.ImportanceMinimalityLoss.coeff", 0.5.into()).unwrap();
        set_path(&mut c, "C.linear1", 7.into()).unwrap();
        set_path(&mut c, "lr", 0.01.into()).unwrap();
        set_path(&mut c, "seed", 4.into()).unwrap();
        let cf: crate::runner::ConfigFile = serde_json::from_value(c.clone()).unwrap();
        assert_eq!(cf.spd.seed, 4);
        assert_eq!(cf.spd.lr_schedule.start_val, 0.01);
        assert_eq!(cf.spd.module_info[0].c, 7);
        let imp = cf
            .spd
            .loss_metric_configs
            .iter()
            .find(|l| l.name() == "ImportanceMinimalityLoss")
            .unwrap();
        assert_eq!(imp.coeff, Some(0.5));
        // Misspelt paths are errors naming what exists.
        let e = set_path(&mut c, "sede", 1.into()).unwrap_err().to_string();
        assert!(e.contains("no field \"sede\""), "{e}");
        let e = set_path(&mut c, "loss.Nope.coeff", 1.into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ImportanceMinimalityLoss"), "{e}");
        let e = set_path(&mut c, "C.linear", 1.into())
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than one"), "{e}");
    }

    #[test]
    fn points_are_the_grid_first_axis_slowest() {
        let spec = SweepSpec {
            base: base(),
            axes: vec![
                parse_axis("seed=0..1").unwrap(),
                parse_axis("C.linear1=5,10,20").unwrap(),
            ],
        };
        spec.check().unwrap();
        let p = spec.points();
        assert_eq!(p.len(), 6);
        assert_eq!(p[4].label(), "seed=1 C.linear1=10");
        // A value the config refuses fails the check before anything runs.
        let bad = SweepSpec {
            base: base(),
            axes: vec![parse_axis("batch_size=0,4").unwrap()],
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn regime_labels_name_monosemantic_counts_and_blocks() {
        let m: std::collections::BTreeMap<String, f64> = [
            ("monosemantic layers.0.mlp_in", 100.0),
            ("shared layers.0.mlp_in", 0.0),
            ("silent layers.0.mlp_in", 0.0),
            ("monosemantic layers.0.mlp_out", 0.0),
            ("shared layers.0.mlp_out", 50.0),
            ("silent layers.0.mlp_out", 50.0),
            ("loss total", 1.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(
            regime_label(&m).as_deref(),
            Some("mlp_in mono 100 · mlp_out block 50 · silent 50")
        );
        assert_eq!(regime_label(&Default::default()), None);
    }

    #[test]
    fn slurm_script_is_valid_bash() {
        let d = tempfile::tempdir().unwrap();
        let s = Sweep::create(
            &d.path().join("it's a sweep"),
            SweepSpec {
                base: base(),
                axes: vec![parse_axis("seed=0..2").unwrap()],
            },
        )
        .unwrap();
        let script = s.slurm_script(Path::new("/opt/spdlab"), 2);
        assert!(script.contains("#SBATCH --array=0-2"));
        let f = d.path().join("slurm.sh");
        std::fs::write(&f, &script).unwrap();
        let st = std::process::Command::new("bash")
            .arg("-n")
            .arg(&f)
            .status()
            .unwrap();
        assert!(st.success());
    }
}
