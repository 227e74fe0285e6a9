//! SPD training: one `step()` at a time (no I/O, no threads), as the reference's `optimize()`.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adam::{Adam, AdamEntry, clip_grad_norm};
use super::component_model::{CiOutput, ComponentModel, ModuleMask};
use super::config::{
    LossConfig, LossKind, MaskScope, OutputLossType, PgdConfig, PgdInit, Routing, SpdConfig,
};
use super::schedule::scheduled_value;
use crate::data::{InductionData, SparseFeatureData, TaskData};
use crate::rng::Rng;

/// A batch prepared for SPD: all-zero rows folded into one weighted row when that is exact.
pub struct Batch {
    /// `[n, n_features]`.
    pub x: Tensor,
    /// `[n]` row weights (1, or the number of zero rows the last row stands for).
    pub weights: Tensor,
    /// Number of rows of the original batch.
    pub n_rows: usize,
}

/// Metrics of one training step.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub lr: f64,
    /// Raw (unweighted) value of every loss term, and `total` (weighted sum).
    pub losses: BTreeMap<String, f64>,
    /// L0 per layer at `ci_alive_threshold`.
    pub l0: BTreeMap<String, f64>,
}

pub struct Trainer {
    pub model: ComponentModel,
    pub config: SpdConfig,
    pub data: TaskData,
    pub rng: Rng,
    pub opt: Adam,
    /// Next step to run (0-based); training is done when `step > config.steps`.
    pub step: usize,
    pub history: Vec<StepRecord>,
    /// Row shards (threads) the last training step ran as.
    pub last_shards: usize,
    /// Frames kept while training (see [`crate::timeline`]); none unless enabled.
    pub timeline: Option<crate::timeline::Timeline>,
    compact_zero_rows: bool,
}

impl Trainer {
    /// A new run: builds the decomposition from `target` with the config's seed.
    pub fn new(target: crate::model::TargetModel, config: SpdConfig) -> anyhow::Result<Self> {
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
        let mut rng = Rng::new(config.seed);
        let model = ComponentModel::new(target, &config, &mut rng)?;
        let mut tr = Self::from_model(model, config, rng)?;
        tr.load_text();
        Ok(tr)
    }

    /// Wraps an existing decomposition (e.g. loaded from a file) for further training.
    pub fn from_model(model: ComponentModel, config: SpdConfig, rng: Rng) -> anyhow::Result<Self> {
        let spec = &model.target.spec;
        let data = match spec {
            // The text is read by `load_text` (new runs, opened files), not here: frames and
            // other copies of a run share the run's text.
            crate::model::TargetSpec::Lm { model, seq_len } => {
                TaskData::Tokens(crate::data::TokenData::random(*seq_len, model.vocab_size))
            }
            crate::model::TargetSpec::Ih(dims) => TaskData::Induction(
                InductionData::new(dims, config.task_config.prefix_window)
                    .map_err(|e| anyhow::anyhow!("task_config: {e}"))?,
            ),
            _ => TaskData::Sparse(SparseFeatureData {
                n_features: spec.n_features(),
                feature_probability: config.task_config.feature_probability as f32,
                kind: config.task_config.data_generation_type,
                value_range: config.task_config.value_range.unwrap_or(spec.value_range()),
                groups: spec.input_groups(),
            }),
        };
        let compact_zero_rows = model.target.zero_input_is_inert()?;
        let opt = Adam::new(main_entries(&model));
        Ok(Trainer {
            model,
            config,
            data,
            rng,
            opt,
            step: 0,
            history: vec![],
            last_shards: 1,
            timeline: None,
            compact_zero_rows,
        })
    }

    pub fn is_done(&self) -> bool {
        self.step > self.config.steps
    }

    /// Language models: the config's text (`task_config.dataset_name`, `tokenizer_name`)
    /// as the batches, or random tokens saying why. Nothing for other targets.
    pub fn load_text(&mut self) {
        if let crate::model::TargetSpec::Lm { model, seq_len } = &self.model.target.spec {
            let (s, v) = (*seq_len, model.vocab_size);
            let d = crate::text::config_corpus(&self.config, s, v).unwrap_or_else(|why| {
                let mut d = crate::data::TokenData::random(s, v);
                d.source = format!("uniformly random tokens ({why})");
                d
            });
            self.data = TaskData::Tokens(d);
        }
    }

    /// Keeps a timeline with these options from now on (frames already taken stay, thinned
    /// to the new bound); `max_frames` 0 drops it.
    pub fn set_timeline(&mut self, options: crate::timeline::TimelineOptions) {
        if options.max_frames == 0 {
            self.timeline = None;
            return;
        }
        let steps = self.config.steps;
        match self.timeline.as_mut() {
            Some(t) => t.set_options(options, steps),
            None => {
                self.timeline = Some(crate::timeline::Timeline::new(options, &self.model, steps))
            }
        }
    }

    /// Adds a timeline frame at the current step when one is due (or, with `now`, always).
    pub fn capture_frame(&mut self, now: bool) -> anyhow::Result<()> {
        if let Some(mut t) = self.timeline.take() {
            let r = if now || t.due(self.step) {
                t.capture(self)
            } else {
                Ok(())
            };
            self.timeline = Some(t);
            r?;
        }
        Ok(())
    }

