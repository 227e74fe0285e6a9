//! The background training thread. It owns the candle tensors (the [`Trainer`]); the UI sends
//! [`Command`]s and receives [`Event`]s. Snapshots are immutable (`Arc<Snapshot>`) and
//! published at a bounded rate; the UI never blocks on the worker. No UI crate is used here:
//! the UI passes a `notify` callback (egui's `request_repaint`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::io::spdlab_file::{self, FileExtras};
use crate::model::Fold;
use crate::spd::config::SpdConfig;
use crate::spd::trainer::{StepRecord, Trainer};

/// Where a run comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A preset with an edited config (new training run).
    Preset {
        name: String,
        config: Box<SpdConfig>,
    },
    /// A `.spdlab` file or a reference run.
    File(PathBuf),
    /// The embedded default decomposition.
    Default,
    /// A decomposition shipped in the binary (`assets::decomposition`), e.g. "days".
    Asset(String),
}

/// An export's bytes, computed on the worker (a CSV of millions of values, a PNG encode). The
/// job runs once; the wrapper lets [`Command`] stay `Clone` and `Debug`.
#[derive(Clone)]
pub struct ExportJob(Arc<std::sync::Mutex<Option<ExportFn>>>);
type ExportFn = Box<dyn FnOnce() -> anyhow::Result<Vec<u8>> + Send>;

impl ExportJob {
    pub fn new(f: impl FnOnce() -> anyhow::Result<Vec<u8>> + Send + 'static) -> Self {
        ExportJob(Arc::new(std::sync::Mutex::new(Some(Box::new(f)))))
    }
    /// Runs the job (once; a second run is an error).
    pub fn run(&self) -> anyhow::Result<Vec<u8>> {
        let f = self.0.lock().ok().and_then(|mut g| g.take());
        match f {
            Some(f) => f(),
            None => anyhow::bail!("this export has already run"),
        }
    }
}

impl std::fmt::Debug for ExportJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportJob")
    }
}

#[derive(Clone, Debug)]
pub enum Command {
    Load(Source),
    /// Compute an export's bytes and write them to the path (atomically); answered with
    /// [`Event::Exported`] or an error naming the file.
    Export {
        path: PathBuf,
        job: ExportJob,
    },
    Start,
    Pause,
    Resume,
    Stop,
    /// Change the peak learning rate of the running schedule.
    SetLr(f64),
    /// Change a loss term's coefficient in the running config (by its class name).
    SetLossCoeff {
        name: String,
        coeff: f64,
    },
    /// Device for the next load ("cpu", or "cuda" in builds with the cuda feature).
    SetDevice(String),
    /// Rows of the data-batch CI heatmap in snapshots (default 256).
    SetBatchRows(usize),
    Save(PathBuf),
    /// Probe value of the one-hot inputs in snapshots.
    SetProbeValue(f32),
    /// Run an intervention on the current decomposition.
    Intervene(InterventionRequest),
    /// Mechanism trace of one input.
    Trace {
        input: Vec<f32>,
        threshold: f32,
    },
    /// Run a merge clustering with these options (a long job: [`Event::Progress`], then
    /// [`Event::Clusters`] and [`Event::JobEnded`]; cancel with [`Command::Cancel`]). The result
    /// is kept in the file extras (written by the next Save).
    Cluster(crate::cluster::ClusterOptions),
    /// Keep this clustering in the file extras (written by the next Save).
    StoreClusters(Box<crate::cluster::ClusteringResult>),
    /// Cancel the running job of this kind (its result, if it still comes, is dropped).
    Cancel(JobKind),
    /// Harvest the shown language-model decomposition over up to `max_tokens` of its text (a
    /// long job); the result is kept in the file extras and component pages read it.
    Harvest {
        max_tokens: usize,
    },
    /// Targeted unlearning on a tiny-lm decomposition with its stored clustering (a long job):
    /// the clusters whose ablation removes `rule` while the other planted rules stay ≥ 0.9,
    /// scored on `stories` held-out stories (answered by [`Event::Unlearned`]).
    Unlearn {
        rule: crate::tinylm::Rule,
        stories: usize,
    },
    /// Lower-leaky CI of every module on one custom input row (answered by [`Event::CustomCi`]).
    CustomCi(Vec<f32>),
    /// One token sequence through a sequence model: CI per position, attention patterns
    /// (target, full, `select` ablated), KL and top predictions per position (answered by
    /// [`Event::Sequence`] with the same key).
    Sequence {
        key: u64,
        tokens: Vec<f32>,
        /// A selection to ablate (`layer:index`, `cluster:id`, ...); empty for none.
        select: String,
    },
    /// A text prompt through a language-model decomposition (the run's tokenizer): tokens, CI
    /// per module per token, next-token predictions (answered by [`Event::Prompt`]).
    Prompt {
        key: u64,
        text: String,
        /// A selection to intervene on (`layer:index`, `cluster:id`, ...; empty: none) and
        /// its mask (0 ablate, 1 keep, 2 boost).
        select: String,
        scale: f32,
    },
    /// A subcomponent's page (language models): its top-activating contexts over the run's
    /// text (up to `max_windows` windows) and the tokens its write direction promotes and
    /// suppresses (answered by [`Event::Component`]).
    Component {
        key: u64,
        module: usize,
        index: usize,
        max_windows: usize,
    },
    /// Show the timeline frame at this step in every view (a snapshot with `frame` set), or
    /// the live run (None). Interventions, probes and custom CI then run on the shown frame.
    ShowFrame(Option<usize>),
    /// How the run keeps its timeline from the next step on (0 frames: none).
    SetTimeline(crate::timeline::TimelineOptions),
    /// Hungarian column order of module `module` of `snapshot` (its probe CI permuted towards
    /// the identity), answered by [`Event::ColumnOrder`] with the same `key`.
    ColumnOrder {
        key: u64,
        module: usize,
        snapshot: Arc<Snapshot>,
    },
    Shutdown,
}

