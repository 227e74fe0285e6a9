//! Training new target models (the reference's train_tms.py / train_resid_mlp.py recipes).

use crate::spd::ci_op::FusedGelu as _;
use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use serde::{Deserialize, Serialize};

use super::{ActFn, TargetModel, TargetSpec};
use crate::data::SparseFeatureData;
use crate::rng::Rng;
use crate::spd::config::{DataGenerationType, ScheduleConfig, ScheduleFn};
use crate::spd::schedule::scheduled_value;

/// Target-training hyperparameters (reference defaults per family in [`TargetTrainConfig::reference`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetTrainConfig {
    pub seed: u64,
    pub steps: usize,
    pub batch_size: usize,
    pub feature_probability: f64,
    pub lr_schedule: ScheduleConfig,
    pub weight_decay: f64,
    pub init_bias_to_zero: bool,
}

impl TargetTrainConfig {
    /// The reference's recipe for a target family and size.
    pub fn reference(spec: &TargetSpec, seed: u64) -> Self {
        match spec {
            TargetSpec::Tms { n_features, .. } => TargetTrainConfig {
                seed,
                steps: 10_000,
                batch_size: if *n_features <= 5 { 1024 } else { 8192 },
                feature_probability: 0.05,
                lr_schedule: ScheduleConfig {
                    start_val: 5e-3,
                    warmup_pct: 0.0,
                    final_val_frac: 1.0,
                    fn_type: ScheduleFn::Constant,
                },
                weight_decay: 0.01,
                init_bias_to_zero: *n_features > 5,
            },
            TargetSpec::ResidMlp { n_layers, .. } => TargetTrainConfig {
                seed,
                steps: if *n_layers >= 3 { 10_000 } else { 1_000 },
                batch_size: 2048,
                feature_probability: 0.01,
                lr_schedule: ScheduleConfig {
                    start_val: 3e-3,
                    warmup_pct: 0.0,
                    final_val_frac: 0.0,
                    fn_type: ScheduleFn::Cosine,
                },
                weight_decay: 0.01,
                init_bias_to_zero: false,
            },
            // The reference's `train_ih.py` __main__ (batch 1024, AdamW lr 1e-3, wd 0.01,
            // constant after a 1000-step linear warm-up), with 2000 steps instead of 100,000:
            // induction forms as a sudden drop after a plateau whose length depends on the
            // initialisation. From the reference's own seed-42 init, spdlab's loop drops at
            // step ~1000 as the reference does (loss 4.65 at 900, 0.004 at 1500); from
            // spdlab's inits, seed 2 drops by step 1600, seeds 0 and 1 did not within 6000
            // steps (seed 1 only halfway, loss ~3.3). The shipped target is seed 2.
            TargetSpec::Ih(_) | TargetSpec::Lm { .. } => TargetTrainConfig {
                seed,
                steps: 2_000,
                batch_size: 1024,
                feature_probability: 0.0,
                lr_schedule: ScheduleConfig {
                    start_val: 1e-3,
                    warmup_pct: 0.5,
                    final_val_frac: 1.0,
                    fn_type: ScheduleFn::Constant,
                },
                weight_decay: 0.01,
                init_bias_to_zero: false,
            },
            // Constructed analytically; there is nothing to train.
            TargetSpec::Days { .. } => TargetTrainConfig {
                seed,
                steps: 0,
                batch_size: 1,
                feature_probability: 0.0,
                lr_schedule: ScheduleConfig {
                    start_val: 0.0,
                    warmup_pct: 0.0,
                    final_val_frac: 1.0,
                    fn_type: ScheduleFn::Constant,
                },
                weight_decay: 0.0,
                init_bias_to_zero: false,
            },
        }
    }
}

/// AdamW over the trainable parameters with the recipe's learning rate and weight decay.
fn adamw(vars: &[(String, Var)], cfg: &TargetTrainConfig) -> candle_core::Result<AdamW> {
    AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: cfg.lr_schedule.start_val,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )
}