    /// The reference's faithfulness warm-up: AdamW on U, V only, loss = mean ΔW².
    pub fn faithfulness_warmup(&mut self) -> Result<f64> {
        let n = self.config.faithfulness_warmup_steps;
        let mut last = f64::NAN;
        if n == 0 {
            return Ok(last);
        }
        let wd = self.config.faithfulness_warmup_weight_decay;
        let mut opt = Adam::new(component_entries(&self.model, wd));
        for _ in 0..n {
            let loss = self.faithfulness_loss()?;
            last = loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            opt.step(&grads, self.config.faithfulness_warmup_lr)?;
            self.model.sync_tied()?;
        }
        Ok(last)
    }

    /// Σ_l ‖ΔW_l‖² / Σ_l numel(ΔW_l).
    pub fn faithfulness_loss(&self) -> Result<Tensor> {
        faithfulness_loss(&self.model)
    }

    /// Draws a training batch (all-zero rows folded when exact).
    pub fn draw_batch(&mut self, b: usize) -> Result<Batch> {
        let raw = self.data.batch(&mut self.rng, b);
        if self.model.target.spec.is_sequence() {
            return sequence_batch(&raw, b, self.data.n_features(), self.model.device());
        }
        make_batch(
            &raw,
            b,
            self.data.n_features(),
            self.compact_zero_rows,
            self.model.device(),
        )
    }

