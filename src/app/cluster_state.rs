//! The clustering the app shows: its data (built by a worker job), the k chosen along the merge
//! history, the clusters at that k, and the running clustering job.

use std::sync::Arc;

use super::Selection;
use super::cluster_data::{ClusterData, ClusterRow, split_label};
use crate::worker::{Event, JobKind, Snapshot};

/// A clustering job on the worker.
#[derive(Clone, Debug, PartialEq)]
pub struct JobProgress {
    /// The worker's job id (`None` until its first progress report).
    pub id: Option<u64>,
    pub stage: &'static str,
    pub fraction: f32,
}

#[derive(Default)]
pub struct ClusterState {
    /// The clustering of the open decomposition (stored in the file or run here).
    pub data: Option<Arc<ClusterData>>,
    /// Number of groups shown (a state of the merge history) and its clusters.
    pub k: usize,
    pub rows: Vec<ClusterRow>,
    /// Bumped whenever `rows` changes (texture keys).
    pub version: u64,
    /// An alive subcomponent of the selected cluster: the selection follows it across k.
    anchor: Option<usize>,
    /// A clustering running on the worker.
    pub job: Option<JobProgress>,
}

impl ClusterState {
    /// Whether a clustering is asked for or computing.
    pub fn running(&self) -> bool {
        self.job.is_some()
    }

    /// Forgets the clustering (a new decomposition was loaded).
    pub fn reset(&mut self) {
        self.data = None;
        self.rows.clear();
        self.k = 0;
        self.anchor = None;
        self.version += 1;
        self.job = None;
    }

    /// Shows this clustering, at its stored k.
    pub fn set(&mut self, data: Arc<ClusterData>, sel: &mut Selection) {
        let k = data.result.k;
        self.data = Some(data);
        sel.cluster = None;
        self.anchor = None;
        self.k = 0;
        self.set_k(k, sel);
    }

    /// Moves to the state of the merge history with k groups (clamped); recomputes the clusters
    /// only when k changes. A selected cluster follows its first member.
    pub fn set_k(&mut self, k: usize, sel: &mut Selection) {
        let Some(d) = self.data.clone() else {
            return;
        };
        let (lo, hi) = d.k_range();
        let k = k.clamp(lo, hi.max(lo));
        if k == self.k && !self.rows.is_empty() {
            return;
        }
        // Keep the anchor while it is in the selected cluster (so merging and un-merging
        // returns to the same cluster), else take the selected cluster's first member.
        let selected = sel.cluster.and_then(|c| self.rows.get(c));
        self.anchor = match (selected, self.anchor) {
            (Some(r), Some(a)) if r.alive.contains(&a) => Some(a),
            (Some(r), _) => r.alive.first().copied(),
            (None, _) => None,
        };
        self.k = k;
        self.rows = d.clusters_at(k);
        self.version += 1;
        sel.cluster = self
            .anchor
            .and_then(|a| self.rows.iter().position(|r| r.alive.contains(&a)));
    }

    /// Components of module `module` in the selected cluster (empty when none is selected).
    pub fn selected_members(
        &self,
        sel: &Selection,
        snapshot: Option<&Snapshot>,
        module: usize,
    ) -> Vec<usize> {
        let (Some(c), Some(s)) = (sel.cluster, snapshot) else {
            return vec![];
        };
        let (Some(row), Some(m)) = (self.rows.get(c), s.modules.get(module)) else {
            return vec![];
        };
        row.members
            .iter()
            .filter_map(|l| match split_label(l) {
                (name, Some(i)) if name == m.name => Some(i),
                _ => None,
            })
            .collect()
    }

    /// Follows the worker's clustering events.
    pub fn on_event(&mut self, e: &Event, sel: &mut Selection) {
        match e {
            Event::Loaded { .. } => self.reset(),
            Event::Progress {
                job,
                kind: JobKind::Clustering,
                stage,
                fraction,
            } => {
                self.job = Some(JobProgress {
                    id: Some(*job),
                    stage,
                    fraction: *fraction,
                })
            }
            Event::JobEnded {
                job,
                kind: JobKind::Clustering,
                ..
            } if self
                .job
                .as_ref()
                .is_some_and(|j| j.id.is_none_or(|i| i == *job)) =>
            {
                self.job = None
            }
            Event::Clusters { data, .. } => self.set(data.clone(), sel),
            // A clustering asked for but refused before it started (nothing loaded).
            Event::Error(_) if self.job.as_ref().is_some_and(|j| j.id.is_none()) => self.job = None,
            _ => {}
        }
    }
}
