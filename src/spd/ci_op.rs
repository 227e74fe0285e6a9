//! Fused causal-importance MLP of Stochastic Parameter Decomposition (ci_fn type "mlp")
//! and the leaky hard sigmoids, for candle 0.11.
//!
//! For every component `c` an independent scalar MLP `1 -> H -> 1` with exact (erf) GELU:
//!
//! ```text
//! pre[b,c] = b2[c,0] + sum_j W2[c,j,0] * gelu(h[b,c] * W1[c,0,j] + b1[c,j])
//! gelu(z)  = 0.5 * z * (1 + erf(z / sqrt 2))
//! ```
//!
//! Shapes: `h [B,C]`, `W1 [C,1,H]`, `b1 [C,H]`, `W2 [C,H,1]`, `b2 [C,1]`, all f32.
//!
//! On the CPU, [`ci_mlp`] packs the parameters into one tensor `P = [W1 | b1 | W2 | b2]`
//! of shape `[C, 3H+1]` (with `Tensor::cat`, so candle's autograd splits the gradient of
//! `P` back onto the four parameters) and applies a `CustomOp2` on `(h, P)`.  Its forward
//! and its backward (a `CustomOp3` on `(h, P, grad)` returning `grad_h` and `grad_P` in one
//! buffer) are each one single-threaded pass over `B x C x H`; nothing is stored between
//! them (the backward recomputes `z`).  Inputs may have any strides.  Elsewhere (CUDA,
//! Metal, non-f32 dtypes) [`ci_mlp`] falls back to [`ci_mlp_reference`].
//!
//! Kernels (module `kernels`): blocks of 512 batch rows; per component the block's column
//! of `h` is gathered into a contiguous buffer and the loop over the batch is
//! auto-vectorised (branch-free f32 code, no libm calls).  The variant is chosen once at
//! run time: AVX-512F/VL (16 lanes), AVX2+FMA (8 lanes) or portable code; the env var
//! `CIOP_NO_AVX512` caps it at AVX2 (benchmarking only).  Maths, with `u = z / sqrt 2`:
//! * forward: `Phi = 0.5 erfc(-u)` as `2^(|u| Q(|u|))` (weighted-minimax fit of
//!   `log2 erfc`, one branch) through a bit-built `exp2`;
//! * backward: `pdf = exp(-u^2)/sqrt(pi)` (one `exp2`), `Phi = pdf * R(|u|)` for
//!   `|u| > 0.9277` (R: weighted fit of `erfcx`) and Juffa's erff polynomial below;
//!   `gelu'(z) = Phi + u * pdf`.  Per-lane partial sums of the parameter gradients are
//!   kept in f64.
//!
//! Absolute errors (see the `erf_exp_accuracy` test): Phi < 8e-8, exp(-u^2)/sqrt(pi) <
//! 6e-8, gelu(z) < 2.1e-7 * max(1,|z|), gelu'(z) < 1.5e-7; erf < 1e-7; exp rel < 1.5e-7.

use candle_core::backend::BackendStorage as _;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail,
};
use std::borrow::Cow;
use std::sync::Arc;

/// Leak slope of the leaky hard sigmoids (SPD's default).
pub const LEAKY_ALPHA: f64 = 0.01;

// ---------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------

/// Device-generic entry point. On CPU (all f32) uses the fused custom op, elsewhere
/// [`ci_mlp_reference`]. Returns `pre` of shape `[B, C]` (contiguous).
///
/// Differentiable w.r.t. `h` and the four parameters.  Any input layout (transposed,
/// narrowed, broadcast) is accepted.
pub fn ci_mlp(h: &Tensor, w1: &Tensor, b1: &Tensor, w2: &Tensor, b2: &Tensor) -> Result<Tensor> {
    let (_b, c, hd) = check_shapes(h, w1, b1, w2, b2)?;
    let all_f32 = [h, w1, b1, w2, b2].iter().all(|t| t.dtype() == DType::F32);
    let all_cpu = [h, w1, b1, w2, b2].iter().all(|t| t.device().is_cpu());
    if !all_f32 || !all_cpu {
        return ci_mlp_reference(h, w1, b1, w2, b2);
    }
    let p = Tensor::cat(&[&w1.reshape((c, hd))?, b1, &w2.reshape((c, hd))?, b2], 1)?;
    h.apply_op2_arc(&p, Arc::new(Box::new(CiMlpOp { hd })))
}

/// Same maths with plain candle ops (broadcast + `gelu_erf` + batched matmul),
/// differentiable by candle autograd; used on CUDA and as the test oracle.
/// Returns a contiguous `[B, C]` tensor.
pub fn ci_mlp_reference(
    h: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> Result<Tensor> {
    let (_b, _c, _hd) = check_shapes(h, w1, b1, w2, b2)?;
    // z[c,b,j] = h[b,c] * W1[c,0,j] + b1[c,j]                       -> [C, B, H]
    let z = h
        .t()?
        .unsqueeze(2)?
        .broadcast_mul(w1)?
        .broadcast_add(&b1.unsqueeze(1)?)?;
    let a = z.gelu_erf()?;
    // pre[c,b] = sum_j a[c,b,j] * W2[c,j,0] + b2[c,0]                -> [C, B]
    let pre = a.matmul(&w2.contiguous()?)?.squeeze(2)?.broadcast_add(b2)?;
    pre.t()?.contiguous()
}

/// Lower-leaky hard sigmoid of SPD: forward `clamp(x, 0, 1)`; custom backward
/// (alpha = [`LEAKY_ALPHA`]):
/// `x <= 0`: `alpha*g` if `g < 0` else `0`;  `0 < x <= 1`: `g`;  `x > 1`: `0`.
///
/// Forward: CPU (f32/f64) and, with the `cuda` feature, CUDA.  Backward: one fused pass on
/// CPU (f32/f64), candle tensor ops on any other device / dtype.
pub fn lower_leaky_hard(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(LowerLeakyHard)
}

/// Upper-leaky hard sigmoid: `x > 1`: `1 + alpha*(x-1)`; else `clamp(x, 0, 1)`.
/// Gradient `alpha` for `x > 1`, `1` for `0 <= x <= 1`, `0` for `x < 0`.
///
/// CPU f32/f64: a custom op with fused forward and backward passes; any other device or
/// dtype: plain candle ops (differentiated by candle's autograd), same values/gradients.
pub fn upper_leaky_hard(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.apply_op1(UpperLeakyHard)
    } else {
        upper_leaky_hard_ops(x)
    }
}

/// Exact (erf) GELU, `x Φ(x)`. CPU f32: one vectorised pass forward and one backward
/// (the kernels of the CI MLP; absolute error < 2.1e-7·max(1, |x|), derivative < 1.5e-7)
/// instead of candle's dozen tensor ops for the backward; elsewhere candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op1(Gelu { tanh: false })
    } else {
        x.gelu_erf()
    }
}

/// Tanh-approximated GELU, `0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))` = `x σ(2v)`. CPU
/// f32: one vectorised pass forward and one backward (relative error ~2e-7); elsewhere
/// candle's `gelu`.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.apply_op1(Gelu { tanh: true })
    } else {
        x.gelu()
    }
}

/// [`gelu_erf`] and [`gelu_tanh`] as methods, for chains of tensor calls.
pub trait FusedGelu {
    fn gelu_erf_fused(&self) -> Result<Tensor>;
    fn gelu_tanh_fused(&self) -> Result<Tensor>;
}

impl FusedGelu for Tensor {
    fn gelu_erf_fused(&self) -> Result<Tensor> {
        gelu_erf(self)
    }
    fn gelu_tanh_fused(&self) -> Result<Tensor> {
        gelu_tanh(self)
    }
}

/// Σ over rows of KL(softmax(target) ‖ softmax(out)) for `[rows, vocab]` logits, the
/// gradient flowing to `out` only (`target` is treated as detached). CPU f32: one fused pass
/// per row forward and one backward (`softmax(out) − softmax(target)`), with the kernels'
/// vectorised exp; elsewhere [`crate::spd::trainer::kl_rows`] summed.
pub fn kl_sum(out: &Tensor, target: &Tensor) -> Result<Tensor> {
    if out.device().is_cpu() && out.dtype() == DType::F32 && target.dtype() == DType::F32 {
        out.apply_op2(&target.detach(), KlSum)
    } else {
        crate::spd::trainer::kl_rows(out, &target.detach())?.sum_all()
    }
}

/// `(x + eps)^p` elementwise, differentiable in `x`. CPU f32/f64: one pass forward, and a
/// backward `p·y/(x + eps)` from the stored result (no second power); elsewhere plain ops.
pub fn pow_shifted(x: &Tensor, eps: f64, p: f64) -> Result<Tensor> {
    if is_cpu_float(x) {
        x.apply_op1(PowShifted { eps, p })
    } else {
        (x + eps)?.powf(p)
    }
}

/// [`upper_leaky_hard`] with plain candle ops (device generic).
fn upper_leaky_hard_ops(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let upper = x.affine(LEAKY_ALPHA, 1.0 - LEAKY_ALPHA)?; // 1 + alpha*(x-1)
    let lower_mid = x.lt(0.0)?.where_cond(&zeros, x)?; // 0 below 0, identity on [0, 1]
    x.gt(1.0)?.where_cond(&upper, &lower_mid)
}

/// Backward of [`upper_leaky_hard`] with candle tensor ops (device generic).
fn upper_leaky_hard_bwd_ops(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let ones = x.ones_like()?;
    let slope = x.gt(1.0)?.where_cond(
        &ones.affine(LEAKY_ALPHA, 0.0)?,
        &x.ge(0.0)?.where_cond(&ones, &x.zeros_like()?)?,
    )?;
    grad.mul(&slope)
}

/// Backward of [`lower_leaky_hard`] with candle tensor ops (device generic).
fn lower_leaky_hard_bwd_ops(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let zeros = grad.zeros_like()?;
    let leaky = grad.minimum(0.0)?.affine(LEAKY_ALPHA, 0.0)?; // alpha*g if g < 0 else 0
    let inner = x.le(1.0)?.where_cond(grad, &zeros)?; // g on (0,1], 0 above 1
    x.le(0.0)?.where_cond(&leaky, &inner)
}

fn check_shapes(
    h: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> Result<(usize, usize, usize)> {
    let (b, c) = h.dims2()?;
    let (c1, one, hd) = w1.dims3()?;
    if c1 != c || one != 1 {
        bail!("ci_mlp: W1 must be [C={c},1,H], got {:?}", w1.dims())
    }
    if b1.dims() != [c, hd] {
        bail!("ci_mlp: b1 must be [C={c},H={hd}], got {:?}", b1.dims())
    }
    if w2.dims() != [c, hd, 1] {
        bail!("ci_mlp: W2 must be [C={c},H={hd},1], got {:?}", w2.dims())
    }
    if b2.dims() != [c, 1] {
        bail!("ci_mlp: b2 must be [C={c},1], got {:?}", b2.dims())
    }
    Ok((b, c, hd))
}

/// Fused vector-MLP causal-importance function (ci_fn type "vector_mlp" with one hidden
/// layer): for every component `c` an MLP `d_in -> H -> 1` (exact GELU) on the whole module
/// input, `pre[n,c] = b2[c] + Σ_j W2[c,j] gelu(b1[c,j] + Σ_i x[n,i] W1[c,i,j])`.
///
/// Shapes: `x [N, d]`, `W1 [C, d, H]`, `b1 [C, H]`, `W2 [C, H, 1]`, `b2 [C, 1]`. On the CPU
/// (f32) one pass per component keeps each row's `H` hidden values in registers/L1 instead
/// of materialising `[N, C·H]` (52 MB per module at N = 1024, C = 100, H = 128), and the
/// backward recomputes them. Differentiable w.r.t. the parameters; the input `x` (the
/// target's activations, never trained) gets no gradient. Elsewhere: plain tensor ops.
pub fn ci_vector_mlp(
    x: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let (c, d1, hd) = w1.dims3()?;
    if d1 != d || b1.dims() != [c, hd] || w2.dims() != [c, hd, 1] || b2.dims() != [c, 1] {
        bail!(
            "ci_vector_mlp: x [{n},{d}], W1 {:?}, b1 {:?}, W2 {:?}, b2 {:?} do not fit",
            w1.dims(),
            b1.dims(),
            w2.dims(),
            b2.dims()
        )
    }
    let all_f32 = [x, w1, b1, w2, b2].iter().all(|t| t.dtype() == DType::F32);
    let all_cpu = [x, w1, b1, w2, b2].iter().all(|t| t.device().is_cpu());
    if !all_f32 || !all_cpu {
        let w0 = w1.transpose(0, 1)?.reshape((d, c * hd))?;
        let h = x
            .matmul(&w0)?
            .reshape((n, c, hd))?
            .broadcast_add(b1)?
            .gelu_erf()?
            .transpose(0, 1)?
            .contiguous()?;
        return h
            .matmul(w2)?
            .broadcast_add(&b2.unsqueeze(1)?)?
            .squeeze(2)?
            .t();
    }
    let p = Tensor::cat(
        &[
            w1.reshape((c, d * hd))?,
            b1.clone(),
            w2.reshape((c, hd))?,
            b2.clone(),
        ],
        1,
    )?;
    x.detach().apply_op2(&p, CiVecMlpOp { d, hd })
}

// ---------------------------------------------------------------------------------------
// Custom ops
// ---------------------------------------------------------------------------------------

/// Strided read-only view of a rank-2 f32 storage: element (i, j) at `off + i*s0 + j*s1`.
#[derive(Clone, Copy)]
struct View2<'a> {
    data: &'a [f32],
    off: usize,
    s0: usize,
    s1: usize,
}

impl<'a> View2<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<(Self, usize, usize)> {
        let data = match storage {
            CpuStorage::F32(v) => v.as_slice(),
            s => bail!("ci_mlp: {what} must be f32, got {:?}", s.dtype()),
        };
        let (r, c) = layout.shape().dims2()?;
        let st = layout.stride();
        let v = View2 {
            data,
            off: layout.start_offset(),
            s0: st[0],
            s1: st[1],
        };
        if r > 0 && c > 0 {
            let last = v.off + (r - 1) * v.s0 + (c - 1) * v.s1;
            if last >= data.len() {
                bail!("ci_mlp: {what} layout out of bounds of its storage")
            }
        }
        Ok((v, r, c))
    }

    /// Parameters as one contiguous row-major `[r, c]` slice (borrowed when possible).
    fn to_contiguous(self, r: usize, c: usize) -> Cow<'a, [f32]> {
        if (r <= 1 || self.s0 == c) && (c <= 1 || self.s1 == 1) {
            Cow::Borrowed(&self.data[self.off..self.off + r * c])
        } else {
            let mut v = Vec::with_capacity(r * c);
            for i in 0..r {
                for j in 0..c {
                    v.push(self.data[self.off + i * self.s0 + j * self.s1]);
                }
            }
            Cow::Owned(v)
        }
    }
}

