//! Target models: the networks SPD takes apart.
//!
//! A model exposes its decomposable linear maps ("decomposed modules", in execution order) and a
//! forward pass with a hook: at every decomposed module the hook sees the module's input and may
//! return a replacement output (the masked subcomponents), exactly like the reference's PyTorch
//! forward hooks.

pub mod days;
pub mod ih;
pub mod lm;
mod train;

pub use ih::IhDims;

pub use train::{TargetTrainConfig, induction_accuracy, train_target};

use crate::spd::ci_op::FusedGelu as _;
use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActFn {
    Relu,
    Gelu,
}

/// Architecture of a target model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetSpec {
    /// Toy model of superposition: ReLU(W2·H(W1·x) + b), W2 = W1ᵀ when tied.
    Tms {
        n_features: usize,
        n_hidden: usize,
        #[serde(default)]
        n_hidden_layers: usize,
        #[serde(default = "yes")]
        tied_weights: bool,
    },
    /// Residual MLP: r = x·W_E; r += mlp_out(act(mlp_in(r))) per layer; out = r·W_U.
    ResidMlp {
        n_features: usize,
        d_embed: usize,
        d_mlp: usize,
        n_layers: usize,
        #[serde(default = "relu")]
        act_fn: ActFn,
        #[serde(default)]
        in_bias: bool,
        #[serde(default)]
        out_bias: bool,
    },
    /// Day-of-week arithmetic (see [`days`]): one-hot day ⊕ one-hot operation → day logits.
    /// Weights are constructed analytically by [`days::days_target`].
    Days { n_days: usize, n_ops: usize },
    /// The reference's induction-head transformer (see [`ih`]): token ids `[batch, seq]` in,
    /// logits per position out.
    Ih(IhDims),
    /// A language model of the reference's families (see [`lm`]): token ids `[batch, seq]` in
    /// (`seq_len`: the decomposition's sequence length, at most the model's `block_size`),
    /// logits per position out.
    Lm { model: lm::LmConfig, seq_len: usize },
}

fn yes() -> bool {
    true
}
fn relu() -> ActFn {
    ActFn::Relu
}

