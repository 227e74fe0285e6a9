//! The desktop app (eframe/egui). Reads immutable snapshots from the worker; adds no maths.

pub mod cluster_data;
pub mod cluster_state;
pub mod config_editor;
pub mod export;
pub mod heatmap;
mod panels;
pub mod run_watch;
pub mod sequence_picker;
pub mod session;
pub mod sweep_watch;
pub mod timeline_bar;
pub mod view;
pub mod views;
pub mod widgets;

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eframe::egui;
use serde::{Deserialize, Serialize};

use crate::worker::{Command, Event, RunState, Source, WorkerHandle};
use cluster_data::ClusterData;
pub use cluster_state::ClusterState;
pub use session::Session;
pub use view::{Action, View, ViewCtx};

/// Settings persisted between runs (eframe storage).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub preset: String,
    pub steps: usize,
    pub seed: u64,
    pub lr: f64,
    pub recent: Vec<PathBuf>,
    /// Name of the shown view (`View::name`).
    pub view: String,
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
            view: "directions".into(),
            smoothing: 0.0,
            probe_value: 0.75,
            device: "cpu".into(),
        }
    }
}

/// Per-frame CPU statistics (`--frame-stats`).
#[derive(Default)]
pub struct FrameStats {
    /// eframe's time per frame (wall clock of update + tessellation + paint submission).
    pub cpu_ms: Vec<f32>,
    /// The UI thread's own CPU time per frame (everything it ran between two frame starts),
    /// which other processes competing for the cores do not inflate.
    pub thread_cpu_ms: Vec<f32>,
    pub frame_intervals_ms: Vec<f32>,
    last: Option<Instant>,
    last_thread_cpu: Option<Duration>,
    last_report: Option<Instant>,
    pub enabled: bool,
}

/// CPU time the calling thread has used so far (Linux, macOS; `None` elsewhere).
fn thread_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec through a valid pointer.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    #[cfg(not(unix))]
    {
        None
    }
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
        let thread_cpu = thread_cpu_time();
        if let (Some(t), Some(l), true) = (thread_cpu, self.last_thread_cpu, training) {
            self.thread_cpu_ms
                .push((t.saturating_sub(l)).as_secs_f32() * 1e3);
        }
        self.last_thread_cpu = thread_cpu;
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
            "ui cpu per frame while training or playing: n={} p50={:.2} ms p99={:.2} ms (ui thread's own cpu time: p50={:.2} ms p99={:.2} ms) | frame interval p50={:.1} ms p99={:.1} ms",
            self.cpu_ms.len(),
            percentile(&self.cpu_ms, 0.5),
            percentile(&self.cpu_ms, 0.99),
            percentile(&self.thread_cpu_ms, 0.5),
            percentile(&self.thread_cpu_ms, 0.99),
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
    /// Cluster id at the clusters view's current k (see `ClusterState::rows`).
    pub cluster: Option<usize>,
}

/// The app: the session (worker link, snapshot, history, config), the persisted settings, the
/// shared selection, the cluster state, and the views (from `views::registry`).
pub struct SpdApp {
    pub session: Session,
    pub settings: Settings,
    pub selection: Selection,
    pub clusters: ClusterState,
    views: Vec<Box<dyn View>>,
    /// The configuration of the next run (side panel), and the preset it was made from.
    pub editor: config_editor::ConfigEditor,
    editor_preset: String,
    /// Where the current view was drawn last frame (PNG export crops to it).
    pub view_rect: Option<egui::Rect>,
    pub frame_stats: FrameStats,
    exit_after: Option<(Instant, Duration)>,
    /// Requests of the views, carried out after the frame.
    actions: Vec<Action>,
    /// `--select module:index`, applied to the first snapshot that has the module.
    pending_select: Option<String>,
    /// For repaint requests from background threads (the sweep watcher).
    ctx: egui::Context,
    pub playback: timeline_bar::Playback,
    /// An animation export in progress.
    anim: Option<timeline_bar::AnimExport>,
    /// `--export-animation`: started once the timeline is loaded.
    pending_anim: Option<PathBuf>,
    /// `--play`: start playback once the timeline is loaded.
    pending_play: bool,
    /// Close when this export (the last one written) is done.
    exit_on_export: Option<PathBuf>,
}

