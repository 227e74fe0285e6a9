//! The harvest: one pass over a language-model run's text that records, for every
//! subcomponent of every module, how often it fires, its top-activating contexts and the
//! tokens it fires on. Done once (on the worker or by `spdlab harvest`) and stored in the
//! `.spdlab` file, so component pages open instantly afterwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::spd::component_model::ComponentModel;

/// Where a harvest is kept in a file's extras.
pub const EXTRA_KEY: &str = "harvest";

/// Contexts kept per subcomponent.
pub const TOP_CONTEXTS: usize = 20;
/// Tokens before and after the firing token kept with each context.
pub const BEFORE: usize = 12;
pub const AFTER: usize = 3;
/// Firing tokens kept per subcomponent.
pub const TOP_TOKENS: usize = 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Harvest {
    /// Token positions and windows scanned.
    pub positions: u64,
    pub windows: usize,
    pub seq_len: usize,
    /// Lower-leaky CI above which a subcomponent counts as firing.
    pub threshold: f32,
    /// Where the text came from.
    pub source: String,
    /// The training step of the decomposition harvested.
    pub step: usize,
    pub modules: Vec<ModuleHarvest>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleHarvest {
    pub name: String,
    pub components: Vec<ComponentHarvest>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ComponentHarvest {
    /// Positions with CI above the threshold.
    pub firing: u64,
    pub mean_ci: f32,
    /// Strongest first: (CI, token ids of the context, index of the firing token in them).
    pub contexts: Vec<(f32, Vec<u32>, usize)>,
    /// The tokens it fires on most: (token id, firings).
    pub tokens: Vec<(u32, u64)>,
}

impl Harvest {
    pub fn component(&self, module: &str, c: usize) -> Option<&ComponentHarvest> {
        self.modules
            .iter()
            .find(|m| m.name == module)?
            .components
            .get(c)
    }

    /// The harvest stored in a file's extras (None when there is none; an error when it is
    /// corrupt or does not fit the decomposition).
    pub fn stored(
        extra: &serde_json::Map<String, serde_json::Value>,
        model: &ComponentModel,
    ) -> anyhow::Result<Option<Harvest>> {
        let Some(v) = extra.get(EXTRA_KEY) else {
            return Ok(None);
        };
        let h: Harvest = serde_json::from_value(v.clone())
            .map_err(|e| anyhow::anyhow!("stored harvest: {e}"))?;
        if h.modules.len() != model.modules.len()
            || h.modules
                .iter()
                .zip(&model.modules)
                .any(|(a, b)| a.name != b.name || a.components.len() != b.c)
        {
            anyhow::bail!("stored harvest: its modules do not match the decomposition");
        }
        let vocab = model.target.spec.n_outputs();
        for m in &h.modules {
            for c in &m.components {
                if !c.mean_ci.is_finite()
                    || c.contexts.iter().any(|(g, ids, at)| {
                        !g.is_finite()
                            || *at >= ids.len()
                            || ids.iter().any(|&t| t as usize >= vocab)
                    })
                    || c.tokens.iter().any(|&(t, _)| t as usize >= vocab)
                {
                    anyhow::bail!("stored harvest: {} has a bad entry", m.name);
                }
            }
        }
        Ok(Some(h))
    }
}

/// Per-thread accumulators.
struct Acc {
    firing: Vec<Vec<u64>>,
    sum: Vec<Vec<f64>>,
    /// (CI, window, position), at most TOP_CONTEXTS, unordered; with its current minimum.
    top: Vec<Vec<Vec<(f32, usize, usize)>>>,
    tokens: Vec<Vec<HashMap<u32, u64>>>,
    /// The smallest CI in `top` once it is full (−∞ before).
    floor: Vec<Vec<f32>>,
}

impl Acc {
    fn new(model: &ComponentModel) -> Self {
        let per = |f: &dyn Fn(usize) -> usize| -> Vec<usize> {
            model.modules.iter().map(|m| f(m.c)).collect()
        };
        let cs = per(&|c| c);
        Acc {
            firing: cs.iter().map(|&c| vec![0; c]).collect(),
            sum: cs.iter().map(|&c| vec![0.0; c]).collect(),
            top: cs.iter().map(|&c| vec![vec![]; c]).collect(),
            tokens: cs.iter().map(|&c| vec![HashMap::new(); c]).collect(),
            floor: cs.iter().map(|&c| vec![f32::NEG_INFINITY; c]).collect(),
        }
    }

    fn merge(&mut self, o: Acc) {
        for j in 0..self.firing.len() {
            for c in 0..self.firing[j].len() {
                self.firing[j][c] += o.firing[j][c];
                self.sum[j][c] += o.sum[j][c];
                for &h in &o.top[j][c] {
                    self.floor[j][c] = push_top(&mut self.top[j][c], h);
                }
                for (&t, &n) in &o.tokens[j][c] {
                    *self.tokens[j][c].entry(t).or_insert(0) += n;
                }
            }
        }
    }
}

/// Keeps the TOP_CONTEXTS strongest; returns the smallest kept CI once full (−∞ before).
fn push_top(v: &mut Vec<(f32, usize, usize)>, h: (f32, usize, usize)) -> f32 {
    let min_of = |v: &[(f32, usize, usize)]| {
        v.iter()
            .enumerate()
            .min_by(|a, b| a.1.0.total_cmp(&b.1.0))
            .map(|(k, m)| (k, m.0))
            .unwrap_or((0, f32::INFINITY))
    };
    if v.len() < TOP_CONTEXTS {
        v.push(h);
    } else {
        let (k, min) = min_of(v);
        if h.0 > min {
            v[k] = h;
        }
    }
    if v.len() < TOP_CONTEXTS {
        f32::NEG_INFINITY
    } else {
        min_of(v).1
    }
}

/// Harvests the first `max_windows` windows of `rows` (`[n · seq_len]` token ids) on
/// [`crate::parallel::threads`] threads. `progress(done, total)` is called after each batch
/// of windows; `cancel` stops it early (an error).
#[allow(clippy::too_many_arguments)]
pub fn harvest(
    model: &ComponentModel,
    rows: &[u32],
    seq_len: usize,
    max_windows: usize,
    threshold: f32,
    source: &str,
    step: usize,
    cancel: &AtomicBool,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> anyhow::Result<Harvest> {
    let s = seq_len.max(1);
    let n = (rows.len() / s).min(max_windows);
    if n == 0 {
        anyhow::bail!("no text to harvest ({source})");
    }
    let threads = crate::parallel::threads().clamp(1, n.div_ceil(64));
    let done = AtomicUsize::new(0);
    const BATCH: usize = 32;
    let parts: Vec<anyhow::Result<Acc>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let done = &done;
                sc.spawn(move || -> anyhow::Result<Acc> {
                    let mut acc = Acc::new(model);
                    let (lo, hi) = (t * n / threads, (t + 1) * n / threads);
                    let mut w0 = lo;
                    while w0 < hi {
                        if cancel.load(Ordering::Relaxed) {
                            anyhow::bail!("harvest cancelled");
                        }
                        let w1 = (w0 + BATCH).min(hi);
                        let flat: Vec<f32> =
                            rows[w0 * s..w1 * s].iter().map(|&t| t as f32).collect();
                        let x = Tensor::from_vec(flat, (w1 - w0, s), model.device())?;
                        let ci = crate::interventions::lower_ci(model, &x)?;
                        for (j, cij) in ci.iter().enumerate() {
                            let c_n = model.modules[j].c;
                            let v: Vec<f32> = cij.flatten_all()?.to_vec1()?;
                            for (r, row) in v.chunks(c_n).enumerate() {
                                let (w, p) = (w0 + r / s, r % s);
                                let tok = rows[w * s + p];
                                for (c, &g) in row.iter().enumerate() {
                                    if g <= 0.0 {
                                        continue;
                                    }
                                    acc.sum[j][c] += g as f64;
                                    if g > threshold {
                                        acc.firing[j][c] += 1;
                                        *acc.tokens[j][c].entry(tok).or_insert(0) += 1;
                                    }
                                    if g > acc.floor[j][c] {
                                        acc.floor[j][c] = push_top(&mut acc.top[j][c], (g, w, p));
                                    }
                                }
                            }
                        }
                        let d = done.fetch_add(w1 - w0, Ordering::Relaxed) + (w1 - w0);
                        progress(d, n);
                        w0 = w1;
                    }
                    Ok(acc)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a harvest thread panicked")))
            })
            .collect()
    });
    let mut acc: Option<Acc> = None;
    for p in parts {
        let p = p?;
        match acc.as_mut() {
            None => acc = Some(p),
            Some(a) => a.merge(p),
        }
    }
    let acc = acc.ok_or_else(|| anyhow::anyhow!("no harvest"))?;
    let positions = (n * s) as u64;
    let modules = model
        .modules
        .iter()
        .enumerate()
        .map(|(j, m)| ModuleHarvest {
            name: m.name.clone(),
            components: (0..m.c)
                .map(|c| {
                    let mut top = acc.top[j][c].clone();
                    top.sort_by(|a, b| b.0.total_cmp(&a.0));
                    let contexts = top
                        .iter()
                        .map(|&(g, w, p)| {
                            let a = p.saturating_sub(BEFORE);
                            let b = (p + 1 + AFTER).min(s);
                            (g, rows[w * s + a..w * s + b].to_vec(), p - a)
                        })
                        .collect();
                    let mut tokens: Vec<(u32, u64)> =
                        acc.tokens[j][c].iter().map(|(&t, &k)| (t, k)).collect();
                    tokens.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                    tokens.truncate(TOP_TOKENS);
                    ComponentHarvest {
                        firing: acc.firing[j][c],
                        mean_ci: (acc.sum[j][c] / positions as f64) as f32,
                        contexts,
                        tokens,
                    }
                })
                .collect(),
        })
        .collect();
    Ok(Harvest {
        positions,
        windows: n,
        seq_len: s,
        threshold,
        source: source.to_string(),
        step,
        modules,
    })
}

/// Lower-leaky CI above which a harvest counts a subcomponent as firing.
pub const FIRING: f32 = 0.5;

/// What a harvest of a run reads: the windows of its text and where they came from.
#[derive(Clone, Debug)]
pub struct RunText {
    pub rows: std::sync::Arc<Vec<u32>>,
    pub seq_len: usize,
    pub source: String,
}

impl RunText {
    /// The text a language-model run trains on (an error when it has none).
    pub fn of(tr: &crate::spd::trainer::Trainer) -> anyhow::Result<Self> {
        let crate::data::TaskData::Tokens(data) = &tr.data else {
            anyhow::bail!("a harvest needs a language-model run");
        };
        let Some(rows) = data.rows.clone() else {
            anyhow::bail!(
                "no text loaded for this run ({}): nothing to harvest",
                data.source
            );
        };
        Ok(RunText {
            rows,
            seq_len: data.seq_len.max(1),
            source: data.source.clone(),
        })
    }

    /// Harvests `model` (the decomposition at `step`) over at most `max_tokens` positions.
    pub fn harvest(
        &self,
        model: &ComponentModel,
        max_tokens: usize,
        step: usize,
        cancel: &AtomicBool,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> anyhow::Result<Harvest> {
        harvest(
            model,
            &self.rows,
            self.seq_len,
            max_tokens.div_ceil(self.seq_len),
            FIRING,
            &self.source,
            step,
            cancel,
            progress,
        )
    }
}

/// Harvests a trainer's text (the run's corpus): at most `max_tokens` positions.
pub fn harvest_run(
    tr: &crate::spd::trainer::Trainer,
    max_tokens: usize,
    cancel: &AtomicBool,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> anyhow::Result<Harvest> {
    RunText::of(tr)?.harvest(&tr.model, max_tokens, tr.step, cancel, progress)
}
