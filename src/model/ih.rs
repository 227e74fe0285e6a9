//! The reference's induction-head transformer (`spd/experiments/ih/model.py` in goodfire-ai/spd):
//! token embedding, blocks of causal multi-head self-attention (Shortformer-style: a fixed
//! sinusoidal table added to the outputs of the q and k projections, never to the residual
//! stream or to v), an optional MLP per block, optional layer norms, and an unembedding.
//!
//! Inputs are token ids `[batch, seq]` (as f32); every decomposed module sees one row per
//! token position (`[batch·seq, d]`), so causal importances, masks and L0 are per position,
//! and the logits are `[batch·seq, vocab + 2]`.
//!
//! Token ids: 0 is BOS, 1..=vocab ordinary tokens, vocab + 1 the induction token "S".

use crate::spd::ci_op::FusedGelu as _;
use candle_core::{DType, Device, Result, Tensor};

use super::{Act, Fold, ModuleHook, TargetModel};

/// The architecture (the reference's `InductionModelConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IhDims {
    pub vocab_size: usize,
    pub seq_len: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    #[serde(default = "four")]
    pub ff_fanout: usize,
    #[serde(default)]
    pub use_ff: bool,
    #[serde(default = "yes")]
    pub use_pos_encoding: bool,
    #[serde(default)]
    pub use_layer_norm: bool,
}

fn four() -> usize {
    4
}
fn yes() -> bool {
    true
}

impl IhDims {
    /// The reference's defaults: attention only (no MLP, `ff_fanout` 4 unused), positional
    /// table on q and k, no layer norms.
    pub fn attention_only(
        vocab_size: usize,
        seq_len: usize,
        d_model: usize,
        n_heads: usize,
        n_layers: usize,
    ) -> Self {
        IhDims {
            vocab_size,
            seq_len,
            d_model,
            n_heads,
            n_layers,
            ff_fanout: 4,
            use_ff: false,
            use_pos_encoding: true,
            use_layer_norm: false,
        }
    }

    /// Embedding and unembedding rows: the vocabulary plus BOS and the induction token.
    pub fn n_tokens(&self) -> usize {
        self.vocab_size + 2
    }
    pub fn bos(&self) -> usize {
        0
    }
    pub fn induction_token(&self) -> usize {
        self.vocab_size + 1
    }
    pub fn d_head(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }
    /// Decomposable linears per block (q, k, v, out, and fc1, fc2 with the MLP).
    pub fn modules_per_block(&self) -> usize {
        if self.use_ff { 6 } else { 4 }
    }

    /// Parameter keys and shapes in the reference's state-dict order (`pe` buffers included:
    /// they are stored in `ih.pth`).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, s, d) = (self.n_tokens(), self.seq_len, self.d_model);
        let f = d * self.ff_fanout;
        let mut out = vec![
            ("token_embed.weight".to_string(), vec![v, d]),
            ("pos.pe".to_string(), vec![1, s, d]),
        ];
        for l in 0..self.n_layers {
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push((format!("blocks.{l}.attn.{p}.weight"), vec![d, d]));
            }
            if self.use_pos_encoding {
                out.push((format!("blocks.{l}.attn.pos_enc.pe"), vec![1, s, d]));
            }
            if self.use_ff {
                out.push((format!("blocks.{l}.ff.fc1.weight"), vec![f, d]));
                out.push((format!("blocks.{l}.ff.fc1.bias"), vec![f]));
                out.push((format!("blocks.{l}.ff.fc2.weight"), vec![d, f]));
                out.push((format!("blocks.{l}.ff.fc2.bias"), vec![d]));
            }
            if self.use_layer_norm {
                for n in ["ln1", "ln2"] {
                    out.push((format!("blocks.{l}.{n}.weight"), vec![d]));
                    out.push((format!("blocks.{l}.{n}.bias"), vec![d]));
                }
            }
        }
        if self.use_layer_norm {
            out.push(("ln_f.weight".to_string(), vec![d]));
            out.push(("ln_f.bias".to_string(), vec![d]));
        }
        out.push(("unembed.weight".to_string(), vec![v, d]));
        out
    }

    /// Decomposable linears in execution order: (name, weight key, bias key).
    pub fn linear_modules(&self) -> Vec<(String, String, Option<String>)> {
        let mut v = vec![];
        for l in 0..self.n_layers {
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                let name = format!("blocks.{l}.attn.{p}");
                v.push((name.clone(), format!("{name}.weight"), None));
            }
            if self.use_ff {
                for p in ["fc1", "fc2"] {
                    let name = format!("blocks.{l}.ff.{p}");
                    v.push((
                        name.clone(),
                        format!("{name}.weight"),
                        Some(format!("{name}.bias")),
                    ));
                }
            }
        }
        v
    }
}