    /// One training step (the reference's loop body): losses, backward, clip, Adam. The last
    /// iteration (step == steps) computes and logs but applies no update.
    pub fn step(&mut self) -> anyhow::Result<StepRecord> {
        self.capture_frame(false)?;
        let steps = self.config.steps;
        let lr = scheduled_value(self.step, steps, &self.config.lr_schedule);
        let batch = self.draw_batch(self.config.batch_size)?;
        let update = self.step < steps;
        let shards = self.shard_count(&batch);
        self.last_shards = shards;
        let (mut rec, grads) = if shards > 1 {
            self.sharded_losses(&batch, shards, update)?
        } else {
            let (total, rec) = self.losses_on(&batch, true)?;
            let grads = if update && rec.losses["total"].is_finite() {
                Some(total.backward()?)
            } else {
                None
            };
            (rec, grads)
        };
        rec.step = self.step;
        rec.lr = lr;
        if !rec.losses["total"].is_finite() {
            anyhow::bail!(
                "loss became non-finite at step {} ({})",
                self.step,
                rec.losses
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(mut grads) = grads {
            if let Some(maxn) = self.config.grad_clip_norm_components {
                clip_grad_norm(&mut grads, &self.model.component_vars(), maxn)?;
            }
            if let Some(maxn) = self.config.grad_clip_norm_ci_fns {
                clip_grad_norm(&mut grads, &self.model.ci_vars(), maxn)?;
            }
            self.opt.step_parallel(&grads, lr, shards)?;
            self.model.sync_tied()?;
        }
        // History at the log frequency (as the reference logs), plus the last step.
        if self.step.is_multiple_of(self.config.train_log_freq.max(1)) || self.step == steps {
            self.history.push(rec.clone());
        }
        self.step += 1;
        if self.is_done() {
            self.capture_frame(true)?;
        }
        Ok(rec)
    }

    /// Every configured loss on a batch. Returns the weighted total (with graph when
    /// `for_training`) and the raw values, plus L0 per layer.
    pub fn losses_on(&mut self, batch: &Batch, for_training: bool) -> Result<(Tensor, StepRecord)> {
        self.losses_and_ci(batch, for_training)
            .map(|(t, r, _)| (t, r))
    }

    /// As [`Trainer::losses_on`], also returning the causal importances it computed.
    pub fn losses_and_ci(
        &mut self,
        batch: &Batch,
        for_training: bool,
    ) -> Result<(Tensor, StepRecord, Vec<CiOutput>)> {
        losses_and_ci(
            &self.model,
            &self.config,
            self.step,
            batch,
            &mut self.rng,
            for_training,
            true,
        )
    }

    /// Number of row shards a training step on `batch` runs as (threads that each compute
    /// their rows' losses and gradients, summed once per step): the configured thread count
    /// ([`crate::parallel::threads`]), at most one shard per [`MIN_SHARD_ROWS`] rows, and 1
    /// where a loss couples the rows of a batch (PGD masks shared across the batch, the
    /// minimality loss's β term).
    pub fn shard_count(&self, batch: &Batch) -> usize {
        let coupled = self
            .config
            .loss_metric_configs
            .iter()
            .any(|l| match &l.kind {
                LossKind::PgdReconLoss { pgd, .. } | LossKind::PgdReconSubsetLoss { pgd, .. } => {
                    pgd.mask_scope == MaskScope::SharedAcrossBatch
                }
                LossKind::ImportanceMinimalityLoss { beta, .. } => *beta != 0.0,
                _ => false,
            });
        if coupled || !self.model.device().is_cpu() {
            return 1;
        }
        // Sequence batches split between whole sequences (attention mixes the positions of
        // one sequence), so a shard holds at least one sequence.
        let (units, rows) = if self.model.target.spec.is_sequence() {
            let (b, t) = batch.x.dims2().unwrap_or((0, 0));
            (b, b * t)
        } else {
            let n = batch.x.dim(0).unwrap_or(0);
            (n, n)
        };
        crate::parallel::threads()
            .min(rows / MIN_SHARD_ROWS)
            .min(units)
            .max(1)
    }

    /// The training losses of `batch` computed in `shards` row shards on their own threads
    /// (each single-threaded), with their gradients summed when `backward`. The same
    /// objective and the same random numbers as one pass over the batch: every loss is a sum
    /// over rows normalised by the batch's row count, each shard's generator draws the whole
    /// batch's numbers and keeps its rows ([`Rng::for_rows`]), and batch-independent terms
    /// (faithfulness) are computed once.
    fn sharded_losses(
        &mut self,
        batch: &Batch,
        shards: usize,
        backward: bool,
    ) -> Result<(StepRecord, Option<GradStore>)> {
        let n = batch.x.dim(0)?;
        // Positions per unit of the batch's first axis: a sequence batch [B, T] has one
        // loss row (and one row of random draws) per position.
        let per = if self.model.target.spec.is_sequence() {
            batch.x.dim(1)?
        } else {
            1
        };
        let (model, cfg, step, rng) = (&self.model, &self.config, self.step, &self.rng);
        let results = crate::parallel::run_shards(shards, |i| -> Result<_> {
            let (a, b) = (i * n / shards, (i + 1) * n / shards);
            let part = Batch {
                x: batch.x.narrow(0, a, b - a)?,
                weights: batch.weights.narrow(0, a * per, (b - a) * per)?,
                n_rows: batch.n_rows,
            };
            let mut rng = rng.for_rows(a * per, n * per);
            let (total, rec, _) = losses_and_ci(model, cfg, step, &part, &mut rng, true, i == 0)?;
            let grads = if backward && rec.losses["total"].is_finite() {
                Some(total.backward()?)
            } else {
                None
            };
            Ok((rec, grads, rng))
        });
        let mut rec = StepRecord::default();
        let mut grads: Option<GradStore> = None;
        let mut next_rng = None;
        let vars: Vec<Var> = self.opt.entries.iter().map(|e| e.grad_of.clone()).collect();
        for r in results {
            let (part, g, r_end) = r?;
            for (k, v) in part.losses {
                *rec.losses.entry(k).or_insert(0.0) += v;
            }
            for (k, v) in part.l0 {
                *rec.l0.entry(k).or_insert(0.0) += v;
            }
            next_rng.get_or_insert(r_end);
            grads = match (grads, g) {
                (None, g) => g,
                (Some(mut acc), Some(g)) => {
                    for v in &vars {
                        if let Some(add) = g.get(v.as_tensor()) {
                            let sum = match acc.get(v.as_tensor()) {
                                Some(have) => (have + add)?,
                                None => add.clone(),
                            };
                            acc.insert(v.as_tensor(), sum);
                        }
                    }
                    Some(acc)
                }
                (Some(acc), None) => Some(acc),
            };
        }
        // Every shard's generator ends where one pass over the whole batch would.
        if let Some(r) = next_rng {
            self.rng = Rng::from_state(r.state());
        }
        Ok((rec, grads))
    }
}

/// Σ_l ‖ΔW_l‖² / Σ_l numel(ΔW_l).
pub fn faithfulness_loss(model: &ComponentModel) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    let mut numel = 0usize;
    for j in 0..model.modules.len() {
        let d = model.weight_delta(j)?;
        numel += d.elem_count();
        let s = d.sqr()?.sum_all()?;
        sum = Some(match sum {
            Some(a) => (a + s)?,
            None => s,
        });
    }
    sum.unwrap() / numel as f64
}

/// Rows per shard below which splitting a step's batch across threads costs more than it
/// saves (thread hand-off and the per-shard fixed work of every op).
pub const MIN_SHARD_ROWS: usize = 128;

/// Every configured loss of `cfg` on `batch` at training step `step` (see
/// [`Trainer::losses_on`]); `batchless` includes the terms that do not depend on the batch
/// (faithfulness), which a row shard other than the first leaves out.
pub fn losses_and_ci(
    model: &ComponentModel,
    cfg: &SpdConfig,
    step: usize,
    batch: &Batch,
    rng: &mut Rng,
    for_training: bool,
    batchless: bool,
) -> Result<(Tensor, StepRecord, Vec<CiOutput>)> {
    let fold = crate::model::Fold::new();
    let (target_out, inputs) = model.target.forward_with_inputs(&batch.x, &fold)?;
    let (ci, _acts) = model.causal_importances(&inputs, Some(&mut *rng), &fold)?;
    let n_rows = batch.n_rows as f64;
    let d_out = target_out.dim(1)? as f64;
    let mut rec = StepRecord::default();
    let mut total: Option<Tensor> = None;
    let ctx = LossCtx {
        model,
        cfg,
        x: &batch.x,
        weights: &batch.weights,
        target_out: &target_out,
        ci: &ci,
        fold: &fold,
        n_rows,
        d_out,
        frac: step as f64 / cfg.steps.max(1) as f64,
    };
    for lc in &cfg.loss_metric_configs {
        if for_training && lc.coeff().is_none() {
            // Logged-only terms are computed at eval time.
            continue;
        }
        let value = loss_term(lc, &ctx, rng, batchless)?;
        let v = value.to_scalar::<f32>()? as f64;
        rec.losses.insert(lc.name().to_string(), v);
        if let Some(c) = lc.coeff() {
            let weighted = (&value * c)?;
            total = Some(add_opt(total, weighted)?);
        }
    }
    let total = match total {
        Some(t) => t,
        None => Tensor::zeros((), DType::F32, model.device())?,
    };
    rec.losses
        .insert("total".into(), total.to_scalar::<f32>()? as f64);
    let thr = cfg.ci_alive_threshold;
    for (j, m) in model.modules.iter().enumerate() {
        rec.l0.insert(
            m.name.clone(),
            weighted_l0(&ci[j].lower, &batch.weights, n_rows, thr)?,
        );
    }
    Ok((total, rec, ci))
}

/// What every loss term reads: the batch, the target's outputs on it, the causal
/// importances, and the normalisations (rows of the whole batch, output width).
struct LossCtx<'a> {
    model: &'a ComponentModel,
    cfg: &'a SpdConfig,
    x: &'a Tensor,
    weights: &'a Tensor,
    target_out: &'a Tensor,
    ci: &'a [CiOutput],
    fold: &'a crate::model::Fold,
    n_rows: f64,
    d_out: f64,
    /// Fraction of training done (for p annealing).
    frac: f64,
}

