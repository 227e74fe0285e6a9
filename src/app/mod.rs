//! The desktop app (eframe/egui). Reads immutable snapshots from the worker; adds no maths.

pub mod cluster_data;
pub mod config_editor;
pub mod export;
pub mod heatmap;
mod views;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eframe::egui;
use serde::{Deserialize, Serialize};

use crate::spd::config::SpdConfig;
use crate::spd::trainer::StepRecord;
use crate::worker::{Command, Event, RunState, Snapshot, Source, WorkerHandle};
use cluster_data::{ClusterData, ClusterRow};

pub use views::View;

/// Settings persisted between runs (eframe storage).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub preset: String,
    pub steps: usize,
    pub seed: u64,
    pub lr: f64,
    pub recent: Vec<PathBuf>,
    pub view: View,
    pub smoothing: f32,
    pub probe_value: f32,
    pub device: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            preset: "tms-5-2".into(),
            steps: 10_000,
            seed: 0,
            lr: 1e-3,
            recent: vec![],
            view: View::Directions,
            smoothing: 0.0,
            probe_value: 0.75,
            device: "cpu".into(),
        }
    }
}

/// Per-frame CPU statistics (`--frame-stats`).
#[derive(Default)]
pub struct FrameStats {
    pub cpu_ms: Vec<f32>,
    pub frame_intervals_ms: Vec<f32>,
    last: Option<Instant>,
    last_report: Option<Instant>,
    pub enabled: bool,
}

pub fn percentile(v: &[f32], p: f32) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f32 * p).round() as usize]
}

impl FrameStats {
    fn tick(&mut self, cpu_ms: Option<f32>, training: bool) {
        let now = Instant::now();
        if let Some(l) = self.last {
            self.frame_intervals_ms.push((now - l).as_secs_f32() * 1e3);
        }
        self.last = Some(now);
        if let (Some(c), true) = (cpu_ms, training) {
            self.cpu_ms.push(c);
        }
        if self.enabled
            && self
                .last_report
                .is_none_or(|t| now - t > Duration::from_secs(5))
        {
            self.last_report = Some(now);
            if !self.cpu_ms.is_empty() {
                eprintln!("[frame-stats] {}", self.summary());
            }
        }
    }
    pub fn summary(&self) -> String {
        format!(
            "ui cpu per frame while training: n={} p50={:.2} ms p99={:.2} ms | frame interval p50={:.1} ms p99={:.1} ms",
            self.cpu_ms.len(),
            percentile(&self.cpu_ms, 0.5),
            percentile(&self.cpu_ms, 0.99),
            percentile(&self.frame_intervals_ms, 0.5),
            percentile(&self.frame_intervals_ms, 0.99)
        )
    }
}

/// The current selection, highlighted by every view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub module: usize,
    pub component: Option<usize>,
    /// Cluster id at the clusters view's current k (see `SpdApp::cluster_rows`).
    pub cluster: Option<usize>,
}

pub struct SpdApp {
    worker: Option<WorkerHandle>,
    pub settings: Settings,
    pub state: RunState,
    pub description: String,
    pub config: Option<SpdConfig>,
    pub history: Vec<StepRecord>,
    pub snapshot: Option<Arc<Snapshot>>,
    pub snapshot_version: u64,
    pub selection: Selection,
    pub status: String,
    pub error: Option<String>,
    pub frame_stats: FrameStats,
    steps_per_sec: f32,
    rate_probe: Option<(Instant, usize)>,
    pub views: views::ViewState,
    exit_after: Option<(Instant, Duration)>,
    start_training: bool,
    /// (time, step) of the first and the latest step event, for the throughput report.
    throughput: Option<((Instant, usize), (Instant, usize))>,
    /// The latest intervention result and mechanism trace from the worker.
    pub intervention: Option<Arc<crate::worker::InterventionOutcome>>,
    pub trace: Option<Arc<crate::interventions::Trace>>,
    /// The clustering of the open decomposition (stored in the file or run here).
    pub clusters: Option<Arc<ClusterData>>,
    /// Number of groups shown (a state of the merge history) and its clusters.
    pub cluster_k: usize,
    pub cluster_rows: Vec<ClusterRow>,
    /// Bumped whenever `cluster_rows` changes (texture keys).
    pub cluster_version: u64,
    /// An alive subcomponent of the selected cluster: the selection follows it across k.
    cluster_anchor: Option<usize>,
    /// "Run clustering" asked the worker for activations and has no answer yet.
    cluster_waiting: bool,
    /// A clustering computing on a background thread (`true`: store it in the file extras).
    cluster_job: Option<(
        crossbeam_channel::Receiver<Result<ClusterData, String>>,
        bool,
    )>,
    /// Results of PNG exports (written from the screenshot callback).
    export_tx: crossbeam_channel::Sender<Result<PathBuf, String>>,
    export_rx: crossbeam_channel::Receiver<Result<PathBuf, String>>,
}

