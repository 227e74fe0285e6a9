//! Sparse-feature data (the reference's `SparseFeatureDataset`), seeded by our own RNG.

use crate::rng::Rng;
use crate::spd::config::DataGenerationType;

/// Generator of sparse feature vectors.
#[derive(Clone, Debug)]
pub struct SparseFeatureData {
    pub n_features: usize,
    pub feature_probability: f32,
    pub kind: DataGenerationType,
    pub value_range: (f32, f32),
    /// Grouped one-hot inputs (e.g. day ⊕ operation): when set, every row has exactly one
    /// active feature per group, with value `value_range.1`, and `kind` is not used.
    pub groups: Option<Vec<(usize, bool)>>,
}

impl SparseFeatureData {
    /// A batch `[b, n_features]`, row-major.
    ///
    /// `at_least_zero_active`: each entry is U(value_range) with probability p, else 0 (all-zero
    /// rows allowed). `exactly_n_active`: n distinct features per row with U(value_range) values.
    pub fn batch(&self, rng: &mut Rng, b: usize) -> Vec<f32> {
        let n = self.n_features;
        let (lo, hi) = self.value_range;
        let mut out = vec![0f32; b * n];
        if let Some(groups) = &self.groups {
            for row in out.chunks_mut(n) {
                let mut start = 0;
                for &(g, optional) in groups {
                    // An optional group has g + 1 equally likely options, the first "none".
                    let k = rng.below(g + optional as usize);
                    match (optional, k) {
                        (true, 0) => {}
                        (true, k) => row[start + k - 1] = hi,
                        (false, k) => row[start + k] = hi,
                    }
                    start += g;
                }
            }
            return out;
        }
        match self.kind.exactly_n() {
            None => {
                let p = self.feature_probability;
                for v in out.iter_mut() {
                    // Draw the mask first: most entries are inactive and need no value.
                    if rng.uniform_f32() < p {
                        *v = lo + (hi - lo) * rng.uniform_f32();
                    }
                }
            }
            Some(k) => {
                let k = k.min(n);
                let mut idx: Vec<usize> = (0..n).collect();
                for row in 0..b {
                    // Partial Fisher–Yates: the first k entries are a uniform k-subset.
                    for i in 0..k {
                        let j = i + rng.below(n - i);
                        idx.swap(i, j);
                    }
                    for &f in &idx[..k] {
                        out[row * n + f] = lo + (hi - lo) * rng.uniform_f32();
                    }
                }
            }
        }
        out
    }
}

/// The reference's induction sequences (`InductionDataset.generate_batch`), drawn with our
/// RNG: BOS, `seq_len − 2` filler tokens uniform in 1..=vocab, then the induction token S.
/// Somewhere in the prefix window the pair (S, M) is planted (S at position loc + 1 with loc
/// uniform in 1..prefix_window, M uniform in 1..=vocab right after it); the model must
/// predict M at the last position.
#[derive(Clone, Debug, PartialEq)]
pub struct InductionData {
    pub vocab_size: usize,
    pub seq_len: usize,
    pub prefix_window: usize,
}

impl InductionData {
    /// `prefix_window`: None = seq_len − 3 (the reference's default).
    pub fn new(dims: &crate::model::IhDims, prefix_window: Option<usize>) -> Result<Self, String> {
        let max = dims.seq_len.saturating_sub(3);
        let pw = prefix_window.unwrap_or(max);
        if pw < 2 || pw > max {
            return Err(format!(
                "prefix_window must be in 2..={max} for sequences of {} tokens, got {pw}",
                dims.seq_len
            ));
        }
        Ok(InductionData {
            vocab_size: dims.vocab_size,
            seq_len: dims.seq_len,
            prefix_window: pw,
        })
    }