impl TargetSpec {
    pub fn n_features(&self) -> usize {
        match self {
            TargetSpec::Tms { n_features, .. } | TargetSpec::ResidMlp { n_features, .. } => {
                *n_features
            }
            TargetSpec::Days { n_days, n_ops } => n_days + n_ops - 1,
            // One input row is one sequence of token ids.
            TargetSpec::Ih(d) => d.seq_len,
            TargetSpec::Lm { seq_len, .. } => *seq_len,
        }
    }
    /// True for models whose input rows are token sequences: every decomposed module then
    /// sees one row per position, and outputs are per position.
    pub fn is_sequence(&self) -> bool {
        matches!(self, TargetSpec::Ih(_) | TargetSpec::Lm { .. })
    }
    /// Rows each decomposed module sees per input row (positions of a sequence, else 1).
    pub fn positions(&self) -> usize {
        match self {
            TargetSpec::Ih(d) => d.seq_len,
            TargetSpec::Lm { seq_len, .. } => *seq_len,
            _ => 1,
        }
    }
    /// Outputs per module-input row (per position for sequence models).
    pub fn n_outputs(&self) -> usize {
        match self {
            TargetSpec::Days { n_days, .. } => *n_days,
            TargetSpec::Ih(d) => d.n_tokens(),
            TargetSpec::Lm { model, .. } => model.vocab_size,
            _ => self.n_features(),
        }
    }
    /// Input features come in groups (size, optional) with exactly one active feature per
    /// group (value one), or none for an optional group, when set. Every option (none
    /// included) is equally likely.
    pub fn input_groups(&self) -> Option<Vec<(usize, bool)>> {
        match self {
            TargetSpec::Days { n_days, n_ops } => Some(vec![(*n_days, false), (n_ops - 1, true)]),
            _ => None,
        }
    }
    pub fn family(&self) -> &'static str {
        match self {
            TargetSpec::Tms { .. } => "tms",
            TargetSpec::ResidMlp { .. } => "resid_mlp",
            TargetSpec::Days { .. } => "days",
            TargetSpec::Ih(_) => "ih",
            TargetSpec::Lm { .. } => "lm",
        }
    }
    /// Checks every size against spdlab's limits (a file or config sets them), before
    /// anything is allocated or looped over.
    pub fn check_limits(&self) -> std::result::Result<(), crate::limits::LimitError> {
        use crate::limits::{LimitError, MAX_DIM, MAX_LAYERS, check, check_positive};
        match self {
            TargetSpec::Tms {
                n_features,
                n_hidden,
                n_hidden_layers,
                ..
            } => {
                check_positive("target.n_features", *n_features, MAX_DIM)?;
                check_positive("target.n_hidden", *n_hidden, MAX_DIM)?;
                check("target.n_hidden_layers", *n_hidden_layers, MAX_LAYERS)
            }
            TargetSpec::ResidMlp {
                n_features,
                d_embed,
                d_mlp,
                n_layers,
                ..
            } => {
                check_positive("target.n_features", *n_features, MAX_DIM)?;
                check_positive("target.d_embed", *d_embed, MAX_DIM)?;
                check_positive("target.d_mlp", *d_mlp, MAX_DIM)?;
                check_positive("target.n_layers", *n_layers, MAX_LAYERS)
            }
            TargetSpec::Days { n_days, n_ops } => {
                days::check_spec(*n_days, *n_ops).map_err(|e| LimitError(e.to_string()))
            }
            TargetSpec::Ih(d) => {
                check_positive("target.vocab_size", d.vocab_size, MAX_DIM)?;
                check_positive("target.seq_len", d.seq_len, MAX_DIM)?;
                check_positive("target.d_model", d.d_model, MAX_DIM)?;
                check_positive("target.n_heads", d.n_heads, MAX_DIM)?;
                check_positive("target.n_layers", d.n_layers, MAX_LAYERS)?;
                check_positive("target.ff_fanout", d.ff_fanout, MAX_DIM)?;
                if d.d_model % d.n_heads != 0 {
                    return Err(LimitError(format!(
                        "target.d_model ({}) must be a multiple of target.n_heads ({})",
                        d.d_model, d.n_heads
                    )));
                }
                let f = crate::limits::product(
                    "target.d_model × ff_fanout",
                    &[d.d_model, d.ff_fanout],
                )?;
                check("target.d_model × ff_fanout", f, MAX_DIM)
            }
            TargetSpec::Lm { model, seq_len } => {
                model.check()?;
                check_positive("target.seq_len", *seq_len, model.block_size)?;
                // Attention keeps [heads, seq, seq] scores per sequence.
                check_positive("target.seq_len", *seq_len, crate::limits::MAX_LM_SEQ_LEN)
            }
        }
    }

    /// Default feature value range of the task.
    pub fn value_range(&self) -> (f32, f32) {
        match self {
            TargetSpec::Tms { .. } => (0.0, 1.0),
            TargetSpec::ResidMlp { .. } => (-1.0, 1.0),
            TargetSpec::Days { .. } => (1.0, 1.0),
            TargetSpec::Ih(d) => (0.0, d.induction_token() as f32),
            TargetSpec::Lm { model, .. } => (0.0, model.vocab_size.saturating_sub(1) as f32),
        }
    }

    /// Parameter names (reference state-dict keys), shapes, and whether SPD treats them as
    /// frozen non-decomposed parameters. Order = the reference's state-dict order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            TargetSpec::Tms {
                n_features,
                n_hidden,
                n_hidden_layers,
                ..
            } => {
                let mut v = vec![
                    ("linear1.weight".to_string(), vec![*n_hidden, *n_features]),
                    ("linear2.weight".to_string(), vec![*n_features, *n_hidden]),
                    ("linear2.bias".to_string(), vec![*n_features]),
                ];
                for i in 0..*n_hidden_layers {
                    v.push((
                        format!("hidden_layers.{i}.weight"),
                        vec![*n_hidden, *n_hidden],
                    ));
                }
                v
            }
            TargetSpec::ResidMlp {
                n_features,
                d_embed,
                d_mlp,
                n_layers,
                in_bias,
                out_bias,
                ..
            } => {
                let mut v = vec![
                    ("W_E".to_string(), vec![*n_features, *d_embed]),
                    ("W_U".to_string(), vec![*d_embed, *n_features]),
                ];
                for l in 0..*n_layers {
                    v.push((format!("layers.{l}.mlp_in.weight"), vec![*d_mlp, *d_embed]));
                    if *in_bias {
                        v.push((format!("layers.{l}.mlp_in.bias"), vec![*d_mlp]));
                    }
                    v.push((format!("layers.{l}.mlp_out.weight"), vec![*d_embed, *d_mlp]));
                    if *out_bias {
                        v.push((format!("layers.{l}.mlp_out.bias"), vec![*d_embed]));
                    }
                }
                v
            }
            TargetSpec::Days { n_days, n_ops } => {
                let n_rot = n_ops.saturating_sub(1);
                let (d_model, d_mlp) = (2 + n_rot, 3 * n_rot);
                vec![
                    ("embed.weight".into(), vec![d_model, n_days + n_rot]),
                    ("mlp_in.weight".into(), vec![d_mlp, d_model]),
                    ("mlp_in.bias".into(), vec![d_mlp]),
                    ("mlp_out.weight".into(), vec![d_model, d_mlp]),
                    ("unembed.weight".into(), vec![*n_days, d_model]),
                ]
            }
            TargetSpec::Ih(d) => d.param_shapes(),
            TargetSpec::Lm { model, .. } => model.param_shapes(),
        }
    }

    /// Decomposable linear maps in execution order: (name, weight key, bias key).
    pub fn linear_modules(&self) -> Vec<(String, String, Option<String>)> {
        match self {
            TargetSpec::Tms {
                n_hidden_layers, ..
            } => {
                let mut v = vec![("linear1".to_string(), "linear1.weight".to_string(), None)];
                for i in 0..*n_hidden_layers {
                    v.push((
                        format!("hidden_layers.{i}"),
                        format!("hidden_layers.{i}.weight"),
                        None,
                    ));
                }
                v.push((
                    "linear2".to_string(),
                    "linear2.weight".to_string(),
                    Some("linear2.bias".to_string()),
                ));
                v
            }
            TargetSpec::ResidMlp {
                n_layers,
                in_bias,
                out_bias,
                ..
            } => {
                let mut v = vec![];
                for l in 0..*n_layers {
                    v.push((
                        format!("layers.{l}.mlp_in"),
                        format!("layers.{l}.mlp_in.weight"),
                        in_bias.then(|| format!("layers.{l}.mlp_in.bias")),
                    ));
                    v.push((
                        format!("layers.{l}.mlp_out"),
                        format!("layers.{l}.mlp_out.weight"),
                        out_bias.then(|| format!("layers.{l}.mlp_out.bias")),
                    ));
                }
                v
            }
            TargetSpec::Days { .. } => vec![
                ("embed".into(), "embed.weight".into(), None),
                (
                    "mlp_in".into(),
                    "mlp_in.weight".into(),
                    Some("mlp_in.bias".into()),
                ),
                ("mlp_out".into(), "mlp_out.weight".into(), None),
            ],
            TargetSpec::Ih(d) => d.linear_modules(),
            TargetSpec::Lm { model, .. } => model.linear_modules(),
        }
    }
}

