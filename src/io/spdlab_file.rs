//! The `.spdlab` file: one self-describing safetensors file.
//!
//! Tensors (f32, little-endian):
//! - `target.<key>`: target parameters under the reference's state-dict keys;
//! - `components.<module>.V` `[d_in, C]`, `components.<module>.U` `[C, d_out]`;
//! - `ci_fns.<module>.layers.<2i>.W|b`: CI-function linear layers (reference shapes);
//! - `optim.<i>.m`, `optim.<i>.v`: Adam moments of optimizer entry i (to resume).
//!
//! Metadata: a single key `spdlab` holding a JSON object (see [`FileMeta`]): format name and
//! version, the preset (if any), the target architecture, the full SPD config, the decomposed
//! modules, the training state (step, RNG state, optimizer step counts), the loss history and
//! optional extras (e.g. clustering results).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::{TargetModel, TargetSpec};
use crate::rng::Rng;
use crate::spd::component_model::ComponentModel;
use crate::spd::config::SpdConfig;
use crate::spd::trainer::{StepRecord, Trainer};

pub const FORMAT_NAME: &str = "spdlab";
/// Tensors of the timeline section: `timeline.<i>.params` (f16 or f32) and
/// `timeline.<i>.stats` (f32) of frame i.
pub const TIMELINE_PREFIX: &str = "timeline.";
pub const FORMAT_VERSION: u32 = 1;

/// Wraps a contiguous f32 candle tensor as a safetensors view.
pub struct TensorView<'a>(pub &'a Tensor);

impl safetensors::View for TensorView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let v: Vec<f32> = self
            .0
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_default();
        Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.elem_count() * 4
    }
}

