//! Watching a goodfire-ai/spd run folder that is still being written: a background thread
//! follows `metrics.jsonl` (complete lines only) and the `model_<step>.pth` checkpoints, and
//! offers the newest checkpoint once it is complete — its size unchanged since the previous
//! look and its zip archive closed (the end-of-central-directory record at its end) — so a
//! half-written file is never loaded.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::spd::trainer::StepRecord;

#[derive(Default)]
struct Shared {
    /// Training records from metrics.jsonl, in file order.
    records: Vec<StepRecord>,
    /// The newest complete checkpoint (step, path).
    newest: Option<(usize, PathBuf)>,
}

/// A watched run folder (or spdlab run file); the thread stops when this is dropped.
pub struct RunWatch {
    pub dir: PathBuf,
    /// Training curves come from metrics.jsonl (a reference run folder); a spdlab file carries
    /// its own history.
    pub follows_metrics: bool,
    shared: Arc<Mutex<Shared>>,
    version: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// One line of the reference's metrics.jsonl as a step record: `train/loss/<name>` and
/// `train/l0/<module>`, the learning rate from `train/schedules/lr` (NaN when absent; other
/// keys, e.g. evaluations, are not curves here). None for a line without a step or without
/// training values.
pub fn record_of_line(line: &str) -> Option<StepRecord> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let step = v.get("step")?.as_u64()? as usize;
    let mut r = StepRecord {
        step,
        lr: ["train/schedules/lr", "train/lr"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|x| x.as_f64()))
            .unwrap_or(f64::NAN),
        losses: Default::default(),
        l0: Default::default(),
    };
    for (k, x) in v.as_object()? {
        let Some(x) = x.as_f64() else { continue };
        if let Some(name) = k.strip_prefix("train/loss/") {
            r.losses.insert(name.to_string(), x);
        } else if let Some(m) = k.strip_prefix("train/l0/") {
            r.l0.insert(m.to_string(), x);
        }
    }
    (!r.losses.is_empty() || !r.l0.is_empty()).then_some(r)
}

/// Whether a zip archive (a PyTorch checkpoint) is complete: it ends with an
/// end-of-central-directory record (signature PK\x05\x06 within its last 64 KiB + 22 bytes).
pub fn zip_is_complete(path: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return false;
    };
    if len < 22 {
        return false;
    }
    let tail = len.min(22 + 65_535);
    let mut buf = vec![0u8; tail as usize];
    if f.seek(SeekFrom::Start(len - tail)).is_err() || f.read_exact(&mut buf).is_err() {
        return false;
    }
    // The record is 22 bytes plus a comment whose length it states; it must end the file.
    (0..=buf.len() - 22).rev().any(|i| {
        buf[i..i + 4] == *b"PK\x05\x06" && {
            let comment = u16::from_le_bytes([buf[i + 20], buf[i + 21]]) as usize;
            i + 22 + comment == buf.len()
        }
    })
}

fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut out: Vec<(usize, PathBuf, u64)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("model_")?
                .strip_suffix(".pth")?
                .parse::<usize>()
                .ok()?;
            let len = e.metadata().ok().filter(|m| m.is_file())?.len();
            Some((step, e.path(), len))
        })
        .collect();
    out.sort_by_key(|c| c.0);
    out
}

impl RunWatch {
    /// Whether `dir` looks like a goodfire-ai/spd run folder.
    pub fn is_run_folder(dir: &Path) -> bool {
        dir.is_dir() && dir.join("final_config.yaml").is_file()
    }

