//! The clustering the app shows: a stored or freshly run [`ClusteringResult`] plus the binary
//! firing masks and co-activation counts of its alive subcomponents on one activations batch.
//! Built by a worker job ([`ClusterData::build_with`], `Command::Cluster`), never on the UI thread;
//! cluster membership at any k is then cheap.

use crate::cluster::ClusteringResult;
use crate::worker::ClusterInput;

/// One cluster at the chosen k.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterRow {
    /// Group id at that k (groups ordered by their first alive member).
    pub id: usize,
    /// Alive indices (into `labels_alive`), ascending.
    pub alive: Vec<usize>,
    /// Member labels `layer:index`.
    pub members: Vec<String>,
    pub layers: Vec<String>,
    pub rank: usize,
    /// Fraction of the batch's samples on which at least one member fires.
    pub firing_fraction: f64,
}

#[derive(Clone, Debug)]
pub struct ClusterData {
    pub result: ClusteringResult,
    /// Samples of the activations batch behind `coact` and the masks.
    pub n_samples: usize,
    /// Co-activation counts `[n_alive, n_alive]` (alive order): samples on which both fire.
    pub coact: Vec<u32>,
    /// Firing bitsets, `words` u64 per alive subcomponent.
    pub masks: Vec<u64>,
    pub words: usize,
    /// The merge history as a tree (built here, on the worker).
    pub dendrogram: crate::cluster::score::Dendrogram,
}

impl ClusterData {
    /// Runs the clustering (when `input.stored` is `None`) and the co-activation counts.
    pub fn build(input: &ClusterInput) -> anyhow::Result<ClusterData> {
        Self::build_with(input, &|_, _| true)
    }