/// One decomposable linear map of the target: out = x·Wᵀ + b.
#[derive(Clone, Debug)]
pub struct LinearModule {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    /// `[d_out, d_in]` (nn.Linear layout).
    pub weight: Tensor,
    /// `[d_in, d_out]`, contiguous, for fast forward passes.
    pub weight_t: Tensor,
    pub bias: Option<Tensor>,
}

impl LinearModule {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight_t)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// A target model with its (frozen) weights.
#[derive(Clone, Debug)]
pub struct TargetModel {
    pub spec: TargetSpec,
    /// Parameters by reference state-dict key, in [`TargetSpec::param_shapes`] order.
    pub params: Vec<(String, Tensor)>,
    pub modules: Vec<LinearModule>,
    /// Language models: the rotary cos/sin tables for the spec's sequence length (built
    /// once, not per forward).
    rotary: Option<(Tensor, Tensor)>,
    device: Device,
}

/// A module input or output, either dense `[n, d]` or in factored form Σ coeffᵢ·basisᵢ with
/// `coeffᵢ [n, kᵢ]` and `basisᵢ [kᵢ, d]` (None = identity). The residual stream of a residual
/// MLP is kept factored (x·W_E + Σ h·W_outᵀ + ...), so a read r·M costs Σ coeffᵢ·(basisᵢ·M)
/// with the small products basisᵢ·M shared through a [`Fold`] cache, instead of a GEMM over
/// the 1000-wide stream.
#[derive(Clone, Debug)]
pub enum Act {
    Dense(Tensor),
    Factored(Vec<(Tensor, Option<Tensor>)>),
}

