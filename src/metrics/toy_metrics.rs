//! Evaluation metrics for Stochastic Parameter Decomposition (SPD) on toy models.
//!
//! Pure Rust, `std` only. Mirrors the metrics of the reference implementation
//! (goodfire-ai/spd): the target-solution error (`IdentityCIPattern` /
//! `DenseCIPattern`), the column permutations used to display causal-importance
//! (CI) matrices, scipy's `linear_sum_assignment`, and the SPD paper's MMCS / ML2R.
//!
//! # Conventions
//!
//! * **Matrices** are row-major slices with explicit dimensions: a `rows × cols`
//!   matrix `m` stores entry `(r, c)` at `m[r * cols + c]`. Every function asserts
//!   `m.len() == rows * cols` (a mismatch is a caller bug and panics with a clear
//!   message); apart from that, no function panics, including on empty inputs
//!   (`rows == 0` and/or `cols == 0`).
//! * **Thresholds / tolerances** are `f64` (like Python floats). When they are
//!   compared with `f32` data they are first rounded to `f32`, which is what torch
//!   does when comparing a `float32` tensor with a Python scalar. For the identity
//!   error, `1 - tol` is computed in `f64` and then rounded, as in Python.
//! * **Accumulations** (sums, means, norms, dot products) are done in `f64`.
//! * **NaN** in a CI matrix is treated as "smallest possible value" by the
//!   permutations, and fails every `>` / `<` / `>=` comparison (so it is never
//!   counted by the error functions), exactly as torch comparisons behave.
//! * **Permutations** are returned as column orders: `perm[j]` is the original
//!   column that ends up at position `j` (`permuted[:, j] = m[:, perm[j]]`), as in
//!   the reference's `ci_vals[:, perm_indices]`. Use [`permute_columns`] to apply one.

/// Cut-over of [`permute_to_identity`]: the Hungarian algorithm is used when
/// `min(rows, cols) < HUNGARIAN_MAX_SIZE`, otherwise the greedy approximation
/// (the reference's `method="auto"`).
pub const HUNGARIAN_MAX_SIZE: usize = 500;

/// `eps` used to clamp vector norms in the cosine similarities of [`mmcs`] /
/// [`mmcs_rows`] and the denominator of the L2 ratio.
pub const COSINE_EPS: f64 = 1e-12;

fn check_shape(len: usize, rows: usize, cols: usize, what: &str) {
    assert!(
        rows.checked_mul(cols) == Some(len),
        "{what}: data has {len} elements but shape is {rows}x{cols}"
    );
}

// ---------------------------------------------------------------------------
// Linear sum assignment
// ---------------------------------------------------------------------------

/// Minimum-cost assignment for a rectangular `rows × cols` cost matrix
/// (row-major), like `scipy.optimize.linear_sum_assignment`.
///
/// Returns `min(rows, cols)` pairs `(row, col)`, sorted by row, with distinct
/// rows and distinct columns, minimising the summed cost. When `rows <= cols`
/// every row is assigned; otherwise every column is. Empty inputs give an
/// empty vector.
///
/// Algorithm: shortest augmenting paths with dual potentials (Kuhn–Munkres in the
/// Jonker–Volgenant formulation), `O(n² m)` with `n = min(rows, cols)`,
/// `m = max(rows, cols)`. Exact up to `f64` rounding.
///
/// Differences from scipy:
/// * When several assignments share the optimal cost, the one returned may
///   differ from scipy's (the cost is the same).
/// * scipy raises on NaN / infeasible matrices; here non-finite entries are
///   replaced by finite stand-ins: `NaN` and `+inf` become a penalty larger
///   than the spread of all finite entries (so they are avoided whenever an
///   assignment using only finite entries exists), `-inf` becomes a matching
///   bonus. If all entries are non-finite, all are treated as equal.
pub fn linear_sum_assignment(cost: &[f64], rows: usize, cols: usize) -> Vec<(usize, usize)> {
    check_shape(cost.len(), rows, cols, "linear_sum_assignment");
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let cost = sanitize_costs(cost, rows.min(cols));
    if rows <= cols {
        hungarian_rows_le_cols(&cost, rows, cols)
            .into_iter()
            .enumerate()
            .collect()
    } else {
        let mut transposed = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                transposed[c * rows + r] = cost[r * cols + c];
            }
        }
        let mut pairs: Vec<(usize, usize)> = hungarian_rows_le_cols(&transposed, cols, rows)
            .into_iter()
            .enumerate()
            .map(|(c, r)| (r, c))
            .collect();
        pairs.sort_unstable();
        pairs
    }
}

