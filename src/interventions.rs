//! Interventions: masked forward passes over a chosen selection of subcomponents, clusters or
//! layers (keep, ablate, CI-masked, stochastic), compared against the target and the full
//! decomposition; and the mechanism trace of one input (what fires, ordered by CI).
//!
//! No UI here: the CLI (`spdlab ablate`) and the app's interventions view both call
//! [`run_intervention`] and [`trace`].

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::cluster::ClusteringResult;
use crate::model::Fold;
use crate::rng::Rng;
use crate::spd::component_model::{ComponentModel, ModuleMask};

/// What a mask does to a subcomponent.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MaskMode {
    /// Mask 1: the subcomponent is used fully.
    #[default]
    Keep,
    /// Mask 0: the subcomponent is removed.
    Ablate,
    /// Mask g (the lower-leaky causal importance on this input).
    Ci,
    /// Mask g + (1 − g)·U(0,1), resampled every run (as in stochastic reconstruction).
    Stochastic,
    /// A fixed mask value (dial a mechanism from off (0) to fully on (1)).
    Scale(f32),
    /// The worst case: g + (1 − g)·s with s ∈ [0, 1] chosen adversarially (projected
    /// sign-gradient ascent on the output error against the target, as the reference's PGD
    /// reconstruction). For the *other* subcomponents only.
    Adversarial,
}

impl MaskMode {
    pub const ALL: [MaskMode; 4] = [
        MaskMode::Keep,
        MaskMode::Ablate,
        MaskMode::Ci,
        MaskMode::Stochastic,
    ];
    pub fn label(self) -> &'static str {
        match self {
            MaskMode::Keep => "keep (1)",
            MaskMode::Ablate => "ablate (0)",
            MaskMode::Ci => "CI-masked (g)",
            MaskMode::Stochastic => "stochastic (g+(1-g)U)",
            MaskMode::Scale(_) => "scaled (fixed value)",
            MaskMode::Adversarial => "adversarial (PGD worst case)",
        }
    }
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "keep" => MaskMode::Keep,
            "ablate" => MaskMode::Ablate,
            "ci" => MaskMode::Ci,
            "stochastic" => MaskMode::Stochastic,
            "adversarial" | "pgd" => MaskMode::Adversarial,
            _ => match s.strip_prefix("scale:").and_then(|v| v.parse::<f32>().ok()) {
                Some(v) if v.is_finite() => MaskMode::Scale(v),
                _ => anyhow::bail!(
                    "unknown mask mode '{s}' (keep, ablate, ci, stochastic, adversarial, scale:VALUE)"
                ),
            },
        })
    }
}

/// A selection: per decomposed module, which subcomponents are selected.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub selected: Vec<Vec<bool>>,
}

impl Selection {
    pub fn empty(model: &ComponentModel) -> Self {
        Selection {
            selected: model.modules.iter().map(|m| vec![false; m.c]).collect(),
        }
    }

    pub fn count(&self) -> usize {
        self.selected.iter().flatten().filter(|&&b| b).count()
    }

    /// Labels `module:index` of the selected subcomponents.
    pub fn labels(&self, model: &ComponentModel) -> Vec<String> {
        let mut out = vec![];
        for (j, m) in model.modules.iter().enumerate() {
            for (c, &s) in self.selected[j].iter().enumerate() {
                if s {
                    out.push(format!("{}:{c}", m.name));
                }
            }
        }
        out
    }