    /// `b` sequences `[b, seq_len]` of token ids (as f32), row-major.
    pub fn batch(&self, rng: &mut Rng, b: usize) -> Vec<f32> {
        let (v, s) = (self.vocab_size, self.seq_len);
        let s_tok = (v + 1) as f32;
        let mut out = Vec::with_capacity(b * s);
        for _ in 0..b {
            let m = 1 + rng.below(v);
            let loc = 1 + rng.below(self.prefix_window - 1);
            out.push(0.0);
            for i in 0..s - 2 {
                let t = if i == loc {
                    s_tok
                } else if i == loc + 1 {
                    m as f32
                } else {
                    (1 + rng.below(v)) as f32
                };
                out.push(t);
            }
            out.push(s_tok);
        }
        out
    }
}

/// Where a run's inputs come from: sparse feature vectors (toy models) or token sequences.
#[derive(Clone, Debug)]
pub enum TaskData {
    Sparse(SparseFeatureData),
    Induction(InductionData),
    /// Language models: windows of tokenized text.
    Tokens(TokenData),
}

/// Token sequences for a language model: rows of a tokenized corpus (drawn uniformly with
/// replacement), or, without a corpus, uniformly random tokens.
#[derive(Clone, Debug)]
pub struct TokenData {
    pub seq_len: usize,
    pub vocab_size: usize,
    /// `[n_rows · seq_len]` token ids; None: random tokens.
    pub rows: Option<std::sync::Arc<Vec<u32>>>,
    /// Where the rows came from (shown in reports).
    pub source: String,
}

impl TokenData {
    pub fn random(seq_len: usize, vocab_size: usize) -> Self {
        TokenData {
            seq_len,
            vocab_size,
            rows: None,
            source: "uniformly random tokens (no corpus loaded)".into(),
        }
    }
    /// A corpus of rows of exactly `seq_len` tokens, each below `vocab_size`.
    pub fn corpus(
        rows: &[Vec<u32>],
        seq_len: usize,
        vocab_size: usize,
        source: String,
    ) -> Result<Self, String> {
        if rows.is_empty() {
            return Err(format!("{source}: no sequence of {seq_len} tokens"));
        }
        let mut flat = Vec::with_capacity(rows.len() * seq_len);
        for (i, r) in rows.iter().enumerate() {
            if r.len() != seq_len {
                return Err(format!(
                    "{source}: row {i} has {} tokens, not {seq_len}",
                    r.len()
                ));
            }
            if let Some(t) = r.iter().find(|&&t| t as usize >= vocab_size) {
                return Err(format!(
                    "{source}: token id {t} is outside the model's vocabulary ({vocab_size})"
                ));
            }
            flat.extend_from_slice(r);
        }
        Ok(TokenData {
            seq_len,
            vocab_size,
            rows: Some(std::sync::Arc::new(flat)),
            source,
        })
    }
    pub fn n_rows(&self) -> usize {
        self.rows
            .as_ref()
            .map_or(0, |r| r.len() / self.seq_len.max(1))
    }
    pub fn batch(&self, rng: &mut Rng, b: usize) -> Vec<f32> {
        let s = self.seq_len;
        match &self.rows {
            Some(rows) => {
                let n = rows.len() / s;
                let mut out = Vec::with_capacity(b * s);
                for _ in 0..b {
                    let i = (rng.next_u64() % n as u64) as usize;
                    out.extend(rows[i * s..(i + 1) * s].iter().map(|&t| t as f32));
                }
                out
            }
            None => (0..b * s)
                .map(|_| (rng.next_u64() % self.vocab_size as u64) as f32)
                .collect(),
        }
    }
}

