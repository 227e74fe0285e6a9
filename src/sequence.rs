//! One token sequence through a decomposed sequence model: the causal importances of every
//! module at every position, the attention patterns of every head (target, the full
//! decomposition, and with a selection of subcomponents ablated), and per position the KL of
//! the intervened model against the target and the top predictions before and after.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::interventions::{Selection, lower_ci};
use crate::model::Fold;
use crate::spd::component_model::{ComponentModel, ModuleMask};

/// Attention weights of one block, `[heads, s, s]` row-major (query rows, key columns).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockAttention {
    pub target: Vec<f32>,
    /// Every subcomponent kept (no delta component).
    pub full: Vec<f32>,
    /// The selection ablated, everything else kept (no delta component); None without a
    /// selection.
    pub ablated: Option<Vec<f32>>,
    /// The attention-score change the selection induces, `[heads, s, s]`: scores
    /// (`q·k/√d_head`, before the softmax) of the full decomposition minus those with the
    /// selection ablated; 0 above the diagonal (keys a query never sees). None without a
    /// selection.
    pub score_change: Option<Vec<f32>>,
}

/// What one sequence shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SequenceProbe {
    pub tokens: Vec<u32>,
    pub heads: usize,
    /// Module names, in the decomposition's order.
    pub modules: Vec<String>,
    /// Lower-leaky CI per module, `[s, C]` row-major.
    pub ci: Vec<Vec<f32>>,
    pub c: Vec<usize>,
    pub attention: Vec<BlockAttention>,
    /// The selection's labels (empty: none).
    pub selection: Vec<String>,
    /// Per position: KL(target ‖ full decomposition) and KL(target ‖ selection ablated).
    pub kl_full: Vec<f32>,
    pub kl_ablated: Vec<f32>,
    /// Per position: the three top tokens and their probabilities, target and ablated.
    pub top_target: Vec<[(u32, f32); 3]>,
    pub top_ablated: Vec<[(u32, f32); 3]>,
    /// The position that must predict the induction answer (the last), with the answer.
    pub induction: Option<(usize, u32)>,
}

/// The three largest logits' tokens and their softmax probabilities, most likely first.
pub fn top3(logits: &[f32]) -> [(u32, f32); 3] {
    let t = top_k(logits, 3);
    [t[0], t[1], t[2]]
}

/// Softmax of a row of logits.
pub fn softmax(l: &[f32]) -> Vec<f32> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = l.iter().map(|v| (v - m).exp()).collect();
    let z: f32 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// The `k` largest logits' tokens and their softmax probabilities, most likely first.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    top_k_probs(&softmax(logits), k)
}

/// The `k` largest entries of a probability row: (token id, probability).
pub fn top_k_probs(p: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    idx.iter().take(k).map(|&i| (i as u32, p[i])).collect()
}