    /// Selects one `module:index` label (as stored by clustering).
    pub fn add_label(&mut self, model: &ComponentModel, label: &str) -> anyhow::Result<()> {
        let (name, idx) = label
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("'{label}' is not module:index"))?;
        let j = model
            .module_index(name)
            .ok_or_else(|| unknown_module(model, name))?;
        let c: usize = idx
            .parse()
            .map_err(|_| anyhow::anyhow!("'{label}': '{idx}' is not an index"))?;
        if c >= model.modules[j].c {
            anyhow::bail!(
                "'{label}': module {name} has {} subcomponents",
                model.modules[j].c
            );
        }
        self.selected[j][c] = true;
        Ok(())
    }

    /// Selects every member of a stored cluster.
    pub fn add_cluster(
        &mut self,
        model: &ComponentModel,
        clusters: &ClusteringResult,
        id: usize,
    ) -> anyhow::Result<()> {
        let c = clusters
            .clusters
            .iter()
            .find(|c| c.id == id)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no cluster {id} (the stored clustering has ids {})",
                    clusters
                        .clusters
                        .iter()
                        .map(|c| c.id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        for m in &c.members {
            self.add_label(model, m)?;
        }
        Ok(())
    }

    /// Parses a selection spec: comma- or space-separated items `module:index`,
    /// `module:a-b` (inclusive range), `module:*` (whole layer) or `cluster:id` (needs a stored
    /// clustering).
    pub fn parse(
        spec: &str,
        model: &ComponentModel,
        clusters: Option<&ClusteringResult>,
    ) -> anyhow::Result<Self> {
        let mut sel = Selection::empty(model);
        let items: Vec<&str> = spec
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            anyhow::bail!("empty selection");
        }
        for item in items {
            let (name, idx) = item.rsplit_once(':').ok_or_else(|| {
                anyhow::anyhow!("selection item '{item}': expected module:index, module:*, module:a-b or cluster:id")
            })?;
            if name == "cluster" && model.module_index("cluster").is_none() {
                let cl = clusters.ok_or_else(|| {
                    anyhow::anyhow!(
                        "selection item '{item}': the file has no stored clustering (run `spdlab cluster FILE --save FILE` first)"
                    )
                })?;
                let id: usize = idx
                    .parse()
                    .map_err(|_| anyhow::anyhow!("selection item '{item}': bad cluster id"))?;
                sel.add_cluster(model, cl, id)?;
                continue;
            }
            let j = model
                .module_index(name)
                .ok_or_else(|| unknown_module(model, name))?;
            let c = model.modules[j].c;
            let range = if idx == "*" {
                0..c
            } else if let Some((a, b)) = idx.split_once('-') {
                let a: usize = a
                    .parse()
                    .map_err(|_| anyhow::anyhow!("selection item '{item}': bad range"))?;
                let b: usize = b
                    .parse()
                    .map_err(|_| anyhow::anyhow!("selection item '{item}': bad range"))?;
                a..b + 1
            } else {
                let i: usize = idx
                    .parse()
                    .map_err(|_| anyhow::anyhow!("selection item '{item}': bad index"))?;
                i..i + 1
            };
            if range.end > c || range.is_empty() {
                anyhow::bail!("selection item '{item}': module {name} has subcomponents 0..{c}");
            }
            for i in range {
                sel.selected[j][i] = true;
            }
        }
        Ok(sel)
    }
}

fn unknown_module(model: &ComponentModel, name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "unknown module '{name}' (decomposed modules: {})",
        model
            .modules
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A full intervention.
#[derive(Clone, Debug)]
pub struct Intervention {
    pub selection: Selection,
    /// Mask of the selected subcomponents.
    pub selected_mode: MaskMode,
    /// Mask of every other subcomponent.
    pub other_mode: MaskMode,
    /// Keep the delta component (W_target − Σ subcomponents) at weight 1. Off by default: with
    /// it on, ablating subcomponents leaves their weights' *residual* in place.
    pub delta: bool,
}

impl Intervention {
    /// Ablate the selection, keep everything else, no delta component.
    pub fn ablate(selection: Selection) -> Self {
        Intervention {
            selection,
            selected_mode: MaskMode::Ablate,
            other_mode: MaskMode::Keep,
            delta: false,
        }
    }
}

/// Outputs and losses of one intervention on a set of inputs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterventionResult {
    pub inputs: Vec<Vec<f32>>,
    /// Outputs per row: per input, or for sequence models per position (row = input ·
    /// seq_len + position).
    pub target: Vec<Vec<f32>>,
    /// All subcomponents kept (delta component as chosen).
    pub full: Vec<Vec<f32>>,
    /// The baseline the change is measured against: every subcomponent, selected or not, in
    /// the *others* mode (with the same random draws). Equals `full` when others = keep.
    pub baseline: Vec<Vec<f32>>,
    pub intervened: Vec<Vec<f32>>,
    /// Error against the target output, per input: mean squared error, or for sequence
    /// models the mean over positions of KL(target ‖ output) in nats.
    pub loss_baseline: Vec<f32>,
    pub loss_intervened: Vec<f32>,
    /// loss_intervened − loss_baseline.
    pub loss_change: Vec<f32>,
    /// max |intervened − baseline| over outputs (and positions), per input.
    pub max_change: Vec<f32>,
    /// Per output feature: MSE against the target over the inputs (baseline, intervened).
    pub per_output_mse_baseline: Vec<f32>,
    pub per_output_mse_intervened: Vec<f32>,
    /// Per named feature (TMS / residual-MLP features) or class (days: per operation).
    pub per_feature: Vec<FeatureSummary>,
    /// Sequence models: per row (input · seq_len + position), the KL against the target and
    /// the top predictions. Empty for other models.
    #[serde(default)]
    pub positions: Vec<PositionOutcome>,
}

