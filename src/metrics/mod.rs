//! Evaluation of a decomposition: losses on fresh data, L0, CI statistics, single-feature CI
//! matrices, target-solution error, MMCS / ML2R.

pub mod days;
pub mod toy_metrics;

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::spd::component_model::ComponentModel;
use crate::spd::config::{SpdConfig, fnmatch};
use crate::spd::trainer::Trainer;

/// Per-module single-feature CI: inputs value·I, lower-leaky CI `[n_features, C]` row-major.
pub fn single_feature_ci(model: &ComponentModel, value: f32) -> Result<Vec<Vec<f32>>> {
    let nf = model.target.spec.n_features();
    let mut x = vec![0f32; nf * nf];
    for i in 0..nf {
        x[i * nf + i] = value;
    }
    let x = Tensor::from_vec(x, (nf, nf), model.device())?;
    let fold = crate::model::Fold::new();
    let (_, inputs) = model.target.forward_with_inputs(&x, &fold)?;
    let (ci, _) = model.causal_importances(&inputs, None, &fold)?;
    ci.iter()
        .map(|c| c.lower.flatten_all()?.to_vec1::<f32>())
        .collect()
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TargetSolutionError {
    /// Σ over matched modules at tolerance 0.1.
    pub total: usize,
    /// Σ at tolerance 0.2.
    pub total_0p2: usize,
    pub per_module: BTreeMap<String, usize>,
}

/// The reference's IdentityCIError on single-feature inputs (0.75·I).
pub fn target_solution_error(
    model: &ComponentModel,
    cfg: &SpdConfig,
) -> Result<Option<TargetSolutionError>> {
    if cfg.identity_ci.is_empty() && cfg.dense_ci.is_empty() {
        return Ok(None);
    }
    let mats = single_feature_ci(model, 0.75)?;
    let nf = model.target.spec.n_features();
    let mut out = TargetSolutionError::default();
    for (j, m) in model.modules.iter().enumerate() {
        // First matching pattern wins; identity patterns are checked before dense ones.
        let mut err = None;
        if let Some(p) = cfg
            .identity_ci
            .iter()
            .find(|p| fnmatch(&p.layer_pattern, &m.name))
        {
            let _ = p.n_features;
            err = Some((
                toy_metrics::identity_ci_error(&mats[j], nf, m.c, 0.1),
                toy_metrics::identity_ci_error(&mats[j], nf, m.c, 0.2),
            ));
        } else if let Some(p) = cfg
            .dense_ci
            .iter()
            .find(|p| fnmatch(&p.layer_pattern, &m.name))
        {
            err = Some((
                toy_metrics::dense_ci_error(&mats[j], nf, m.c, p.k, 0.1),
                toy_metrics::dense_ci_error(&mats[j], nf, m.c, p.k, 0.2),
            ));
        }
        if let Some((e1, e2)) = err {
            out.total += e1;
            out.total_0p2 += e2;
            out.per_module.insert(m.name.clone(), e1);
        }
    }
    Ok(Some(out))
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MmcsReport {
    pub mmcs: f64,
    pub ml2r: f64,
    pub ml2r_std: f64,
}

/// MMCS / ML2R of each decomposed matrix against the target's columns in the feature basis.
///
/// For a module whose input space is the feature space (TMS `linear1`) the columns of W are
/// compared directly; for one whose output space is the feature space (TMS `linear2`) the rows;
/// for hidden maps (identity layers, residual MLP) the columns of W (input directions).
pub fn mmcs_ml2r(model: &ComponentModel) -> Result<BTreeMap<String, MmcsReport>> {
    let nf = model.target.spec.n_features();
    let mut out = BTreeMap::new();
    for m in &model.modules {
        let tm = &model.target.modules[m.target_idx];
        let v = m.v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let u = m.u.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let w = tm.weight.flatten_all()?.to_vec1::<f32>()?;
        let r = if m.d_out == nf && m.d_in != nf {
            toy_metrics::mmcs_rows(&v, &u, &w, m.d_in, m.c, m.d_out)
        } else {
            toy_metrics::mmcs(&v, &u, &w, m.d_in, m.c, m.d_out)
        };
        out.insert(
            m.name.clone(),
            MmcsReport {
                mmcs: r.mmcs,
                ml2r: r.ml2r,
                ml2r_std: r.ml2r_std,
            },
        );
    }
    Ok(out)
}

/// How one module's subcomponents answer single-feature inputs (value 0.75, lower-leaky CI
/// above 0.5 = "fires"): the regime of a decomposition on models with named features (the
/// SPD paper's Fig. 8 reads resid-mlp-1 this way).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FeatureResponse {
    /// Subcomponents that fire on exactly one feature.
    pub monosemantic: usize,
    /// Features that have at least one monosemantic subcomponent.
    pub features_covered: usize,
    /// Subcomponents that fire on two or more features (a block shared across features).
    pub shared: usize,
    /// Subcomponents that fire on no single feature.
    pub silent: usize,
}

/// [`FeatureResponse`] per module, for TMS and residual-MLP targets (None for others).
pub fn feature_response(
    model: &ComponentModel,
) -> Result<Option<BTreeMap<String, FeatureResponse>>> {
    use crate::model::TargetSpec;
    if !matches!(
        model.target.spec,
        TargetSpec::Tms { .. } | TargetSpec::ResidMlp { .. }
    ) {
        return Ok(None);
    }
    let nf = model.target.spec.n_features();
    let mats = single_feature_ci(model, 0.75)?;
    let mut out = BTreeMap::new();
    for (j, m) in model.modules.iter().enumerate() {
        let fires = |f: usize, c: usize| mats[j][f * m.c + c] > 0.5;
        let mut r = FeatureResponse::default();
        let mut covered = vec![false; nf];
        for c in 0..m.c {
            let on: Vec<usize> = (0..nf).filter(|&f| fires(f, c)).collect();
            match on.len() {
                0 => r.silent += 1,
                1 => {
                    r.monosemantic += 1;
                    covered[on[0]] = true;
                }
                _ => r.shared += 1,
            }
        }
        r.features_covered = covered.iter().filter(|&&b| b).count();
        out.insert(m.name.clone(), r);
    }
    Ok(Some(out))
}

/// Everything `spdlab eval` reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalReport {
    pub losses: BTreeMap<String, f64>,
    pub l0: BTreeMap<String, f64>,
    pub mmcs: BTreeMap<String, f64>,
    pub ml2r: BTreeMap<String, f64>,
    pub target_solution_error: Option<TargetSolutionError>,
    /// TMS and residual-MLP targets: how each module answers single features.
    #[serde(default)]
    pub feature_response: Option<BTreeMap<String, FeatureResponse>>,
    /// Alive subcomponents per module (mean CI > 0 activation density above 0.001).
    pub alive: BTreeMap<String, usize>,
    pub mean_ci_per_component: BTreeMap<String, Vec<f64>>,
    pub activation_density: BTreeMap<String, Vec<f64>>,
    /// Language models: the reference's `CEandKLLosses` keys (mean over the eval batches;
    /// see [`ce_and_kl_losses`]), plus `ce_target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_kl: Option<BTreeMap<String, f64>>,
}