/// Raw little-endian tensor bytes as a safetensors view (f16 timeline frames).
struct RawView {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &RawView {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Reads all tensors of a safetensors buffer (but the timeline's) as f32 candle tensors, by
/// name.
pub fn read_tensors(bytes: &[u8], device: &Device) -> anyhow::Result<Vec<(String, Tensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut out = vec![];
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter(|s| !s.starts_with(TIMELINE_PREFIX))
        .map(|s| s.to_string())
        .collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name)?;
        if view.dtype() != safetensors::Dtype::F32 {
            anyhow::bail!(
                "tensor '{name}' has dtype {:?}; spdlab files hold f32",
                view.dtype()
            );
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push((name, Tensor::from_vec(data, view.shape(), device)?));
    }
    Ok(out)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleMeta {
    pub name: String,
    #[serde(rename = "C")]
    pub c: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub tied_to: Option<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// Next step to run.
    pub step: usize,
    /// RNG state as hex strings.
    pub rng: [String; 4],
    /// Adam update counts per optimizer entry.
    pub optimizer_steps: Vec<u64>,
    /// Whether the faithfulness warm-up has run.
    #[serde(default)]
    pub warmup_done: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileMeta {
    pub format: String,
    pub format_version: u32,
    #[serde(default)]
    pub preset: Option<String>,
    pub target: TargetSpec,
    pub config: SpdConfig,
    pub modules: Vec<ModuleMeta>,
    #[serde(default)]
    pub train_state: Option<TrainState>,
    #[serde(default)]
    pub history: Vec<StepRecord>,
    #[serde(default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// The timeline section, when the run kept one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<TimelineMeta>,
}

/// The timeline section's metadata; frame i's tensors are `timeline.<i>.params|stats`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TimelineMeta {
    pub options: crate::timeline::TimelineOptions,
    pub every: usize,
    /// Parameter names and shapes in a frame, in order.
    pub layout: Vec<(String, Vec<usize>)>,
    /// Step of each frame.
    pub steps: Vec<usize>,
}

/// What a `.spdlab` file holds besides the trainer.
#[derive(Clone, Debug, Default)]
pub struct FileExtras {
    pub preset: Option<String>,
    pub warmup_done: bool,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Serialises a trainer (decomposition, config, history, optimizer state) to bytes.
pub fn to_bytes(tr: &Trainer, extras: &FileExtras) -> anyhow::Result<Vec<u8>> {
    let model = &tr.model;
    let mut tensors: Vec<(String, Tensor)> = vec![];
    for (k, t) in &model.target.params {
        tensors.push((format!("target.{k}"), t.contiguous()?));
    }
    for (k, t) in crate::timeline::decomposition_params(model) {
        tensors.push((k, t.contiguous()?));
    }
    let mut modules = vec![];
    for m in &model.modules {
        modules.push(ModuleMeta {
            name: m.name.clone(),
            c: m.c,
            d_in: m.d_in,
            d_out: m.d_out,
            tied_to: m.tied_to,
        });
    }
    let mut opt_steps = vec![];
    for (i, e) in tr.opt.entries.iter().enumerate() {
        let (m, v, s) = e.state();
        opt_steps.push(s);
        if let (Some(m), Some(v)) = (m, v) {
            tensors.push((format!("optim.{i}.m"), m.contiguous()?));
            tensors.push((format!("optim.{i}.v"), v.contiguous()?));
        }
    }
    let rng = tr.rng.state().map(|x| format!("{x:016x}"));
    let meta = FileMeta {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        preset: extras.preset.clone(),
        target: model.target.spec.clone(),
        config: tr.config.clone(),
        modules,
        train_state: Some(TrainState {
            step: tr.step,
            rng,
            optimizer_steps: opt_steps,
            warmup_done: extras.warmup_done,
        }),
        history: tr.history.clone(),
        extra: extras.extra.clone(),
        timeline: None,
    };
    let mut meta = meta;
    let mut raw: Vec<(String, RawView)> = vec![];
    if let Some(tl) = &tr.timeline {
        meta.timeline = Some(TimelineMeta {
            options: tl.options,
            every: tl.every,
            layout: tl.layout.clone(),
            steps: tl.frames.iter().map(|f| f.step).collect(),
        });
        for (i, f) in tl.frames.iter().enumerate() {
            raw.push((
                format!("{TIMELINE_PREFIX}{i}.params"),
                RawView {
                    dtype: match f.data {
                        crate::timeline::FrameData::F16(_) => safetensors::Dtype::F16,
                        crate::timeline::FrameData::F32(_) => safetensors::Dtype::F32,
                    },
                    shape: vec![f.data.len()],
                    bytes: f.data.le_bytes(),
                },
            ));
            let st = crate::timeline::ModuleStats::flatten(&f.stats);
            raw.push((
                format!("{TIMELINE_PREFIX}{i}.stats"),
                RawView {
                    dtype: safetensors::Dtype::F32,
                    shape: vec![st.len()],
                    bytes: st.iter().flat_map(|x| x.to_le_bytes()).collect(),
                },
            ));
        }
    }
    let mut md = HashMap::new();
    md.insert("spdlab".to_string(), serde_json::to_string(&meta)?);
    let views: Vec<(String, Either)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), Either::Tensor(TensorView(t))))
        .chain(raw.iter().map(|(k, r)| (k.clone(), Either::Raw(r))))
        .collect();
    Ok(safetensors::serialize(views, Some(md))?)
}

/// A candle tensor or raw bytes, for one `serialize` call.
enum Either<'a> {
    Tensor(TensorView<'a>),
    Raw(&'a RawView),
}

impl safetensors::View for Either<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Either::Tensor(t) => t.dtype(),
            Either::Raw(r) => r.dtype(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Either::Tensor(t) => t.shape(),
            Either::Raw(r) => &r.shape,
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Either::Tensor(t) => t.data(),
            Either::Raw(r) => Cow::Borrowed(&r.bytes),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Either::Tensor(t) => t.data_len(),
            Either::Raw(r) => r.bytes.len(),
        }
    }
}

/// Saves atomically.
pub fn save(tr: &Trainer, extras: &FileExtras, path: &Path) -> anyhow::Result<()> {
    let bytes = to_bytes(tr, extras)?;
    super::atomic::write_atomic(path, &bytes)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))
}