/// How the app starts.
#[derive(Clone, Debug, Default)]
pub struct StartOptions {
    pub file: Option<PathBuf>,
    pub frame_stats: bool,
    pub exit_after: Option<Duration>,
    /// Start training the preset at once (for measurements).
    pub train_preset: Option<String>,
    /// Start training this config JSON file (the CLI's `--config` format) at once.
    pub train_config: Option<PathBuf>,
    /// Open this view first (its name, see [`view_names`]).
    pub view: Option<String>,
    /// Open a shipped decomposition by name.
    pub asset: Option<String>,
    /// Rows of the data-batch CI heatmap (default 256; e.g. 4096 to measure a big heatmap).
    pub heatmap_rows: Option<usize>,
    /// Select this subcomponent (`module:index`) once the decomposition is loaded.
    pub select: Option<String>,
    /// Export the view over the timeline once it is loaded (a .gif, or a folder of PNGs),
    /// then close.
    pub export_animation: Option<PathBuf>,
    /// Playback frames per second (default 8).
    pub fps: f32,
    /// Play the timeline from its first frame once it is loaded.
    pub play: bool,
    /// Frames of an animation export at most (0: the default, 120).
    pub export_frames: usize,
    /// The Prompt view's text and what it intervenes on (language models).
    pub prompt: Option<String>,
    pub intervene: Option<String>,
}

/// The views' names for `--view`, in tab order (from the registry).
pub fn view_names() -> Vec<&'static str> {
    views::names()
}