/// Inputs of an intervention.
#[derive(Clone, Debug, PartialEq)]
pub enum InputSet {
    /// One-hot probes at a value (days: every (day, operation)).
    Probes(f32),
    /// Rows from the training distribution (seeded).
    Batch { n: usize, seed: u64 },
    /// One custom row.
    Custom(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct InterventionRequest {
    /// Selection spec (`layer:index`, `layer:a-b`, `layer:*`, `cluster:id`, comma-separated).
    pub select: String,
    pub selected_mode: crate::interventions::MaskMode,
    pub other_mode: crate::interventions::MaskMode,
    pub delta: bool,
    pub inputs: InputSet,
    pub seed: u64,
}

/// An intervention's result, with the labels it selected.
#[derive(Clone, Debug)]
pub struct InterventionOutcome {
    pub request: InterventionRequest,
    pub labels: Vec<String>,
    pub result: crate::interventions::InterventionResult,
    /// Short description of every input row.
    pub input_labels: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Idle,
    Running,
    Paused,
    Finished,
}

/// Everything the views draw, computed once per snapshot.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub step: usize,
    pub n_features: usize,
    pub probe_value: f32,
    pub modules: Vec<ModuleSnapshot>,
    /// Rows of the decomposed modules per input: 1, or the positions of a sequence. CI rows
    /// (`n_batch`, `n_probe`, the heatmaps) count module rows: row = input · positions +
    /// position.
    pub positions: usize,
    /// Inputs of the data-batch heatmap, `[n_batch / positions, n_features]`.
    pub batch_inputs: Vec<f32>,
    pub n_batch: usize,
    /// Rows of the probe heatmaps (`n_features` one-hot probes; days: every (day, op);
    /// sequence models: every position of a few sample sequences).
    pub n_probe: usize,
    pub probe_labels: Vec<String>,
    /// Sequence models: the sample sequences of the probe rows, `[n_probe / positions,
    /// n_features]`.
    pub probe_inputs: Vec<f32>,
    /// Sequence models: the architecture (token ids, positions).
    pub sequence: Option<crate::model::IhDims>,
    /// The clustering stored with the decomposition, if any.
    pub clusters: Option<Arc<crate::cluster::ClusteringResult>>,
    /// Days models: everything the days view draws.
    pub days: Option<Arc<crate::metrics::days::DaysViewData>>,
    /// Range of one input feature's values (TargetSpec::value_range).
    pub value_range: (f32, f32),
    /// The timeline frame (its step) this snapshot shows; None: the live run.
    pub frame: Option<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct ModuleSnapshot {
    pub name: String,
    pub c: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// `[d_in, C]`.
    pub v: Vec<f32>,
    /// `[C, d_out]`.
    pub u: Vec<f32>,
    /// Target weight `[d_out, d_in]`.
    pub target_w: Vec<f32>,
    /// Lower-leaky CI on one-hot probes `[n_features, C]` (shared with the heatmaps that draw
    /// it, which upload it as it is).
    pub ci_probe: Arc<Vec<f32>>,
    /// Lower-leaky CI on a data batch `[n_batch, C]`.
    pub ci_batch: Arc<Vec<f32>>,
    /// Frobenius norm of each rank-one subcomponent (‖V_c‖·‖U_c‖).
    pub norms: Vec<f32>,
    /// Mean CI per component over the batch.
    pub mean_ci: Vec<f32>,
    /// Subcomponents whose CI exceeds the config's `ci_alive_threshold` on some batch row.
    pub alive: usize,
    /// Mean number of subcomponents above that threshold per batch row.
    pub l0: f64,
    /// Histogram of the batch's lower-leaky CI values: [`CI_HIST_BINS`] equal bins over [0, 1]
    /// (values outside clamp into the end bins).
    pub ci_hist: Vec<u32>,
}

/// Bins of [`ModuleSnapshot::ci_hist`].
pub const CI_HIST_BINS: usize = 20;

pub enum Event {
    Loaded {
        description: String,
        config: Box<SpdConfig>,
        step: usize,
        history: Vec<StepRecord>,
    },
    Step(StepRecord),
    /// The running config changed (live learning rate or coefficient).
    ConfigChanged(Box<SpdConfig>),
    Snapshot(Arc<Snapshot>),
    State(RunState),
    Saved(PathBuf),
    /// An export was written.
    Exported(PathBuf),
    Intervened(Arc<InterventionOutcome>),
    Traced(Arc<crate::interventions::Trace>),
    Error(String),
    /// A clustering with its co-activation data: the stored clustering of a loaded file
    /// (`stored`) or one run by [`Command::Cluster`] (already kept in the file extras).
    Clusters {
        data: Arc<crate::app::cluster_data::ClusterData>,
        stored: bool,
    },
    /// The answer to [`Command::Unlearn`].
    Unlearned(Arc<crate::tinylm::Unlearning>),
    /// A long job moved on: `stage` of it is running, `fraction` of the job is done.
    Progress {
        job: u64,
        kind: JobKind,
        stage: &'static str,
        fraction: f32,
    },
    /// A job ended (done, failed with an [`Event::Error`], or cancelled).
    JobEnded {
        job: u64,
        kind: JobKind,
        cancelled: bool,
    },
    /// Answer to [`Command::ColumnOrder`].
    ColumnOrder {
        key: u64,
        module: usize,
        order: Vec<usize>,
    },
    /// CI of one custom input row, one `Vec` of C values per module.
    CustomCi {
        input: Vec<f32>,
        ci: Vec<Vec<f32>>,
    },
    /// The run's timeline changed (after a load, new frames while training): steps and
    /// per-frame statistics.
    Timeline(Arc<crate::timeline::TimelineIndex>),
    /// The answer to [`Command::Component`].
    Component {
        key: u64,
        page: Arc<crate::text::ComponentPage>,
    },
    /// The answer to [`Command::Prompt`].
    Prompt {
        key: u64,
        result: Arc<crate::text::PromptResult>,
    },
    /// The answer to [`Command::Sequence`].
    Sequence {
        key: u64,
        probe: Arc<crate::sequence::SequenceProbe>,
    },
}

/// Kinds of long jobs (one of each kind runs at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    Clustering,
    Harvest,
    Unlearn,
}

/// Upper-leaky CI `[n_samples, Σ C]` of a fresh data batch, with column labels `module:index`.
#[derive(Clone, Debug)]
pub struct ClusterInput {
    pub stored: Option<crate::cluster::ClusteringResult>,
    /// The target's known answer, if it has one (the clustering is scored against it).
    pub truth: Option<crate::cluster::score::Truth>,
    pub options: crate::cluster::ClusterOptions,
    pub acts: Vec<f32>,
    pub labels: Vec<String>,
    pub n_samples: usize,
}

pub struct WorkerHandle {
    pub rx: Receiver<Event>,
    tx: Sender<Msg>,
    join: Option<JoinHandle<()>>,
}

/// What the worker thread receives: the UI's commands and its own jobs' reports.
enum Msg {
    Cmd(Command),
    Progress {
        job: u64,
        stage: &'static str,
        fraction: f32,
    },
    Done {
        job: u64,
        result: Box<Result<JobResult, String>>,
    },
}

enum JobResult {
    Clusters {
        data: Box<crate::app::cluster_data::ClusterData>,
        stored: bool,
    },
    Harvest(Box<crate::harvest::Harvest>),
    Unlearn(Box<crate::tinylm::Unlearning>),
}

/// The running long job.
struct Job {
    id: u64,
    kind: JobKind,
    cancel: Arc<AtomicBool>,
}

impl WorkerHandle {
    pub fn spawn(device: Device, notify: Box<dyn Fn() + Send>) -> Self {
        let (tx, crx) = crossbeam_channel::unbounded();
        let (etx, rx) = crossbeam_channel::unbounded();
        let self_tx = tx.clone();
        let join = std::thread::Builder::new()
            .name("spdlab-worker".into())
            .spawn(move || Worker::new(device, crx, self_tx, etx, notify).run())
            .expect("spawn worker thread");
        WorkerHandle {
            rx,
            tx,
            join: Some(join),
        }
    }