/// Trains a target model from scratch; returns it with its final training loss.
///
/// TMS: labels = inputs, loss mean((x − out)²). Residual MLP: labels y = x + act(x), frozen
/// unit-norm embedding, loss mean((out − y)²). AdamW with decoupled weight decay.
pub fn train_target(
    spec: &TargetSpec,
    cfg: &TargetTrainConfig,
    device: &Device,
    mut progress: impl FnMut(usize, f32),
) -> anyhow::Result<(TargetModel, f32)> {
    if let TargetSpec::Days { n_days, n_ops } = spec {
        // The days target is constructed with known weights; it is exact (zero error).
        return Ok((super::days::days_target(*n_days, *n_ops, device)?, 0.0));
    }
    if let TargetSpec::Ih(dims) = spec {
        return train_ih(dims, cfg, device, progress);
    }
    if let TargetSpec::Lm { .. } = spec {
        anyhow::bail!(
            "language-model targets come from the reference's pretraining; spdlab does not train them"
        );
    }
    let mut rng = Rng::new(cfg.seed);
    let init = TargetModel::init_random(spec, &mut rng, cfg.init_bias_to_zero, device)?;
    // Trainable parameters: everything except the frozen embedding / identity hidden layers
    // and the tied linear2.weight (a view of linear1.weight).
    let mut vars: Vec<(String, Var)> = vec![];
    for (k, t) in &init.params {
        let frozen = k == "W_E"
            || k == "W_U"
            || k.starts_with("hidden_layers.")
            || (k == "linear2.weight"
                && matches!(
                    spec,
                    TargetSpec::Tms {
                        tied_weights: true,
                        ..
                    }
                ));
        if !frozen {
            vars.push((k.clone(), Var::from_tensor(t)?));
        }
    }
    let get = |k: &str, vars: &[(String, Var)]| -> candle_core::Result<Tensor> {
        if let Some((_, v)) = vars.iter().find(|(n, _)| n == k) {
            return Ok(v.as_tensor().clone());
        }
        if k == "linear2.weight" {
            return vars
                .iter()
                .find(|(n, _)| n == "linear1.weight")
                .unwrap()
                .1
                .t();
        }
        Ok(init.param(k).clone())
    };
    let data = SparseFeatureData {
        n_features: spec.n_features(),
        feature_probability: cfg.feature_probability as f32,
        kind: DataGenerationType::AtLeastZeroActive,
        value_range: spec.value_range(),
        groups: None,
    };
    let mut opt = adamw(&vars, cfg)?;
    let nf = spec.n_features();
    let mut last = f32::NAN;
    for step in 0..cfg.steps {
        opt.set_learning_rate(scheduled_value(step, cfg.steps, &cfg.lr_schedule));
        let x = Tensor::from_vec(
            data.batch(&mut rng, cfg.batch_size),
            (cfg.batch_size, nf),
            device,
        )?;
        let (out, labels) = match spec {
            TargetSpec::Tms {
                n_hidden_layers, ..
            } => {
                let mut h = x.matmul(&get("linear1.weight", &vars)?.t()?)?;
                for i in 0..*n_hidden_layers {
                    h = h.matmul(&get(&format!("hidden_layers.{i}.weight"), &vars)?.t()?)?;
                }
                let out = h
                    .matmul(&get("linear2.weight", &vars)?.t()?)?
                    .broadcast_add(&get("linear2.bias", &vars)?)?
                    .relu()?;
                (out, x.abs()?)
            }
            TargetSpec::ResidMlp {
                n_layers,
                act_fn,
                in_bias,
                out_bias,
                ..
            } => {
                let mut r = x.matmul(&get("W_E", &vars)?)?;
                for l in 0..*n_layers {
                    let mut pre =
                        r.matmul(&get(&format!("layers.{l}.mlp_in.weight"), &vars)?.t()?)?;
                    if *in_bias {
                        pre =
                            pre.broadcast_add(&get(&format!("layers.{l}.mlp_in.bias"), &vars)?)?;
                    }
                    let a = match act_fn {
                        ActFn::Relu => pre.relu()?,
                        ActFn::Gelu => pre.gelu_erf_fused()?,
                    };
                    let mut o =
                        a.matmul(&get(&format!("layers.{l}.mlp_out.weight"), &vars)?.t()?)?;
                    if *out_bias {
                        o = o.broadcast_add(&get(&format!("layers.{l}.mlp_out.bias"), &vars)?)?;
                    }
                    r = (r + o)?;
                }
                let out = r.matmul(&get("W_U", &vars)?)?;
                let act = match act_fn {
                    ActFn::Relu => x.relu()?,
                    ActFn::Gelu => x.gelu_erf_fused()?,
                };
                (out, (&x + act)?)
            }
            TargetSpec::Days { .. } | TargetSpec::Ih(_) | TargetSpec::Lm { .. } => {
                unreachable!("returned above")
            }
        };
        let loss = (out - labels)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        if step % 100 == 0 || step + 1 == cfg.steps {
            last = loss.to_scalar::<f32>()?;
            if !last.is_finite() {
                anyhow::bail!("target training diverged at step {step} (loss {last})");
            }
            progress(step, last);
        }
    }
    let mut named = vec![];
    for (k, _) in spec.param_shapes() {
        if k == "W_U"
            || (k == "linear2.weight"
                && matches!(
                    spec,
                    TargetSpec::Tms {
                        tied_weights: true,
                        ..
                    }
                ))
        {
            continue;
        }
        named.push((k.clone(), get(&k, &vars)?.contiguous()?));
    }
    Ok((TargetModel::new(spec.clone(), named, device)?, last))
}

