//! Watching a sweep folder: a background thread rereads it every second (points finishing,
//! progress of running ones) and hands the newest table to the UI, which never reads files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sweep::{Sweep, SweepTable};

/// A watched sweep folder; the thread stops when this is dropped.
pub struct SweepWatch {
    pub dir: PathBuf,
    latest: Arc<Mutex<Option<Arc<SweepTable>>>>,
    /// Bumped with every new table.
    version: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
}

impl SweepWatch {
    /// Starts watching `dir` (a folder with `sweep.json`); `wake` is called after each new
    /// table (the UI's repaint request).
    pub fn spawn(dir: PathBuf, every: Duration, wake: impl Fn() + Send + 'static) -> SweepWatch {
        let latest = Arc::new(Mutex::new(None));
        let version = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, v, e, s, d) = (
            latest.clone(),
            version.clone(),
            error.clone(),
            stop.clone(),
            dir.clone(),
        );
        std::thread::Builder::new()
            .name("sweep-watch".into())
            .spawn(move || {
                let mut last: Option<String> = None;
                while !s.load(Ordering::Relaxed) {
                    match Sweep::open(&d) {
                        Ok(sw) => {
                            let t = sw.table();
                            // A new table only when something changed (states, progress,
                            // metrics), so the UI rebuilds nothing otherwise.
                            let key = format!(
                                "{:?}",
                                t.rows
                                    .iter()
                                    .map(|r| (
                                        &r.state,
                                        r.progress.as_ref().map(|p| p.step),
                                        r.metrics.len()
                                    ))
                                    .collect::<Vec<_>>()
                            );
                            if last.as_ref() != Some(&key) {
                                last = Some(key);
                                *l.lock().unwrap() = Some(Arc::new(t));
                                v.fetch_add(1, Ordering::Relaxed);
                                *e.lock().unwrap() = None;
                                wake();
                            }
                        }
                        Err(err) => {
                            *e.lock().unwrap() = Some(format!("{err:#}"));
                            wake();
                        }
                    }
                    pause(every, &s);
                }
            })
            .expect("cannot start the sweep watcher thread");
        SweepWatch {
            dir,
            latest,
            version,
            error,
            stop,
        }
    }

    /// The newest table (None before the first read).
    pub fn table(&self) -> Option<Arc<SweepTable>> {
        self.latest.lock().unwrap().clone()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Why the folder cannot be read, if it cannot.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap().clone()
    }
}

/// Sleeps for `every`, waking early once `stop` is set (a watcher's poll interval).
pub(crate) fn pause(every: Duration, stop: &AtomicBool) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < every && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for SweepWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