/// Per-call cache of products basis·M (keyed by tensor identity). Create one per forward or
/// per training step; never keep it across parameter updates.
#[derive(Default)]
pub struct Fold {
    cache: std::cell::RefCell<
        std::collections::HashMap<(candle_core::TensorId, candle_core::TensorId), Tensor>,
    >,
}

impl Fold {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn product(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let key = (a.id(), b.id());
        if let Some(t) = self.cache.borrow().get(&key) {
            return Ok(t.clone());
        }
        let t = a.matmul(b)?;
        self.cache.borrow_mut().insert(key, t.clone());
        Ok(t)
    }
}

impl Act {
    /// self · m, `[n, m_cols]`.
    pub fn apply(&self, m: &Tensor, fold: &Fold) -> Result<Tensor> {
        match self {
            Act::Dense(t) => t.matmul(m),
            Act::Factored(terms) => sum_terms(terms, |coeff, basis| match basis {
                Some(b) => coeff.matmul(&fold.product(b, m)?),
                None => coeff.matmul(m),
            }),
        }
    }

    /// The dense tensor `[n, d]`.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Act::Dense(t) => Ok(t.clone()),
            Act::Factored(terms) => sum_terms(terms, |coeff, basis| match basis {
                Some(b) => coeff.matmul(b),
                None => Ok(coeff.clone()),
            }),
        }
    }

    pub fn rows(&self) -> Result<usize> {
        match self {
            Act::Dense(t) => t.dim(0),
            Act::Factored(terms) => terms[0].0.dim(0),
        }
    }
}