/// The canonical name of the view called `name`, if there is one.
pub fn view_from_name(name: &str) -> Option<String> {
    views::from_name(name)
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
        let mut app = SpdApp {
            session: Session::new(worker),
            settings,
            selection: Selection::default(),
            clusters: ClusterState::default(),
            views: views::registry(),
            editor: config_editor::ConfigEditor::default(),
            editor_preset: String::new(),
            view_rect: None,
            frame_stats: FrameStats {
                enabled: opts.frame_stats,
                ..Default::default()
            },
            exit_after: opts.exit_after.map(|d| (Instant::now(), d)),
            actions: vec![],
            pending_select: opts.select,
            ctx: cc.egui_ctx.clone(),
            playback: timeline_bar::Playback {
                fps: if opts.fps > 0.0 {
                    opts.fps.clamp(0.5, 60.0)
                } else {
                    8.0
                },
                export_frames: if opts.export_frames >= 2 {
                    opts.export_frames
                } else {
                    120
                },
                ..Default::default()
            },
            anim: None,
            pending_anim: opts.export_animation,
            pending_play: opts.play,
            exit_on_export: None,
        };
        if let Some(v) = opts.view {
            app.settings.view = v;
        }
        app.reset_editor();
        if let Some(v) = app.view_mut::<views::prompt::PromptView>() {
            if let Some(t) = opts.prompt {
                v.text = t;
            }
            if let Some(sel) = opts.intervene {
                v.select = sel;
            }
        }
        if let Some(n) = opts.heatmap_rows {
            app.send(Command::SetBatchRows(n));
            // Show the big heatmap: the data-batch rows.
            if let Some(ci) = app.view_mut::<views::ci::CiView>() {
                ci.input_set = views::ci::InputSet::Batch;
            }
        }
        if let Some(f) = opts.train_config {
            if app.load_config(&f) {
                if let Some(d) = &app.editor.draft {
                    app.settings.steps = d.steps;
                    app.settings.lr = d.lr_schedule.start_val;
                    app.settings.seed = d.seed;
                }
                app.new_run();
                app.session.start_training = true;
            }
        } else if let Some(p) = opts.train_preset {
            if let Ok(c) = crate::presets::spd_config(&p) {
                app.settings.steps = c.steps;
                app.settings.lr = c.lr_schedule.start_val;
                app.settings.seed = c.seed;
            }
            app.settings.preset = p;
            app.new_run();
            app.session.start_training = true;
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
        self.session.send(c)
    }

    /// The view of type `T` (tests, start options).
    pub fn view<T: View>(&self) -> Option<&T> {
        self.views
            .iter()
            .find_map(|v| (v.as_ref() as &dyn Any).downcast_ref::<T>())
    }

    pub fn view_mut<T: View>(&mut self) -> Option<&mut T> {
        self.views
            .iter_mut()
            .find_map(|v| (v.as_mut() as &mut dyn Any).downcast_mut::<T>())
    }

    /// Index of the current view (the persisted name; an unknown name shows the default view).
    fn current(&self) -> usize {
        let name = self.settings.view.as_str();
        let find = |n: &str| self.views.iter().position(|v| v.name() == n);
        find(name)
            // Settings saved by versions whose view setting was an enum variant name.
            .or_else(|| match name {
                "CausalImportance" => find("ci"),
                _ => find(&name.to_ascii_lowercase()),
            })
            .or_else(|| find(&Settings::default().view))
            .unwrap_or(0)
    }

    /// Switches to the view called `name`.
    pub fn set_view(&mut self, name: &str) {
        self.settings.view = name.to_string();
    }

    /// Name of the current view.
    pub fn current_view(&self) -> &'static str {
        self.views[self.current()].name()
    }

    pub fn open(&mut self, path: PathBuf) {
        self.settings.recent.retain(|p| p != &path);
        self.settings.recent.insert(0, path.clone());
        self.settings.recent.truncate(8);
        if path.is_dir() && path.join("sweep.json").is_file() {
            // A sweep folder: watched by a background thread, shown by the sweep view; a
            // click on a point loads that point's decomposition.
            let ctx = self.ctx.clone();
            self.session.sweep = Some(sweep_watch::SweepWatch::spawn(
                path.clone(),
                Duration::from_secs(1),
                move || ctx.request_repaint(),
            ));
            self.session.status = format!("sweep folder {}", path.display());
            self.set_view("sweep");
            return;
        }
        self.session.run_watch = None;
        if run_watch::RunWatch::is_running_file(&path) {
            // A spdlab run training elsewhere: loaded now, reloaded at each autosave and when
            // its final file is written.
            let ctx = self.ctx.clone();
            self.session.run_watch_seen = 0;
            self.session.run_watch_loaded = None;
            self.session.run_watch = Some(run_watch::RunWatch::spawn_file(
                path.clone(),
                Duration::from_secs(1),
                move || ctx.request_repaint(),
            ));
        } else if run_watch::RunWatch::is_run_folder(&path) {
            // A goodfire-ai/spd run folder, perhaps still training: followed by a background
            // thread; its newest complete checkpoint is loaded (see `poll_run_watch`).
            let ctx = self.ctx.clone();
            self.session.history.clear();
            self.session.status = format!("watching {}", path.display());
            self.session.run_watch_seen = 0;
            self.session.run_watch_loaded = None;
            self.session.run_watch = Some(run_watch::RunWatch::spawn(
                path,
                Duration::from_secs(1),
                move || ctx.request_repaint(),
            ));
            return;
        }
        self.session.history.clear();
        self.send(Command::Load(Source::File(path)));
    }

    /// Loads a fresh run of the chosen preset with the edited hyperparameters.
    pub fn new_run(&mut self) {
        // A preset chosen elsewhere (days view, --train-preset) starts from its own config.
        if self.editor_preset != self.settings.preset {
            self.reset_editor();
        }
        // The editor's draft, with the settings' steps, seed and lr (which the days view and
        // the persisted settings also set).
        if let Some(d) = self.editor.draft.as_mut() {
            d.steps = self.settings.steps;
            d.seed = self.settings.seed;
            d.lr_schedule.start_val = self.settings.lr;
        }
        match self.editor.valid() {
            Some(cfg) => {
                let cfg = cfg.clone();
                self.session.history.clear();
                self.session.markers.clear();
                self.send(Command::Load(Source::Preset {
                    name: self.settings.preset.clone(),
                    config: Box::new(cfg),
                }));
            }
            None => {
                self.session.error = Some(format!(
                    "the configuration is not valid: {}",
                    self.editor.problems().join("; ")
                ))
            }
        }
    }

    /// Starts the editor over from the chosen preset's config with the settings' steps, seed
    /// and lr.
    /// Loads a config JSON file into the editor (and selects the preset it names); a problem
    /// goes to the error line. True when loaded.
    pub fn load_config(&mut self, path: &std::path::Path) -> bool {
        match self.editor.load_json(path) {
            Ok(preset) => {
                if let Some(p) = preset {
                    self.settings.preset = p.clone();
                    self.editor_preset = p;
                }
                true
            }
            Err(e) => {
                self.session.error = Some(e);
                false
            }
        }
    }

    pub fn reset_editor(&mut self) {
        match crate::presets::spd_config(&self.settings.preset) {
            Ok(mut cfg) => {
                cfg.steps = self.settings.steps;
                cfg.seed = self.settings.seed;
                cfg.lr_schedule.start_val = self.settings.lr;
                self.editor.set(cfg);
                self.editor_preset = self.settings.preset.clone();
            }
            Err(e) => self.session.error = Some(e.to_string()),
        }
    }

    /// Sends the live-changeable fields of the editor that differ from the running config
    /// (learning rate, loss coefficients) and marks the change on the training curves.
    pub fn apply_live_changes(&mut self) {
        let (Some(run), Some(d)) = (self.session.config.clone(), self.editor.draft.clone()) else {
            return;
        };
        let step = self.session.step();
        let mut what = vec![];
        if d.lr_schedule.start_val != run.lr_schedule.start_val {
            self.send(Command::SetLr(d.lr_schedule.start_val));
            what.push(format!("lr {:e}", d.lr_schedule.start_val));
        }
        for l in &d.loss_metric_configs {
            let now = run.loss(l.name()).and_then(|r| r.coeff());
            if let Some(c) = l.coeff()
                && now.is_some()
                && now != Some(c)
            {
                self.send(Command::SetLossCoeff {
                    name: l.name().to_string(),
                    coeff: c,
                });
                what.push(format!("{} {c:e}", l.name()));
            }
        }
        if !what.is_empty() {
            self.session.markers.push((step, what.join(", ")));
        }
    }

    /// Applies events from the worker (never blocks), then what a watched run folder has
    /// new.
    pub fn drain(&mut self) {
        for e in self.session.take_events() {
            self.apply(e);
        }
        self.poll_run_watch();
    }

    /// A watched run folder: its training curves from metrics.jsonl, and its newest complete
    /// checkpoint loaded once (the watcher never offers a half-written one).
    fn poll_run_watch(&mut self) {
        let Some(w) = &self.session.run_watch else {
            return;
        };
        if matches!(self.session.state, RunState::Running | RunState::Paused) {
            // Training here now: the file is this app's to change, not to follow.
            self.session.run_watch = None;
            return;
        }
        let v = w.version();
        if v == self.session.run_watch_seen {
            return;
        }
        self.session.run_watch_seen = v;
        if w.follows_metrics {
            self.session.history = w.records();
        }
        if let Some((step, path)) = w.newest()
            && self.session.run_watch_loaded != Some(step)
        {
            self.session.run_watch_loaded = Some(step);
            self.send(Command::Load(Source::File(path)));
        }
    }

    /// Whether a clustering is asked for or computing on the worker.
    pub fn clustering_running(&self) -> bool {
        self.clusters.running()
    }

    /// Asks the worker to run a clustering (a job with progress; the result comes back as
    /// `Event::Clusters`).
    pub fn run_clustering(&mut self, opts: crate::cluster::ClusterOptions) {
        if self.send(Command::Cluster(opts)) {
            self.clusters.job = Some(cluster_state::JobProgress {
                id: None,
                stage: "starting",
                fraction: 0.0,
            });
            self.session.status = "clustering...".into();
        }
    }

    /// Shows this clustering, at its stored k.
    pub fn set_clusters(&mut self, data: ClusterData) {
        self.clusters.set(Arc::new(data), &mut self.selection);
    }

    /// Moves to the state of the merge history with k groups (clamped).
    pub fn set_cluster_k(&mut self, k: usize) {
        self.clusters.set_k(k, &mut self.selection);
    }

    /// Components of module `module` in the selected cluster (empty when none is selected).
    pub fn selected_cluster_members(&self, module: usize) -> Vec<usize> {
        self.clusters
            .selected_members(&self.selection, self.session.snapshot.as_deref(), module)
    }

    /// Carries out the views' requests.
    fn run_actions(&mut self) {
        for a in std::mem::take(&mut self.actions) {
            match a {
                Action::Load(src) => {
                    self.session.run_watch = None;
                    self.session.history.clear();
                    self.send(Command::Load(src));
                }
                Action::NewRun => self.new_run(),
                Action::RunClustering(o) => self.run_clustering(o),
                Action::CancelClustering => {
                    self.send(Command::Cancel(crate::worker::JobKind::Clustering));
                }
                Action::ShowFrame(step) => {
                    self.playback.playing = false;
                    self.session.show_frame(step);
                }
            }
        }
    }

    /// Requests a screenshot and writes the current view's rect of it to `path` as PNG (the
    /// result arrives in a later frame as a status line or an error).
    pub fn export_png(&mut self, ctx: &egui::Context, path: PathBuf) {
        let Some(rect) = self.view_rect else {
            self.session.error = Some("export failed: the view has not been drawn yet".into());
            return;
        };
        let ppp = ctx.pixels_per_point();
        let commands = self.session.commands();
        // The screenshot arrives in a later frame; the worker crops and encodes it (without
        // a worker, in tests, the callback does).
        ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
            egui::ScreenshotCallback::new(move |image| {
                let job =
                    crate::worker::ExportJob::new(move || export::png_region(&image, rect, ppp));
                match &commands {
                    Some(c) => c.send(Command::Export { path, job }),
                    None => {
                        if let Ok(bytes) = job.run() {
                            let _ = export::write_atomic(&path, &bytes);
                        }
                    }
                }
            }),
        ));
    }

    /// Writes the current view's data as CSV.
    pub fn export_csv(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        let i = self.current();
        let cx = ViewCtx {
            session: &self.session,
            settings: &mut self.settings,
            selection: &mut self.selection,
            clusters: &mut self.clusters,
            actions: &mut self.actions,
        };
        let job = self.views[i].csv(&cx)?;
        let job = crate::worker::ExportJob::new(move || Ok(job()?.into_bytes()));
        // On the worker; without one (tests) here.
        if !self.send(Command::Export {
            path: path.to_path_buf(),
            job: job.clone(),
        }) {
            export::write_atomic(path, &job.run()?)?;
        }
        Ok(())
    }

    /// Applies one worker event: the views see it first, then the clusters and the session.
    pub fn apply(&mut self, e: Event) {
        for v in &mut self.views {
            v.on_event(&e);
        }
        match &e {
            Event::Exported(p) if self.exit_on_export.as_ref() == Some(p) => {
                eprintln!("exported {}", p.display());
                self.ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
            Event::Error(m) if self.exit_on_export.is_some() || self.pending_anim.is_some() => {
                eprintln!("error: {m}");
                self.ctx.send_viewport_cmd(egui::ViewportCommand::Close);
            }
            _ => {}
        }
        if let Event::Loaded { .. } = e {
            self.selection = Selection::default();
        }
        let loaded = matches!(e, Event::Loaded { .. });
        self.clusters.on_event(&e, &mut self.selection);
        self.session.apply(e);
        if loaded
            && let Some(w) = &self.session.run_watch
            && w.follows_metrics
        {
            // A reference checkpoint has no history: the curves come from metrics.jsonl.
            self.session.history = w.records();
        }
        if let Some(label) = &self.pending_select
            && let Some(s) = &self.session.snapshot
            && let Some((name, c)) = label.rsplit_once(':')
            && let Some(j) = s.modules.iter().position(|m| m.name == name)
            && let Ok(c) = c.trim().parse::<usize>()
            && c < s.modules[j].c
        {
            self.selection.module = j;
            self.selection.component = Some(c);
            self.pending_select = None;
        }
    }

    pub fn step(&self) -> usize {
        self.session.step()
    }

    /// The current view, or a note when it needs a decomposition and none is loaded.
    fn show_view(&mut self, ui: &mut egui::Ui) {
        let i = self.current();
        let view = &mut self.views[i];
        if view.needs_snapshot() && self.session.snapshot.is_none() {
            ui.label("no decomposition loaded yet");
            return;
        }
        let mut cx = ViewCtx {
            session: &self.session,
            settings: &mut self.settings,
            selection: &mut self.selection,
            clusters: &mut self.clusters,
            actions: &mut self.actions,
        };
        view.ui(&mut cx, ui);
    }
}

