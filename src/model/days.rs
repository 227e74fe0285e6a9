//! The day-of-week target: "which day is it, the same day / the day after / the day before?"
//!
//! The weights are constructed analytically (nothing is trained), so the ground truth is known
//! exactly:
//!
//! * Inputs: one-hot day (n_days) ⊕ one-hot rotating operation (next[, previous]); "same day"
//!   is no operation bit. (A one-hot "same" bit as well would make Σ days − Σ ops ≡ 0 on every
//!   input, a direction any read vector can absorb without changing anything, which blurs the
//!   decomposition of the embedding.)
//! * `embed` (→ residual stream of width 2 + n_rot): day d is written at angle θ_d = 2πd/n_days
//!   on the unit circle of the *day plane* (stream dims 0, 1); rotating operation o writes 1 into
//!   its own stream dimension 1 + o.
//! * `mlp_in`, ReLU, `mlp_out` (a residual MLP): every rotating operation (next, previous) owns
//!   three neurons. Its operation dimension lifts them by a gate `H` against a bias `−B₀`, so
//!   they are either all off (pre-activation ≤ 1 − B₀ < 0: another operation) or all in the
//!   linear regime of the ReLU (pre-activation p + H − B₀ > 0): neurons `n_x = ReLU(p_x + s)`,
//!   `n_y = ReLU(p_y + s)` and a reference neuron `g = ReLU(s)` with `s = H − B₀` when on.
//!   `mlp_out` writes `(R − I)·(n_x − g, n_y − g) = (R − I)·p` into the day plane, so the
//!   stream becomes `R·p`: the point rotated by ±2π/n_days. This passes the plane linearly, the
//!   way the ReLU(z) − ReLU(−z) pairs do, without tempting a decomposition to split the
//!   rotation by the sign of z.
//! * `unembed` (frozen, not decomposed): logit_j = ⟨p_j, plane⟩ + [`OP_LOGIT_SHIFT`]·Σ_o op_o,
//!   so the answer is the day whose point is nearest; the shift, common to every logit, keeps
//!   the operation dimensions honest (see its doc).
//!
//! The rotation mechanism of "next day" is therefore: the `mlp_in` rows of its three neurons
//! (rank 3: the two plane coordinates and the gate) and the `mlp_out` columns (rank 2, the
//! plane map R − I). Composed on the day plane, `W_out[plane, ·] · W_in[·, plane] = R − I`.
//!
//! A direction whose value the output ignores is a place where a decomposition can park parts
//! of its subcomponents for free. [`OP_LOGIT_SHIFT`] closes the operation dimensions: without
//! it their value mattered only through the gate's slack, and embedding subcomponents wrote
//! day-dependent amounts there (20°-30° off their day's column). One such direction is left,
//! by design: `W_out` annihilates the all-ones neuron direction (the offset s cancels in
//! `n − g`), so `mlp_in` subcomponents may carry a term along it while the neurons are on.
//! Closing it as well (the reference neuron clearing the operation flag) made the rotation's
//! `mlp_out` rank 3 and split the mechanism into twice as many subcomponents, with a worse
//! embedding on 4 of 6 seeds, so it is not done; the day preset keeps `mlp_in` small instead.

use candle_core::{Device, Tensor};

use super::{TargetModel, TargetSpec};

/// Gate weight of an operation dimension onto its neurons.
pub const GATE: f32 = 2.55;
/// Negative bias of the gated neurons.
pub const GATE_BIAS: f32 = 1.05;
/// What the unembedding adds to every logit per unit of an operation dimension.
///
/// The shift changes no answer (every logit moves together), but it makes the operation
/// dimension's value visible in the output. Without it that value matters only through the
/// gate, whose slack (off: any value below the threshold; on: any value that keeps the neurons
/// linear) let a decomposition hide day information there: embedding subcomponents wrote
/// day-dependent amounts into the operation dimension, 20°-30° off their day's column.
pub const OP_LOGIT_SHIFT: f32 = 1.0;

/// Names of the operations, in input order.
pub const OP_NAMES: [&str; 3] = ["same", "next", "previous"];
/// Names of the days for n_days = 7.
pub const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// Display name of day d.
pub fn day_name(n_days: usize, d: usize) -> String {
    if n_days == 7 {
        DAY_NAMES[d].to_string()
    } else {
        format!("day {d}")
    }
}