    /// [`ClusterData::build`], reporting `(stage, fraction done)` between stages; stops with an
    /// error when `report` returns false (cancelled).
    pub fn build_with(
        input: &ClusterInput,
        report: &dyn Fn(&'static str, f32) -> bool,
    ) -> anyhow::Result<ClusterData> {
        let n = input.n_samples;
        let ncol = input.labels.len();
        if input.acts.len() != n * ncol {
            anyhow::bail!("activations batch has the wrong shape");
        }
        let result = match &input.stored {
            Some(r) => r.clone(),
            None => {
                if !report("merging", 0.1) {
                    anyhow::bail!("cancelled");
                }
                // Progress of the merge steps (from 10% to 80%), reported (and a cancel seen)
                // at every percent: a cancel stops the merge within 1% of its steps.
                let mut last = usize::MAX;
                let mut progress = |done: usize, total: usize| {
                    let pct = (done * 100).checked_div(total).unwrap_or(100);
                    if pct == last {
                        return true;
                    }
                    last = pct;
                    report("merging", 0.1 + 0.7 * pct as f32 / 100.0)
                };
                let h = crate::cluster::merge_activations_with(
                    &input.acts,
                    n,
                    &input.labels,
                    &input.options,
                    &mut progress,
                )?;
                crate::cluster::summarize(&h, &input.options, h.best_k())
            }
        };
        // Scored against the target's known answer (also a stored clustering without one).
        let mut result = result;
        if result.score.is_none()
            && let Some(t) = &input.truth
        {
            result.score = Some(crate::cluster::score::score_history(&result, t));
        }
        if !report("co-activation counts", 0.8) {
            anyhow::bail!("cancelled");
        }
        let thr = input.options.activation_threshold;
        let words = n.div_ceil(64);
        let mut masks = vec![0u64; result.labels_alive.len() * words];
        for (i, l) in result.labels_alive.iter().enumerate() {
            let Some(col) = input.labels.iter().position(|x| x == l) else {
                anyhow::bail!("clustering names {l}, which this decomposition does not have");
            };
            let m = &mut masks[i * words..(i + 1) * words];
            for s in 0..n {
                if input.acts[s * ncol + col] > thr {
                    m[s / 64] |= 1 << (s % 64);
                }
            }
        }
        let na = result.labels_alive.len();
        let mut coact = vec![0u32; na * na];
        for i in 0..na {
            for j in i..na {
                let a = &masks[i * words..(i + 1) * words];
                let b = &masks[j * words..(j + 1) * words];
                let c: u32 = a.iter().zip(b).map(|(x, y)| (x & y).count_ones()).sum();
                coact[i * na + j] = c;
                coact[j * na + i] = c;
            }
        }
        Ok(ClusterData {
            dendrogram: crate::cluster::score::Dendrogram::from_history(&result.group_idxs),
            result,
            n_samples: n,
            coact,
            masks,
            words,
        })
    }

    pub fn n_alive(&self) -> usize {
        self.result.labels_alive.len()
    }

    /// Range of k along the merge history (smallest, largest).
    pub fn k_range(&self) -> (usize, usize) {
        let na = self.n_alive();
        let states = self.result.group_idxs.len().max(1);
        (na + 1 - states.min(na + 1), na)
    }

    /// Group id of every alive subcomponent at k (clamped to the recorded range).
    pub fn groups_at(&self, k: usize) -> Vec<usize> {
        let na = self.n_alive();
        let last = self.result.group_idxs.len().saturating_sub(1);
        let t = na.saturating_sub(k).min(last);
        self.result
            .group_idxs
            .get(t)
            .map(|g| g.iter().map(|&x| x as usize).collect())
            .unwrap_or_default()
    }

    /// The clusters at k, ordered by id.
    pub fn clusters_at(&self, k: usize) -> Vec<ClusterRow> {
        let g = self.groups_at(k);
        let n_groups = g.iter().map(|&x| x + 1).max().unwrap_or(0);
        let mut alive: Vec<Vec<usize>> = vec![vec![]; n_groups];
        for (i, &gi) in g.iter().enumerate() {
            alive[gi].push(i);
        }
        let mut union = vec![0u64; self.words];
        alive
            .into_iter()
            .filter(|a| !a.is_empty())
            .enumerate()
            .map(|(id, alive)| {
                union.iter_mut().for_each(|w| *w = 0);
                for &i in &alive {
                    for (u, w) in union
                        .iter_mut()
                        .zip(&self.masks[i * self.words..(i + 1) * self.words])
                    {
                        *u |= w;
                    }
                }
                let fired: u64 = union.iter().map(|w| w.count_ones() as u64).sum();
                let members: Vec<String> = alive
                    .iter()
                    .map(|&i| self.result.labels_alive[i].clone())
                    .collect();
                let mut layers: Vec<String> = members
                    .iter()
                    .map(|l| split_label(l).0.to_string())
                    .collect();
                layers.sort();
                layers.dedup();
                ClusterRow {
                    id,
                    rank: alive.len(),
                    alive,
                    members,
                    layers,
                    firing_fraction: if self.n_samples > 0 {
                        fired as f64 / self.n_samples as f64
                    } else {
                        0.0
                    },
                }
            })
            .collect()
    }

    /// Alive indices in cluster order (clusters by id, members ascending).
    pub fn cluster_order(rows: &[ClusterRow]) -> Vec<usize> {
        rows.iter().flat_map(|r| r.alive.iter().copied()).collect()
    }

    /// Co-activation of alive `i` and `j`, normalised to [0, 1] (`c_ij / sqrt(c_ii c_jj)`).
    pub fn coact_norm(&self, i: usize, j: usize) -> f32 {
        let na = self.n_alive();
        let d = (self.coact[i * na + i] as f64 * self.coact[j * na + j] as f64).sqrt();
        if d > 0.0 {
            (self.coact[i * na + j] as f64 / d) as f32
        } else {
            0.0
        }
    }
}

/// `("layer", index)` of a label `layer:index`.
pub fn split_label(l: &str) -> (&str, Option<usize>) {
    match l.rsplit_once(':') {
        Some((a, b)) => (a, b.parse().ok()),
        None => (l, None),
    }
}

/// Text of the clusters CSV: one row per subcomponent (alive and dead) with its cluster at k.
pub fn clusters_csv(data: &ClusterData, rows: &[ClusterRow], k: usize) -> String {
    let mut s = String::from(
        "label,layer,index,cluster_id,k,cluster_rank,cluster_layers,cluster_firing_fraction\n",
    );
    for r in rows {
        for m in &r.members {
            let (layer, idx) = split_label(m);
            s.push_str(&format!(
                "{m},{layer},{},{},{k},{},{},{}\n",
                idx.map(|i| i.to_string()).unwrap_or_default(),
                r.id,
                r.rank,
                r.layers.join(";"),
                r.firing_fraction
            ));
        }
    }
    for m in &data.result.dead {
        let (layer, idx) = split_label(m);
        s.push_str(&format!(
            "{m},{layer},{},,{k},,,\n",
            idx.map(|i| i.to_string()).unwrap_or_default()
        ));
    }
    s
}