impl LossCtx<'_> {
    /// What a summed output error is divided by: every output of every row (MSE, the mean
    /// over all outputs), or every row (KL, the mean over positions).
    fn recon_norm(&self) -> f64 {
        match self.cfg.output_loss_type {
            OutputLossType::Mse => self.n_rows * self.d_out,
            OutputLossType::Kl => self.n_rows,
        }
    }
}

/// The value of one loss term (raw, before its coefficient). `batchless` includes the terms
/// that do not depend on the batch (a row shard other than the first leaves them out).
fn loss_term(lc: &LossConfig, ctx: &LossCtx, rng: &mut Rng, batchless: bool) -> Result<Tensor> {
    match &lc.kind {
        LossKind::ImportanceMinimalityLoss {
            pnorm,
            beta,
            p_anneal_start_frac,
            p_anneal_final_p,
            p_anneal_end_frac,
            eps,
            module_weights,
        } => {
            let p = annealed_p(
                *pnorm,
                ctx.frac,
                *p_anneal_start_frac,
                *p_anneal_final_p,
                *p_anneal_end_frac,
            );
            let layer_weights: Vec<f64> = ctx
                .model
                .modules
                .iter()
                .map(|m| crate::spd::config::module_weight(module_weights, &m.name))
                .collect();
            importance_minimality(
                ctx.ci,
                &layer_weights,
                ctx.weights,
                ctx.n_rows,
                p,
                *eps,
                *beta,
            )
        }
        LossKind::StochasticReconLoss => stochastic_recon(ctx, rng, false, None),
        LossKind::StochasticReconLayerwiseLoss => stochastic_recon(ctx, rng, true, None),
        LossKind::StochasticReconSubsetLoss { routing, .. } => {
            stochastic_recon(ctx, rng, false, Some(routing))
        }
        LossKind::CiMaskedReconLoss => ci_masked_recon(ctx, false),
        LossKind::CiMaskedReconLayerwiseLoss => ci_masked_recon(ctx, true),
        LossKind::UnmaskedReconLoss => unmasked_recon(ctx),
        LossKind::FaithfulnessLoss if batchless => faithfulness_loss(ctx.model),
        LossKind::FaithfulnessLoss => Tensor::zeros((), DType::F32, ctx.model.device()),
        LossKind::PgdReconLoss { pgd, .. } => pgd_recon(ctx, rng, pgd, None),
        LossKind::PgdReconSubsetLoss { pgd, routing, .. } => {
            pgd_recon(ctx, rng, pgd, Some(routing))
        }
    }
}

/// Sum of output errors (squared, or KL) against the target with these masks.
fn recon_sum(ctx: &LossCtx, masks: &[Option<ModuleMask>]) -> Result<Tensor> {
    let out = ctx.model.forward_masked(ctx.x, masks, ctx.fold)?;
    recon_err_sum(&out, ctx.target_out, ctx.cfg.output_loss_type)
}

/// The same masks with only module `j`'s kept (the others run the target weights).
fn only_module(masks: &[Option<ModuleMask>], j: usize) -> Vec<Option<ModuleMask>> {
    let mut only = vec![None; masks.len()];
    only[j] = masks[j].clone();
    only
}

