//! The reference's language-model families (`spd/pretrain/models` in goodfire-ai/spd at
//! 3f0bb61): `LlamaSimpleMLP`, `LlamaSimple` and `GPT2Simple`, with its parameter names, so
//! its checkpoints (`model_step_<N>.pt` state dicts with `model_config.yaml`) load as they are.
//!
//! All three are pre-norm transformers with tied embeddings (`wte.weight` is `lm_head.weight`):
//! `x = wte[ids] (+ wpe[pos])`, per block `x += o_proj(attn(norm_1(x)))`,
//! `x += mlp(norm_2(x))`, then `logits = ln_f(x) · wteᵀ`.
//! - Llama families: RMSNorm (`rms_1`, `rms_2`, `ln_f`; weight only, eps `rms_norm_eps`),
//!   rotary positions on q and k (half-split pairs (i, i + D/2), θ = p·base^(−2i/D), the whole
//!   head rotated), grouped-query attention (`n_key_value_heads`; query head h reads kv head
//!   h / (H / KV)); MLP `down_proj(gelu_tanh(c_fc(x)))` (LlamaSimpleMLP) or
//!   `down_proj(silu(gate_proj(x)) · up_proj(x))` (LlamaSimple).
//! - GPT2Simple: learned positions `wpe`, LayerNorm (`ln_1`, `ln_2`, `ln_f`; eps 1e-5, biased
//!   variance), multi-head attention, every linear with a bias, MLP
//!   `down_proj(gelu_tanh(c_fc(x)))` of width 4·C.
//!
//! Attention is causal with scale 1/√D. Every decomposable linear (`h.<i>.attn.{q,k,v,o}_proj`,
//! `h.<i>.mlp.*`) goes through a hook that may replace its output (SPD's masked forward).

use crate::spd::ci_op::FusedGelu as _;
use std::collections::HashMap;

use candle_core::{D, DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// The model family (the reference's `model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LmFamily {
    LlamaSimpleMLP,
    LlamaSimple,
    GPT2Simple,
}

/// The architecture: the reference config's fields, with its names and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmConfig {
    pub model_type: LmFamily,
    #[serde(default = "d_block")]
    pub block_size: usize,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_12")]
    pub n_layer: usize,
    #[serde(default = "d_12")]
    pub n_head: usize,
    #[serde(default = "d_embd")]
    pub n_embd: usize,
    /// Llama families: MLP width (a constant default, not derived from n_embd).
    #[serde(default)]
    pub n_intermediate: Option<usize>,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub attn_bias: bool,
    #[serde(default)]
    pub rotary_adjacent_pairs: bool,
    /// Ignored by the reference (the whole head is rotated); kept for round trips.
    #[serde(default)]
    pub rotary_dim: Option<usize>,
    #[serde(default = "d_base")]
    pub rotary_base: f64,
    #[serde(default)]
    pub n_ctx: Option<usize>,
    #[serde(default)]
    pub n_key_value_heads: Option<usize>,
    #[serde(default = "yes")]
    pub use_grouped_query_attention: bool,
    #[serde(default = "yes")]
    pub flash_attention: bool,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
}

fn d_block() -> usize {
    1024
}
fn d_vocab() -> usize {
    50257
}
fn d_12() -> usize {
    12
}
fn d_embd() -> usize {
    768
}
fn d_base() -> f64 {
    10000.0
}
fn d_eps() -> f64 {
    1e-6
}
fn yes() -> bool {
    true
}