    pub fn send(&self, cmd: Command) {
        let _ = self.tx.send(Msg::Cmd(cmd));
    }

    /// A sender of commands that can move to other threads (e.g. a screenshot callback).
    pub fn commands(&self) -> CommandSender {
        CommandSender(self.tx.clone())
    }
}

/// Sends commands to a worker from anywhere.
#[derive(Clone)]
pub struct CommandSender(Sender<Msg>);

impl CommandSender {
    pub fn send(&self, cmd: Command) {
        let _ = self.0.send(Msg::Cmd(cmd));
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Cmd(Command::Shutdown));
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

struct Worker {
    device: Device,
    rx: Receiver<Msg>,
    /// For the job threads' reports.
    self_tx: Sender<Msg>,
    tx: Sender<Event>,
    notify: Box<dyn Fn() + Send>,
    trainer: Option<Trainer>,
    extras: FileExtras,
    clusters: Option<Arc<crate::cluster::ClusteringResult>>,
    state: RunState,
    probe_value: f32,
    batch_rows: usize,
    last_snapshot: Instant,
    snapshot_every: Duration,
    job: Option<Job>,
    next_job: u64,
    /// The timeline frame shown instead of the live run (a trainer of its parameters).
    viewing: Option<Trainer>,
    /// Timeline options of runs that start training here without one.
    timeline_options: crate::timeline::TimelineOptions,
    /// Version of the timeline last sent to the app.
    timeline_sent: Option<u64>,
    /// The tokenizer of a language-model run, when one is on this machine.
    tokenizer: Option<Arc<crate::text::TextTokenizer>>,
    /// The harvest of the loaded run (stored in its file or made here).
    harvest: Option<Arc<crate::harvest::Harvest>>,
}

impl Worker {
    fn new(
        device: Device,
        rx: Receiver<Msg>,
        self_tx: Sender<Msg>,
        tx: Sender<Event>,
        notify: Box<dyn Fn() + Send>,
    ) -> Self {
        Worker {
            device,
            rx,
            self_tx,
            tx,
            notify,
            trainer: None,
            extras: FileExtras::default(),
            clusters: None,
            state: RunState::Idle,
            probe_value: 0.75,
            batch_rows: 256,
            last_snapshot: Instant::now(),
            snapshot_every: Duration::from_millis(250),
            job: None,
            next_job: 0,
            viewing: None,
            timeline_options: Default::default(),
            timeline_sent: None,
            tokenizer: None,
            harvest: None,
        }
    }

    fn emit(&self, e: Event) {
        let _ = self.tx.send(e);
        (self.notify)();
    }

    fn set_state(&mut self, s: RunState) {
        self.state = s;
        self.emit(Event::State(s));
    }

    fn run(mut self) {
        loop {
            let cmd = if self.state == RunState::Running {
                match self.rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => return,
                }
            } else {
                match self.rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            if let Some(msg) = cmd {
                let cmd = match msg {
                    Msg::Cmd(c) => c,
                    Msg::Progress {
                        job,
                        stage,
                        fraction,
                    } => {
                        if let Some(j) = self.job.as_ref().filter(|j| j.id == job) {
                            let kind = j.kind;
                            self.emit(Event::Progress {
                                job,
                                kind,
                                stage,
                                fraction,
                            });
                        }
                        continue;
                    }
                    Msg::Done { job, result } => {
                        // A failed job reports its error without pausing the training.
                        if let Err(e) = self.job_done(job, *result) {
                            self.emit(Event::Error(first_line(&e)));
                        }
                        continue;
                    }
                };
                if matches!(cmd, Command::Shutdown) {
                    self.cancel_job(false);
                    return;
                }
                if let Err(e) = self.handle(cmd) {
                    self.fail(e);
                }
                continue;
            }
            if let Err(e) = self.train_step() {
                self.fail(e);
            }
        }
    }

