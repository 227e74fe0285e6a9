//! Clusterings scored against a known answer: for targets whose mechanisms are known, each
//! subcomponent's true mechanism from its weights, and the purity and adjusted Rand index of
//! every state of the merge history against it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::TargetSpec;
use crate::spd::component_model::ComponentModel;

/// The known partition: a class name per subcomponent label (`module:index`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Truth {
    /// What the classes are (for reports).
    pub description: String,
    pub class_of: BTreeMap<String, String>,
}

fn argmax_abs(v: impl Iterator<Item = f32>) -> usize {
    v.enumerate()
        .fold(
            (0, -1f32),
            |b, (i, x)| if x.abs() > b.1 { (i, x.abs()) } else { b },
        )
        .0
}

/// The true mechanism of every subcomponent, from its weights, where the target's answer is
/// known:
/// - TMS: the feature a `linear1` subcomponent reads (largest |V| entry) or a `linear2` one
///   writes (largest |U| entry); the hidden identity layers' subcomponents form one block;
/// - residual MLP: the feature an `mlp_in` subcomponent reads (largest |W_E·V_c| over
///   features); each layer's `mlp_out` subcomponents form one block;
/// - days: the day an `embed` subcomponent reads; the rotation ("next day") mechanism is the
///   MLP's subcomponents with the embedding's subcomponents that read the operation.
///
/// None for other targets.
pub fn ground_truth(model: &ComponentModel) -> anyhow::Result<Option<Truth>> {
    let mut class_of = BTreeMap::new();
    let description;
    match &model.target.spec {
        TargetSpec::Tms { .. } => {
            description = "TMS: the feature each subcomponent reads (linear1) or writes (linear2); the identity layers as one block; subcomponents that fire on no single feature left out".into();
            let fires = fires_on_some_feature(model)?;
            for (j, m) in model.modules.iter().enumerate() {
                let v = m.v.as_tensor().to_vec2::<f32>()?; // [d_in, C]
                let u = m.u.as_tensor().to_vec2::<f32>()?; // [C, d_out]
                for c in 0..m.c {
                    let class = if m.name.starts_with("linear1") {
                        format!("feature {}", argmax_abs(v.iter().map(|r| r[c])))
                    } else if m.name.starts_with("linear2") {
                        format!("feature {}", argmax_abs(u[c].iter().copied()))
                    } else {
                        "identity block".to_string()
                    };
                    if fires[j][c] {
                        class_of.insert(format!("{}:{c}", m.name), class);
                    }
                }
            }
        }
        TargetSpec::ResidMlp { .. } => {
            description = "residual MLP: the feature each mlp_in subcomponent reads (through W_E); each layer's mlp_out as one block; subcomponents that fire on no single feature left out".into();
            let we = model.target.param("W_E"); // [n_features, d_embed]
            let fires = fires_on_some_feature(model)?;
            for (j, m) in model.modules.iter().enumerate() {
                let layer = m.name.split('.').nth(1).unwrap_or("0").to_string();
                let reads = if m.name.ends_with("mlp_in") {
                    Some(we.matmul(m.v.as_tensor())?.to_vec2::<f32>()?) // [n_features, C]
                } else {
                    None
                };
                for c in 0..m.c {
                    let class = match &reads {
                        Some(r) => format!("feature {}", argmax_abs(r.iter().map(|row| row[c]))),
                        None => format!("layer {layer} mlp_out block"),
                    };
                    if fires[j][c] {
                        class_of.insert(format!("{}:{c}", m.name), class);
                    }
                }
            }
        }
        TargetSpec::Days { n_days, .. } => {
            description = "days: the day each embedding subcomponent reads; the rotation mechanism (MLP subcomponents and the embedding's operation readers)".into();
            for m in &model.modules {
                let v = m.v.as_tensor().to_vec2::<f32>()?;
                for c in 0..m.c {
                    let class = if m.name == "embed" {
                        let i = argmax_abs(v.iter().map(|r| r[c]));
                        if i < *n_days {
                            format!("day {i}")
                        } else {
                            "rotation".to_string()
                        }
                    } else {
                        "rotation".to_string()
                    };
                    class_of.insert(format!("{}:{c}", m.name), class);
                }
            }
        }
        _ => return Ok(None),
    }
    Ok(Some(Truth {
        description,
        class_of,
    }))
}