/// How the app starts.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    pub file: Option<PathBuf>,
    pub frame_stats: bool,
    pub exit_after: Option<Duration>,
    /// Start training the preset at once (for measurements).
    pub train_preset: Option<String>,
    /// Open this view first.
    pub view: Option<View>,
    /// Open a shipped decomposition by name.
    pub asset: Option<String>,
    /// Rows of the data-batch CI heatmap (default 256; e.g. 4096 to measure a big heatmap).
    pub heatmap_rows: Option<usize>,
}

impl SpdApp {
    pub fn new(
        cc: &eframe::CreationContext<'_>,
        worker: Option<WorkerHandle>,
        opts: StartOptions,
    ) -> Self {
        if let Some(rs) = &cc.wgpu_render_state {
            heatmap::register(rs);
        }
        let settings: Settings = cc
            .storage
            .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
            .unwrap_or_default();
        let (export_tx, export_rx) = crossbeam_channel::unbounded();
        let mut app = SpdApp {
            worker,
            settings,
            state: RunState::Idle,
            description: String::new(),
            config: None,
            history: vec![],
            snapshot: None,
            snapshot_version: 0,
            selection: Selection::default(),
            status: "loading...".into(),
            error: None,
            frame_stats: FrameStats {
                enabled: opts.frame_stats,
                ..Default::default()
            },
            steps_per_sec: 0.0,
            rate_probe: None,
            views: views::ViewState::default(),
            exit_after: opts.exit_after.map(|d| (Instant::now(), d)),
            start_training: false,
            throughput: None,
            intervention: None,
            trace: None,
            clusters: None,
            cluster_k: 0,
            cluster_rows: vec![],
            cluster_version: 0,
            cluster_anchor: None,
            cluster_waiting: false,
            cluster_job: None,
            export_tx,
            export_rx,
        };
        if let Some(v) = opts.view {
            app.settings.view = v;
        }
        if let Some(n) = opts.heatmap_rows {
            app.send(Command::SetBatchRows(n));
            // Show the big heatmap: the data-batch rows.
            app.views.ci.input_set = views::CiInputSet::Batch;
        }
        if let Some(p) = opts.train_preset {
            if let Ok(c) = crate::presets::spd_config(&p) {
                app.settings.steps = c.steps;
                app.settings.lr = c.lr_schedule.start_val;
                app.settings.seed = c.seed;
            }
            app.settings.preset = p;
            app.new_run();
            app.start_training = true;
        } else if let Some(f) = opts.file {
            app.open(f);
        } else if let Some(a) = opts.asset {
            app.send(Command::Load(Source::Asset(a)));
        } else {
            app.send(Command::Load(Source::Default));
        }
        app
    }

    /// Sends a command to the worker (tests, scripts); false when there is none.
    pub fn send_command(&self, c: Command) -> bool {
        self.send(c)
    }

    /// Sends a command to the worker; false when there is none (tests).
    pub(crate) fn send(&self, c: Command) -> bool {
        match &self.worker {
            Some(w) => {
                w.send(c);
                true
            }
            None => false,
        }
    }

    pub fn open(&mut self, path: PathBuf) {
        self.settings.recent.retain(|p| p != &path);
        self.settings.recent.insert(0, path.clone());
        self.settings.recent.truncate(8);
        self.history.clear();
        self.send(Command::Load(Source::File(path)));
    }

