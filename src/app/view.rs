//! What a view is ([`View`]) and what it may touch ([`ViewCtx`]). Views live in
//! `src/app/views/`, one file each, and are listed once in `views::registry`.

use std::any::Any;
use std::sync::Arc;

use eframe::egui;

use super::cluster_state::ClusterState;
use super::session::Session;
use super::{Selection, Settings};
use crate::worker::{Command, Event, Snapshot, Source};

/// A CSV export's text, computed off the UI thread.
pub type CsvJob = Box<dyn FnOnce() -> anyhow::Result<String> + Send>;

/// One tab of the app. The struct owns the view's state (textures, controls, the worker's
/// answers it asked for).
pub trait View: Any {
    /// Short name: `--view` on the command line and the persisted setting.
    fn name(&self) -> &'static str;
    /// Tab label.
    fn label(&self) -> &'static str;
    /// File name (without extension) offered by the PNG and CSV exports.
    fn file_stem(&self) -> &'static str {
        self.name()
    }
    /// Whether the view needs a loaded decomposition (else the app says none is loaded).
    fn needs_snapshot(&self) -> bool {
        true
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui);
    /// The view's data as CSV (the "Export CSV" button): a job that formats the text, run on
    /// the worker (a 4096 × 1000 CI table is 4 million numbers). The view hands it what it
    /// needs (shared snapshots, copies of small state); an error here means nothing to export.
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob>;
    /// Every worker event passes here first (answers to the view's own commands, resets on load).
    fn on_event(&mut self, _e: &Event) {}
}

/// Requests of a view that the app carries out after the frame.
#[derive(Clone, Debug)]
pub enum Action {
    /// Open a decomposition (a fresh history).
    Load(Source),
    /// A new training run of the preset and hyperparameters in the settings.
    NewRun,
    /// Run a clustering on the worker (a job with progress).
    RunClustering(crate::cluster::ClusterOptions),
    /// Cancel the running clustering job.
    CancelClustering,
    /// Show this timeline frame (its step) in every view; None: the live run.
    ShowFrame(Option<usize>),
}

/// What a view gets each frame: the session (read only), the persisted settings, the shared
/// selection, the clusters, and a way to send commands to the worker.
pub struct ViewCtx<'a> {
    pub session: &'a Session,
    pub settings: &'a mut Settings,
    pub selection: &'a mut Selection,
    pub clusters: &'a mut ClusterState,
    pub(crate) actions: &'a mut Vec<Action>,
}

impl ViewCtx<'_> {
    pub fn snapshot(&self) -> Option<&Arc<Snapshot>> {
        self.session.snapshot.as_ref()
    }

    /// Bumped with every new snapshot (texture keys).
    pub fn snapshot_version(&self) -> u64 {
        self.session.snapshot_version
    }

    /// Sends a command to the worker; false when there is none (tests).
    pub fn send(&self, c: Command) -> bool {
        self.session.send(c)
    }

    /// Asks the app for something beyond the worker (done after this frame).
    pub fn request(&mut self, a: Action) {
        self.actions.push(a);
    }

    /// Components of module `module` in the selected cluster (empty when none is selected).
    pub fn selected_cluster_members(&self, module: usize) -> Vec<usize> {
        self.clusters
            .selected_members(self.selection, self.snapshot().map(|s| s.as_ref()), module)
    }

    /// The snapshot or an error (for the CSV exports).
    pub fn require_snapshot(&self) -> anyhow::Result<&Arc<Snapshot>> {
        self.snapshot()
            .ok_or_else(|| anyhow::anyhow!("no decomposition loaded"))
    }
}
