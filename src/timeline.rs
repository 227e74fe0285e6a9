//! The timeline: frames of a decomposition kept while it trains, to replay how it formed.
//!
//! A frame at step `s` holds every trainable parameter of the decomposition (V, U and the CI
//! functions of each module, in [`decomposition_params`] order) exactly as a checkpoint saved
//! at step `s` would (the state before step `s` runs; the last frame is the finished run), in
//! f32 or f16, plus per-subcomponent statistics on a fixed batch (norm, mean and max CI, L0)
//! for the trajectory plots. Any view can be rebuilt from a frame ([`frame_trainer`]).
//!
//! Frames are taken every `every` steps. The bound (`max_frames`, and `cap_bytes` on the
//! frames' size) is kept by thinning: `every` doubles and the frames off the new grid go, so
//! the first step, an even spread and the newest frame always survive.

use std::sync::Arc;

use candle_core::Tensor;
use half::f16;
use serde::{Deserialize, Serialize};

use crate::spd::component_model::ComponentModel;
use crate::spd::trainer::Trainer;

/// Default bound on the number of frames.
pub const DEFAULT_MAX_FRAMES: usize = 300;
/// Default cap on the frames' size (parameters and statistics), bytes.
pub const DEFAULT_CAP_BYTES: u64 = 256 << 20;
/// Rows (module rows: positions of sequences count) of the fixed batch the statistics use.
pub const STATS_ROWS: usize = 256;
/// Seed of that batch (the snapshots' data-batch heatmap uses the same rows).
pub const STATS_SEED: u64 = 0x5eed;

/// How a run keeps its timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineOptions {
    /// At most this many frames (0: no timeline; otherwise at least 2: first and last).
    pub max_frames: usize,
    /// Store parameters as f16 (half the size; values within ~1e-3 relative).
    pub f16: bool,
    /// At most this many bytes of frames.
    pub cap_bytes: u64,
}

impl Default for TimelineOptions {
    fn default() -> Self {
        TimelineOptions {
            max_frames: DEFAULT_MAX_FRAMES,
            f16: true,
            cap_bytes: DEFAULT_CAP_BYTES,
        }
    }
}

impl TimelineOptions {
    pub fn off() -> Self {
        TimelineOptions {
            max_frames: 0,
            ..Default::default()
        }
    }
}