    /// Loads a fresh run of the chosen preset with the edited hyperparameters.
    pub fn new_run(&mut self) {
        match crate::presets::spd_config(&self.settings.preset) {
            Ok(mut cfg) => {
                cfg.steps = self.settings.steps;
                cfg.seed = self.settings.seed;
                cfg.lr_schedule.start_val = self.settings.lr;
                self.history.clear();
                self.send(Command::Load(Source::Preset {
                    name: self.settings.preset.clone(),
                    config: Box::new(cfg),
                }));
            }
            Err(e) => self.error = Some(e.to_string()),
        }
    }

    /// Applies events from the worker (never blocks).
    pub fn drain(&mut self) {
        let events: Vec<Event> = match &self.worker {
            Some(w) => w.rx.try_iter().collect(),
            None => vec![],
        };
        for e in events {
            self.apply(e);
        }
        self.poll_jobs();
    }

    /// Picks up finished clustering jobs and PNG exports (never blocks).
    pub fn poll_jobs(&mut self) {
        if let Some((rx, store)) = &self.cluster_job {
            match rx.try_recv() {
                Ok(Ok(data)) => {
                    if *store {
                        self.send(Command::StoreClusters(Box::new(data.result.clone())));
                        self.status = format!(
                            "clustered: minimum description length at k = {} (Save to keep it)",
                            data.result.best_k
                        );
                    }
                    self.cluster_job = None;
                    self.set_clusters(data);
                }
                Ok(Err(e)) => {
                    self.cluster_job = None;
                    self.error = Some(format!("clustering failed: {e}"));
                }
                Err(crossbeam_channel::TryRecvError::Empty) => {}
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    self.cluster_job = None;
                    self.error = Some("clustering failed".into());
                }
            }
        }
        while let Ok(r) = self.export_rx.try_recv() {
            match r {
                Ok(p) => self.status = format!("exported {}", p.display()),
                Err(e) => self.error = Some(format!("export failed: {e}")),
            }
        }
    }

    /// Whether a clustering is computing in the background.
    pub fn clustering_running(&self) -> bool {
        self.cluster_job.is_some() || self.cluster_waiting
    }

    /// Asks the worker for an activations batch and clusters it off the UI thread.
    pub fn run_clustering(&mut self, opts: crate::cluster::ClusterOptions) {
        if self.send(Command::ClusterActivations(opts)) {
            self.cluster_waiting = true;
            self.status = "clustering...".into();
        }
    }

    /// Starts building the clustering data of `input` on a background thread.
    fn start_cluster_job(&mut self, input: crate::worker::ClusterInput) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let store = input.stored.is_none();
        let spawned = std::thread::Builder::new()
            .name("spdlab-cluster".into())
            .spawn(move || {
                let r = ClusterData::build(&input).map_err(|e| format!("{e:#}"));
                let _ = tx.send(r);
            });
        match spawned {
            Ok(_) => self.cluster_job = Some((rx, store)),
            Err(e) => self.error = Some(format!("cannot start the clustering thread: {e}")),
        }
    }

    /// Shows this clustering, at its stored k.
    pub fn set_clusters(&mut self, data: ClusterData) {
        let k = data.result.k;
        self.clusters = Some(Arc::new(data));
        self.selection.cluster = None;
        self.cluster_anchor = None;
        self.cluster_k = 0;
        self.set_cluster_k(k);
    }

    /// Moves to the state of the merge history with k groups (clamped); recomputes the clusters
    /// only when k changes. A selected cluster follows its first member.
    pub fn set_cluster_k(&mut self, k: usize) {
        let Some(d) = self.clusters.clone() else {
            return;
        };
        let (lo, hi) = d.k_range();
        let k = k.clamp(lo, hi.max(lo));
        if k == self.cluster_k && !self.cluster_rows.is_empty() {
            return;
        }
        // Keep the anchor while it is in the selected cluster (so merging and un-merging
        // returns to the same cluster), else take the selected cluster's first member.
        let selected = self
            .selection
            .cluster
            .and_then(|c| self.cluster_rows.get(c));
        self.cluster_anchor = match (selected, self.cluster_anchor) {
            (Some(r), Some(a)) if r.alive.contains(&a) => Some(a),
            (Some(r), _) => r.alive.first().copied(),
            (None, _) => None,
        };
        self.cluster_k = k;
        self.cluster_rows = d.clusters_at(k);
        self.cluster_version += 1;
        self.selection.cluster = self
            .cluster_anchor
            .and_then(|a| self.cluster_rows.iter().position(|r| r.alive.contains(&a)));
    }

    /// Components of module `module` in the selected cluster (empty when none is selected).
    pub fn selected_cluster_members(&self, module: usize) -> Vec<usize> {
        let (Some(c), Some(s)) = (self.selection.cluster, &self.snapshot) else {
            return vec![];
        };
        let (Some(row), Some(m)) = (self.cluster_rows.get(c), s.modules.get(module)) else {
            return vec![];
        };
        row.members
            .iter()
            .filter_map(|l| match cluster_data::split_label(l) {
                (name, Some(i)) if name == m.name => Some(i),
                _ => None,
            })
            .collect()
    }

    /// Requests a screenshot and writes the current view's rect of it to `path` as PNG (the
    /// result arrives in a later frame as a status line or an error).
    pub fn export_png(&mut self, ctx: &egui::Context, path: PathBuf) {
        let Some(rect) = self.views.rect else {
            self.error = Some("export failed: the view has not been drawn yet".into());
            return;
        };
        let ppp = ctx.pixels_per_point();
        let tx = self.export_tx.clone();
        let ctx2 = ctx.clone();
        ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
            egui::ScreenshotCallback::new(move |image| {
                // Encode off the render thread.
                std::thread::spawn(move || {
                    let r = export::save_png_region(&image, rect, ppp, &path)
                        .map(|_| path)
                        .map_err(|e| format!("{e:#}"));
                    let _ = tx.send(r);
                    ctx2.request_repaint();
                });
            }),
        ));
    }

    /// Writes the current view's data as CSV.
    pub fn export_csv(&self, path: &std::path::Path) -> anyhow::Result<()> {
        views::export_csv(self, path)
    }

    pub fn apply(&mut self, e: Event) {
        match e {
            Event::Loaded {
                description,
                config,
                step,
                history,
            } => {
                self.description = description;
                self.status = format!("loaded at step {step}");
                self.config = Some(*config);
                self.history = history;
                self.selection = Selection::default();
                self.error = None;
                self.intervention = None;
                self.trace = None;
                self.clusters = None;
                self.cluster_rows.clear();
                self.cluster_k = 0;
                self.cluster_version += 1;
                self.cluster_job = None;
                self.cluster_waiting = false;
                self.views.ci.reset_custom();
                if self.start_training {
                    self.start_training = false;
                    self.send(Command::Start);
                }
            }
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
                self.snapshot = Some(s);
                self.snapshot_version += 1;
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
            Event::Intervened(o) => {
                self.intervention = Some(o);
                self.error = None;
            }
            Event::Traced(t) => self.trace = Some(t),
            Event::Error(m) => {
                self.error = Some(m);
                self.cluster_waiting = false;
            }
            Event::ClusterInput(input) => {
                self.cluster_waiting = false;
                self.start_cluster_job(*input);
            }
            Event::CustomCi { input, ci } => self.views.ci.set_custom_result(input, ci),
        }
    }

    pub fn step(&self) -> usize {
        self.history.last().map(|r| r.step + 1).unwrap_or(0)
    }

    fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.strong("spdlab");
            ui.separator();
            if ui
                .button("Open...")
                .on_hover_text("Open a .spdlab file or a goodfire-ai/spd run")
                .clicked()
                && let Some(p) = rfd::FileDialog::new()
                    .add_filter("spdlab / torch", &["spdlab", "pth"])
                    .pick_file()
            {
                self.open(p);
            }
            ui.menu_button("Recent", |ui| {
                if self.settings.recent.is_empty() {
                    ui.label("no recent files");
                }
                for p in self.settings.recent.clone() {
                    if ui.button(p.display().to_string()).clicked() {
                        self.open(p);
                        ui.close();
                    }
                }
            });
            if ui.button("Save...").clicked()
                && let Some(p) = rfd::FileDialog::new()
                    .add_filter("spdlab", &["spdlab"])
                    .save_file()
            {
                self.send(Command::Save(p));
            }
            ui.separator();
            match self.state {
                RunState::Running => {
                    if ui.button("Pause").clicked() {
                        self.send(Command::Pause);
                    }
                    if ui.button("Stop").clicked() {
                        self.send(Command::Stop);
                    }
                }
                RunState::Paused => {
                    if ui.button("Resume").clicked() {
                        self.send(Command::Resume);
                    }
                    if ui.button("Stop").clicked() {
                        self.send(Command::Stop);
                    }
                }
                RunState::Idle => {
                    if ui.button("Start").clicked() {
                        self.send(Command::Start);
                    }
                }
                RunState::Finished => {}
            }
            ui.separator();
            let total = self.config.as_ref().map(|c| c.steps + 1).unwrap_or(0);
            let step = self.step();
            let eta = if self.steps_per_sec > 0.0 && self.state == RunState::Running {
                format!(
                    ", ETA {:.0} s",
                    (total.saturating_sub(step)) as f32 / self.steps_per_sec
                )
            } else {
                String::new()
            };
            ui.label(format!(
                "{} | step {step}/{total} | {:.0} steps/s{eta} | {}",
                self.description, self.steps_per_sec, self.status
            ));
        });
        if let Some(e) = self.error.clone() {
            ui.horizontal(|ui| {
                ui.colored_label(egui::Color32::from_rgb(220, 60, 60), format!("Error: {e}"));
                if ui.small_button("dismiss").clicked() {
                    self.error = None;
                }
            });
        }
    }

    fn export_buttons(&mut self, ui: &mut egui::Ui) {
        let stem = match self.settings.view {
            View::Training => "training",
            View::Directions => "directions",
            View::CausalImportance => "causal-importance",
            View::Summary => "summary",
            View::Clusters => "clusters",
            View::Interventions => "interventions",
            View::Days => "days",
        };
        if ui
            .button("Export PNG...")
            .on_hover_text("Save a picture of this view")
            .clicked()
            && let Some(p) = rfd::FileDialog::new()
                .add_filter("png", &["png"])
                .set_file_name(format!("{stem}.png"))
                .save_file()
        {
            self.export_png(ui.ctx(), p);
        }
        if ui
            .button("Export CSV...")
            .on_hover_text("Save the data of this view")
            .clicked()
            && let Some(p) = rfd::FileDialog::new()
                .add_filter("csv", &["csv"])
                .set_file_name(format!("{stem}.csv"))
                .save_file()
        {
            match self.export_csv(&p) {
                Ok(()) => self.status = format!("exported {}", p.display()),
                Err(e) => self.error = Some(format!("export failed: {e:#}")),
            }
        }
    }

    fn side_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("New training run");
        egui::ComboBox::from_label("preset")
            .selected_text(self.settings.preset.clone())
            .show_ui(ui, |ui| {
                for p in crate::presets::PRESETS {
                    if ui
                        .selectable_label(self.settings.preset == p.name, p.name)
                        .on_hover_text(p.description)
                        .clicked()
                    {
                        self.settings.preset = p.name.to_string();
                        if let Ok(c) = crate::presets::spd_config(p.name) {
                            self.settings.steps = c.steps;
                            self.settings.lr = c.lr_schedule.start_val;
                        }
                    }
                }
            });
        ui.add(
            egui::DragValue::new(&mut self.settings.steps)
                .range(1..=1_000_000)
                .prefix("steps "),
        );
        ui.add(egui::DragValue::new(&mut self.settings.seed).prefix("seed "));
        ui.add(
            egui::DragValue::new(&mut self.settings.lr)
                .range(0.0..=1.0)
                .speed(1e-5)
                .prefix("lr "),
        );
        let devices: &[&str] = if cfg!(feature = "cuda") {
            &["cpu", "cuda"]
        } else {
            &["cpu"]
        };
        egui::ComboBox::from_label("device")
            .selected_text(self.settings.device.clone())
            .show_ui(ui, |ui| {
                for d in devices {
                    ui.selectable_value(&mut self.settings.device, d.to_string(), *d);
                }
            })
            .response
            .on_hover_text("cuda needs a build with --features cuda and an NVIDIA GPU");
        if ui
            .button("New run")
            .on_hover_text("Load the preset with these settings")
            .clicked()
        {
            self.send(Command::SetDevice(self.settings.device.clone()));
            self.new_run();
        }
        if matches!(self.state, RunState::Running | RunState::Paused)
            && ui
                .button("Apply lr now")
                .on_hover_text("Change the running schedule's peak learning rate")
                .clicked()
        {
            self.send(Command::SetLr(self.settings.lr));
        }
        ui.separator();
        if let Some(c) = &self.config {
            ui.heading("Config");
            egui::Grid::new("cfg").num_columns(2).show(ui, |ui| {
                ui.label("steps");
                ui.label(c.steps.to_string());
                ui.end_row();
                ui.label("batch");
                ui.label(c.batch_size.to_string());
                ui.end_row();
                ui.label("ci_fn");
                ui.label(format!("{:?} {:?}", c.ci_fn_type, c.ci_fn_hidden_dims));
                ui.end_row();
                for o in &c.ci_fn_type_overrides {
                    ui.label(format!("ci_fn of {}", o.module_pattern));
                    ui.label(format!("{:?}", o.ci_fn_type));
                    ui.end_row();
                }
                ui.label("lr");
                ui.label(format!(
                    "{:.1e} {:?}",
                    c.lr_schedule.start_val, c.lr_schedule.fn_type
                ));
                ui.end_row();
                for m in &c.module_info {
                    ui.label(format!("C of {}", m.module_pattern));
                    ui.label(m.c.to_string());
                    ui.end_row();
                }
                for l in &c.loss_metric_configs {
                    ui.label(l.name());
                    ui.label(
                        l.coeff()
                            .map(|x| format!("{x:e}"))
                            .unwrap_or("eval only".into()),
                    );
                    ui.end_row();
                    if let crate::spd::config::LossConfig::ImportanceMinimalityLoss {
                        pnorm,
                        module_weights,
                        ..
                    } = l
                    {
                        ui.label("  p");
                        ui.label(pnorm.to_string());
                        ui.end_row();
                        for w in module_weights {
                            ui.label(format!("  weight of {}", w.module_pattern));
                            ui.label(format!("x{}", w.weight));
                            ui.end_row();
                        }
                    }
                }
            });
        }
    }
}