/// Runs `tokens` (one sequence) through `model`; `selection` (labels or clusters, see
/// [`Selection::parse`]) is ablated for the "ablated" outputs when given.
pub fn probe_sequence(
    model: &ComponentModel,
    tokens: &[f32],
    selection: Option<&Selection>,
) -> anyhow::Result<SequenceProbe> {
    let crate::model::TargetSpec::Ih(dims) = &model.target.spec else {
        anyhow::bail!("a sequence probe needs a sequence model");
    };
    let s = dims.seq_len;
    if tokens.len() != s {
        anyhow::bail!(
            "the sequence has {} tokens, the model takes {s}",
            tokens.len()
        );
    }
    crate::inputs::check_rows(&model.target.spec, &[tokens.to_vec()])
        .map_err(anyhow::Error::msg)?;
    let dev = model.device();
    let x = Tensor::from_vec(tokens.to_vec(), (1, s), dev)?;
    let fold = Fold::new();
    let ci = lower_ci(model, &x)?;
    let map = model.decomposed_index_of_target();
    let run = |masks: &[Option<ModuleMask>]| -> anyhow::Result<(Tensor, Vec<crate::model::ih::Attention>)> {
        Ok(model
            .target
            .attention_patterns(&x, &fold, &mut |ti, a, fold| match map[ti]
                .and_then(|j| masks[j].as_ref().map(|m| (j, m)))
            {
                Some((j, mm)) => model.masked_module_forward(j, a, mm, fold).map(Some),
                None => Ok(None),
            })?)
    };
    let mask = |j: usize, ablate: bool| -> candle_core::Result<Option<ModuleMask>> {
        let m = &model.modules[j];
        let mut v = vec![1f32; s * m.c];
        if ablate && let Some(sel) = selection {
            for r in 0..s {
                for c in 0..m.c {
                    if sel.selected[j][c] {
                        v[r * m.c + c] = 0.0;
                    }
                }
            }
        }
        Ok(Some(ModuleMask {
            mask: Tensor::from_vec(v, (s, m.c), dev)?,
            delta: None,
            route: None,
        }))
    };
    let nm = model.modules.len();
    let full_masks: Vec<_> = (0..nm)
        .map(|j| mask(j, false))
        .collect::<candle_core::Result<_>>()?;
    let (target_logits, target_att) = run(&vec![None; nm])?;
    let (full_logits, full_att) = run(&full_masks)?;
    let ablated = match selection {
        Some(_) => {
            let masks: Vec<_> = (0..nm)
                .map(|j| mask(j, true))
                .collect::<candle_core::Result<_>>()?;
            Some(run(&masks)?)
        }
        None => None,
    };
    let flat = |t: &Tensor| -> anyhow::Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let mut attention = vec![];
    for (l, t) in target_att.iter().enumerate() {
        let score_change = match &ablated {
            Some((_, a)) => {
                let mut d = flat(&(&full_att[l].scores - &a[l].scores)?)?;
                for (i, v) in d.iter_mut().enumerate() {
                    if i % s > (i / s) % s {
                        *v = 0.0;
                    }
                }
                Some(d)
            }
            None => None,
        };
        attention.push(BlockAttention {
            target: flat(&t.weights)?,
            full: flat(&full_att[l].weights)?,
            ablated: match &ablated {
                Some((_, a)) => Some(flat(&a[l].weights)?),
                None => None,
            },
            score_change,
        });
    }
    let after = ablated.as_ref().map_or(&full_logits, |(l, _)| l);
    let kl = |o: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(crate::spd::trainer::kl_rows(o, &target_logits)?.to_vec1::<f32>()?)
    };
    let tl: Vec<Vec<f32>> = target_logits.to_vec2()?;
    let al: Vec<Vec<f32>> = after.to_vec2()?;
    let toks: Vec<u32> = tokens.iter().map(|&v| v as u32).collect();
    Ok(SequenceProbe {
        induction: crate::model::ih::induction_answer(&toks, dims).map(|(_, m)| (s - 1, m)),
        tokens: toks,
        heads: dims.n_heads,
        modules: model.modules.iter().map(|m| m.name.clone()).collect(),
        ci: ci.iter().map(flat).collect::<anyhow::Result<_>>()?,
        c: model.modules.iter().map(|m| m.c).collect(),
        attention,
        selection: selection.map(|s| s.labels(model)).unwrap_or_default(),
        kl_full: kl(&full_logits)?,
        kl_ablated: kl(after)?,
        top_target: tl.iter().map(|r| top3(r)).collect(),
        top_ablated: al.iter().map(|r| top3(r)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top3_orders_and_normalises() {
        let t = top3(&[0.0, 2.0, 1.0, -1.0]);
        assert_eq!([t[0].0, t[1].0, t[2].0], [1, 2, 0]);
        let z = 1f32 + 2f32.exp() + 1f32.exp() + (-1f32).exp();
        assert!((t[0].1 - 2f32.exp() / z).abs() < 1e-6);
    }
}
