//! Adam / AdamW over candle `Var`s, with support for aliased (tied, transposed) parameters.
//!
//! The reference ties TMS components as two PyTorch parameters sharing one storage
//! (`linear2.U = linear1.Vᵀ`), each with its own Adam state, so every step applies two updates
//! to that storage. An [`AdamEntry`] whose `grad_of` differs from its `param` reproduces that:
//! it reads the gradient of the alias, keeps its own moments, and writes (transposed) into the
//! owner's storage.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

pub struct AdamEntry {
    /// The storage that is updated.
    pub param: Var,
    /// The variable whose gradient drives this entry (== `param` unless aliased).
    pub grad_of: Var,
    /// `grad_of` is the transpose of `param`.
    pub transpose: bool,
    pub weight_decay: f64,
    m: Option<Tensor>,
    v: Option<Tensor>,
    steps: u64,
}

impl AdamEntry {
    pub fn new(param: Var, weight_decay: f64) -> Self {
        AdamEntry {
            grad_of: param.clone(),
            param,
            transpose: false,
            weight_decay,
            m: None,
            v: None,
            steps: 0,
        }
    }
    pub fn alias(param: Var, grad_of: Var, weight_decay: f64) -> Self {
        AdamEntry {
            param,
            grad_of,
            transpose: true,
            weight_decay,
            m: None,
            v: None,
            steps: 0,
        }
    }
    /// First and second moments (None before the first update) and the update count.
    pub fn state(&self) -> (Option<&Tensor>, Option<&Tensor>, u64) {
        (self.m.as_ref(), self.v.as_ref(), self.steps)
    }
    pub fn set_state(&mut self, m: Option<Tensor>, v: Option<Tensor>, steps: u64) {
        self.m = m;
        self.v = v;
        self.steps = steps;
    }
}