/// Fused forward op on `(h [B,C], P [C,3H+1])`.
struct CiMlpOp {
    hd: usize,
}

impl CustomOp2 for CiMlpOp {
    fn name(&self) -> &'static str {
        "ci-mlp-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let hd = self.hd;
        let (hv, b, c) = View2::new(s1, l1, "h")?;
        let (pv, c2, w) = View2::new(s2, l2, "P")?;
        if c2 != c || w != 3 * hd + 1 {
            bail!(
                "ci_mlp: packed params must be [{c},{}], got [{c2},{w}]",
                3 * hd + 1
            )
        }
        let p = pv.to_contiguous(c, w);
        let mut out = vec![0f32; b * c];
        kernels::forward(&hv, &p, b, c, hd, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((b, c))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, c) = h.dims2()?;
        let w = 3 * self.hd + 1;
        // One fused pass producing [grad_h (B*C) | grad_P (C*w)] in a single buffer.
        let both = h.apply_op3_no_bwd(p, grad, &CiMlpBwdOp { hd: self.hd })?;
        let gh = both.narrow(0, 0, b * c)?.reshape((b, c))?;
        let gp = both.narrow(0, b * c, c * w)?.reshape((c, w))?;
        Ok((Some(gh), Some(gp)))
    }
}

/// Fused backward on `(h [B,C], P [C,3H+1], grad_pre [B,C])`, output flat
/// `[B*C + C*(3H+1)]` = `grad_h` (row-major) followed by `grad_P` (row-major).
struct CiMlpBwdOp {
    hd: usize,
}

impl CustomOp3 for CiMlpBwdOp {
    fn name(&self) -> &'static str {
        "ci-mlp-fused-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let hd = self.hd;
        let (hv, b, c) = View2::new(s1, l1, "h")?;
        let (pv, c2, w) = View2::new(s2, l2, "P")?;
        let (gv, b3, c3) = View2::new(s3, l3, "grad")?;
        if c2 != c || w != 3 * hd + 1 || b3 != b || c3 != c {
            bail!("ci_mlp bwd: shape mismatch h [{b},{c}] P [{c2},{w}] grad [{b3},{c3}]")
        }
        let p = pv.to_contiguous(c, w);
        let mut out = vec![0f32; b * c + c * w];
        let (gh, gp) = out.split_at_mut(b * c);
        kernels::backward(&hv, &gv, &p, b, c, hd, gh, gp);
        Ok((CpuStorage::F32(out), Shape::from(b * c + c * w)))
    }
}

/// Fused vector-MLP forward on `(x [N,d], P [C, d·H + 2H + 1])`.
struct CiVecMlpOp {
    d: usize,
    hd: usize,
}

impl CustomOp2 for CiVecMlpOp {
    fn name(&self) -> &'static str {
        "ci-vector-mlp-fused"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xv, n, d) = View2::new(s1, l1, "x")?;
        let (pv, c, w) = View2::new(s2, l2, "P")?;
        if d != self.d || w != self.d * self.hd + 2 * self.hd + 1 {
            bail!(
                "ci_vector_mlp: packed params [{c},{w}] do not fit d = {d}, H = {}",
                self.hd
            )
        }
        let x = xv.to_contiguous(n, d);
        let p = pv.to_contiguous(c, w);
        let mut out = vec![0f32; n * c];
        match UniqueRows::of(&x, n, d) {
            // Repeated inputs (e.g. a first layer that reads token embeddings): each distinct
            // row once, then copied to its repeats.
            Some(u) => {
                let mut ou = vec![0f32; u.len() * c];
                kernels::vec_forward(&u.rows, &p, u.len(), d, c, self.hd, &mut ou);
                for (r, &k) in u.of_row.iter().enumerate() {
                    let k = k as usize;
                    out[r * c..(r + 1) * c].copy_from_slice(&ou[k * c..(k + 1) * c]);
                }
            }
            None => kernels::vec_forward(&x, &p, n, d, c, self.hd, &mut out),
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gp = x.apply_op3_no_bwd(
            p,
            grad,
            &CiVecMlpBwdOp {
                d: self.d,
                hd: self.hd,
            },
        )?;
        Ok((None, Some(gp)))
    }
}

/// Fused vector-MLP backward on `(x, P, grad_pre [N,C])`: the gradient of `P`.
struct CiVecMlpBwdOp {
    d: usize,
    hd: usize,
}

impl CustomOp3 for CiVecMlpBwdOp {
    fn name(&self) -> &'static str {
        "ci-vector-mlp-fused-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xv, n, d) = View2::new(s1, l1, "x")?;
        let (pv, c, w) = View2::new(s2, l2, "P")?;
        let (gv, n3, c3) = View2::new(s3, l3, "grad")?;
        if d != self.d || n3 != n || c3 != c || w != self.d * self.hd + 2 * self.hd + 1 {
            bail!("ci_vector_mlp bwd: shape mismatch")
        }
        let x = xv.to_contiguous(n, d);
        let p = pv.to_contiguous(c, w);
        let mut gp = vec![0f32; c * w];
        match UniqueRows::of(&x, n, d) {
            // The gradient of a distinct row is the sum over its repeats (the parameters see
            // the same hidden values for each).
            Some(u) => {
                let mut gu = vec![0f64; u.len() * c];
                for (r, &k) in u.of_row.iter().enumerate() {
                    let k = k as usize;
                    for j in 0..c {
                        gu[k * c + j] += gv.data[gv.off + r * gv.s0 + j * gv.s1] as f64;
                    }
                }
                let gu: Vec<f32> = gu.into_iter().map(|v| v as f32).collect();
                let view = View2 {
                    data: &gu,
                    off: 0,
                    s0: c,
                    s1: 1,
                };
                kernels::vec_backward(&u.rows, &view, &p, u.len(), d, c, self.hd, &mut gp);
            }
            None => kernels::vec_backward(&x, &gv, &p, n, d, c, self.hd, &mut gp),
        }
        Ok((CpuStorage::F32(gp), Shape::from((c, w))))
    }
}

/// The distinct rows of a row-major `[n, d]` matrix (bitwise equal), in order of first
/// appearance, and for each row the index of its distinct row.
struct UniqueRows {
    rows: Vec<f32>,
    of_row: Vec<u32>,
    d: usize,
}

impl UniqueRows {
    /// None when fewer than half the rows repeat (computing them all is then as cheap).
    fn of(x: &[f32], n: usize, d: usize) -> Option<UniqueRows> {
        if n < 2 || d == 0 {
            return None;
        }
        let bits: Vec<u32> = x[..n * d].iter().map(|v| v.to_bits()).collect();
        let mut index: std::collections::HashMap<&[u32], u32> =
            std::collections::HashMap::with_capacity(n);
        let mut rows = vec![];
        let mut of_row = Vec::with_capacity(n);
        for r in 0..n {
            let key = &bits[r * d..(r + 1) * d];
            let next = index.len() as u32;
            let k = *index.entry(key).or_insert_with(|| {
                rows.extend_from_slice(&x[r * d..(r + 1) * d]);
                next
            });
            if index.len() * 2 > n {
                return None;
            }
            of_row.push(k);
        }
        Some(UniqueRows { rows, of_row, d })
    }

    fn len(&self) -> usize {
        self.rows.len() / self.d
    }
}

/// Calls `f(row_offset_a, row_offset_b)` for every row (all but the last dimension) of
/// two same-shape layouts, in row-major order (general strides, e.g. broadcast
/// gradients with stride 0).
fn for_each_row2(la: &Layout, lb: &Layout, mut f: impl FnMut(usize, usize)) {
    let dims = la.dims();
    let (sa, sb) = (la.stride(), lb.stride());
    let r = dims.len();
    if la.shape().elem_count() == 0 {
        return;
    }
    if r <= 1 {
        f(la.start_offset(), lb.start_offset());
        return;
    }
    let rows: usize = dims[..r - 1].iter().product();
    let mut idx = vec![0usize; r - 1];
    let (mut oa, mut ob) = (la.start_offset(), lb.start_offset());
    for _ in 0..rows {
        f(oa, ob);
        for d in (0..r - 1).rev() {
            idx[d] += 1;
            oa += sa[d];
            ob += sb[d];
            if idx[d] < dims[d] {
                break;
            }
            oa -= sa[d] * dims[d];
            ob -= sb[d] * dims[d];
            idx[d] = 0;
        }
    }
}

/// Length and strides of the last dimension (1, 1, 1 for scalars).
fn inner_dim(la: &Layout, lb: &Layout) -> (usize, usize, usize) {
    match la.dims().len() {
        0 => (1, 1, 1),
        r => (la.dims()[r - 1], la.stride()[r - 1], lb.stride()[r - 1]),
    }
}

fn map1<T: Copy, F: Fn(T) -> T>(v: &[T], l: &Layout, f: F) -> Vec<T> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return v[a..b].iter().map(|&x| f(x)).collect();
    }
    let mut out = Vec::with_capacity(l.shape().elem_count());
    let (n, s, _) = inner_dim(l, l);
    for_each_row2(l, l, |o, _| out.extend((0..n).map(|k| f(v[o + k * s]))));
    out
}

fn map2<T: Copy, F: Fn(T, T) -> T>(a: &[T], la: &Layout, b: &[T], lb: &Layout, f: F) -> Vec<T> {
    if let (Some((a0, a1)), Some((b0, b1))) = (la.contiguous_offsets(), lb.contiguous_offsets()) {
        return a[a0..a1]
            .iter()
            .zip(&b[b0..b1])
            .map(|(&x, &y)| f(x, y))
            .collect();
    }
    let mut out = Vec::with_capacity(la.shape().elem_count());
    let (n, sa, sb) = inner_dim(la, lb);
    for_each_row2(la, lb, |oa, ob| match (sa, sb) {
        (1, 1) => out.extend(
            a[oa..oa + n]
                .iter()
                .zip(&b[ob..ob + n])
                .map(|(&x, &y)| f(x, y)),
        ),
        (1, 0) => {
            let y = b[ob];
            out.extend(a[oa..oa + n].iter().map(|&x| f(x, y)))
        }
        _ => out.extend((0..n).map(|k| f(a[oa + k * sa], b[ob + k * sb]))),
    });
    out
}

/// Applies the f32/f64 versions of an elementwise rule to one CPU storage; `$a` is bound
/// to [`LEAKY_ALPHA`] in the element type.
macro_rules! cpu_map1 {
    ($s:expr, $l:expr, $name:expr, |$x:ident, $a:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $a = LEAKY_ALPHA as f32;
                CpuStorage::F32(map1(v, $l, |$x: f32| $body))
            }
            CpuStorage::F64(v) => {
                let $a = LEAKY_ALPHA;
                CpuStorage::F64(map1(v, $l, |$x: f64| $body))
            }
            s => bail!("{}: unsupported dtype {:?}", $name, s.dtype()),
        }
    };
}

/// Same for a binary rule `(x, g)`.
macro_rules! cpu_map2 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $name:expr, |$x:ident, $g:ident, $a:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let $a = LEAKY_ALPHA as f32;
                CpuStorage::F32(map2(a, $l1, b, $l2, |$x: f32, $g: f32| $body))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let $a = LEAKY_ALPHA;
                CpuStorage::F64(map2(a, $l1, b, $l2, |$x: f64, $g: f64| $body))
            }
            (a, b) => bail!(
                "{}: unsupported dtypes {:?}/{:?}",
                $name,
                a.dtype(),
                b.dtype()
            ),
        }
    };
}

/// The two operands of an elementwise op must have one shape.
fn same_shape(l1: &Layout, l2: &Layout, name: &str) -> Result<()> {
    if l1.shape() != l2.shape() {
        bail!("{name}: shape mismatch {:?} {:?}", l1.shape(), l2.shape())
    }
    Ok(())
}

fn is_cpu_float(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// `clamp(x, 0, 1)` with SPD's lower-leaky backward.
struct LowerLeakyHard;

impl CustomOp1 for LowerLeakyHard {
    fn name(&self) -> &'static str {
        "lower-leaky-hard"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = cpu_map1!(s, l, self.name(), |x, _a| x.clamp(0.0, 1.0));
        Ok((out, l.shape().clone()))
    }

    /// clamp(x, 0, 1) = min(relu(x), 1) from candle's backend primitives.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice as _;
        let shape = l.shape().clone();
        let dtype = s.dtype();
        let relu = s.unary_impl::<candle_core::op::Relu>(l)?; // contiguous result
        let mut one = s.device().zeros_impl(&Shape::from(()), dtype)?;
        let one_l = Layout::contiguous(());
        one.const_set(candle_core::scalar::Scalar::one(dtype), &one_l)?;
        let out = relu.binary_impl::<candle_core::op::Minimum>(
            &one,
            &Layout::contiguous(shape.clone()),
            &one_l.broadcast_as(shape.clone())?,
        )?;
        Ok((out, shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if is_cpu_float(arg) && grad.dtype() == arg.dtype() {
            Ok(Some(arg.apply_op2_no_bwd(grad, &LowerLeakyHardBwd)?))
        } else {
            Ok(Some(lower_leaky_hard_bwd_ops(arg, grad)?))
        }
    }
}

/// CPU backward of [`LowerLeakyHard`] on `(x, grad)`.
struct LowerLeakyHardBwd;

impl CustomOp2 for LowerLeakyHardBwd {
    fn name(&self) -> &'static str {
        "lower-leaky-hard-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let out = cpu_map2!(s1, l1, s2, l2, self.name(), |x, g, a| if x <= 0.0 {
            if g < 0.0 { g * a } else { 0.0 }
        } else if x <= 1.0 {
            g
        } else {
            0.0
        });
        Ok((out, l1.shape().clone()))
    }
}

/// Upper-leaky hard sigmoid on CPU with a fused backward.
struct UpperLeakyHard;