/// Trains an induction-head transformer as the reference's `train_ih.py`: cross-entropy of
/// the last position's logits against the planted token, AdamW, the positional tables fixed.
fn train_ih(
    dims: &super::IhDims,
    cfg: &TargetTrainConfig,
    device: &Device,
    progress: impl FnMut(usize, f32),
) -> anyhow::Result<(TargetModel, f32)> {
    let mut rng = Rng::new(cfg.seed);
    let init = super::ih::init_random(dims, &mut rng, device)?;
    train_ih_from(init, dims, cfg, &mut rng, device, progress)
}

/// [`train_ih`] from a given initial model (`rng` draws the data).
pub fn train_ih_from(
    init: TargetModel,
    dims: &super::IhDims,
    cfg: &TargetTrainConfig,
    rng: &mut Rng,
    device: &Device,
    mut progress: impl FnMut(usize, f32),
) -> anyhow::Result<(TargetModel, f32)> {
    let mut vars: Vec<(String, Var)> = vec![];
    let mut fixed: Vec<(String, Tensor)> = vec![];
    for (k, t) in &init.params {
        if k.ends_with("pe") {
            fixed.push((k.clone(), t.clone()));
        } else {
            vars.push((k.clone(), Var::from_tensor(t)?));
        }
    }
    let data = crate::data::InductionData::new(dims, None).map_err(anyhow::Error::msg)?;
    let mut opt = adamw(&vars, cfg)?;
    let (b, s, v) = (cfg.batch_size, dims.seq_len, dims.n_tokens());
    let model_of = |vars: &[(String, Var)]| -> anyhow::Result<TargetModel> {
        let mut named: Vec<(String, Tensor)> = fixed.clone();
        named.extend(vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())));
        TargetModel::new(TargetSpec::Ih(*dims), named, device)
    };
    let mut last = f32::NAN;
    for step in 0..cfg.steps {
        opt.set_learning_rate(scheduled_value(step, cfg.steps, &cfg.lr_schedule));
        let raw = data.batch(rng, b);
        // The label: the token after the first induction token.
        let mut onehot = vec![0f32; b * v];
        for (i, row) in raw.chunks(s).enumerate() {
            let t: Vec<u32> = row.iter().map(|&x| x as u32).collect();
            let (_, m) = super::ih::induction_answer(&t, dims)
                .ok_or_else(|| anyhow::anyhow!("generated sequence without the induction pair"))?;
            onehot[i * v + m as usize] = 1.0;
        }
        let x = Tensor::from_vec(raw, (b, s), device)?;
        let logits = model_of(&vars)?.ih_last_logits(&x)?;
        let logp = super::ih::log_softmax_last(&logits)?;
        let labels = Tensor::from_vec(onehot, (b, v), device)?;
        let loss = ((logp * labels)?.sum_all()? * (-1.0 / b as f64))?;
        opt.backward_step(&loss)?;
        if step % 100 == 0 || step + 1 == cfg.steps {
            last = loss.to_scalar::<f32>()?;
            if !last.is_finite() {
                anyhow::bail!("target training diverged at step {step} (loss {last})");
            }
            progress(step, last);
        }
    }
    Ok((model_of(&vars)?, last))
}