impl LmConfig {
    pub fn is_llama(&self) -> bool {
        self.model_type != LmFamily::GPT2Simple
    }
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }
    /// Key/value heads: `n_key_value_heads` (default n_head / 4) for Llama families with
    /// grouped-query attention, else n_head.
    pub fn kv_heads(&self) -> usize {
        if self.is_llama() && self.use_grouped_query_attention {
            self.n_key_value_heads.unwrap_or(self.n_head / 4).max(1)
        } else {
            self.n_head
        }
    }
    /// MLP width.
    pub fn mlp_width(&self) -> usize {
        match self.model_type {
            LmFamily::GPT2Simple => 4 * self.n_embd,
            LmFamily::LlamaSimpleMLP => self.n_intermediate.unwrap_or(3072),
            LmFamily::LlamaSimple => self.n_intermediate.unwrap_or(2048),
        }
    }
    /// Rotary table length (positions beyond it reuse its last row).
    pub fn rotary_len(&self) -> usize {
        self.n_ctx.unwrap_or(1024)
    }
    fn linear_bias(&self, attn: bool) -> bool {
        match self.model_type {
            LmFamily::GPT2Simple => true,
            _ if attn => self.attn_bias,
            _ => self.mlp_bias,
        }
    }

    /// Checks sizes against spdlab's limits and the architecture's own constraints.
    pub fn check(&self) -> std::result::Result<(), crate::limits::LimitError> {
        use crate::limits::{LimitError, MAX_DIM, MAX_LAYERS, check_positive};
        check_positive("model.vocab_size", self.vocab_size, MAX_DIM)?;
        check_positive("model.block_size", self.block_size, MAX_DIM)?;
        check_positive("model.n_embd", self.n_embd, MAX_DIM)?;
        check_positive("model.n_head", self.n_head, MAX_DIM)?;
        check_positive("model.n_layer", self.n_layer, MAX_LAYERS)?;
        check_positive("model MLP width", self.mlp_width(), MAX_DIM)?;
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(LimitError(format!(
                "model.n_embd ({}) must be a multiple of model.n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if self.is_llama() {
            if !self.use_grouped_query_attention {
                return Err(LimitError(
                    "use_grouped_query_attention: false (the fused c_attn layout) is not supported"
                        .into(),
                ));
            }
            if self.rotary_adjacent_pairs {
                return Err(LimitError(
                    "rotary_adjacent_pairs: true is not supported (every reference config uses false)"
                        .into(),
                ));
            }
            let kv = self.kv_heads();
            if !self.n_head.is_multiple_of(kv) {
                return Err(LimitError(format!(
                    "model.n_key_value_heads ({kv}) must divide model.n_head ({})",
                    self.n_head
                )));
            }
            check_positive("model.n_ctx", self.rotary_len(), MAX_DIM)?;
            if !self.head_dim().is_multiple_of(2) {
                return Err(LimitError(
                    "rotary positions need an even head dimension".into(),
                ));
            }
        }
        Ok(())
    }

    /// Parameter keys and shapes, in the reference's state-dict order (`lm_head.weight` is
    /// tied to `wte.weight` and not listed).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, c, i) = (self.vocab_size, self.n_embd, self.mlp_width());
        let kvd = self.kv_heads() * self.head_dim();
        let mut out = vec![("wte.weight".to_string(), vec![v, c])];
        if !self.is_llama() {
            out.push(("wpe.weight".to_string(), vec![self.block_size, c]));
        }
        let norm = |out: &mut Vec<(String, Vec<usize>)>, name: String| {
            out.push((format!("{name}.weight"), vec![c]));
            if !self.is_llama() {
                out.push((format!("{name}.bias"), vec![c]));
            }
        };
        for l in 0..self.n_layer {
            norm(
                &mut out,
                format!("h.{l}.{}", if self.is_llama() { "rms_1" } else { "ln_1" }),
            );
            for (name, o) in [
                ("q_proj", c),
                ("k_proj", kvd),
                ("v_proj", kvd),
                ("o_proj", c),
            ] {
                out.push((format!("h.{l}.attn.{name}.weight"), vec![o, c]));
                if self.linear_bias(true) {
                    out.push((format!("h.{l}.attn.{name}.bias"), vec![o]));
                }
            }
            norm(
                &mut out,
                format!("h.{l}.{}", if self.is_llama() { "rms_2" } else { "ln_2" }),
            );
            for (name, o, inp) in self.mlp_linears(i, c) {
                out.push((format!("h.{l}.mlp.{name}.weight"), vec![o, inp]));
                if self.linear_bias(false) {
                    out.push((format!("h.{l}.mlp.{name}.bias"), vec![o]));
                }
            }
        }
        norm(&mut out, "ln_f".to_string());
        out
    }

    /// The MLP's linears (name, out, in) in execution order.
    fn mlp_linears(&self, i: usize, c: usize) -> Vec<(&'static str, usize, usize)> {
        match self.model_type {
            LmFamily::LlamaSimple => {
                vec![("gate_proj", i, c), ("up_proj", i, c), ("down_proj", c, i)]
            }
            _ => vec![("c_fc", i, c), ("down_proj", c, i)],
        }
    }

    /// Decomposable linears in execution order: (module name, weight key, bias key).
    pub fn linear_modules(&self) -> Vec<(String, String, Option<String>)> {
        let (i, c) = (self.mlp_width(), self.n_embd);
        let mut v = vec![];
        for l in 0..self.n_layer {
            let attn = ["q_proj", "k_proj", "v_proj", "o_proj"].map(|n| (n, true));
            let mlp: Vec<(&str, bool)> = self
                .mlp_linears(i, c)
                .iter()
                .map(|m| (m.0, false))
                .collect();
            for (name, is_attn) in attn.into_iter().chain(mlp) {
                let path = format!("h.{l}.{}.{name}", if is_attn { "attn" } else { "mlp" });
                let bias = self.linear_bias(is_attn).then(|| format!("{path}.bias"));
                v.push((path.clone(), format!("{path}.weight"), bias));
            }
        }
        v
    }
}