impl eframe::App for SpdApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let cpu_ms = frame.info().cpu_usage.map(|s| s * 1e3);
        // Measured while training and while the timeline plays or is scrubbed.
        let busy = self.session.state == RunState::Running
            || self.playback.playing
            || !self.session.frame_settled();
        self.frame_stats.tick(cpu_ms, busy);
        self.drain();
        self.shortcuts(ui.ctx());
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
        if self.session.state == RunState::Running {
            // Bounded repaint rate while training (~10 Hz); user input repaints at once.
            ui.ctx().request_repaint_after(Duration::from_millis(100));
        }
        if self.pending_anim.is_some() {
            ui.ctx().request_repaint_after(Duration::from_millis(50));
            if self.session.snapshot.is_some()
                && self
                    .session
                    .timeline
                    .as_ref()
                    .is_some_and(|t| t.steps.len() >= 2)
                && let Some(p) = self.pending_anim.take()
            {
                self.export_animation(timeline_bar::AnimTarget::from_path(p));
                if let Some(a) = self.anim.as_mut() {
                    a.exit_when_done = true;
                }
            }
        }
        if self.pending_play
            && self.session.snapshot.is_some()
            && self
                .session
                .timeline
                .as_ref()
                .is_some_and(|t| t.steps.len() >= 2)
        {
            self.pending_play = false;
            self.scrub_to(0);
            self.playback.playing = true;
        }
        self.tick_timeline(&ui.ctx().clone());
        egui::Panel::top("top").show(ui, |ui| self.top_bar(ui));
        egui::Panel::left("side")
            .default_size(220.0)
            .resizable(true)
            .show(ui, |ui| self.side_panel(ui));
        // The bar, for runs that keep a timeline (a reference run: two checkpoints or more).
        if self
            .session
            .timeline
            .as_ref()
            .is_some_and(|t| t.options.is_some())
        {
            egui::Panel::bottom("timeline").show(ui, |ui| self.timeline_bar(ui));
        }
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                let current = self.current();
                for (i, v) in self.views.iter().enumerate() {
                    if ui.selectable_label(i == current, v.label()).clicked() {
                        self.settings.view = v.name().to_string();
                    }
                }
                ui.separator();
                self.export_buttons(ui);
            });
            ui.separator();
            let rect = ui.scope(|ui| self.show_view(ui)).response.rect;
            // What overflows the central panel is not part of the view (nor of its exports).
            let rect = rect.intersect(ui.clip_rect());
            self.view_rect = Some(rect);
            if let Some(step) = self.session.shown_frame() {
                // The step of the frame shown, on the view itself (and in its exports).
                let p = ui.painter();
                let text = format!("step {step}");
                let galley =
                    p.layout_no_wrap(text, egui::FontId::proportional(15.0), egui::Color32::WHITE);
                let r = egui::Rect::from_min_size(
                    egui::pos2(rect.right() - galley.size().x - 14.0, rect.top() + 2.0),
                    galley.size() + egui::vec2(10.0, 4.0),
                );
                p.rect_filled(
                    r,
                    3.0,
                    egui::Color32::from_rgba_unmultiplied(40, 40, 90, 220),
                );
                p.galley(r.min + egui::vec2(5.0, 2.0), galley, egui::Color32::WHITE);
            }
        });
        if !self.actions.is_empty() {
            self.run_actions();
            ui.ctx().request_repaint();
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }

    fn on_exit(&mut self) {
        if self.frame_stats.enabled {
            eprintln!("[frame-stats] final: {}", self.frame_stats.summary());
            if let Some(((t0, s0), (t1, s1))) = self.session.throughput {
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
        self.session.worker = None;
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