/// The sinusoidal table `[seq_len, d_model]` as the reference computes it (f32 throughout):
/// pe[p, 2i] = sin(p·divᵢ), pe[p, 2i+1] = cos(p·divᵢ), divᵢ = exp(2i·(−ln 10000 / d)).
pub fn sinusoid_table(seq_len: usize, d_model: usize) -> Vec<f32> {
    let mut pe = vec![0f32; seq_len * d_model];
    let scale = -(10000f64.ln() as f32) / d_model as f32;
    for p in 0..seq_len {
        for i in (0..d_model).step_by(2) {
            let div = (i as f32 * scale).exp();
            let a = p as f32 * div;
            pe[p * d_model + i] = a.sin();
            if i + 1 < d_model {
                pe[p * d_model + i + 1] = a.cos();
            }
        }
    }
    pe
}

/// Softmax over the last dimension, differentiable (shifted by the detached row maximum).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let e = x
        .broadcast_sub(&x.max_keepdim(candle_core::D::Minus1)?.detach())?
        .exp()?;
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
}

/// log-softmax over the last dimension, differentiable.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(candle_core::D::Minus1)?.detach())?;
    let lse = shifted.exp()?.sum_keepdim(candle_core::D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// nn.LayerNorm over the last dimension (eps 1e-5, affine).
fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(candle_core::D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(w)?
        .broadcast_add(b)
}

/// Additive causal mask `[s, s]`: 0 where key ≤ query, a large negative number above.
fn causal_mask(s: usize, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; s * s];
    for q in 0..s {
        for k in q + 1..s {
            m[q * s + k] = -1e30;
        }
    }
    Tensor::from_vec(m, (s, s), dev)
}

/// Attention scores `q·k / √d_head` before the causal mask and the softmax, and the attention
/// weights, both `[b, heads, s, s]`, from q and k `[b·s, d]` (positional table already added).
pub fn attention_pattern(
    q: &Tensor,
    k: &Tensor,
    b: usize,
    s: usize,
    dims: &IhDims,
) -> Result<(Tensor, Tensor)> {
    let (h, dh) = (dims.n_heads, dims.d_head());
    let heads = |t: &Tensor| t.reshape((b, s, h, dh))?.transpose(1, 2)?.contiguous();
    let (q, k) = (heads(q)?, heads(k)?);
    let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?;
    let weights = softmax_last(&scores.broadcast_add(&causal_mask(s, q.device())?)?)?;
    Ok((scores, weights))
}

/// One block's attention for one input: scores (before mask and softmax) and weights, both
/// `[b, heads, s, s]`.
#[derive(Clone, Debug)]
pub struct Attention {
    pub scores: Tensor,
    pub weights: Tensor,
}

impl TargetModel {
    /// The forward pass of an induction-head transformer (see the module docs); `hook` may
    /// replace any decomposed linear's output. Returns logits `[b·s, vocab + 2]`. With
    /// `patterns`, also collects every block's attention weights `[b, heads, s, s]`.
    pub(crate) fn ih_forward(
        &self,
        dims: &IhDims,
        x: &Tensor,
        fold: &Fold,
        hook: &mut ModuleHook,
        patterns: Option<&mut Vec<Attention>>,
    ) -> Result<Tensor> {
        self.ih_residual(dims, x, fold, hook, patterns)?
            .matmul(&self.param("unembed.weight").t()?)
    }