    fn fail(&mut self, e: anyhow::Error) {
        let msg = first_line(&e);
        if self.state == RunState::Running {
            self.set_state(RunState::Paused);
        }
        self.emit(Event::Error(msg));
    }

    fn handle(&mut self, cmd: Command) -> anyhow::Result<()> {
        match cmd {
            Command::Load(src) => {
                self.cancel_job(true);
                self.tokenizer = None;
                let origin = match &src {
                    Source::File(p) => p.clone(),
                    _ => std::path::PathBuf::from("."),
                };
                let (tr, extras, description) = match src {
                    Source::Preset { name, config } => {
                        let target = crate::presets::target_model(&name, &self.device)?;
                        let tr = Trainer::new(target, *config)?;
                        let ex = FileExtras {
                            preset: Some(name.clone()),
                            ..Default::default()
                        };
                        (tr, ex, format!("new run: preset {name}"))
                    }
                    Source::File(p) => {
                        let (tr, ex, _) = crate::io::load_any(&p, &self.device)?;
                        (tr, ex, p.display().to_string())
                    }
                    Source::Default => {
                        let (tr, ex) = spdlab_file::from_bytes(
                            crate::assets::default_decomposition(),
                            &self.device,
                        )?;
                        (tr, ex, "embedded tms-5-2 decomposition".to_string())
                    }
                    Source::Asset(name) => {
                        let bytes = crate::assets::decomposition(&name)
                            .ok_or_else(|| anyhow::anyhow!("no shipped decomposition '{name}'"))?;
                        let (tr, ex) = spdlab_file::from_bytes(bytes, &self.device)?;
                        (tr, ex, format!("embedded {name} decomposition"))
                    }
                };
                if let crate::model::TargetSpec::Lm { .. } = tr.model.target.spec {
                    self.tokenizer = crate::text::run_tokenizer(&tr.config, &origin)
                        .ok()
                        .map(Arc::new);
                }
                self.harvest = match crate::harvest::Harvest::stored(&extras.extra, &tr.model) {
                    Ok(h) => h.map(Arc::new),
                    Err(e) => {
                        self.emit(Event::Error(format!("{e}; harvest ignored")));
                        None
                    }
                };
                self.emit(Event::Loaded {
                    description,
                    config: Box::new(tr.config.clone()),
                    step: tr.step,
                    history: tr.history.clone(),
                });
                self.trainer = Some(tr);
                self.viewing = None;
                self.timeline_sent = None;
                self.clusters = None;
                match crate::interventions::stored_clusters(&extras.extra) {
                    Ok(c) => self.clusters = c.map(Arc::new),
                    Err(e) => self.emit(Event::Error(format!("{e}; clusters ignored"))),
                }
                self.extras = extras;
                let st = if self.trainer.as_ref().is_some_and(|t| t.is_done()) {
                    RunState::Finished
                } else {
                    RunState::Idle
                };
                self.set_state(st);
                self.publish_snapshot()?;
                self.send_timeline();
                if let Some(v) = self.extras.extra.get("clusters") {
                    let stored: crate::cluster::ClusteringResult =
                        serde_json::from_value(v.clone()).map_err(|e| {
                            anyhow::anyhow!("the stored clustering is unreadable: {e}")
                        })?;
                    self.start_clustering(stored.options.clone(), Some(stored))?;
                }
            }
            Command::Cluster(opts) => self.start_clustering(opts, None)?,
            Command::Harvest { max_tokens } => self.start_harvest(max_tokens)?,
            Command::Unlearn { rule, stories } => self.start_unlearn(rule, stories)?,
            Command::Cancel(kind) => {
                if self.job.as_ref().is_some_and(|j| j.kind == kind) {
                    self.cancel_job(true);
                }
            }
            Command::ColumnOrder {
                key,
                module,
                snapshot,
            } => {
                let m = snapshot
                    .modules
                    .get(module)
                    .ok_or_else(|| anyhow::anyhow!("no module {module} in the snapshot"))?;
                let order = crate::metrics::toy_metrics::permute_to_identity(
                    &m.ci_probe,
                    snapshot.n_probe,
                    m.c,
                );
                self.emit(Event::ColumnOrder { key, module, order });
            }
            Command::StoreClusters(res) => {
                self.extras
                    .extra
                    .insert("clusters".into(), serde_json::to_value(&*res)?);
                // Interventions (`cluster:id`) and the days view use it from now on.
                self.clusters = Some(Arc::new(*res));
                self.publish_snapshot()?;
            }
            Command::ShowFrame(step) => {
                self.viewing = match (step, self.trainer.as_ref()) {
                    (Some(s), Some(tr)) => {
                        let tl = tr
                            .timeline
                            .as_ref()
                            .ok_or_else(|| anyhow::anyhow!("this run has no timeline"))?;
                        let f = tl.frame_at(s).ok_or_else(|| {
                            anyhow::anyhow!("the timeline has no frame at step {s}")
                        })?;
                        Some(crate::timeline::frame_trainer(tr, tl, f)?)
                    }
                    _ => None,
                };
                self.publish_snapshot()?;
            }
            Command::SetTimeline(o) => {
                self.timeline_options = o;
                if let Some(tr) = self.trainer.as_mut()
                    && (tr.timeline.is_some() || tr.step > 0)
                {
                    tr.set_timeline(o);
                }
                self.send_timeline();
            }
            Command::Prompt {
                key,
                text,
                select,
                scale,
            } => {
                let (tr, tok) = self.shown_lm()?;
                let selection = optional_selection(&select, tr, self.clusters.as_deref())?;
                let iv = selection.as_ref().map(|s| (s, select.clone(), scale));
                let result = crate::text::run_prompt(&tr.model, tok, &text, iv)?;
                self.emit(Event::Prompt {
                    key,
                    result: Arc::new(result),
                });
            }
            Command::Component {
                key,
                module,
                index,
                max_windows,
            } => {
                let (tr, tok) = self.shown_lm()?;
                let crate::data::TaskData::Tokens(data) = &tr.data else {
                    anyhow::bail!("component pages are for language models");
                };
                let page = match self.harvest.as_deref() {
                    Some(h) => crate::text::harvested_page(&tr.model, h, tok, module, index)?,
                    None => crate::text::component_page(
                        &tr.model,
                        data,
                        tok,
                        module,
                        index,
                        max_windows,
                    )?,
                };
                self.emit(Event::Component {
                    key,
                    page: Arc::new(page),
                });
            }
            Command::CustomCi(input) => {
                let Some(tr) = self.shown() else {
                    anyhow::bail!("nothing loaded");
                };
                let ci = custom_ci(tr, &input)?;
                self.emit(Event::CustomCi { input, ci });
            }
            Command::Sequence {
                key,
                tokens,
                select,
            } => {
                let Some(tr) = self.shown() else {
                    anyhow::bail!("nothing loaded");
                };
                let selection = optional_selection(&select, tr, self.clusters.as_deref())?;
                let probe =
                    crate::sequence::probe_sequence(&tr.model, &tokens, selection.as_ref())?;
                self.emit(Event::Sequence {
                    key,
                    probe: Arc::new(probe),
                });
            }
            Command::Start | Command::Resume => {
                let Some(tr) = self.trainer.as_mut() else {
                    anyhow::bail!("nothing loaded");
                };
                if tr.is_done() {
                    anyhow::bail!("this run has finished all {} steps", tr.config.steps);
                }
                if tr.timeline.is_none() {
                    tr.set_timeline(self.timeline_options);
                }
                if !self.extras.warmup_done {
                    tr.faithfulness_warmup()?;
                    self.extras.warmup_done = true;
                }
                self.set_state(RunState::Running);
            }
            Command::Pause => {
                if self.state == RunState::Running {
                    self.set_state(RunState::Paused);
                    self.publish_snapshot()?;
                }
            }
            Command::Stop => {
                if matches!(self.state, RunState::Running | RunState::Paused) {
                    self.set_state(RunState::Idle);
                    self.publish_snapshot()?;
                }
            }
            Command::SetDevice(name) => {
                self.device = crate::runner::device(&name)?;
            }
            Command::SetBatchRows(n) => {
                self.batch_rows = n.clamp(1, 1 << 16);
                self.publish_snapshot()?;
            }
            Command::SetLr(lr) => {
                if let Some(tr) = self.trainer.as_mut() {
                    if !(lr.is_finite() && lr >= 0.0) {
                        anyhow::bail!("learning rate must be a finite non-negative number");
                    }
                    tr.config.lr_schedule.start_val = lr;
                    let c = Box::new(tr.config.clone());
                    self.emit(Event::ConfigChanged(c));
                }
            }
            Command::SetLossCoeff { name, coeff } => {
                if let Some(tr) = self.trainer.as_mut() {
                    if !(coeff.is_finite() && coeff >= 0.0) {
                        anyhow::bail!("{name}: the coefficient must be a finite number >= 0");
                    }
                    let Some(l) = tr
                        .config
                        .loss_metric_configs
                        .iter_mut()
                        .find(|l| l.name() == name)
                    else {
                        anyhow::bail!("the running config has no loss term {name}");
                    };
                    l.coeff = Some(coeff);
                    let c = Box::new(tr.config.clone());
                    self.emit(Event::ConfigChanged(c));
                }
            }
            Command::SetProbeValue(v) => {
                self.probe_value = v;
                self.publish_snapshot()?;
            }
            Command::Export { path, job } => {
                let bytes = job
                    .run()
                    .map_err(|e| anyhow::anyhow!("export to {} failed: {e:#}", path.display()))?;
                crate::io::atomic::write_atomic(&path, &bytes)
                    .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?;
                self.emit(Event::Exported(path));
            }
            Command::Save(p) => {
                let Some(tr) = self.trainer.as_mut() else {
                    anyhow::bail!("nothing to save");
                };
                if tr.step > 0 {
                    // The state saved is the timeline's newest frame (replaced by the next
                    // frame on the grid if training goes on).
                    tr.capture_frame(true)?;
                }
                spdlab_file::save(tr, &self.extras, &p)?;
                self.send_timeline();
                self.emit(Event::Saved(p));
            }
            Command::Intervene(req) => {
                let Some(tr) = self.shown() else {
                    anyhow::bail!("nothing loaded");
                };
                let out = intervene(tr, self.clusters.as_deref(), req)?;
                self.emit(Event::Intervened(Arc::new(out)));
            }
            Command::Trace { input, threshold } => {
                let Some(tr) = self.shown() else {
                    anyhow::bail!("nothing loaded");
                };
                let t = crate::interventions::trace(
                    &tr.model,
                    &input,
                    threshold,
                    self.clusters.as_deref(),
                )?;
                self.emit(Event::Traced(Arc::new(t)));
            }
            Command::Shutdown => {}
        }
        Ok(())
    }