/// One position of a sequence under an intervention.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PositionOutcome {
    /// KL(target ‖ baseline) and KL(target ‖ intervened), nats.
    pub kl_baseline: f32,
    pub kl_intervened: f32,
    /// The three most likely next tokens with their probabilities.
    pub top_target: [(u32, f32); 3],
    pub top_baseline: [(u32, f32); 3],
    pub top_intervened: [(u32, f32); 3],
}

/// How one feature's (or class's) behaviour fares under the intervention.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FeatureSummary {
    pub name: String,
    /// Inputs that exercise it (feature active / inputs of the class).
    pub n_inputs: usize,
    /// "mse" (of this feature's output against the target, on inputs where it is active) or
    /// "accuracy" (answers equal to the target's).
    pub metric: String,
    pub baseline: f32,
    pub intervened: f32,
}

impl FeatureSummary {
    /// Accuracy dropped, or the error grew tenfold above a floor of 1e-4 (well above the
    /// reconstruction noise of a good decomposition).
    pub fn is_broken(&self) -> bool {
        match self.metric.as_str() {
            "accuracy" => self.intervened < self.baseline,
            _ => self.intervened > 10.0 * self.baseline.max(1e-4),
        }
    }
}

/// Index of the largest value (first on ties; 0 for an empty slice).
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Per-feature (or per-class) summaries of an intervention.
pub fn feature_summaries(
    spec: &crate::model::TargetSpec,
    inputs: &[Vec<f32>],
    target: &[Vec<f32>],
    baseline: &[Vec<f32>],
    intervened: &[Vec<f32>],
) -> Vec<FeatureSummary> {
    use crate::model::TargetSpec;
    match spec {
        TargetSpec::Ih(dims) => {
            // The induction position (the last, which must predict the token after the first
            // induction token): accuracy against that token. Every other position: agreement
            // of the top prediction with the target's.
            let s = dims.seq_len;
            let tokens = |i: usize| -> Vec<u32> { inputs[i].iter().map(|&v| v as u32).collect() };
            let answers: Vec<Option<u32>> = (0..inputs.len())
                .map(|i| crate::model::ih::induction_answer(&tokens(i), dims).map(|(_, m)| m))
                .collect();
            let ind: Vec<(usize, u32)> = answers
                .iter()
                .enumerate()
                .filter_map(|(i, a)| a.map(|m| (i * s + s - 1, m)))
                .collect();
            let mut out = vec![];
            if !ind.is_empty() {
                let acc = |o: &[Vec<f32>]| {
                    ind.iter()
                        .filter(|(r, m)| argmax(&o[*r]) == *m as usize)
                        .count() as f32
                        / ind.len() as f32
                };
                out.push(FeatureSummary {
                    name: "induction (last position)".into(),
                    n_inputs: ind.len(),
                    metric: "accuracy".into(),
                    baseline: acc(baseline),
                    intervened: acc(intervened),
                });
            }
            let others: Vec<usize> = (0..inputs.len())
                .flat_map(|i| i * s..i * s + s - 1)
                .filter(|&r| r < target.len())
                .collect();
            if !others.is_empty() {
                let agree = |o: &[Vec<f32>]| {
                    others
                        .iter()
                        .filter(|&&r| argmax(&o[r]) == argmax(&target[r]))
                        .count() as f32
                        / others.len() as f32
                };
                out.push(FeatureSummary {
                    name: "other positions (top-1 = target's)".into(),
                    n_inputs: others.len(),
                    metric: "accuracy".into(),
                    baseline: agree(baseline),
                    intervened: agree(intervened),
                });
            }
            out
        }
        TargetSpec::Days { n_days, n_ops } => {
            let mut out = vec![];
            for op in 0..*n_ops {
                let rows: Vec<usize> = (0..inputs.len())
                    .filter(|&i| {
                        crate::model::days::decode_input(*n_days, *n_ops, &inputs[i])
                            .is_some_and(|(_, o)| o == op)
                    })
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let acc = |o: &[Vec<f32>]| {
                    rows.iter()
                        .filter(|&&i| argmax(&o[i]) == argmax(&target[i]))
                        .count() as f32
                        / rows.len() as f32
                };
                out.push(FeatureSummary {
                    name: format!("op {}", crate::model::days::OP_NAMES[op]),
                    n_inputs: rows.len(),
                    metric: "accuracy".into(),
                    baseline: acc(baseline),
                    intervened: acc(intervened),
                });
            }
            out
        }
        _ => {
            let n_out = target.first().map_or(0, |t| t.len());
            (0..n_out.min(spec.n_features()))
                .filter_map(|k| {
                    let rows: Vec<usize> =
                        (0..inputs.len()).filter(|&i| inputs[i][k] != 0.0).collect();
                    if rows.is_empty() {
                        return None;
                    }
                    let mse = |o: &[Vec<f32>]| {
                        rows.iter()
                            .map(|&i| (o[i][k] - target[i][k]).powi(2))
                            .sum::<f32>()
                            / rows.len() as f32
                    };
                    Some(FeatureSummary {
                        name: format!("feature {k}"),
                        n_inputs: rows.len(),
                        metric: "mse".into(),
                        baseline: mse(baseline),
                        intervened: mse(intervened),
                    })
                })
                .collect()
        }
    }
}