    /// Logits of the last position only, `[b, vocab + 2]` (target training: its loss reads
    /// nothing else, and the unembedding of every position is most of a step's memory).
    pub fn ih_last_logits(&self, x: &Tensor) -> Result<Tensor> {
        let super::TargetSpec::Ih(dims) = &self.spec else {
            return Err(candle_core::Error::Msg("not an attention model".into()));
        };
        let (b, s) = x.dims2()?;
        let r = self.ih_residual(dims, x, &Fold::new(), &mut |_, _, _| Ok(None), None)?;
        r.reshape((b, s, dims.d_model))?
            .narrow(1, s - 1, 1)?
            .squeeze(1)?
            .matmul(&self.param("unembed.weight").t()?)
    }

    /// The final residual stream `[b·s, d_model]` (after the last layer norm, if any).
    fn ih_residual(
        &self,
        dims: &IhDims,
        x: &Tensor,
        fold: &Fold,
        hook: &mut ModuleHook,
        mut patterns: Option<&mut Vec<Attention>>,
    ) -> Result<Tensor> {
        let (b, s) = x.dims2()?;
        if s != dims.seq_len {
            return Err(candle_core::Error::Msg(format!(
                "sequences have {s} tokens, the model takes {}",
                dims.seq_len
            )));
        }
        let ids = x.flatten_all()?.to_dtype(DType::U32)?;
        let mut r = self.param("token_embed.weight").index_select(&ids, 0)?;
        let d = dims.d_model;
        let per = dims.modules_per_block();
        for l in 0..dims.n_layers {
            let base = l * per;
            let mut run = |i: usize, a: &Tensor| -> Result<Tensor> {
                let a = Act::Dense(a.clone());
                match hook(i, &a, fold)? {
                    Some(out) => out.dense(),
                    None => self.module_forward(i, &a, fold),
                }
            };
            let mut q = run(base, &r)?;
            let mut k = run(base + 1, &r)?;
            let v = run(base + 2, &r)?;
            if dims.use_pos_encoding {
                let pe = self
                    .param(&format!("blocks.{l}.attn.pos_enc.pe"))
                    .reshape((1, s, d))?;
                let add = |t: &Tensor| {
                    t.reshape((b, s, d))?
                        .broadcast_add(&pe)?
                        .reshape((b * s, d))
                };
                q = add(&q)?;
                k = add(&k)?;
            }
            let (scores, attn) = attention_pattern(&q, &k, b, s, dims)?;
            let (h, dh) = (dims.n_heads, dims.d_head());
            let vh = v.reshape((b, s, h, dh))?.transpose(1, 2)?.contiguous()?;
            let ctx = attn
                .matmul(&vh)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * s, d))?;
            if let Some(p) = patterns.as_deref_mut() {
                p.push(Attention {
                    scores: scores.detach(),
                    weights: attn.detach(),
                });
            }
            let o = run(base + 3, &ctx)?;
            r = (r + o)?;
            if dims.use_layer_norm {
                r = layer_norm(
                    &r,
                    self.param(&format!("blocks.{l}.ln1.weight")),
                    self.param(&format!("blocks.{l}.ln1.bias")),
                )?;
            }
            if dims.use_ff {
                let hmid = run(base + 4, &r)?.gelu_erf_fused()?;
                let f = run(base + 5, &hmid)?;
                r = (r + f)?;
                if dims.use_layer_norm {
                    r = layer_norm(
                        &r,
                        self.param(&format!("blocks.{l}.ln2.weight")),
                        self.param(&format!("blocks.{l}.ln2.bias")),
                    )?;
                }
            }
        }
        if dims.use_layer_norm {
            r = layer_norm(&r, self.param("ln_f.weight"), self.param("ln_f.bias"))?;
        }
        Ok(r)
    }

    /// Logits and the attention (scores and weights) of every block for token ids `x`
    /// (`[b, s]`), with `hook` replacing decomposed outputs as in
    /// [`TargetModel::forward_hooked`].
    pub fn attention_patterns(
        &self,
        x: &Tensor,
        fold: &Fold,
        hook: &mut ModuleHook,
    ) -> Result<(Tensor, Vec<Attention>)> {
        let super::TargetSpec::Ih(dims) = &self.spec else {
            return Err(candle_core::Error::Msg(
                "attention patterns need an attention model".into(),
            ));
        };
        let mut patterns = vec![];
        let logits = self.ih_forward(dims, x, fold, hook, Some(&mut patterns))?;
        Ok((logits, patterns))
    }
}

