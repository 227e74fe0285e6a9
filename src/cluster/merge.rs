//! Subcomponent clustering by greedy MDL merging on causal-importance co-activation
//! (the clustering algorithm of goodfire-ai/spd, `spd/clustering/merge.py` + `compute_costs.py`).
//!
//! Input: the (upper-leaky) causal importances of every subcomponent of every layer,
//! `acts[n_samples, n_components]` row-major, with one label per column ("layer:index").
//!
//! 1. Columns whose maximum over samples is below `filter_dead_threshold` are dropped ("dead").
//! 2. The alive columns are binarised, `A = acts > activation_threshold` (or used as float weights
//!    when the threshold is `None`), and the co-activation matrix `K = AᵀA` is formed
//!    (diagonal = firing counts).
//! 3. Starting from the identity grouping (k = c groups of rank 1) the pair of groups whose merge
//!    decreases the expected description length the most (cost `F_ij`, see [`merge_cost_matrix`])
//!    is merged, repeatedly, until `iters` merges were done, `k <= stop_at_k` or `k == 1`.
//!    Pairs are picked by a seeded sampler ([`PairSampling`]), so a run is fully deterministic.
//! 4. Every intermediate grouping is recorded together with its description length
//!    `MDL = Σ_i s_i (log2 k + α r_i)`; [`MergeHistory::best_k`] is the k where it is minimal.
//!
//! `F_ij` is exactly the change of the normalised MDL caused by merging `i` and `j`
//! (in binary mode), so `costs[t] == mdl_norm[t + 1] - mdl_norm[t]` up to rounding.
//!
//! Binary masks are kept as bitsets (`u64` words over samples) and co-activations are recomputed
//! with popcounts; the merge-cost matrix is recomputed in O(k²) per merge.

use crate::rng::Rng;
use std::fmt;

/// How the pair to merge is chosen from the cost matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PairSampling {
    /// Uniformly random among the off-diagonal pairs with `F <= min + threshold * (max - min)`.
    /// `threshold = 0` picks (uniformly among ties) a pair of minimal cost.
    Range { threshold: f64 },
    /// A pair with probability ∝ `exp(-(F - min) / temperature)`.
    /// `temperature <= 0` (or NaN) degenerates to the first pair of minimal cost.
    Mcmc { temperature: f64 },
}

impl Default for PairSampling {
    fn default() -> Self {
        PairSampling::Range { threshold: 0.05 }
    }
}

/// Configuration of a merge run (defaults follow the reference implementation).
#[derive(Clone, Debug, PartialEq)]
pub struct MergeConfig {
    /// A subcomponent "fires" on a sample when its activation is `> activation_threshold`.
    /// `None`: the raw activations are used as float weights. Default `Some(0.01)`.
    pub activation_threshold: Option<f32>,
    /// Weight of the rank term of the description length. Default 1.0.
    pub alpha: f64,
    /// Maximum number of merges; `None` merges until `stop_at_k` (or k = 1). Default `None`.
    pub iters: Option<usize>,
    /// Pair sampler. Default `Range { threshold: 0.05 }`.
    pub pair_sampling: PairSampling,
    /// Columns whose maximum activation is `< filter_dead_threshold` are dropped;
    /// `<= 0` drops none. Default 0.001.
    pub filter_dead_threshold: f32,
    /// Seed of the pair sampler. Default 0.
    pub seed: u64,
    /// Stop once `k <= stop_at_k` (values below 1 act as 1). Default 3.
    pub stop_at_k: usize,
}

impl Default for MergeConfig {
    fn default() -> Self {
        MergeConfig {
            activation_threshold: Some(0.01),
            alpha: 1.0,
            iters: None,
            pair_sampling: PairSampling::default(),
            filter_dead_threshold: 0.001,
            seed: 0,
            stop_at_k: 3,
        }
    }
}

/// Invalid input to [`merge_iteration`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MergeError {
    /// `acts.len()` is not `n_samples * labels.len()`.
    ShapeMismatch {
        acts_len: usize,
        n_samples: usize,
        n_components: usize,
    },
    /// The progress callback asked to stop.
    Cancelled,
}

impl fmt::Display for MergeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeError::ShapeMismatch {
                acts_len,
                n_samples,
                n_components,
            } => write!(
                f,
                "activations have {acts_len} values, expected n_samples ({n_samples}) x \
                 n_components ({n_components})"
            ),
            MergeError::Cancelled => write!(f, "cancelled"),
        }
    }
}

impl std::error::Error for MergeError {}

/// One group of subcomponents at some k.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// Group index at that k (groups are ordered by their first member).
    pub id: usize,
    /// Alive-component indices (into `MergeHistory::labels_alive`), ascending.
    pub members: Vec<usize>,
    pub member_labels: Vec<String>,
    /// Number of subcomponents (each alive subcomponent has rank 1).
    pub rank: usize,
    /// Fraction of samples on which at least one member fires.
    pub firing_fraction: f64,
}

/// The full record of a merge run.
///
/// "States" are the groupings visited: state `t` is the grouping after `t` merges, with
/// `k_groups[t] = c - t` groups (`c = labels_alive.len()`); state 0 is the identity grouping.
/// `k_groups`, `mdl`, `mdl_norm` and `group_idxs` are indexed by state (length `n_iters + 1`);
/// `pairs` and `costs` by merge (length `n_iters`): merge `t` turns state `t` into state `t + 1`.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeHistory {
    /// Labels of the alive (kept) components; "alive index" i refers to `labels_alive[i]`.
    pub labels_alive: Vec<String>,
    /// Labels of the components dropped as dead.
    pub dead_labels: Vec<String>,
    /// Input column of each alive component.
    pub alive_columns: Vec<usize>,
    /// Input column of each dead component.
    pub dead_columns: Vec<usize>,
    pub n_samples: usize,
    /// Cost `F` (normalised, i.e. with `s = K / n_samples`) of each performed merge.
    pub costs: Vec<f64>,
    /// Group indices `(lo, hi)`, `lo < hi`, merged at each step, as numbered *before* the merge.
    /// The merged group keeps index `lo`; groups above `hi` shift down by one.
    pub pairs: Vec<(usize, usize)>,
    /// Number of groups in each state.
    pub k_groups: Vec<usize>,
    /// Description length `Σ_i K_ii (log2 k + α r_i)` of each state (raw counts).
    pub mdl: Vec<f64>,
    /// `mdl / n_samples` (0 when there are no samples).
    pub mdl_norm: Vec<f64>,
    /// Group index of every alive component in each state. Group indices are `0..k` and ordered
    /// by the smallest member of the group.
    pub group_idxs: Vec<Vec<u32>>,
    /// Firing bitsets of the alive components, `mask_words` `u64` words each, bit `s` = sample
    /// `s` (binary mode: `x > activation_threshold`; float mode: `x > 0`).
    pub firing_masks: Vec<u64>,
    pub mask_words: usize,
    pub config: MergeConfig,
}