/// Angle of day d on the circle.
pub fn day_angle(n_days: usize, d: usize) -> f32 {
    std::f32::consts::TAU * d as f32 / n_days as f32
}

/// The correct answer of (day, operation).
pub fn answer(n_days: usize, day: usize, op: usize) -> usize {
    match op {
        0 => day,
        1 => (day + 1) % n_days,
        _ => (day + n_days - 1) % n_days,
    }
}

/// Signed rotation (in steps of 2π/n_days) of operation o.
pub fn op_shift(op: usize) -> i32 {
    match op {
        0 => 0,
        1 => 1,
        _ => -1,
    }
}

/// The 2×2 map an operation adds to the day plane: R(±2π/n) − I, row-major.
pub fn op_delta(n_days: usize, op: usize) -> [[f32; 2]; 2] {
    let a = std::f32::consts::TAU * op_shift(op) as f32 / n_days as f32;
    let (s, c) = a.sin_cos();
    [[c - 1.0, -s], [s, c - 1.0]]
}

/// Position in the day plane of a residual stream read out as `logits` (logit_j = ⟨p_j, r⟩ + s):
/// r = (2/n) Σ_j p_j·logit_j, exact because Σ_j p_j p_jᵀ = (n/2)·I for n ≥ 3 equally spaced
/// points, and the common shift s of an operation cancels since Σ_j p_j = 0.
pub fn plane_from_logits(n_days: usize, logits: &[f32]) -> [f32; 2] {
    let mut r = [0f32; 2];
    for (j, l) in logits.iter().enumerate().take(n_days) {
        let (s, c) = day_angle(n_days, j).sin_cos();
        r[0] += c * l;
        r[1] += s * l;
    }
    let k = 2.0 / n_days as f32;
    [r[0] * k, r[1] * k]
}

/// Checks the architecture's sizes.
pub fn check_spec(n_days: usize, n_ops: usize) -> anyhow::Result<()> {
    if !(3..=64).contains(&n_days) {
        anyhow::bail!("days target: n_days must be in 3..=64, got {n_days}");
    }
    if !(2..=3).contains(&n_ops) {
        anyhow::bail!("days target: n_ops must be 2 (same, next) or 3 (+ previous), got {n_ops}");
    }
    Ok(())
}

/// Input row of (day, operation); operation 0 ("same") sets no operation bit.
pub fn input_row(n_days: usize, n_ops: usize, day: usize, op: usize) -> Vec<f32> {
    let mut x = vec![0f32; n_days + n_ops - 1];
    x[day] = 1.0;
    if op > 0 {
        x[n_days + op - 1] = 1.0;
    }
    x
}

/// Every (day, operation) input, day-major: row = day·n_ops + op.
pub fn all_inputs(n_days: usize, n_ops: usize) -> Vec<Vec<f32>> {
    (0..n_days)
        .flat_map(|d| (0..n_ops).map(move |o| input_row(n_days, n_ops, d, o)))
        .collect()
}

/// Human label of input row (day, op).
pub fn input_label(n_days: usize, day: usize, op: usize) -> String {
    format!("{} {}", day_name(n_days, day), OP_NAMES[op])
}

/// Decodes a one-hot input row into (day, op) when it is one.
pub fn decode_input(n_days: usize, n_ops: usize, x: &[f32]) -> Option<(usize, usize)> {
    if x.len() != n_days + n_ops - 1 {
        return None;
    }
    let one_hot = |s: &[f32]| -> Option<Option<usize>> {
        let active: Vec<usize> = (0..s.len()).filter(|&i| s[i] != 0.0).collect();
        match active.as_slice() {
            [] => Some(None),
            [i] if s[*i] == 1.0 => Some(Some(*i)),
            _ => None,
        }
    };
    let day = one_hot(&x[..n_days])??;
    let op = one_hot(&x[n_days..])?.map_or(0, |o| o + 1);
    Some((day, op))
}

