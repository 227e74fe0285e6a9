//! TEMPORARY: plain-op CI MLP (to be replaced by the fused op).
use candle_core::{Result, Tensor};

pub fn ci_mlp(h: &Tensor, w1: &Tensor, b1: &Tensor, w2: &Tensor, b2: &Tensor) -> Result<Tensor> {
    ci_mlp_reference(h, w1, b1, w2, b2)
}
pub fn ci_mlp_reference(
    h: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> Result<Tensor> {
    let x = h.t()?.unsqueeze(2)?.contiguous()?; // [C,B,1]
    let z = x.matmul(w1)?.broadcast_add(&b1.unsqueeze(1)?)?.gelu_erf()?;
    z.matmul(w2)?
        .broadcast_add(&b2.unsqueeze(1)?)?
        .squeeze(2)?
        .t()
}
pub fn lower_leaky_hard(x: &Tensor) -> Result<Tensor> {
    x.clamp(0f32, 1f32)
}
pub fn upper_leaky_hard(x: &Tensor) -> Result<Tensor> {
    x.clamp(0f32, 1f32)
}