/// Evaluates on `n_batches` fresh batches (uses and advances the trainer's RNG; no updates).
pub fn evaluate(
    tr: &mut Trainer,
    n_batches: usize,
    batch_size: usize,
) -> anyhow::Result<EvalReport> {
    let mut rep = EvalReport::default();
    let n_batches = n_batches.max(1);
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut l0s: BTreeMap<String, f64> = BTreeMap::new();
    let nmod = tr.model.modules.len();
    let mut ci_sum: Vec<Vec<f64>> = tr.model.modules.iter().map(|m| vec![0.0; m.c]).collect();
    let mut dens: Vec<Vec<f64>> = ci_sum.clone();
    let mut rows_total = 0f64;
    let thr = tr.config.ci_alive_threshold;
    let is_lm = matches!(tr.model.target.spec, crate::model::TargetSpec::Lm { .. });
    let mut ce_kl: BTreeMap<String, f64> = BTreeMap::new();
    for _ in 0..n_batches {
        let batch = tr.draw_batch(batch_size)?;
        if is_lm {
            let s = tr.model.target.spec.positions();
            let x = batch.x.reshape((batch.x.elem_count() / s, s))?;
            let mut rng = tr.rng.fork(0xce);
            let use_delta = tr.config.use_delta_component;
            for (k, v) in ce_and_kl_losses(&tr.model, &x, 0.0, use_delta, &mut rng)? {
                *ce_kl.entry(k).or_default() += v / n_batches as f64;
            }
        }
        let (_, rec, ci) = tr.losses_and_ci(&batch, false)?;
        for (k, v) in rec.losses {
            *sums.entry(k).or_default() += v;
        }
        for (k, v) in rec.l0 {
            *l0s.entry(k).or_default() += v;
        }
        // CI statistics (weighted by the folded zero rows), from the same CI as the losses.
        let w = batch.weights.unsqueeze(0)?;
        for j in 0..nmod {
            let s = w.matmul(&ci[j].lower)?.flatten_all()?.to_vec1::<f32>()?;
            let d = w
                .matmul(&ci[j].lower.gt(thr)?.to_dtype(DType::F32)?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for c in 0..s.len() {
                ci_sum[j][c] += s[c] as f64;
                dens[j][c] += d[c] as f64;
            }
        }
        rows_total += batch.n_rows as f64;
    }
    rep.losses = sums
        .into_iter()
        .map(|(k, v)| (k, v / n_batches as f64))
        .collect();
    rep.l0 = l0s
        .into_iter()
        .map(|(k, v)| (k, v / n_batches as f64))
        .collect();
    for (j, m) in tr.model.modules.iter().enumerate() {
        let mean: Vec<f64> = ci_sum[j].iter().map(|s| s / rows_total).collect();
        let den: Vec<f64> = dens[j].iter().map(|s| s / rows_total).collect();
        rep.alive
            .insert(m.name.clone(), den.iter().filter(|&&d| d > 0.001).count());
        rep.mean_ci_per_component.insert(m.name.clone(), mean);
        rep.activation_density.insert(m.name.clone(), den);
    }
    for (k, r) in mmcs_ml2r(&tr.model)? {
        rep.mmcs.insert(k.clone(), r.mmcs);
        rep.ml2r.insert(k, r.ml2r);
    }
    rep.target_solution_error = target_solution_error(&tr.model, &tr.config)?;
    if is_lm {
        rep.ce_kl = Some(ce_kl);
    }
    rep.feature_response = feature_response(&tr.model)?;
    Ok(rep)
}

/// The reference's `CEandKLLosses` eval metric for a language model on token rows `x [b, s]`:
/// KL(target ‖ masked) per position (mean), next-token cross-entropy within each sequence
/// (the first token of a sequence is never a label), its difference from the target's, and
/// the fraction of the target-to-zero-masks CE gap left ("unrecovered"), for the masks: CI
/// (lower-leaky), unmasked (all 1), stochastic (the training's masks, delta component as the
/// config says), random (uniform), rounded (CI > `rounding_threshold`) and zero. No delta
/// component except in the stochastic masks, as the reference. The stochastic and random
/// keys use spdlab's random numbers (not the reference's draws).
pub fn ce_and_kl_losses(
    model: &ComponentModel,
    x: &Tensor,
    rounding_threshold: f32,
    use_delta: bool,
    rng: &mut crate::rng::Rng,
) -> Result<BTreeMap<String, f64>> {
    use crate::spd::component_model::ModuleMask;
    let (b, s) = x.dims2()?;
    let fold = crate::model::Fold::new();
    let (target, inputs) = model.target.forward_with_inputs(x, &fold)?;
    let (ci, _) = model.causal_importances(&inputs, None, &fold)?;
    let ids: Vec<u32> = x
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|&v| v as u32)
        .collect();
    // Next-token CE: position p of a sequence predicts token p + 1 of the same sequence.
    let ce = |logits: &Tensor| -> Result<f64> {
        let lp = crate::model::ih::log_softmax_last(logits)?.to_vec2::<f32>()?;
        let mut sum = 0f64;
        for i in 0..b {
            for p in 0..s.saturating_sub(1) {
                sum -= lp[i * s + p][ids[i * s + p + 1] as usize] as f64;
            }
        }
        Ok(sum / (b * s.saturating_sub(1)).max(1) as f64)
    };
    let kl = |logits: &Tensor| -> Result<f64> {
        Ok(crate::spd::trainer::kl_rows(logits, &target)?
            .mean_all()?
            .to_scalar::<f32>()? as f64)
    };
    let with = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<Vec<Option<ModuleMask>>> {
        ci.iter()
            .map(|c| {
                Ok(Some(ModuleMask {
                    mask: f(&c.lower)?,
                    delta: None,
                    route: None,
                }))
            })
            .collect()
    };
    let mut uniform = |t: &Tensor| -> Result<Tensor> {
        let n = t.elem_count();
        Tensor::from_vec(rng.uniform_rows(1, n), t.dims(), t.device())
    };
    let random: Vec<Tensor> = ci
        .iter()
        .map(|c| uniform(&c.lower))
        .collect::<Result<_>>()?;
    let stoch = model.sample_masks(&ci, rng, use_delta)?;
    let mut logits: Vec<(&str, Tensor)> = vec![];
    logits.push((
        "ci_masked",
        model.forward_masked(x, &crate::spd::trainer::ci_masks(&ci), &fold)?,
    ));
    logits.push((
        "unmasked",
        model.forward_masked(x, &with(&|t| t.ones_like())?, &fold)?,
    ));
    logits.push(("stoch_masked", model.forward_masked(x, &stoch, &fold)?));
    let rand_masks: Vec<Option<ModuleMask>> = random
        .into_iter()
        .map(|m| {
            Some(ModuleMask {
                mask: m,
                delta: None,
                route: None,
            })
        })
        .collect();
    logits.push((
        "random_masked",
        model.forward_masked(x, &rand_masks, &fold)?,
    ));
    logits.push((
        "rounded_masked",
        model.forward_masked(
            x,
            &with(&|t| t.gt(rounding_threshold as f64)?.to_dtype(DType::F32))?,
            &fold,
        )?,
    ));
    let zero = model.forward_masked(x, &with(&|t| t.zeros_like())?, &fold)?;
    let ce_target = ce(&target)?;
    let ce_zero = ce(&zero)?;
    let mut out = BTreeMap::new();
    for (name, l) in &logits {
        let c = ce(l)?;
        out.insert(format!("kl_{name}"), kl(l)?);
        out.insert(format!("ce_difference_{name}"), c - ce_target);
        out.insert(
            format!("ce_unrecovered_{name}"),
            (c - ce_target) / (ce_zero - ce_target),
        );
    }
    out.insert("kl_zero_masked".into(), kl(&zero)?);
    out.insert("ce_target".into(), ce_target);
    Ok(out)
}