/// Per module and subcomponent: whether it fires (lower-leaky CI > 0.5) on some single
/// feature at 0.75 — one that fires on none implements no feature and belongs to no
/// mechanism, however alive the clustering's threshold finds it.
fn fires_on_some_feature(model: &ComponentModel) -> anyhow::Result<Vec<Vec<bool>>> {
    let nf = model.target.spec.n_features();
    let mats = crate::metrics::single_feature_ci(model, 0.75)?;
    Ok(model
        .modules
        .iter()
        .enumerate()
        .map(|(j, m)| {
            (0..m.c)
                .map(|c| (0..nf).any(|f| mats[j][f * m.c + c] > 0.5))
                .collect()
        })
        .collect())
}

/// Purity: the share of items whose group's most common class is their own.
pub fn purity(groups: &[u32], classes: &[u32]) -> f64 {
    let n = groups.len();
    if n == 0 {
        return 0.0;
    }
    let mut counts: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for (g, c) in groups.iter().zip(classes) {
        *counts.entry((*g, *c)).or_default() += 1;
    }
    let mut best: BTreeMap<u32, usize> = BTreeMap::new();
    for ((g, _), k) in counts {
        let b = best.entry(g).or_default();
        *b = (*b).max(k);
    }
    best.values().sum::<usize>() as f64 / n as f64
}