impl TaskData {
    /// `b` input rows, row-major (`[b, n_features]`: feature values or token ids).
    pub fn batch(&self, rng: &mut Rng, b: usize) -> Vec<f32> {
        match self {
            TaskData::Sparse(d) => d.batch(rng, b),
            TaskData::Induction(d) => d.batch(rng, b),
            TaskData::Tokens(d) => d.batch(rng, b),
        }
    }
    /// Values per input row (features, or tokens per sequence).
    pub fn n_features(&self) -> usize {
        match self {
            TaskData::Sparse(d) => d.n_features,
            TaskData::Induction(d) => d.seq_len,
            TaskData::Tokens(d) => d.seq_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn induction_sequences_have_the_planted_pair() {
        let dims = crate::model::IhDims::attention_only(10, 12, 4, 1, 2);
        let d = InductionData::new(&dims, None).unwrap();
        assert_eq!(d.prefix_window, 9);
        assert!(InductionData::new(&dims, Some(10)).is_err());
        let mut rng = Rng::new(3);
        let x = d.batch(&mut rng, 500);
        let mut locs = std::collections::BTreeSet::new();
        for row in x.chunks(12) {
            let t: Vec<u32> = row.iter().map(|&v| v as u32).collect();
            assert_eq!(t[0], 0);
            assert_eq!(t[11], 11);
            assert!(t[1..11].iter().all(|&v| (1..=11).contains(&v)));
            // Exactly one S before the last position, followed by the answer.
            let s: Vec<usize> = (1..11).filter(|&i| t[i] == 11).collect();
            assert_eq!(s.len(), 1, "{t:?}");
            let (p, m) = crate::model::ih::induction_answer(&t, &dims).unwrap();
            assert_eq!(p, s[0]);
            assert!((1..=10).contains(&m));
            // S at loc + 1 with loc in 1..prefix_window: positions 2..=9.
            assert!((2..=9).contains(&p), "{p}");
            locs.insert(p);
        }
        assert_eq!(locs.len(), 8, "every position of the window is used");
    }

    #[test]
    fn at_least_zero_active_statistics() {
        let d = SparseFeatureData {
            n_features: 5,
            feature_probability: 0.05,
            kind: DataGenerationType::AtLeastZeroActive,
            value_range: (0.0, 1.0),
            groups: None,
        };
        let mut rng = Rng::new(0);
        let b = 40_000;
        let x = d.batch(&mut rng, b);
        let active = x.iter().filter(|&&v| v != 0.0).count() as f64 / (b * 5) as f64;
        assert!((active - 0.05).abs() < 0.005, "{active}");
        assert!(x.iter().all(|&v| (0.0..1.0).contains(&v)));
        let zero_rows =
            x.chunks(5).filter(|r| r.iter().all(|&v| v == 0.0)).count() as f64 / b as f64;
        assert!((zero_rows - 0.95f64.powi(5)).abs() < 0.01);
    }

    #[test]
    fn grouped_one_hot() {
        let d = SparseFeatureData {
            n_features: 9,
            feature_probability: 0.0,
            kind: DataGenerationType::AtLeastZeroActive,
            value_range: (1.0, 1.0),
            groups: Some(vec![(7, false), (2, true)]),
        };
        let mut rng = Rng::new(5);
        let x = d.batch(&mut rng, 2100);
        let mut counts = [0usize; 9];
        let mut no_op = 0;
        for row in x.chunks(9) {
            assert_eq!(row[..7].iter().filter(|&&v| v == 1.0).count(), 1);
            let ops = row[7..].iter().filter(|&&v| v == 1.0).count();
            assert!(ops <= 1);
            no_op += (ops == 0) as usize;
            assert_eq!(row.iter().filter(|&&v| v != 0.0).count(), 1 + ops);
            for (c, v) in counts.iter_mut().zip(row) {
                *c += (*v != 0.0) as usize;
            }
        }
        // Uniform within each group; "none" as likely as each option of an optional group.
        assert!(
            counts[..7].iter().all(|&c| (240..360).contains(&c)),
            "{counts:?}"
        );
        assert!(
            counts[7..].iter().all(|&c| (600..800).contains(&c)),
            "{counts:?}"
        );
        assert!((600..800).contains(&no_op), "{no_op}");
    }

    #[test]
    fn exactly_n_active() {
        let d = SparseFeatureData {
            n_features: 10,
            feature_probability: 0.0,
            kind: DataGenerationType::ExactlyTwoActive,
            value_range: (-1.0, 1.0),
            groups: None,
        };
        let mut rng = Rng::new(3);
        let x = d.batch(&mut rng, 1000);
        for row in x.chunks(10) {
            assert_eq!(row.iter().filter(|&&v| v != 0.0).count(), 2);
        }
    }
}