impl MergeHistory {
    /// Number of alive components (= k of the initial state).
    pub fn n_alive(&self) -> usize {
        self.labels_alive.len()
    }

    /// Number of merges performed.
    pub fn n_iters(&self) -> usize {
        self.pairs.len()
    }

    /// k of the last recorded state.
    pub fn final_k(&self) -> usize {
        self.k_groups.last().copied().unwrap_or(0)
    }

    /// The state index holding `k` groups, clamped to the recorded range.
    pub fn state_index(&self, k: usize) -> usize {
        self.n_alive().saturating_sub(k).min(self.n_iters())
    }

    /// Group id of every alive component when there are `k` groups (clamped to the recorded
    /// range: `k > c` gives the identity grouping, `k < final_k()` the last grouping).
    pub fn groups_at(&self, k: usize) -> Vec<usize> {
        self.group_idxs
            .get(self.state_index(k))
            .map(|g| g.iter().map(|&x| x as usize).collect())
            .unwrap_or_default()
    }

    /// The k at which the normalised description length is minimal (earliest state on ties,
    /// i.e. the largest such k). 0 when there are no alive components.
    pub fn best_k(&self) -> usize {
        let mut best = 0;
        for (t, &v) in self.mdl_norm.iter().enumerate() {
            if v < self.mdl_norm[best] {
                best = t;
            }
        }
        self.k_groups.get(best).copied().unwrap_or(0)
    }

    /// The groups at `k` (clamped as in [`Self::groups_at`]), ordered by first member.
    pub fn clusters_at(&self, k: usize) -> Vec<Cluster> {
        let gi = self.groups_at(k);
        let n_groups = gi.iter().map(|&g| g + 1).max().unwrap_or(0);
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_groups];
        for (comp, &g) in gi.iter().enumerate() {
            members[g].push(comp);
        }
        let mut members: Vec<Vec<usize>> = members.into_iter().filter(|m| !m.is_empty()).collect();
        members.sort_by_key(|m| m[0]);
        let words = self.mask_words;
        let mut union = vec![0u64; words];
        members
            .into_iter()
            .enumerate()
            .map(|(id, members)| {
                union.iter_mut().for_each(|w| *w = 0);
                for &m in &members {
                    let mask = &self.firing_masks[m * words..(m + 1) * words];
                    for (u, &w) in union.iter_mut().zip(mask) {
                        *u |= w;
                    }
                }
                let fired: u64 = union.iter().map(|w| w.count_ones() as u64).sum();
                let firing_fraction = if self.n_samples > 0 {
                    fired as f64 / self.n_samples as f64
                } else {
                    0.0
                };
                Cluster {
                    id,
                    member_labels: members
                        .iter()
                        .map(|&m| self.labels_alive[m].clone())
                        .collect(),
                    rank: members.len(),
                    members,
                    firing_fraction,
                }
            })
            .collect()
    }

    /// `clusters_at(best_k())`.
    pub fn best_clusters(&self) -> Vec<Cluster> {
        self.clusters_at(self.best_k())
    }
}

/// The k-dependent scalars of the merge cost.
struct CostScalars {
    s_sum: f64,
    /// log2((k - 1) / k)
    l_ratio: f64,
    /// log2(k)
    lk: f64,
    /// log2(k - 1)
    lk1: f64,
    alpha: f64,
}

impl CostScalars {
    fn new(k: usize, s_sum: f64, alpha: f64) -> Self {
        let kf = k as f64;
        CostScalars {
            s_sum,
            l_ratio: ((kf - 1.0) / kf).log2(),
            lk: kf.log2(),
            lk1: (kf - 1.0).log2(),
            alpha,
        }
    }

    /// `F_ij = (Σ s − s_i − s_j) log2((k−1)/k) + [s∪ log2(k−1) − s_i log2 k − s_j log2 k]
    ///        + α [s∪ (r_i + r_j) − s_i r_i − s_j r_j]`,  `s∪ = s_i + s_j − s_ij`,
    /// evaluated as `F_ij = Σs·L − p_i − p_j + s∪ (log2(k−1) + q_i + q_j)` with
    /// `L = log2((k−1)/k)`, `p_i = s_i (L + log2 k + α r_i)`, `q_i = α r_i`.
    #[inline(always)]
    fn pair_cost(&self, si: f64, sj: f64, sij: f64, ri: f64, rj: f64) -> f64 {
        let (pi, qi) = self.col_terms(si, ri);
        let (pj, qj) = self.col_terms(sj, rj);
        let (base, ci) = self.row_terms(pi, qi);
        base - pj + (si + sj - sij) * (ci + qj)
    }

    /// Per-group terms `(p, q)` of the cost.
    #[inline(always)]
    fn col_terms(&self, s: f64, r: f64) -> (f64, f64) {
        let q = self.alpha * r;
        (s * (self.l_ratio + self.lk + q), q)
    }

    /// Row terms `(Σs·L − p_i, log2(k−1) + q_i)`.
    #[inline(always)]
    fn row_terms(&self, pi: f64, qi: f64) -> (f64, f64) {
        (self.s_sum * self.l_ratio - pi, self.lk1 + qi)
    }
}

/// The merge-cost matrix `F` (k×k, row-major) for a raw co-activation matrix `coact` (k×k,
/// diagonal = firing counts), group ranks and `n_samples` (costs use `s = coact / n_samples`).
/// The diagonal is NaN (not a merge). Only the upper triangle is evaluated and mirrored, so the
/// result is exactly symmetric. Needs k >= 2 for finite values; `n_samples = 0` gives all NaN.
pub fn merge_cost_matrix(coact: &[f64], ranks: &[usize], n_samples: usize, alpha: f64) -> Vec<f64> {
    let k = ranks.len();
    assert_eq!(
        coact.len(),
        k * k,
        "coact must be k x k with k = ranks.len()"
    );
    let inv_n = 1.0 / n_samples as f64;
    let s: Vec<f64> = (0..k).map(|i| coact[i * k + i] * inv_n).collect();
    let sc = CostScalars::new(k, s.iter().sum(), alpha);
    let mut out = vec![f64::NAN; k * k];
    for i in 0..k {
        for j in i + 1..k {
            let f = sc.pair_cost(
                s[i],
                s[j],
                coact[i * k + j] * inv_n,
                ranks[i] as f64,
                ranks[j] as f64,
            );
            out[i * k + j] = f;
            out[j * k + i] = f;
        }
    }
    out
}