/// Adjusted Rand index (Hubert & Arabie) of two labelings of the same items; 1 when equal,
/// ~0 for unrelated ones. Two labelings that are both one group (or both all singletons)
/// score 1.
pub fn adjusted_rand(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len();
    let pairs = |k: usize| (k * k.saturating_sub(1) / 2) as f64;
    let mut table: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut ra: BTreeMap<u32, usize> = BTreeMap::new();
    let mut rb: BTreeMap<u32, usize> = BTreeMap::new();
    for (x, y) in a.iter().zip(b) {
        *table.entry((*x, *y)).or_default() += 1;
        *ra.entry(*x).or_default() += 1;
        *rb.entry(*y).or_default() += 1;
    }
    let index: f64 = table.values().map(|&k| pairs(k)).sum();
    let sa: f64 = ra.values().map(|&k| pairs(k)).sum();
    let sb: f64 = rb.values().map(|&k| pairs(k)).sum();
    let total = pairs(n);
    if total == 0.0 {
        return 1.0;
    }
    let expected = sa * sb / total;
    let max = 0.5 * (sa + sb);
    if (max - expected).abs() < 1e-12 {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

/// Purity and ARI along a merge history (alive subcomponents with a known class).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreCurve {
    pub description: String,
    /// Number of classes among the scored subcomponents.
    pub n_classes: usize,
    /// Subcomponents scored (alive ones).
    pub n_scored: usize,
    /// Per state of the history: (k, purity, ARI).
    pub points: Vec<(usize, f64, f64)>,
    /// The class names, and the class (index) of each alive subcomponent.
    #[serde(default)]
    pub class_names: Vec<String>,
    #[serde(default)]
    pub class_of_alive: Vec<Option<u32>>,
}

impl ScoreCurve {
    /// The state with k groups (or the nearest recorded one).
    pub fn at(&self, k: usize) -> Option<(usize, f64, f64)> {
        self.points.iter().min_by_key(|p| p.0.abs_diff(k)).copied()
    }

    /// The state with the highest ARI.
    pub fn best(&self) -> Option<(usize, f64, f64)> {
        self.points
            .iter()
            .copied()
            .max_by(|a, b| a.2.total_cmp(&b.2))
    }
}

/// Scores every state of a clustering's merge history against `truth`.
pub fn score_history(r: &super::ClusteringResult, truth: &Truth) -> ScoreCurve {
    let mut names: Vec<&String> = truth.class_of.values().collect();
    names.sort();
    names.dedup();
    let idx: BTreeMap<&String, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, i as u32))
        .collect();
    let keep: Vec<(usize, u32)> = r
        .labels_alive
        .iter()
        .enumerate()
        .filter_map(|(i, l)| truth.class_of.get(l).map(|c| (i, idx[c])))
        .collect();
    let classes: Vec<u32> = keep.iter().map(|k| k.1).collect();
    let n_classes = classes
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let points = r
        .group_idxs
        .iter()
        .map(|g| {
            let groups: Vec<u32> = keep.iter().map(|(i, _)| g[*i]).collect();
            let k = g.iter().copied().max().map_or(0, |m| m as usize + 1);
            (
                k,
                purity(&groups, &classes),
                adjusted_rand(&groups, &classes),
            )
        })
        .collect();
    ScoreCurve {
        description: truth.description.clone(),
        n_classes,
        n_scored: keep.len(),
        points,
        class_of_alive: r
            .labels_alive
            .iter()
            .map(|l| truth.class_of.get(l).map(|c| idx[c]))
            .collect(),
        class_names: names.into_iter().cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purity_and_ari_on_known_cases() {
        let truth = [0, 0, 0, 1, 1, 1];
        assert_eq!(purity(&[5, 5, 5, 7, 7, 7], &truth), 1.0);
        assert!((adjusted_rand(&[5, 5, 5, 7, 7, 7], &truth) - 1.0).abs() < 1e-12);
        // One group of everything: purity 1/2, ARI 0.
        assert_eq!(purity(&[0; 6], &truth), 0.5);
        assert!(adjusted_rand(&[0; 6], &truth).abs() < 1e-12);
        // Singletons: purity 1, ARI 0.
        assert_eq!(purity(&[0, 1, 2, 3, 4, 5], &truth), 1.0);
        assert!(adjusted_rand(&[0, 1, 2, 3, 4, 5], &truth).abs() < 1e-12);
        // A textbook value (sklearn: adjusted_rand_score([0,0,1,1],[0,0,1,2]) = 0.5714...).
        assert!((adjusted_rand(&[0, 0, 1, 1], &[0, 0, 1, 2]) - 4.0 / 7.0).abs() < 1e-12);
        // Symmetric.
        let (a, b) = ([0, 1, 1, 2, 2, 2, 0], [1, 1, 0, 2, 2, 0, 1]);
        assert!((adjusted_rand(&a, &b) - adjusted_rand(&b, &a)).abs() < 1e-12);
    }

    #[test]
    fn tms_truth_reads_the_features_from_the_weights() {
        let (tr, _) = crate::io::spdlab_file::from_bytes(
            crate::assets::default_decomposition(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let t = ground_truth(&tr.model).unwrap().unwrap();
        // The five features' subcomponents in each layer (the others fire on no feature).
        assert_eq!(t.class_of.len(), 10);
        // The shipped tms-5-2 decomposition: every feature has a linear1 subcomponent.
        for f in 0..5 {
            let want = format!("feature {f}");
            assert!(
                t.class_of
                    .iter()
                    .any(|(l, c)| l.starts_with("linear1") && *c == want)
            );
        }
    }
}

/// The merge history as a tree: leaves (alive subcomponents) in an order where no merge
/// crosses another, and the tree's segments in (leaf position, merge step) units.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dendrogram {
    /// Alive index of the leaf at each position.
    pub order: Vec<usize>,
    /// Segments `[x0, y0, x1, y1]`: x in leaf positions, y in merges done (0 = leaves).
    pub segments: Vec<[f32; 4]>,
    /// Merges in the history.
    pub n_steps: usize,
}

impl Dendrogram {
    /// Builds the tree from the group index of every alive subcomponent after each merge
    /// (`group_idxs[t]`, t merges done).
    pub fn from_history(group_idxs: &[Vec<u32>]) -> Dendrogram {
        let Some(first) = group_idxs.first() else {
            return Dendrogram::default();
        };
        let n = first.len();
        // Tree nodes: leaves 0..n, then one per merge: (children, step).
        let mut children: Vec<Option<(usize, usize, usize)>> = vec![None; n];
        // Node of each group at the current state.
        let mut node_of_group: Vec<usize> = {
            let k = first.iter().map(|&g| g as usize + 1).max().unwrap_or(0);
            let mut v = vec![usize::MAX; k];
            for (i, &g) in first.iter().enumerate() {
                if v[g as usize] == usize::MAX {
                    v[g as usize] = i;
                }
            }
            v
        };
        for (t, w) in group_idxs.windows(2).enumerate() {
            let (a, b) = (&w[0], &w[1]);
            let k_next = b.iter().map(|&g| g as usize + 1).max().unwrap_or(0);
            let mut next = vec![usize::MAX; k_next];
            let mut merged: Option<(usize, usize, usize)> = None;
            for i in 0..n {
                let (ga, gb) = (a[i] as usize, b[i] as usize);
                let node = node_of_group[ga];
                match next[gb] {
                    usize::MAX => next[gb] = node,
                    other if other != node && merged.is_none() => merged = Some((gb, other, node)),
                    _ => {}
                }
            }
            if let Some((gb, x, y)) = merged {
                children.push(Some((x, y, t + 1)));
                next[gb] = children.len() - 1;
            }
            node_of_group = next;
        }
        // Leaf order: depth first from the roots (the groups of the last state).
        let mut order = vec![];
        let mut stack: Vec<usize> = node_of_group
            .iter()
            .rev()
            .copied()
            .filter(|&x| x != usize::MAX)
            .collect();
        while let Some(v) = stack.pop() {
            match children[v] {
                None => order.push(v),
                Some((x, y, _)) => {
                    stack.push(y);
                    stack.push(x);
                }
            }
        }
        let mut pos = vec![0f32; children.len()];
        let mut height = vec![0f32; children.len()];
        for (p, &leaf) in order.iter().enumerate() {
            pos[leaf] = p as f32;
        }
        let mut segments = vec![];
        for v in n..children.len() {
            let (x, y, t) = children[v].expect("an internal node");
            let h = t as f32;
            pos[v] = 0.5 * (pos[x] + pos[y]);
            height[v] = h;
            segments.push([pos[x], height[x], pos[x], h]);
            segments.push([pos[y], height[y], pos[y], h]);
            segments.push([pos[x], h, pos[y], h]);
        }
        Dendrogram {
            order,
            segments,
            n_steps: group_idxs.len() - 1,
        }
    }
}

#[cfg(test)]
mod dendrogram_tests {
    use super::*;

    #[test]
    fn a_small_history_becomes_a_tree_without_crossings() {
        // 4 leaves: merge 1 with 3, then 0 with 2, then everything.
        let h = vec![
            vec![0, 1, 2, 3],
            vec![0, 1, 2, 1],
            vec![0, 1, 0, 1],
            vec![0, 0, 0, 0],
        ];
        let d = Dendrogram::from_history(&h);
        assert_eq!(d.n_steps, 3);
        assert_eq!(d.segments.len(), 9);
        // Merged pairs sit next to each other.
        let p = |leaf: usize| d.order.iter().position(|&x| x == leaf).unwrap() as i32;
        assert_eq!((p(1) - p(3)).abs(), 1);
        assert_eq!((p(0) - p(2)).abs(), 1);
        // The root joins at step 3.
        assert!(d.segments.iter().any(|s| s[1] == 3.0 && s[3] == 3.0));
    }
}