/// Stochastic reconstruction (the reference's StochasticRecon, …Layerwise and …Subset losses):
/// per mask sample, masks g + (1 − g)·U (and routes when `routing`), through all modules at
/// once or one module at a time (`layerwise`); mean squared error per output.
fn stochastic_recon(
    ctx: &LossCtx,
    rng: &mut Rng,
    layerwise: bool,
    routing: Option<&Routing>,
) -> Result<Tensor> {
    let cfg = ctx.cfg;
    let nl = ctx.model.modules.len();
    let mut sum: Option<Tensor> = None;
    for _ in 0..cfg.n_mask_samples {
        let mut masks = ctx
            .model
            .sample_masks(ctx.ci, rng, cfg.use_delta_component)?;
        if let Some(routing) = routing {
            let rows = ctx
                .ci
                .first()
                .map_or(Ok(ctx.x.dim(0)?), |c| c.lower.dim(0))?;
            let routes = sample_routes(rng, rows, nl, routing, ctx.model.device())?;
            for (mm, r) in masks.iter_mut().zip(routes) {
                if let Some(mm) = mm {
                    mm.route = Some(r);
                }
            }
        }
        if layerwise {
            for j in 0..nl {
                sum = Some(add_opt(sum, recon_sum(ctx, &only_module(&masks, j))?)?);
            }
        } else {
            sum = Some(add_opt(sum, recon_sum(ctx, &masks)?)?);
        }
    }
    let passes = cfg.n_mask_samples as f64 * if layerwise { nl as f64 } else { 1.0 };
    sum.expect("n_mask_samples >= 1") / (passes * ctx.recon_norm())
}

/// Reconstruction with the CI itself as the masks, all modules or one at a time.
fn ci_masked_recon(ctx: &LossCtx, layerwise: bool) -> Result<Tensor> {
    let masks = ci_masks(ctx.ci);
    if !layerwise {
        return recon_sum(ctx, &masks)? / ctx.recon_norm();
    }
    let nl = masks.len();
    let mut sum: Option<Tensor> = None;
    for j in 0..nl {
        sum = Some(add_opt(sum, recon_sum(ctx, &only_module(&masks, j))?)?);
    }
    sum.expect("at least one module") / (nl as f64 * ctx.recon_norm())
}

/// Reconstruction with every mask at 1 (the components' sum, no delta).
fn unmasked_recon(ctx: &LossCtx) -> Result<Tensor> {
    recon_sum(ctx, &unit_masks(ctx.ci)?)? / ctx.recon_norm()
}

/// Masks of 1 for every module (the unmasked sum of the components, no delta).
pub fn unit_masks(ci: &[CiOutput]) -> Result<Vec<Option<ModuleMask>>> {
    ci.iter()
        .map(|c| {
            Ok(Some(ModuleMask {
                mask: c.lower.ones_like()?,
                delta: None,
                route: None,
            }))
        })
        .collect()
}

/// Reconstruction at adversarial (PGD) masks, optionally subset-routed.
fn pgd_recon(
    ctx: &LossCtx,
    rng: &mut Rng,
    pgd: &PgdConfig,
    routing: Option<&Routing>,
) -> Result<Tensor> {
    let numel = ctx.recon_norm();
    let s = pgd_recon_sum(
        ctx.model,
        ctx.x,
        ctx.ci,
        ctx.target_out,
        ctx.fold,
        rng,
        pgd,
        routing,
        ctx.cfg.use_delta_component,
        numel,
        ctx.cfg.output_loss_type,
    )?;
    s / numel
}

/// Optimizer entries of the main (Adam, wd 0) optimizer: all component and CI-function
/// parameters; tied modules update their owner's storage through their own Adam state.
fn main_entries(model: &ComponentModel) -> Vec<AdamEntry> {
    let mut entries = component_entries(model, 0.0);
    for m in &model.modules {
        for (w, b) in &m.ci_layers {
            entries.push(AdamEntry::new(w.clone(), 0.0));
            entries.push(AdamEntry::new(b.clone(), 0.0));
        }
    }
    entries
}

/// Optimizer entries for U and V of every module; a tied module updates its owner's storage
/// (transposed) through an alias entry with its own Adam state.
fn component_entries(model: &ComponentModel, wd: f64) -> Vec<AdamEntry> {
    let mut entries = vec![];
    for m in &model.modules {
        match m.tied_to {
            None => {
                entries.push(AdamEntry::new(m.v.clone(), wd));
                entries.push(AdamEntry::new(m.u.clone(), wd));
            }
            Some(o) => {
                let owner = &model.modules[o];
                entries.push(AdamEntry::alias(owner.u.clone(), m.v.clone(), wd));
                entries.push(AdamEntry::alias(owner.v.clone(), m.u.clone(), wd));
            }
        }
    }
    entries
}

/// A batch of `b` token sequences `[b, s]`: every position is a row of the decomposed modules
/// (CI, masks, minimality and L0 are per position), so weights and `n_rows` count positions.
pub fn sequence_batch(raw: &[f32], b: usize, s: usize, dev: &candle_core::Device) -> Result<Batch> {
    Ok(Batch {
        x: Tensor::from_slice(raw, (b, s), dev)?,
        weights: Tensor::ones(b * s, DType::F32, dev)?,
        n_rows: b * s,
    })
}

