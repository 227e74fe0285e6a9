//! The component model: rank-one subcomponents (V, U) for every decomposed module of a target,
//! their causal-importance functions, and masked forward passes.

use crate::spd::ci_op::FusedGelu as _;
use candle_core::{DType, Device, Result, Tensor, Var};

use super::ci_op;
use super::config::{CiFnType, Sampling, SigmoidType, SpdConfig, fnmatch};
use crate::model::{Act, Fold, TargetModel, TargetSpec};
use crate::rng::Rng;

/// One decomposed linear map of the target.
#[derive(Clone, Debug)]
pub struct DecomposedModule {
    /// Module path in the target (e.g. `linear1`, `layers.0.mlp_in`).
    pub name: String,
    /// Index in `target.modules`.
    pub target_idx: usize,
    pub c: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// `V [d_in, C]` (read directions, one column per subcomponent).
    pub v: Var,
    /// `U [C, d_out]` (write directions, one row per subcomponent).
    pub u: Var,
    /// `Some(j)`: this module's components are tied to module j's (V = U_jᵀ, U = V_jᵀ); its
    /// own `v`/`u` are synchronised copies that carry their own gradients.
    pub tied_to: Option<usize>,
    /// CI-function layers: (W, b) per linear layer, shapes per [`CiFnType`].
    pub ci_layers: Vec<(Var, Var)>,
    /// This module's CI-function type.
    pub ci_fn_type: CiFnType,
}

/// Causal importances of one module on a batch.
#[derive(Clone, Debug)]
pub struct CiOutput {
    /// Used for masks, L0, plots: `[n, C]`.
    pub lower: Tensor,
    /// Used for the importance-minimality loss: `[n, C]`.
    pub upper: Tensor,
    pub pre_sigmoid: Tensor,
}

/// Mask for one module in a masked forward pass.
#[derive(Clone, Debug)]
pub struct ModuleMask {
    /// `[n, C]` multiplying the inner activations.
    pub mask: Tensor,
    /// `[n]` weight of the delta component (W_target − Σ subcomponents), or none.
    pub delta: Option<Tensor>,
    /// `[n]` 1 where the row uses the components, 0 where it uses the target weights
    /// (subset routing); none = every row.
    pub route: Option<Tensor>,
}

pub struct ComponentModel {
    pub target: TargetModel,
    pub modules: Vec<DecomposedModule>,
    pub ci_fn_hidden_dims: Vec<usize>,
    pub sigmoid_type: SigmoidType,
    pub sampling: Sampling,
}

/// Estimates the memory of the decomposition (parameters, gradients, Adam moments) and of one
/// training or evaluation batch through it, and refuses plans the machine cannot hold, before
/// anything is allocated: sizes come from files and configs.
fn check_memory_plan(
    target: &TargetModel,
    picked: &[(usize, usize)],
    cfg: &SpdConfig,
) -> anyhow::Result<()> {
    crate::limits::check_memory(
        "this decomposition (C, ci_fn_hidden_dims, batch sizes)",
        memory_plan_values(target, picked, cfg),
    )?;
    Ok(())
}