pub struct Adam {
    pub entries: Vec<AdamEntry>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Adam {
    pub fn new(entries: Vec<AdamEntry>) -> Self {
        Adam {
            entries,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// One AdamW step. Parameters without a gradient are skipped (as PyTorch does).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        for e in self.entries.iter_mut() {
            if let Some(g) = grads.get(e.grad_of.as_tensor()) {
                e.update(g, lr, b1, b2, eps)?;
            }
        }
        Ok(())
    }

    /// [`Adam::step`] with the entries spread over `threads` threads (see
    /// [`crate::parallel::run_shards`]). Entries that update one storage (tied parameters)
    /// stay together and in order, so the result is the same as [`Adam::step`]'s.
    pub fn step_parallel(&mut self, grads: &GradStore, lr: f64, threads: usize) -> Result<()> {
        if threads <= 1 || self.entries.len() <= 1 {
            return self.step(grads, lr);
        }
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        // Groups of entries sharing a storage, in entry order.
        let mut groups: Vec<(candle_core::TensorId, Vec<&mut AdamEntry>, usize)> = vec![];
        for e in self.entries.iter_mut() {
            let id = e.param.as_tensor().id();
            let n = e.param.as_tensor().elem_count();
            match groups.iter_mut().find(|(gid, _, _)| *gid == id) {
                Some((_, es, size)) => {
                    es.push(e);
                    *size += n;
                }
                None => groups.push((id, vec![e], n)),
            }
        }
        // Largest first onto the least loaded thread.
        groups.sort_by_key(|(_, _, size)| std::cmp::Reverse(*size));
        let mut buckets: Vec<(usize, Vec<&mut AdamEntry>)> =
            (0..threads).map(|_| (0, vec![])).collect();
        for (_, es, size) in groups {
            let b = buckets
                .iter_mut()
                .min_by_key(|(load, _)| *load)
                .expect("threads > 1");
            b.0 += size;
            b.1.extend(es);
        }
        let buckets: Vec<std::sync::Mutex<Vec<&mut AdamEntry>>> = buckets
            .into_iter()
            .map(|(_, es)| std::sync::Mutex::new(es))
            .collect();
        let results = crate::parallel::run_shards(buckets.len(), |i| -> Result<()> {
            let mut es = buckets[i].lock().unwrap_or_else(|p| p.into_inner());
            for e in es.iter_mut() {
                if let Some(g) = grads.get(e.grad_of.as_tensor()) {
                    e.update(g, lr, b1, b2, eps)?;
                }
            }
            Ok(())
        });
        results.into_iter().collect()
    }
}

impl AdamEntry {
    fn update(&mut self, g: &Tensor, lr: f64, b1: f64, b2: f64, eps: f64) -> Result<()> {
        let e = self;
        // Gradients may carry op history; the optimizer state must not.
        let g = &g.detach();
        e.steps += 1;
        let m = match &e.m {
            Some(m) => ((m * b1)? + (g * (1.0 - b1))?)?,
            None => (g * (1.0 - b1))?,
        };
        let v = match &e.v {
            Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
            None => (g.sqr()? * (1.0 - b2))?,
        };
        let bc1 = 1.0 - b1.powi(e.steps as i32);
        let bc2 = 1.0 - b2.powi(e.steps as i32);
        let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
        let mut upd = ((&m / denom)? * (lr / bc1))?;
        if e.transpose {
            upd = upd.t()?;
        }
        let p = e.param.as_tensor();
        let p = if e.weight_decay != 0.0 {
            (p * (1.0 - lr * e.weight_decay))?
        } else {
            p.clone()
        };
        e.param.set(&(p - upd)?.detach())?;
        e.m = Some(m.detach());
        e.v = Some(v.detach());
        Ok(())
    }
}

/// Scales the gradients of `vars` in place (in a new store) so their global L2 norm is at most
/// `max_norm` (PyTorch `clip_grad_norm_` semantics, eps 1e-6). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adam_first_steps_match_hand_computation() -> Result<()> {
        // With bias correction, the first Adam update is lr·sign(g) (up to eps).
        let dev = Device::Cpu;
        let p = Var::new(&[1.0f32, -2.0], &dev)?;
        let mut opt = Adam::new(vec![AdamEntry::new(p.clone(), 0.0)]);
        let loss = (p.as_tensor() * Tensor::new(&[3.0f32, -0.5], &dev)?)?.sum_all()?;
        opt.step(&loss.backward()?, 0.1)?;
        let v = p.as_tensor().to_vec1::<f32>()?;
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
        Ok(())
    }

    #[test]
    fn adamw_decay_and_alias_double_update() -> Result<()> {
        let dev = Device::Cpu;
        let owner = Var::new(&[[1.0f32, 2.0]], &dev)?; // [1,2]
        let alias = Var::new(&[[1.0f32], [2.0]], &dev)?; // [2,1] = ownerᵀ
        let mut opt = Adam::new(vec![
            AdamEntry::new(owner.clone(), 0.1),
            AdamEntry::alias(owner.clone(), alias.clone(), 0.1),
        ]);
        let l = (owner.as_tensor().sum_all()? + (alias.as_tensor() * -1.0)?.sum_all()?)?;
        opt.step(&l.backward()?, 0.01)?;
        // owner: p(1 − 0.001) − 0.01·sign(+1); then alias: ·(1 − 0.001) + 0.01
        let expect = |x: f32| ((x * 0.999 - 0.01) * 0.999) + 0.01;
        let v = owner.as_tensor().to_vec2::<f32>()?;
        assert!((v[0][0] - expect(1.0)).abs() < 1e-6 && (v[0][1] - expect(2.0)).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let p = Var::new(&[0.0f32, 0.0], &dev)?;
        let loss = (p.as_tensor() * Tensor::new(&[3.0f32, 4.0], &dev)?)?.sum_all()?;
        let mut g = loss.backward()?;
        let n = clip_grad_norm(&mut g, std::slice::from_ref(&p), 1.0)?;
        assert!((n - 5.0).abs() < 1e-6);
        let gv = g.get(p.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert!((gv[0] - 0.6).abs() < 1e-5 && (gv[1] - 0.8).abs() < 1e-5);
        Ok(())
    }
}