    fn train_step(&mut self) -> anyhow::Result<()> {
        let Some(tr) = self.trainer.as_mut() else {
            self.set_state(RunState::Idle);
            return Ok(());
        };
        let rec = tr.step()?;
        let done = tr.is_done();
        self.emit(Event::Step(rec));
        if done {
            self.set_state(RunState::Finished);
            self.send_timeline();
            if self.viewing.is_none() {
                self.publish_snapshot()?;
            }
        } else if self.last_snapshot.elapsed() >= self.snapshot_every {
            self.send_timeline();
            if self.viewing.is_none() {
                // A frame being looked at stays; the live run's snapshots wait.
                self.publish_snapshot()?;
            } else {
                self.last_snapshot = Instant::now();
            }
        }
        Ok(())
    }

    /// Registers a new long job of `kind` (cancelling the running one) and reports its
    /// first stage; returns its id and cancel flag.
    fn begin_job(&mut self, kind: JobKind, stage: &'static str) -> (u64, Arc<AtomicBool>) {
        self.cancel_job(true);
        let id = self.next_job;
        self.next_job += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        self.job = Some(Job {
            id,
            kind,
            cancel: cancel.clone(),
        });
        self.emit(Event::Progress {
            job: id,
            kind,
            stage,
            fraction: 0.0,
        });
        (id, cancel)
    }

