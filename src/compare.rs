//! Two decompositions of the same target side by side: per module, the subcomponents of one
//! matched to those of the other (Hungarian assignment maximising the similarity of their
//! rank-one matrices), with each pair's similarity and both sides' directions.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One module of a comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleComparison {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    /// Matched pairs (index in A, index in B, similarity), most similar first. Only pairs
    /// where at least one side is not negligible (norm ≥ 1% of its module's largest).
    pub pairs: Vec<(usize, usize, f32)>,
    /// Read and write directions of both runs: `V [d_in, C]`, `U [C, d_out]` row-major.
    pub v_a: Vec<f32>,
    pub u_a: Vec<f32>,
    pub v_b: Vec<f32>,
    pub u_b: Vec<f32>,
    pub c_a: usize,
    pub c_b: usize,
    /// Non-sequence targets: lower-leaky CI of both runs on the probe inputs (one-hot 0.75
    /// per feature; days: every (day, operation)), `[n_probe, C]` row-major; empty otherwise.
    #[serde(default)]
    pub ci_a: Vec<f32>,
    #[serde(default)]
    pub ci_b: Vec<f32>,
    #[serde(default)]
    pub n_probe: usize,
}

impl ModuleComparison {
    /// Matched pairs with similarity at least `t`.
    pub fn matched_above(&self, t: f32) -> usize {
        self.pairs.iter().filter(|p| p.2 >= t).count()
    }
}

/// A comparison of runs A and B.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub modules: Vec<ModuleComparison>,
}

/// |⟨U_a V_aᵀ, U_b V_bᵀ⟩_F| / (‖U_a V_aᵀ‖ ‖U_b V_bᵀ‖) for every pair: the cosine of two
/// rank-one matrices is the product of the cosines of their factors. `[C_a, C_b]` row-major.
pub fn rank_one_similarity(
    (v_a, u_a, c_a): (&[f32], &[f32], usize),
    (v_b, u_b, c_b): (&[f32], &[f32], usize),
    d_in: usize,
    d_out: usize,
) -> Vec<f32> {
    let col =
        |v: &[f32], c: usize, k: usize| -> Vec<f32> { (0..d_in).map(|i| v[i * c + k]).collect() };
    let row = |u: &[f32], k: usize| -> Vec<f32> { u[k * d_out..(k + 1) * d_out].to_vec() };
    let unit = |x: Vec<f32>| {
        let n = x.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 0.0 {
            x.iter().map(|v| v / n).collect()
        } else {
            x
        }
    };
    let va: Vec<Vec<f32>> = (0..c_a).map(|k| unit(col(v_a, c_a, k))).collect();
    let ua: Vec<Vec<f32>> = (0..c_a).map(|k| unit(row(u_a, k))).collect();
    let vb: Vec<Vec<f32>> = (0..c_b).map(|k| unit(col(v_b, c_b, k))).collect();
    let ub: Vec<Vec<f32>> = (0..c_b).map(|k| unit(row(u_b, k))).collect();
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f32>();
    let mut s = vec![0f32; c_a * c_b];
    for i in 0..c_a {
        for j in 0..c_b {
            s[i * c_b + j] = (dot(&va[i], &vb[j]) * dot(&ua[i], &ub[j])).abs();
        }
    }
    s
}