/// Σ over factored terms of `f(coeff, basis)`.
fn sum_terms(
    terms: &[(Tensor, Option<Tensor>)],
    f: impl Fn(&Tensor, &Option<Tensor>) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (coeff, basis) in terms {
        let y = f(coeff, basis)?;
        acc = Some(match acc {
            Some(a) => (a + y)?,
            None => y,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("empty factored activation".into()))
}

/// Hook called at every decomposed module with (module index, module input, fold cache).
/// Returning `Some(out)` replaces the module's output.
pub type ModuleHook<'a> = dyn FnMut(usize, &Act, &Fold) -> Result<Option<Act>> + 'a;

impl TargetModel {
    /// Builds a model from named parameters, checking every shape against the spec.
    pub fn new(
        spec: TargetSpec,
        named: Vec<(String, Tensor)>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        spec.check_limits()?;
        let mut named = named;
        if matches!(spec, TargetSpec::Lm { .. }) {
            // Tied to wte.weight in every reference family: stored once.
            lm::untie(&mut named)?;
        }
        let mut params = vec![];
        for (key, shape) in spec.param_shapes() {
            let t = named
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, t)| t.clone());
            let t = match (t, key.as_str()) {
                (Some(t), _) => t,
                // W_U is tied to W_Eᵀ in canonical resid-MLP targets; accept it missing.
                (None, "W_U") => named
                    .iter()
                    .find(|(k, _)| k == "W_E")
                    .map(|(_, t)| t.t())
                    .transpose()?
                    .ok_or_else(|| anyhow::anyhow!("missing target parameter 'W_E'"))?,
                (None, "linear2.weight")
                    if matches!(
                        spec,
                        TargetSpec::Tms {
                            tied_weights: true,
                            ..
                        }
                    ) =>
                {
                    named
                        .iter()
                        .find(|(k, _)| k == "linear1.weight")
                        .map(|(_, t)| t.t())
                        .transpose()?
                        .ok_or_else(|| {
                            anyhow::anyhow!("missing target parameter 'linear1.weight'")
                        })?
                }
                (None, _) => anyhow::bail!("missing target parameter '{key}'"),
            };
            if t.dims() != shape.as_slice() {
                anyhow::bail!(
                    "target parameter '{key}' has shape {:?}, the {} spec needs {:?}",
                    t.dims(),
                    spec.family(),
                    shape
                );
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if let Some(bad) = v.iter().position(|x| !x.is_finite()) {
                anyhow::bail!(
                    "target parameter '{key}' contains a non-finite value ({}) at flat index {bad}",
                    v[bad]
                );
            }
            params.push((key, t));
        }
        for (k, _) in &named {
            if !params.iter().any(|(p, _)| p == k) {
                anyhow::bail!(
                    "unexpected target parameter '{k}' for a {} model",
                    spec.family()
                );
            }
        }
        let rotary = match &spec {
            TargetSpec::Lm { model, seq_len } => lm::rotary_tables(model, *seq_len, device)?,
            _ => None,
        };
        let mut model = TargetModel {
            spec,
            params,
            modules: vec![],
            rotary,
            device: device.clone(),
        };
        model.modules = model.build_modules()?;
        Ok(model)
    }

    fn build_modules(&self) -> Result<Vec<LinearModule>> {
        let mut out = vec![];
        for (name, wkey, bkey) in self.spec.linear_modules() {
            let w = self.param(&wkey).clone();
            let (d_out, d_in) = w.dims2()?;
            out.push(LinearModule {
                name,
                d_in,
                d_out,
                weight_t: w.t()?.contiguous()?,
                weight: w,
                bias: bkey.map(|k| self.param(&k).clone()),
            });
        }
        Ok(out)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn param(&self, key: &str) -> &Tensor {
        &self
            .params
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("no parameter {key}"))
            .1
    }

    pub fn module_index(&self, name: &str) -> Option<usize> {
        self.modules.iter().position(|m| m.name == name)
    }

    /// Random initialisation as the reference does it (PyTorch default Linear init; unit-norm
    /// random embedding for the residual MLP). Used to train new targets.
    pub fn init_random(
        spec: &TargetSpec,
        rng: &mut Rng,
        zero_bias: bool,
        device: &Device,
    ) -> anyhow::Result<Self> {
        if let TargetSpec::Days { n_days, n_ops } = spec {
            // Constructed, not trained: the ground truth is the point of this target.
            return days::days_target(*n_days, *n_ops, device);
        }
        if let TargetSpec::Ih(d) = spec {
            return ih::init_random(d, rng, device);
        }
        if let TargetSpec::Lm { .. } = spec {
            anyhow::bail!(
                "language-model targets come from the reference's pretraining (a model_step_<N>.pt with its model_config.yaml); spdlab does not train them"
            );
        }
        let mut named = vec![];
        let uniform = |rng: &mut Rng, n: usize, bound: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.uniform_f32() * 2.0 - 1.0) * bound)
                .collect()
        };
        for (key, shape) in spec.param_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if key == "W_E" {
                let (nf, d) = (shape[0], shape[1]);
                let mut v = rng.normal_vec(nf * d, 1.0);
                for r in 0..nf {
                    let row = &mut v[r * d..(r + 1) * d];
                    let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    row.iter_mut().for_each(|x| *x /= norm);
                }
                v
            } else if key == "W_U" {
                continue; // tied to W_Eᵀ below
            } else if key.starts_with("hidden_layers.") {
                // "-id" variants: frozen identity hidden layers.
                let d = shape[0];
                (0..n)
                    .map(|i| if i / d == i % d { 1.0 } else { 0.0 })
                    .collect()
            } else if key.ends_with(".bias") {
                if zero_bias {
                    vec![0.0; n]
                } else {
                    let fan_in = match spec {
                        TargetSpec::Tms { n_hidden, .. } => *n_hidden,
                        TargetSpec::ResidMlp { d_embed, d_mlp, .. } => {
                            if key.contains("mlp_in") {
                                *d_embed
                            } else {
                                *d_mlp
                            }
                        }
                        TargetSpec::Days { .. } | TargetSpec::Ih(_) | TargetSpec::Lm { .. } => {
                            unreachable!("constructed above")
                        }
                    };
                    uniform(rng, n, 1.0 / (fan_in as f32).sqrt())
                }
            } else if key == "linear2.weight" {
                continue; // tied
            } else {
                uniform(rng, n, 1.0 / (shape[1] as f32).sqrt())
            };
            named.push((key, Tensor::from_vec(data, shape, device)?));
        }
        if let TargetSpec::Tms {
            tied_weights: false,
            n_features,
            n_hidden,
            ..
        } = spec
        {
            let data = uniform(rng, n_features * n_hidden, 1.0 / (*n_hidden as f32).sqrt());
            named.push((
                "linear2.weight".into(),
                Tensor::from_vec(data, (*n_features, *n_hidden), device)?,
            ));
        }
        Self::new(spec.clone(), named, device)
    }

    /// Plain target forward pass.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_hooked(x, &Fold::new(), &mut |_, _, _| Ok(None))
    }

    /// Target forward that also returns every decomposed module's input.
    pub fn forward_with_inputs(&self, x: &Tensor, fold: &Fold) -> Result<(Tensor, Vec<Act>)> {
        let mut inputs = Vec::with_capacity(self.modules.len());
        let out = self.forward_hooked(x, fold, &mut |_, a, _| {
            inputs.push(a.clone());
            Ok(None)
        })?;
        Ok((out, inputs))
    }

    /// Output of target module i on a (possibly factored) input, as a dense tensor.
    pub fn module_forward(&self, i: usize, a: &Act, fold: &Fold) -> Result<Tensor> {
        let m = &self.modules[i];
        let y = a.apply(&m.weight_t, fold)?;
        match &m.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Forward pass in which `hook` may replace any decomposed module's output.
    pub fn forward_hooked(&self, x: &Tensor, fold: &Fold, hook: &mut ModuleHook) -> Result<Tensor> {
        match &self.spec {
            TargetSpec::Tms {
                n_hidden_layers, ..
            } => {
                let mut h = Act::Dense(x.clone());
                for i in 0..n_hidden_layers + 2 {
                    h = Act::Dense(match hook(i, &h, fold)? {
                        Some(out) => out.dense()?,
                        None => self.module_forward(i, &h, fold)?,
                    });
                }
                h.dense()?.relu()
            }
            TargetSpec::ResidMlp {
                n_layers, act_fn, ..
            } => {
                let mut stream: Vec<(Tensor, Option<Tensor>)> =
                    vec![(x.clone(), Some(self.param("W_E").clone()))];
                for l in 0..*n_layers {
                    let r = Act::Factored(stream.clone());
                    let pre = match hook(2 * l, &r, fold)? {
                        Some(out) => out.dense()?,
                        None => self.module_forward(2 * l, &r, fold)?,
                    };
                    let act = match act_fn {
                        ActFn::Relu => pre.relu()?,
                        ActFn::Gelu => pre.gelu_erf_fused()?,
                    };
                    let a = Act::Dense(act);
                    match hook(2 * l + 1, &a, fold)? {
                        Some(Act::Factored(terms)) => stream.extend(terms),
                        Some(Act::Dense(t)) => stream.push((t, None)),
                        None => {
                            let m = &self.modules[2 * l + 1];
                            let Act::Dense(act) = a else { unreachable!() };
                            stream.push((act, Some(m.weight_t.clone())));
                            if let Some(b) = &m.bias {
                                let n = x.dim(0)?;
                                stream.push((
                                    Tensor::ones((n, 1), DType::F32, x.device())?,
                                    Some(b.unsqueeze(0)?),
                                ));
                            }
                        }
                    }
                }
                Act::Factored(stream).apply(self.param("W_U"), fold)
            }
            TargetSpec::Days { .. } => {
                let mut run = |i: usize, a: &Act| -> Result<Tensor> {
                    match hook(i, a, fold)? {
                        Some(out) => out.dense(),
                        None => self.module_forward(i, a, fold),
                    }
                };
                let r = run(0, &Act::Dense(x.clone()))?;
                let pre = run(1, &Act::Dense(r.clone()))?;
                let delta = run(2, &Act::Dense(pre.relu()?))?;
                (r + delta)?.matmul(&self.param("unembed.weight").t()?)
            }
            TargetSpec::Ih(d) => self.ih_forward(d, x, fold, hook, None),
            TargetSpec::Lm { model, .. } => self.lm_forward(model, x, fold, hook, None),
        }
    }

    /// The forward pass of a language model (see [`lm`]); logits `[b·s, vocab]`. With
    /// `patterns`, also each block's attention weights `[b, heads, s, s]`.
    pub(crate) fn lm_forward(
        &self,
        cfg: &lm::LmConfig,
        x: &Tensor,
        fold: &Fold,
        hook: &mut ModuleHook,
        patterns: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let mut run = |i: usize, a: &Tensor| -> Result<Tensor> {
            let a = Act::Dense(a.clone());
            match hook(i, &a, fold)? {
                Some(out) => out.dense(),
                None => self.module_forward(i, &a, fold),
            }
        };
        lm::forward_core(
            cfg,
            &|k| self.param(k),
            self.rotary.as_ref(),
            x,
            &mut run,
            patterns,
        )
    }

    /// True when an all-zero input row reaches every decomposed module as an all-zero input
    /// (no biases before the last module). Then the masked model reproduces the target exactly
    /// on zero rows, which the trainer exploits.
    pub fn zero_input_is_inert(&self) -> Result<bool> {
        if self.spec.is_sequence() {
            // An all-zero row is a sequence of BOS tokens, which has an embedding.
            return Ok(false);
        }
        let x = Tensor::zeros((1, self.spec.n_features()), DType::F32, &self.device)?;
        let (_, inputs) = self.forward_with_inputs(&x, &Fold::new())?;
        for a in inputs {
            if a.dense()?.abs()?.max_all()?.to_scalar::<f32>()? != 0.0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tms_forward_matches_formula() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let spec = TargetSpec::Tms {
            n_features: 3,
            n_hidden: 2,
            n_hidden_layers: 0,
            tied_weights: true,
        };
        let w = Tensor::new(&[[1f32, 0., -1.], [0.5, 2., 0.]], &dev)?;
        let b = Tensor::new(&[0.1f32, -0.2, 0.0], &dev)?;
        let m = TargetModel::new(
            spec,
            vec![("linear1.weight".into(), w), ("linear2.bias".into(), b)],
            &dev,
        )?;
        let x = Tensor::new(&[[1f32, 1., 0.]], &dev)?;
        // h = W x = [1, 2.5]; out = relu(Wᵀ h + b) = relu([1+1.25+0.1, 5-0.2, -1]) = [2.35, 4.8, 0]
        let out = m.forward(&x)?.to_vec2::<f32>()?;
        assert!((out[0][0] - 2.35).abs() < 1e-6 && (out[0][1] - 4.8).abs() < 1e-6);
        assert_eq!(out[0][2], 0.0);
        assert!(m.zero_input_is_inert()?);
        Ok(())
    }

    #[test]
    fn shape_and_nan_errors() {
        let dev = Device::Cpu;
        let spec = TargetSpec::Tms {
            n_features: 3,
            n_hidden: 2,
            n_hidden_layers: 0,
            tied_weights: true,
        };
        let w = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let e = TargetModel::new(
            spec.clone(),
            vec![
                ("linear1.weight".into(), w),
                ("linear2.bias".into(), b.clone()),
            ],
            &dev,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("linear1.weight") && e.contains("shape"), "{e}");
        let w = Tensor::new(&[[1f32, f32::NAN, 0.], [0., 0., 0.]], &dev).unwrap();
        let e = TargetModel::new(
            spec,
            vec![("linear1.weight".into(), w), ("linear2.bias".into(), b)],
            &dev,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("non-finite"), "{e}");
    }
}