impl eframe::App for SpdApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let cpu_ms = frame.info().cpu_usage.map(|s| s * 1e3);
        self.frame_stats
            .tick(cpu_ms, self.state == RunState::Running);
        self.drain();
        // Drag and drop.
        let dropped: Vec<PathBuf> = ui.ctx().input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        });
        if let Some(p) = dropped.into_iter().next() {
            self.open(p);
        }
        if let Some((t0, d)) = self.exit_after {
            if t0.elapsed() >= d {
                ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
            } else {
                ui.ctx().request_repaint_after(Duration::from_millis(100));
            }
        }
        if self.state == RunState::Running {
            // Bounded repaint rate while training (~10 Hz); user input repaints at once.
            ui.ctx().request_repaint_after(Duration::from_millis(100));
        }
        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::left("side")
            .default_size(220.0)
            .resizable(true)
            .show(ui, |ui| self.side_panel(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                for v in View::ALL {
                    ui.selectable_value(&mut self.settings.view, v, v.label());
                }
                ui.separator();
                self.export_buttons(ui);
            });
            ui.separator();
            let rect = ui.scope(|ui| views::show(self, ui)).response.rect;
            self.views.rect = Some(rect);
        });
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }

    fn on_exit(&mut self) {
        if self.frame_stats.enabled {
            eprintln!("[frame-stats] final: {}", self.frame_stats.summary());
            if let Some(((t0, s0), (t1, s1))) = self.throughput {
                let secs = (t1 - t0).as_secs_f64();
                if secs > 0.0 {
                    eprintln!(
                        "[frame-stats] training with the window open: {} steps in {secs:.1} s = {:.2} steps/s",
                        s1 - s0,
                        (s1 - s0) as f64 / secs
                    );
                }
            }
        }
        // Dropping the worker handle stops and joins the training thread.
        self.worker = None;
    }
}

/// Runs the desktop app.
pub fn run(opts: StartOptions) -> anyhow::Result<()> {
    let native = eframe::NativeOptions {
        renderer: eframe::Renderer::Wgpu,
        viewport: egui::ViewportBuilder::default()
            .with_inner_size([1280.0, 800.0])
            .with_title("spdlab")
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "spdlab",
        native,
        Box::new(move |cc| {
            let ctx = cc.egui_ctx.clone();
            let worker = WorkerHandle::spawn(
                candle_core::Device::Cpu,
                Box::new(move || ctx.request_repaint_after(Duration::from_millis(100))),
            );
            Ok(Box::new(SpdApp::new(cc, Some(worker), opts)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the window: {e}"))
}