/// A frame's parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum FrameData {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl FrameData {
    pub fn len(&self) -> usize {
        match self {
            FrameData::F32(v) => v.len(),
            FrameData::F16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> u64 {
        match self {
            FrameData::F32(v) => v.len() as u64 * 4,
            FrameData::F16(v) => v.len() as u64 * 2,
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            FrameData::F32(v) => v.clone(),
            FrameData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
    /// Little-endian bytes (the file's tensor data).
    pub fn le_bytes(&self) -> Vec<u8> {
        match self {
            FrameData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            FrameData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Statistics of one module at one frame, on the fixed batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModuleStats {
    /// ‖V_c‖·‖U_c‖ per subcomponent.
    pub norm: Vec<f32>,
    /// Mean lower-leaky CI per subcomponent.
    pub mean_ci: Vec<f32>,
    /// Largest lower-leaky CI per subcomponent (alive at threshold t when > t).
    pub max_ci: Vec<f32>,
    /// Mean number of subcomponents above the config's `ci_alive_threshold` per row.
    pub l0: f32,
}

/// Values per module in the flat statistics tensor: norm, mean and max CI (C each), L0.
pub fn stats_len(c: usize) -> usize {
    3 * c + 1
}

impl ModuleStats {
    pub fn flatten(stats: &[ModuleStats]) -> Vec<f32> {
        let mut out = vec![];
        for s in stats {
            out.extend_from_slice(&s.norm);
            out.extend_from_slice(&s.mean_ci);
            out.extend_from_slice(&s.max_ci);
            out.push(s.l0);
        }
        out
    }
    /// The inverse of [`ModuleStats::flatten`] for modules of sizes `cs`.
    pub fn unflatten(v: &[f32], cs: &[usize]) -> Option<Vec<ModuleStats>> {
        if v.len() != cs.iter().map(|&c| stats_len(c)).sum::<usize>() {
            return None;
        }
        let mut out = vec![];
        let mut o = 0;
        for &c in cs {
            out.push(ModuleStats {
                norm: v[o..o + c].to_vec(),
                mean_ci: v[o + c..o + 2 * c].to_vec(),
                max_ci: v[o + 2 * c..o + 3 * c].to_vec(),
                l0: v[o + 3 * c],
            });
            o += stats_len(c);
        }
        Some(out)
    }
}

#[derive(Clone, Debug)]
pub struct Frame {
    pub step: usize,
    pub data: FrameData,
    pub stats: Arc<Vec<ModuleStats>>,
}

impl Frame {
    pub fn bytes(&self) -> u64 {
        self.data.bytes()
            + self
                .stats
                .iter()
                .map(|s| stats_len(s.norm.len()))
                .sum::<usize>() as u64
                * 4
    }
}

/// The frames of a run.
#[derive(Clone, Debug)]
pub struct Timeline {
    pub options: TimelineOptions,
    /// Frames are taken at the multiples of this step count (and at the end).
    pub every: usize,
    /// Names and shapes of the parameters in a frame, in order.
    pub layout: Vec<(String, Vec<usize>)>,
    pub frames: Vec<Frame>,
    /// Bumped whenever the frames change.
    pub version: u64,
}

/// What the app needs to draw the timeline: steps and statistics (shared, not the parameters).
#[derive(Clone, Debug, Default)]
pub struct TimelineIndex {
    pub steps: Vec<usize>,
    pub stats: Vec<Arc<Vec<ModuleStats>>>,
    pub every: usize,
    pub bytes: u64,
    pub options: Option<TimelineOptions>,
    pub version: u64,
}

impl TimelineIndex {
    /// Index of the frame whose step is closest to `step`.
    pub fn nearest(&self, step: usize) -> Option<usize> {
        (0..self.steps.len()).min_by_key(|&i| self.steps[i].abs_diff(step))
    }
}

/// Every trainable parameter of a decomposition, under its `.spdlab` tensor name
/// (`components.<module>.V|U`, `ci_fns.<module>.layers.<2i>.W|b`), module by module.
pub fn decomposition_params(model: &ComponentModel) -> Vec<(String, Tensor)> {
    let mut out = vec![];
    for m in &model.modules {
        out.push((format!("components.{}.V", m.name), m.v.as_tensor().clone()));
        out.push((format!("components.{}.U", m.name), m.u.as_tensor().clone()));
        for (i, (w, b)) in m.ci_layers.iter().enumerate() {
            out.push((
                format!("ci_fns.{}.layers.{}.W", m.name, 2 * i),
                w.as_tensor().clone(),
            ));
            out.push((
                format!("ci_fns.{}.layers.{}.b", m.name, 2 * i),
                b.as_tensor().clone(),
            ));
        }
    }
    out
}

/// Statistics of every module on the fixed batch ([`STATS_ROWS`] rows, [`STATS_SEED`]).
pub fn frame_stats(tr: &Trainer) -> anyhow::Result<Vec<ModuleStats>> {
    use crate::metrics::toy_metrics as tm;
    let model = &tr.model;
    let spec = &model.target.spec;
    let nf = spec.n_features();
    let n_inputs = (STATS_ROWS / spec.positions()).max(1);
    let rows = n_inputs * spec.positions();
    let raw = tr
        .data
        .batch(&mut crate::rng::Rng::new(STATS_SEED), n_inputs);
    let x = Tensor::from_vec(raw, (n_inputs, nf), model.device())?;
    let fold = crate::model::Fold::new();
    let (_, inputs) = model.target.forward_with_inputs(&x, &fold)?;
    let (ci, _) = model.causal_importances(&inputs, None, &fold)?;
    let thr = tr.config.ci_alive_threshold;
    let mut out = vec![];
    for (j, m) in model.modules.iter().enumerate() {
        let g: Vec<f32> = ci[j].lower.flatten_all()?.to_vec1()?;
        let vn = m.v.as_tensor().sqr()?.sum(0)?.sqrt()?.to_vec1::<f32>()?;
        let un = m.u.as_tensor().sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        let mut max_ci = vec![f32::NEG_INFINITY; m.c];
        for row in g.chunks_exact(m.c) {
            for (mx, &v) in max_ci.iter_mut().zip(row) {
                *mx = mx.max(v);
            }
        }
        out.push(ModuleStats {
            norm: vn.iter().zip(&un).map(|(a, b)| a * b).collect(),
            mean_ci: tm::mean_ci_per_component(&g, rows, m.c)
                .into_iter()
                .map(|v| v as f32)
                .collect(),
            max_ci,
            l0: tm::l0(&g, rows, m.c, thr) as f32,
        });
    }
    Ok(out)
}

fn layout_of(model: &ComponentModel) -> Vec<(String, Vec<usize>)> {
    decomposition_params(model)
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect()
}

/// Values of one frame of `layout`.
pub fn layout_len(layout: &[(String, Vec<usize>)]) -> usize {
    layout
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

impl Timeline {
    /// An empty timeline for a run of `steps` steps of `model` (spaced so that about
    /// `max_frames` frames, within the size cap, cover it).
    pub fn new(options: TimelineOptions, model: &ComponentModel, steps: usize) -> Self {
        let layout = layout_of(model);
        let mut t = Timeline {
            options,
            every: 1,
            layout,
            frames: vec![],
            version: 0,
        };
        t.every = t.spacing(steps);
        t
    }

    /// Frames the bound allows: `max_frames`, fewer when the size cap says so (at least 2).
    pub fn frame_budget(&self) -> usize {
        let per = self.frame_bytes().max(1);
        let by_size = (self.options.cap_bytes / per).min(usize::MAX as u64) as usize;
        self.options.max_frames.min(by_size).max(2)
    }

    /// Bytes of one frame (parameters and statistics).
    pub fn frame_bytes(&self) -> u64 {
        let n = layout_len(&self.layout) as u64;
        let c_total: u64 = self
            .layout
            .iter()
            .filter(|(k, _)| k.ends_with(".U"))
            .map(|(_, s)| s[0] as u64)
            .sum();
        let modules = self
            .layout
            .iter()
            .filter(|(k, _)| k.ends_with(".U"))
            .count() as u64;
        n * if self.options.f16 { 2 } else { 4 } + (3 * c_total + modules) * 4
    }

    /// The spacing that fits a run of `steps` steps (frames at 0, every, 2·every, ... ≤ steps,
    /// plus the end) into the budget.
    fn spacing(&self, steps: usize) -> usize {
        let budget = self.frame_budget();
        if budget <= 2 {
            steps + 1
        } else {
            steps.div_ceil(budget - 2).max(1)
        }
    }

    /// Bytes of the frames held.
    pub fn bytes(&self) -> u64 {
        self.frames.iter().map(Frame::bytes).sum()
    }

    /// Whether a frame is due before step `step` runs.
    pub fn due(&self, step: usize) -> bool {
        self.options.max_frames > 0
            && step.is_multiple_of(self.every)
            && self.frames.last().is_none_or(|f| f.step != step)
    }

    /// Adds a frame of `tr` at its current step (replacing the newest frame when that one is
    /// off the grid: an end or a save in between), then thins to the bound.
    pub fn capture(&mut self, tr: &Trainer) -> anyhow::Result<()> {
        let step = tr.step;
        if self.frames.last().is_some_and(|f| f.step == step) {
            return Ok(());
        }
        let mut values = Vec::with_capacity(layout_len(&self.layout));
        for (_, t) in decomposition_params(&tr.model) {
            values.extend(t.flatten_all()?.to_vec1::<f32>()?);
        }
        if values.len() != layout_len(&self.layout) {
            anyhow::bail!("the decomposition no longer matches its timeline's layout");
        }
        let data = if self.options.f16 {
            FrameData::F16(values.iter().map(|&x| f16::from_f32(x)).collect())
        } else {
            FrameData::F32(values)
        };
        let stats = Arc::new(frame_stats(tr)?);
        self.push(Frame { step, data, stats });
        Ok(())
    }

    /// Adds a frame (see [`Timeline::capture`]).
    pub fn push(&mut self, frame: Frame) {
        if let Some(last) = self.frames.last()
            && !last.step.is_multiple_of(self.every)
            && last.step < frame.step
        {
            self.frames.pop();
        }
        self.frames.retain(|f| f.step < frame.step);
        self.frames.push(frame);
        self.thin();
        self.version += 1;
    }

    /// Doubles the spacing until the frames fit the bound; the first, the newest and the
    /// frames on the grid stay.
    pub fn thin(&mut self) {
        let budget = self.frame_budget();
        while self.frames.len() > 2
            && (self.frames.len() > budget || self.bytes() > self.options.cap_bytes)
        {
            self.every = self.every.saturating_mul(2);
            let last = self.frames.len() - 1;
            let every = self.every;
            let mut i = 0;
            self.frames.retain(|f| {
                let keep = i == 0 || i == last || f.step.is_multiple_of(every);
                i += 1;
                keep
            });
            self.version += 1;
        }
    }

    /// New options (from the app or the command line): respaced for `steps` and thinned.
    pub fn set_options(&mut self, options: TimelineOptions, steps: usize) {
        self.options = options;
        let want = self.spacing(steps);
        // Keep the grid of the frames already taken: the spacing only grows by doubling.
        while self.every < want {
            self.every = self.every.saturating_mul(2);
        }
        self.thin();
        self.version += 1;
    }

    pub fn index(&self) -> TimelineIndex {
        TimelineIndex {
            steps: self.frames.iter().map(|f| f.step).collect(),
            stats: self.frames.iter().map(|f| f.stats.clone()).collect(),
            every: self.every,
            bytes: self.bytes(),
            options: Some(self.options),
            version: self.version,
        }
    }

    /// The frame at exactly `step`.
    pub fn frame_at(&self, step: usize) -> Option<&Frame> {
        self.frames.iter().find(|f| f.step == step)
    }
}

/// A trainer holding the decomposition of frame `frame` of `tr`'s timeline: same target,
/// config and data, parameters from the frame, step and history up to the frame's step. Every
/// view, intervention and probe can run on it as on the live run.
pub fn frame_trainer(tr: &Trainer, timeline: &Timeline, frame: &Frame) -> anyhow::Result<Trainer> {
    let dev = tr.model.device().clone();
    let values = frame.data.to_f32();
    if values.len() != layout_len(&timeline.layout) {
        anyhow::bail!(
            "frame at step {} holds {} values, its layout needs {}",
            frame.step,
            values.len(),
            layout_len(&timeline.layout)
        );
    }
    let mut map = std::collections::HashMap::new();
    let mut o = 0;
    for (k, s) in &timeline.layout {
        let n: usize = s.iter().product();
        map.insert(
            k.clone(),
            Tensor::from_vec(values[o..o + n].to_vec(), s.as_slice(), &dev)?,
        );
        o += n;
    }
    let mut model = ComponentModel::new(
        tr.model.target.clone(),
        &tr.config,
        &mut crate::rng::Rng::new(0),
    )?;
    for j in 0..model.modules.len() {
        let name = model.modules[j].name.clone();
        model.load_module_parameters(
            j,
            &format!("components.{name}"),
            &format!("ci_fns.{name}"),
            &mut |k, shape| {
                let t = map
                    .remove(k)
                    .ok_or_else(|| anyhow::anyhow!("frame at step {}: no '{k}'", frame.step))?;
                if t.dims() != shape {
                    anyhow::bail!(
                        "frame at step {}: '{k}' has shape {:?}, expected {shape:?}",
                        frame.step,
                        t.dims()
                    );
                }
                Ok(t)
            },
        )?;
    }
    let mut ft = Trainer::from_model(model, tr.config.clone(), tr.rng.clone())?;
    // The same inputs as the run (a language model's text, shared).
    ft.data = tr.data.clone();
    ft.step = frame.step;
    ft.history = tr
        .history
        .iter()
        .filter(|r| r.step < frame.step.max(1))
        .cloned()
        .collect();
    Ok(ft)
}