    /// Runs job `id`'s work on its own thread: `work` gets a progress reporter (which answers
    /// false once the job is cancelled); its result comes back as [`Msg::Done`] unless the
    /// job was cancelled.
    fn spawn_job(
        &mut self,
        id: u64,
        cancel: Arc<AtomicBool>,
        name: &str,
        work: impl FnOnce(&(dyn Fn(&'static str, f32) -> bool + Sync)) -> Result<JobResult, String>
        + Send
        + 'static,
    ) -> anyhow::Result<()> {
        let tx = self.self_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("spdlab-{name}"))
            .spawn(move || {
                let report = |stage: &'static str, fraction: f32| {
                    let _ = tx.send(Msg::Progress {
                        job: id,
                        stage,
                        fraction,
                    });
                    !cancel.load(Ordering::Relaxed)
                };
                let result = work(&report);
                if !cancel.load(Ordering::Relaxed) {
                    let _ = tx.send(Msg::Done {
                        job: id,
                        result: Box::new(result),
                    });
                }
            });
        if let Err(e) = spawned {
            self.end_job(id, false);
            anyhow::bail!("cannot start the {name} thread: {e}");
        }
        Ok(())
    }

    /// Starts a clustering job: the activations batch here (it needs the model), the merge and
    /// the co-activation counts on a job thread that reports progress and checks for cancel.
    fn start_clustering(
        &mut self,
        options: crate::cluster::ClusterOptions,
        stored: Option<crate::cluster::ClusteringResult>,
    ) -> anyhow::Result<()> {
        if self.trainer.is_none() {
            anyhow::bail!("nothing loaded");
        }
        let (id, cancel) = self.begin_job(JobKind::Clustering, "activations");
        let Some(tr) = self.trainer.as_ref() else {
            anyhow::bail!("nothing loaded");
        };
        let n = options.n_samples.clamp(1, 1 << 16);
        let (acts, labels) = match crate::cluster::activations(tr, n, options.ci, options.seed) {
            Ok(x) => x,
            Err(e) => {
                self.end_job(id, false);
                return Err(e.context("clustering failed"));
            }
        };
        let truth = crate::cluster::score::ground_truth(&tr.model).unwrap_or(None);
        let input = ClusterInput {
            stored,
            truth,
            options,
            acts,
            labels,
            n_samples: n,
        };
        self.spawn_job(id, cancel, "cluster", move |report| {
            let stored = input.stored.is_some();
            crate::app::cluster_data::ClusterData::build_with(&input, report)
                .map(|data| JobResult::Clusters {
                    data: Box::new(data),
                    stored,
                })
                .map_err(|e| format!("{e:#}"))
        })
    }

    /// Starts a harvest job on a copy of the shown decomposition (training goes on).
    fn start_harvest(&mut self, max_tokens: usize) -> anyhow::Result<()> {
        let Some(tr) = self.shown() else {
            anyhow::bail!("nothing loaded");
        };
        let text = crate::harvest::RunText::of(tr)?;
        let (model, step) = (tr.model.detached_copy()?, tr.step);
        let (id, cancel) = self.begin_job(JobKind::Harvest, "harvest");
        let flag = cancel.clone();
        self.spawn_job(id, cancel, "harvest", move |report| {
            text.harvest(&model, max_tokens, step, &flag, &|d, n| {
                report("harvest", d as f32 / n.max(1) as f32);
            })
            .map(|h| JobResult::Harvest(Box::new(h)))
            .map_err(|e| format!("{e:#}"))
        })
    }

    /// Starts the unlearning search on a copy of the shown tiny-lm decomposition.
    fn start_unlearn(&mut self, rule: crate::tinylm::Rule, stories: usize) -> anyhow::Result<()> {
        let (tr, tok) = self.shown_lm()?;
        crate::tinylm::word_ids(tok).map_err(|_| {
            anyhow::anyhow!("unlearning needs a tiny-lm decomposition (its planted rules)")
        })?;
        let Some(clusters) = self.clusters.clone() else {
            anyhow::bail!("unlearning works on clusters: cluster this run first (Clusters view)");
        };
        let model = tr.model.detached_copy()?;
        let tok = self.tokenizer.clone().expect("shown_lm found a tokenizer");
        let (id, cancel) = self.begin_job(JobKind::Unlearn, "scoring the rules");
        self.spawn_job(id, cancel, "unlearn", move |report| {
            crate::tinylm::unlearn(&model, &tok, &clusters, rule, stories, (0.2, 0.9), report)
                .map(|u| JobResult::Unlearn(Box::new(u)))
                .map_err(|e| format!("{e:#}"))
        })
    }

    /// Ends the running job (if any) as cancelled; `report`: tell the UI.
    fn cancel_job(&mut self, report: bool) {
        if let Some(j) = self.job.take() {
            j.cancel.store(true, Ordering::Relaxed);
            if report {
                self.emit(Event::JobEnded {
                    job: j.id,
                    kind: j.kind,
                    cancelled: true,
                });
            }
        }
    }

    fn end_job(&mut self, id: u64, cancelled: bool) {
        if let Some(j) = self.job.take_if(|j| j.id == id) {
            self.emit(Event::JobEnded {
                job: id,
                kind: j.kind,
                cancelled,
            });
        }
    }

    /// A job thread's result: dropped unless it is the running job's.
    fn job_done(&mut self, id: u64, result: Result<JobResult, String>) -> anyhow::Result<()> {
        if self.job.as_ref().is_none_or(|j| j.id != id) {
            return Ok(());
        }
        let r = self.apply_job_result(result);
        // The job ends after its result, or after its error (the UI stops waiting).
        self.end_job(id, false);
        r
    }

    fn apply_job_result(&mut self, result: Result<JobResult, String>) -> anyhow::Result<()> {
        match result {
            Ok(JobResult::Harvest(h)) => {
                // Kept in the file extras (written by the next Save); pages read it.
                self.extras
                    .extra
                    .insert(crate::harvest::EXTRA_KEY.into(), serde_json::to_value(&*h)?);
                self.harvest = Some(Arc::new(*h));
                Ok(())
            }
            Ok(JobResult::Unlearn(u)) => {
                self.emit(Event::Unlearned(Arc::new(*u)));
                Ok(())
            }
            Ok(JobResult::Clusters { data, stored }) => {
                if !stored {
                    // Keep it in the file extras; interventions (`cluster:id`) and the days
                    // view use it from now on.
                    self.extras
                        .extra
                        .insert("clusters".into(), serde_json::to_value(&data.result)?);
                    self.clusters = Some(Arc::new(data.result.clone()));
                    self.publish_snapshot()?;
                }
                self.emit(Event::Clusters {
                    data: Arc::new(*data),
                    stored,
                });
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!("the job failed: {e}")),
        }
    }

    /// The decomposition the views show: the frame looked at, else the live run.
    fn shown(&self) -> Option<&Trainer> {
        self.viewing.as_ref().or(self.trainer.as_ref())
    }

    /// The shown language-model run and its tokenizer.
    fn shown_lm(&self) -> anyhow::Result<(&Trainer, &crate::text::TextTokenizer)> {
        let Some(tr) = self.shown() else {
            anyhow::bail!("nothing loaded");
        };
        let Some(tok) = self.tokenizer.as_deref() else {
            anyhow::bail!(
                "no tokenizer for this run: its tokenizer_name is not a local folder and there is no tokenizer.json beside it"
            );
        };
        Ok((tr, tok))
    }

    /// Sends the timeline's index when it changed since the last one sent.
    fn send_timeline(&mut self) {
        let Some(tr) = self.trainer.as_ref() else {
            return;
        };
        let v = tr.timeline.as_ref().map(|t| t.version);
        if self.timeline_sent == Some(v.unwrap_or(u64::MAX)) {
            return;
        }
        self.timeline_sent = Some(v.unwrap_or(u64::MAX));
        let index = tr.timeline.as_ref().map(|t| t.index()).unwrap_or_default();
        self.emit(Event::Timeline(Arc::new(index)));
    }

    fn publish_snapshot(&mut self) -> anyhow::Result<()> {
        let Some(tr) = self.shown() else {
            return Ok(());
        };
        let mut snap =
            snapshot_with_extras(tr, self.clusters.clone(), self.probe_value, self.batch_rows)?;
        snap.frame = self.viewing.as_ref().map(|t| t.step);
        self.last_snapshot = Instant::now();
        self.emit(Event::Snapshot(Arc::new(snap)));
        Ok(())
    }
}

/// A selection spec (`layer:index`, `cluster:id`, ...) on `tr`'s decomposition; None when empty.
fn optional_selection(
    select: &str,
    tr: &Trainer,
    clusters: Option<&crate::cluster::ClusteringResult>,
) -> anyhow::Result<Option<crate::interventions::Selection>> {
    if select.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(crate::interventions::Selection::parse(
        select, &tr.model, clusters,
    )?))
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or("error")
        .to_string()
}

/// Sample sequences of a sequence model's snapshot (the probe rows: all their positions).
pub const SAMPLE_SEQUENCES: usize = 4;

impl Snapshot {
    /// The description of data-batch row `r` (a module row: for sequences, one position).
    pub fn batch_row_label(&self, r: usize) -> String {
        let nf = self.n_features;
        let (i, p) = (r / self.positions.max(1), r % self.positions.max(1));
        let Some(x) = self.batch_inputs.get(i * nf..(i + 1) * nf) else {
            return format!("batch row {r}");
        };
        match &self.sequence {
            Some(d) => format!(
                "batch sequence {i}, position {p}: token {} ({})",
                x[p] as u32,
                crate::inputs::describe_sequence(d, x)
            ),
            None => format!("batch row {r}: {}", crate::inputs::describe_features(x)),
        }
    }
}

/// Computes a snapshot (probe CI, a data batch's CI, weights) from a trainer.
pub fn build_snapshot(tr: &Trainer, probe_value: f32, n_batch: usize) -> anyhow::Result<Snapshot> {
    let model = &tr.model;
    let spec = &model.target.spec;
    let nf = spec.n_features();
    let dev = model.device().clone();
    // Sequence models: `n_batch` module rows are n_batch / positions whole sequences.
    let positions = spec.positions();
    let n_inputs = (n_batch / positions).max(1);
    let n_batch = n_inputs * positions;
    // A fixed batch (own RNG): the heatmap rows stay the same inputs from snapshot to snapshot,
    // and the training stream is untouched.
    let raw = tr.data.batch(&mut crate::rng::Rng::new(0x5eed), n_inputs);
    let batch = Tensor::from_vec(raw.clone(), (n_inputs, nf), &dev)?;
    let fold = Fold::new();
    let probes = match spec {
        crate::model::TargetSpec::Ih(_) | crate::model::TargetSpec::Lm { .. } => tr
            .data
            .batch(&mut crate::rng::Rng::new(0x5a3b1e), SAMPLE_SEQUENCES)
            .chunks(nf)
            .map(|r| r.to_vec())
            .collect(),
        _ => crate::inputs::probe_inputs(spec, probe_value),
    };
    let n_probe = probes.len() * positions;
    let probe_labels = if spec.is_sequence() {
        probes
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                (0..positions).map(move |p| crate::inputs::describe_position(spec, i, r, p))
            })
            .collect()
    } else {
        probes
            .iter()
            .map(|r| crate::inputs::describe_input(spec, r))
            .collect()
    };
    let probe_inputs = if spec.is_sequence() {
        probes.concat()
    } else {
        vec![]
    };
    let mut ci_probe: Vec<Vec<f32>> = crate::interventions::lower_ci(
        model,
        &Tensor::from_vec(probes.concat(), (probes.len(), nf), &dev)?,
    )?
    .iter()
    .map(|t| t.flatten_all()?.to_vec1::<f32>())
    .collect::<candle_core::Result<_>>()?;
    let (_, bin) = model.target.forward_with_inputs(&batch, &fold)?;
    let (bci, _) = model.causal_importances(&bin, None, &fold)?;
    let mut modules = vec![];
    for (j, m) in model.modules.iter().enumerate() {
        let v: Vec<f32> = m.v.as_tensor().flatten_all()?.to_vec1()?;
        let u: Vec<f32> = m.u.as_tensor().flatten_all()?.to_vec1()?;
        let vn = m.v.as_tensor().sqr()?.sum(0)?.sqrt()?.to_vec1::<f32>()?;
        let un = m.u.as_tensor().sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        let ci_batch: Vec<f32> = bci[j].lower.flatten_all()?.to_vec1()?;
        let mean_ci = crate::metrics::toy_metrics::mean_ci_per_component(&ci_batch, n_batch, m.c)
            .into_iter()
            .map(|x| x as f32)
            .collect();
        let thr = tr.config.ci_alive_threshold;
        let density = crate::metrics::toy_metrics::activation_density(&ci_batch, n_batch, m.c, thr);
        let alive = density.iter().filter(|&&d| d > 0.0).count();
        let l0 = crate::metrics::toy_metrics::l0(&ci_batch, n_batch, m.c, thr);
        let mut ci_hist = vec![0u32; CI_HIST_BINS];
        for &g in &ci_batch {
            let b = ((g.clamp(0.0, 1.0) * CI_HIST_BINS as f32) as usize).min(CI_HIST_BINS - 1);
            ci_hist[b] += 1;
        }
        modules.push(ModuleSnapshot {
            name: m.name.clone(),
            c: m.c,
            d_in: m.d_in,
            d_out: m.d_out,
            v,
            u,
            target_w: model.target.modules[m.target_idx]
                .weight
                .flatten_all()?
                .to_vec1()?,
            ci_probe: Arc::new(std::mem::take(&mut ci_probe[j])),
            ci_batch: Arc::new(ci_batch),
            norms: vn.iter().zip(&un).map(|(a, b)| a * b).collect(),
            mean_ci,
            alive,
            l0,
            ci_hist,
        });
    }
    Ok(Snapshot {
        step: tr.step,
        n_features: nf,
        probe_value,
        modules,
        positions,
        batch_inputs: raw,
        n_batch,
        value_range: model.target.spec.value_range(),
        n_probe,
        probe_labels,
        probe_inputs,
        sequence: match spec {
            crate::model::TargetSpec::Ih(d) => Some(*d),
            _ => None,
        },
        clusters: None,
        days: None,
        frame: None,
    })
}

