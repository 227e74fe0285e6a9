//! Learning-rate schedules exactly as the reference's `get_scheduled_value`.

use super::config::{ScheduleConfig, ScheduleFn};

/// Value of the schedule at `step` of `total_steps`.
///
/// Warm-up is linear from 0 over `int(total·warmup_pct)` steps; afterwards
/// `progress = (step − warmup)/(decay_steps − 1)` (note the −1: the last applied update, at
/// step = total − 1, sees progress 1 exactly), and
/// constant → start, linear → start·(f + (1−f)(1−progress)),
/// cosine → start·(f + (1−f)·½(1 + cos(π·progress))).
pub fn scheduled_value(step: usize, total_steps: usize, cfg: &ScheduleConfig) -> f64 {
    let start = cfg.start_val;
    let warmup_steps = (total_steps as f64 * cfg.warmup_pct) as usize;
    if step < warmup_steps {
        return start * step as f64 / warmup_steps as f64;
    }
    let decay_steps = total_steps.saturating_sub(warmup_steps);
    if decay_steps <= 1 {
        return start;
    }
    let progress = (step - warmup_steps) as f64 / (decay_steps - 1) as f64;
    let f = cfg.final_val_frac;
    match cfg.fn_type {
        ScheduleFn::Constant => start,
        ScheduleFn::Linear => start * (f + (1.0 - f) * (1.0 - progress)),
        ScheduleFn::Cosine => {
            start * (f + (1.0 - f) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(fn_type: ScheduleFn, warmup_pct: f64, f: f64) -> ScheduleConfig {
        ScheduleConfig {
            start_val: 1e-3,
            warmup_pct,
            final_val_frac: f,
            fn_type,
        }
    }

    #[test]
    fn constant() {
        let c = cfg(ScheduleFn::Constant, 0.0, 1.0);
        for s in [0, 5, 99] {
            assert_eq!(scheduled_value(s, 100, &c), 1e-3);
        }
    }

    #[test]
    fn cosine_to_zero_hits_zero_at_last_update() {
        let c = cfg(ScheduleFn::Cosine, 0.0, 0.0);
        assert_eq!(scheduled_value(0, 10_000, &c), 1e-3);
        assert!(scheduled_value(9_999, 10_000, &c).abs() < 1e-18);
        // halfway (progress 0.5): start/2
        let mid = scheduled_value(4_999, 9_999, &c);
        assert!((mid - 5e-4).abs() < 1e-12, "{mid}");
    }

    #[test]
    fn linear_with_final_frac_and_warmup() {
        let c = cfg(ScheduleFn::Linear, 0.1, 0.5);
        // warm-up: 10 of 100 steps
        assert_eq!(scheduled_value(0, 100, &c), 0.0);
        assert!((scheduled_value(5, 100, &c) - 5e-4).abs() < 1e-15);
        // decay steps = 90 → progress = (step − 10)/89
        assert!((scheduled_value(10, 100, &c) - 1e-3).abs() < 1e-15);
        assert!((scheduled_value(99, 100, &c) - 5e-4).abs() < 1e-15);
        let p = (54.5 - 10.0) / 89.0;
        let _ = p;
        let v = scheduled_value(55, 100, &c);
        let expect = 1e-3 * (0.5 + 0.5 * (1.0 - 45.0 / 89.0));
        assert!((v - expect).abs() < 1e-15);
    }

    #[test]
    fn degenerate_totals() {
        let c = cfg(ScheduleFn::Cosine, 0.0, 0.0);
        assert_eq!(scheduled_value(0, 1, &c), 1e-3);
        assert_eq!(scheduled_value(0, 0, &c), 1e-3);
    }
}