/// Removes `lm_head.weight` from a state dict, checking it equals `wte.weight` (every
/// reference family ties them; spdlab stores the tensor once).
pub fn untie(named: &mut Vec<(String, Tensor)>) -> anyhow::Result<()> {
    let Some(i) = named.iter().position(|(k, _)| k == "lm_head.weight") else {
        return Ok(());
    };
    let (_, head) = named.remove(i);
    let (_, wte) = named
        .iter()
        .find(|(k, _)| k == "wte.weight")
        .ok_or_else(|| anyhow::anyhow!("missing tensor 'wte.weight'"))?;
    let d = (head.to_dtype(DType::F32)? - wte.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    if d != 0.0 {
        anyhow::bail!(
            "'lm_head.weight' differs from 'wte.weight' (by up to {d}); the reference ties them"
        );
    }
    Ok(())
}

/// A model's parameters by key.
pub type ParamFn<'a> = dyn Fn(&str) -> &'a Tensor + 'a;

/// Replaces a decomposable linear's output: `(module index, its input [n, d_in])` →
/// `Some(output)` or `None` (the target's own linear).
pub type LinearHook<'a> = dyn FnMut(usize, &Tensor) -> Result<Option<Tensor>> + 'a;

/// A language model of one of the reference's families, with its weights.
#[derive(Clone, Debug)]
pub struct LmModel {
    pub config: LmConfig,
    params: HashMap<String, Tensor>,
    /// (weight `[out, in]` transposed to `[in, out]`, bias) per decomposable linear.
    linears: Vec<(String, Tensor, Option<Tensor>)>,
    /// Rotary cos and sin `[n_ctx, D/2]` (Llama families).
    rotary: Option<(Tensor, Tensor)>,
    device: Device,
}

impl LmModel {
    /// Builds the model from named tensors (a state dict); `lm_head.weight`, when present, must
    /// equal `wte.weight` (tied), and no other key may be missing or extra.
    pub fn new(
        config: LmConfig,
        named: Vec<(String, Tensor)>,
        device: &Device,
    ) -> anyhow::Result<Self> {
        config.check().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut named: Vec<(String, Tensor)> = named
            .into_iter()
            .map(|(k, t)| (k.strip_prefix("_orig_mod.").unwrap_or(&k).to_string(), t))
            .collect();
        untie(&mut named)?;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in named {
            map.insert(k, t.to_dtype(DType::F32)?.to_device(device)?);
        }
        let mut params = HashMap::new();
        for (k, shape) in config.param_shapes() {
            let t = map
                .remove(&k)
                .ok_or_else(|| anyhow::anyhow!("missing tensor '{k}'"))?;
            if t.dims() != shape.as_slice() {
                anyhow::bail!(
                    "tensor '{k}' has shape {:?}, the config needs {shape:?}",
                    t.dims()
                );
            }
            params.insert(k, t);
        }
        if let Some(k) = map.keys().next() {
            anyhow::bail!(
                "unexpected tensor '{k}' for a {:?} model",
                config.model_type
            );
        }
        let mut linears = vec![];
        for (name, wk, bk) in config.linear_modules() {
            let w = params[&wk].t()?.contiguous()?;
            let b = bk.map(|k| params[&k].clone());
            linears.push((name, w, b));
        }
        let rotary = rotary_tables(&config, config.block_size, device)?;
        Ok(LmModel {
            config,
            params,
            linears,
            rotary,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn param(&self, k: &str) -> &Tensor {
        &self.params[k]
    }

    /// Decomposable linear `i` on `x [n, d_in]`.
    pub fn linear(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        let (_, w, b) = &self.linears[i];
        let y = x.matmul(w)?;
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Logits `[b·s, vocab]` of token ids `ids [b, s]` (u32), each decomposable linear through
    /// `hook`. With `patterns`, also collects each block's attention weights `[b, H, s, s]`.
    pub fn forward_hooked(
        &self,
        ids: &Tensor,
        hook: &mut LinearHook,
        patterns: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let mut run = |i: usize, a: &Tensor| -> Result<Tensor> {
            match hook(i, a)? {
                Some(out) => Ok(out),
                None => self.linear(i, a),
            }
        };
        forward_core(
            &self.config,
            &|k| &self.params[k],
            self.rotary.as_ref(),
            ids,
            &mut run,
            patterns,
        )
    }

    /// Logits `[b·s, vocab]` of the target itself.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_hooked(ids, &mut |_, _| Ok(None), None)
    }
}

/// Rotates `[b, heads, s, D]` by position (half-split pairs).
fn rope(rotary: Option<&(Tensor, Tensor)>, x: &Tensor, s: usize) -> Result<Tensor> {
    let Some((cos, sin)) = rotary else {
        return Ok(x.clone());
    };
    let n = cos.dim(0)?;
    let (cos, sin) = if s <= n {
        (cos.narrow(0, 0, s)?, sin.narrow(0, 0, s)?)
    } else {
        // Positions past the table reuse its last row (the reference clamps them).
        let idx: Vec<u32> = (0..s).map(|p| p.min(n - 1) as u32).collect();
        let idx = Tensor::from_vec(idx, s, x.device())?;
        (cos.index_select(&idx, 0)?, sin.index_select(&idx, 0)?)
    };
    let half = cos.dim(1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let (c, sn) = (
        cos.unsqueeze(0)?.unsqueeze(0)?,
        sin.unsqueeze(0)?.unsqueeze(0)?,
    );
    let a = (x1.broadcast_mul(&c)? - x2.broadcast_mul(&sn)?)?;
    let b = (x2.broadcast_mul(&c)? + x1.broadcast_mul(&sn)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

fn norm<'a>(cfg: &LmConfig, param: &ParamFn<'a>, x: &Tensor, name: &str) -> Result<Tensor> {
    let w = param(&format!("{name}.weight"));
    if cfg.is_llama() {
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(var + cfg.rms_norm_eps)?.sqrt()?)?
            .broadcast_mul(w)
    } else {
        let b = param(&format!("{name}.bias"));
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }
}

/// The forward pass of any family: parameters by key, the rotary tables, token ids `[b, s]`,
/// and `run(i, input)` computing decomposable linear i. Logits `[b·s, vocab]`.
pub fn forward_core<'a>(
    cfg: &LmConfig,
    param: &ParamFn<'a>,
    rotary: Option<&(Tensor, Tensor)>,
    ids: &Tensor,
    run: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
    mut patterns: Option<&mut Vec<Tensor>>,
) -> Result<Tensor> {
    let dev = ids.device().clone();
    let (b, s) = ids.dims2()?;
    if s > cfg.block_size {
        return Err(candle_core::Error::Msg(format!(
            "sequences of {s} tokens; the model takes at most {}",
            cfg.block_size
        )));
    }
    let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
    let wte = param("wte.weight");
    let mut x = wte.index_select(&flat, 0)?;
    if !cfg.is_llama() {
        let pos = param("wpe.weight").narrow(0, 0, s)?;
        x = x
            .reshape((b, s, cfg.n_embd))?
            .broadcast_add(&pos.unsqueeze(0)?)?
            .reshape((b * s, cfg.n_embd))?;
    }
    let (h, kv, dh, c) = (cfg.n_head, cfg.kv_heads(), cfg.head_dim(), cfg.n_embd);
    let per = 4 + cfg.mlp_linears(cfg.mlp_width(), c).len();
    let mask = causal_mask(s, &dev)?;
    let (n1, n2) = if cfg.is_llama() {
        ("rms_1", "rms_2")
    } else {
        ("ln_1", "ln_2")
    };
    for l in 0..cfg.n_layer {
        let base = l * per;
        let a = norm(cfg, param, &x, &format!("h.{l}.{n1}"))?;
        let q = run(base, &a)?;
        let k = run(base + 1, &a)?;
        let v = run(base + 2, &a)?;
        let heads = |t: &Tensor, n: usize| t.reshape((b, s, n, dh))?.transpose(1, 2)?.contiguous();
        let q = rope(rotary, &heads(&q, h)?, s)?;
        let mut k = rope(rotary, &heads(&k, kv)?, s)?;
        let mut v = heads(&v, kv)?;
        if kv < h {
            // repeat_interleave over heads: query head j reads kv head j / (h / kv).
            let r = h / kv;
            let rep = |t: &Tensor| -> Result<Tensor> {
                t.unsqueeze(2)?
                    .broadcast_as((b, kv, r, s, dh))?
                    .reshape((b, h, s, dh))
            };
            k = rep(&k)?;
            v = rep(&v)?;
        }
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?;
        let att = super::ih::softmax_last(&scores.broadcast_add(&mask)?)?;
        if let Some(p) = patterns.as_deref_mut() {
            p.push(att.detach());
        }
        let y = att
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * s, c))?;
        x = (x + run(base + 3, &y)?)?;
        let a = norm(cfg, param, &x, &format!("h.{l}.{n2}"))?;
        let m = match cfg.model_type {
            LmFamily::LlamaSimple => {
                let g = run(base + 4, &a)?;
                let u = run(base + 5, &a)?;
                let act = (&g * candle_nn::ops::sigmoid(&g)?)?;
                run(base + 6, &(act * u)?)?
            }
            _ => {
                let f = run(base + 4, &a)?.gelu_tanh_fused()?;
                run(base + 5, &f)?
            }
        };
        x = (x + m)?;
    }
    let x = norm(cfg, param, &x, "ln_f")?;
    x.matmul(&wte.t()?)
}

/// Rotary cos and sin tables `[min(n_ctx, rows), D/2]` of a Llama-family config (None for
/// GPT2Simple); `rows`: the longest sequence it will see (positions past n_ctx reuse its last
/// row, so a table longer than the sequences is never read).
pub fn rotary_tables(
    config: &LmConfig,
    rows: usize,
    device: &Device,
) -> Result<Option<(Tensor, Tensor)>> {
    if !config.is_llama() {
        return Ok(None);
    }
    let (n, d) = (config.rotary_len().min(rows.max(1)), config.head_dim());
    let half = d / 2;
    let (mut cos, mut sin) = (vec![0f32; n * half], vec![0f32; n * half]);
    for p in 0..n {
        for i in 0..half {
            // The reference: freq = base^(i / (D/2)) in f32, angle = p / freq.
            let freq = (config.rotary_base as f32).powf(i as f32 / half as f32);
            let a = p as f32 / freq;
            cos[p * half + i] = a.cos();
            sin[p * half + i] = a.sin();
        }
    }
    Ok(Some((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    )))
}

/// Additive causal mask `[s, s]`.
fn causal_mask(s: usize, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; s * s];
    for q in 0..s {
        for k in q + 1..s {
            m[q * s + k] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (s, s), dev)
}

/// Opens a language model: a reference pretraining checkpoint (`model_step_<N>.pt`, its
/// `model_config.yaml` two folders up, as `PretrainRunInfo.from_path` reads it), a folder
/// holding `model_config.yaml` and `checkpoints/` (the newest checkpoint), or a
/// `.safetensors` file with a `model_config.yaml` (or `config.json`) beside it.
pub fn load(path: &std::path::Path, device: &Device) -> anyhow::Result<LmModel> {
    use std::path::{Path, PathBuf};
    let err = |m: String| anyhow::anyhow!("{}: {m}", path.display());
    let ckpt: PathBuf = if path.is_dir() {
        let dir = path.join("checkpoints");
        let mut best: Option<(usize, PathBuf)> = None;
        for e in std::fs::read_dir(&dir)
            .map_err(|e| {
                err(format!(
                    "no checkpoints/ folder ({e}); give a model_step_<N>.pt"
                ))
            })?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("model_step_")
                .and_then(|r| r.strip_suffix(".pt"))
                .and_then(|r| r.parse::<usize>().ok())
                && best.as_ref().is_none_or(|(b, _)| n > *b)
            {
                best = Some((n, e.path()));
            }
        }
        best.map(|(_, p)| p)
            .ok_or_else(|| err("no checkpoints/model_step_<N>.pt".into()))?
    } else {
        path.to_path_buf()
    };
    let parent = ckpt.parent().unwrap_or(Path::new("."));
    let candidates = [
        parent.join("model_config.yaml"),
        parent.join("config.json"),
        parent.join("..").join("model_config.yaml"),
    ];
    let cfg_path = candidates
        .iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            err("no model_config.yaml beside it or two folders up (the reference's pretraining run layout)".into())
        })?;
    let text = std::fs::read_to_string(cfg_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", cfg_path.display()))?;
    crate::limits::check("config size", text.len(), 1 << 20)?;
    let config: LmConfig = serde_yaml_ng::from_str(&text).map_err(|e| {
        anyhow::anyhow!("{}: not a reference model config: {e}", cfg_path.display())
    })?;
    config
        .check()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?;
    let named: Vec<(String, Tensor)> = if ckpt.extension().is_some_and(|e| e == "safetensors") {
        let bytes = std::fs::read(&ckpt)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", ckpt.display()))?;
        crate::io::spdlab_file::read_tensors(&bytes, device)
            .map_err(|e| anyhow::anyhow!("{}: {e}", ckpt.display()))?
    } else {
        crate::io::pth::read_pth(&ckpt)?
            .into_iter()
            .map(|t| Ok((t.name, Tensor::from_vec(t.data, t.shape, device)?)))
            .collect::<anyhow::Result<_>>()?
    };
    LmModel::new(config, named, device).map_err(|e| anyhow::anyhow!("{}: {e}", ckpt.display()))
}