    /// Starts watching; `wake` is called after each change (the UI's repaint request).
    pub fn spawn(dir: PathBuf, every: Duration, wake: impl Fn() + Send + 'static) -> RunWatch {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let version = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, ver, st, d) = (shared.clone(), version.clone(), stop.clone(), dir.clone());
        std::thread::Builder::new()
            .name("run-watch".into())
            .spawn(move || {
                let mut offset = 0u64;
                let mut partial = String::new();
                // Sizes seen at the previous look, per checkpoint path.
                let mut sizes: std::collections::HashMap<PathBuf, u64> = Default::default();
                while !st.load(Ordering::Relaxed) {
                    let mut changed = false;
                    // New complete lines of metrics.jsonl.
                    if let Ok(mut f) = std::fs::File::open(d.join("metrics.jsonl")) {
                        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                        if len < offset {
                            // Rewritten from the start.
                            offset = 0;
                            partial.clear();
                            sh.lock().unwrap().records.clear();
                            changed = true;
                        }
                        let mut buf = String::new();
                        if len > offset
                            && f.seek(SeekFrom::Start(offset)).is_ok()
                            && f.read_to_string(&mut buf).is_ok()
                        {
                            offset += buf.len() as u64;
                            partial.push_str(&buf);
                            if let Some(end) = partial.rfind('\n') {
                                let done: String = partial.drain(..=end).collect();
                                let recs: Vec<StepRecord> =
                                    done.lines().filter_map(record_of_line).collect();
                                if !recs.is_empty() {
                                    sh.lock().unwrap().records.extend(recs);
                                    changed = true;
                                }
                            }
                        }
                    }
                    // The newest checkpoint that is complete and no longer growing.
                    let cks = checkpoints(&d);
                    for (step, path, len) in cks.iter().rev() {
                        // Unchanged since the last look, or (at the first look) untouched for
                        // two seconds.
                        let old = std::fs::metadata(path)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.elapsed().ok())
                            .is_some_and(|a| a > Duration::from_secs(2));
                        let stable =
                            sizes.get(path) == Some(len) || (old && !sizes.contains_key(path));
                        if stable && zip_is_complete(path) {
                            let mut s = sh.lock().unwrap();
                            if s.newest.as_ref().is_none_or(|(n, _)| step > n) {
                                s.newest = Some((*step, path.clone()));
                                changed = true;
                            }
                            break;
                        }
                    }
                    sizes = cks.into_iter().map(|(_, p, l)| (p, l)).collect();
                    if changed {
                        ver.fetch_add(1, Ordering::Relaxed);
                        wake();
                    }
                    super::sweep_watch::pause(every, &st);
                }
            })
            .expect("cannot start the run watcher thread");
        RunWatch {
            dir,
            follows_metrics: true,
            shared,
            version,
            stop,
        }
    }

    /// Whether `path` is a spdlab run still being written: a recovery file, or a `.spdlab`
    /// whose recovery file exists (`spdlab train --out` autosaves it while training).
    pub fn is_running_file(path: &Path) -> bool {
        let name = path.to_string_lossy();
        path.is_file()
            && (name.ends_with(".spdlab.recovery")
                || (name.ends_with(".spdlab") && Path::new(&format!("{name}.recovery")).is_file()))
    }

    /// Watches a spdlab run file being written by a training run elsewhere: the recovery file
    /// (rewritten atomically at each autosave) and the final file beside it; whichever changed
    /// last is offered once it has stayed unchanged for one look.
    pub fn spawn_file(
        path: PathBuf,
        every: Duration,
        wake: impl Fn() + Send + 'static,
    ) -> RunWatch {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let version = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let name = path.to_string_lossy().into_owned();
        let (recovery, base) = match name.strip_suffix(".recovery") {
            Some(b) => (path.clone(), PathBuf::from(b)),
            None => (PathBuf::from(format!("{name}.recovery")), path.clone()),
        };
        let (sh, ver, st) = (shared.clone(), version.clone(), stop.clone());
        std::thread::Builder::new()
            .name("run-file-watch".into())
            .spawn(move || {
                let stamp = |p: &Path| {
                    std::fs::metadata(p)
                        .ok()
                        .and_then(|m| Some((m.modified().ok()?, m.len())))
                };
                // What was there when the file was opened (already loaded).
                let baseline = [stamp(&recovery), stamp(&base)];
                let mut previous = baseline;
                let mut offered = baseline;
                let mut n = 0usize;
                while !st.load(Ordering::Relaxed) {
                    let now = [stamp(&recovery), stamp(&base)];
                    // The newest file that changed since it was offered and is settled.
                    let pick = (0..2)
                        .filter(|&i| {
                            now[i].is_some() && now[i] == previous[i] && now[i] != offered[i]
                        })
                        .max_by_key(|&i| now[i].map(|x| x.0));
                    if let Some(i) = pick {
                        offered[i] = now[i];
                        n += 1;
                        let p = if i == 0 {
                            recovery.clone()
                        } else {
                            base.clone()
                        };
                        sh.lock().unwrap().newest = Some((n, p));
                        ver.fetch_add(1, Ordering::Relaxed);
                        wake();
                    }
                    previous = now;
                    super::sweep_watch::pause(every, &st);
                }
            })
            .expect("cannot start the run file watcher thread");
        RunWatch {
            dir: path,
            follows_metrics: false,
            shared,
            version,
            stop,
        }
    }

    /// Bumped with every change (new records, a newer complete checkpoint).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// The training records read so far.
    pub fn records(&self) -> Vec<StepRecord> {
        self.shared.lock().unwrap().records.clone()
    }

    /// The newest complete checkpoint.
    pub fn newest(&self) -> Option<(usize, PathBuf)> {
        self.shared.lock().unwrap().newest.clone()
    }
}

impl Drop for RunWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_become_records() {
        let r = record_of_line(
            r#"{"step": 40, "train/loss/total": 1.5, "train/loss/FaithfulnessLoss": 0.1, "train/l0/linear1": 3.0, "train/schedules/lr": 0.001, "eval/x": 9}"#,
        )
        .unwrap();
        assert_eq!(r.step, 40);
        assert_eq!(r.lr, 0.001);
        assert_eq!(r.losses["total"], 1.5);
        assert_eq!(r.l0["linear1"], 3.0);
        assert!(record_of_line(r#"{"step": 1, "eval/x": 2}"#).is_none());
        assert!(record_of_line("{\"step\": 1, \"train/loss/to").is_none());
    }

    #[test]
    fn zip_completeness() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.zip");
        // An empty zip archive is exactly an end-of-central-directory record.
        let mut eocd = b"PK\x05\x06".to_vec();
        eocd.extend([0u8; 18]);
        std::fs::write(&p, &eocd).unwrap();
        assert!(zip_is_complete(&p));
        let mut body = b"PK\x03\x04".to_vec();
        body.extend(vec![7u8; 1000]);
        std::fs::write(&p, &body).unwrap();
        assert!(!zip_is_complete(&p), "no end record yet");
        body.extend(&eocd);
        std::fs::write(&p, &body).unwrap();
        assert!(zip_is_complete(&p));
        body.extend(b"junk");
        std::fs::write(&p, &body).unwrap();
        assert!(!zip_is_complete(&p), "the record must end the file");
    }
}