/// Builds a [`Batch`] from raw rows, folding all-zero rows into one weighted row if `compact`.
pub fn make_batch(
    raw: &[f32],
    b: usize,
    nf: usize,
    compact: bool,
    dev: &candle_core::Device,
) -> Result<Batch> {
    if !compact {
        return Ok(Batch {
            x: Tensor::from_slice(raw, (b, nf), dev)?,
            weights: Tensor::ones(b, DType::F32, dev)?,
            n_rows: b,
        });
    }
    let mut rows = Vec::with_capacity(raw.len());
    let mut n_zero = 0usize;
    for r in raw.chunks(nf) {
        if r.iter().all(|&v| v == 0.0) {
            n_zero += 1;
        } else {
            rows.extend_from_slice(r);
        }
    }
    let n_nz = rows.len() / nf;
    let mut w = vec![1f32; n_nz];
    if n_zero > 0 {
        rows.extend(std::iter::repeat_n(0f32, nf));
        w.push(n_zero as f32);
    }
    let n = w.len();
    Ok(Batch {
        x: Tensor::from_vec(rows, (n, nf), dev)?,
        weights: Tensor::from_vec(w, n, dev)?,
        n_rows: b,
    })
}

fn add_opt(a: Option<Tensor>, b: Tensor) -> Result<Tensor> {
    match a {
        Some(a) => a + b,
        None => Ok(b),
    }
}

fn sq_err_sum(out: &Tensor, target: &Tensor) -> Result<Tensor> {
    (out - target)?.sqr()?.sum_all()
}

/// Σ over rows of the output error against the target: squared error (MSE), or
/// KL(target ‖ out) over the last dimension (KL: the reference's `calc_kl_divergence_lm`,
/// Σ_v p_v (log p_v − log q_v) with p = softmax(target), q = softmax(out)).
pub fn recon_err_sum(out: &Tensor, target: &Tensor, kind: OutputLossType) -> Result<Tensor> {
    match kind {
        OutputLossType::Mse => sq_err_sum(out, target),
        OutputLossType::Kl => crate::spd::ci_op::kl_sum(out, target),
    }
}

/// Per-row KL(target ‖ out) `[rows]` (reports and tests).
pub fn kl_rows(out: &Tensor, target: &Tensor) -> Result<Tensor> {
    let lq = crate::model::ih::log_softmax_last(out)?;
    let lp = crate::model::ih::log_softmax_last(target)?;
    (lp.exp()? * (lp - lq)?)?.sum(candle_core::D::Minus1)
}

/// The causal importances themselves as the masks of every module.
pub fn ci_masks(ci: &[CiOutput]) -> Vec<Option<ModuleMask>> {
    ci.iter()
        .map(|c| {
            Some(ModuleMask {
                mask: c.lower.clone(),
                delta: None,
                route: None,
            })
        })
        .collect()
}

/// Per-module route masks `[n]` (1 = use the components) for a routing rule.
pub fn sample_routes(
    rng: &mut Rng,
    n: usize,
    n_modules: usize,
    routing: &Routing,
    dev: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    let mut r = vec![vec![0f32; n]; n_modules];
    let mut idx: Vec<usize> = (0..n_modules).collect();
    // Draw for every row of the whole batch; keep this window's rows.
    let (start, full) = rng.rows(n);
    let mut on = vec![false; n_modules];
    for batch_row in 0..full {
        on.fill(false);
        match routing {
            Routing::UniformKSubset => {
                let k = 1 + rng.below(n_modules);
                for i in 0..k {
                    let j = i + rng.below(n_modules - i);
                    idx.swap(i, j);
                }
                for &m in &idx[..k] {
                    on[m] = true;
                }
            }
            Routing::StaticProbability { p } => {
                for o in on.iter_mut() {
                    *o = rng.uniform_f64() < *p;
                }
            }
        }
        if let Some(row) = batch_row.checked_sub(start).filter(|&l| l < n) {
            for (rm, &o) in r.iter_mut().zip(&on) {
                if o {
                    rm[row] = 1.0;
                }
            }
        }
    }
    r.into_iter().map(|v| Tensor::from_vec(v, n, dev)).collect()
}