/// f32 values the plan of [`check_memory_plan`] needs (an upper estimate).
fn memory_plan_values(target: &TargetModel, picked: &[(usize, usize)], cfg: &SpdConfig) -> u128 {
    let hidden: u128 = cfg.ci_fn_hidden_dims.iter().map(|&h| h as u128).sum();
    // Weights and biases of an MLP through `dims`.
    let chain = |first: u128, last: u128| -> u128 {
        let dims: Vec<u128> = std::iter::once(first)
            .chain(cfg.ci_fn_hidden_dims.iter().map(|&h| h as u128))
            .chain(std::iter::once(last))
            .collect();
        dims.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    };
    let (mut params, mut per_row) = (0u128, 0u128);
    for &(ti, c) in picked {
        let tm = &target.modules[ti];
        let (c, d_in, d_out) = (c as u128, tm.d_in as u128, tm.d_out as u128);
        // V, U and the CI function: one small MLP per component, or one over the input.
        // The CI function's parameters and its hidden activations per row: one small MLP
        // per component (a fused op that keeps no hidden activations: a few values per
        // component), or one MLP over the module input (hidden).
        let (ci, ci_act) = match cfg.ci_fn_type_of(&tm.name) {
            CiFnType::Mlp => (c * chain(1, 1), c * 4),
            // One MLP d_in -> hidden -> 1 per component; the fused op (one hidden layer)
            // stores no hidden activations, deeper ones store them per component.
            CiFnType::VectorMlp if cfg.ci_fn_hidden_dims.len() == 1 => (c * chain(d_in, 1), c * 4),
            CiFnType::VectorMlp => (c * chain(d_in, 1), c * hidden),
            CiFnType::SharedMlp => (chain(d_in, c), hidden),
        };
        params += c * (d_in + d_out) + ci;
        // Inner acts, CI pre-activations, masks (a few per C), module in/out.
        per_row += ci_act + c * 8 + d_in + d_out;
    }
    // Module rows: batch rows, times positions for sequence models.
    let rows = (cfg.batch_size.max(cfg.eval_batch_size) * target.spec.positions()) as u128;
    let samples = cfg.n_mask_samples as u128 + 2;
    // Parameters ×4 (values, gradients, two Adam moments); activations ×3 (forward, backward).
    params * 4 + rows * per_row * samples * 3
}