/// A new random model as the reference initialises it: embeddings N(0, 1) (nn.Embedding),
/// linears U(±1/√fan_in) (nn.Linear's default), layer norms 1 and 0, the positional tables.
pub fn init_random(
    dims: &IhDims,
    rng: &mut crate::rng::Rng,
    device: &Device,
) -> anyhow::Result<TargetModel> {
    let mut named = vec![];
    for (key, shape) in dims.param_shapes() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if key.ends_with("pe") {
            sinusoid_table(dims.seq_len, dims.d_model)
        } else if key == "token_embed.weight" {
            rng.normal_vec(n, 1.0)
        } else if key.contains(".ln") || key.starts_with("ln_f") {
            vec![if key.ends_with("weight") { 1.0 } else { 0.0 }; n]
        } else {
            // fan_in: the weight's columns; a bias takes its weight's.
            let fan_in = if key.ends_with("bias") {
                if key.contains("fc1") {
                    dims.d_model
                } else {
                    dims.d_model * dims.ff_fanout
                }
            } else {
                shape[1]
            };
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n)
                .map(|_| (rng.uniform_f32() * 2.0 - 1.0) * bound)
                .collect()
        };
        named.push((key, Tensor::from_vec(data, shape, device)?));
    }
    TargetModel::new(super::TargetSpec::Ih(*dims), named, device)
}