impl CustomOp1 for UpperLeakyHard {
    fn name(&self) -> &'static str {
        "upper-leaky-hard"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = cpu_map1!(s, l, self.name(), |x, a| if x > 1.0 {
            x * a + (1.0 - a)
        } else if x < 0.0 {
            0.0
        } else {
            x
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if is_cpu_float(arg) && grad.dtype() == arg.dtype() {
            Ok(Some(arg.apply_op2_no_bwd(grad, &UpperLeakyHardBwd)?))
        } else {
            // Not reached through `upper_leaky_hard` (which uses plain ops off-CPU).
            Ok(Some(upper_leaky_hard_bwd_ops(arg, grad)?))
        }
    }
}

/// CPU backward of [`UpperLeakyHard`] on `(x, grad)`.
struct UpperLeakyHardBwd;

impl CustomOp2 for UpperLeakyHardBwd {
    fn name(&self) -> &'static str {
        "upper-leaky-hard-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let out = cpu_map2!(s1, l1, s2, l2, self.name(), |x, g, a| if x > 1.0 {
            g * a
        } else if x >= 0.0 {
            g
        } else {
            0.0
        });
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

/// [`gelu_erf`] / [`gelu_tanh`] on CPU f32.
struct Gelu {
    tanh: bool,
}

/// A contiguous f32 copy of a storage's elements (borrowed when already contiguous).
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<Cow<'a, [f32]>> {
    let CpuStorage::F32(v) = s else {
        bail!("{name}: unsupported dtype {:?}", s.dtype())
    };
    Ok(match l.contiguous_offsets() {
        Some((a, b)) => Cow::Borrowed(&v[a..b]),
        None => Cow::Owned(map1(v, l, |x| x)),
    })
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        if self.tanh { "gelu-tanh" } else { "gelu-erf" }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let mut out = vec![0f32; x.len()];
        kernels::gelu(self.tanh, &x, &mut out);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(grad, &GeluBwd { tanh: self.tanh })?,
        ))
    }
}

/// Backward of [`Gelu`] on `(x, grad)`.
struct GeluBwd {
    tanh: bool,
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let mut out = vec![0f32; x.len()];
        kernels::gelu_bwd(self.tanh, &x, &g, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// [`pow_shifted`] on CPU f32/f64.
struct PowShifted {
    eps: f64,
    p: f64,
}

impl CustomOp1 for PowShifted {
    fn name(&self) -> &'static str {
        "pow-shifted"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (eps, p) = (self.eps, self.p);
        let out = match s {
            CpuStorage::F32(v) => {
                let (e, q) = (eps as f32, p as f32);
                CpuStorage::F32(map1(v, l, |x: f32| (x + e).powf(q)))
            }
            CpuStorage::F64(v) => CpuStorage::F64(map1(v, l, |x: f64| (x + eps).powf(p))),
            s => bail!("pow-shifted: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d/dx (x + eps)^p = p (x + eps)^p / (x + eps)
        let d = ((res * self.p)? / (arg + self.eps)?)?;
        Ok(Some((grad * d)?))
    }
}

/// [`kl_sum`] on CPU f32: `(out, target)` → scalar.
struct KlSum;

fn rows_of(l: &Layout, name: &str) -> Result<(usize, usize)> {
    match l.dims() {
        [n, v] => Ok((*n, *v)),
        d => bail!("{name}: expected [rows, vocab] logits, got {d:?}"),
    }
}

impl CustomOp2 for KlSum {
    fn name(&self) -> &'static str {
        "kl-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let (n, v) = rows_of(l1, self.name())?;
        let out = contiguous_f32(s1, l1, self.name())?;
        let target = contiguous_f32(s2, l2, self.name())?;
        let mut total = 0f64;
        let mut scratch = vec![0f32; 2 * v];
        for r in 0..n {
            let row = r * v..(r + 1) * v;
            total += kernels::kl_row(&out[row.clone()], &target[row], &mut scratch) as f64;
        }
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        out: &Tensor,
        target: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = out.apply_op2_no_bwd(target, &KlSumBwd)?;
        Ok((Some(g.broadcast_mul(grad)?), None))
    }
}

/// `softmax(out) − softmax(target)` per row: the gradient of [`KlSum`] for a unit upstream.
struct KlSumBwd;

impl CustomOp2 for KlSumBwd {
    fn name(&self) -> &'static str {
        "kl-sum-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let (n, v) = rows_of(l1, self.name())?;
        let out = contiguous_f32(s1, l1, self.name())?;
        let target = contiguous_f32(s2, l2, self.name())?;
        let mut g = vec![0f32; n * v];
        let mut scratch = vec![0f32; v];
        for r in 0..n {
            let row = r * v..(r + 1) * v;
            kernels::kl_row_grad(
                &out[row.clone()],
                &target[row.clone()],
                &mut g[row],
                &mut scratch,
            );
        }
        Ok((CpuStorage::F32(g), l1.shape().clone()))
    }
}

mod kernels {
    //! Single-threaded, auto-vectorised f32 kernels.
    //!
    //! Everything is expressed in `u = z / sqrt 2` (the parameters are pre-scaled), so
    //! `gelu(z) = sqrt2 * u * Phi(u)`, `Phi(u) = 0.5 * erfc(-u)` and
    //! `gelu'(z) = Phi(u) + u * exp(-u^2) / sqrt(pi)`.
    use super::View2;

    /// `fn name(args) => impl_fn`: `name` runs `impl_fn::<F>` compiled for the best
    /// instruction set found at run time (AVX-512, AVX2 + FMA, or portable code).
    macro_rules! isa_dispatch {
        ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $imp:ident) => {
            $(#[$m])*
            $vis fn $name($($arg: $ty),*) $(-> $ret)? {
                #[cfg(target_arch = "x86_64")]
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $imp::<true>($($arg),*)
                }
                #[cfg(target_arch = "x86_64")]
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $imp::<true>($($arg),*)
                }
                match best_isa() {
                    Isa::Generic => $imp::<STATIC_FMA>($($arg),*),
                    // SAFETY: these variants are only chosen by `best_isa` when detected.
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { avx2($($arg),*) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { avx512($($arg),*) },
                }
            }
        };
    }

    /// Rows of the batch processed together (per component the block's column of `h`
    /// is gathered into a small contiguous buffer).
    const BB: usize = 512;

    #[cfg(any(target_feature = "fma", target_arch = "aarch64"))]
    const STATIC_FMA: bool = true;
    #[cfg(not(any(target_feature = "fma", target_arch = "aarch64")))]
    const STATIC_FMA: bool = false;

    const SQRT_2: f32 = std::f32::consts::SQRT_2;
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    /// |u| above which the exp-based (erfc) branch is used.
    const ERF_SPLIT: f32 = 0.927_734_4; // 475/512