/// [`build_snapshot`] plus the stored clustering and, for days models, the days view's data.
pub fn snapshot_with_extras(
    tr: &Trainer,
    clusters: Option<Arc<crate::cluster::ClusteringResult>>,
    probe_value: f32,
    n_batch: usize,
) -> anyhow::Result<Snapshot> {
    let mut snap = build_snapshot(tr, probe_value, n_batch)?;
    if matches!(tr.model.target.spec, crate::model::TargetSpec::Days { .. }) {
        snap.days = Some(Arc::new(crate::metrics::days::days_view_data(
            &tr.model,
            clusters.as_deref(),
        )?));
    }
    snap.clusters = clusters;
    Ok(snap)
}

/// Runs an intervention request on a trainer's decomposition.
pub fn intervene(
    tr: &Trainer,
    clusters: Option<&crate::cluster::ClusteringResult>,
    req: InterventionRequest,
) -> anyhow::Result<InterventionOutcome> {
    use crate::interventions::{Intervention, Selection, run_intervention};
    let model = &tr.model;
    let selection = Selection::parse(&req.select, model, clusters)?;
    let x: Vec<Vec<f32>> = match &req.inputs {
        InputSet::Probes(v) => crate::inputs::probe_inputs(&model.target.spec, *v),
        InputSet::Batch { n, seed } => {
            let nf = model.target.spec.n_features();
            tr.data
                .batch(&mut crate::rng::Rng::new(*seed), *n)
                .chunks(nf)
                .map(|r| r.to_vec())
                .collect()
        }
        InputSet::Custom(row) => vec![row.clone()],
    };
    let iv = Intervention {
        selection,
        selected_mode: req.selected_mode,
        other_mode: req.other_mode,
        delta: req.delta,
    };
    let result = run_intervention(model, &x, &iv, &mut crate::rng::Rng::new(req.seed))?;
    Ok(InterventionOutcome {
        labels: iv.selection.labels(model),
        input_labels: x
            .iter()
            .map(|r| crate::inputs::describe_input(&model.target.spec, r))
            .collect(),
        request: req,
        result,
    })
}

/// Lower-leaky CI of every module on one input row.
pub fn custom_ci(tr: &Trainer, input: &[f32]) -> anyhow::Result<Vec<Vec<f32>>> {
    let nf = tr.model.target.spec.n_features();
    if input.len() != nf {
        anyhow::bail!(
            "custom input has {} values, the model takes {nf}",
            input.len()
        );
    }
    let x = Tensor::from_vec(input.to_vec(), (1, nf), tr.model.device())?;
    crate::interventions::lower_ci(&tr.model, &x)?
        .iter()
        .map(|c| Ok(c.flatten_all()?.to_vec1::<f32>()?))
        .collect()
}