/// Sum of squared errors at adversarial masks found by projected sign-gradient ascent.
#[allow(clippy::too_many_arguments)]
fn pgd_recon_sum(
    model: &ComponentModel,
    x: &Tensor,
    ci: &[CiOutput],
    target_out: &Tensor,
    fold: &crate::model::Fold,
    rng: &mut Rng,
    pgd: &PgdConfig,
    routing: Option<&Routing>,
    use_delta: bool,
    numel: f64,
    loss: OutputLossType,
) -> Result<Tensor> {
    // Mask rows: module-input rows (positions of sequences).
    let n = match ci.first() {
        Some(c) => c.lower.dim(0)?,
        None => x.dim(0)?,
    };
    let dev = model.device();
    let routes = match routing {
        Some(r) => Some(sample_routes(rng, n, model.modules.len(), r, dev)?),
        None => None,
    };
    let rows = match pgd.mask_scope {
        MaskScope::SharedAcrossBatch => 1,
        MaskScope::UniquePerDatapoint => n,
    };
    let mut sources: Vec<Tensor> = vec![];
    for m in &model.modules {
        let k = rows * (m.c + 1);
        let v = match pgd.init {
            PgdInit::Random => match pgd.mask_scope {
                MaskScope::UniquePerDatapoint => rng.uniform_rows(n, m.c + 1),
                MaskScope::SharedAcrossBatch => rng.uniform_vec(k),
            },
            PgdInit::Ones => vec![1.0; k],
            PgdInit::Zeroes => vec![0.0; k],
        };
        sources.push(Tensor::from_vec(v, (rows, m.c + 1), dev)?);
    }
    let build = |srcs: &[Tensor], ci_l: &[Tensor]| -> Result<Vec<Option<ModuleMask>>> {
        let mut out = vec![];
        for (j, m) in model.modules.iter().enumerate() {
            let a = srcs[j].narrow(1, 0, m.c)?;
            let g = &ci_l[j];
            let mask = (g + (1.0 - g)?.broadcast_mul(&a)?)?;
            let delta = if use_delta {
                Some(
                    srcs[j]
                        .narrow(1, m.c, 1)?
                        .squeeze(1)?
                        .broadcast_as(n)?
                        .contiguous()?,
                )
            } else {
                None
            };
            let route = routes.as_ref().map(|r| r[j].clone());
            out.push(Some(ModuleMask { mask, delta, route }));
        }
        Ok(out)
    };
    // Ascent on detached CI (the reference computes CI once and differentiates w.r.t. a only).
    let ci_detached: Vec<Tensor> = ci.iter().map(|c| c.lower.detach()).collect();
    for _ in 0..pgd.n_steps {
        let vars: Vec<candle_core::Var> = sources
            .iter()
            .map(candle_core::Var::from_tensor)
            .collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let masks = build(&ts, &ci_detached)?;
        let out = model.forward_masked(x, &masks, fold)?;
        let l = (recon_err_sum(&out, target_out, loss)? / numel)?;
        let grads = l.backward()?;
        let mut next = vec![];
        for (v, s) in vars.iter().zip(&sources) {
            let step = match grads.get(v.as_tensor()) {
                Some(g) => {
                    let g = g.detach();
                    let sign =
                        (g.gt(0.0)?.to_dtype(DType::F32)? - g.lt(0.0)?.to_dtype(DType::F32)?)?;
                    (s + (sign * pgd.step_size)?)?.clamp(0f32, 1f32)?
                }
                None => s.clone(),
            };
            next.push(step.detach());
        }
        sources = next;
    }
    let ci_l: Vec<Tensor> = ci.iter().map(|c| c.lower.clone()).collect();
    let masks = build(&sources, &ci_l)?;
    let out = model.forward_masked(x, &masks, fold)?;
    recon_err_sum(&out, target_out, loss)
}

/// p of the importance-minimality loss under the optional p-annealing.
pub fn annealed_p(p: f64, frac: f64, start: f64, final_p: Option<f64>, end: f64) -> f64 {
    match final_p {
        Some(fp) if start < 1.0 => {
            if frac < start {
                p
            } else if frac >= end {
                fp
            } else {
                p + (fp - p) * (frac - start) / (end - start)
            }
        }
        _ => p,
    }
}

/// Σ_l λ_l Σ_c [m_c + β·m_c·log2(1 + S_c)], S_c = Σ_rows w·(ci_upper + eps)^p, m_c = S_c / N;
/// λ_l = `layer_weights[l]` (1 in the reference).
pub fn importance_minimality(
    ci: &[CiOutput],
    layer_weights: &[f64],
    weights: &Tensor,
    n_rows: f64,
    p: f64,
    eps: f64,
    beta: f64,
) -> Result<Tensor> {
    if layer_weights.len() != ci.len() {
        candle_core::bail!(
            "importance_minimality: {} layer weights for {} layers",
            layer_weights.len(),
            ci.len()
        );
    }
    let w = weights.unsqueeze(0)?; // [1, n]
    let mut total: Option<Tensor> = None;
    for (c, &lw) in ci.iter().zip(layer_weights) {
        let xp = if p == 1.0 {
            (&c.upper + eps)?
        } else if p == 2.0 {
            (&c.upper + eps)?.sqr()?
        } else {
            crate::spd::ci_op::pow_shifted(&c.upper, eps, p)?
        };
        let s = w.matmul(&xp)?.squeeze(0)?; // [C]
        let m = (&s / n_rows)?;
        let layer = if beta != 0.0 {
            let log2 = ((&s + 1.0)?.log()? / std::f64::consts::LN_2)?;
            (&m + ((&m * log2)? * beta)?)?.sum_all()?
        } else {
            m.sum_all()?
        };
        let layer = if lw == 1.0 { layer } else { (layer * lw)? };
        total = Some(add_opt(total, layer)?);
    }
    Ok(total.unwrap())
}