    #[inline(always)]
    pub(super) fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
        if F { a.mul_add(b, c) } else { a * b + c }
    }

    /// Coefficients (degree 6, highest last) of 2^f on [-0.5, 0.5] (Chebyshev fit, max
    /// rel. error 3e-9 before f32 rounding).
    const EXP2_P: [f32; 7] = [
        1.0,
        std::f32::consts::LN_2,
        0.240_226_5,
        0.055_503_27,
        0.009_618_057,
        0.001_340_042_8,
        0.000_154_614_45,
    ];

    /// `2^n * 2^f * 2^(BIAS-127)` where `k = 1.5*2^23 + n` (n integer in [-BIAS, 127]) and
    /// `f` in [-0.5, 0.5]: Estrin-evaluated polynomial for 2^f, 2^n from exponent bits.
    #[inline(always)]
    fn exp2_kf<const F: bool, const BIAS: u32>(k: f32, f: f32) -> f32 {
        let p = EXP2_P;
        // 2^f = 1 + f * Q(f), Q of degree 5 by Estrin (the final fma keeps ~1 ulp)
        let f2 = f * f;
        let a = fma::<F>(p[2], f, p[1]);
        let b = fma::<F>(p[4], f, p[3]);
        let c = fma::<F>(p[6], f, p[5]);
        let q = fma::<F>(c, f2 * f2, fma::<F>(b, f2, a));
        let y = fma::<F>(q, f, p[0]);
        // bits(k) = 0x4B40_0000 + n
        let pow2 = f32::from_bits(k.to_bits().wrapping_sub(0x4B40_0000 - BIAS) << 23);
        y * pow2
    }

    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: x + MAGIC rounds x to an integer

    /// Branch-free `2^m * 2^(BIAS-127)` (BIAS = 127: 2^m; 126: 2^m / 2).  `m` is clamped
    /// below at `-BIAS`, where the result is exactly 0 (no denormals); callers pass
    /// m <= 0.  Max rel. error ~1e-7 (the rounding of `m` itself is the caller's).
    #[inline(always)]
    pub(super) fn exp2_core<const F: bool, const BIAS: u32>(m: f32) -> f32 {
        let lo = -(BIAS as f32);
        let m = if m < lo { lo } else { m };
        let k = m + MAGIC; // = MAGIC + round(m), exactly
        let n = k - MAGIC;
        exp2_kf::<F, BIAS>(k, m - n) // m - n is exact
    }

    /// Branch-free f32 exp, accurate to ~1 ulp: Cody-Waite reduction x = n ln2 + r, then
    /// 2^n * 2^(r log2 e).  Clamped to [-88, 88]; results below ~1e-38 flush to 0.
    #[inline(always)]
    pub(super) fn exp<const F: bool>(x: f32) -> f32 {
        let x = if x > 88.0 { 88.0 } else { x };
        let x = if x < -88.0 { -88.0 } else { x };
        let k = fma::<F>(x, std::f32::consts::LOG2_E, MAGIC);
        let n = k - MAGIC; // in [-127, 127]
        let r = fma::<F>(n, -0.693_359_4, x);
        let r = fma::<F>(n, 2.121_944_4e-4, r);
        exp2_kf::<F, 127>(k, r * std::f32::consts::LOG2_E)
    }

    /// log2(erfc(t)) ~= t * Q(t) on [0, 5]: degree-7 Q fitted (Lawson, weighted minimax)
    /// for the absolute accuracy of erfc(t) = 2^(t Q(t)): 1.6e-8, and 3.9e-8 for
    /// 0.5 erfc(t) with f32 coefficients and f32 Estrin evaluation.  Monomials in t
    /// (well conditioned here: the terms stay small where erfc is not negligible).
    #[inline(always)]
    fn log2_erfc<const F: bool>(t: f32) -> f32 {
        const Q: [f32; 8] = [
            -1.627_908_6,
            -0.918_416_4,
            -0.148_481_6,
            0.028_253_665,
            -0.000_774_594_96,
            -0.001_489_475_1,
            0.000_445_522_22,
            -4.536_095_7e-5,
        ];
        let s = t * t;
        let p01 = fma::<F>(Q[1], t, Q[0]);
        let p23 = fma::<F>(Q[3], t, Q[2]);
        let p45 = fma::<F>(Q[5], t, Q[4]);
        let p67 = fma::<F>(Q[7], t, Q[6]);
        let lo = fma::<F>(p23, s, p01);
        let hi = fma::<F>(p67, s, p45);
        t * fma::<F>(hi, s * s, lo)
    }

    /// `(sqrt(pi)/2) * erfcx(t)` (erfcx(t) = exp(t^2) erfc(t)) for t in [0.9277, 4.5]
    /// (clamped above), so that `0.5 * erfc(t) = pdf_u(t) * half_erfcx(t)`.  Degree-7
    /// polynomial in x = (2t - 5.4277)/3.5723, fitted (Lawson / weighted minimax) for
    /// absolute accuracy of `0.5 erfc(t)`: 1.5e-8 with these f32 coefficients.  Estrin.
    #[inline(always)]
    fn half_erfcx<const F: bool>(t: f32) -> f32 {
        const R: [f32; 8] = [
            0.173_707_2,
            -0.102_128_63,
            0.057_329_513,
            -0.040_934_89,
            -0.020_403_717,
            -0.072_385_31,
            -0.052_278_984,
            -0.023_372_592,
        ];
        let t = if t > 4.5 { 4.5 } else { t };
        let x = fma::<F>(t, 0.559_868_75, -1.519_409_5);
        let x2 = x * x;
        let p01 = fma::<F>(R[1], x, R[0]);
        let p23 = fma::<F>(R[3], x, R[2]);
        let p45 = fma::<F>(R[5], x, R[4]);
        let p67 = fma::<F>(R[7], x, R[6]);
        let lo = fma::<F>(p23, x2, p01);
        let hi = fma::<F>(p67, x2, p45);
        fma::<F>(hi, x2 * x2, lo)
    }

    /// Coefficients of the small-|x| branch of Juffa's erff: erf(x) = x (1 + p(x^2)),
    /// p(s) = ((((C0 s + C1) s + C2) s + C3) s + C4) s + C5.
    const ERF_SMALL: [f32; 6] = [
        -5.967_617e-4,
        4.991_194_2e-3,
        -2.676_813_5e-2,
        1.128_199_3e-1,
        -3.761_253_4e-1,
        1.283_791_7e-1,
    ];

    /// Evaluates `m * p(s) + a` (m and a fold scalings into the polynomial; m = 0.5 is exact).
    #[inline(always)]
    fn erf_small_poly<const F: bool>(s: f32, m: f32, a: f32) -> f32 {
        let c = ERF_SMALL;
        let mut r = m * c[0];
        r = fma::<F>(r, s, m * c[1]);
        r = fma::<F>(r, s, m * c[2]);
        r = fma::<F>(r, s, m * c[3]);
        r = fma::<F>(r, s, m * c[4]);
        fma::<F>(r, s, fma::<F>(m, c[5], a))
    }

    /// Branch-free f32 erf built from the same pieces as [`norm_cdf_u`]:
    /// |x| <= 0.9277: Juffa's x (1 + p(x^2)); above: 1 - 2 pdf_u(x) half_erfcx(|x|).
    #[cfg_attr(not(test), allow(dead_code))]
    #[inline(always)]
    pub(super) fn erf<const F: bool>(x: f32) -> f32 {
        let t = x.abs();
        let s = x * x;
        let big = fma::<F>(-2.0 * pdf_u::<F>(x), half_erfcx::<F>(t), 1.0);
        let big = if x < 0.0 { -big } else { big };
        let small = fma::<F>(erf_small_poly::<F>(s, 1.0, 0.0), x, x);
        if t > ERF_SPLIT { big } else { small }
    }

    /// exp(-u^2) / sqrt(pi); gelu'(z) = Phi + u * pdf_u(u) with z = sqrt2 u.  Flushes to
    /// 0 for u^2 > ~87.
    #[inline(always)]
    pub(super) fn pdf_u<const F: bool>(u: f32) -> f32 {
        const LOG2_FRAC_1_SQRT_PI: f32 = -0.825_748_1;
        exp2_core::<F, 127>(fma::<F>(
            u * u,
            -std::f32::consts::LOG2_E,
            LOG2_FRAC_1_SQRT_PI,
        ))
    }

    /// Standard normal CDF at z = sqrt2 u (i.e. 0.5 erfc(-u)) given `pdf = pdf_u(u)`,
    /// branch-free.  Absolute error < 1e-7.
    #[inline(always)]
    pub(super) fn norm_cdf_u_with_pdf<const F: bool>(u: f32, pdf: f32) -> f32 {
        let t = u.abs();
        let half_erfc = pdf * half_erfcx::<F>(t);
        let big = if u < 0.0 { half_erfc } else { 1.0 - half_erfc };
        // 0.5 + 0.5 u (1 + p(s)) = u * (0.5 p(s) + 0.5) + 0.5
        let small = fma::<F>(u, erf_small_poly::<F>(u * u, 0.5, 0.5), 0.5);
        if t > ERF_SPLIT { big } else { small }
    }

    /// Forward-pass variant of the normal CDF at z = sqrt2 u (no pdf needed): one branch,
    /// 0.5 erfc(|u|) = 2^(log2 erfc(|u|) - 1) (the -1 folded into the exponent bias),
    /// exactly 0 / 1 beyond |u| = 5 (where 0.5 erfc < 8e-13).  Absolute error < 1e-7.
    #[inline(always)]
    pub(super) fn norm_cdf_u_fwd<const F: bool>(u: f32) -> f32 {
        let t = u.abs();
        let half_erfc = exp2_core::<F, 126>(log2_erfc::<F>(if t > 5.0 { 5.0 } else { t }));
        let half_erfc = if t > 5.0 { 0.0 } else { half_erfc };
        if u < 0.0 { half_erfc } else { 1.0 - half_erfc }
    }

    #[cfg_attr(not(test), allow(dead_code))]
    #[inline(always)]
    pub(super) fn norm_cdf_u<const F: bool>(u: f32) -> f32 {
        norm_cdf_u_with_pdf::<F>(u, pdf_u::<F>(u))
    }

    #[inline(always)]
    fn add_lanes<const L: usize>(acc: &mut [f64; L], v: &[f32; L]) {
        for l in 0..L {
            acc[l] += v[l] as f64;
        }
    }

    /// Per-(component, hidden unit) constants in the `u` parametrisation.
    #[inline(always)]
    fn unit(w1: &[f32], b1: &[f32], w2: &[f32], j: usize) -> (f32, f32, f32) {
        (w1[j] * FRAC_1_SQRT_2, b1[j] * FRAC_1_SQRT_2, w2[j])
    }

    // ------------------------------ forward ------------------------------

    #[inline(always)]
    fn forward_impl<const F: bool>(
        h: &View2,
        p: &[f32],
        bsz: usize,
        c: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        let w = 3 * hd + 1;
        let mut xb = [0f32; BB];
        let mut acc = [0f32; BB];
        let mut b0 = 0;
        while b0 < bsz {
            let nb = BB.min(bsz - b0);
            for ci in 0..c {
                let row = &p[ci * w..ci * w + w];
                let (w1, rest) = row.split_at(hd);
                let (b1, rest) = rest.split_at(hd);
                let (w2, b2) = rest.split_at(hd);
                let base = h.off + ci * h.s1 + b0 * h.s0;
                for (i, x) in xb[..nb].iter_mut().enumerate() {
                    *x = h.data[base + i * h.s0];
                }
                let xs = &xb[..nb];
                let acc = &mut acc[..nb];
                acc.fill(0.0);
                for j in 0..hd {
                    let (a, bj, wj) = unit(w1, b1, w2, j);
                    let ws = wj * SQRT_2;
                    for (o, &x) in acc.iter_mut().zip(xs) {
                        let u = fma::<F>(x, a, bj);
                        *o = fma::<F>(ws, u * norm_cdf_u_fwd::<F>(u), *o);
                    }
                }
                let b2 = b2[0];
                for (i, &v) in acc.iter().enumerate() {
                    out[(b0 + i) * c + ci] = v + b2;
                }
            }
            b0 += nb;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn forward_avx2(h: &View2, p: &[f32], bsz: usize, c: usize, hd: usize, out: &mut [f32]) {
        forward_impl::<true>(h, p, bsz, c, hd, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn forward_avx512(h: &View2, p: &[f32], bsz: usize, c: usize, hd: usize, out: &mut [f32]) {
        forward_impl::<true>(h, p, bsz, c, hd, out)
    }

    /// Instruction-set variants of the kernels (chosen once at run time).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Isa {
        /// Portable code (FMA only if enabled at compile time).
        Generic,
        /// x86_64 AVX2 + FMA, 8 lanes.
        #[cfg(target_arch = "x86_64")]
        Avx2,
        /// x86_64 AVX-512F/VL + FMA, 16 lanes.
        #[cfg(target_arch = "x86_64")]
        Avx512,
    }

    /// ISA variants usable on this CPU, best last.
    pub(super) fn available_isas() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut v = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    v.push(Isa::Avx512);
                }
            }
        }
        v
    }

    /// The variant used by [`forward`] / [`backward`]: the best available one; the env var
    /// `CIOP_NO_AVX512` (any value, read once) caps it at AVX2, for benchmarking.
    fn best_isa() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[allow(unused_mut)]
            let mut v = available_isas();
            #[cfg(target_arch = "x86_64")]
            if std::env::var_os("CIOP_NO_AVX512").is_some() {
                v.retain(|&i| i != Isa::Avx512);
            }
            *v.last().unwrap()
        })
    }

    pub(super) fn forward(h: &View2, p: &[f32], bsz: usize, c: usize, hd: usize, out: &mut [f32]) {
        forward_isa(best_isa(), h, p, bsz, c, hd, out)
    }

    pub(super) fn forward_isa(
        isa: Isa,
        h: &View2,
        p: &[f32],
        bsz: usize,
        c: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        assert_eq!(p.len(), c * (3 * hd + 1));
        assert_eq!(out.len(), bsz * c);
        match isa {
            Isa::Generic => forward_impl::<STATIC_FMA>(h, p, bsz, c, hd, out),
            // SAFETY: these variants are only listed by `available_isas` when detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { forward_avx2(h, p, bsz, c, hd, out) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { forward_avx512(h, p, bsz, c, hd, out) },
        }
    }

    // ------------------------- elementwise GELU -------------------------

    /// √(2/π) and 0.044715 of the tanh approximation.
    const GELU_K: f32 = 0.797_884_6;
    const GELU_C: f32 = 0.044_715;

    /// σ(2v) of the tanh approximation at x (= 0.5 (1 + tanh v)) and dv/dx.
    #[inline(always)]
    fn tanh_gate<const F: bool>(x: f32) -> (f32, f32) {
        let x2 = x * x;
        let v = GELU_K * fma::<F>(GELU_C * x2, x, x);
        let s = 1.0 / (1.0 + exp::<F>(-2.0 * v));
        (s, GELU_K * fma::<F>(3.0 * GELU_C, x2, 1.0))
    }

    #[inline(always)]
    fn gelu_impl<const F: bool>(tanh: bool, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), out.len());
        if tanh {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = x * tanh_gate::<F>(x).0;
            }
        } else {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = x * norm_cdf_u_fwd::<F>(x * FRAC_1_SQRT_2);
            }
        }
    }

    #[inline(always)]
    fn gelu_bwd_impl<const F: bool>(tanh: bool, x: &[f32], g: &[f32], out: &mut [f32]) {
        assert!(x.len() == out.len() && g.len() == out.len());
        if tanh {
            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                let (s, dv) = tanh_gate::<F>(x);
                // d/dx x σ(2v) = σ + x · 2σ(1 − σ) · dv/dx
                *o = g * fma::<F>(x * 2.0 * s * (1.0 - s), dv, s);
            }
        } else {
            for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
                let u = x * FRAC_1_SQRT_2;
                let pdf = pdf_u::<F>(u);
                *o = g * fma::<F>(u, pdf, norm_cdf_u_with_pdf::<F>(u, pdf));
            }
        }
    }

    isa_dispatch! {
        /// GELU (tanh approximation or exact) of `x` into `out` (same length).
        pub(super) fn gelu(tanh: bool, x: &[f32], out: &mut [f32]) => gelu_impl
    }

    isa_dispatch! {
        /// `g · gelu'(x)` into `out`.
        pub(super) fn gelu_bwd(tanh: bool, x: &[f32], g: &[f32], out: &mut [f32]) => gelu_bwd_impl
    }

    // ------------------------------ KL of logits ------------------------------

    /// Lanes of the row reductions below: float sums only vectorise when kept per lane.
    const RL: usize = 16;

    /// `exp(x − m)` into `e` and its sum.
    #[inline(always)]
    fn exp_shifted<const F: bool>(x: &[f32], m: f32, e: &mut [f32]) -> f32 {
        let mut acc = [0f32; RL];
        let mut xc = x.chunks_exact(RL);
        let mut ec = e.chunks_exact_mut(RL);
        for (xs, es) in (&mut xc).zip(&mut ec) {
            for l in 0..RL {
                es[l] = exp::<F>(xs[l] - m);
                acc[l] += es[l];
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for (o, &x) in ec.into_remainder().iter_mut().zip(xc.remainder()) {
            *o = exp::<F>(x - m);
            sum += *o;
        }
        sum
    }

    #[inline(always)]
    fn max_of(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; RL];
        let mut xc = x.chunks_exact(RL);
        for xs in &mut xc {
            for l in 0..RL {
                acc[l] = if xs[l] > acc[l] { xs[l] } else { acc[l] };
            }
        }
        xc.remainder()
            .iter()
            .chain(&acc)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// Σ p ((a − b) − d), per lane.
    #[inline(always)]
    fn weighted_diff<const F: bool>(p: &[f32], a: &[f32], b: &[f32], d: f32) -> f32 {
        let mut acc = [0f32; RL];
        let (mut pc, mut ac, mut bc) = (p.chunks_exact(RL), a.chunks_exact(RL), b.chunks_exact(RL));
        for ((ps, as_), bs) in (&mut pc).zip(&mut ac).zip(&mut bc) {
            for l in 0..RL {
                acc[l] = fma::<F>(ps[l], (as_[l] - bs[l]) - d, acc[l]);
            }
        }
        let mut sum: f32 = acc.iter().sum();
        for ((&p, &a), &b) in pc
            .remainder()
            .iter()
            .zip(ac.remainder())
            .zip(bc.remainder())
        {
            sum = fma::<F>(p, (a - b) - d, sum);
        }
        sum
    }

    /// KL(softmax(t) ‖ softmax(o)) of one row: Σ p (t − o) − lse(t) + lse(o) with
    /// lse = m + ln Σ exp(x − m).
    #[inline(always)]
    fn kl_row_impl<const F: bool>(o: &[f32], t: &[f32], scratch: &mut [f32]) -> f32 {
        assert!(t.len() == o.len() && scratch.len() >= 2 * o.len());
        let v = o.len();
        let (eo, et) = scratch.split_at_mut(v);
        let (mo, mt) = (max_of(o), max_of(t));
        let so = exp_shifted::<F>(o, mo, eo);
        let st = exp_shifted::<F>(t, mt, et);
        // Σ p ((t − mt) − (o − mo))
        let dot = weighted_diff::<F>(et, t, o, mt - mo);
        dot / st - st.ln() + so.ln()
    }

    #[inline(always)]
    fn kl_row_grad_impl<const F: bool>(o: &[f32], t: &[f32], g: &mut [f32], scratch: &mut [f32]) {
        assert!(t.len() == o.len() && g.len() == o.len() && scratch.len() >= o.len());
        let scratch = &mut scratch[..o.len()];
        let so = exp_shifted::<F>(o, max_of(o), g);
        let st = exp_shifted::<F>(t, max_of(t), scratch);
        let (a, b) = (1.0 / so, 1.0 / st);
        for (g, &p) in g.iter_mut().zip(scratch.iter()) {
            *g = fma::<F>(*g, a, -p * b);
        }
    }

    isa_dispatch! {
        /// KL(softmax(t) ‖ softmax(o)) of one row of logits (`scratch`: 2 × its length).
        pub(super) fn kl_row(o: &[f32], t: &[f32], scratch: &mut [f32]) -> f32 => kl_row_impl
    }

    isa_dispatch! {
        /// softmax(o) − softmax(t) of one row into `g` (`scratch`: its length).
        pub(super) fn kl_row_grad(o: &[f32], t: &[f32], g: &mut [f32], scratch: &mut [f32]) => kl_row_grad_impl
    }

    // ------------------------------ backward ------------------------------

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn backward_impl<const F: bool, const L: usize>(
        h: &View2,
        g: &View2,
        p: &[f32],
        bsz: usize,
        c: usize,
        hd: usize,
        gh: &mut [f32],
        gp: &mut [f32],
    ) {
        let w = 3 * hd + 1;
        // Per-lane f64 partial sums of every gradient entry of P (reduced once at the end):
        // [sum d*x | sum d | sum g*u*Phi | sum g] per component, d = g * gelu'(z).
        let mut lanes = vec![[0f64; L]; c * w];
        let mut xb = [0f32; BB];
        let mut gb = [0f32; BB];
        let mut sb = [0f32; BB];
        let mut b0 = 0;
        while b0 < bsz {
            let nb = BB.min(bsz - b0);
            let nbp = nb.div_ceil(L) * L; // padded with x = g = 0 (contributes nothing)
            for ci in 0..c {
                let row = &p[ci * w..ci * w + w];
                let (w1, rest) = row.split_at(hd);
                let (b1, rest) = rest.split_at(hd);
                let w2 = &rest[..hd];
                let hbase = h.off + ci * h.s1 + b0 * h.s0;
                let gbase = g.off + ci * g.s1 + b0 * g.s0;
                for i in 0..nb {
                    xb[i] = h.data[hbase + i * h.s0];
                    gb[i] = g.data[gbase + i * g.s0];
                }
                xb[nb..nbp].fill(0.0);
                gb[nb..nbp].fill(0.0);
                sb[..nbp].fill(0.0);
                let (xc, _) = xb[..nbp].as_chunks::<L>();
                let (gc, _) = gb[..nbp].as_chunks::<L>();
                let (sc, _) = sb[..nbp].as_chunks_mut::<L>();
                let lrow = &mut lanes[ci * w..ci * w + w];

                let mut ag = [0f32; L];
                for gv in gc {
                    for l in 0..L {
                        ag[l] += gv[l];
                    }
                }
                add_lanes(&mut lrow[3 * hd], &ag);

                for j in 0..hd {
                    let (a, bj, wj) = unit(w1, b1, w2, j);
                    let k = wj * w1[j];
                    let mut ad = [0f32; L];
                    let mut adx = [0f32; L];
                    let mut agu = [0f32; L];
                    for ((xv, gv), sv) in xc.iter().zip(gc).zip(sc.iter_mut()) {
                        for l in 0..L {
                            let x = xv[l];
                            let gg = gv[l];
                            let u = fma::<F>(x, a, bj);
                            let pdf = pdf_u::<F>(u);
                            let cdf = norm_cdf_u_with_pdf::<F>(u, pdf);
                            let gpr = fma::<F>(u, pdf, cdf); // gelu'(z)
                            let d = gg * gpr;
                            ad[l] += d;
                            adx[l] = fma::<F>(d, x, adx[l]);
                            agu[l] = fma::<F>(gg, u * cdf, agu[l]);
                            sv[l] = fma::<F>(k, gpr, sv[l]);
                        }
                    }
                    add_lanes(&mut lrow[j], &adx);
                    add_lanes(&mut lrow[hd + j], &ad);
                    add_lanes(&mut lrow[2 * hd + j], &agu);
                }
                // grad_h = g * sum_j W2 W1 gelu'(z)
                for i in 0..nb {
                    gh[(b0 + i) * c + ci] = gb[i] * sb[i];
                }
            }
            b0 += nb;
        }
        for ci in 0..c {
            for k in 0..w {
                let s: f64 = lanes[ci * w + k].iter().sum();
                let scale = if k < 2 * hd {
                    p[ci * w + 2 * hd + k % hd] as f64 // W2[c,j] (dW1, db1)
                } else if k < 3 * hd {
                    std::f64::consts::SQRT_2 // gelu(z) = sqrt2 u Phi (dW2)
                } else {
                    1.0 // db2
                };
                gp[ci * w + k] = (scale * s) as f32;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn backward_avx2(
        h: &View2,
        g: &View2,
        p: &[f32],
        bsz: usize,
        c: usize,
        hd: usize,
        gh: &mut [f32],
        gp: &mut [f32],
    ) {
        backward_impl::<true, 8>(h, g, p, bsz, c, hd, gh, gp)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn backward_avx512(
        h: &View2,
        g: &View2,
        p: &[f32],
        bsz: usize,
        c: usize,
        hd: usize,
        gh: &mut [f32],
        gp: &mut [f32],
    ) {
        backward_impl::<true, 16>(h, g, p, bsz, c, hd, gh, gp)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        h: &View2,
        g: &View2,
        p: &[f32],
        bsz: usize,
        c: usize,
        hd: usize,
        gh: &mut [f32],
        gp: &mut [f32],
    ) {
        backward_isa(best_isa(), h, g, p, bsz, c, hd, gh, gp)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_isa(
        isa: Isa,
        h: &View2,
        g: &View2,
        p: &[f32],
        bsz: usize,
        c: usize,
        hd: usize,
        gh: &mut [f32],
        gp: &mut [f32],
    ) {
        assert_eq!(p.len(), c * (3 * hd + 1));
        assert_eq!(gp.len(), c * (3 * hd + 1));
        assert_eq!(gh.len(), bsz * c);
        match isa {
            Isa::Generic => backward_impl::<STATIC_FMA, 8>(h, g, p, bsz, c, hd, gh, gp),
            // SAFETY: these variants are only listed by `available_isas` when detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { backward_avx2(h, g, p, bsz, c, hd, gh, gp) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { backward_avx512(h, g, p, bsz, c, hd, gh, gp) },
        }
    }

    // ------------------------- vector MLP (vector_mlp) -------------------------

    /// Packed layout of one component's vector-MLP parameters: `W1 [d, H]` row-major, then
    /// `b1 [H]`, `W2 [H]`, `b2`.
    #[inline(always)]
    fn vec_unit(p: &[f32], comp: usize, d: usize, hd: usize) -> (&[f32], &[f32], &[f32], f32) {
        let w = d * hd + 2 * hd + 1;
        let q = &p[comp * w..(comp + 1) * w];
        let (w1, rest) = q.split_at(d * hd);
        let (b1, rest) = rest.split_at(hd);
        let (w2, rest) = rest.split_at(hd);
        (w1, b1, w2, rest[0])
    }

    /// One component's gradient slices in the packed layout of [`vec_unit`]:
    /// `(gW1, gb1, gW2, gb2)`.
    #[inline(always)]
    #[allow(clippy::type_complexity)]
    fn vec_unit_mut(
        gp: &mut [f32],
        comp: usize,
        d: usize,
        hd: usize,
    ) -> (&mut [f32], &mut [f32], &mut [f32], &mut f32) {
        let w = d * hd + 2 * hd + 1;
        let q = &mut gp[comp * w..(comp + 1) * w];
        let (gw1, rest) = q.split_at_mut(d * hd);
        let (gb1, rest) = rest.split_at_mut(hd);
        let (gw2, gb2) = rest.split_at_mut(hd);
        (gw1, gb1, gw2, &mut gb2[0])
    }

    /// Rows of the batch per block: the block's hidden values `[VB, H]` stay in L2.
    const VB: usize = 256;

    /// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with explicit row/column strides (single
    /// thread), through the `gemm` crate's microkernels.
    #[allow(clippy::too_many_arguments)]
    fn small_gemm(
        m: usize,
        n: usize,
        k: usize,
        dst: &mut [f32],
        accumulate: bool,
        lhs: &[f32],
        lhs_rs: usize,
        lhs_cs: usize,
        rhs: &[f32],
        rhs_rs: usize,
    ) {
        assert!(dst.len() >= m * n);
        assert!(m == 0 || k == 0 || (m - 1) * lhs_rs + (k - 1) * lhs_cs < lhs.len());
        assert!(k == 0 || n == 0 || (k - 1) * rhs_rs + n - 1 < rhs.len());
        // SAFETY: the asserts above keep every index of the three strided matrices inside
        // its slice; dst does not alias lhs or rhs (distinct borrows).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                accumulate,
                lhs.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr(),
                1,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }

    #[inline(always)]
    pub(super) fn vec_forward_impl<const F: bool>(
        x: &[f32],
        p: &[f32],
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        let mut zb = vec![0f32; VB * hd];
        for comp in 0..c {
            let (w1, b1, w2, b2) = vec_unit(p, comp, d, hd);
            for r0 in (0..n).step_by(VB) {
                let rb = VB.min(n - r0);
                small_gemm(rb, hd, d, &mut zb, false, &x[r0 * d..], d, 1, w1, hd);
                for (rr, z) in zb.chunks_exact_mut(hd).take(rb).enumerate() {
                    // gelu in place (branch-free, vectorised), then the dot with W2.
                    for (zj, &bj) in z.iter_mut().zip(b1) {
                        let v = *zj + bj;
                        *zj = v * norm_cdf_u_fwd::<F>(v * FRAC_1_SQRT_2);
                    }
                    let mut acc = [0f32; 8];
                    let (zc, zr) = z.as_chunks::<8>();
                    let (wc, wr) = w2.as_chunks::<8>();
                    for (zv, wv) in zc.iter().zip(wc) {
                        for l in 0..8 {
                            acc[l] = fma::<F>(wv[l], zv[l], acc[l]);
                        }
                    }
                    let mut sum = b2 + acc.iter().sum::<f32>();
                    for (zj, wj) in zr.iter().zip(wr) {
                        sum = fma::<F>(*wj, *zj, sum);
                    }
                    out[(r0 + rr) * c + comp] = sum;
                }
            }
        }
    }

    /// Gradients of the packed parameters (`gp`, same layout as `p`); the input gets none.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn vec_backward_impl<const F: bool>(
        x: &[f32],
        g: &View2,
        p: &[f32],
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        gp: &mut [f32],
    ) {
        let mut zb = vec![0f32; VB * hd];
        for comp in 0..c {
            let (w1, b1, w2, _) = vec_unit(p, comp, d, hd);
            let (gw1, gb1, gw2, gb2) = vec_unit_mut(gp, comp, d, hd);
            let mut gb2_acc = 0f64;
            for r0 in (0..n).step_by(VB) {
                let rb = VB.min(n - r0);
                small_gemm(rb, hd, d, &mut zb, false, &x[r0 * d..], d, 1, w1, hd);
                // zb becomes the gradient of the block's pre-activations.
                for (rr, z) in zb.chunks_exact_mut(hd).take(rb).enumerate() {
                    let gr = g.data[g.off + (r0 + rr) * g.s0 + comp * g.s1];
                    gb2_acc += gr as f64;
                    for j in 0..hd {
                        let v = z[j] + b1[j];
                        let u = v * FRAC_1_SQRT_2;
                        let pdf = pdf_u::<F>(u);
                        let phi = norm_cdf_u_with_pdf::<F>(u, pdf);
                        gw2[j] = fma::<F>(gr, v * phi, gw2[j]);
                        let gz = gr * w2[j] * fma::<F>(u, pdf, phi);
                        gb1[j] += gz;
                        z[j] = gz;
                    }
                }
                // gW1 += X_blockᵀ · G
                small_gemm(d, hd, rb, gw1, true, &x[r0 * d..], 1, d, &zb, hd);
            }
            *gb2 = gb2_acc as f32;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn vec_forward_avx2(
        x: &[f32],
        p: &[f32],
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        vec_forward_impl::<true>(x, p, n, d, c, hd, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn vec_backward_avx2(
        x: &[f32],
        g: &View2,
        p: &[f32],
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        gp: &mut [f32],
    ) {
        vec_backward_impl::<true>(x, g, p, n, d, c, hd, gp)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn vec_forward_avx512(
        x: &[f32],
        p: &[f32],
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        vec_forward_impl::<true>(x, p, n, d, c, hd, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn vec_backward_avx512(
        x: &[f32],
        g: &View2,
        p: &[f32],
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        gp: &mut [f32],
    ) {
        vec_backward_impl::<true>(x, g, p, n, d, c, hd, gp)
    }

    pub(super) fn vec_forward(
        x: &[f32],
        p: &[f32],
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        out: &mut [f32],
    ) {
        match best_isa() {
            Isa::Generic => vec_forward_impl::<STATIC_FMA>(x, p, n, d, c, hd, out),
            // SAFETY: these variants are only chosen when detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { vec_forward_avx2(x, p, n, d, c, hd, out) },
            // SAFETY: AVX-512 detected; the fused kernel checks its slices' sizes.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if fused512::fits(hd) => unsafe {
                fused512::forward(x, p, n, d, c, hd, out)
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { vec_forward_avx512(x, p, n, d, c, hd, out) },
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn vec_backward(
        x: &[f32],
        g: &View2,
        p: &[f32],
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        gp: &mut [f32],
    ) {
        match best_isa() {
            Isa::Generic => vec_backward_impl::<STATIC_FMA>(x, g, p, n, d, c, hd, gp),
            // SAFETY: these variants are only chosen when detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { vec_backward_avx2(x, g, p, n, d, c, hd, gp) },
            // SAFETY: AVX-512 detected; the fused kernel checks its slices' sizes.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if fused512::fits(hd) => unsafe {
                fused512::backward(x, g, p, n, d, c, hd, gp)
            },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { vec_backward_avx512(x, g, p, n, d, c, hd, gp) },
        }
    }

    /// The vector MLP with the first layer register-tiled (AVX-512): a tile of rows × 64
    /// hidden units is computed in registers (`b1 + x·W1`, d FMAs per value), then its GELU
    /// (forward: times W2, summed; backward: the gradients of W2, b1 and the hidden values)
    /// straight from the registers, instead of a block GEMM written to memory and read back.
    /// Needs H a multiple of 64. Equal to [`vec_forward_impl`] / [`vec_backward_impl`] up to
    /// float summation order (tested).
    #[cfg(target_arch = "x86_64")]
    pub(super) mod fused512 {
        use super::{
            FRAC_1_SQRT_2, VB, fma, norm_cdf_u_fwd, norm_cdf_u_with_pdf, pdf_u, small_gemm,
            vec_unit, vec_unit_mut,
        };
        use std::arch::x86_64::*;

        /// Lanes per vector, hidden vectors per chunk, rows per tile.
        const L: usize = 16;
        const V: usize = 4;
        const R: usize = 4;

        pub fn fits(hd: usize) -> bool {
            hd > 0 && hd.is_multiple_of(V * L)
        }

        /// `b1[h0..] + Σ_i x[r, i] W1[i, h0..]` for `RR` rows from `x` (row-major, `d` per
        /// row) and the `V` vectors of hidden units from `h0`.
        ///
        /// SAFETY (caller): AVX-512F; `x` holds `RR·d` values, `w1` `d·hd`, `b1` `hd`, and
        /// `h0 + V·L <= hd`.
        #[inline(always)]
        unsafe fn z_tile<const RR: usize>(
            x: *const f32,
            d: usize,
            w1: *const f32,
            b1: *const f32,
            hd: usize,
            h0: usize,
        ) -> [[__m512; V]; RR] {
            unsafe {
                let b: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(b1.add(h0 + v * L)));
                let mut acc = [b; RR];
                for i in 0..d {
                    let w: [__m512; V] =
                        std::array::from_fn(|v| _mm512_loadu_ps(w1.add(i * hd + h0 + v * L)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xb = _mm512_set1_ps(*x.add(r * d + i));
                        for v in 0..V {
                            a[v] = _mm512_fmadd_ps(xb, w[v], a[v]);
                        }
                    }
                }
                acc
            }
        }

        /// gelu(z) lane by lane (the branch-free scalar code, vectorised by the compiler).
        #[inline(always)]
        unsafe fn gelu(z: __m512) -> __m512 {
            unsafe {
                let mut a = [0f32; L];
                _mm512_storeu_ps(a.as_mut_ptr(), z);
                for v in a.iter_mut() {
                    *v *= norm_cdf_u_fwd::<true>(*v * FRAC_1_SQRT_2);
                }
                _mm512_loadu_ps(a.as_ptr())
            }
        }

        /// (gelu(z), gelu'(z)) lane by lane.
        #[inline(always)]
        unsafe fn gelu_and_grad(z: __m512) -> (__m512, __m512) {
            unsafe {
                let mut a = [0f32; L];
                let mut g = [0f32; L];
                _mm512_storeu_ps(a.as_mut_ptr(), z);
                for (v, gv) in a.iter_mut().zip(g.iter_mut()) {
                    let u = *v * FRAC_1_SQRT_2;
                    let pdf = pdf_u::<true>(u);
                    let phi = norm_cdf_u_with_pdf::<true>(u, pdf);
                    *gv = fma::<true>(u, pdf, phi);
                    *v *= phi;
                }
                (_mm512_loadu_ps(a.as_ptr()), _mm512_loadu_ps(g.as_ptr()))
            }
        }

        /// `out[(r0 + r)·c + comp]` for the `RR` rows from `r0`.
        ///
        /// SAFETY (caller): as [`z_tile`] for every chunk, and `out` holds the rows.
        #[inline(always)]
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        unsafe fn forward_rows<const RR: usize>(
            x: &[f32],
            r0: usize,
            d: usize,
            (w1, b1, w2, b2): (&[f32], &[f32], &[f32], f32),
            hd: usize,
            c: usize,
            comp: usize,
            out: &mut [f32],
        ) {
            unsafe {
                let mut o = [_mm512_setzero_ps(); RR];
                for h0 in (0..hd).step_by(V * L) {
                    let z =
                        z_tile::<RR>(x.as_ptr().add(r0 * d), d, w1.as_ptr(), b1.as_ptr(), hd, h0);
                    for v in 0..V {
                        let w = _mm512_loadu_ps(w2.as_ptr().add(h0 + v * L));
                        for r in 0..RR {
                            o[r] = _mm512_fmadd_ps(gelu(z[r][v]), w, o[r]);
                        }
                    }
                }
                for (r, o) in o.iter().enumerate() {
                    out[(r0 + r) * c + comp] = _mm512_reduce_add_ps(*o) + b2;
                }
            }
        }

        /// The forward pass (see [`super::vec_forward_impl`] for the shapes).
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        pub unsafe fn forward(
            x: &[f32],
            p: &[f32],
            n: usize,
            d: usize,
            c: usize,
            hd: usize,
            out: &mut [f32],
        ) {
            assert!(fits(hd) && x.len() >= n * d && out.len() >= n * c);
            assert_eq!(p.len(), c * (d * hd + 2 * hd + 1));
            for comp in 0..c {
                let unit = vec_unit(p, comp, d, hd);
                let mut r0 = 0;
                // SAFETY: rows r0..r0+R (or +1) < n, chunks inside hd (asserted above).
                unsafe {
                    while r0 + R <= n {
                        forward_rows::<R>(x, r0, d, unit, hd, c, comp, out);
                        r0 += R;
                    }
                    while r0 < n {
                        forward_rows::<1>(x, r0, d, unit, hd, c, comp, out);
                        r0 += 1;
                    }
                }
            }
        }

        /// For the `RR` rows from `r` (within the block from `r0`): accumulates the gradients
        /// of W2 and b1 and writes the hidden values' gradients into `zb` (block-relative
        /// rows, `hd` per row).
        ///
        /// SAFETY (caller): as [`z_tile`]; `zb` holds the block's rows; `g` the gradient rows.
        #[inline(always)]
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        unsafe fn backward_rows<const RR: usize>(
            x: &[f32],
            grad: [f32; RR],
            r: usize,
            r0: usize,
            d: usize,
            (w1, b1, w2): (&[f32], &[f32], &[f32]),
            hd: usize,
            gw2: &mut [f32],
            gb1: &mut [f32],
            zb: &mut [f32],
        ) {
            unsafe {
                let gr: [__m512; RR] = std::array::from_fn(|i| _mm512_set1_ps(grad[i]));
                for h0 in (0..hd).step_by(V * L) {
                    let z =
                        z_tile::<RR>(x.as_ptr().add(r * d), d, w1.as_ptr(), b1.as_ptr(), hd, h0);
                    for v in 0..V {
                        let o = h0 + v * L;
                        let w = _mm512_loadu_ps(w2.as_ptr().add(o));
                        let mut a2 = _mm512_loadu_ps(gw2.as_ptr().add(o));
                        let mut a1 = _mm512_loadu_ps(gb1.as_ptr().add(o));
                        for i in 0..RR {
                            let (h, dh) = gelu_and_grad(z[i][v]);
                            a2 = _mm512_fmadd_ps(gr[i], h, a2);
                            let gz = _mm512_mul_ps(_mm512_mul_ps(gr[i], w), dh);
                            a1 = _mm512_add_ps(a1, gz);
                            _mm512_storeu_ps(zb.as_mut_ptr().add((r - r0 + i) * hd + o), gz);
                        }
                        _mm512_storeu_ps(gw2.as_mut_ptr().add(o), a2);
                        _mm512_storeu_ps(gb1.as_mut_ptr().add(o), a1);
                    }
                }
            }
        }

        /// The parameters' gradients (see [`super::vec_backward_impl`]).
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn backward(
            x: &[f32],
            g: &super::super::View2,
            p: &[f32],
            n: usize,
            d: usize,
            c: usize,
            hd: usize,
            gp: &mut [f32],
        ) {
            let w = d * hd + 2 * hd + 1;
            assert!(fits(hd) && x.len() >= n * d);
            assert!(p.len() == c * w && gp.len() == c * w);
            let mut zb = vec![0f32; VB * hd];
            let grad = |r: usize, comp: usize| g.data[g.off + r * g.s0 + comp * g.s1];
            for comp in 0..c {
                let (w1, b1, w2, _) = vec_unit(p, comp, d, hd);
                let (gw1, gb1, gw2, gb2) = vec_unit_mut(gp, comp, d, hd);
                let mut gb2_acc = 0f64;
                for r0 in (0..n).step_by(VB) {
                    let rb = VB.min(n - r0);
                    let mut r = r0;
                    // SAFETY: rows r..r+R (or +1) inside the block and below n; chunks inside
                    // hd (asserted above); zb holds VB rows of hd.
                    unsafe {
                        // One tile of rows: their gradients, summed for b2, then the tile.
                        let mut tile = |r: usize, rr: usize| {
                            let unit = (w1, b1, w2);
                            if rr == R {
                                let gr: [f32; R] = std::array::from_fn(|i| grad(r + i, comp));
                                gb2_acc += gr.iter().map(|&v| v as f64).sum::<f64>();
                                backward_rows::<R>(x, gr, r, r0, d, unit, hd, gw2, gb1, &mut zb);
                            } else {
                                let gr = [grad(r, comp)];
                                gb2_acc += gr[0] as f64;
                                backward_rows::<1>(x, gr, r, r0, d, unit, hd, gw2, gb1, &mut zb);
                            }
                        };
                        while r + R <= r0 + rb {
                            tile(r, R);
                            r += R;
                        }
                        while r < r0 + rb {
                            tile(r, 1);
                            r += 1;
                        }
                    }
                    // gW1 += X_blockᵀ · G
                    small_gemm(d, hd, rb, gw1, true, &x[r0 * d..], 1, d, &zb, hd);
                }
                *gb2 = gb2_acc as f32;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused vector MLP equals plain tensor ops (forward and parameter gradients): H = 12
    /// (the blocked kernels), and H = 64 / 128 with row counts that leave a partial tile (the
    /// register-tiled AVX-512 kernels where the CPU has them).
    #[test]
    fn fused_kl_matches_tensor_ops() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let (n, v) = (37, 510);
        let mut rng = Rng(9);
        let o = candle_core::Var::from_vec(rng.uniform(n * v, -9.0, 9.0), (n, v), &dev)?;
        let t = Tensor::from_vec(rng.uniform(n * v, -9.0, 9.0), (n, v), &dev)?;
        let w = Tensor::new(0.37f32, &dev)?;
        let fused = kl_sum(o.as_tensor(), &t)?;
        let plain = crate::spd::trainer::kl_rows(o.as_tensor(), &t)?.sum_all()?;
        let (a, b) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
        assert!((a - b).abs() <= 1e-5 * b.abs(), "KL {a} vs {b}");
        let gf = (fused * &w)?.backward()?;
        let gp = (plain * &w)?.backward()?;
        let (a, b) = (flat(gf.get(&o).unwrap()), flat(gp.get(&o).unwrap()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6, "gradient {x} vs {y}");
        }
        Ok(())
    }

    #[test]
    fn fused_gelus_and_power_match_candle() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut v: Vec<f32> = (0..4000)
            .map(|i| -12.0 + 24.0 * i as f32 / 3999.0)
            .collect();
        v.extend([0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0, 100.0, -100.0]);
        let n = v.len();
        // A transposed (non-contiguous) view as well as the plain one.
        let plain = candle_core::Var::from_vec(v.clone(), (n / 8, 8), &dev)?;
        let w = Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect::<Vec<_>>(),
            (8, n / 8),
            &dev,
        )?;
        type Pair = (
            fn(&Tensor) -> Result<Tensor>,
            fn(&Tensor) -> Result<Tensor>,
            f32,
        );
        let cases: [(&str, Pair); 2] = [
            ("tanh", (gelu_tanh, |x: &Tensor| x.gelu(), 3e-6)),
            ("erf", (gelu_erf, |x: &Tensor| x.gelu_erf(), 3e-6)),
        ];
        for (name, (fused, candle, tol)) in cases {
            let xt = plain.as_tensor().t()?;
            let (yf, yc) = (fused(&xt)?, candle(&xt)?);
            let (a, b) = (flat(&yf), flat(&yc));
            for (k, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - q).abs() <= tol * q.abs().max(1.0),
                    "{name} value {k}: fused {p}, candle {q}"
                );
            }
            let gf = (yf * &w)?.sum_all()?.backward()?;
            let gc = (yc * &w)?.sum_all()?.backward()?;
            let (a, b) = (flat(gf.get(&plain).unwrap()), flat(gc.get(&plain).unwrap()));
            for (k, (p, q)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - q).abs() <= tol * q.abs().max(1.0),
                    "{name} gradient {k} at x = {}: fused {p}, candle {q}",
                    v[(k % 8) * (n / 8) + k / 8]
                );
            }
        }
        let ci = candle_core::Var::from_vec(
            (0..n)
                .map(|i| (i as f32 / n as f32) * 1.2)
                .collect::<Vec<_>>(),
            (n / 8, 8),
            &dev,
        )?;
        for p in [0.3, 0.9, 2.0] {
            let yf = pow_shifted(ci.as_tensor(), 1e-12, p)?;
            let yc = (ci.as_tensor() + 1e-12)?.powf(p)?;
            let w = w.t()?;
            let gf = (&yf * &w)?.sum_all()?.backward()?;
            let gc = (&yc * &w)?.sum_all()?.backward()?;
            for (a, b) in [
                (flat(&yf), flat(&yc)),
                (flat(gf.get(&ci).unwrap()), flat(gc.get(&ci).unwrap())),
            ] {
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                        "p {p}: {x} vs {y}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn vector_mlp_fused_matches_plain_ops() -> Result<()> {
        for (n, d, c, hd) in [
            (37, 5, 6, 12),
            (37, 16, 3, 128),
            (6, 3, 2, 64),
            (300, 4, 2, 64),
        ] {
            vector_mlp_case(n, d, c, hd, None)?;
        }
        // Rows that repeat (a first layer reading token embeddings) are computed once each.
        vector_mlp_case(64, 16, 3, 128, Some(5))?;
        vector_mlp_case(40, 5, 2, 12, Some(7))?;
        Ok(())
    }

    /// `distinct`: the rows are copies of this many distinct rows.
    fn vector_mlp_case(
        n: usize,
        d: usize,
        c: usize,
        hd: usize,
        distinct: Option<usize>,
    ) -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut seed = 1u64;
        let mut r = |len: usize, s: f32| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * s
                })
                .collect()
        };
        let mut xs = r(n * d, 2.0);
        if let Some(k) = distinct {
            for i in k..n {
                let from = (i * 7) % k;
                xs.copy_within(from * d..(from + 1) * d, i * d);
            }
            assert!(UniqueRows::of(&xs, n, d).is_some_and(|u| u.len() == k));
        }
        let x = Tensor::from_vec(xs, (n, d), &dev)?;
        let vars: Vec<candle_core::Var> = [
            (r(c * d * hd, 1.0), vec![c, d, hd]),
            (r(c * hd, 0.5), vec![c, hd]),
            (r(c * hd, 0.5), vec![c, hd, 1]),
            (r(c, 0.5), vec![c, 1]),
        ]
        .into_iter()
        .map(|(v, s)| candle_core::Var::from_tensor(&Tensor::from_vec(v, s, &dev)?))
        .collect::<Result<_>>()?;
        let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let gout = Tensor::from_vec(r(n * c, 1.0), (n, c), &dev)?;
        let fused = ci_vector_mlp(&x, t[0], t[1], t[2], t[3])?;
        let w0 = t[0].transpose(0, 1)?.reshape((d, c * hd))?;
        let plain = x
            .matmul(&w0)?
            .reshape((n, c, hd))?
            .broadcast_add(t[1])?
            .gelu_erf()?
            .transpose(0, 1)?
            .contiguous()?
            .matmul(t[2])?
            .broadcast_add(&t[3].unsqueeze(1)?)?
            .squeeze(2)?
            .t()?;
        let diff = (&fused - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 2e-5, "forward differs by {diff}");
        let gf = (&fused * &gout)?.sum_all()?.backward()?;
        let gp = (&plain * &gout)?.sum_all()?.backward()?;
        for v in &vars {
            let a = gf.get(v.as_tensor()).unwrap();
            let b = gp.get(v.as_tensor()).unwrap();
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff / scale < 1e-5,
                "gradient {:?} differs by {diff}",
                v.dims()
            );
        }
        Ok(())
    }
    use candle_core::{Device, Var};

    /// Deterministic uniform generator (SplitMix64).
    struct Rng(u64);
    impl Rng {
        fn next_f32(&mut self) -> f32 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32
        }
        fn uniform(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..n).map(|_| lo + (hi - lo) * self.next_f32()).collect()
        }
    }

    struct Params {
        w1: Var,
        b1: Var,
        w2: Var,
        b2: Var,
    }

    fn params(rng: &mut Rng, c: usize, hd: usize) -> Params {
        let dev = Device::Cpu;
        let v = |rng: &mut Rng, shape: &[usize], s: f32| {
            let n = shape.iter().product();
            Var::from_tensor(&Tensor::from_vec(rng.uniform(n, -s, s), shape, &dev).unwrap())
                .unwrap()
        };
        Params {
            w1: v(rng, &[c, 1, hd], 2.0),
            b1: v(rng, &[c, hd], 1.0),
            w2: v(rng, &[c, hd, 1], 1.0),
            b2: v(rng, &[c, 1], 1.0),
        }
    }

    /// h: some rows moderate, some large (|h| up to 20).
    fn make_h(rng: &mut Rng, b: usize, c: usize) -> Vec<f32> {
        let mut v = rng.uniform(b * c, -3.0, 3.0);
        for (i, x) in v.iter_mut().enumerate() {
            if i % 3 == 0 {
                *x *= 20.0 / 3.0;
            }
        }
        v
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Largest |a-b| / (abs_tol + rel_tol*scale); <= 1 passes.  `scale` is the sum of the
    /// magnitudes of the terms that make up the value (f32 rounding is relative to it).
    fn tol_ratio(a: &[f32], b: &[f32], scale: &[f64], abs_tol: f64, rel_tol: f64) -> f64 {
        assert_eq!(a.len(), b.len());
        assert_eq!(a.len(), scale.len());
        (0..a.len())
            .map(|i| (a[i] as f64 - b[i] as f64).abs() / (abs_tol + rel_tol * scale[i]))
            .fold(0.0, f64::max)
    }

    fn run(p: &Params, h: &Tensor, fused: bool) -> Tensor {
        let f = if fused { ci_mlp } else { ci_mlp_reference };
        f(
            h,
            p.w1.as_tensor(),
            p.b1.as_tensor(),
            p.w2.as_tensor(),
            p.b2.as_tensor(),
        )
        .unwrap()
    }

    /// f64 oracle: pre, dL/d{h,W1,b1,W2,b2} for dL/dpre = r, and for each the sum of the
    /// absolute values of its terms.  h is row-major [B,C].
    struct Oracle {
        pre: (Vec<f64>, Vec<f64>),
        grads: [(Vec<f64>, Vec<f64>); 5],
    }

    fn oracle(h: &[f32], p: &Params, r: &[f32], b: usize, c: usize, hd: usize) -> Oracle {
        let erf = candle_core::cpu::erf::erf_f64;
        let (w1, b1, w2, b2) = (
            flat(p.w1.as_tensor()),
            flat(p.b1.as_tensor()),
            flat(p.w2.as_tensor()),
            flat(p.b2.as_tensor()),
        );
        let z2 = |n: usize| (vec![0f64; n], vec![0f64; n]);
        let mut pre = z2(b * c);
        let mut g = [z2(b * c), z2(c * hd), z2(c * hd), z2(c * hd), z2(c)];
        let add = |acc: &mut (Vec<f64>, Vec<f64>), i: usize, v: f64| {
            acc.0[i] += v;
            acc.1[i] += v.abs();
        };
        for bi in 0..b {
            for ci in 0..c {
                let x = h[bi * c + ci] as f64;
                let rr = r[bi * c + ci] as f64;
                add(&mut pre, bi * c + ci, b2[ci] as f64);
                add(&mut g[4], ci, rr);
                for j in 0..hd {
                    let k = ci * hd + j;
                    let z = x * w1[k] as f64 + b1[k] as f64;
                    let cdf = 0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2));
                    let gel = z * cdf;
                    let gp = cdf + z * (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
                    let wv = w2[k] as f64;
                    add(&mut pre, bi * c + ci, wv * gel);
                    add(&mut g[0], bi * c + ci, rr * wv * gp * w1[k] as f64);
                    add(&mut g[1], k, rr * wv * gp * x);
                    add(&mut g[2], k, rr * wv * gp);
                    add(&mut g[3], k, rr * gel);
                }
            }
        }
        Oracle { pre, grads: g }
    }

    fn max_abs(a: &[f32], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - y).abs())
            .fold(0.0, f64::max)
    }

    fn to_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    /// Test 1: forward, fused vs. plain-candle reference vs. f64 oracle.
    #[test]
    fn forward_matches_reference() {
        let mut rng = Rng(1);
        let dev = Device::Cpu;
        let (mut worst_ref, mut worst_f64, mut worst_ref_f64) = (0f64, 0f64, 0f64);
        for &(b, c, hd) in &[
            (37, 5, 16),
            (37, 5, 3),
            (1, 1, 1),
            (300, 7, 9),
            (513, 3, 128),
        ] {
            let p = params(&mut rng, c, hd);
            let h = Tensor::from_vec(make_h(&mut rng, b, c), (b, c), &dev).unwrap();
            // non-contiguous h: transpose of a [C,B] tensor
            let ht = Tensor::from_vec(make_h(&mut rng, b, c), (c, b), &dev)
                .unwrap()
                .t()
                .unwrap();
            assert!(!ht.is_contiguous() || b == 1 || c == 1);
            for h in [&h, &ht] {
                let hv: Vec<f32> = h.to_vec2::<f32>().unwrap().concat();
                let o = oracle(&hv, &p, &vec![0.0; b * c], b, c, hd);
                let f = run(&p, h, true);
                let r = run(&p, h, false);
                assert_eq!(f.dims(), &[b, c]);
                let (f, r) = (flat(&f), flat(&r));
                let d_ref = max_abs(&f, &r.iter().map(|&x| x as f64).collect::<Vec<_>>());
                let d_f64 = max_abs(&f, &o.pre.0);
                let d_ref_f64 = max_abs(&r, &o.pre.0);
                // 1e-6 absolute plus f32 resolution of the magnitudes summed.
                let ratio = tol_ratio(&f, &r, &o.pre.1, 1e-6, 1e-6);
                let ratio64 = tol_ratio(&f, &to_f32(&o.pre.0), &o.pre.1, 1e-6, 1e-6);
                println!(
                    "fwd B={b} C={c} H={hd} contiguous={}: max|fused-ref| {d_ref:.2e}, max|fused-f64| {d_f64:.2e}, max|ref-f64| {d_ref_f64:.2e}, max|pre| {:.1}",
                    h.is_contiguous(),
                    o.pre.0.iter().fold(0f64, |m, v| m.max(v.abs()))
                );
                assert!(ratio <= 1.0 && ratio64 <= 1.0, "forward mismatch");
                worst_ref = worst_ref.max(d_ref);
                worst_f64 = worst_f64.max(d_f64);
                worst_ref_f64 = worst_ref_f64.max(d_ref_f64);
            }
        }
        println!(
            "forward worst: |fused-ref| {worst_ref:.3e}, |fused-f64| {worst_f64:.3e}, |ref-f64| {worst_ref_f64:.3e}"
        );
    }

    /// Test 1 with O(1) outputs: strict 1e-6 absolute agreement, |h| up to 20.
    #[test]
    fn forward_small_values_abs_1e6() {
        let mut rng = Rng(7);
        let dev = Device::Cpu;
        for &hd in &[16, 3] {
            let (b, c) = (37, 5);
            let p = params(&mut rng, c, hd);
            let h = Tensor::from_vec(rng.uniform(b * c, -20.0, 20.0), (b, c), &dev).unwrap();
            let p2 = Params {
                w1: Var::from_tensor(&(p.w1.as_tensor() * 0.25).unwrap()).unwrap(),
                b1: p.b1,
                w2: Var::from_tensor(&(p.w2.as_tensor() * 0.1).unwrap()).unwrap(),
                b2: p.b2,
            };
            let f = flat(&run(&p2, &h, true));
            let r = flat(&run(&p2, &h, false));
            let d = f
                .iter()
                .zip(&r)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("fwd small-output H={hd}: max abs diff {d:.3e}");
            assert!(d <= 1e-6, "{d}");
        }
    }

    /// Test 2: gradients of sum(pre * R), fused vs. candle autograd through the reference
    /// vs. f64 oracle.
    #[test]
    fn backward_matches_reference() {
        let mut rng = Rng(2);
        let dev = Device::Cpu;
        let names = ["h", "W1", "b1", "W2", "b2"];
        let mut worst = [(0f64, 0f64); 5];
        for &(b, c, hd, transposed) in &[
            (37, 5, 16, false),
            (37, 5, 3, true),
            (37, 5, 16, true),
            (300, 4, 7, false),
            (1, 1, 1, false),
            (600, 3, 128, false),
        ] {
            let p = params(&mut rng, c, hd);
            let hvar = if transposed {
                Var::from_tensor(&Tensor::from_vec(make_h(&mut rng, b, c), (c, b), &dev).unwrap())
                    .unwrap()
            } else {
                Var::from_tensor(&Tensor::from_vec(make_h(&mut rng, b, c), (b, c), &dev).unwrap())
                    .unwrap()
            };
            let h = if transposed {
                hvar.as_tensor().t().unwrap()
            } else {
                hvar.as_tensor().clone()
            };
            let rv = rng.uniform(b * c, -1.0, 1.0);
            let wts = Tensor::from_vec(rv.clone(), (b, c), &dev).unwrap();
            let o = oracle(&h.to_vec2::<f32>().unwrap().concat(), &p, &rv, b, c, hd);
            let grads_of = |fused: bool| {
                let pre = run(&p, &h, fused);
                let loss = (pre * &wts).unwrap().sum_all().unwrap();
                let g = loss.backward().unwrap();
                let gh = g.get(hvar.as_tensor()).expect("missing grad").clone();
                let gh = if transposed { gh.t().unwrap() } else { gh }; // -> [B, C]
                [
                    gh,
                    g.get(p.w1.as_tensor()).unwrap().clone(),
                    g.get(p.b1.as_tensor()).unwrap().clone(),
                    g.get(p.w2.as_tensor()).unwrap().clone(),
                    g.get(p.b2.as_tensor()).unwrap().clone(),
                ]
            };
            let gf = grads_of(true);
            let gr = grads_of(false);
            for i in 0..5 {
                assert_eq!(gf[i].dims(), gr[i].dims());
                let (a, r) = (flat(&gf[i]), flat(&gr[i]));
                let (want, scale) = &o.grads[i];
                let d_ref = max_abs(&a, &r.iter().map(|&x| x as f64).collect::<Vec<_>>());
                let d_f64 = max_abs(&a, want);
                let d_ref_f64 = max_abs(&r, want);
                // 1e-6 abs + 1e-5 relative to the magnitude of the summed terms.
                let ratio = tol_ratio(&a, &r, scale, 1e-6, 1e-5);
                let ratio64 = tol_ratio(&a, &to_f32(want), scale, 1e-6, 1e-5);
                println!(
                    "bwd B={b} C={c} H={hd} T={transposed} d{}: |fused-ref| {d_ref:.2e} |fused-f64| {d_f64:.2e} |ref-f64| {d_ref_f64:.2e} (tol ratios {ratio:.3}/{ratio64:.3})",
                    names[i]
                );
                assert!(ratio <= 1.0 && ratio64 <= 1.0, "grad {} mismatch", names[i]);
                worst[i].0 = worst[i].0.max(d_ref);
                worst[i].1 = worst[i].1.max(d_f64);
            }
        }
        for i in 0..5 {
            println!(
                "bwd worst d{}: |fused-ref| {:.3e}, |fused-f64| {:.3e}",
                names[i], worst[i].0, worst[i].1
            );
        }
    }

    /// Every kernel variant usable on this CPU (portable, AVX2, AVX-512) against the f64
    /// oracle, incl. batch sizes that are not multiples of the block / lane counts.
    #[test]
    fn isa_variants_match_oracle() {
        let mut rng = Rng(11);
        for &(b, c, hd) in &[(37, 5, 16), (600, 3, 3), (1100, 2, 17), (5, 4, 1)] {
            let p = params(&mut rng, c, hd);
            let hv = make_h(&mut rng, b, c);
            let gv = rng.uniform(b * c, -1.0, 1.0);
            let o = oracle(&hv, &p, &gv, b, c, hd);
            let pt = Tensor::cat(
                &[
                    &p.w1.as_tensor().reshape((c, hd)).unwrap(),
                    p.b1.as_tensor(),
                    &p.w2.as_tensor().reshape((c, hd)).unwrap(),
                    p.b2.as_tensor(),
                ],
                1,
            )
            .unwrap();
            let pv = flat(&pt);
            let hview = View2 {
                data: &hv,
                off: 0,
                s0: c,
                s1: 1,
            };
            let gview = View2 {
                data: &gv,
                off: 0,
                s0: c,
                s1: 1,
            };
            for isa in kernels::available_isas() {
                let mut out = vec![0f32; b * c];
                kernels::forward_isa(isa, &hview, &pv, b, c, hd, &mut out);
                let r = tol_ratio(&out, &to_f32(&o.pre.0), &o.pre.1, 1e-6, 1e-6);
                let mut gh = vec![0f32; b * c];
                let mut gp = vec![0f32; c * (3 * hd + 1)];
                kernels::backward_isa(isa, &hview, &gview, &pv, b, c, hd, &mut gh, &mut gp);
                let rh = tol_ratio(&gh, &to_f32(&o.grads[0].0), &o.grads[0].1, 1e-6, 1e-5);
                // grad_P = [dW1 | db1 | dW2 | db2] per component row
                let mut want = vec![0f32; c * (3 * hd + 1)];
                let mut scale = vec![0f64; c * (3 * hd + 1)];
                for ci in 0..c {
                    for (k, gi) in [1usize, 2, 3].iter().enumerate() {
                        for j in 0..hd {
                            want[ci * (3 * hd + 1) + k * hd + j] =
                                o.grads[*gi].0[ci * hd + j] as f32;
                            scale[ci * (3 * hd + 1) + k * hd + j] = o.grads[*gi].1[ci * hd + j];
                        }
                    }
                    want[ci * (3 * hd + 1) + 3 * hd] = o.grads[4].0[ci] as f32;
                    scale[ci * (3 * hd + 1) + 3 * hd] = o.grads[4].1[ci];
                }
                let rp = tol_ratio(&gp, &want, &scale, 1e-6, 1e-5);
                println!("{isa:?} B={b} C={c} H={hd}: tol ratios fwd {r:.3} dh {rh:.3} dP {rp:.3}");
                assert!(r <= 1.0 && rh <= 1.0 && rp <= 1.0, "{isa:?}");
            }
        }
    }

    #[test]
    fn backward_broadcast_grad_sum_loss() {
        // loss = sum(pre): grad_res arrives as a stride-0 broadcast.
        let mut rng = Rng(3);
        let dev = Device::Cpu;
        let (b, c, hd) = (20, 3, 5);
        let p = params(&mut rng, c, hd);
        let hv = make_h(&mut rng, b, c);
        let hvar = Var::from_tensor(&Tensor::from_vec(hv.clone(), (b, c), &dev).unwrap()).unwrap();
        let o = oracle(&hv, &p, &vec![1.0; b * c], b, c, hd);
        let loss = run(&p, hvar.as_tensor(), true).sum_all().unwrap();
        let g = loss.backward().unwrap();
        for (i, t) in [
            hvar.as_tensor(),
            p.w1.as_tensor(),
            p.b1.as_tensor(),
            p.w2.as_tensor(),
            p.b2.as_tensor(),
        ]
        .iter()
        .enumerate()
        {
            let got = flat(g.get(t).unwrap());
            assert!(tol_ratio(&got, &to_f32(&o.grads[i].0), &o.grads[i].1, 1e-6, 1e-5) <= 1.0);
        }
    }

    #[test]
    fn empty_batch() {
        let mut rng = Rng(4);
        let p = params(&mut rng, 3, 4);
        let hvar = Var::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let pre = run(&p, hvar.as_tensor(), true);
        assert_eq!(pre.dims(), &[0, 3]);
        let g = pre.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(p.w1.as_tensor()).unwrap().dims(), &[3, 1, 4]);
        let gw1 = g
            .get(p.w1.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(gw1.iter().all(|&v| v == 0.0));
        assert_eq!(g.get(hvar.as_tensor()).unwrap().dims(), &[0, 3]);
        // the reference path too
        let pre = run(&p, hvar.as_tensor(), false);
        assert_eq!(pre.dims(), &[0, 3]);
    }

    /// Non-f32 inputs go through the reference implementation (same results).
    #[test]
    fn f64_falls_back_to_reference() {
        let mut rng = Rng(9);
        let (b, c, hd) = (9, 3, 4);
        let p = params(&mut rng, c, hd);
        let h = Tensor::from_vec(make_h(&mut rng, b, c), (b, c), &Device::Cpu).unwrap();
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let pre = ci_mlp(
            &to64(&h),
            &to64(p.w1.as_tensor()),
            &to64(p.b1.as_tensor()),
            &to64(p.w2.as_tensor()),
            &to64(p.b2.as_tensor()),
        )
        .unwrap();
        assert_eq!(pre.dtype(), DType::F64);
        let f = flat(&run(&p, &h, true));
        let d = pre.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let o = oracle(&flat(&h), &p, &vec![0.0; b * c], b, c, hd);
        assert!(tol_ratio(&f, &to_f32(&d), &o.pre.1, 1e-6, 1e-6) <= 1.0);
    }

    /// Test 3: the vectorisable helpers against f64 references (std exp, libm erf).
    #[test]
    fn erf_exp_accuracy() {
        use kernels::{
            erf, exp, exp2_core, norm_cdf_u, norm_cdf_u_fwd, norm_cdf_u_with_pdf, pdf_u,
        };
        let erf64 = candle_core::cpu::erf::erf_f64;
        // erfc in f64 without cancellation: 1 - erf below 3, continued fraction above.
        let erfc64 = |t: f64| {
            if t < 3.0 {
                1.0 - erf64(t)
            } else {
                let mut f = t;
                for n in (1..=300).rev() {
                    f = t + (n as f64 / 2.0) / f;
                }
                (-t * t).exp() / (std::f64::consts::PI.sqrt() * f)
            }
        };
        let grid = |lo: f64, hi: f64, n: usize| {
            (0..=n).map(move |i| (lo + (hi - lo) * i as f64 / n as f64) as f32)
        };
        // [mul+add path, fma path]
        let mut e = [[0f64; 2]; 3];
        for x in grid(-7.0, 7.0, 1 << 20) {
            let r = erf64(x as f64);
            e[0][0] = e[0][0].max((erf::<false>(x) as f64 - r).abs());
            e[0][1] = e[0][1].max((erf::<true>(x) as f64 - r).abs());
        }
        for x in grid(-87.0, 88.0, 1 << 21) {
            let r = (x as f64).exp();
            e[1][0] = e[1][0].max(((exp::<false>(x) as f64 - r) / r).abs());
            e[1][1] = e[1][1].max(((exp::<true>(x) as f64 - r) / r).abs());
        }
        for m in grid(-126.0, 0.0, 1 << 21) {
            let r = (m as f64).exp2();
            e[2][0] = e[2][0].max(((exp2_core::<false, 127>(m) as f64 - r) / r).abs());
            e[2][1] = e[2][1].max(((exp2_core::<true, 127>(m) as f64 - r) / r).abs());
        }
        // Phi(z), z = sqrt2 u: forward variant (Juffa erfc branch) and backward variant
        // (pdf * half_erfcx): absolute errors, plus the relative error of the forward
        // variant in the lower tail; exp(-u^2)/sqrt(pi); and what the kernels finally form,
        // gelu(z) = sqrt2 u Phi (error / max(1,|z|)) and gelu'(z) = Phi + u pdf_u (abs).
        let mut e2 = [[0f64; 2]; 6];
        for u in grid(-10.0, 10.0, 1 << 21) {
            let ud = u as f64;
            let r = if u < 0.0 {
                0.5 * erfc64(-ud)
            } else {
                0.5 * (1.0 + erf64(ud))
            };
            for (k, v) in [norm_cdf_u_fwd::<false>(u), norm_cdf_u_fwd::<true>(u)]
                .into_iter()
                .enumerate()
            {
                e2[0][k] = e2[0][k].max((v as f64 - r).abs());
                if u < -0.93 && u > -2.0 {
                    e2[2][k] = e2[2][k].max(((v as f64 - r) / r).abs());
                }
            }
            for (k, v) in [norm_cdf_u::<false>(u), norm_cdf_u::<true>(u)]
                .into_iter()
                .enumerate()
            {
                e2[1][k] = e2[1][k].max((v as f64 - r).abs());
            }
            let r = (-ud * ud).exp() / std::f64::consts::PI.sqrt();
            e2[3][0] = e2[3][0].max((pdf_u::<false>(u) as f64 - r).abs());
            e2[3][1] = e2[3][1].max((pdf_u::<true>(u) as f64 - r).abs());
        }
        for z in grid(-30.0, 30.0, 1 << 21) {
            let u = z * std::f32::consts::FRAC_1_SQRT_2;
            let zd = z as f64;
            let zs = zd / std::f64::consts::SQRT_2;
            let cdf = if z < 0.0 {
                0.5 * erfc64(-zs)
            } else {
                0.5 * (1.0 + erf64(zs))
            };
            let gelu = zd * cdf;
            let gp = cdf + zd * (-0.5 * zd * zd).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let sc = zd.abs().max(1.0);
            let sq2 = std::f32::consts::SQRT_2;
            let (pn, pf) = (pdf_u::<false>(u), pdf_u::<true>(u));
            let g = [
                sq2 * (u * norm_cdf_u_fwd::<false>(u)),
                sq2 * (u * norm_cdf_u_fwd::<true>(u)),
            ];
            let d = [
                u * pn + norm_cdf_u_with_pdf::<false>(u, pn),
                u.mul_add(pf, norm_cdf_u_with_pdf::<true>(u, pf)),
            ];
            for k in 0..2 {
                e2[4][k] = e2[4][k].max((g[k] as f64 - gelu).abs() / sc);
                e2[5][k] = e2[5][k].max((d[k] as f64 - gp).abs());
            }
        }
        let names = [
            "erf abs",
            "exp rel",
            "exp2 rel (m in [-126,0])",
            "Phi fwd-variant abs",
            "Phi bwd-variant abs",
            "Phi fwd rel, u in (-2,-0.93)",
            "exp(-u^2)/sqrt(pi) abs",
            "gelu err/max(1,|z|), |z|<=30",
            "gelu' abs, |z|<=30",
        ];
        let all = [e[0], e[1], e[2], e2[0], e2[1], e2[2], e2[3], e2[4], e2[5]];
        for (n, v) in names.iter().zip(&all) {
            println!("{n:>30}: {:.3e} (mul+add) {:.3e} (fma)", v[0], v[1]);
        }
        let lim = [1.5e-7, 2e-7, 2e-7, 1e-7, 1e-7, 1e-5, 1e-7, 3e-7, 2e-7];
        for ((n, v), l) in names.iter().zip(&all).zip(lim) {
            assert!(v[0] < l && v[1] < l, "{n}: {v:?} >= {l}");
        }
        // Saturation / extreme arguments.
        assert_eq!(erf::<false>(10.0), 1.0);
        assert_eq!(erf::<true>(-1e30), -1.0);
        assert_eq!(erf::<false>(0.0), 0.0);
        assert_eq!(norm_cdf_u::<true>(-1e30), 0.0);
        assert_eq!(norm_cdf_u_fwd::<true>(-1e30), 0.0);
        assert_eq!(norm_cdf_u_fwd::<false>(1e30), 1.0);
        assert_eq!(norm_cdf_u::<true>(1e30), 1.0);
        assert_eq!(norm_cdf_u::<true>(f32::NEG_INFINITY), 0.0);
        assert_eq!(pdf_u::<true>(1e30), 0.0);
        assert_eq!(exp::<false>(-1e30), 0.0);
        assert_eq!(exp::<true>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2_core::<true, 127>(-1e30), 0.0);
    }

    fn grad_of(f: fn(&Tensor) -> Result<Tensor>, x: f32, gy: f32) -> (f32, f32) {
        let xv = Var::new(&[x], &Device::Cpu).unwrap();
        let y = f(xv.as_tensor()).unwrap();
        let loss = (&y * gy as f64).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gx = g
            .get(xv.as_tensor())
            .map(|t| t.to_vec1::<f32>().unwrap()[0])
            .unwrap_or(0.0);
        (y.to_vec1::<f32>().unwrap()[0], gx)
    }

    #[test]
    fn lower_leaky_values_and_grads() {
        let f = lower_leaky_hard;
        assert_eq!(grad_of(f, -2.0, -1.0), (0.0, -0.01));
        assert_eq!(grad_of(f, -2.0, 1.0), (0.0, 0.0));
        assert_eq!(grad_of(f, 0.5, 0.7), (0.5, 0.7));
        assert_eq!(grad_of(f, 0.5, -0.7), (0.5, -0.7));
        assert_eq!(grad_of(f, 1.5, 1.0), (1.0, 0.0));
        assert_eq!(grad_of(f, 1.5, -1.0), (1.0, 0.0));
        assert_eq!(grad_of(f, 1.0, 0.3), (1.0, 0.3));
        assert_eq!(grad_of(f, 0.0, 0.3), (0.0, 0.0));
        let (y, g) = grad_of(f, 0.0, -1.0);
        assert_eq!(y, 0.0);
        assert!((g + 0.01).abs() < 1e-9);
        // Non-contiguous input and f64.
        let x = Tensor::new(&[[-1.0f32, 0.25], [2.0, 0.75]], &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert_eq!(
            f(&x).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0], vec![0.25, 0.75]]
        );
        let x = Tensor::new(&[-1.0f64, 0.25, 3.0], &Device::Cpu).unwrap();
        assert_eq!(
            f(&x).unwrap().to_vec1::<f64>().unwrap(),
            vec![0.0, 0.25, 1.0]
        );
    }

    /// Fused CPU leaky sigmoids vs. their plain-op formulations: random x incl. exact 0/1,
    /// both gradient signs, dense / broadcast gradients, transposed input, f32 and f64.
    #[test]
    fn leaky_fused_match_plain_ops() {
        let mut rng = Rng(5);
        let dev = &Device::Cpu;
        let mut xs = rng.uniform(40 * 6, -2.0, 3.0);
        for (i, v) in [0.0f32, 1.0, -0.0, 0.5, 1.0, 0.0].iter().enumerate() {
            xs[i * 7] = *v;
        }
        for dt in [DType::F32, DType::F64] {
            let x = Var::from_tensor(
                &Tensor::from_vec(xs.clone(), (6, 40), dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let xt = x.as_tensor().t().unwrap(); // non-contiguous [40, 6]
            let w = Tensor::from_vec(rng.uniform(240, -1.0, 1.0), (40, 6), dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>, dense: bool| {
                let y = f(&xt).unwrap();
                let loss = if dense {
                    (&y * &w).unwrap().sum_all().unwrap()
                } else {
                    y.sum_all().unwrap()
                };
                let g = loss.backward().unwrap();
                let gx = g
                    .get(x.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                (
                    y.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap(),
                    gx,
                )
            };
            // lower: fused backward vs. the tensor-op backward formula
            struct LowerOpsBwd;
            impl CustomOp1 for LowerOpsBwd {
                fn name(&self) -> &'static str {
                    "lower-ops-bwd"
                }
                fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
                    LowerLeakyHard.cpu_fwd(s, l)
                }
                fn bwd(
                    &self,
                    arg: &Tensor,
                    _res: &Tensor,
                    grad: &Tensor,
                ) -> Result<Option<Tensor>> {
                    Ok(Some(lower_leaky_hard_bwd_ops(arg, grad)?))
                }
            }
            struct UpperOpsBwd;
            impl CustomOp1 for UpperOpsBwd {
                fn name(&self) -> &'static str {
                    "upper-ops-bwd"
                }
                fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
                    UpperLeakyHard.cpu_fwd(s, l)
                }
                fn bwd(
                    &self,
                    arg: &Tensor,
                    _res: &Tensor,
                    grad: &Tensor,
                ) -> Result<Option<Tensor>> {
                    Ok(Some(upper_leaky_hard_bwd_ops(arg, grad)?))
                }
            }
            for dense in [true, false] {
                let a = run(&|t| upper_leaky_hard(t), dense);
                let b = run(&|t| t.apply_op1(UpperOpsBwd), dense);
                assert_eq!(a, b, "upper ops-bwd {dt:?} dense={dense}");
                let a = run(&|t| lower_leaky_hard(t), dense);
                let b = run(&|t| t.apply_op1(LowerOpsBwd), dense);
                assert_eq!(a, b, "lower {dt:?} dense={dense}");
                let a = run(&|t| upper_leaky_hard(t), dense);
                let b = run(&|t| upper_leaky_hard_ops(t), dense);
                for (u, v) in a.0.iter().zip(&b.0).chain(a.1.iter().zip(&b.1)) {
                    assert!(
                        (u - v).abs() <= 1e-6 * (1.0 + v.abs()),
                        "upper {dt:?} dense={dense}: {u} vs {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn upper_leaky_values_and_grads() {
        let f = upper_leaky_hard;
        let close = |(y, g): (f32, f32), (ey, eg): (f32, f32)| {
            assert!(
                (y - ey).abs() < 1e-6 && (g - eg).abs() < 1e-6,
                "got ({y},{g}) want ({ey},{eg})"
            );
        };
        close(grad_of(f, -1.0, 1.0), (0.0, 0.0));
        close(grad_of(f, 0.0, 1.0), (0.0, 1.0));
        close(grad_of(f, 0.5, 1.0), (0.5, 1.0));
        close(grad_of(f, 1.0, 1.0), (1.0, 1.0));
        close(grad_of(f, 2.0, 1.0), (1.01, 0.01));
        close(grad_of(f, 2.0, -3.0), (1.01, -0.03));
    }
}
