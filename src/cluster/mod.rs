//! Grouping subcomponents into mechanisms: the reference's MDL merge clustering on causal-
//! importance co-activation, for every model family.

pub mod merge;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use merge::{Cluster, MergeConfig, MergeHistory, PairSampling};

use crate::model::Fold;
use crate::spd::trainer::Trainer;

/// Options of `spdlab cluster`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterOptions {
    pub alpha: f64,
    pub activation_threshold: f32,
    pub filter_dead_threshold: f32,
    pub seed: u64,
    /// Samples drawn from the data distribution.
    pub n_samples: usize,
    /// Pair-selection band of the `range` sampler.
    pub range_threshold: f64,
}

/// Default rank weight α. The reference's default is 1. With α = 1, in small models the
/// index-bit saving of any merge (Σ_groups s·log2(k/(k−1)), paid by every group) beats the
/// rank cost α·(s_i·r_j + s_j·r_i) of joining two rarely-firing mechanisms that never fire
/// together, so the MDL minimum merges them: tms-5-2-id ends at k = 4 with pairs of TMS
/// features merged, and resid-mlp-1 mixes mlp_in subcomponents into mlp_out clusters
/// (α = 1.5 still mixes 13). With α = 2, tms-5-2 gives its 5 feature clusters, tms-5-2-id the
/// 5 plus the identity (rank 2), and resid-mlp-1 one cluster of all 50 live mlp_out
/// subcomponents with every mlp_in subcomponent on its own (measured on the full runs).
pub const DEFAULT_ALPHA: f64 = 2.0;

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            alpha: DEFAULT_ALPHA,
            activation_threshold: 0.01,
            filter_dead_threshold: 0.001,
            seed: 0,
            n_samples: 4096,
            range_threshold: 0.05,
        }
    }
}

/// Upper-leaky CI of every subcomponent on a fresh data batch: `[n, Σ C]` plus labels
/// `module:index` (the reference clusters on ci_upper).
pub fn activations(tr: &mut Trainer, n: usize) -> anyhow::Result<(Vec<f32>, Vec<String>)> {
    let raw = tr.data.batch(&mut tr.rng, n);
    let nf = tr.data.n_features;
    let x = Tensor::from_vec(raw, (n, nf), tr.model.device())?;
    let fold = Fold::new();
    let (_, inputs) = tr.model.target.forward_with_inputs(&x, &fold)?;
    let (ci, _) = tr.model.causal_importances(&inputs, None, &fold)?;
    let mut labels = vec![];
    let mut cols = vec![];
    for (j, m) in tr.model.modules.iter().enumerate() {
        for c in 0..m.c {
            labels.push(format!("{}:{c}", m.name));
        }
        cols.push(ci[j].upper.clone());
    }
    let all = Tensor::cat(&cols, 1)?;
    Ok((all.flatten_all()?.to_vec1::<f32>()?, labels))
}

/// Runs the merge clustering on a decomposition.
pub fn cluster(tr: &mut Trainer, opts: &ClusterOptions) -> anyhow::Result<MergeHistory> {
    let (acts, labels) = activations(tr, opts.n_samples)?;
    let cfg = MergeConfig {
        activation_threshold: Some(opts.activation_threshold),
        alpha: opts.alpha,
        iters: None,
        pair_sampling: PairSampling::Range {
            threshold: opts.range_threshold,
        },
        filter_dead_threshold: opts.filter_dead_threshold,
        seed: opts.seed,
        stop_at_k: 1,
    };
    Ok(merge::merge_iteration(
        &acts,
        opts.n_samples,
        &labels,
        &cfg,
    )?)
}

/// One cluster as reported and stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterSummary {
    pub id: usize,
    pub members: Vec<String>,
    pub layers: Vec<String>,
    pub rank: usize,
    pub firing_fraction: f64,
}

/// The stored clustering result (in a `.spdlab` file's `extra.clusters`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusteringResult {
    pub options: ClusterOptions,
    /// The k chosen (minimum description length unless the user picked one).
    pub k: usize,
    pub best_k: usize,
    /// Cluster id per subcomponent label (`module:index`); dead subcomponents are absent.
    pub assignment: BTreeMap<String, usize>,
    pub clusters: Vec<ClusterSummary>,
    pub dead: Vec<String>,
    /// (k, normalised description length) along the merge history.
    pub description_length: Vec<(usize, f64)>,
    /// Group index of each alive subcomponent after every merge (row t = after t merges).
    pub labels_alive: Vec<String>,
    pub group_idxs: Vec<Vec<u32>>,
}

pub fn summarize(h: &MergeHistory, opts: &ClusterOptions, k: usize) -> ClusteringResult {
    let clusters: Vec<ClusterSummary> = h
        .clusters_at(k)
        .into_iter()
        .map(|c| {
            let mut layers: Vec<String> = c
                .member_labels
                .iter()
                .map(|l| {
                    l.rsplit_once(':')
                        .map(|(a, _)| a.to_string())
                        .unwrap_or_default()
                })
                .collect();
            layers.dedup();
            layers.sort();
            layers.dedup();
            ClusterSummary {
                id: c.id,
                members: c.member_labels.clone(),
                layers,
                rank: c.rank,
                firing_fraction: c.firing_fraction,
            }
        })
        .collect();
    let mut assignment = BTreeMap::new();
    for c in &clusters {
        for m in &c.members {
            assignment.insert(m.clone(), c.id);
        }
    }
    ClusteringResult {
        options: opts.clone(),
        k,
        best_k: h.best_k(),
        assignment,
        clusters,
        dead: h.dead_labels.clone(),
        description_length: h
            .k_groups
            .iter()
            .copied()
            .zip(h.mdl_norm.iter().copied())
            .collect(),
        labels_alive: h.labels_alive.clone(),
        group_idxs: h.group_idxs.clone(),
    }
}

/// Reads a reference `cluster_mapping_*.json` (`{"clusters": {"<module>:<idx>": id | null}}`).
pub fn read_reference_mapping(path: &Path) -> anyhow::Result<BTreeMap<String, Option<usize>>> {
    #[derive(Deserialize)]
    struct Mapping {
        clusters: BTreeMap<String, Option<usize>>,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let m: Mapping = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a cluster mapping: {e}", path.display()))?;
    Ok(m.clusters)
}