/// Loads a `.spdlab` file; errors name the file and the problem.
pub fn load(path: &Path, device: &Device) -> anyhow::Result<(Trainer, FileExtras)> {
    let bytes = read_safetensors_file(path)?;
    from_bytes(&bytes, device).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// When set (the CLI's `--drop-optimizer-state`), a file whose optimizer state is unusable
/// (non-finite, or half missing) loads without it: Adam restarts from zero.
static DROP_OPTIMIZER_STATE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Sets whether unusable optimizer state is dropped (with a warning) instead of refused.
pub fn set_drop_optimizer_state(on: bool) {
    DROP_OPTIMIZER_STATE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Reads a safetensors file after checking its header against the file's size, so that a
/// huge file that is not one (a sparse 2 GB file, a folder, a device) is refused before it
/// is read whole.
pub fn read_safetensors_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let err = |m: String| anyhow::anyhow!("{}: {m}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if meta.is_dir() {
        return Err(err("is a folder, not a .spdlab file".into()));
    }
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    let len = meta.len();
    let mut f = std::fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut n8 = [0u8; 8];
    f.read_exact(&mut n8)
        .map_err(|_| err("not a .spdlab file (shorter than a safetensors header)".into()))?;
    let n = u64::from_le_bytes(n8);
    if n > crate::limits::MAX_HEADER_BYTES || n > len - 8 {
        return Err(err(format!(
            "not a .spdlab file (its safetensors header claims {n} bytes, the file has {len})"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    let end = safetensors_data_end(&header).map_err(|m| {
        err(format!(
            "not a .spdlab file (invalid safetensors header: {m})"
        ))
    })?;
    if 8 + n + end != len {
        return Err(err(format!(
            "truncated or padded file: its header describes {} bytes, the file has {len}",
            8 + n + end
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    bytes.extend_from_slice(&n8);
    bytes.extend_from_slice(&header);
    f.read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    Ok(bytes)
}

/// The end of the data section a safetensors header describes.
fn safetensors_data_end(header: &[u8]) -> Result<u64, String> {
    let v: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let mut end = 0u64;
    for (k, t) in obj {
        if k == "__metadata__" {
            continue;
        }
        let offs = t
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| format!("tensor '{k}' has no data_offsets"))?;
        let e = offs[1]
            .as_u64()
            .ok_or_else(|| format!("tensor '{k}' has invalid data_offsets"))?;
        end = end.max(e);
    }
    Ok(end)
}

/// Shapes of the tensors in a safetensors buffer, from its header alone.
fn header_shapes(bytes: &[u8]) -> anyhow::Result<HashMap<String, Vec<usize>>> {
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    Ok(md
        .tensors()
        .into_iter()
        .map(|(k, info)| (k, info.shape.clone()))
        .collect())
}

pub fn from_bytes(bytes: &[u8], device: &Device) -> anyhow::Result<(Trainer, FileExtras)> {
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("not a valid safetensors file ({e})"))?;
    let meta_json = md
        .metadata()
        .as_ref()
        .and_then(|m| m.get("spdlab"))
        .ok_or_else(|| {
            anyhow::anyhow!("safetensors file without spdlab metadata (not a .spdlab file)")
        })?;
    let meta: FileMeta = serde_json::from_str(meta_json)
        .map_err(|e| anyhow::anyhow!("invalid spdlab metadata: {e}"))?;
    if meta.format != FORMAT_NAME {
        anyhow::bail!("unknown format '{}'", meta.format);
    }
    if meta.format_version > FORMAT_VERSION {
        anyhow::bail!(
            "format version {} is newer than this spdlab supports ({FORMAT_VERSION})",
            meta.format_version
        );
    }
    meta.config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    meta.target
        .check_limits()
        .map_err(|e| anyhow::anyhow!("invalid target: {e}"))?;
    crate::limits::check(
        "modules (number of entries)",
        meta.modules.len(),
        crate::limits::MAX_MODULES,
    )?;
    if let Some(s) = &meta.train_state {
        crate::limits::check("train_state.step", s.step, crate::limits::MAX_STEPS + 1)?;
    }
    // The listed modules must match the tensors actually stored, before anything is sized
    // from the metadata.
    let shapes = header_shapes(bytes)?;
    for mm in &meta.modules {
        for (k, want) in [("V", [mm.d_in, mm.c]), ("U", [mm.c, mm.d_out])] {
            let key = format!("components.{}.{k}", mm.name);
            match shapes.get(&key) {
                None => anyhow::bail!("missing tensor '{key}'"),
                Some(s) if s.as_slice() != want => anyhow::bail!(
                    "tensor '{key}' has shape {s:?}, but the metadata of module '{}' says {want:?} (C = {}, d_in = {}, d_out = {})",
                    mm.name,
                    mm.c,
                    mm.d_in,
                    mm.d_out
                ),
                Some(_) => {}
            }
        }
    }
    let named =
        read_tensors(bytes, device).map_err(|e| anyhow::anyhow!("invalid tensor data: {e}"))?;
    let mut map: HashMap<String, Tensor> = named.into_iter().collect();
    let mut take = |k: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
        let t = map
            .remove(k)
            .ok_or_else(|| anyhow::anyhow!("missing tensor '{k}'"))?;
        if t.dims() != shape {
            anyhow::bail!(
                "tensor '{k}' has shape {:?}, expected {:?}",
                t.dims(),
                shape
            );
        }
        check_finite(k, &t)?;
        Ok(t)
    };
    let mut target_named = vec![];
    for (k, shape) in meta.target.param_shapes() {
        target_named.push((k.clone(), take(&format!("target.{k}"), &shape)?));
    }
    let target = TargetModel::new(meta.target.clone(), target_named, device)
        .map_err(|e| anyhow::anyhow!("target model: {e}"))?;
    // Rebuild the component model with the stored parameters.
    let mut rng0 = Rng::new(0);
    let mut model = ComponentModel::new(target, &meta.config, &mut rng0)?;
    if model.modules.len() != meta.modules.len() {
        anyhow::bail!(
            "config decomposes {} modules but the file lists {}",
            model.modules.len(),
            meta.modules.len()
        );
    }
    for (j, mm) in meta.modules.iter().enumerate() {
        let m = &model.modules[j];
        if m.name != mm.name || m.c != mm.c || m.d_in != mm.d_in || m.d_out != mm.d_out {
            anyhow::bail!(
                "module '{}' in the file does not match the config/target",
                mm.name
            );
        }
        let name = m.name.clone();
        model.load_module_parameters(
            j,
            &format!("components.{name}"),
            &format!("ci_fns.{name}"),
            &mut |k, shape| take(k, shape),
        )?;
        if model.modules[j].tied_to != mm.tied_to {
            anyhow::bail!(
                "module '{}': tying in the file does not match the target",
                mm.name
            );
        }
    }
    model.check_tied("components")?;
    let state = meta.train_state.clone();
    let rng = match &state {
        Some(s) => {
            let mut st = [0u64; 4];
            for (i, h) in s.rng.iter().enumerate() {
                st[i] = u64::from_str_radix(h, 16)
                    .map_err(|_| anyhow::anyhow!("invalid rng state '{h}'"))?;
            }
            Rng::from_state(st)
        }
        None => Rng::new(meta.config.seed),
    };
    let mut tr = Trainer::from_model(model, meta.config.clone(), rng)?;
    tr.load_text();
    if let Some(s) = &state {
        tr.step = s.step;
        if s.optimizer_steps.len() != tr.opt.entries.len() {
            anyhow::bail!(
                "optimizer state has {} entries, expected {}",
                s.optimizer_steps.len(),
                tr.opt.entries.len()
            );
        }
        let drop = DROP_OPTIMIZER_STATE.load(std::sync::atomic::Ordering::Relaxed);
        let hint =
            "pass --drop-optimizer-state to load the file without it (Adam restarts from zero)";
        let mut states = vec![];
        let mut unusable: Option<String> = None;
        for (i, e) in tr.opt.entries.iter().enumerate() {
            let shape = e.grad_of.as_tensor().dims().to_vec();
            let (km, kv) = (format!("optim.{i}.m"), format!("optim.{i}.v"));
            let m = map.remove(&km);
            let v = map.remove(&kv);
            let problem = match (&m, &v) {
                (Some(m), Some(v)) => {
                    if m.dims() != shape.as_slice() || v.dims() != shape.as_slice() {
                        anyhow::bail!("optimizer state {i} has the wrong shape");
                    }
                    check_finite(&km, m)
                        .and(check_finite(&kv, v))
                        .err()
                        .map(|e| e.to_string())
                }
                (Some(_), None) => Some(format!("tensor '{km}' is present but '{kv}' is missing")),
                (None, Some(_)) => Some(format!("tensor '{kv}' is present but '{km}' is missing")),
                (None, None) => None,
            };
            if let Some(p) = problem {
                unusable.get_or_insert(p);
            }
            states.push((m, v));
        }
        match unusable {
            Some(p) if !drop => anyhow::bail!("unusable optimizer state: {p}; {hint}"),
            Some(_) => {
                for e in tr.opt.entries.iter_mut() {
                    e.set_state(None, None, 0);
                }
            }
            None => {
                for (i, (e, (m, v))) in tr.opt.entries.iter_mut().zip(states).enumerate() {
                    e.set_state(m, v, s.optimizer_steps[i]);
                }
            }
        }
    }
    tr.history = meta.history.clone();
    if let Some(k) = map.keys().next() {
        anyhow::bail!("unexpected tensor '{k}'");
    }
    if let Some(tm) = &meta.timeline {
        tr.timeline =
            Some(read_timeline(bytes, tm, &tr).map_err(|e| anyhow::anyhow!("timeline: {e}"))?);
    } else if let Some(k) = shapes.keys().find(|k| k.starts_with(TIMELINE_PREFIX)) {
        anyhow::bail!("tensor '{k}' without a timeline section in the metadata");
    }
    Ok((
        tr,
        FileExtras {
            preset: meta.preset,
            warmup_done: state.map(|s| s.warmup_done).unwrap_or(true),
            extra: meta.extra,
        },
    ))
}

/// The timeline frames of a file, checked against the decomposition they belong to.
fn read_timeline(
    bytes: &[u8],
    tm: &TimelineMeta,
    tr: &Trainer,
) -> anyhow::Result<crate::timeline::Timeline> {
    use crate::timeline::{Frame, FrameData, ModuleStats, Timeline};
    crate::limits::check("timeline frames", tm.steps.len(), crate::limits::MAX_FRAMES)?;
    let expect = Timeline::new(tm.options, &tr.model, tr.config.steps);
    if tm.layout != expect.layout {
        anyhow::bail!("its parameter layout does not match the decomposition");
    }
    if tm.every == 0 {
        anyhow::bail!("every = 0");
    }
    if tm.steps.windows(2).any(|w| w[0] >= w[1]) {
        anyhow::bail!("frame steps are not increasing");
    }
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let n = crate::timeline::layout_len(&tm.layout);
    let cs: Vec<usize> = tr.model.modules.iter().map(|m| m.c).collect();
    let mut frames = vec![];
    for (i, &step) in tm.steps.iter().enumerate() {
        let pk = format!("{TIMELINE_PREFIX}{i}.params");
        let sk = format!("{TIMELINE_PREFIX}{i}.stats");
        let p = st
            .tensor(&pk)
            .map_err(|_| anyhow::anyhow!("missing tensor '{pk}'"))?;
        let raw = p.data();
        let data = match p.dtype() {
            safetensors::Dtype::F32 if raw.len() == 4 * n => FrameData::F32(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            safetensors::Dtype::F16 if raw.len() == 2 * n => FrameData::F16(
                raw.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            d => anyhow::bail!(
                "tensor '{pk}' is {d:?} of {} bytes; a frame is {n} f32 or f16 values",
                raw.len()
            ),
        };
        if let Some(j) = data.to_f32().iter().position(|x| !x.is_finite()) {
            anyhow::bail!("tensor '{pk}' contains a non-finite value at flat index {j}");
        }
        let s = st
            .tensor(&sk)
            .map_err(|_| anyhow::anyhow!("missing tensor '{sk}'"))?;
        if s.dtype() != safetensors::Dtype::F32 {
            anyhow::bail!("tensor '{sk}' has dtype {:?}, expected F32", s.dtype());
        }
        let sv: Vec<f32> = s
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let stats = ModuleStats::unflatten(&sv, &cs)
            .ok_or_else(|| anyhow::anyhow!("tensor '{sk}' has {} values", sv.len()))?;
        frames.push(Frame {
            step,
            data,
            stats: std::sync::Arc::new(stats),
        });
    }
    let extra = st
        .names()
        .into_iter()
        .filter(|k| k.starts_with(TIMELINE_PREFIX))
        .count();
    if extra != 2 * frames.len() {
        anyhow::bail!(
            "{extra} timeline tensors for {} frames (2 each)",
            frames.len()
        );
    }
    Ok(Timeline {
        options: tm.options,
        every: tm.every,
        layout: tm.layout.clone(),
        frames,
        version: 1,
    })
}

fn check_finite(name: &str, t: &Tensor) -> anyhow::Result<()> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        anyhow::bail!(
            "tensor '{name}' contains a non-finite value ({}) at flat index {i}",
            v[i]
        );
    }
    Ok(())
}