/// The position of the first induction token and the token after it (the answer the last
/// position must predict) in one sequence, if the sequence has the induction pattern.
pub fn induction_answer(tokens: &[u32], dims: &IhDims) -> Option<(usize, u32)> {
    let s_tok = dims.induction_token() as u32;
    let last = tokens.len().checked_sub(1)?;
    let p = tokens[..last].iter().position(|&t| t == s_tok)?;
    (p + 1 < last).then(|| (p, tokens[p + 1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TargetSpec;

    fn tiny(use_pos: bool) -> IhDims {
        IhDims {
            use_pos_encoding: use_pos,
            ..IhDims::attention_only(2, 3, 2, 1, 1)
        }
    }

    #[test]
    fn sinusoid_table_matches_the_formula() {
        let pe = sinusoid_table(4, 4);
        // p = 2: div = [1, exp(-ln(1e4)/2) = 0.01]
        assert!((pe[2 * 4] - 2f32.sin()).abs() < 1e-6);
        assert!((pe[2 * 4 + 1] - 2f32.cos()).abs() < 1e-6);
        assert!((pe[2 * 4 + 2] - 0.02f32.sin()).abs() < 1e-6);
        assert!((pe[2 * 4 + 3] - 0.02f32.cos()).abs() < 1e-6);
        assert_eq!(pe[0..4], [0.0, 1.0, 0.0, 1.0]);
    }

    /// One block, one head, d = 2, identity projections, no positional table: the attention
    /// and logits by hand.
    #[test]
    fn attention_forward_by_hand() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let dims = tiny(false);
        // Tokens 0..3 embed as e0 = (1, 0), e1 = (0, 1), e2 = (1, 1), e3 = (0, 0).
        let embed = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.], [0., 0.]], &dev)?;
        let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?;
        let mut named = vec![
            ("token_embed.weight".to_string(), embed.clone()),
            (
                "pos.pe".to_string(),
                Tensor::zeros((1, 3, 2), DType::F32, &dev)?,
            ),
        ];
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            named.push((format!("blocks.0.attn.{p}.weight"), eye.clone()));
        }
        named.push(("unembed.weight".to_string(), embed));
        let m = TargetModel::new(TargetSpec::Ih(dims), named, &dev)?;
        let x = Tensor::new(&[[0f32, 1., 2.]], &dev)?;
        let (logits, pats) = m.attention_patterns(&x, &Fold::new(), &mut |_, _, _| Ok(None))?;
        let a = pats[0].weights.flatten_all()?.to_vec1::<f32>()?;
        // Query 0 sees only key 0. Query 1: scores (e1·e0, e1·e1)/√2 = (0, 0.7071).
        let w = |s: &[f32]| {
            let z: f32 = s.iter().map(|v| v.exp()).sum();
            s.iter().map(|v| v.exp() / z).collect::<Vec<_>>()
        };
        let r = std::f32::consts::FRAC_1_SQRT_2;
        let q1 = w(&[0.0, r]);
        let q2 = w(&[r, r, 2.0 * r]);
        let want = [1.0, 0.0, 0.0, q1[0], q1[1], 0.0, q2[0], q2[1], q2[2]];
        for (g, w) in a.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{a:?} vs {want:?}");
        }
        // The scores are kept before the causal mask (query 0 against key 2: e0·e2/√2).
        let sc = pats[0].scores.flatten_all()?.to_vec1::<f32>()?;
        let want = [r, 0.0, r, 0.0, r, r, r, r, 2.0 * r];
        for (g, w) in sc.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{sc:?} vs {want:?}");
        }
        // Residual after the block: e + Σ attn·e; logits = residual · embedᵀ.
        let e = [[1f32, 0.], [0., 1.], [1., 1.]];
        let res2 = [
            e[2][0] + q2[0] * e[0][0] + q2[1] * e[1][0] + q2[2] * e[2][0],
            e[2][1] + q2[0] * e[0][1] + q2[1] * e[1][1] + q2[2] * e[2][1],
        ];
        let l = logits.to_vec2::<f32>()?;
        assert_eq!(l.len(), 3);
        assert!((l[2][0] - res2[0]).abs() < 1e-5);
        assert!((l[2][1] - res2[1]).abs() < 1e-5);
        assert!((l[2][2] - (res2[0] + res2[1])).abs() < 1e-5);
        assert_eq!(l[2][3], 0.0);
        Ok(())
    }

    /// The positional table goes to q and k only: with v = 0 the output is the embedding,
    /// and the pattern changes with the table.
    #[test]
    fn positional_table_enters_q_and_k_only() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let dims = tiny(true);
        let embed = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.], [0., 0.]], &dev)?;
        let eye = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev)?;
        let pe = Tensor::from_vec(sinusoid_table(3, 2), (1, 3, 2), &dev)?;
        let mut named = vec![
            ("token_embed.weight".to_string(), embed.clone()),
            ("pos.pe".to_string(), pe.clone()),
            ("blocks.0.attn.q_proj.weight".to_string(), eye.clone()),
            ("blocks.0.attn.k_proj.weight".to_string(), eye.clone()),
            (
                "blocks.0.attn.v_proj.weight".to_string(),
                Tensor::zeros((2, 2), DType::F32, &dev)?,
            ),
            ("blocks.0.attn.out_proj.weight".to_string(), eye),
            ("blocks.0.attn.pos_enc.pe".to_string(), pe),
        ];
        named.push(("unembed.weight".to_string(), embed));
        let m = TargetModel::new(TargetSpec::Ih(dims), named, &dev)?;
        let x = Tensor::new(&[[0f32, 1., 2.]], &dev)?;
        let (logits, pats) = m.attention_patterns(&x, &Fold::new(), &mut |_, _, _| Ok(None))?;
        // v = 0: logits are the embeddings' own.
        let l = logits.to_vec2::<f32>()?;
        assert!((l[1][1] - 1.0).abs() < 1e-6 && l[1][0].abs() < 1e-6);
        // Query 1 = e1 + pe1 = (sin 1, 1 + cos 1), key 0 = e0 + pe0 = (1, 1).
        let pe1 = (1f32.sin(), 1f32.cos());
        let q = (pe1.0, 1.0 + pe1.1);
        let s10 = (q.0 * 1.0 + q.1 * 1.0) / 2f32.sqrt();
        let s11 = (q.0 * pe1.0 + q.1 * (1.0 + pe1.1)) / 2f32.sqrt();
        let w0 = 1.0 / (1.0 + (s11 - s10).exp());
        let a = pats[0].weights.flatten_all()?.to_vec1::<f32>()?;
        assert!((a[3] - w0).abs() < 1e-6, "{} vs {w0}", a[3]);
        Ok(())
    }

    #[test]
    fn induction_answer_finds_the_pair() {
        let d = tiny(true);
        // vocab 2: S = 3.
        assert_eq!(induction_answer(&[0, 1, 3, 2, 1, 3], &d), Some((2, 2)));
        assert_eq!(induction_answer(&[0, 1, 2, 3], &d), None);
    }
}