impl ComponentModel {
    /// An independent copy with its own parameter storage (for work off the training thread:
    /// training the original does not change it).
    pub fn detached_copy(&self) -> candle_core::Result<Self> {
        let cp = |v: &Var| Var::from_tensor(&v.as_tensor().copy()?);
        let modules = self
            .modules
            .iter()
            .map(|m| {
                Ok(DecomposedModule {
                    v: cp(&m.v)?,
                    u: cp(&m.u)?,
                    ci_layers: m
                        .ci_layers
                        .iter()
                        .map(|(w, b)| Ok((cp(w)?, cp(b)?)))
                        .collect::<candle_core::Result<_>>()?,
                    ..m.clone()
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(ComponentModel {
            target: self.target.clone(),
            modules,
            ci_fn_hidden_dims: self.ci_fn_hidden_dims.clone(),
            sigmoid_type: self.sigmoid_type,
            sampling: self.sampling,
        })
    }

    /// New decomposition with the reference's initialisation (V ~ N(0, 1/d_in),
    /// U ~ N(0, 1/C), CI-function weights with gain √2 for hidden layers, biases 0).
    pub fn new(target: TargetModel, cfg: &SpdConfig, rng: &mut Rng) -> anyhow::Result<Self> {
        let dev = target.device().clone();
        let mut picked: Vec<(usize, usize)> = vec![];
        for (i, m) in target.modules.iter().enumerate() {
            if let Some(info) = cfg
                .module_info
                .iter()
                .find(|info| fnmatch(&info.module_pattern, &m.name))
            {
                picked.push((i, info.c));
            }
        }
        for info in &cfg.module_info {
            if !target
                .modules
                .iter()
                .any(|m| fnmatch(&info.module_pattern, &m.name))
            {
                let names: Vec<_> = target.modules.iter().map(|m| m.name.as_str()).collect();
                anyhow::bail!(
                    "module_pattern '{}' matches no linear module of the target (modules: {})",
                    info.module_pattern,
                    names.join(", ")
                );
            }
        }
        check_memory_plan(&target, &picked, cfg)?;
        let mut modules = vec![];
        for &(ti, c) in &picked {
            let tm = &target.modules[ti];
            let v = Tensor::from_vec(
                rng.normal_vec(tm.d_in * c, 1.0 / (tm.d_in as f32).sqrt()),
                (tm.d_in, c),
                &dev,
            )?;
            let u = Tensor::from_vec(
                rng.normal_vec(c * tm.d_out, 1.0 / (c as f32).sqrt()),
                (c, tm.d_out),
                &dev,
            )?;
            modules.push(DecomposedModule {
                name: tm.name.clone(),
                target_idx: ti,
                c,
                d_in: tm.d_in,
                d_out: tm.d_out,
                v: Var::from_tensor(&v)?,
                u: Var::from_tensor(&u)?,
                tied_to: None,
                ci_layers: vec![],
                ci_fn_type: cfg.ci_fn_type_of(&tm.name),
            });
        }
        for m in modules.iter_mut() {
            m.ci_layers =
                init_ci_layers(m.ci_fn_type, &cfg.ci_fn_hidden_dims, m.c, m.d_in, rng, &dev)?;
        }
        let mut model = ComponentModel {
            target,
            modules,
            ci_fn_hidden_dims: cfg.ci_fn_hidden_dims.clone(),
            sigmoid_type: cfg.sigmoid_type,
            sampling: cfg.sampling,
        };
        model.apply_tms_tying()?;
        Ok(model)
    }

    /// TMS component tying: linear2.U = linear1.Vᵀ and linear2.V = linear1.Uᵀ.
    pub fn apply_tms_tying(&mut self) -> Result<()> {
        if !matches!(
            self.target.spec,
            TargetSpec::Tms {
                tied_weights: true,
                ..
            }
        ) {
            return Ok(());
        }
        let i1 = self.modules.iter().position(|m| m.name == "linear1");
        let i2 = self.modules.iter().position(|m| m.name == "linear2");
        if let (Some(i1), Some(i2)) = (i1, i2)
            && self.modules[i1].c == self.modules[i2].c
        {
            self.modules[i2].tied_to = Some(i1);
            self.sync_tied()?;
        }
        Ok(())
    }

    /// Checks that every tied module holds its owner's transposed parameters (a file whose
    /// tied tensors disagree is inconsistent: training would silently keep only one of them).
    /// `prefix` names the tensors in the message (`components` in `.spdlab` files).
    pub fn check_tied(&self, prefix: &str) -> anyhow::Result<()> {
        for m in &self.modules {
            if let Some(j) = m.tied_to {
                let o = &self.modules[j];
                for (mine, kind, theirs, okind) in [(&m.u, "U", &o.v, "V"), (&m.v, "V", &o.u, "U")]
                {
                    let d = (mine.as_tensor() - theirs.as_tensor().t()?)?
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?;
                    let scale = theirs
                        .as_tensor()
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?
                        .max(1.0);
                    if d.is_nan() || d > 1e-5 * scale {
                        anyhow::bail!(
                            "tensor '{prefix}.{}.{kind}' differs from the transpose of '{prefix}.{}.{okind}' by up to {d:e}, but the target ties them (one parameter)",
                            m.name,
                            o.name
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies owners' values into tied modules' variables.
    pub fn sync_tied(&self) -> Result<()> {
        for m in &self.modules {
            if let Some(j) = m.tied_to {
                let o = &self.modules[j];
                m.v.set(&o.u.as_tensor().t()?.contiguous()?)?;
                m.u.set(&o.v.as_tensor().t()?.contiguous()?)?;
            }
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        self.target.device()
    }

    pub fn module_index(&self, name: &str) -> Option<usize> {
        self.modules.iter().position(|m| m.name == name)
    }

    /// Index in `self.modules` of each target module (None if not decomposed).
    pub fn decomposed_index_of_target(&self) -> Vec<Option<usize>> {
        let mut v = vec![None; self.target.modules.len()];
        for (j, m) in self.modules.iter().enumerate() {
            v[m.target_idx] = Some(j);
        }
        v
    }

    /// Component parameters (V, U of every module, tied copies included).
    pub fn component_vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|m| [m.v.clone(), m.u.clone()])
            .collect()
    }

    pub fn ci_vars(&self) -> Vec<Var> {
        self.modules
            .iter()
            .flat_map(|m| m.ci_layers.iter().flat_map(|(w, b)| [w.clone(), b.clone()]))
            .collect()
    }

    /// ΔW = W_target − (V·U)ᵀ for module j (differentiable).
    pub fn weight_delta(&self, j: usize) -> Result<Tensor> {
        let m = &self.modules[j];
        let w = &self.target.modules[m.target_idx].weight;
        w - m.v.as_tensor().matmul(m.u.as_tensor())?.t()?
    }

    /// Inner activations h = x·V.
    pub fn component_acts(&self, j: usize, x: &Act, fold: &Fold) -> Result<Tensor> {
        x.apply(self.modules[j].v.as_tensor(), fold)
    }

    /// CI function output (pre-sigmoid) of module j, given the module input and its inner acts.
    pub fn ci_pre_sigmoid(
        &self,
        j: usize,
        input: &Act,
        acts: &Tensor,
        fold: &Fold,
    ) -> Result<Tensor> {
        let m = &self.modules[j];
        let l = &m.ci_layers;
        match m.ci_fn_type {
            CiFnType::Mlp => {
                if l.len() == 2 {
                    ci_op::ci_mlp(
                        acts,
                        l[0].0.as_tensor(),
                        l[0].1.as_tensor(),
                        l[1].0.as_tensor(),
                        l[1].1.as_tensor(),
                    )
                } else {
                    // General depth: ParallelLinear layers over [C, n, ·].
                    let mut h = acts.t()?.unsqueeze(2)?; // [C, n, 1]
                    for (k, (w, b)) in l.iter().enumerate() {
                        h = h
                            .matmul(w.as_tensor())?
                            .broadcast_add(&b.as_tensor().unsqueeze(1)?)?;
                        if k + 1 < l.len() {
                            h = h.gelu_erf_fused()?;
                        }
                    }
                    h.squeeze(2)?.t()
                }
            }
            CiFnType::VectorMlp if l.len() == 2 && matches!(input, Act::Dense(_)) => {
                let Act::Dense(x) = input else { unreachable!() };
                ci_op::ci_vector_mlp(
                    x,
                    l[0].0.as_tensor(),
                    l[0].1.as_tensor(),
                    l[1].0.as_tensor(),
                    l[1].1.as_tensor(),
                )
            }
            CiFnType::VectorMlp => {
                // First layer: one matmul of x [n, d_in] with W [C, d_in, h] as [d_in, C·h].
                let (c, d_in, h1) = l[0].0.as_tensor().dims3()?;
                let w0 = l[0]
                    .0
                    .as_tensor()
                    .transpose(0, 1)?
                    .reshape((d_in, c * h1))?;
                let n = input.rows()?;
                let mut h = input
                    .apply(&w0, fold)?
                    .reshape((n, c, h1))?
                    .broadcast_add(l[0].1.as_tensor())?
                    .gelu_erf_fused()?
                    .transpose(0, 1)?
                    .contiguous()?; // [C, n, h1]
                for (k, (w, b)) in l.iter().enumerate().skip(1) {
                    h = h
                        .matmul(w.as_tensor())?
                        .broadcast_add(&b.as_tensor().unsqueeze(1)?)?;
                    if k + 1 < l.len() {
                        h = h.gelu_erf_fused()?;
                    }
                }
                h.squeeze(2)?.t()
            }
            CiFnType::SharedMlp => {
                let mut h = input
                    .apply(l[0].0.as_tensor(), fold)?
                    .broadcast_add(l[0].1.as_tensor())?;
                if l.len() > 1 {
                    h = h.gelu_erf_fused()?;
                }
                for (k, (w, b)) in l.iter().enumerate().skip(1) {
                    h = h.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
                    if k + 1 < l.len() {
                        h = h.gelu_erf_fused()?;
                    }
                }
                Ok(h)
            }
        }
    }

    /// Lower and upper sigmoids of the pre-sigmoid CI, per the config's sigmoid type.
    /// `shift_noise`: binomial sampling's random shift (lower input = 1.05·raw − 0.05·u).
    pub fn ci_from_pre(&self, pre: Tensor, shift_noise: Option<&Tensor>) -> Result<CiOutput> {
        let lower_in = match shift_noise {
            Some(u) => ((&pre * 1.05)? - (u * 0.05)?)?,
            None => pre.clone(),
        };
        let (lower, upper) = match self.sigmoid_type {
            SigmoidType::LeakyHard => (
                ci_op::lower_leaky_hard(&lower_in)?,
                ci_op::upper_leaky_hard(&pre)?,
            ),
            SigmoidType::Hard => (hard_sigmoid(&lower_in)?, hard_sigmoid(&pre)?),
            SigmoidType::UpperLeakyHard => (
                ci_op::upper_leaky_hard(&lower_in)?,
                ci_op::upper_leaky_hard(&pre)?,
            ),
            SigmoidType::Normal => (
                candle_nn::ops::sigmoid(&lower_in)?,
                candle_nn::ops::sigmoid(&pre)?,
            ),
            SigmoidType::SwishHard => (swish_hard(&lower_in)?, swish_hard(&pre)?),
        };
        Ok(CiOutput {
            lower,
            upper,
            pre_sigmoid: pre,
        })
    }

    /// Causal importances of every decomposed module for the target's module inputs, plus the
    /// inner activations used to compute them.
    pub fn causal_importances(
        &self,
        inputs: &[Act],
        shift_rng: Option<&mut Rng>,
        fold: &Fold,
    ) -> Result<(Vec<CiOutput>, Vec<Tensor>)> {
        let mut outs = vec![];
        let mut acts_all = vec![];
        let mut shift_rng = shift_rng;
        for (j, m) in self.modules.iter().enumerate() {
            let input = &inputs[m.target_idx];
            let acts = self.component_acts(j, input, fold)?;
            let pre = self.ci_pre_sigmoid(j, input, &acts, fold)?;
            let noise = match (self.sampling, shift_rng.as_deref_mut()) {
                (Sampling::Binomial, Some(r)) => {
                    let n = pre.dim(0)?;
                    Some(Tensor::from_vec(
                        r.uniform_rows(n, m.c),
                        (n, m.c),
                        self.device(),
                    )?)
                }
                _ => None,
            };
            outs.push(self.ci_from_pre(pre, noise.as_ref())?);
            acts_all.push(acts);
        }
        Ok((outs, acts_all))
    }

    /// Output of decomposed module j on input `a` with a mask (and optional delta weight):
    /// (a·V ⊙ (m − δ))·U + δ·(a·W_targetᵀ) + b, which equals (a·V ⊙ m)·U + δ·(a·ΔWᵀ) + b.
    /// Wide outputs of dense inputs (residual-MLP `mlp_out`) are returned factored.
    pub fn masked_module_forward(
        &self,
        j: usize,
        a: &Act,
        mask: &ModuleMask,
        fold: &Fold,
    ) -> Result<Act> {
        let m = &self.modules[j];
        let tm = &self.target.modules[m.target_idx];
        let acts = a.apply(m.v.as_tensor(), fold)?;
        let factored_out = matches!(a, Act::Dense(_)) && m.d_out > 2 * (m.c + m.d_in);
        if factored_out {
            let Act::Dense(x) = a else { unreachable!() };
            let n = x.dim(0)?;
            let mut terms = vec![];
            match &mask.delta {
                Some(d) => {
                    let d = d.unsqueeze(1)?;
                    terms.push((
                        (acts * mask.mask.broadcast_sub(&d)?)?,
                        Some(m.u.as_tensor().clone()),
                    ));
                    terms.push((x.broadcast_mul(&d)?, Some(tm.weight_t.clone())));
                }
                None => terms.push(((acts * &mask.mask)?, Some(m.u.as_tensor().clone()))),
            }
            if let Some(b) = &tm.bias {
                terms.push((
                    Tensor::ones((n, 1), DType::F32, x.device())?,
                    Some(b.unsqueeze(0)?),
                ));
            }
            return Ok(Act::Factored(terms));
        }
        let mut out = match &mask.delta {
            Some(d) => {
                let d = d.unsqueeze(1)?;
                let coef = mask.mask.broadcast_sub(&d)?;
                let comp = (acts * coef)?.matmul(m.u.as_tensor())?;
                (comp + a.apply(&tm.weight_t, fold)?.broadcast_mul(&d)?)?
            }
            None => (acts * &mask.mask)?.matmul(m.u.as_tensor())?,
        };
        if let Some(r) = &mask.route {
            let r = r.unsqueeze(1)?;
            let orig = a.apply(&tm.weight_t, fold)?;
            out = (out.broadcast_mul(&r)? + orig.broadcast_mul(&(1.0 - r)?)?)?;
        }
        if let Some(b) = &tm.bias {
            out = out.broadcast_add(b)?;
        }
        Ok(Act::Dense(out))
    }

    /// Forward pass with the masked components replacing the modules that have a mask
    /// (`masks[j]` for decomposed module j; `None` = original target weights).
    pub fn forward_masked(
        &self,
        x: &Tensor,
        masks: &[Option<ModuleMask>],
        fold: &Fold,
    ) -> Result<Tensor> {
        let map = self.decomposed_index_of_target();
        self.target
            .forward_hooked(x, fold, &mut |ti, a, fold| match map[ti] {
                Some(j) => match &masks[j] {
                    Some(mm) => self.masked_module_forward(j, a, mm, fold).map(Some),
                    None => Ok(None),
                },
                None => Ok(None),
            })
    }

    /// Stochastic masks for every module: ci + (1 − ci)·r, r ~ U(0,1) (continuous) or
    /// r ∈ {0,1} (binomial); delta weight δ ~ U(0,1) per row and module when enabled.
    pub fn sample_masks(
        &self,
        ci: &[CiOutput],
        rng: &mut Rng,
        use_delta: bool,
    ) -> Result<Vec<Option<ModuleMask>>> {
        let dev = self.device();
        let mut sources = vec![];
        for (j, m) in self.modules.iter().enumerate() {
            let n = ci[j].lower.dim(0)?;
            let r: Vec<f32> = match self.sampling {
                Sampling::Continuous => rng.uniform_rows(n, m.c),
                Sampling::Binomial => rng.bits_rows(n, m.c),
            };
            sources.push(Tensor::from_vec(r, (n, m.c), dev)?);
        }
        let mut out = vec![];
        for (j, src) in sources.into_iter().enumerate() {
            let g = &ci[j].lower;
            let mask = (g + ((1.0 - g)? * src)?)?;
            out.push(Some(ModuleMask {
                mask,
                delta: None,
                route: None,
            }));
        }
        if use_delta {
            for (j, slot) in out.iter_mut().enumerate() {
                let n = ci[j].lower.dim(0)?;
                let d = Tensor::from_vec(rng.uniform_rows(n, 1), n, dev)?;
                if let Some(mm) = slot {
                    mm.delta = Some(d);
                }
            }
        }
        Ok(out)
    }

    /// Replaces module j's parameters with tensors looked up by key: `{comp}.V`, `{comp}.U` and
    /// `{ci}.layers.<2i>.W|b` (the same layout in `.spdlab` files and reference checkpoints,
    /// under different prefixes). `take(key, shape)` must return a tensor of that shape.
    pub fn load_module_parameters(
        &mut self,
        j: usize,
        comp: &str,
        ci: &str,
        take: &mut dyn FnMut(&str, &[usize]) -> anyhow::Result<Tensor>,
    ) -> anyhow::Result<()> {
        let (d_in, c, d_out) = (
            self.modules[j].d_in,
            self.modules[j].c,
            self.modules[j].d_out,
        );
        let v = take(&format!("{comp}.V"), &[d_in, c])?;
        let u = take(&format!("{comp}.U"), &[c, d_out])?;
        let mut layers = vec![];
        let ci_type = self.modules[j].ci_fn_type;
        for (i, (ws, bs)) in ci_layer_shapes(ci_type, &self.ci_fn_hidden_dims, c, d_in)
            .iter()
            .enumerate()
        {
            let w = take(&format!("{ci}.layers.{}.W", 2 * i), ws)?;
            let b = take(&format!("{ci}.layers.{}.b", 2 * i), bs)?;
            layers.push((w, b));
        }
        self.set_parameters(j, &v, &u, &layers)
    }

    /// Replaces module j's parameters (V, U, CI-function layers), checking every shape.
    pub fn set_parameters(
        &mut self,
        j: usize,
        v: &Tensor,
        u: &Tensor,
        ci_layers: &[(Tensor, Tensor)],
    ) -> anyhow::Result<()> {
        let m = &mut self.modules[j];
        if v.dims() != [m.d_in, m.c] || u.dims() != [m.c, m.d_out] {
            anyhow::bail!(
                "module '{}': V {:?} / U {:?} do not match [d_in={}, C={}] / [C, d_out={}]",
                m.name,
                v.dims(),
                u.dims(),
                m.d_in,
                m.c,
                m.d_out
            );
        }
        if ci_layers.len() != m.ci_layers.len() {
            anyhow::bail!(
                "module '{}': {} CI-function layers, expected {}",
                m.name,
                ci_layers.len(),
                m.ci_layers.len()
            );
        }
        for ((w, b), (w0, b0)) in ci_layers.iter().zip(&m.ci_layers) {
            if w.dims() != w0.as_tensor().dims() || b.dims() != b0.as_tensor().dims() {
                anyhow::bail!(
                    "module '{}': CI-function layer shapes {:?}/{:?}, expected {:?}/{:?}",
                    m.name,
                    w.dims(),
                    b.dims(),
                    w0.as_tensor().dims(),
                    b0.as_tensor().dims()
                );
            }
        }
        m.v = Var::from_tensor(&v.contiguous()?)?;
        m.u = Var::from_tensor(&u.contiguous()?)?;
        m.ci_layers = ci_layers
            .iter()
            .map(|(w, b)| {
                Ok((
                    Var::from_tensor(&w.contiguous()?)?,
                    Var::from_tensor(&b.contiguous()?)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(())
    }

    /// Sum of all subcomponents' weights of module j, `[d_out, d_in]`.
    pub fn reconstructed_weight(&self, j: usize) -> Result<Tensor> {
        let m = &self.modules[j];
        m.v.as_tensor().matmul(m.u.as_tensor())?.t()
    }
}

/// clamp(x, 0, 1) with gradient 1 on [0, 1] (boundaries included), 0 outside.
pub fn hard_sigmoid(x: &Tensor) -> Result<Tensor> {
    // y = x·m + c with constant masks m = 1[0 ≤ x ≤ 1], c = 1[x > 1]: the value is the
    // clamp and the gradient is m (PyTorch's clamp gradient includes both boundaries).
    let m = (x.ge(0f32)?.to_dtype(DType::F32)? * x.le(1f32)?.to_dtype(DType::F32)?)?;
    let c = x.gt(1f32)?.to_dtype(DType::F32)?;
    (x * m)? + c
}

/// Smooth approximation of the hard sigmoid (reference `swish_hard`, β = 10).
pub fn swish_hard(x: &Tensor) -> Result<Tensor> {
    let beta = 10.0;
    let z = (x - 0.5)?;
    let s = |t: &Tensor| candle_nn::ops::sigmoid(t);
    let zm = (&z - 0.5)?;
    let zp = (&z + 0.5)?;
    let a = ((&zm * s(&(&zm * -beta)?)?)? - (&z * s(&(&z * beta)?)?)?)?;
    let b = ((&zp * s(&(&zp * beta)?)?)? - (&z * s(&(&z * -beta)?)?)?)?;
    (a + b)? + 0.5
}

fn init_ci_layers(
    kind: CiFnType,
    hidden: &[usize],
    c: usize,
    d_in: usize,
    rng: &mut Rng,
    dev: &Device,
) -> Result<Vec<(Var, Var)>> {
    let mut layers = vec![];
    let sqrt2 = std::f32::consts::SQRT_2;
    match kind {
        CiFnType::Mlp | CiFnType::VectorMlp => {
            let first_in = if kind == CiFnType::Mlp { 1 } else { d_in };
            let mut dims = vec![first_in];
            dims.extend_from_slice(hidden);
            dims.push(1);
            for k in 0..dims.len() - 1 {
                let (fi, fo) = (dims[k], dims[k + 1]);
                let last = k + 2 == dims.len();
                let std = if last { 1.0 } else { sqrt2 } / (fi as f32).sqrt();
                let w = Tensor::from_vec(rng.normal_vec(c * fi * fo, std), (c, fi, fo), dev)?;
                let b = Tensor::zeros((c, fo), DType::F32, dev)?;
                layers.push((Var::from_tensor(&w)?, Var::from_tensor(&b)?));
            }
        }
        CiFnType::SharedMlp => {
            let mut dims = vec![d_in];
            dims.extend_from_slice(hidden);
            dims.push(c);
            for k in 0..dims.len() - 1 {
                let (fi, fo) = (dims[k], dims[k + 1]);
                let last = k + 2 == dims.len();
                let std = if last { 1.0 } else { sqrt2 } / (fi as f32).sqrt();
                let w = Tensor::from_vec(rng.normal_vec(fi * fo, std), (fi, fo), dev)?;
                let b = Tensor::zeros(fo, DType::F32, dev)?;
                layers.push((Var::from_tensor(&w)?, Var::from_tensor(&b)?));
            }
        }
    }
    Ok(layers)
}

/// Expected shapes of the CI-function layers (for loading files).
pub fn ci_layer_shapes(
    kind: CiFnType,
    hidden: &[usize],
    c: usize,
    d_in: usize,
) -> Vec<(Vec<usize>, Vec<usize>)> {
    let mut v = vec![];
    match kind {
        CiFnType::Mlp | CiFnType::VectorMlp => {
            let mut dims = vec![if kind == CiFnType::Mlp { 1 } else { d_in }];
            dims.extend_from_slice(hidden);
            dims.push(1);
            for k in 0..dims.len() - 1 {
                v.push((vec![c, dims[k], dims[k + 1]], vec![c, dims[k + 1]]));
            }
        }
        CiFnType::SharedMlp => {
            let mut dims = vec![d_in];
            dims.extend_from_slice(hidden);
            dims.push(c);
            for k in 0..dims.len() - 1 {
                v.push((vec![dims[k], dims[k + 1]], vec![dims[k + 1]]));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_sigmoid_values_and_grads() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::new(&[-1.0f32, 0.0, 0.5, 1.0, 2.0], &dev)?;
        let y = hard_sigmoid(x.as_tensor())?;
        assert_eq!(y.to_vec1::<f32>()?, vec![0.0, 0.0, 0.5, 1.0, 1.0]);
        let g = y.sum_all()?.backward()?;
        let gx = g.get(x.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert_eq!(gx, vec![0.0, 1.0, 1.0, 1.0, 0.0]);
        Ok(())
    }

    #[test]
    fn swish_hard_approximates_hard_sigmoid() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[-2.0f32, 0.5, 3.0], &dev)?;
        let y = swish_hard(&x)?.to_vec1::<f32>()?;
        assert!(
            y[0].abs() < 0.01 && (y[1] - 0.5).abs() < 0.01 && (y[2] - 1.0).abs() < 0.01,
            "{y:?}"
        );
        Ok(())
    }

    #[test]
    fn every_preset_fits_its_memory_estimate_in_a_laptop() {
        // The estimate refuses only plans beyond the machine; every preset must stay far
        // below a small machine's memory (4 GB).
        for p in crate::presets::PRESETS {
            let cfg = crate::presets::spd_config(p.name).unwrap();
            // The estimate reads shapes only: a random target of the preset's architecture.
            let spec = crate::presets::target_spec(p.name).unwrap();
            let mut rng = crate::rng::Rng::new(0);
            let dev = candle_core::Device::Cpu;
            // Language models are not initialised at random: their shipped target.
            let target = match spec {
                crate::model::TargetSpec::Lm { .. } => {
                    crate::presets::target_model(p.name, &dev).unwrap()
                }
                _ => crate::model::TargetModel::init_random(&spec, &mut rng, false, &dev).unwrap(),
            };
            let picked: Vec<(usize, usize)> = target
                .modules
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    cfg.module_info
                        .iter()
                        .find(|info| fnmatch(&info.module_pattern, &m.name))
                        .map(|info| (i, info.c))
                })
                .collect();
            let bytes = memory_plan_values(&target, &picked, &cfg) * 4;
            assert!(bytes < 4 << 30, "{}: {bytes} bytes", p.name);
        }
    }
}