/// Compares two saved decompositions of the same architecture (module names and shapes must
/// match; C may differ).
pub fn compare_files(a: &Path, b: &Path) -> anyhow::Result<Comparison> {
    let dev = candle_core::Device::Cpu;
    let (ta, _) = crate::io::spdlab_file::load(a, &dev)?;
    let (tb, _) = crate::io::spdlab_file::load(b, &dev)?;
    // CI of both runs on the probe inputs (the same inputs: the targets are the same kind).
    let probes = if ta.model.target.spec.is_sequence() {
        vec![]
    } else {
        crate::inputs::probe_inputs(&ta.model.target.spec, 0.75)
    };
    let n_probe = probes.len();
    let probe_ci =
        |m: &crate::spd::component_model::ComponentModel| -> anyhow::Result<Vec<Vec<f32>>> {
            let nf = m.target.spec.n_features();
            // (Another input width is another architecture: refused below, module by module.)
            if probes.is_empty() || probes[0].len() != nf {
                return Ok(vec![]);
            }
            let x = candle_core::Tensor::from_vec(probes.concat(), (n_probe, nf), m.device())?;
            crate::interventions::lower_ci(m, &x)?
                .iter()
                .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
                .collect()
        };
    let (cis_a, cis_b) = (probe_ci(&ta.model)?, probe_ci(&tb.model)?);
    let mut modules = vec![];
    for (ja, ma) in ta.model.modules.iter().enumerate() {
        let jb = tb.model.modules.iter().position(|m| m.name == ma.name);
        let Some(mb) = tb.model.modules.iter().find(|m| m.name == ma.name) else {
            anyhow::bail!(
                "{}: has no module {} (of {})",
                b.display(),
                ma.name,
                a.display()
            );
        };
        if (ma.d_in, ma.d_out) != (mb.d_in, mb.d_out) {
            anyhow::bail!(
                "{}: {} is {}×{} in one run and {}×{} in the other",
                b.display(),
                ma.name,
                ma.d_in,
                ma.d_out,
                mb.d_in,
                mb.d_out
            );
        }
        let flat = |t: &candle_core::Tensor| -> anyhow::Result<Vec<f32>> {
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let (v_a, u_a) = (flat(ma.v.as_tensor())?, flat(ma.u.as_tensor())?);
        let (v_b, u_b) = (flat(mb.v.as_tensor())?, flat(mb.u.as_tensor())?);
        let sim = rank_one_similarity((&v_a, &u_a, ma.c), (&v_b, &u_b, mb.c), ma.d_in, ma.d_out);
        let cost: Vec<f64> = sim.iter().map(|&s| -(s as f64)).collect();
        // Weight norms ‖U_c‖·‖V_c‖, to leave out pairs of two negligible subcomponents.
        let norms = |v: &[f32], u: &[f32], c: usize, d_in: usize, d_out: usize| -> Vec<f32> {
            (0..c)
                .map(|k| {
                    let nv = (0..d_in).map(|i| v[i * c + k].powi(2)).sum::<f32>().sqrt();
                    let nu = u[k * d_out..(k + 1) * d_out]
                        .iter()
                        .map(|x| x * x)
                        .sum::<f32>()
                        .sqrt();
                    nv * nu
                })
                .collect()
        };
        let na = norms(&v_a, &u_a, ma.c, ma.d_in, ma.d_out);
        let nb = norms(&v_b, &u_b, mb.c, mb.d_in, mb.d_out);
        let big = |n: &[f32], k: usize| n[k] >= 0.01 * n.iter().copied().fold(0.0, f32::max);
        let mut pairs: Vec<(usize, usize, f32)> =
            crate::metrics::toy_metrics::linear_sum_assignment(&cost, ma.c, mb.c)
                .into_iter()
                .filter(|&(i, j)| big(&na, i) || big(&nb, j))
                .map(|(i, j)| (i, j, sim[i * mb.c + j]))
                .collect();
        pairs.sort_by(|x, y| y.2.total_cmp(&x.2));
        modules.push(ModuleComparison {
            name: ma.name.clone(),
            d_in: ma.d_in,
            d_out: ma.d_out,
            pairs,
            v_a,
            u_a,
            v_b,
            u_b,
            c_a: ma.c,
            c_b: mb.c,
            ci_a: cis_a.get(ja).cloned().unwrap_or_default(),
            ci_b: jb.and_then(|j| cis_b.get(j).cloned()).unwrap_or_default(),
            n_probe,
        });
    }
    Ok(Comparison {
        a: a.display().to_string(),
        b: b.display().to_string(),
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similarity_is_the_product_of_factor_cosines() {
        // d_in = 2, d_out = 2; A has one subcomponent e0 ⊗ e0, B two: e0 ⊗ e0 and (e0+e1) ⊗ e1.
        let (v_a, u_a) = (vec![1.0, 0.0], vec![1.0, 0.0]);
        let v_b = vec![1.0, 1.0, 0.0, 1.0]; // [d_in, C] columns (1,0) and (1,1)
        let u_b = vec![1.0, 0.0, 0.0, -1.0];
        let s = rank_one_similarity((&v_a, &u_a, 1), (&v_b, &u_b, 2), 2, 2);
        assert!((s[0] - 1.0).abs() < 1e-6);
        assert!(s[1].abs() < 1e-6, "orthogonal write directions");
        // A sign flip of both factors is the same matrix.
        let s = rank_one_similarity((&[-1.0, 0.0], &[-1.0, 0.0], 1), (&v_a, &u_a, 1), 2, 2);
        assert!((s[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_run_matches_itself_exactly() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.spdlab");
        std::fs::write(&f, crate::assets::default_decomposition()).unwrap();
        let c = compare_files(&f, &f).unwrap();
        for m in &c.modules {
            assert!(!m.pairs.is_empty());
            assert_eq!(m.n_probe, 5, "one probe per feature");
            assert_eq!(m.ci_a.len(), 5 * m.c_a);
            assert_eq!(m.ci_a, m.ci_b);
            for &(i, j, s) in &m.pairs {
                assert_eq!(i, j, "{}", m.name);
                assert!((s - 1.0).abs() < 1e-5);
            }
        }
    }
}