/// `Σ_i diag_i (log2 k + α r_i)`.
fn mdl_of(diag_rank: impl Iterator<Item = (f64, usize)>, k: usize, alpha: f64) -> f64 {
    let lk = (k as f64).log2();
    diag_rank.map(|(s, r)| s * (lk + alpha * r as f64)).sum()
}

/// Per-group sample data.
enum Store {
    /// Firing bitsets, `words` u64 per group slot.
    Bits { words: usize, masks: Vec<u64> },
    /// Float columns (weights), `n` values per group slot.
    Float { n: usize, cols: Vec<f32> },
}

/// Dot product with 8 independent f32 lanes, summed in f64.
fn dot_f32(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tot: f64 = acc.iter().map(|&v| v as f64).sum();
    for (x, y) in ra.iter().zip(rb) {
        tot += (*x as f64) * (*y as f64);
    }
    tot
}

impl Store {
    /// Co-activation of slots `a` and `b`.
    fn coact(&self, a: usize, b: usize) -> f64 {
        match self {
            Store::Bits { words, masks } => {
                let (ma, mb) = (
                    &masks[a * words..(a + 1) * words],
                    &masks[b * words..(b + 1) * words],
                );
                ma.iter()
                    .zip(mb)
                    .map(|(x, y)| (x & y).count_ones() as u64)
                    .sum::<u64>() as f64
            }
            Store::Float { n, cols } => {
                dot_f32(&cols[a * n..(a + 1) * n], &cols[b * n..(b + 1) * n])
            }
        }
    }

    /// Diagonal entry of a merged group: firing count (float: sum of the summed column).
    fn self_coact(&self, a: usize) -> f64 {
        match self {
            Store::Bits { words, masks } => masks[a * words..(a + 1) * words]
                .iter()
                .map(|x| x.count_ones() as u64)
                .sum::<u64>() as f64,
            Store::Float { n, cols } => cols[a * n..(a + 1) * n].iter().map(|&x| x as f64).sum(),
        }
    }

    /// Slot `a` becomes the union (OR / sum) of slots `a` and `b`.
    fn merge_into(&mut self, a: usize, b: usize) {
        match self {
            Store::Bits { words, masks } => {
                let w = *words;
                for i in 0..w {
                    let v = masks[b * w + i];
                    masks[a * w + i] |= v;
                }
            }
            Store::Float { n, cols } => {
                let n = *n;
                for i in 0..n {
                    let v = cols[b * n + i];
                    cols[a * n + i] += v;
                }
            }
        }
    }
}

/// Pick a pair from the upper-triangle cost buffer `tri` (finite `min`/`max` over it, or
/// `min = +inf` if every cost is NaN). Returns the flat index into `tri`.
fn select_pair(
    tri: &[f64],
    min: f64,
    max: f64,
    sampling: &PairSampling,
    rng: &mut Rng,
    weights: &mut Vec<f64>,
) -> usize {
    if min > max {
        // Every cost is NaN (min/max never take NaN, so they stayed at ±inf): nothing to prefer.
        return 0;
    }
    let argmin = || tri.iter().position(|&f| f == min).unwrap_or(0);
    match *sampling {
        PairSampling::Range { threshold } => {
            let cutoff = min + threshold * (max - min);
            let count = tri.iter().filter(|&&f| f <= cutoff).count();
            if count == 0 {
                // NaN or negative threshold.
                return argmin();
            }
            let mut r = rng.below(count);
            for (idx, &f) in tri.iter().enumerate() {
                if f <= cutoff {
                    if r == 0 {
                        return idx;
                    }
                    r -= 1;
                }
            }
            argmin()
        }
        PairSampling::Mcmc { temperature } => {
            if temperature.is_nan() || temperature <= 0.0 {
                return argmin();
            }
            weights.clear();
            let mut total = 0.0;
            for &f in tri {
                let w = (-(f - min) / temperature).exp();
                let w = if w > 0.0 { w } else { 0.0 }; // NaN -> 0
                total += w;
                weights.push(w);
            }
            if !(total > 0.0 && total.is_finite()) {
                return argmin();
            }
            let u = rng.uniform_f64() * total;
            let mut acc = 0.0;
            let mut last_pos = None;
            for (idx, &w) in weights.iter().enumerate() {
                if w > 0.0 {
                    acc += w;
                    if u < acc {
                        return idx;
                    }
                    last_pos = Some(idx);
                }
            }
            last_pos.unwrap_or_else(argmin)
        }
    }
}

/// Decode a flat upper-triangle index (row-major, `i < j`) of a k×k matrix.
fn tri_to_pair(mut flat: usize, k: usize) -> (usize, usize) {
    for i in 0..k {
        let row_len = k - 1 - i;
        if flat < row_len {
            return (i, i + 1 + flat);
        }
        flat -= row_len;
    }
    unreachable!("flat index out of range")
}

/// Run the greedy MDL merge on `acts` (`[n_samples, labels.len()]`, row-major).
///
/// Never panics on degenerate input: no samples, no components, all components dead or a single
/// alive component all give a history with only the initial state.
pub fn merge_iteration(
    acts: &[f32],
    n_samples: usize,
    labels: &[String],
    config: &MergeConfig,
) -> Result<MergeHistory, MergeError> {
    merge_iteration_with(acts, n_samples, labels, config, &mut |_, _| true)
}