/// Induction accuracy of an attention target on `n` generated sequences: how often the last
/// position's top logit is the token after the first induction token. Chance is 1/vocab.
pub fn induction_accuracy(model: &TargetModel, n: usize, seed: u64) -> anyhow::Result<f64> {
    let TargetSpec::Ih(dims) = &model.spec else {
        anyhow::bail!("induction accuracy needs an induction-head model");
    };
    let data = crate::data::InductionData::new(dims, None).map_err(anyhow::Error::msg)?;
    let mut rng = Rng::new(seed);
    let s = dims.seq_len;
    let mut correct = 0usize;
    let mut done = 0usize;
    while done < n {
        let b = (n - done).min(512);
        let raw = data.batch(&mut rng, b);
        let x = Tensor::from_vec(raw.clone(), (b, s), model.device())?;
        let logits = model.ih_last_logits(&x)?;
        let pred = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        for (i, row) in raw.chunks(s).enumerate() {
            let t: Vec<u32> = row.iter().map(|&x| x as u32).collect();
            if super::ih::induction_answer(&t, dims).is_some_and(|(_, m)| m == pred[i]) {
                correct += 1;
            }
        }
        done += b;
    }
    Ok(correct as f64 / n as f64)
}

#[cfg(test)]
mod ih_small_training {
    use super::*;
    #[test]
    #[ignore]
    fn small_ih_learns_induction() {
        let dims = super::super::IhDims::attention_only(16, 16, 16, 1, 2);
        let spec = TargetSpec::Ih(dims);
        let mut cfg = TargetTrainConfig::reference(&spec, 0);
        cfg.steps = 3000;
        cfg.batch_size = 256;
        cfg.lr_schedule.warmup_pct = 0.1;
        let (m, loss) =
            train_target(&spec, &cfg, &Device::Cpu, |s, l| eprintln!("{s} {l}")).unwrap();
        let acc = induction_accuracy(&m, 2048, 1).unwrap();
        eprintln!("loss {loss} acc {acc}");
        assert!(
            loss < 1.0,
            "a small induction model learns (loss {loss}, accuracy {acc})"
        );
    }
}

#[cfg(test)]
mod ih_gradients {
    use super::*;
    #[test]
    fn every_ih_parameter_gets_a_gradient() {
        let dev = Device::Cpu;
        let dims = super::super::IhDims::attention_only(8, 8, 4, 1, 2);
        let mut rng = Rng::new(0);
        let init = super::super::ih::init_random(&dims, &mut rng, &dev).unwrap();
        let mut vars = vec![];
        let mut named = vec![];
        for (k, t) in &init.params {
            if k.ends_with("pe") {
                named.push((k.clone(), t.clone()));
            } else {
                let v = Var::from_tensor(t).unwrap();
                named.push((k.clone(), v.as_tensor().clone()));
                vars.push((k.clone(), v));
            }
        }
        let m = TargetModel::new(TargetSpec::Ih(dims), named, &dev).unwrap();
        let data = crate::data::InductionData::new(&dims, None).unwrap();
        let x = Tensor::from_vec(data.batch(&mut rng, 4), (4, 8), &dev).unwrap();
        let loss = m.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        for (k, v) in &vars {
            let n = g.get(v.as_tensor()).map(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            });
            assert!(n.is_some_and(|n| n > 0.0), "{k}: no gradient ({n:?})");
        }
    }
}
