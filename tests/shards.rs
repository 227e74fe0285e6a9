//! A training step split into row shards on threads computes the same step as one pass over
//! the batch: the same losses, the same random numbers, the same update (up to float
//! rounding), for every loss kind. Its own test binary: it sets the process-wide thread count.

use spdlab::presets;
use spdlab::spd::config::{LossConfig, LossKind, MaskScope, PgdConfig, PgdInit, Routing, Sampling};
use spdlab::spd::trainer::Trainer;

fn all_losses(sampling: Sampling) -> spdlab::spd::config::SpdConfig {
    let mut cfg = presets::spd_config("tms-5-2-id").unwrap();
    cfg.sampling = sampling;
    let pgd = PgdConfig {
        init: PgdInit::Random,
        step_size: 0.1,
        n_steps: 2,
        mask_scope: MaskScope::UniquePerDatapoint,
    };
    cfg.loss_metric_configs.extend([
        LossConfig::new(LossKind::FaithfulnessLoss, Some(0.5)),
        LossConfig::new(LossKind::CiMaskedReconLoss, Some(0.3)),
        LossConfig::new(LossKind::CiMaskedReconLayerwiseLoss, Some(0.2)),
        LossConfig::new(LossKind::UnmaskedReconLoss, Some(0.1)),
        LossConfig::new(
            LossKind::StochasticReconSubsetLoss {
                routing: Routing::UniformKSubset,
            },
            Some(0.7),
        ),
        LossConfig::new(LossKind::PgdReconLoss { pgd: pgd.clone() }, Some(0.4)),
        LossConfig::new(
            LossKind::PgdReconSubsetLoss {
                pgd,
                routing: Routing::StaticProbability { p: 0.5 },
            },
            Some(0.4),
        ),
    ]);
    cfg
}

fn params(tr: &Trainer) -> Vec<f32> {
    let mut out = vec![];
    for v in tr.model.component_vars().iter().chain(&tr.model.ci_vars()) {
        out.extend(
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    out
}

#[test]
fn sharded_steps_equal_one_pass() {
    for sampling in [Sampling::Continuous, Sampling::Binomial] {
        let cfg = all_losses(sampling);
        let dev = candle_core::Device::Cpu;
        let mut one = Trainer::new(
            presets::target_model("tms-5-2-id", &dev).unwrap(),
            cfg.clone(),
        )
        .unwrap();
        let mut two =
            Trainer::new(presets::target_model("tms-5-2-id", &dev).unwrap(), cfg).unwrap();
        for step in 0..3 {
            spdlab::parallel::set_threads(1);
            let a = one.step().unwrap();
            assert_eq!(one.last_shards, 1);
            spdlab::parallel::set_threads(2);
            let b = two.step().unwrap();
            assert_eq!(two.last_shards, 2, "the step was not split");
            for (k, va) in &a.losses {
                let vb = b.losses[k];
                assert!(
                    (va - vb).abs() <= 1e-5 * va.abs().max(1e-3),
                    "{sampling:?} step {step} {k}: one pass {va}, shards {vb}"
                );
            }
            for (k, va) in &a.l0 {
                assert!((va - b.l0[k]).abs() < 1e-4, "{k}: {va} vs {}", b.l0[k]);
            }
            assert_eq!(one.rng.state(), two.rng.state(), "the generators diverged");
            let (pa, pb) = (params(&one), params(&two));
            let worst = pa
                .iter()
                .zip(&pb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-5,
                "{sampling:?} step {step}: parameters differ by {worst}"
            );
        }
    }
}
