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
//! and its backward are each one single-threaded pass over `B x C x H` with a
//! vectorisable f32 erf / exp (AVX2+FMA selected at run time on x86_64).  The backward
//! recomputes `z = h*W1 + b1` instead of storing it (nothing is kept between the passes).
//! Elsewhere (CUDA, Metal, non-f32) [`ci_mlp`] falls back to [`ci_mlp_reference`].

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
/// Forward: CPU (f32/f64) and, with the `cuda` feature, CUDA; backward is device generic.
pub fn lower_leaky_hard(x: &Tensor) -> Result<Tensor> {
    x.apply_op1(LowerLeakyHard)
}

/// Upper-leaky hard sigmoid: `x > 1`: `1 + alpha*(x-1)`; else `clamp(x, 0, 1)`.
/// Gradient `alpha` for `x > 1`, `1` for `0 <= x <= 1`, `0` for `x < 0`.
/// Plain candle ops, so it works (and differentiates) on every device.
pub fn upper_leaky_hard(x: &Tensor) -> Result<Tensor> {
    let zeros = x.zeros_like()?;
    let upper = x.affine(LEAKY_ALPHA, 1.0 - LEAKY_ALPHA)?; // 1 + alpha*(x-1)
    let lower_mid = x.lt(0.0)?.where_cond(&zeros, x)?; // 0 below 0, identity on [0, 1]
    x.gt(1.0)?.where_cond(&upper, &lower_mid)
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

/// `clamp(x, 0, 1)` with SPD's lower-leaky straight-through style backward.
struct LowerLeakyHard;

fn map_layout<T: Copy, F: Fn(T) -> T>(v: &[T], l: &Layout, f: F) -> Vec<T> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return v[a..b].iter().map(|&x| f(x)).collect();
    }
    let dims = l.dims();
    let strides = l.stride();
    let n = l.shape().elem_count();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    let mut off = l.start_offset();
    for _ in 0..n {
        out.push(f(v[off]));
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < dims[d] {
                break;
            }
            off -= strides[d] * dims[d];
            idx[d] = 0;
        }
    }
    out
}

impl CustomOp1 for LowerLeakyHard {
    fn name(&self) -> &'static str {
        "lower-leaky-hard"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(map_layout(v, l, |x: f32| {
                if x < 0.0 {
                    0.0
                } else if x > 1.0 {
                    1.0
                } else {
                    x
                }
            })),
            CpuStorage::F64(v) => CpuStorage::F64(map_layout(v, l, |x: f64| {
                if x < 0.0 {
                    0.0
                } else if x > 1.0 {
                    1.0
                } else {
                    x
                }
            })),
            s => bail!("lower_leaky_hard: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    /// clamp(x, 0, 1) = min(relu(x), 1) from candle's backend primitives.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::{BackendDevice as _, BackendStorage as _};
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
        let zeros = grad.zeros_like()?;
        let leaky = grad.minimum(0.0)?.affine(LEAKY_ALPHA, 0.0)?; // alpha*g if g < 0 else 0
        let inner = arg.le(1.0)?.where_cond(grad, &zeros)?; // g on (0,1], 0 above 1
        Ok(Some(arg.le(0.0)?.where_cond(&leaky, &inner)?))
    }
}

// ---------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------

mod kernels {
    //! Single-threaded, auto-vectorised f32 kernels.
    //!
    //! Everything is expressed in `u = z / sqrt 2` (the parameters are pre-scaled), so
    //! `gelu(z) = sqrt2 * u * Phi(u)`, `Phi(u) = 0.5 * erfc(-u)` and
    //! `gelu'(z) = Phi(u) + u * exp(-u^2) / sqrt(pi)`.
    use super::View2;

    /// Rows of the batch processed together (per component the block's column of `h`
    /// is gathered into a small contiguous buffer).
    const BB: usize = 256;
    /// Lane count of the explicit reduction accumulators in the backward.
    const L: usize = 8;

    #[cfg(any(target_feature = "fma", target_arch = "aarch64"))]
    const STATIC_FMA: bool = true;
    #[cfg(not(any(target_feature = "fma", target_arch = "aarch64")))]
    const STATIC_FMA: bool = false;

    const SQRT_2: f32 = std::f32::consts::SQRT_2;
    const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    /// 1/sqrt(pi)
    const FRAC_1_SQRT_PI: f32 = 0.564_189_6;
    /// |u| above which the exp-based (erfc) branch is used.
    const ERF_SPLIT: f32 = 0.927_734_4; // 475/512