/// Weighted mean over rows of the number of components with ci > threshold.
pub fn weighted_l0(lower: &Tensor, weights: &Tensor, n_rows: f64, thr: f64) -> Result<f64> {
    let alive = lower.gt(thr)?.to_dtype(DType::F32)?.sum(1)?; // [n]
    Ok((alive * weights)?.sum_all()?.to_scalar::<f32>()? as f64 / n_rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ci_of(upper: &[[f32; 2]]) -> CiOutput {
        let flat: Vec<f32> = upper.iter().flatten().copied().collect();
        let t = Tensor::from_vec(flat, (upper.len(), 2), &Device::Cpu).unwrap();
        CiOutput {
            lower: t.clone(),
            upper: t.clone(),
            pre_sigmoid: t,
        }
    }

    #[test]
    fn minimality_by_hand() -> Result<()> {
        // two rows, C = 2; p = 1: m = [(0.5+1)/2, (0+0.2)/2] → sum 0.85
        let ci = vec![ci_of(&[[0.5, 0.0], [1.0, 0.2]])];
        let w = Tensor::new(&[1f32, 1.0], &Device::Cpu)?;
        let v = importance_minimality(&ci, &[1.0], &w, 2.0, 1.0, 0.0, 0.0)?.to_scalar::<f32>()?;
        assert!((v - 0.85).abs() < 1e-6);
        // p = 2: [(0.25+1)/2, 0.04/2] = 0.625 + 0.02
        let v = importance_minimality(&ci, &[1.0], &w, 2.0, 2.0, 0.0, 0.0)?.to_scalar::<f32>()?;
        assert!((v - 0.645).abs() < 1e-6);
        // β = 1, p = 1: S = [1.5, 0.2]; m + m·log2(1+S) = 0.75(1+log2 2.5) + 0.1(1+log2 1.2)
        let v =
            importance_minimality(&ci, &[1.0], &w, 2.0, 1.0, 0.0, 1.0)?.to_scalar::<f32>()? as f64;
        let e = 0.75 * (1.0 + 2.5f64.log2()) + 0.1 * (1.0 + 1.2f64.log2());
        assert!((v - e).abs() < 1e-5, "{v} {e}");
        // weighted rows equal repeated rows: row 2 counted three times over N = 4
        let w = Tensor::new(&[1f32, 3.0], &Device::Cpu)?;
        let v = importance_minimality(&ci, &[1.0], &w, 4.0, 1.0, 0.0, 0.0)?.to_scalar::<f32>()?;
        assert!((v - (3.5 / 4.0 + 0.6 / 4.0)).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn minimality_module_weights_scale_their_layer() -> Result<()> {
        // Layer terms 0.85 (as above) and (0.3 + 0.1)/2 = 0.2; weights 1 and 10 → 0.85 + 2.
        let ci = vec![
            ci_of(&[[0.5, 0.0], [1.0, 0.2]]),
            ci_of(&[[0.3, 0.1], [0.0, 0.0]]),
        ];
        let w = Tensor::new(&[1f32, 1.0], &Device::Cpu)?;
        let v =
            importance_minimality(&ci, &[1.0, 10.0], &w, 2.0, 1.0, 0.0, 0.0)?.to_scalar::<f32>()?;
        assert!((v - 2.85).abs() < 1e-5, "{v}");
        let v =
            importance_minimality(&ci, &[1.0, 1.0], &w, 2.0, 1.0, 0.0, 0.0)?.to_scalar::<f32>()?;
        assert!((v - 1.05).abs() < 1e-5, "{v}");
        Ok(())
    }

    #[test]
    fn p_annealing() {
        assert_eq!(annealed_p(2.0, 0.5, 1.0, Some(1.0), 1.0), 2.0);
        assert_eq!(annealed_p(2.0, 0.1, 0.2, Some(1.0), 0.6), 2.0);
        assert!((annealed_p(2.0, 0.4, 0.2, Some(1.0), 0.6) - 1.5).abs() < 1e-12);
        assert_eq!(annealed_p(2.0, 0.7, 0.2, Some(1.0), 0.6), 1.0);
    }

    #[test]
    fn l0_strict_threshold_and_weights() -> Result<()> {
        let t = Tensor::new(&[[0.1f32, 0.2, 0.0], [1.0, 1.0, 0.5]], &Device::Cpu)?;
        let w = Tensor::new(&[2f32, 1.0], &Device::Cpu)?;
        // row0: 1 alive (0.1 not > 0.1), weight 2; row1: 3 alive → (2 + 3)/3
        assert!((weighted_l0(&t, &w, 3.0, 0.1)? - 5.0 / 3.0).abs() < 1e-9);
        Ok(())
    }

    #[test]
    fn zero_row_folding() -> Result<()> {
        let raw = [0f32, 0., 1., 0., 0., 0., 0., 2.];
        let b = make_batch(&raw, 4, 2, true, &Device::Cpu)?;
        assert_eq!(
            b.x.to_vec2::<f32>()?,
            vec![vec![1., 0.], vec![0., 2.], vec![0., 0.]]
        );
        assert_eq!(b.weights.to_vec1::<f32>()?, vec![1., 1., 2.]);
        assert_eq!(b.n_rows, 4);
        Ok(())
    }
}