/// The analytically constructed target.
pub fn days_target(n_days: usize, n_ops: usize, device: &Device) -> anyhow::Result<TargetModel> {
    check_spec(n_days, n_ops)?;
    let n_rot = n_ops - 1;
    let d_model = 2 + n_rot;
    let n_in = n_days + n_rot;
    let d_mlp = 3 * n_rot;
    let mut embed = vec![0f32; d_model * n_in];
    for d in 0..n_days {
        let (s, c) = day_angle(n_days, d).sin_cos();
        embed[d] = c;
        embed[n_in + d] = s;
    }
    for o in 1..n_ops {
        embed[(1 + o) * n_in + n_days + o - 1] = 1.0;
    }
    let mut w_in = vec![0f32; d_mlp * d_model];
    let b_in = vec![-GATE_BIAS; d_mlp];
    let mut w_out = vec![0f32; d_model * d_mlp];
    for o in 1..n_ops {
        let base = 3 * (o - 1);
        let op_dim = 1 + o;
        for k in 0..3 {
            w_in[(base + k) * d_model + op_dim] = GATE;
        }
        w_in[base * d_model] = 1.0; // n_x reads p_x
        w_in[(base + 1) * d_model + 1] = 1.0; // n_y reads p_y
        let m = op_delta(n_days, o);
        for (row, m_row) in m.iter().enumerate() {
            w_out[row * d_mlp + base] = m_row[0];
            w_out[row * d_mlp + base + 1] = m_row[1];
            w_out[row * d_mlp + base + 2] = -(m_row[0] + m_row[1]);
        }
    }
    let mut unembed = vec![0f32; n_days * d_model];
    for j in 0..n_days {
        let (s, c) = day_angle(n_days, j).sin_cos();
        unembed[j * d_model] = c;
        unembed[j * d_model + 1] = s;
        for o in 1..n_ops {
            unembed[j * d_model + 1 + o] = OP_LOGIT_SHIFT;
        }
    }
    let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, device);
    let named = vec![
        ("embed.weight".to_string(), t(embed, (d_model, n_in))?),
        ("mlp_in.weight".to_string(), t(w_in, (d_mlp, d_model))?),
        (
            "mlp_in.bias".to_string(),
            Tensor::from_vec(b_in, d_mlp, device)?,
        ),
        ("mlp_out.weight".to_string(), t(w_out, (d_model, d_mlp))?),
        ("unembed.weight".to_string(), t(unembed, (n_days, d_model))?),
    ];
    TargetModel::new(TargetSpec::Days { n_days, n_ops }, named, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_every_input_correctly() -> anyhow::Result<()> {
        for n_ops in [2, 3] {
            let dev = Device::Cpu;
            let m = days_target(7, n_ops, &dev)?;
            let rows = all_inputs(7, n_ops);
            let x = Tensor::new(rows.clone(), &dev)?;
            let out = m.forward(&x)?.to_vec2::<f32>()?;
            for (i, logits) in out.iter().enumerate() {
                let (d, o) = decode_input(7, n_ops, &rows[i]).unwrap();
                let best = logits
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .unwrap()
                    .0;
                assert_eq!(best, answer(7, d, o), "{}", input_label(7, d, o));
                // The answer's logit is exactly 1 (the rotated point is on the circle), plus
                // the common shift of an asked operation.
                let shift = if o > 0 { OP_LOGIT_SHIFT } else { 0.0 };
                assert!((logits[best] - 1.0 - shift).abs() < 1e-5, "{logits:?}");
                let p = plane_from_logits(7, logits);
                let (s, c) = day_angle(7, best).sin_cos();
                assert!((p[0] - c).abs() < 1e-5 && (p[1] - s).abs() < 1e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn rotation_is_confined_to_its_operation() -> anyhow::Result<()> {
        // The composed plane map of "next"'s neurons is R − I; other ops' neurons stay off.
        let dev = Device::Cpu;
        let m = days_target(7, 3, &dev)?;
        let w_in = m.param("mlp_in.weight").to_vec2::<f32>()?;
        let w_out = m.param("mlp_out.weight").to_vec2::<f32>()?;
        for o in 1..3 {
            let want = op_delta(7, o);
            for (r, want_row) in want.iter().enumerate() {
                for (c, w) in want_row.iter().enumerate() {
                    let got: f32 = (3 * (o - 1)..3 * o).map(|k| w_out[r][k] * w_in[k][c]).sum();
                    assert!((got - w).abs() < 1e-6);
                }
            }
        }
        Ok(())
    }
}
