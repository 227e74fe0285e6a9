//! The session: the link to the worker and what it has told the app (run state, config, loss
//! history, the latest snapshot, status and error line).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::spd::config::SpdConfig;
use crate::spd::trainer::StepRecord;
use crate::worker::{Command, Event, RunState, Snapshot, WorkerHandle};

pub struct Session {
    pub(crate) worker: Option<WorkerHandle>,
    pub state: RunState,
    pub description: String,
    pub config: Option<SpdConfig>,
    pub history: Vec<StepRecord>,
    /// Live changes of the running config: (step, what changed), marked on the curves.
    pub markers: Vec<(usize, String)>,
    pub snapshot: Option<Arc<Snapshot>>,
    /// Bumped with every snapshot (texture keys).
    pub snapshot_version: u64,
    pub status: String,
    /// The one error line of the UI (worker errors, job failures, exports).
    pub error: Option<String>,
    pub steps_per_sec: f32,
    rate_probe: Option<(Instant, usize)>,
    /// (time, step) of the first and the latest step event, for the throughput report.
    pub(crate) throughput: Option<((Instant, usize), (Instant, usize))>,
    /// Start training as soon as the run is loaded (`--train-preset`).
    pub(crate) start_training: bool,
    /// The sweep folder being watched (the sweep view), if one was opened.
    pub sweep: Option<super::sweep_watch::SweepWatch>,
    /// The goodfire-ai/spd run folder being watched, the watcher version last applied and
    /// the checkpoint step loaded from it.
    pub run_watch: Option<super::run_watch::RunWatch>,
    pub(crate) run_watch_seen: u64,
    pub(crate) run_watch_loaded: Option<usize>,
    /// The run's timeline (steps and per-frame statistics), when it keeps one.
    pub timeline: Option<Arc<crate::timeline::TimelineIndex>>,
    /// The frame (its step) the user wants shown; None: the live run.
    pub want_frame: Option<usize>,
    /// The frame request the worker is answering (one at a time: scrubbing never queues).
    frame_in_flight: Option<Option<usize>>,
}

impl Session {
    pub fn new(worker: Option<WorkerHandle>) -> Self {
        Session {
            worker,
            state: RunState::Idle,
            description: String::new(),
            config: None,
            history: vec![],
            markers: vec![],
            snapshot: None,
            snapshot_version: 0,
            status: "loading...".into(),
            error: None,
            steps_per_sec: 0.0,
            rate_probe: None,
            throughput: None,
            start_training: false,
            sweep: None,
            run_watch: None,
            run_watch_seen: 0,
            run_watch_loaded: None,
            timeline: None,
            want_frame: None,
            frame_in_flight: None,
        }
    }

    /// The frame (step) the views show now; None: the live run.
    pub fn shown_frame(&self) -> Option<usize> {
        self.snapshot.as_ref().and_then(|s| s.frame)
    }

    /// Shows the timeline frame at `step` in every view (None: back to the live run). The
    /// worker answers with a snapshot of that frame; requests made meanwhile collapse into
    /// the newest.
    pub fn show_frame(&mut self, step: Option<usize>) {
        self.want_frame = step;
        self.pump_frames();
    }

    /// Whether the views show what was asked for (no frame request outstanding).
    pub fn frame_settled(&self) -> bool {
        self.frame_in_flight.is_none() && self.want_frame == self.shown_frame()
    }

    fn pump_frames(&mut self) {
        if self.frame_in_flight.is_some() || self.snapshot.is_none() {
            return;
        }
        if self.want_frame != self.shown_frame() && self.send(Command::ShowFrame(self.want_frame)) {
            self.frame_in_flight = Some(self.want_frame);
        }
    }

    /// Sends a command to the worker; false when there is none (tests).
    pub fn send(&self, c: Command) -> bool {
        match &self.worker {
            Some(w) => {
                w.send(c);
                true
            }
            None => false,
        }
    }

    /// Sends a command to the worker from another thread (None without a worker).
    pub fn commands(&self) -> Option<crate::worker::CommandSender> {
        self.worker.as_ref().map(|w| w.commands())
    }

    /// Events waiting from the worker (never blocks).
    pub fn take_events(&self) -> Vec<Event> {
        match &self.worker {
            Some(w) => w.rx.try_iter().collect(),
            None => vec![],
        }
    }

    pub fn step(&self) -> usize {
        self.history.last().map(|r| r.step + 1).unwrap_or(0)
    }

    /// Applies a worker event to the session's state.
    pub fn apply(&mut self, e: Event) {
        match e {
            Event::Loaded {
                description,
                config,
                step,
                history,
            } => {
                self.timeline = None;
                self.want_frame = None;
                self.frame_in_flight = None;
                self.description = description;
                self.status = format!("loaded at step {step}");
                self.config = Some(*config);
                self.history = history;
                self.error = None;
                if self.start_training {
                    self.start_training = false;
                    self.send(Command::Start);
                }
            }
            Event::ConfigChanged(c) => self.config = Some(*c),
            Event::Step(rec) => {
                let s = rec.step;
                let now = Instant::now();
                match self.rate_probe {
                    Some((t, s0)) if now - t >= Duration::from_millis(500) => {
                        self.steps_per_sec = (s - s0) as f32 / (now - t).as_secs_f32();
                        self.rate_probe = Some((now, s));
                    }
                    None => self.rate_probe = Some((now, s)),
                    _ => {}
                }
                self.throughput = Some(match self.throughput {
                    Some((first, _)) => (first, (now, s)),
                    None => ((now, s), (now, s)),
                });
                self.history.push(rec);
            }
            Event::Snapshot(s) => {
                if self.frame_in_flight == Some(s.frame) {
                    self.frame_in_flight = None;
                }
                self.snapshot = Some(s);
                self.snapshot_version += 1;
                self.pump_frames();
            }
            Event::Timeline(t) => {
                // A frame looked at that thinning removed: the nearest one left.
                if let Some(w) = self.want_frame
                    && !t.steps.contains(&w)
                {
                    let near = t.nearest(w).map(|i| t.steps[i]);
                    self.timeline = Some(t);
                    self.show_frame(near);
                } else {
                    self.timeline = Some(t);
                }
            }
            Event::State(s) => {
                self.state = s;
                if s != RunState::Running {
                    self.rate_probe = None;
                }
                self.status = match s {
                    RunState::Idle => "ready".into(),
                    RunState::Running => "training".into(),
                    RunState::Paused => "paused".into(),
                    RunState::Finished => "finished".into(),
                };
            }
            Event::Saved(p) => self.status = format!("saved {}", p.display()),
            Event::Exported(p) => self.status = format!("exported {}", p.display()),
            Event::Intervened(_) => self.error = None,
            Event::Error(m) => {
                // A frame request that failed is not waited for.
                self.frame_in_flight = None;
                self.error = Some(m);
            }
            Event::Clusters {
                data,
                stored: false,
            } => {
                self.status = format!(
                    "clustered: minimum description length at k = {} (Save to keep it)",
                    data.result.best_k
                );
            }
            Event::JobEnded {
                cancelled: true, ..
            } => self.status = "job cancelled".into(),
            Event::Clusters { .. }
            | Event::Traced(_)
            | Event::CustomCi { .. }
            | Event::Sequence { .. }
            | Event::Prompt { .. }
            | Event::Component { .. }
            | Event::Progress { .. }
            | Event::Unlearned(_)
            | Event::JobEnded { .. }
            | Event::ColumnOrder { .. } => {}
        }
    }
}