    #[inline(always)]
    pub(super) fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
        if F { a.mul_add(b, c) } else { a * b + c }
    }

    /// Branch-free f32 exp (Cephes expf): Cody-Waite reduction by ln 2, degree-7
    /// polynomial, 2^n built from exponent bits. Results below f32::MIN_POSITIVE are
    /// flushed to 0 (t < -87.3365); t is clamped to <= 88. Max rel. error ~1e-7.
    #[inline(always)]
    pub(super) fn exp<const F: bool>(t: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        const LO: f32 = -87.336_54;
        let tc = if t < LO { LO } else { t };
        let tc = if tc > 88.0 { 88.0 } else { tc };
        let k = fma::<F>(tc, std::f32::consts::LOG2_E, MAGIC);
        let n = k - MAGIC;
        let r = fma::<F>(n, -0.693_359_4, tc);
        let r = fma::<F>(n, 2.121_944_4e-4, r);
        let mut y = 1.987_569_2e-4_f32;
        y = fma::<F>(y, r, 1.398_2e-3);
        y = fma::<F>(y, r, 8.333_452e-3);
        y = fma::<F>(y, r, 4.166_579_6e-2);
        y = fma::<F>(y, r, 1.666_666_5e-1);
        y = fma::<F>(y, r, 5.000_000_1e-1);
        let y = fma::<F>(y, r * r, r) + 1.0;
        // bits(k) = 0x4B40_0000 + n with n in [-126, 127]
        let pow2 = f32::from_bits(k.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
        if t < LO { 0.0 } else { y * pow2 }
    }

    /// Exponent of the large-|x| branch of Norbert Juffa's erff (MLX, ~1 ulp):
    /// erfc(t) = exp(big_arg(t)) for t = |x| > 0.9277.
    #[inline(always)]
    fn erfc_big_arg<const F: bool>(t: f32, s: f32) -> f32 {
        let r = fma::<F>(-1.728_534_7e-5, t, 3.831_971_3e-4);
        let v = fma::<F>(-3.883_964_4e-3, t, 2.425_462_2e-2);
        let r = fma::<F>(r, s, v);
        let r = fma::<F>(r, t, -1.067_778_8e-1);
        let r = fma::<F>(r, t, -6.348_467e-1);
        let r = fma::<F>(r, t, -1.287_175_1e-1);
        fma::<F>(r, t, -t)
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

    /// Branch-free f32 erf (Juffa's erff, max error ~1 ulp with FMA).
    #[cfg_attr(not(test), allow(dead_code))]
    #[inline(always)]
    pub(super) fn erf<const F: bool>(x: f32) -> f32 {
        let t = x.abs();
        let s = x * x;
        let big = 1.0 - exp::<F>(erfc_big_arg::<F>(t, s));
        let big = if x < 0.0 { -big } else { big };
        let small = fma::<F>(erf_small_poly::<F>(s, 1.0, 0.0), x, x);
        if t > ERF_SPLIT { big } else { small }
    }

    /// Standard normal CDF at z = sqrt2 * u, i.e. 0.5 * erfc(-u), branch-free.
    /// Accurate in absolute terms (~6e-8) and, for u < 0, also relatively in the tail.
    #[inline(always)]
    pub(super) fn norm_cdf_u<const F: bool>(u: f32) -> f32 {
        let t = u.abs();
        let s = u * u;
        // 0.5 * erfc(t) = exp(arg - ln 2)
        let half_erfc = exp::<F>(erfc_big_arg::<F>(t, s) - std::f32::consts::LN_2);
        let big = if u < 0.0 { half_erfc } else { 1.0 - half_erfc };
        // 0.5 + 0.5 u (1 + p(s)) = u * (0.5 p(s) + 0.5) + 0.5
        let r = erf_small_poly::<F>(s, 0.5, 0.5);
        let small = fma::<F>(u, r, 0.5);
        if t > ERF_SPLIT { big } else { small }
    }

    #[inline(always)]
    fn hsum(a: &[f32; L]) -> f32 {
        let mut s = 0.0;
        for v in a {
            s += v;
        }
        s
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
                        *o = fma::<F>(ws, u * norm_cdf_u::<F>(u), *o);
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

    pub(super) fn forward(h: &View2, p: &[f32], bsz: usize, c: usize, hd: usize, out: &mut [f32]) {
        assert_eq!(p.len(), c * (3 * hd + 1));
        assert_eq!(out.len(), bsz * c);
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the required CPU features were detected at run time.
                unsafe { forward_avx2(h, p, bsz, c, hd, out) };
                return;
            }
        }
        forward_impl::<STATIC_FMA>(h, p, bsz, c, hd, out)
    }

    // ------------------------------ backward ------------------------------

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn backward_impl<const F: bool>(
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
        let mut acc64 = vec![0f64; c * w];
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

                let mut ag = [0f32; L];
                for gv in gc {
                    for l in 0..L {
                        ag[l] += gv[l];
                    }
                }
                let arow = &mut acc64[ci * w..ci * w + w];
                arow[3 * hd] += hsum(&ag) as f64;

                for j in 0..hd {
                    let (a, bj, wj) = unit(w1, b1, w2, j);
                    let k = wj * w1[j];
                    // sum_b d, sum_b d*x, sum_b g*u*Phi with d = g * gelu'(z)
                    let mut ad = [0f32; L];
                    let mut adx = [0f32; L];
                    let mut agu = [0f32; L];
                    for ((xv, gv), sv) in xc.iter().zip(gc).zip(sc.iter_mut()) {
                        for l in 0..L {
                            let x = xv[l];
                            let gg = gv[l];
                            let u = fma::<F>(x, a, bj);
                            let cdf = norm_cdf_u::<F>(u);
                            let e = exp::<F>(-(u * u)) * FRAC_1_SQRT_PI;
                            let gpr = fma::<F>(u, e, cdf); // gelu'(z)
                            let d = gg * gpr;
                            ad[l] += d;
                            adx[l] = fma::<F>(d, x, adx[l]);
                            agu[l] = fma::<F>(gg, u * cdf, agu[l]);
                            sv[l] = fma::<F>(k, gpr, sv[l]);
                        }
                    }
                    arow[j] += wj as f64 * hsum(&adx) as f64;
                    arow[hd + j] += wj as f64 * hsum(&ad) as f64;
                    arow[2 * hd + j] += std::f64::consts::SQRT_2 * hsum(&agu) as f64;
                }
                for i in 0..nb {
                    gh[(b0 + i) * c + ci] = gb[i] * sb[i];
                }
            }
            b0 += nb;
        }
        for (o, a) in gp.iter_mut().zip(&acc64) {
            *o = *a as f32;
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
        backward_impl::<true>(h, g, p, bsz, c, hd, gh, gp)
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
        assert_eq!(p.len(), c * (3 * hd + 1));
        assert_eq!(gp.len(), c * (3 * hd + 1));
        assert_eq!(gh.len(), bsz * c);
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the required CPU features were detected at run time.
                unsafe { backward_avx2(h, g, p, bsz, c, hd, gh, gp) };
                return;
            }
        }
        backward_impl::<STATIC_FMA>(h, g, p, bsz, c, hd, gh, gp)
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
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
    }

    #[test]
    fn erf_exp_accuracy() {
        use kernels::{erf, exp};
        let erf64 = candle_core::cpu::erf::erf_f64;
        // erf on [-6, 6], step 2^-14 (~196k points), both code paths.
        let (mut e_nf, mut e_f) = (0f64, 0f64);
        let n = 12 * (1 << 14);
        for i in 0..=n {
            let x = -6.0 + (i as f64) / (1 << 14) as f64;
            let xf = x as f32;
            let r = erf64(xf as f64);
            e_nf = e_nf.max((erf::<false>(xf) as f64 - r).abs());
            e_f = e_f.max((erf::<true>(xf) as f64 - r).abs());
        }
        // exp on [-87, 0] (the range used: exp(-z^2/2)) plus a bit of positive range.
        let (mut x_nf, mut x_f) = (0f64, 0f64);
        let m = 1_000_000;
        for i in 0..=m {
            let t = (-87.0 + 97.0 * i as f64 / m as f64) as f32;
            let r = (t as f64).exp();
            x_nf = x_nf.max(((exp::<false>(t) as f64 - r) / r).abs());
            x_f = x_f.max(((exp::<true>(t) as f64 - r) / r).abs());
        }
        println!("erf max abs err: {e_nf:.3e} (mul+add) {e_f:.3e} (fma)");
        println!("exp max rel err: {x_nf:.3e} (mul+add) {x_f:.3e} (fma)");
        assert!(e_nf < 3e-7 && e_f < 3e-7);
        assert!(x_nf < 2.5e-7 && x_f < 2.5e-7);
        // Saturation / extreme arguments.
        assert_eq!(erf::<false>(10.0), 1.0);
        assert_eq!(erf::<false>(-1e30), -1.0);
        assert_eq!(erf::<false>(0.0), 0.0);
        assert!(exp::<false>(-1e30) >= 0.0 && exp::<false>(-1e30) < 1.2e-38);
        assert!(exp::<false>(f32::NEG_INFINITY) < 1.2e-38);
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