impl InterventionResult {
    /// Input indices ordered by how much their output changed (largest first).
    /// Inputs by how much the intervention changes them, most first: by the growth of the
    /// mean KL against the target for sequence models, else by max |output change|.
    pub fn what_breaks(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.inputs.len()).collect();
        let key = if self.positions.is_empty() {
            &self.max_change
        } else {
            &self.loss_change
        };
        idx.sort_by(|&a, &b| key[b].total_cmp(&key[a]));
        idx
    }
}

/// Lower-leaky CI of every module on `x` (`[n, C]` each).
pub fn lower_ci(model: &ComponentModel, x: &Tensor) -> anyhow::Result<Vec<Tensor>> {
    let fold = Fold::new();
    let (_, inputs) = model.target.forward_with_inputs(x, &fold)?;
    let (ci, _) = model.causal_importances(&inputs, None, &fold)?;
    Ok(ci.into_iter().map(|c| c.lower).collect())
}

/// Outputs of the decomposition with `selection` ablated and every other subcomponent at its
/// CI (no delta): what [`run_intervention`] gives as `intervened` for that intervention,
/// computed with one CI pass and one masked forward.
pub fn ablated_outputs(
    model: &ComponentModel,
    x: &Tensor,
    selection: &Selection,
) -> anyhow::Result<Tensor> {
    let dev = model.device();
    let masks = lower_ci(model, x)?
        .into_iter()
        .zip(&selection.selected)
        .map(|(ci, sel)| -> anyhow::Result<Option<ModuleMask>> {
            let keep: Vec<f32> = sel.iter().map(|&s| if s { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::from_vec(keep, sel.len(), dev)?;
            Ok(Some(ModuleMask {
                mask: ci.broadcast_mul(&keep)?,
                delta: None,
                route: None,
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(model.forward_masked(x, &masks, &Fold::new())?)
}

fn mask_values(mode: MaskMode, g: f32, rng: &mut Rng) -> f32 {
    match mode {
        MaskMode::Keep => 1.0,
        MaskMode::Ablate => 0.0,
        MaskMode::Ci => g,
        MaskMode::Stochastic => g + (1.0 - g) * rng.uniform_f32(),
        MaskMode::Scale(v) => v,
        // The starting point of the ascent: a random point of [g, 1].
        MaskMode::Adversarial => g + (1.0 - g) * rng.uniform_f32(),
    }
}

/// Steps and step size of the adversarial (PGD) masks (the reference's PGDReconLoss eval
/// settings).
pub const PGD_STEPS: usize = 20;
pub const PGD_STEP_SIZE: f64 = 0.1;

/// Makes the masks of the entries where `free[j][c]` adversarial: g + (1 − g)·s, s ∈ [0, 1]
/// from `masks`' values, raised by projected sign-gradient ascent on the output error against
/// the target (KL summed over positions for sequence models, else squared error).
#[allow(clippy::too_many_arguments)]
fn adversarial_masks(
    model: &ComponentModel,
    xt: &Tensor,
    target_t: &Tensor,
    masks: &mut [Vec<f32>],
    ci: &[Vec<f32>],
    free: &[Vec<bool>],
    n: usize,
    delta: &Option<Tensor>,
) -> anyhow::Result<()> {
    let dev = model.device();
    let fold = Fold::new();
    let seq = model.target.spec.is_sequence();
    // s from the starting masks: m = g + (1 − g)·s.
    let mut src: Vec<Vec<f32>> = vec![];
    for (j, m) in model.modules.iter().enumerate() {
        src.push(
            (0..n * m.c)
                .map(|i| {
                    let g = ci[j][i];
                    if g < 1.0 {
                        ((masks[j][i] - g) / (1.0 - g)).clamp(0.0, 1.0)
                    } else {
                        0.0
                    }
                })
                .collect(),
        );
    }
    // Per module, constant over the ascent: the free entries (1) `[1, C]`, the held masks
    // (0 where free) `[n, C]`, g and 1 − g.
    let mut consts: Vec<(Tensor, Tensor, Tensor, Tensor)> = vec![];
    for (j, m) in model.modules.iter().enumerate() {
        let fr: Vec<f32> = free[j].iter().map(|&f| f as u8 as f32).collect();
        let fixed: Vec<f32> = (0..n * m.c)
            .map(|i| if free[j][i % m.c] { 0.0 } else { masks[j][i] })
            .collect();
        let g = Tensor::from_slice(&ci[j], (n, m.c), dev)?;
        consts.push((
            Tensor::from_vec(fr, (1, m.c), dev)?,
            Tensor::from_vec(fixed, (n, m.c), dev)?,
            (1.0 - &g)?,
            g,
        ));
    }
    let build = |src: &[Tensor]| -> candle_core::Result<Vec<Option<ModuleMask>>> {
        let mut out = vec![];
        for (j, (fr, fixed, one_minus_g, g)) in consts.iter().enumerate() {
            let adv = (g + one_minus_g.mul(&src[j])?)?;
            out.push(Some(ModuleMask {
                mask: (fixed + adv.broadcast_mul(fr)?)?,
                delta: delta.clone(),
                route: None,
            }));
        }
        Ok(out)
    };
    for _ in 0..PGD_STEPS {
        let vars: Vec<candle_core::Var> = model
            .modules
            .iter()
            .enumerate()
            .map(|(j, m)| candle_core::Var::from_slice(&src[j], (n, m.c), dev))
            .collect::<candle_core::Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = model.forward_masked(xt, &build(&ts)?, &fold)?;
        let loss = if seq {
            crate::spd::trainer::kl_rows(&out, target_t)?.sum_all()?
        } else {
            (out - target_t)?.sqr()?.sum_all()?
        };
        let grads = loss.backward()?;
        for (j, v) in vars.iter().enumerate() {
            let Some(gr) = grads.get(v.as_tensor()) else {
                continue;
            };
            let gr: Vec<f32> = gr.flatten_all()?.to_vec1()?;
            for (s, d) in src[j].iter_mut().zip(gr) {
                *s = (*s + PGD_STEP_SIZE as f32 * d.signum() * (d != 0.0) as u8 as f32)
                    .clamp(0.0, 1.0);
            }
        }
    }
    for (j, m) in model.modules.iter().enumerate() {
        for i in 0..n * m.c {
            if free[j][i % m.c] {
                let g = ci[j][i];
                masks[j][i] = g + (1.0 - g) * src[j][i];
            }
        }
    }
    Ok(())
}

/// Runs an intervention on inputs `x` (rows of n_features values).
pub fn run_intervention(
    model: &ComponentModel,
    x: &[Vec<f32>],
    iv: &Intervention,
    rng: &mut Rng,
) -> anyhow::Result<InterventionResult> {
    let n = x.len();
    let nf = model.target.spec.n_features();
    if n == 0 {
        anyhow::bail!("no inputs");
    }
    if let Some(bad) = x.iter().position(|r| r.len() != nf) {
        anyhow::bail!(
            "input {bad} has {} values, the model has {nf} features",
            x[bad].len()
        );
    }
    let dev = model.device();
    let xt = Tensor::from_vec(x.iter().flatten().copied().collect(), (n, nf), dev)?;
    let fold = Fold::new();
    let target_t = model.target.forward(&xt)?;
    // Rows of the decomposed modules: one per input, or per position of each sequence.
    let positions = model.target.spec.positions();
    let (n_in, n) = (n, n * positions);
    if iv.selected_mode == MaskMode::Adversarial {
        anyhow::bail!("adversarial masks are for the other subcomponents, not the selection");
    }
    let needs_ci = [iv.selected_mode, iv.other_mode].iter().any(|m| {
        matches!(
            m,
            MaskMode::Ci | MaskMode::Stochastic | MaskMode::Adversarial
        )
    });
    let ci: Option<Vec<Vec<f32>>> = if needs_ci {
        Some(
            lower_ci(model, &xt)?
                .iter()
                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                .collect::<candle_core::Result<_>>()?,
        )
    } else {
        None
    };
    let delta = if iv.delta {
        Some(Tensor::ones(n, candle_core::DType::F32, dev)?)
    } else {
        None
    };
    let mk = |v: Vec<f32>, c: usize| -> candle_core::Result<Option<ModuleMask>> {
        Ok(Some(ModuleMask {
            mask: Tensor::from_vec(v, (n, c), dev)?,
            delta: delta.clone(),
            route: None,
        }))
    };
    let (mut full_masks, mut base_masks, mut masks) = (vec![], vec![], vec![]);
    let (mut vs, mut bs) = (vec![], vec![]);
    for (j, m) in model.modules.iter().enumerate() {
        let mut v = vec![0f32; n * m.c];
        let mut b = vec![0f32; n * m.c];
        for r in 0..n {
            for c in 0..m.c {
                let g = ci.as_ref().map_or(1.0, |ci| ci[j][r * m.c + c]);
                let other = mask_values(iv.other_mode, g, rng);
                b[r * m.c + c] = other;
                v[r * m.c + c] = if iv.selection.selected[j][c] {
                    mask_values(iv.selected_mode, g, rng)
                } else {
                    other
                };
            }
        }
        vs.push(v);
        bs.push(b);
    }
    if iv.other_mode == MaskMode::Adversarial
        && let Some(ci) = ci.as_ref()
    {
        // The baseline's worst case over every subcomponent, the intervention's over the
        // others (the selection held at its mask).
        let all: Vec<Vec<bool>> = model.modules.iter().map(|m| vec![true; m.c]).collect();
        let others: Vec<Vec<bool>> = iv
            .selection
            .selected
            .iter()
            .map(|s| s.iter().map(|&x| !x).collect())
            .collect();
        adversarial_masks(model, &xt, &target_t, &mut bs, ci, &all, n, &delta)?;
        adversarial_masks(model, &xt, &target_t, &mut vs, ci, &others, n, &delta)?;
    }
    for (j, m) in model.modules.iter().enumerate() {
        masks.push(mk(std::mem::take(&mut vs[j]), m.c)?);
        base_masks.push(mk(std::mem::take(&mut bs[j]), m.c)?);
        full_masks.push(mk(vec![1.0; n * m.c], m.c)?);
    }
    let full_t = model.forward_masked(&xt, &full_masks, &fold)?;
    // With the others kept, the baseline is the full decomposition: no second pass.
    let base_t = if iv.other_mode == MaskMode::Keep {
        full_t.clone()
    } else {
        model.forward_masked(&xt, &base_masks, &fold)?
    };
    let int_t = model.forward_masked(&xt, &masks, &fold)?;
    let target: Vec<Vec<f32>> = target_t.to_vec2()?;
    let full: Vec<Vec<f32>> = full_t.to_vec2()?;
    let baseline: Vec<Vec<f32>> = base_t.to_vec2()?;
    let intervened: Vec<Vec<f32>> = int_t.to_vec2()?;
    // Error against the target per input: KL per position averaged over each sequence, or
    // the mean squared error of the row.
    let kl_rows = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(crate::spd::trainer::kl_rows(t, &target_t)?.to_vec1::<f32>()?)
    };
    let seq = model.target.spec.is_sequence();
    let (kl_base, kl_int) = if seq {
        (kl_rows(&base_t)?, kl_rows(&int_t)?)
    } else {
        (vec![], vec![])
    };
    let loss_of = |kl: &[f32], o: &[Vec<f32>]| -> anyhow::Result<Vec<f32>> {
        if seq {
            return Ok(kl
                .chunks(positions)
                .map(|c| c.iter().sum::<f32>() / positions as f32)
                .collect());
        }
        Ok(o.iter()
            .zip(&target)
            .map(|(a, b)| {
                a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum::<f32>() / a.len().max(1) as f32
            })
            .collect())
    };
    let loss_baseline = loss_of(&kl_base, &baseline)?;
    let loss_intervened = loss_of(&kl_int, &intervened)?;
    let top3 = crate::sequence::top3;
    let positions_out: Vec<PositionOutcome> = (0..kl_base.len())
        .map(|r| PositionOutcome {
            kl_baseline: kl_base[r],
            kl_intervened: kl_int[r],
            top_target: top3(&target[r]),
            top_baseline: top3(&baseline[r]),
            top_intervened: top3(&intervened[r]),
        })
        .collect();
    let n_out = target[0].len();
    let per_out = |o: &Vec<Vec<f32>>| -> Vec<f32> {
        (0..n_out)
            .map(|k| {
                (0..n)
                    .map(|i| (o[i][k] - target[i][k]).powi(2))
                    .sum::<f32>()
                    / n as f32
            })
            .collect()
    };
    Ok(InterventionResult {
        inputs: x.to_vec(),
        loss_change: loss_intervened
            .iter()
            .zip(&loss_baseline)
            .map(|(a, b)| a - b)
            .collect(),
        max_change: (0..n_in)
            .map(|i| {
                (i * positions..(i + 1) * positions)
                    .flat_map(|r| intervened[r].iter().zip(&baseline[r]))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max)
            })
            .collect(),
        per_feature: feature_summaries(&model.target.spec, x, &target, &baseline, &intervened),
        per_output_mse_baseline: per_out(&baseline),
        per_output_mse_intervened: per_out(&intervened),
        positions: positions_out,
        loss_baseline,
        loss_intervened,
        target,
        full,
        baseline,
        intervened,
    })
}

/// One line of a mechanism trace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TraceEntry {
    pub label: String,
    pub module: usize,
    pub index: usize,
    pub ci: f32,
    pub cluster: Option<usize>,
    /// |inner activation| · ‖U_c‖: the size of what the subcomponent writes on this input.
    pub contribution: f32,
    /// Sequence models: the position of the largest CI (where `ci` and `contribution` are
    /// taken).
    #[serde(default)]
    pub position: Option<usize>,
}

/// What the network uses on one input: subcomponents with CI ≥ threshold (by CI, descending),
/// and the clusters they belong to with the cluster's max CI.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Trace {
    pub entries: Vec<TraceEntry>,
    /// (cluster id, max CI of its members, members firing) ordered by max CI.
    pub clusters: Vec<(usize, f32, usize)>,
}

pub fn trace(
    model: &ComponentModel,
    x: &[f32],
    threshold: f32,
    clusters: Option<&ClusteringResult>,
) -> anyhow::Result<Trace> {
    let nf = model.target.spec.n_features();
    if x.len() != nf {
        anyhow::bail!("input has {} values, the model has {nf} features", x.len());
    }
    let xt = Tensor::from_vec(x.to_vec(), (1, nf), model.device())?;
    let fold = Fold::new();
    let (_, inputs) = model.target.forward_with_inputs(&xt, &fold)?;
    let (ci, acts) = model.causal_importances(&inputs, None, &fold)?;
    let mut entries = vec![];
    // Sequence models: one row per position; each subcomponent is reported at the position
    // where its CI is largest.
    let positions = model.target.spec.positions();
    for (j, m) in model.modules.iter().enumerate() {
        let g = ci[j].lower.flatten_all()?.to_vec1::<f32>()?;
        let a = acts[j].flatten_all()?.to_vec1::<f32>()?;
        let u_norm = m.u.as_tensor().sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        for c in 0..m.c {
            let pos = (0..positions)
                .max_by(|&p, &q| g[p * m.c + c].total_cmp(&g[q * m.c + c]))
                .unwrap_or(0);
            let (gc, ac) = (g[pos * m.c + c], a[pos * m.c + c]);
            if gc >= threshold {
                let label = format!("{}:{c}", m.name);
                entries.push(TraceEntry {
                    cluster: clusters.and_then(|cl| cl.assignment.get(&label).copied()),
                    label,
                    module: j,
                    index: c,
                    ci: gc,
                    contribution: ac.abs() * u_norm[c],
                    position: (positions > 1).then_some(pos),
                });
            }
        }
    }
    entries.sort_by(|a, b| b.ci.total_cmp(&a.ci));
    let mut by_cluster: BTreeMap<usize, (f32, usize)> = BTreeMap::new();
    for e in &entries {
        if let Some(id) = e.cluster {
            let s = by_cluster.entry(id).or_insert((0.0, 0));
            s.0 = s.0.max(e.ci);
            s.1 += 1;
        }
    }
    let mut cl: Vec<(usize, f32, usize)> = by_cluster
        .into_iter()
        .map(|(id, (g, k))| (id, g, k))
        .collect();
    cl.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(Trace {
        entries,
        clusters: cl,
    })
}

/// The clustering stored in a file's extras, if any.
pub fn stored_clusters(
    extra: &serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<Option<ClusteringResult>> {
    match extra.get("clusters") {
        None => Ok(None),
        Some(v) => Ok(Some(serde_json::from_value(v.clone()).map_err(|e| {
            anyhow::anyhow!("the stored clustering cannot be read: {e}")
        })?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{TargetModel, TargetSpec};
    use crate::spd::config::SpdConfig;
    use candle_core::Device;

    fn tiny() -> anyhow::Result<ComponentModel> {
        let dev = Device::Cpu;
        let spec = TargetSpec::Tms {
            n_features: 3,
            n_hidden: 2,
            n_hidden_layers: 0,
            tied_weights: true,
        };
        let mut rng = Rng::new(0);
        let target = TargetModel::init_random(&spec, &mut rng, true, &dev)?;
        let mut cfg: SpdConfig = crate::presets::spd_config("tms-5-2")?;
        cfg.module_info[0].c = 4;
        cfg.module_info[1].c = 4;
        ComponentModel::new(target, &cfg, &mut rng)
    }

    #[test]
    fn parse_selection_forms() -> anyhow::Result<()> {
        let m = tiny()?;
        let s = Selection::parse("linear1:1, linear2:0-2 linear1:3", &m, None)?;
        assert_eq!(
            s.labels(&m),
            vec![
                "linear1:1",
                "linear1:3",
                "linear2:0",
                "linear2:1",
                "linear2:2"
            ]
        );
        assert_eq!(Selection::parse("linear2:*", &m, None)?.count(), 4);
        for bad in [
            "",
            "linear3:0",
            "linear1:9",
            "linear1:x",
            "cluster:0",
            "linear1",
        ] {
            assert!(Selection::parse(bad, &m, None).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn keep_equals_full_and_delta_restores_target() -> anyhow::Result<()> {
        let m = tiny()?;
        let x = vec![vec![0.5, 0.0, 0.2], vec![0.0, 0.9, 0.0]];
        let mut rng = Rng::new(1);
        let sel = Selection::parse("linear1:0", &m, None)?;
        let keep = Intervention {
            selected_mode: MaskMode::Keep,
            ..Intervention::ablate(sel.clone())
        };
        let r = run_intervention(&m, &x, &keep, &mut rng)?;
        assert_eq!(r.full, r.intervened);
        assert_eq!(r.full, r.baseline);
        assert!(r.max_change.iter().all(|&v| v == 0.0));
        // With the delta component and nothing ablated the output is the target's.
        let r = run_intervention(
            &m,
            &x,
            &Intervention {
                delta: true,
                ..keep
            },
            &mut rng,
        )?;
        for (a, b) in r.full.iter().flatten().zip(r.target.iter().flatten()) {
            assert!((a - b).abs() < 1e-5);
        }
        // Ablating everything with the delta on leaves exactly the residual W − Σ U V.
        let all = Selection::parse("linear1:*,linear2:*", &m, None)?;
        let r = run_intervention(
            &m,
            &x,
            &Intervention {
                delta: true,
                ..Intervention::ablate(all)
            },
            &mut rng,
        )?;
        assert!(r.loss_change.iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn ablating_a_layer_matches_hand_computation() -> anyhow::Result<()> {
        // Ablating all of linear1 (no delta) makes the hidden state 0: out = ReLU(b).
        let m = tiny()?;
        let x = vec![vec![0.3, 0.7, 0.1]];
        let r = run_intervention(
            &m,
            &x,
            &Intervention::ablate(Selection::parse("linear1:*", &m, None)?),
            &mut Rng::new(0),
        )?;
        let b = m.target.param("linear2.bias").to_vec1::<f32>()?;
        for (o, bb) in r.intervened[0].iter().zip(&b) {
            assert!((o - bb.max(0.0)).abs() < 1e-6);
        }
        Ok(())
    }
}