/// Replace non-finite costs with finite stand-ins (see [`linear_sum_assignment`]).
fn sanitize_costs(cost: &[f64], k: usize) -> Vec<f64> {
    if cost.iter().all(|x| x.is_finite()) {
        return cost.to_vec();
    }
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &x in cost.iter().filter(|x| x.is_finite()) {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if lo > hi {
        // No finite entry at all.
        return vec![0.0; cost.len()];
    }
    // Any assignment has k entries; a gap of (span + 1) * (k + 1) exceeds the
    // largest possible difference between two all-finite assignments.
    let gap = (hi - lo + 1.0) * (k as f64 + 1.0);
    cost.iter()
        .map(|&x| {
            if x.is_finite() {
                x
            } else if x == f64::NEG_INFINITY {
                lo - gap
            } else {
                hi + gap
            }
        })
        .collect()
}

/// Hungarian algorithm for `n <= m` (`a` is `n × m`, row-major, finite).
/// Returns the column assigned to each row.
fn hungarian_rows_le_cols(a: &[f64], n: usize, m: usize) -> Vec<usize> {
    debug_assert!(n <= m);
    // 1-based indices; column 0 / row 0 are sentinels.
    let mut u = vec![0.0f64; n + 1];
    let mut v = vec![0.0f64; m + 1];
    let mut p = vec![0usize; m + 1]; // p[j]: row matched to column j (0 = free)
    let mut way = vec![0usize; m + 1];
    let mut minv = vec![f64::INFINITY; m + 1];
    let mut used = vec![false; m + 1];
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0usize;
        minv.fill(f64::INFINITY);
        used.fill(false);
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let row = &a[(i0 - 1) * m..i0 * m];
            let mut delta = f64::INFINITY;
            // At most i - 1 < m real columns are used, so a free one always exists.
            let mut j1 = usize::MAX;
            for j in 1..=m {
                if used[j] {
                    continue;
                }
                let cur = row[j - 1] - u[i0] - v[j];
                if cur < minv[j] {
                    minv[j] = cur;
                    way[j] = j0;
                }
                if j1 == usize::MAX || minv[j] < delta {
                    delta = minv[j];
                    j1 = j;
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        // Augment along the alternating path.
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut row_to_col = vec![0usize; n];
    for (j, &row) in p.iter().enumerate().skip(1) {
        if row != 0 {
            row_to_col[row - 1] = j - 1;
        }
    }
    row_to_col
}

// ---------------------------------------------------------------------------
// Permutations
// ---------------------------------------------------------------------------

/// Apply a column order: returns the `rows × perm.len()` matrix whose column `j`
/// is column `perm[j]` of `m`.
///
/// Panics if an index in `perm` is `>= cols` (caller bug).
pub fn permute_columns(m: &[f32], rows: usize, cols: usize, perm: &[usize]) -> Vec<f32> {
    check_shape(m.len(), rows, cols, "permute_columns");
    let mut out = Vec::with_capacity(rows * perm.len());
    for r in 0..rows {
        let row = &m[r * cols..(r + 1) * cols];
        out.extend(perm.iter().map(|&c| row[c]));
    }
    out
}

/// Column order making `m` (`rows × cols`) as close to the identity as possible
/// (the reference's `permute_to_identity` with `method="auto"`).
///
/// If `min(rows, cols) < 500` ([`HUNGARIAN_MAX_SIZE`]) this is
/// [`permute_to_identity_hungarian`], otherwise [`permute_to_identity_greedy`].
/// Always returns a permutation of `0..cols`.
pub fn permute_to_identity(m: &[f32], rows: usize, cols: usize) -> Vec<usize> {
    if rows.min(cols) < HUNGARIAN_MAX_SIZE {
        permute_to_identity_hungarian(m, rows, cols)
    } else {
        permute_to_identity_greedy(m, rows, cols)
    }
}

/// Hungarian column order: with `k = min(rows, cols)`, solve
/// [`linear_sum_assignment`] on `-m[..k, :]` (maximising the diagonal sum),
/// put the assigned columns first in row order, then the unassigned columns in
/// ascending index order. NaN entries are never preferred (see
/// [`linear_sum_assignment`]). Among optimal assignments with equal diagonal
/// sum the choice may differ from scipy's.
pub fn permute_to_identity_hungarian(m: &[f32], rows: usize, cols: usize) -> Vec<usize> {
    check_shape(m.len(), rows, cols, "permute_to_identity_hungarian");
    let k = rows.min(cols);
    let cost: Vec<f64> = m[..k * cols].iter().map(|&x| -f64::from(x)).collect();
    let pairs = linear_sum_assignment(&cost, k, cols);
    let mut perm: Vec<usize> = pairs.iter().map(|&(_, c)| c).collect();
    append_unassigned(&mut perm, cols);
    perm
}

/// Greedy column order: for rows `0..min(rows, cols)` in turn, pick the
/// largest not-yet-used column (ties: lowest index; NaN counts as smallest),
/// then append the unused columns in ascending order.
///
/// (The reference uses a non-stable `torch.argsort`, so its tie-breaking is
/// unspecified.)
pub fn permute_to_identity_greedy(m: &[f32], rows: usize, cols: usize) -> Vec<usize> {
    check_shape(m.len(), rows, cols, "permute_to_identity_greedy");
    let k = rows.min(cols);
    let mut used = vec![false; cols];
    let mut perm = Vec::with_capacity(cols);
    for r in 0..k {
        let row = &m[r * cols..(r + 1) * cols];
        let mut best: Option<(usize, f32)> = None;
        for (c, &x) in row.iter().enumerate() {
            if used[c] {
                continue;
            }
            match best {
                None => best = Some((c, x)),
                Some((_, bx)) => {
                    if x > bx || (bx.is_nan() && !x.is_nan()) {
                        best = Some((c, x));
                    }
                }
            }
        }
        // r < k <= cols and only r columns are used, so `best` is Some.
        if let Some((c, _)) = best {
            used[c] = true;
            perm.push(c);
        }
    }
    append_unassigned(&mut perm, cols);
    perm
}

fn append_unassigned(perm: &mut Vec<usize>, cols: usize) {
    let mut assigned = vec![false; cols];
    for &c in perm.iter() {
        assigned[c] = true;
    }
    perm.extend((0..cols).filter(|&c| !assigned[c]));
}

/// Column order by column sum, descending (the reference's `permute_to_dense`).
/// Stable: equal sums keep ascending column index. Columns whose sum is NaN go
/// last. Sums are accumulated in `f64` (torch sums in `f32`, so near-ties may
/// order differently).
pub fn permute_to_dense(m: &[f32], rows: usize, cols: usize) -> Vec<usize> {
    check_shape(m.len(), rows, cols, "permute_to_dense");
    let sums: Vec<f64> = column_sums(m, rows, cols)
        .into_iter()
        .map(|s| if s.is_nan() { f64::NEG_INFINITY } else { s })
        .collect();
    let mut perm: Vec<usize> = (0..cols).collect();
    perm.sort_by(|&a, &b| sums[b].total_cmp(&sums[a]));
    perm
}

fn column_sums(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut sums = vec![0.0f64; cols];
    for r in 0..rows {
        for (s, &x) in sums.iter_mut().zip(&m[r * cols..(r + 1) * cols]) {
            *s += f64::from(x);
        }
    }
    sums
}

// ---------------------------------------------------------------------------
// Target-solution error
// ---------------------------------------------------------------------------

/// Identity target-solution error (the reference's `IdentityCIPattern.distance_from`
/// with `apply_permutation=True`, `method="auto"`).
///
/// `m` is the single-feature CI matrix `[n_features, C]` (`rows × cols`).
/// Columns are reordered with [`permute_to_identity`]; then, with
/// `size = min(rows, cols)`, the error is
/// `#{(r, j) not on the diagonal (r == j < size) with value > tol}`
/// `+ #{diagonal entries with value < 1 - tol}` (both strict).
///
/// Unlike the reference (which raises), any shape is accepted: with
/// `cols < rows`, rows `cols..` contain only off-diagonal entries. Empty
/// input gives 0.
pub fn identity_ci_error(m: &[f32], rows: usize, cols: usize, tol: f64) -> usize {
    check_shape(m.len(), rows, cols, "identity_ci_error");
    let perm = permute_to_identity(m, rows, cols);
    let off_thr = tol as f32;
    let on_thr = (1.0 - tol) as f32;
    let size = rows.min(cols);
    let mut errors = 0;
    for r in 0..rows {
        let row = &m[r * cols..(r + 1) * cols];
        for (j, &c) in perm.iter().enumerate() {
            let x = row[c];
            let bad = if r == j && r < size {
                x < on_thr
            } else {
                x > off_thr
            };
            errors += usize::from(bad);
        }
    }
    errors
}

/// Dense-columns target-solution error (the reference's
/// `DenseCIPattern(k, min_entries=1).distance_from`).
///
/// Columns are sorted with [`permute_to_dense`]. The error is
/// `Σ_{first k columns} [column has no entry >= 1 - tol]`
/// `+ #{entries > tol in the remaining columns}`.
///
/// Unlike the reference (which raises when `k > cols`), each of the `k - cols`
/// non-existent "should be dense" columns counts as one error (it certainly has
/// no strong entry). So with `rows == 0` the error is `k`.
pub fn dense_ci_error(m: &[f32], rows: usize, cols: usize, k: usize, tol: f64) -> usize {
    check_shape(m.len(), rows, cols, "dense_ci_error");
    let perm = permute_to_dense(m, rows, cols);
    let strong_thr = (1.0 - tol) as f32;
    let weak_thr = tol as f32;
    let k_eff = k.min(cols);
    let mut errors = k - k_eff;
    for &c in &perm[..k_eff] {
        let has_strong = (0..rows).any(|r| m[r * cols + c] >= strong_thr);
        errors += usize::from(!has_strong);
    }
    for &c in &perm[k_eff..] {
        errors += (0..rows).filter(|&r| m[r * cols + c] > weak_thr).count();
    }
    errors
}

// ---------------------------------------------------------------------------
// MMCS / ML2R
// ---------------------------------------------------------------------------

/// Result of [`mmcs`] / [`mmcs_rows`]. Per-feature vectors have one entry per
/// target feature (empty when there are no features or no subcomponents).
#[derive(Debug, Clone, PartialEq)]
pub struct MmcsResult {
    /// Mean over features of the max (over subcomponents) cosine similarity.
    pub mmcs: f64,
    /// Mean over features of `‖s_best‖ / max(‖target‖, eps)`.
    pub ml2r: f64,
    /// Population standard deviation (divide by n) of the per-feature L2 ratio.
    pub ml2r_std: f64,
    /// Argmax subcomponent per feature (ties: lowest index).
    pub best_component: Vec<usize>,
    /// Max cosine similarity per feature.
    pub best_cos: Vec<f64>,
    /// `‖s_best‖ / max(‖target‖, eps)` per feature.
    pub l2_ratio: Vec<f64>,
    /// `‖target‖` per feature, so callers can filter dead features.
    pub target_norm: Vec<f64>,
}

/// MMCS and ML2R of a decomposed linear map against its target weight, per
/// **input** feature (SPD paper; reference usage: TMS `linear1`, where
/// `d_in = n_features`).
///
/// Shapes (row-major): `v` is `[d_in, c]`, `u` is `[c, d_out]`, `w` is
/// `[d_out, d_in]` (nn.Linear layout). Subcomponent `k` is the rank-one matrix
/// `W_k[o, i] = U[k, o] · V[i, k]`.
///
/// For each input feature `f`: target `t = W[:, f]` (length `d_out`), candidate
/// `s_k = V[f, k] · U[k, :]` (column `f` of `W_k`),
/// `cos(k, f) = <s_k, t> / (max(‖s_k‖, eps) · max(‖t‖, eps))`, eps = 1e-12
/// ([`COSINE_EPS`]; torch's `F.cosine_similarity` clamps each norm similarly,
/// with its own eps). `k* = argmax_k cos` (first on ties);
/// `ratio(f) = ‖s_{k*}‖ / max(‖t‖, eps)`.
///
/// Edge cases:
/// * A zero target column gives `cos = 0` for every subcomponent, so `k* = 0`,
///   `best_cos = 0`, and `ratio = ‖s_0‖ / 1e-12` (huge unless `s_0` is zero
///   too, then 0). Such features are kept; use `target_norm` to filter them.
/// * A zero candidate gives `cos = 0` (it can still be the argmax if all others
///   are negative).
/// * `d_in == 0` or `c == 0`: all three scalars are NaN and the vectors empty.
/// * `d_out == 0`: every cos and ratio is 0.
/// * NaN inputs propagate (NaN cosines never win the argmax unless all are NaN).
pub fn mmcs(v: &[f32], u: &[f32], w: &[f32], d_in: usize, c: usize, d_out: usize) -> MmcsResult {
    check_shape(v.len(), d_in, c, "mmcs: v");
    check_shape(u.len(), c, d_out, "mmcs: u");
    check_shape(w.len(), d_out, d_in, "mmcs: w");
    match_features(
        d_in,
        d_out,
        c,
        |f, o| f64::from(w[o * d_in + f]),
        |k, f, o| f64::from(v[f * c + k]) * f64::from(u[k * d_out + o]),
    )
}

/// Like [`mmcs`] but per **output** feature (rows of `W`; reference usage:
/// TMS `linear2`, whose output dimension is the features). Same shapes as
/// [`mmcs`]: `v` `[d_in, c]`, `u` `[c, d_out]`, `w` `[d_out, d_in]`.
///
/// For each output index `o`: target `t = W[o, :]` (length `d_in`), candidate
/// `s'_k = U[k, o] · V[:, k]` (row `o` of `W_k`). Everything else (eps, ties,
/// edge cases with `d_out` in the role of the feature count and `d_in` as the
/// vector length) is as in [`mmcs`]. Equivalent to
/// `mmcs(Uᵀ, Vᵀ, Wᵀ, d_out, c, d_in)`.
pub fn mmcs_rows(
    v: &[f32],
    u: &[f32],
    w: &[f32],
    d_in: usize,
    c: usize,
    d_out: usize,
) -> MmcsResult {
    check_shape(v.len(), d_in, c, "mmcs_rows: v");
    check_shape(u.len(), c, d_out, "mmcs_rows: u");
    check_shape(w.len(), d_out, d_in, "mmcs_rows: w");
    match_features(
        d_out,
        d_in,
        c,
        |o, i| f64::from(w[o * d_in + i]),
        |k, o, i| f64::from(u[k * d_out + o]) * f64::from(v[i * c + k]),
    )
}

/// Shared MMCS/ML2R core: `n_feat` features, vectors of length `len`,
/// `n_comp` candidates. `target(f, i)` and `cand(k, f, i)` give vector entries.
fn match_features(
    n_feat: usize,
    len: usize,
    n_comp: usize,
    target: impl Fn(usize, usize) -> f64,
    cand: impl Fn(usize, usize, usize) -> f64,
) -> MmcsResult {
    if n_feat == 0 || n_comp == 0 {
        return MmcsResult {
            mmcs: f64::NAN,
            ml2r: f64::NAN,
            ml2r_std: f64::NAN,
            best_component: Vec::new(),
            best_cos: Vec::new(),
            l2_ratio: Vec::new(),
            target_norm: Vec::new(),
        };
    }
    let mut best_component = Vec::with_capacity(n_feat);
    let mut best_cos = Vec::with_capacity(n_feat);
    let mut l2_ratio = Vec::with_capacity(n_feat);
    let mut target_norm = Vec::with_capacity(n_feat);
    let mut t = vec![0.0f64; len];
    let mut s = vec![0.0f64; len];
    for f in 0..n_feat {
        for (i, ti) in t.iter_mut().enumerate() {
            *ti = target(f, i);
        }
        let t_norm = t.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut best: Option<(usize, f64, f64)> = None; // (k, cos, ‖s‖)
        for k in 0..n_comp {
            for (i, si) in s.iter_mut().enumerate() {
                *si = cand(k, f, i);
            }
            let s_norm = s.iter().map(|x| x * x).sum::<f64>().sqrt();
            let dot: f64 = s.iter().zip(&t).map(|(a, b)| a * b).sum();
            let cos = dot / (s_norm.max(COSINE_EPS) * t_norm.max(COSINE_EPS));
            let better = match best {
                None => true,
                Some((_, bc, _)) => cos > bc || (bc.is_nan() && !cos.is_nan()),
            };
            if better {
                best = Some((k, cos, s_norm));
            }
        }
        // n_comp > 0, so `best` is Some.
        let (k, cos, s_norm) = best.unwrap_or((0, f64::NAN, f64::NAN));
        best_component.push(k);
        best_cos.push(cos);
        l2_ratio.push(s_norm / t_norm.max(COSINE_EPS));
        target_norm.push(t_norm);
    }
    let n = n_feat as f64;
    let mmcs = best_cos.iter().sum::<f64>() / n;
    let ml2r = l2_ratio.iter().sum::<f64>() / n;
    let ml2r_std = (l2_ratio.iter().map(|r| (r - ml2r).powi(2)).sum::<f64>() / n).sqrt();
    MmcsResult {
        mmcs,
        ml2r,
        ml2r_std,
        best_component,
        best_cos,
        l2_ratio,
        target_norm,
    }
}

// ---------------------------------------------------------------------------
// CI statistics
// ---------------------------------------------------------------------------

/// Mean over rows of `#{c : ci[r, c] > threshold}` (strict). `ci` is
/// `rows × c`. Returns NaN when `rows == 0` (mean of nothing), 0.0 when `c == 0`
/// and `rows > 0`.
pub fn l0(ci: &[f32], rows: usize, c: usize, threshold: f64) -> f64 {
    check_shape(ci.len(), rows, c, "l0");
    if rows == 0 {
        return f64::NAN;
    }
    let thr = threshold as f32;
    let active = ci.iter().filter(|&&x| x > thr).count();
    active as f64 / rows as f64
}

/// Mean CI per component (column means of the `rows × c` matrix), length `c`.
/// All NaN when `rows == 0`.
pub fn mean_ci_per_component(ci: &[f32], rows: usize, c: usize) -> Vec<f64> {
    check_shape(ci.len(), rows, c, "mean_ci_per_component");
    let n = rows as f64;
    column_sums(ci, rows, c)
        .into_iter()
        .map(|s| s / n)
        .collect()
}

/// Fraction of rows with `ci[r, k] > threshold` (strict), per component `k`;
/// length `c`. All NaN when `rows == 0`.
pub fn activation_density(ci: &[f32], rows: usize, c: usize, threshold: f64) -> Vec<f64> {
    check_shape(ci.len(), rows, c, "activation_density");
    let thr = threshold as f32;
    let mut counts = vec![0u64; c];
    for r in 0..rows {
        for (cnt, &x) in counts.iter_mut().zip(&ci[r * c..(r + 1) * c]) {
            *cnt += u64::from(x > thr);
        }
    }
    let n = rows as f64;
    counts.into_iter().map(|k| k as f64 / n).collect()
}

/// Histogram with `n_bins` equal-width bins over `[lo, hi]`.
///
/// Bin `b` covers `[lo + b·w, lo + (b+1)·w)` with `w = (hi - lo) / n_bins`; the
/// last bin also includes `hi` (numpy convention). Values below `lo` (incl.
/// `-inf`) go into bin 0, values above `hi` (incl. `+inf`) into the last bin;
/// NaN values are ignored. `n_bins == 0` returns an empty vector. Degenerate
/// ranges (`hi <= lo`, a NaN bound, or an infinite width): values `<= lo` go to
/// bin 0, all others to the last bin.
pub fn histogram(values: &[f32], n_bins: usize, lo: f64, hi: f64) -> Vec<u64> {
    let mut counts = vec![0u64; n_bins];
    if n_bins == 0 {
        return counts;
    }
    let last = n_bins - 1;
    let proper_range = hi > lo && (hi - lo).is_finite();
    for &x in values {
        if x.is_nan() {
            continue;
        }
        let x = f64::from(x);
        let bin = if !proper_range {
            if x <= lo { 0 } else { last }
        } else if x <= lo {
            0
        } else if x >= hi {
            last
        } else {
            // 0 < pos < n_bins up to rounding; `as usize` saturates.
            let pos = (x - lo) / (hi - lo) * n_bins as f64;
            (pos.floor() as usize).min(last)
        };
        counts[bin] += 1;
    }
    counts
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny deterministic PRNG (splitmix64) for randomized tests.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        /// Uniform in [0, 1).
        fn unif(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
    }

    fn approx(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    // ---- linear_sum_assignment ----

    /// Minimum over all injective maps of the smaller side into the larger side.
    fn brute_force_min(cost: &[f64], rows: usize, cols: usize) -> f64 {
        fn rec(
            cost: &[f64],
            rows: usize,
            cols: usize,
            r: usize,
            used: &mut Vec<bool>,
            acc: f64,
            best: &mut f64,
        ) {
            if r == rows {
                *best = best.min(acc);
                return;
            }
            for c in 0..cols {
                if !used[c] {
                    used[c] = true;
                    rec(
                        cost,
                        rows,
                        cols,
                        r + 1,
                        used,
                        acc + cost[r * cols + c],
                        best,
                    );
                    used[c] = false;
                }
            }
        }
        if rows == 0 || cols == 0 {
            return 0.0;
        }
        let (mat, n, m) = if rows <= cols {
            (cost.to_vec(), rows, cols)
        } else {
            let mut t = vec![0.0; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = cost[r * cols + c];
                }
            }
            (t, cols, rows)
        };
        let mut best = f64::INFINITY;
        rec(&mat, n, m, 0, &mut vec![false; m], 0.0, &mut best);
        best
    }

    fn assert_valid_assignment(pairs: &[(usize, usize)], rows: usize, cols: usize) {
        assert_eq!(pairs.len(), rows.min(cols));
        let mut seen_r = vec![false; rows];
        let mut seen_c = vec![false; cols];
        for w in pairs.windows(2) {
            assert!(w[0].0 < w[1].0, "pairs not sorted by row: {pairs:?}");
        }
        for &(r, c) in pairs {
            assert!(r < rows && c < cols);
            assert!(!seen_r[r] && !seen_c[c], "duplicate in {pairs:?}");
            seen_r[r] = true;
            seen_c[c] = true;
        }
    }

    fn total(cost: &[f64], cols: usize, pairs: &[(usize, usize)]) -> f64 {
        pairs.iter().map(|&(r, c)| cost[r * cols + c]).sum()
    }

    #[test]
    fn lsa_hand_3x3() {
        // Classic example (scipy docs): [[4,1,3],[2,0,5],[3,2,2]]
        // optimum: (0,1)=1, (1,0)=2, (2,2)=2 -> 5.
        let cost = [4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 3.0, 2.0, 2.0];
        let pairs = linear_sum_assignment(&cost, 3, 3);
        assert_eq!(pairs, vec![(0, 1), (1, 0), (2, 2)]);
        assert_eq!(total(&cost, 3, &pairs), 5.0);
    }

    #[test]
    fn lsa_hand_rectangular() {
        // 2x3: [[1,2,3],[3,1,2]] -> (0,0)=1, (1,1)=1 -> 2.
        let cost = [1.0, 2.0, 3.0, 3.0, 1.0, 2.0];
        assert_eq!(linear_sum_assignment(&cost, 2, 3), vec![(0, 0), (1, 1)]);
        // 3x2 (tall): rows [5,9],[1,7],[4,0] -> (1,0)=1, (2,1)=0 -> 1; row 0 unassigned.
        let cost = [5.0, 9.0, 1.0, 7.0, 4.0, 0.0];
        assert_eq!(linear_sum_assignment(&cost, 3, 2), vec![(1, 0), (2, 1)]);
        // 1x3 and 3x1: pick the minimum entry.
        assert_eq!(linear_sum_assignment(&[3.0, -1.0, 2.0], 1, 3), vec![(0, 1)]);
        assert_eq!(linear_sum_assignment(&[3.0, -1.0, 2.0], 3, 1), vec![(1, 0)]);
    }

    #[test]
    fn lsa_trivial_and_empty() {
        assert_eq!(linear_sum_assignment(&[7.5], 1, 1), vec![(0, 0)]);
        assert!(linear_sum_assignment(&[], 0, 0).is_empty());
        assert!(linear_sum_assignment(&[], 0, 4).is_empty());
        assert!(linear_sum_assignment(&[], 4, 0).is_empty());
    }

    #[test]
    fn lsa_all_ties() {
        let cost = vec![1.0; 4 * 6];
        let pairs = linear_sum_assignment(&cost, 4, 6);
        assert_valid_assignment(&pairs, 4, 6);
        assert_eq!(total(&cost, 6, &pairs), 4.0);
        // With all costs equal the diagonal is returned (as scipy does).
        assert_eq!(pairs, vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert_eq!(
            linear_sum_assignment(&[0.0; 12], 4, 3),
            vec![(0, 0), (1, 1), (2, 2)]
        );
    }

    #[test]
    fn lsa_matches_brute_force_random() {
        let mut rng = Rng(42);
        let shapes = [
            (5, 5),
            (4, 6),
            (6, 3),
            (6, 4),
            (3, 6),
            (1, 5),
            (5, 1),
            (2, 2),
            (7, 7),
            (6, 7),
        ];
        for &(rows, cols) in &shapes {
            for trial in 0..60 {
                let cost: Vec<f64> = (0..rows * cols)
                    .map(|_| {
                        if trial % 3 == 0 {
                            // small integers -> many ties
                            rng.below(4) as f64
                        } else {
                            rng.unif() * 20.0 - 10.0
                        }
                    })
                    .collect();
                let pairs = linear_sum_assignment(&cost, rows, cols);
                assert_valid_assignment(&pairs, rows, cols);
                let got = total(&cost, cols, &pairs);
                let want = brute_force_min(&cost, rows, cols);
                assert!(
                    approx(got, want, 1e-12),
                    "{rows}x{cols} trial {trial}: got {got}, want {want}, cost {cost:?}"
                );
            }
        }
    }

    #[test]
    fn lsa_large_values_and_negatives() {
        // Maximisation via negation, with a large spread.
        let mut rng = Rng(7);
        for _ in 0..20 {
            let cost: Vec<f64> = (0..5 * 5).map(|_| (rng.unif() - 0.5) * 1e6).collect();
            let pairs = linear_sum_assignment(&cost, 5, 5);
            assert!(approx(
                total(&cost, 5, &pairs),
                brute_force_min(&cost, 5, 5),
                1e-12
            ));
        }
    }

    #[test]
    fn lsa_non_finite_entries() {
        // NaN / +inf are avoided when possible: only (0,1),(1,0) is all-finite.
        let cost = [f64::NAN, 5.0, 1.0, f64::INFINITY];
        assert_eq!(linear_sum_assignment(&cost, 2, 2), vec![(0, 1), (1, 0)]);
        // -inf is preferred.
        let cost = [0.0, f64::NEG_INFINITY, 0.0, 0.0];
        assert_eq!(linear_sum_assignment(&cost, 2, 2), vec![(0, 1), (1, 0)]);
        // All non-finite: still a valid assignment, no panic.
        let cost = [f64::NAN; 6];
        assert_valid_assignment(&linear_sum_assignment(&cost, 2, 3), 2, 3);
        // Forced use of a NaN entry (3x1 column of NaNs except one): valid.
        let cost = [f64::NAN, f64::NAN, 2.0];
        assert_eq!(linear_sum_assignment(&cost, 3, 1), vec![(2, 0)]);
    }

    #[test]
    fn lsa_medium_consistency_with_transpose() {
        // Optimal costs of M and Mᵀ must agree (30x45 vs 45x30).
        let mut rng = Rng(3);
        let (r, c) = (30, 45);
        let cost: Vec<f64> = (0..r * c).map(|_| rng.unif()).collect();
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = cost[i * c + j];
            }
        }
        let a = linear_sum_assignment(&cost, r, c);
        let b = linear_sum_assignment(&t, c, r);
        assert_valid_assignment(&a, r, c);
        assert_valid_assignment(&b, c, r);
        assert!(approx(total(&cost, c, &a), total(&t, r, &b), 1e-12));
    }

    // ---- permutations ----

    #[test]
    fn permute_columns_hand() {
        // [[1,2,3],[4,5,6]] with perm [2,0,1] -> [[3,1,2],[6,4,5]]
        let m = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(
            permute_columns(&m, 2, 3, &[2, 0, 1]),
            vec![3.0, 1.0, 2.0, 6.0, 4.0, 5.0]
        );
        assert!(permute_columns(&[], 0, 0, &[]).is_empty());
    }

    #[test]
    fn identity_perm_hungarian_vs_greedy_hand() {
        // 2x3:
        //   [[0.9, 0.8, 0.0],
        //    [0.85, 0.1, 0.0]]
        // Greedy: row0 -> col0 (0.9), row1 -> best unused = col1 (0.1): sum 1.0.
        // Hungarian: row0 -> col1 (0.8), row1 -> col0 (0.85): sum 1.65.
        let m = [0.9, 0.8, 0.0, 0.85, 0.1, 0.0];
        assert_eq!(permute_to_identity_greedy(&m, 2, 3), vec![0, 1, 2]);
        assert_eq!(permute_to_identity_hungarian(&m, 2, 3), vec![1, 0, 2]);
        assert_eq!(permute_to_identity(&m, 2, 3), vec![1, 0, 2]);
    }

    #[test]
    fn identity_perm_c_gt_n_unassigned_ascending() {
        // 2x5: row0 max at col3, row1 max at col1 -> [3, 1, then 0, 2, 4].
        let m = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        assert_eq!(permute_to_identity(&m, 2, 5), vec![3, 1, 0, 2, 4]);
        assert_eq!(permute_to_identity_greedy(&m, 2, 5), vec![3, 1, 0, 2, 4]);
    }

    #[test]
    fn identity_perm_c_lt_n() {
        // 3x2: only the first min(3,2)=2 rows count.
        //   [[0.1, 0.9],
        //    [0.8, 0.2],
        //    [0.0, 5.0]]   <- row 2 ignored by both methods
        let m = [0.1, 0.9, 0.8, 0.2, 0.0, 5.0];
        assert_eq!(permute_to_identity(&m, 3, 2), vec![1, 0]);
        assert_eq!(permute_to_identity_greedy(&m, 3, 2), vec![1, 0]);
    }

    #[test]
    fn identity_perm_edge_cases() {
        assert!(permute_to_identity(&[], 0, 0).is_empty());
        // No rows: all columns "unassigned", ascending.
        assert_eq!(permute_to_identity(&[], 0, 3), vec![0, 1, 2]);
        assert_eq!(permute_to_identity_greedy(&[], 0, 3), vec![0, 1, 2]);
        assert!(permute_to_identity(&[], 3, 0).is_empty());
        assert_eq!(permute_to_identity(&[0.3], 1, 1), vec![0]);
        // All-zero matrix: any permutation is optimal; must be a permutation.
        let mut p = permute_to_identity(&[0.0; 12], 3, 4);
        p.sort_unstable();
        assert_eq!(p, vec![0, 1, 2, 3]);
        // Greedy ties -> lowest index.
        assert_eq!(
            permute_to_identity_greedy(&[0.0; 12], 3, 4),
            vec![0, 1, 2, 3]
        );
    }

    #[test]
    fn identity_perm_nan_never_preferred() {
        // 1x3 [NaN, 0.2, 0.1]: both methods pick col1.
        let m = [f32::NAN, 0.2, 0.1];
        assert_eq!(permute_to_identity_hungarian(&m, 1, 3), vec![1, 0, 2]);
        assert_eq!(permute_to_identity_greedy(&m, 1, 3), vec![1, 0, 2]);
        // All-NaN row: greedy picks lowest index.
        assert_eq!(permute_to_identity_greedy(&[f32::NAN; 2], 1, 2), vec![0, 1]);
    }

    #[test]
    fn identity_perm_recovers_random_permutation() {
        // A noisy permuted identity (n=8, C=11): Hungarian must undo the shuffle.
        let mut rng = Rng(11);
        let (n, c) = (8, 11);
        let mut cols: Vec<usize> = (0..c).collect();
        for i in (1..c).rev() {
            cols.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut m = vec![0f32; n * c];
        for x in m.iter_mut() {
            *x = (rng.unif() * 0.05) as f32;
        }
        for i in 0..n {
            m[i * c + cols[i]] = 1.0;
        }
        let perm = permute_to_identity(&m, n, c);
        assert_eq!(&perm[..n], &cols[..n]);
        assert_eq!(identity_ci_error(&m, n, c, 0.1), 0);
    }

    #[test]
    fn identity_perm_auto_switches_to_greedy_at_500() {
        // Top-left block is the 2x2 greedy trap from `identity_perm_hungarian_vs_greedy_hand`;
        // the rest is the identity.
        fn trap(n: usize) -> Vec<f32> {
            let mut m = vec![0f32; n * n];
            for i in 2..n {
                m[i * n + i] = 1.0;
            }
            m[0] = 0.9;
            m[1] = 0.8;
            m[n] = 0.85;
            m[n + 1] = 0.1;
            m
        }
        let p499 = permute_to_identity(&trap(499), 499, 499);
        assert_eq!(&p499[..3], &[1, 0, 2]); // Hungarian
        let p500 = permute_to_identity(&trap(500), 500, 500);
        assert_eq!(&p500[..3], &[0, 1, 2]); // greedy
        assert_eq!(p500, (0..500).collect::<Vec<_>>());
    }

    #[test]
    fn dense_perm_hand() {
        // 2x4: column sums [1.0, 3.0, 0.5, 3.0] -> desc, stable: [1, 3, 0, 2].
        let m = [0.5, 1.0, 0.25, 2.0, 0.5, 2.0, 0.25, 1.0];
        assert_eq!(permute_to_dense(&m, 2, 4), vec![1, 3, 0, 2]);
        // All ties -> identity order.
        assert_eq!(permute_to_dense(&[0.0; 6], 2, 3), vec![0, 1, 2]);
        // NaN column goes last.
        assert_eq!(permute_to_dense(&[f32::NAN, 0.0, 1.0], 1, 3), vec![2, 1, 0]);
        // Empty.
        assert!(permute_to_dense(&[], 0, 0).is_empty());
        assert_eq!(permute_to_dense(&[], 0, 2), vec![0, 1]);
    }

    // ---- target-solution errors ----

    #[test]
    fn identity_error_hand() {
        // 3x4, tol 0.1:
        //   [[0.0, 0.95, 0.0, 0.2 ],
        //    [1.0, 0.0,  0.0, 0.0 ],
        //    [0.0, 0.0,  0.5, 0.05]]
        // Hungarian perm [1, 0, 2, 3] ->
        //   [[0.95, 0, 0,   0.2 ],
        //    [0,    1, 0,   0   ],
        //    [0,    0, 0.5, 0.05]]
        // diagonal: 0.5 < 0.9 -> 1 error; off-diagonal > 0.1: 0.2 -> 1 error. Total 2.
        let m = [
            0.0, 0.95, 0.0, 0.2, //
            1.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.5, 0.05,
        ];
        assert_eq!(permute_to_identity(&m, 3, 4), vec![1, 0, 2, 3]);
        assert_eq!(identity_ci_error(&m, 3, 4, 0.1), 2);
        // tol 0.55: diagonal threshold 0.45 -> 0.5 ok; off-diag > 0.55: none -> 0.
        assert_eq!(identity_ci_error(&m, 3, 4, 0.55), 0);
    }

    #[test]
    fn identity_error_strict_comparisons() {
        // tol = 0.25 (exact in binary): threshold values themselves are not errors.
        // 2x2 [[0.75, 0.25],[0.25, 0.75]] -> 0 errors.
        let m = [0.75, 0.25, 0.25, 0.75];
        assert_eq!(identity_ci_error(&m, 2, 2, 0.25), 0);
        // Nudge across both thresholds: diag 0.74 < 0.75, off 0.26 > 0.25 -> 2.
        let m = [0.74, 0.26, 0.25, 0.75];
        assert_eq!(identity_ci_error(&m, 2, 2, 0.25), 2);
    }

    #[test]
    fn identity_error_c_lt_n_and_zero_columns() {
        // 3x2 (more features than components), tol 0.1:
        //   [[1, 0],[0, 1],[1, 0]] -> perm [0, 1]; diagonal fine; row 2 is all
        //   off-diagonal: the 1.0 counts -> 1.
        let m = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0];
        assert_eq!(identity_ci_error(&m, 3, 2, 0.1), 1);
        // 2x3 with an all-zero matrix: 2 diagonal misses, no off-diagonal -> 2.
        assert_eq!(identity_ci_error(&[0.0; 6], 2, 3, 0.1), 2);
        // Perfect identity plus a dead extra column -> 0.
        let m = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        assert_eq!(identity_ci_error(&m, 2, 3, 0.1), 0);
        // Everything active: 2x3 all ones -> diagonal ok, 4 off-diagonal -> 4.
        assert_eq!(identity_ci_error(&[1.0; 6], 2, 3, 0.1), 4);
    }

    #[test]
    fn identity_error_edge_cases() {
        assert_eq!(identity_ci_error(&[], 0, 0, 0.1), 0);
        assert_eq!(identity_ci_error(&[], 0, 5, 0.1), 0);
        assert_eq!(identity_ci_error(&[], 5, 0, 0.1), 0);
        assert_eq!(identity_ci_error(&[1.0], 1, 1, 0.1), 0);
        assert_eq!(identity_ci_error(&[0.5], 1, 1, 0.1), 1);
        // NaN fails both comparisons -> never counted.
        assert_eq!(identity_ci_error(&[f32::NAN], 1, 1, 0.1), 0);
    }

    #[test]
    fn dense_error_hand() {
        // 3x4, k = 2, tol = 0.25:
        //   col0 = [1.0, 0.0, 0.3]  sum 1.3
        //   col1 = [0.0, 0.0, 0.0]  sum 0
        //   col2 = [0.5, 0.5, 0.5]  sum 1.5
        //   col3 = [0.0, 0.25, 0.0] sum 0.25
        // order: [2, 0, 3, 1]. First 2: col2 has no entry >= 0.75 -> 1; col0 ok.
        // Rest: col3's 0.25 is not > 0.25, col1 zero -> 0. Total 1.
        let m = [
            1.0, 0.0, 0.5, 0.0, //
            0.0, 0.0, 0.5, 0.25, //
            0.3, 0.0, 0.5, 0.0,
        ];
        assert_eq!(permute_to_dense(&m, 3, 4), vec![2, 0, 3, 1]);
        assert_eq!(dense_ci_error(&m, 3, 4, 2, 0.25), 1);
        // Bump col3's entry to 0.3 (sum 0.3, still third) -> +1.
        let mut m2 = m;
        m2[7] = 0.3;
        assert_eq!(dense_ci_error(&m2, 3, 4, 2, 0.25), 2);
        // k = 1: only col2 must be strong (fails: 1); rest: col0 has 1.0 and 0.3
        // (> 0.25) -> 2; col3 0.25 no -> total 3.
        assert_eq!(dense_ci_error(&m, 3, 4, 1, 0.25), 3);
        // k = 0: all entries > 0.25 count: 1.0, 0.3, 0.5 x3 -> 5.
        assert_eq!(dense_ci_error(&m, 3, 4, 0, 0.25), 5);
        // k = 4: first four columns need a strong entry; only col0 has one -> 3.
        assert_eq!(dense_ci_error(&m, 3, 4, 4, 0.25), 3);
    }

    #[test]
    fn dense_error_strict_and_edges() {
        // ">= 1 - tol" is inclusive: a 0.75 entry satisfies tol 0.25.
        assert_eq!(dense_ci_error(&[0.75, 0.0], 1, 2, 1, 0.25), 0);
        assert_eq!(dense_ci_error(&[0.74, 0.0], 1, 2, 1, 0.25), 1);
        // k > C: missing columns count as errors.
        assert_eq!(dense_ci_error(&[1.0, 1.0], 1, 2, 5, 0.1), 3);
        // Empty.
        assert_eq!(dense_ci_error(&[], 0, 0, 0, 0.1), 0);
        assert_eq!(dense_ci_error(&[], 0, 0, 2, 0.1), 2);
        assert_eq!(dense_ci_error(&[], 0, 3, 2, 0.1), 2);
        assert_eq!(dense_ci_error(&[1.0], 1, 1, 1, 0.1), 0);
    }

    // ---- MMCS / ML2R ----

    // Shared hand example: d_in = 2, C = 2, d_out = 2.
    //   W [d_out, d_in] = [[1, 0],
    //                      [0, 2]]
    //   V [d_in, C]     = [[1, 0],
    //                      [0, 1]]
    //   U [C, d_out]    = [[2, 0],
    //                      [1, 1]]
    const W: [f32; 4] = [1.0, 0.0, 0.0, 2.0];
    const V: [f32; 4] = [1.0, 0.0, 0.0, 1.0];
    const U: [f32; 4] = [2.0, 0.0, 1.0, 1.0];

    #[test]
    fn mmcs_hand() {
        // Feature 0: t = W[:,0] = (1,0). s_0 = V[0,0]·U[0,:] = (2,0): cos 1;
        //            s_1 = V[0,1]·U[1,:] = 0: cos 0.  -> best 0, ratio 2/1 = 2.
        // Feature 1: t = (0,2). s_0 = 0: cos 0; s_1 = 1·(1,1): cos 2/(√2·2) = 1/√2.
        //            -> best 1, ratio √2/2.
        // MMCS = (1 + 1/√2)/2; ML2R = (2 + 1/√2)/2; std = |2 - 1/√2|/2.
        let r = mmcs(&V, &U, &W, 2, 2, 2);
        let h = std::f64::consts::FRAC_1_SQRT_2;
        assert_eq!(r.best_component, vec![0, 1]);
        assert!(approx(r.best_cos[0], 1.0, 1e-12));
        assert!(approx(r.best_cos[1], h, 1e-12));
        assert!(approx(r.l2_ratio[0], 2.0, 1e-12));
        assert!(approx(r.l2_ratio[1], h, 1e-12));
        assert!(approx(r.mmcs, (1.0 + h) / 2.0, 1e-12));
        assert!(approx(r.ml2r, (2.0 + h) / 2.0, 1e-12));
        assert!(approx(r.ml2r_std, (2.0 - h) / 2.0, 1e-12));
        assert_eq!(r.target_norm, vec![1.0, 2.0]);
    }

    #[test]
    fn mmcs_rows_hand() {
        // Output 0: t = W[0,:] = (1,0). s'_0 = U[0,0]·V[:,0] = 2·(1,0): cos 1, ratio 2;
        //           s'_1 = U[1,0]·V[:,1] = (0,1): cos 0.        -> best 0.
        // Output 1: t = W[1,:] = (0,2). s'_0 = U[0,1]·V[:,0] = 0: cos 0;
        //           s'_1 = U[1,1]·V[:,1] = (0,1): cos 1, ratio 1/2. -> best 1.
        // MMCS 1, ML2R 1.25, std 0.75.
        let r = mmcs_rows(&V, &U, &W, 2, 2, 2);
        assert_eq!(r.best_component, vec![0, 1]);
        assert!(approx(r.mmcs, 1.0, 1e-12));
        assert!(approx(r.ml2r, 1.25, 1e-12));
        assert!(approx(r.ml2r_std, 0.75, 1e-12));
        assert!(approx(r.l2_ratio[0], 2.0, 1e-12));
        assert!(approx(r.l2_ratio[1], 0.5, 1e-12));
    }

    #[test]
    fn mmcs_rectangular_hand() {
        // d_in = 1 feature, C = 3, d_out = 2.
        //   W [2,1] = [[3],[4]]  -> t = (3,4), ‖t‖ = 5.
        //   V [1,3] = [[1, -1, 2]]
        //   U [3,2] = [[3,4],[3,4],[4,-3]]
        // s_0 = (3,4): cos 1; s_1 = (-3,-4): cos -1; s_2 = 2·(4,-3): cos 0.
        // best 0, ratio 5/5 = 1.
        let w = [3.0, 4.0];
        let v = [1.0, -1.0, 2.0];
        let u = [3.0, 4.0, 3.0, 4.0, 4.0, -3.0];
        let r = mmcs(&v, &u, &w, 1, 3, 2);
        assert_eq!(r.best_component, vec![0]);
        assert!(approx(r.mmcs, 1.0, 1e-12));
        assert!(approx(r.ml2r, 1.0, 1e-12));
        assert_eq!(r.ml2r_std, 0.0);
        // Only an anti-aligned and an orthogonal one (C = 2, U = [[3,4],[4,-3]],
        // V = [[-1, 2]]): best is the orthogonal (cos 0), ratio ‖(8,-6)‖/5 = 2.
        let r = mmcs(&[-1.0, 2.0], &[3.0, 4.0, 4.0, -3.0], &w, 1, 2, 2);
        assert_eq!(r.best_component, vec![1]);
        assert!(approx(r.mmcs, 0.0, 1e-12));
        assert!(approx(r.ml2r, 2.0, 1e-12));
        // Only the anti-aligned one: MMCS = -1.
        let r = mmcs(&[-1.0], &[3.0, 4.0], &w, 1, 1, 2);
        assert!(approx(r.mmcs, -1.0, 1e-12));
        assert!(approx(r.ml2r, 1.0, 1e-12));
    }

    #[test]
    fn mmcs_zero_target_column() {
        // d_in = 2, C = 1, d_out = 1. W = [[0, 1]] -> feature 0 target is zero.
        // V = [[1],[1]], U = [[1]] -> s = (1) for both features.
        // Feature 0: cos 0, ratio 1/1e-12. Feature 1: cos 1, ratio 1.
        let r = mmcs(&[1.0, 1.0], &[1.0], &[0.0, 1.0], 2, 1, 1);
        assert_eq!(r.best_cos, vec![0.0, 1.0]);
        assert_eq!(r.target_norm, vec![0.0, 1.0]);
        assert!(approx(r.l2_ratio[0], 1e12, 1e-12));
        assert!(approx(r.mmcs, 0.5, 1e-12));
        // Zero target and zero subcomponent -> ratio 0.
        let r = mmcs(&[0.0], &[1.0], &[0.0], 1, 1, 1);
        assert_eq!((r.best_cos[0], r.l2_ratio[0]), (0.0, 0.0));
    }

    #[test]
    fn mmcs_ties_pick_lowest_index() {
        // Two identical subcomponents -> best_component 0.
        let r = mmcs(&[1.0, 1.0], &[1.0, 1.0], &[1.0], 1, 2, 1);
        assert_eq!(r.best_component, vec![0]);
    }

    #[test]
    fn mmcs_empty() {
        let r = mmcs(&[], &[], &[], 0, 0, 0);
        assert!(r.mmcs.is_nan() && r.ml2r.is_nan() && r.ml2r_std.is_nan());
        assert!(r.best_component.is_empty());
        // Features but no components.
        let r = mmcs(&[], &[], &[0.0; 6], 2, 0, 3);
        assert!(r.mmcs.is_nan() && r.best_cos.is_empty());
        // No features.
        let r = mmcs_rows(&[0.0; 6], &[], &[], 3, 2, 0);
        assert!(r.mmcs.is_nan());
        // d_out == 0: vectors of length 0 -> cos 0, ratio 0.
        let r = mmcs(&[1.0, 2.0], &[], &[], 2, 1, 0);
        assert_eq!(r.best_cos, vec![0.0, 0.0]);
        assert_eq!(r.l2_ratio, vec![0.0, 0.0]);
        assert_eq!(r.mmcs, 0.0);
    }

    #[test]
    fn mmcs_perfect_decomposition_random() {
        // Target W = Σ_c W_c with each feature owned by exactly one rank-1 component
        // (TMS-style): W[:, f] = U[c(f), :] with V[f, c(f)] = 1. Expect MMCS = ML2R = 1.
        let mut rng = Rng(5);
        let (d_in, c, d_out) = (5, 7, 3);
        let owner = [3usize, 0, 6, 1, 4];
        let u: Vec<f32> = (0..c * d_out)
            .map(|_| (rng.unif() * 2.0 - 1.0) as f32)
            .collect();
        let mut v = vec![0f32; d_in * c];
        for (f, &k) in owner.iter().enumerate() {
            v[f * c + k] = 1.0;
        }
        let mut w = vec![0f32; d_out * d_in];
        for o in 0..d_out {
            for i in 0..d_in {
                w[o * d_in + i] = (0..c).map(|k| u[k * d_out + o] * v[i * c + k]).sum();
            }
        }
        let r = mmcs(&v, &u, &w, d_in, c, d_out);
        assert_eq!(r.best_component, owner.to_vec());
        assert!(approx(r.mmcs, 1.0, 1e-6));
        assert!(approx(r.ml2r, 1.0, 1e-6));
        assert!(r.ml2r_std < 1e-6);
    }

    #[test]
    fn mmcs_rows_equals_mmcs_on_transposes() {
        fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
            let mut t = vec![0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = m[r * cols + c];
                }
            }
            t
        }
        let mut rng = Rng(9);
        let (d_in, c, d_out) = (4, 6, 3);
        let rand = |n: usize, rng: &mut Rng| -> Vec<f32> {
            (0..n).map(|_| (rng.unif() * 2.0 - 1.0) as f32).collect()
        };
        let v = rand(d_in * c, &mut rng);
        let u = rand(c * d_out, &mut rng);
        let w = rand(d_out * d_in, &mut rng);
        let a = mmcs_rows(&v, &u, &w, d_in, c, d_out);
        let b = mmcs(
            &transpose(&u, c, d_out),
            &transpose(&v, d_in, c),
            &transpose(&w, d_out, d_in),
            d_out,
            c,
            d_in,
        );
        assert_eq!(a, b);
        assert_eq!(a.best_cos.len(), d_out);
        for &x in &a.best_cos {
            assert!((-1.0 - 1e-12..=1.0 + 1e-12).contains(&x));
        }
    }

    // ---- CI statistics ----

    #[test]
    fn l0_hand() {
        // 3x3, threshold 0.25:
        //   [[0.0, 0.5, 1.0],   -> 2
        //    [0.3, 0.0, 0.0],   -> 1
        //    [0.25, 0.25, 0.25]] -> 0 (strict)
        // mean = 1.0
        let ci = [0.0, 0.5, 1.0, 0.3, 0.0, 0.0, 0.25, 0.25, 0.25];
        assert_eq!(l0(&ci, 3, 3, 0.25), 1.0);
        assert_eq!(l0(&ci, 3, 3, 0.0), 2.0); // (2 + 1 + 3) / 3
        assert!(l0(&[], 0, 3, 0.1).is_nan());
        assert_eq!(l0(&[], 3, 0, 0.1), 0.0);
        assert_eq!(l0(&[f32::NAN], 1, 1, 0.0), 0.0);
    }

    #[test]
    fn mean_ci_and_density_hand() {
        // 2x3: [[0.0, 0.5, 1.0],[1.0, 0.5, 0.0]]
        // means: [0.5, 0.5, 0.5]; density (> 0.25): [0.5, 1.0, 0.5]; (> 0.5): [0.5, 0, 0.5]
        let ci = [0.0, 0.5, 1.0, 1.0, 0.5, 0.0];
        assert_eq!(mean_ci_per_component(&ci, 2, 3), vec![0.5, 0.5, 0.5]);
        assert_eq!(activation_density(&ci, 2, 3, 0.25), vec![0.5, 1.0, 0.5]);
        assert_eq!(activation_density(&ci, 2, 3, 0.5), vec![0.5, 0.0, 0.5]);
        // Empty cases.
        assert!(mean_ci_per_component(&[], 0, 0).is_empty());
        let m = mean_ci_per_component(&[], 0, 2);
        assert!(m.len() == 2 && m.iter().all(|x| x.is_nan()));
        let d = activation_density(&[], 0, 2, 0.1);
        assert!(d.len() == 2 && d.iter().all(|x| x.is_nan()));
        assert!(activation_density(&[], 4, 0, 0.1).is_empty());
    }

    #[test]
    fn histogram_hand() {
        // 4 bins over [0, 1]: edges 0, .25, .5, .75, 1.
        // values: -1 -> b0 (clamped), 0 -> b0, 0.1 -> b0, 0.25 -> b1, 0.6 -> b2,
        //         0.75 -> b3, 1.0 -> b3 (closed last bin), 7 -> b3 (clamped), NaN ignored,
        //         -inf -> b0, +inf -> b3.
        let vals = [
            -1.0,
            0.0,
            0.1,
            0.25,
            0.6,
            0.75,
            1.0,
            7.0,
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ];
        assert_eq!(histogram(&vals, 4, 0.0, 1.0), vec![4, 1, 1, 4]);
        assert_eq!(histogram(&vals, 1, 0.0, 1.0), vec![10]);
        assert!(histogram(&vals, 0, 0.0, 1.0).is_empty());
        assert_eq!(histogram(&[], 3, 0.0, 1.0), vec![0, 0, 0]);
        // Degenerate range: <= lo -> bin 0, else last.
        assert_eq!(histogram(&[0.0, 0.5, -1.0], 2, 0.0, 0.0), vec![2, 1]);
        assert_eq!(histogram(&[0.0], 2, f64::NAN, 1.0), vec![0, 1]);
    }
}