/// [`merge_iteration`] that reports each merge step to `progress(done, total)` (merges done,
/// merges to do at most) and stops with [`MergeError::Cancelled`] when it returns false.
pub fn merge_iteration_with(
    acts: &[f32],
    n_samples: usize,
    labels: &[String],
    config: &MergeConfig,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<MergeHistory, MergeError> {
    let n_cols = labels.len();
    if n_samples.checked_mul(n_cols) != Some(acts.len()) {
        return Err(MergeError::ShapeMismatch {
            acts_len: acts.len(),
            n_samples,
            n_components: n_cols,
        });
    }

    // 1. dead filtering
    let mut max_act = vec![f32::NEG_INFINITY; n_cols];
    if n_cols > 0 {
        for row in acts.chunks_exact(n_cols) {
            for (m, &x) in max_act.iter_mut().zip(row) {
                if x > *m {
                    *m = x;
                }
            }
        }
    }
    let filter = config.filter_dead_threshold;
    // max_act is never NaN (starts at -inf, only raised by `x > m`).
    let is_dead = |col: usize| filter > 0.0 && max_act[col] < filter;
    let alive_columns: Vec<usize> = (0..n_cols).filter(|&i| !is_dead(i)).collect();
    let dead_columns: Vec<usize> = (0..n_cols).filter(|&i| is_dead(i)).collect();
    let c = alive_columns.len();

    // 2. masks / weights and co-activations
    let words = n_samples.div_ceil(64);
    let fire_thr = config.activation_threshold.unwrap_or(0.0);
    let mut firing_masks = vec![0u64; c * words];
    for s in 0..n_samples {
        let row = &acts[s * n_cols..(s + 1) * n_cols];
        let (w, bit) = (s / 64, 1u64 << (s % 64));
        for (a, &col) in alive_columns.iter().enumerate() {
            if row[col] > fire_thr {
                firing_masks[a * words + w] |= bit;
            }
        }
    }
    let mut store = match config.activation_threshold {
        Some(_) => Store::Bits {
            words,
            masks: firing_masks.clone(),
        },
        None => {
            let mut cols = vec![0f32; c * n_samples];
            for s in 0..n_samples {
                let row = &acts[s * n_cols..(s + 1) * n_cols];
                for (a, &col) in alive_columns.iter().enumerate() {
                    let x = row[col];
                    cols[a * n_samples + s] = if x.is_finite() { x } else { 0.0 };
                }
            }
            Store::Float { n: n_samples, cols }
        }
    };
    // Slot-indexed co-activation matrix (c×c); slot = alive index of the group's first member.
    let mut coact = vec![0f64; c * c];
    for i in 0..c {
        for j in i..c {
            let v = store.coact(i, j);
            coact[i * c + j] = v;
            coact[j * c + i] = v;
        }
    }

    // 3. identity grouping
    let alpha = config.alpha;
    let mut order: Vec<usize> = (0..c).collect(); // logical group -> slot (always ascending)
    let mut rank: Vec<usize> = vec![1; c]; // per slot
    let mut comp_slot: Vec<usize> = (0..c).collect(); // component -> slot
    let mut slot_to_logical = vec![0u32; c];
    let inv_n = if n_samples > 0 {
        1.0 / n_samples as f64
    } else {
        0.0
    };

    let mdl0 = mdl_of((0..c).map(|i| (coact[i * c + i], 1)), c, alpha);
    let mut history = MergeHistory {
        labels_alive: alive_columns.iter().map(|&i| labels[i].clone()).collect(),
        dead_labels: dead_columns.iter().map(|&i| labels[i].clone()).collect(),
        alive_columns,
        dead_columns,
        n_samples,
        costs: Vec::new(),
        pairs: Vec::new(),
        k_groups: vec![c],
        mdl: vec![mdl0],
        mdl_norm: vec![mdl0 * inv_n],
        group_idxs: vec![(0..c as u32).collect()],
        firing_masks,
        mask_words: words,
        config: config.clone(),
    };

    // 4-7. merge loop
    let mut rng = Rng::new(config.seed);
    let max_iters = config.iters.unwrap_or(usize::MAX);
    let stop_k = config.stop_at_k.max(1);
    let mut s: Vec<f64> = Vec::with_capacity(c);
    let mut r: Vec<f64> = Vec::with_capacity(c);
    let mut tri: Vec<f64> = Vec::with_capacity(c * c.saturating_sub(1) / 2);
    let mut p: Vec<f64> = Vec::with_capacity(c);
    let mut q: Vec<f64> = Vec::with_capacity(c);
    let mut weights: Vec<f64> = Vec::new();
    let total = c.saturating_sub(stop_k).min(max_iters);
    while n_samples > 0 && order.len() > stop_k && history.pairs.len() < max_iters {
        if !progress(history.pairs.len(), total) {
            return Err(MergeError::Cancelled);
        }
        let k = order.len();
        s.clear();
        r.clear();
        for &slot in &order {
            s.push(coact[slot * c + slot] * inv_n);
            r.push(rank[slot] as f64);
        }
        let sc = CostScalars::new(k, s.iter().sum(), alpha);
        // F_ij = base_i - p_j + (s_i + s_j - s_ij)·(c_i + q_j)   (see `CostScalars::row_terms`)
        p.clear();
        q.clear();
        for j in 0..k {
            let (pj, qj) = sc.col_terms(s[j], r[j]);
            p.push(pj);
            q.push(qj);
        }
        tri.resize(k * (k - 1) / 2, 0.0);
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        let mut off = 0;
        for i in 0..k {
            let row = &coact[order[i] * c..(order[i] + 1) * c];
            let (base, ci) = sc.row_terms(p[i], q[i]);
            let si = s[i];
            let len = k - 1 - i;
            let out = &mut tri[off..off + len];
            off += len;
            let js = i + 1..k;
            for ((o, &slot), ((&sj, &pj), &qj)) in out
                .iter_mut()
                .zip(&order[js.clone()])
                .zip(s[js.clone()].iter().zip(&p[js.clone()]).zip(&q[js]))
            {
                let f = base - pj + (si + sj - row[slot] * inv_n) * (ci + qj);
                min = min.min(f);
                max = max.max(f);
                *o = f;
            }
        }
        let flat = select_pair(
            &tri,
            min,
            max,
            &config.pair_sampling,
            &mut rng,
            &mut weights,
        );
        let cost = tri[flat];
        let (i, j) = tri_to_pair(flat, k);

        // merge j into i
        let (a, b) = (order[i], order[j]);
        store.merge_into(a, b);
        order.remove(j);
        for &x in &order {
            if x != a {
                let v = store.coact(a, x);
                coact[a * c + x] = v;
                coact[x * c + a] = v;
            }
        }
        coact[a * c + a] = store.self_coact(a);
        rank[a] += rank[b];
        for cs in comp_slot.iter_mut() {
            if *cs == b {
                *cs = a;
            }
        }
        for (g, &slot) in order.iter().enumerate() {
            slot_to_logical[slot] = g as u32;
        }

        let k_new = order.len();
        let mdl = mdl_of(
            order.iter().map(|&sl| (coact[sl * c + sl], rank[sl])),
            k_new,
            alpha,
        );
        history.pairs.push((i, j));
        history.costs.push(cost);
        history.k_groups.push(k_new);
        history.mdl.push(mdl);
        history.mdl_norm.push(mdl * inv_n);
        history
            .group_idxs
            .push(comp_slot.iter().map(|&sl| slot_to_logical[sl]).collect());
    }
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("layer{}:{}", i % 3, i)).collect()
    }

    fn greedy() -> MergeConfig {
        MergeConfig {
            pair_sampling: PairSampling::Range { threshold: 0.0 },
            ..MergeConfig::default()
        }
    }

    /// `n × c` acts from a closure `(sample, col) -> value`.
    fn make_acts(n: usize, c: usize, f: impl Fn(usize, usize) -> f32) -> Vec<f32> {
        let mut v = Vec::with_capacity(n * c);
        for s in 0..n {
            for j in 0..c {
                v.push(f(s, j));
            }
        }
        v
    }

    /// Sparse random activations with `n_feat` latent features; component j follows feature
    /// j % n_feat with 90% reliability plus 1% spurious firing.
    fn random_acts(n: usize, c: usize, n_feat: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut acts = vec![0f32; n * c];
        for s in 0..n {
            let feats: Vec<bool> = (0..n_feat).map(|_| rng.uniform_f64() < 0.08).collect();
            for j in 0..c {
                let on = (feats[j % n_feat] && rng.uniform_f64() < 0.9) || rng.uniform_f64() < 0.01;
                acts[s * c + j] = if on {
                    0.2 + 0.8 * rng.uniform_f32()
                } else {
                    0.005 * rng.uniform_f32()
                };
            }
        }
        acts
    }

    fn assert_close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{a} vs {b}");
    }

    #[test]
    fn cost_matches_hand_computation() {
        // n = 4 samples, 3 components:
        //   c0 fires on samples {0, 1}, c1 on {0, 2}, c2 on {3}.
        // K = [[2, 1, 0], [1, 2, 0], [0, 0, 1]];  s = K / 4:
        //   s00 = s11 = 0.5, s22 = 0.25, s01 = 0.25, s02 = s12 = 0;  Σ s_mm = 1.25;  k = 3, r = 1.
        // F_01: s∪ = 0.5 + 0.5 - 0.25 = 0.75
        //   (1.25 - 1.0)·log2(2/3)           = 0.25·(-0.5849625007211563) = -0.1462406251802891
        //   0.75·log2 2 - 0.5·log2 3 - 0.5·log2 3 = 0.75 - 1.584962500721156 = -0.834962500721156
        //   α[0.75·2 - 0.5 - 0.5]            = 0.5
        //   F_01 = -0.4812031259014451
        // F_02 (= F_12 by symmetry): s∪ = 0.5 + 0.25 - 0 = 0.75
        //   (1.25 - 0.75)·log2(2/3)          = -0.2924812503605781
        //   0.75·1 - 0.75·log2 3             = -0.4387218755408670
        //   α[0.75·2 - 0.5 - 0.25]           = 0.75
        //   F_02 = 0.018796874098554794
        let coact = [2.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0];
        let f = merge_cost_matrix(&coact, &[1, 1, 1], 4, 1.0);
        assert!(f[0].is_nan() && f[4].is_nan() && f[8].is_nan());
        assert_close(f[1], -0.4812031259014451, 1e-12);
        assert_close(f[2], 0.018796874098554794, 1e-12);
        assert_close(f[5], 0.018796874098554794, 1e-12);
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    assert_eq!(f[i * 3 + j].to_bits(), f[j * 3 + i].to_bits());
                }
            }
        }
        // alpha = 0: only the bits terms remain. F_01 = -0.1462406... - 0.8349625... = -0.98120312590
        let f0 = merge_cost_matrix(&coact, &[1, 1, 1], 4, 0.0);
        assert_close(f0[1], -0.9812031259014451, 1e-12);

        // The same example through merge_iteration, run down to k = 1.
        let m = [[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]];
        let acts = make_acts(4, 3, |s, j| m[s][j] as f32);
        let cfg = MergeConfig {
            stop_at_k: 1,
            ..greedy()
        };
        let h = merge_iteration(&acts, 4, &labels(3), &cfg).unwrap();
        // step 1 merges (0, 1): group {c0, c1} fires on {0, 1, 2} (3 samples, r = 2), c2 on {3}.
        // step 2 at k = 2: s = (0.75, 0.25), s01 = 0, Σ = 1:
        //   (1 - 1)·log2(1/2) + [1·log2 1 - 0.75 - 0.25] + [1·3 - 0.75·2 - 0.25·1] = -1 + 1.25 = 0.25
        assert_eq!(h.pairs, vec![(0, 1), (0, 1)]);
        assert_eq!(h.k_groups, vec![3, 2, 1]);
        assert_close(h.costs[0], -0.4812031259014451, 1e-12);
        assert_close(h.costs[1], 0.25, 1e-12);
        // MDL: k=3: 5·(log2 3 + 1) = 12.924812503605781; k=2: 3·(1 + 2) + 1·(1 + 1) = 11;
        //      k=1: 4·(0 + 3) = 12.
        assert_close(h.mdl[0], 12.924_812_503_605_78, 1e-12);
        assert_close(h.mdl[1], 11.0, 1e-12);
        assert_close(h.mdl[2], 12.0, 1e-12);
        assert_close(h.mdl_norm[1], 2.75, 1e-12);
        assert_eq!(h.best_k(), 2);
        assert_eq!(h.groups_at(2), vec![0, 0, 1]);
        assert_eq!(h.groups_at(1), vec![0, 0, 0]);
        assert_eq!(h.groups_at(3), vec![0, 1, 2]);
        let cl = h.clusters_at(2);
        assert_eq!(cl.len(), 2);
        assert_eq!(cl[0].members, vec![0, 1]);
        assert_eq!(cl[0].rank, 2);
        assert_close(cl[0].firing_fraction, 0.75, 1e-12);
        assert_eq!(cl[1].member_labels, vec!["layer2:2".to_string()]);
    }

    #[test]
    fn cost_with_unequal_ranks_and_alpha_matches_hand_computation() {
        // Same co-activations as above (s = 0.5, 0.5, 0.25; s01 = 0.25; Σ = 1.25; k = 3) with
        // ranks (2, 3, 1) and α = 2. Every pair has s∪ = 0.75.
        // F_01 = 0.25·log2(2/3) + [0.75 − 1.0·log2 3] + 2·[0.75·5 − 0.5·2 − 0.5·3]
        //      = −0.14624062518028906 − 0.8349625007211562 + 2.5 = 1.5187968740985547
        // F_02 = 0.5·log2(2/3) + [0.75 − 0.75·log2 3] + 2·[0.75·3 − 0.5·2 − 0.25·1]
        //      = −0.2924812503605781 − 0.438721875540867 + 2.0 = 1.2687968740985549
        // F_12 = (same index terms as F_02) + 2·[0.75·4 − 0.5·3 − 0.25·1] = 1.7687968740985549
        let coact = [2.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0];
        let f = merge_cost_matrix(&coact, &[2, 3, 1], 4, 2.0);
        assert_close(f[1], 1.5187968740985547, 1e-12);
        assert_close(f[2], 1.268_796_874_098_555, 1e-12);
        assert_close(f[5], 1.768_796_874_098_555, 1e-12);
        assert_eq!(f[3].to_bits(), f[1].to_bits());
    }

    #[test]
    fn samples_where_nothing_fires_change_no_decision() {
        // Every term of F and of the MDL is linear in s = K / n, so padding the batch with
        // samples on which nothing fires scales all costs by the same factor: the merge history
        // (pairs, including the range sampler's random picks) and best k are unchanged. The
        // sparsity of toy data therefore does not bias the stopping point by itself.
        let (n, c) = (400, 24);
        let acts = random_acts(n, c, 6, 21);
        let mut padded = acts.clone();
        padded.extend(std::iter::repeat_n(0.0f32, 3 * n * c));
        let cfg = MergeConfig {
            stop_at_k: 1,
            ..MergeConfig::default()
        };
        let h = merge_iteration(&acts, n, &labels(c), &cfg).unwrap();
        let hp = merge_iteration(&padded, 4 * n, &labels(c), &cfg).unwrap();
        assert_eq!(h.pairs, hp.pairs);
        assert_eq!(h.best_k(), hp.best_k());
        for (a, b) in h.mdl_norm.iter().zip(&hp.mdl_norm) {
            assert_close(*b, a / 4.0, 1e-12);
        }
    }

    /// The bias of the uniform index code (see `ClusterOptions::alpha` in `cluster/mod.rs`):
    /// 10 components firing together on 20% of samples (one mechanism) and 20 statistically
    /// independent components firing on 3% each. With α = 1 the MDL minimum merges unrelated
    /// rare components; with α = 2 they stay apart. (With 1% rare vs. a 60% dense block even
    /// α = 2 merges a few: the bias shrinks with α but does not vanish.)
    #[test]
    fn alpha_one_merges_independent_rare_components_alpha_two_does_not() {
        let (n, c) = (8000, 30);
        let mut rng = Rng::new(3);
        let mut acts = vec![0f32; n * c];
        for s in 0..n {
            let dense = rng.uniform_f64() < 0.2;
            for j in 0..c {
                let on = if j < 10 {
                    dense
                } else {
                    rng.uniform_f64() < 0.03
                };
                acts[s * c + j] = if on { 0.5 } else { 0.0 };
            }
        }
        let lab = labels(c);
        let rare_merged = |alpha: f64| {
            let cfg = MergeConfig {
                alpha,
                stop_at_k: 1,
                ..MergeConfig::default()
            };
            let cl = merge_iteration(&acts, n, &lab, &cfg)
                .unwrap()
                .best_clusters();
            assert_eq!(cl[0].members, (0..10).collect::<Vec<_>>(), "alpha {alpha}");
            cl.iter()
                .filter(|c| c.members.iter().filter(|&&m| m >= 10).count() > 1)
                .count()
        };
        assert!(rare_merged(1.0) >= 5);
        assert_eq!(rare_merged(2.0), 0);
    }

    /// 13 columns: 5 planted pairs (each pair fires on its own disjoint 10% of the samples)
    /// and 3 dead columns, interleaved; sub-threshold noise everywhere else.
    fn planted() -> (Vec<f32>, usize, Vec<usize>, Vec<[usize; 2]>) {
        let n = 1000;
        // column -> planted group (None = dead)
        let layout: [Option<usize>; 13] = [
            Some(3),
            None,
            Some(0),
            Some(1),
            Some(4),
            Some(0),
            None,
            Some(2),
            Some(3),
            Some(1),
            Some(4),
            Some(2),
            None,
        ];
        let mut rng = Rng::new(99);
        let mut acts = vec![0f32; n * 13];
        for s in 0..n {
            for (col, g) in layout.iter().enumerate() {
                acts[s * 13 + col] = match g {
                    None => 0.0009 * rng.uniform_f32(),
                    Some(g) if s / 100 == *g => 0.3 + 0.7 * rng.uniform_f32(),
                    Some(_) => 0.009 * rng.uniform_f32(),
                };
            }
        }
        let dead: Vec<usize> = (0..13).filter(|&c| layout[c].is_none()).collect();
        let alive: Vec<usize> = (0..13).filter(|&c| layout[c].is_some()).collect();
        // planted pairs in alive indices
        let mut pairs = Vec::new();
        for g in 0..5 {
            let m: Vec<usize> = (0..alive.len())
                .filter(|&a| layout[alive[a]] == Some(g))
                .collect();
            pairs.push([m[0], m[1]]);
        }
        pairs.sort();
        (acts, n, dead, pairs)
    }

    #[test]
    fn planted_pairs_are_recovered() {
        let (acts, n, dead, pairs) = planted();
        let lab = labels(13);
        let h = merge_iteration(&acts, n, &lab, &greedy()).unwrap();
        assert_eq!(h.dead_columns, dead);
        assert_eq!(
            h.dead_labels,
            dead.iter().map(|&c| lab[c].clone()).collect::<Vec<_>>()
        );
        assert_eq!(h.n_alive(), 10);
        assert_eq!(h.final_k(), 3);
        assert_eq!(h.best_k(), 5);
        let cl = h.clusters_at(5);
        let got: Vec<[usize; 2]> = cl.iter().map(|c| [c.members[0], c.members[1]]).collect();
        assert!(cl.iter().all(|c| c.rank == 2));
        assert_eq!(got, pairs);
        for c in &cl {
            assert_close(c.firing_fraction, 0.1, 1e-12);
        }
        // MDL at k=5: 5 groups, s = 0.1, r = 2: 0.5·(log2 5 + 2)
        let t = h.state_index(5);
        assert_close(h.mdl_norm[t], 0.5 * (5f64.log2() + 2.0), 1e-12);
        // the first five merges are exactly the planted pairs (cost < 0), later ones cost > 0
        assert!(h.costs[..5].iter().all(|&f| f < 0.0));
        assert!(h.costs[5..].iter().all(|&f| f > 0.0));
        // seeds only change the order among ties, never the result
        for seed in 1..5 {
            let h2 = merge_iteration(&acts, n, &lab, &MergeConfig { seed, ..greedy() }).unwrap();
            assert_eq!(h2.best_k(), 5);
            assert_eq!(h2.groups_at(5), h.groups_at(5));
        }
    }

    #[test]
    fn planted_pairs_with_default_range_sampler_and_noise() {
        // Same planted structure but members miss 5% of their block and fire spuriously on 1%
        // of other samples; default Range(0.05) sampler.
        let n = 2000;
        let c = 10;
        let mut rng = Rng::new(5);
        let mut acts = vec![0f32; n * c];
        for s in 0..n {
            for j in 0..c {
                let in_block = s * 10 / n == j / 2;
                let on = (in_block && rng.uniform_f64() < 0.95) || rng.uniform_f64() < 0.01;
                acts[s * c + j] = if on { 0.5 } else { 0.0 };
            }
        }
        for seed in 0..5 {
            let cfg = MergeConfig {
                seed,
                ..MergeConfig::default()
            };
            let h = merge_iteration(&acts, n, &labels(c), &cfg).unwrap();
            assert_eq!(h.best_k(), 5, "seed {seed}: {:?}", h.mdl_norm);
            let got: Vec<Vec<usize>> = h.clusters_at(5).into_iter().map(|c| c.members).collect();
            let want: Vec<Vec<usize>> = (0..5).map(|g| vec![2 * g, 2 * g + 1]).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn one_big_mechanism_becomes_one_group() {
        // 10 components firing on exactly the same 30% of samples.
        let n = 500;
        let acts = make_acts(n, 10, |s, j| {
            if s % 10 < 3 {
                0.5 + 0.05 * j as f32
            } else {
                0.0
            }
        });
        let cfg = MergeConfig {
            stop_at_k: 1,
            ..greedy()
        };
        let h = merge_iteration(&acts, n, &labels(10), &cfg).unwrap();
        assert_eq!(h.final_k(), 1);
        assert_eq!(h.best_k(), 1);
        let cl = h.best_clusters();
        assert_eq!(cl.len(), 1);
        assert_eq!(cl[0].members, (0..10).collect::<Vec<_>>());
        assert_close(cl[0].firing_fraction, 0.3, 1e-12);
        // MDL is strictly decreasing along the way
        assert!(h.mdl_norm.windows(2).all(|w| w[1] < w[0]));

        // Alongside two planted pairs: best k = 3 = {big, pair, pair}.
        let acts = make_acts(n, 14, |s, j| {
            let on = match j {
                0..=9 => s % 10 < 3,
                10 | 11 => s % 10 == 5,
                _ => s % 10 == 7,
            };
            if on { 1.0 } else { 0.0 }
        });
        let h = merge_iteration(&acts, n, &labels(14), &cfg).unwrap();
        assert_eq!(h.best_k(), 3);
        let got: Vec<Vec<usize>> = h.best_clusters().into_iter().map(|c| c.members).collect();
        assert_eq!(
            got,
            vec![(0..10).collect::<Vec<_>>(), vec![10, 11], vec![12, 13]]
        );
    }

    #[test]
    fn deterministic_for_both_samplers() {
        let (n, c) = (600, 40);
        let acts = random_acts(n, c, 8, 3);
        let lab = labels(c);
        for sampling in [
            PairSampling::Range { threshold: 0.05 },
            PairSampling::Mcmc { temperature: 1.0 },
            PairSampling::Mcmc { temperature: 0.01 },
        ] {
            let cfg = |seed| MergeConfig {
                pair_sampling: sampling,
                seed,
                ..MergeConfig::default()
            };
            let h1 = merge_iteration(&acts, n, &lab, &cfg(11)).unwrap();
            let h2 = merge_iteration(&acts, n, &lab, &cfg(11)).unwrap();
            assert_eq!(h1, h2);
            assert_eq!(h1.final_k(), 3);
            assert_eq!(h1.n_iters(), c - 3);
            // different seeds give different histories (at least one of a few)
            assert!(
                (12..16).any(
                    |seed| merge_iteration(&acts, n, &lab, &cfg(seed)).unwrap().pairs != h1.pairs
                ),
                "{sampling:?}"
            );
        }
    }

    /// Recompute every recorded state from scratch (groups -> OR masks -> K) and check MDL,
    /// the recorded cost of each merge against a fresh cost matrix, and the MDL-delta identity.
    fn check_consistency(h: &MergeHistory, cfg: &MergeConfig) {
        let c = h.n_alive();
        let w = h.mask_words;
        for t in 0..=h.n_iters() {
            let g = &h.group_idxs[t];
            let k = h.k_groups[t];
            assert_eq!(k, c - t);
            // group ids are 0..k, ordered by first member
            let mut first = vec![usize::MAX; k];
            for (comp, &gi) in g.iter().enumerate() {
                let gi = gi as usize;
                assert!(gi < k);
                first[gi] = first[gi].min(comp);
            }
            assert!(first.windows(2).all(|p| p[0] < p[1]));
            let mut masks = vec![0u64; k * w];
            let mut ranks = vec![0usize; k];
            for (comp, &gi) in g.iter().enumerate() {
                let gi = gi as usize;
                ranks[gi] += 1;
                for i in 0..w {
                    masks[gi * w + i] |= h.firing_masks[comp * w + i];
                }
            }
            let mut coact = vec![0f64; k * k];
            for a in 0..k {
                for b in 0..k {
                    coact[a * k + b] = (0..w)
                        .map(|i| (masks[a * w + i] & masks[b * w + i]).count_ones())
                        .sum::<u32>() as f64;
                }
            }
            let mdl = mdl_of((0..k).map(|a| (coact[a * k + a], ranks[a])), k, cfg.alpha);
            assert_close(h.mdl[t], mdl, 1e-9);
            if t < h.n_iters() {
                let f = merge_cost_matrix(&coact, &ranks, h.n_samples, cfg.alpha);
                let (i, j) = h.pairs[t];
                assert!(i < j && j < k);
                assert_close(h.costs[t], f[i * k + j], 1e-9);
                // F is the change of the normalised description length
                assert_close(h.mdl_norm[t + 1] - h.mdl_norm[t], h.costs[t], 1e-9);
            }
        }
    }

    #[test]
    fn incremental_state_matches_recomputation() {
        let (n, c) = (300, 30);
        let acts = random_acts(n, c, 6, 8);
        for (alpha, sampling) in [
            (1.0, PairSampling::Range { threshold: 0.0 }),
            (0.3, PairSampling::Range { threshold: 0.2 }),
            (2.0, PairSampling::Mcmc { temperature: 0.5 }),
        ] {
            let cfg = MergeConfig {
                alpha,
                pair_sampling: sampling,
                stop_at_k: 1,
                seed: 4,
                ..MergeConfig::default()
            };
            let h = merge_iteration(&acts, n, &labels(c), &cfg).unwrap();
            assert_eq!(h.final_k(), 1);
            check_consistency(&h, &cfg);
        }
    }

    #[test]
    fn iters_and_stop_at_k() {
        let (n, c) = (200, 20);
        let acts = random_acts(n, c, 5, 1);
        let h = merge_iteration(
            &acts,
            n,
            &labels(c),
            &MergeConfig {
                iters: Some(7),
                ..MergeConfig::default()
            },
        )
        .unwrap();
        assert_eq!(h.n_iters(), 7);
        assert_eq!(h.final_k(), 13);
        assert_eq!(h.mdl.len(), 8);
        assert_eq!(h.group_idxs.len(), 8);
        // clamping
        assert_eq!(h.groups_at(100), (0..c).collect::<Vec<_>>());
        assert_eq!(h.groups_at(2), h.groups_at(13));
        let h = merge_iteration(
            &acts,
            n,
            &labels(c),
            &MergeConfig {
                stop_at_k: 10,
                ..MergeConfig::default()
            },
        )
        .unwrap();
        assert_eq!(h.final_k(), 10);
        let h = merge_iteration(
            &acts,
            n,
            &labels(c),
            &MergeConfig {
                iters: Some(0),
                ..MergeConfig::default()
            },
        )
        .unwrap();
        assert_eq!(h.n_iters(), 0);
        assert_eq!(h.best_k(), c);
    }

    #[test]
    fn float_weight_mode_runs() {
        let (n, c) = (256, 12);
        let acts = random_acts(n, c, 4, 2);
        let cfg = MergeConfig {
            activation_threshold: None,
            ..MergeConfig::default()
        };
        let h1 = merge_iteration(&acts, n, &labels(c), &cfg).unwrap();
        let h2 = merge_iteration(&acts, n, &labels(c), &cfg).unwrap();
        assert_eq!(h1, h2);
        assert_eq!(h1.final_k(), 3);
        assert!(h1.mdl.iter().chain(&h1.costs).all(|v| v.is_finite()));
        // initial MDL uses K_ii = Σ a²
        let mut diag = 0.0;
        for s in 0..n {
            for j in 0..c {
                diag += (acts[s * c + j] as f64).powi(2);
            }
        }
        assert_close(h1.mdl[0], diag * ((c as f64).log2() + 1.0), 1e-5);
    }

    #[test]
    fn edge_cases_do_not_panic() {
        let cfg = MergeConfig::default();
        // all dead
        let acts = vec![0.0005f32; 50 * 4];
        let h = merge_iteration(&acts, 50, &labels(4), &cfg).unwrap();
        assert_eq!(h.n_alive(), 0);
        assert_eq!(h.dead_labels.len(), 4);
        assert_eq!(h.n_iters(), 0);
        assert_eq!(h.best_k(), 0);
        assert_eq!(h.k_groups, vec![0]);
        assert!(h.groups_at(3).is_empty());
        assert!(h.clusters_at(1).is_empty());
        // single alive component
        let acts = make_acts(50, 3, |s, j| if j == 1 && s % 2 == 0 { 0.7 } else { 0.0 });
        let h = merge_iteration(&acts, 50, &labels(3), &cfg).unwrap();
        assert_eq!(h.n_alive(), 1);
        assert_eq!(h.alive_columns, vec![1]);
        assert_eq!(h.best_k(), 1);
        assert_eq!(h.n_iters(), 0);
        // k = 1: MDL = 25·(0 + 1)
        assert_close(h.mdl[0], 25.0, 1e-12);
        let cl = h.clusters_at(1);
        assert_eq!(cl.len(), 1);
        assert_close(cl[0].firing_fraction, 0.5, 1e-12);
        // no samples: everything dead with a positive filter, all kept (but no merges) without
        let h = merge_iteration(&[], 0, &labels(5), &cfg).unwrap();
        assert_eq!((h.n_alive(), h.n_iters(), h.best_k()), (0, 0, 0));
        let h = merge_iteration(
            &[],
            0,
            &labels(5),
            &MergeConfig {
                filter_dead_threshold: 0.0,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_eq!((h.n_alive(), h.n_iters(), h.best_k()), (5, 0, 5));
        assert_eq!(h.mdl_norm, vec![0.0]);
        assert_eq!(h.clusters_at(5)[0].firing_fraction, 0.0);
        // no components
        let h = merge_iteration(&[], 10, &[], &cfg).unwrap();
        assert_eq!(h.n_alive(), 0);
        // alive but never above the activation threshold: merged with zero cost terms, no NaN
        let acts = make_acts(40, 6, |_, _| 0.005);
        let h = merge_iteration(
            &acts,
            40,
            &labels(6),
            &MergeConfig {
                stop_at_k: 1,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert_eq!(h.final_k(), 1);
        assert!(h.costs.iter().chain(&h.mdl).all(|v| v.is_finite()));
        // weird sampler parameters fall back to the argmin
        for sampling in [
            PairSampling::Range {
                threshold: f64::NAN,
            },
            PairSampling::Range { threshold: -1.0 },
            PairSampling::Mcmc { temperature: 0.0 },
            PairSampling::Mcmc {
                temperature: f64::NAN,
            },
        ] {
            let (acts, n, _, _) = planted();
            let h = merge_iteration(
                &acts,
                n,
                &labels(13),
                &MergeConfig {
                    pair_sampling: sampling,
                    ..cfg.clone()
                },
            )
            .unwrap();
            assert_eq!(h.best_k(), 5);
        }
        // NaN activations are treated as not firing
        let mut acts = random_acts(64, 5, 2, 0);
        acts[3] = f32::NAN;
        let h = merge_iteration(&acts, 64, &labels(5), &cfg).unwrap();
        assert!(h.mdl.iter().all(|v| v.is_finite()));
        // shape mismatch is an error, not a panic
        assert!(matches!(
            merge_iteration(&[0.0; 7], 2, &labels(4), &cfg),
            Err(MergeError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn progress_reports_every_merge_and_cancel_stops() {
        let (acts, n, _, _) = planted();
        let lab = labels(13);
        let full = merge_iteration(&acts, n, &lab, &greedy()).unwrap();
        let mut seen = vec![];
        let h = merge_iteration_with(&acts, n, &lab, &greedy(), &mut |done, total| {
            seen.push((done, total));
            true
        })
        .unwrap();
        assert_eq!(h.pairs, full.pairs, "reporting changes nothing");
        let total = full.pairs.len();
        assert_eq!(seen, (0..total).map(|d| (d, total)).collect::<Vec<_>>());
        // Cancelled after 3 merges: no further merge is done.
        let mut calls = 0;
        let r = merge_iteration_with(&acts, n, &lab, &greedy(), &mut |done, _| {
            calls += 1;
            done < 3
        });
        assert_eq!(r.unwrap_err(), MergeError::Cancelled);
        assert_eq!(calls, 4);
    }
}
