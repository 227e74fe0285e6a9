//! Importer for runs saved by the reference Python library (goodfire-ai/spd): a run folder or
//! its `model_<step>.pth`, with `final_config.yaml`, `{task}.pth`, `{task}_train_config.yaml`
//! (and `label_coeffs.json`) beside it.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::pth;
use crate::model::{ActFn, TargetModel, TargetSpec};
use crate::rng::Rng;
use crate::spd::component_model::ComponentModel;
use crate::spd::config::{DenseCiPattern, IdentityCiPattern, LossConfig, SpdConfig};
use crate::spd::trainer::Trainer;

/// What the importer found besides the model.
#[derive(Clone, Debug, Default)]
pub struct ImportInfo {
    pub checkpoint: PathBuf,
    pub step: Option<usize>,
    /// Non-fatal findings (e.g. loss classes spdlab does not implement, dropped for eval).
    pub warnings: Vec<String>,
}

/// Locates the checkpoint of a run folder (the `model_<step>.pth` with the largest step).
pub fn resolve_checkpoint(path: &Path) -> anyhow::Result<(PathBuf, Option<usize>)> {
    if path.is_dir() {
        let mut best: Option<(usize, PathBuf)> = None;
        let rd = std::fs::read_dir(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot list folder: {e}", path.display()))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(step) = checkpoint_step(&name)
                && e.path().is_file()
                && best.as_ref().is_none_or(|(s, _)| step > *s)
            {
                best = Some((step, e.path()));
            }
        }
        match best {
            Some((s, p)) => Ok((p, Some(s))),
            None if !path.join("final_config.yaml").exists() => anyhow::bail!(
                "{}: not a goodfire-ai/spd run folder (no final_config.yaml, no model_<step>.pth)",
                path.display()
            ),
            None => anyhow::bail!(
                "{}: no model_<step>.pth checkpoint in this folder",
                path.display()
            ),
        }
    } else if path.exists() {
        check_checkpoint_file(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok((path.to_path_buf(), checkpoint_step(&name)))
    } else {
        anyhow::bail!("{}: no such file or folder", path.display())
    }
}

/// Refuses, with a clear message, a file that is not a PyTorch checkpoint (zip archive).
fn check_checkpoint_file(path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    if n >= 4 && magic[..4] == *b"PK\x03\x04" {
        return Ok(());
    }
    let spdlab = n == 8 && {
        // A safetensors header: a little-endian length, then '{'.
        let mut f = std::fs::File::open(path)?;
        let mut b = [0u8; 9];
        f.read_exact(&mut b).is_ok() && b[8] == b'{'
    };
    if spdlab {
        anyhow::bail!(
            "{}: is a safetensors (.spdlab) file, not a goodfire-ai/spd run; open it directly (import converts reference runs)",
            path.display()
        );
    }
    anyhow::bail!(
        "{}: not a goodfire-ai/spd run (not a PyTorch checkpoint: no zip archive header)",
        path.display()
    )
}

/// Every `model_<step>.pth` of a run folder, by step.
pub fn checkpoints(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = checkpoint_step(&name)?;
            e.path().is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The timeline of a reference run: each `model_<step>.pth` beside `checkpoint` is a frame
/// (f32; at most [`crate::timeline::DEFAULT_MAX_FRAMES`], evenly chosen). `tr` is the run
/// loaded from `checkpoint`. A checkpoint that does not load (one still being written) is
/// left out with a warning.
pub fn timeline(
    checkpoint: &Path,
    tr: &Trainer,
    device: &Device,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Option<crate::timeline::Timeline>> {
    use crate::timeline::{Frame, FrameData, Timeline, TimelineOptions};
    let dir = checkpoint.parent().unwrap_or(Path::new("."));
    let mut all = checkpoints(dir);
    let max = crate::timeline::DEFAULT_MAX_FRAMES;
    if all.len() > max {
        let n = all.len();
        all = (0..max)
            .map(|i| all[i * (n - 1) / (max - 1)].clone())
            .collect();
    }
    if all.len() < 2 {
        return Ok(None);
    }
    let mut tl = Timeline::new(
        TimelineOptions {
            max_frames: max,
            f16: false,
            cap_bytes: u64::MAX,
        },
        &tr.model,
        tr.config.steps,
    );
    tl.every = 1;
    for (step, path) in all {
        let same = super::output::same_file(&path, checkpoint);
        let loaded;
        let t = if same {
            tr
        } else {
            match import(&path, device) {
                Ok((t, _)) => {
                    loaded = t;
                    &loaded
                }
                Err(e) => {
                    warnings.push(format!("timeline: {e:#}; frame left out"));
                    continue;
                }
            }
        };
        let mut values = vec![];
        for (_, p) in crate::timeline::decomposition_params(&t.model) {
            values.extend(p.flatten_all()?.to_vec1::<f32>()?);
        }
        if values.len() != crate::timeline::layout_len(&tl.layout) {
            warnings.push(format!(
                "timeline: {}: another decomposition than the run's; frame left out",
                path.display()
            ));
            continue;
        }
        tl.frames.push(Frame {
            step,
            data: FrameData::F32(values),
            stats: std::sync::Arc::new(crate::timeline::frame_stats(t)?),
        });
    }
    tl.version = 1;
    Ok((tl.frames.len() >= 2).then_some(tl))
}

fn checkpoint_step(name: &str) -> Option<usize> {
    let stem = name.strip_suffix(".pth")?;
    if !stem.starts_with("model") {
        return None;
    }
    stem.rsplit('_').next()?.parse().ok()
}

/// True when `path` looks like a reference run (folder or `.pth`).
pub fn is_reference_run(path: &Path) -> bool {
    path.is_dir() || path.extension().is_some_and(|e| e == "pth")
}

fn read_yaml(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("{}: missing companion file", path.display())
        } else {
            anyhow::anyhow!("{}: cannot read: {e}", path.display())
        }
    })?;
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid YAML: {e}", path.display()))?;
    serde_json::to_value(v)
        .map_err(|e| anyhow::anyhow!("{}: unsupported YAML content: {e}", path.display()))
}

/// Renames deprecated config keys as the reference's migrator does.
fn migrate_config(cfg: &mut serde_json::Map<String, Value>, warnings: &mut Vec<String>) {
    for (old, new) in [
        ("gate_type", "ci_fn_type"),
        ("gate_hidden_dims", "ci_fn_hidden_dims"),
        ("print_freq", "eval_freq"),
    ] {
        if let Some(v) = cfg.remove(old) {
            cfg.entry(new.to_string()).or_insert(v);
        }
    }
    if !cfg.contains_key("module_info")
        && let (Some(c), Some(pats)) = (
            cfg.get("C").cloned(),
            cfg.get("target_module_patterns").cloned(),
        )
        && let Some(pats) = pats.as_array()
    {
        let mi: Vec<Value> = pats
            .iter()
            .map(|p| serde_json::json!({"module_pattern": p, "C": c}))
            .collect();
        cfg.insert("module_info".into(), Value::Array(mi));
    }
    if !cfg.contains_key("lr_schedule")
        && let Some(lr) = cfg.get("lr").cloned()
    {
        let fn_type = cfg
            .get("lr_schedule")
            .and_then(|v| v.as_str())
            .unwrap_or("constant")
            .to_string();
        let warm = cfg
            .get("lr_warmup_pct")
            .cloned()
            .unwrap_or(Value::from(0.0));
        let f = if fn_type == "cosine" { 0.0 } else { 1.0 };
        cfg.insert(
            "lr_schedule".into(),
            serde_json::json!({"start_val": lr, "warmup_pct": warm, "final_val_frac": f, "fn_type": fn_type}),
        );
    }
    for k in [
        "faithfulness_coeff",
        "stochastic_recon_coeff",
        "stochastic_recon_layerwise_coeff",
        "importance_minimality_coeff",
        "pnorm",
    ] {
        if cfg.remove(k).is_some() {
            warnings.push(format!(
                "deprecated config key '{k}' dropped (as the reference does)"
            ));
        }
    }
}

/// Maps a reference `final_config.yaml` to an [`SpdConfig`].
pub fn spd_config_from_reference(
    v: Value,
    warnings: &mut Vec<String>,
) -> anyhow::Result<SpdConfig> {
    let Value::Object(mut cfg) = v else {
        anyhow::bail!("the config is not a mapping");
    };
    migrate_config(&mut cfg, warnings);
    // Loss terms: keep the ones spdlab implements; others are reported and skipped.
    let mut losses = vec![];
    for l in cfg
        .get("loss_metric_configs")
        .and_then(|x| x.as_array())
        .cloned()
        .unwrap_or_default()
    {
        let name = l
            .get("classname")
            .and_then(|x| x.as_str())
            .unwrap_or("?")
            .to_string();
        match serde_json::from_value::<LossConfig>(l) {
            Ok(lc) => losses.push(lc),
            Err(_) => warnings.push(format!(
                "loss '{name}' is not implemented in spdlab; skipped"
            )),
        }
    }
    cfg.insert("loss_metric_configs".into(), serde_json::to_value(&losses)?);
    // Target-solution patterns from eval_metric_configs (IdentityCIError).
    let mut identity = vec![];
    let mut dense = vec![];
    for m in cfg
        .get("eval_metric_configs")
        .and_then(|x| x.as_array())
        .cloned()
        .unwrap_or_default()
    {
        if m.get("classname").and_then(|x| x.as_str()) == Some("IdentityCIError") {
            for p in m
                .get("identity_ci")
                .and_then(|x| x.as_array())
                .cloned()
                .unwrap_or_default()
            {
                identity.push(serde_json::from_value::<IdentityCiPattern>(p)?);
            }
            for p in m
                .get("dense_ci")
                .and_then(|x| x.as_array())
                .cloned()
                .unwrap_or_default()
            {
                dense.push(serde_json::from_value::<DenseCiPattern>(p)?);
            }
        }
    }
    cfg.insert("identity_ci".into(), serde_json::to_value(&identity)?);
    cfg.insert("dense_ci".into(), serde_json::to_value(&dense)?);
    for (k, ok) in [
        ("sigmoid_type", SIGMOIDS),
        ("ci_fn_type", CI_FNS),
        ("sampling", SAMPLINGS),
    ] {
        if let Some(s) = cfg.get(k).and_then(|x| x.as_str())
            && !ok.contains(&s)
        {
            anyhow::bail!("unknown {k} '{s}' (spdlab knows: {})", ok.join(", "));
        }
    }
    if let Some(s) = cfg.get("output_loss_type").and_then(|x| x.as_str())
        && s != "mse"
        && s != "kl"
    {
        anyhow::bail!("unknown output_loss_type '{s}' (spdlab knows: mse, kl)");
    }
    if cfg
        .get("identity_module_info")
        .is_some_and(|v| !v.is_null())
    {
        anyhow::bail!("identity_module_info (identity insertion) is not supported");
    }
    let spd: SpdConfig =
        serde_json::from_value(Value::Object(cfg)).map_err(|e| anyhow::anyhow!("config: {e}"))?;
    spd.validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    Ok(spd)
}

const SIGMOIDS: &[&str] = &[
    "leaky_hard",
    "hard",
    "upper_leaky_hard",
    "normal",
    "swish_hard",
];
const CI_FNS: &[&str] = &["mlp", "vector_mlp", "shared_mlp"];
const SAMPLINGS: &[&str] = &["continuous", "binomial"];

/// Old state-dict key names → current ones (the reference's `handle_deprecated_state_dict_keys_`).
fn migrate_key(k: &str) -> String {
    let mut k = k.replace("_gates.", "_ci_fns.");
    if let Some(rest) = k.strip_prefix("patched_model.") {
        k = format!("target_model.{rest}");
    }
    if let Some(base) = k.strip_suffix(".original.weight") {
        k = format!("{base}.weight");
    }
    for which in ["U", "V"] {
        let suffix = format!(".components.{which}");
        if let Some(base) = k.strip_suffix(&suffix) {
            let base = base.strip_prefix("target_model.").unwrap_or(base);
            k = format!("_components.{}.{which}", base.replace('.', "-"));
        }
    }
    k
}

/// Imports a reference run (folder or checkpoint).
pub fn import(path: &Path, device: &Device) -> anyhow::Result<(Trainer, ImportInfo)> {
    let (ckpt, step) = resolve_checkpoint(path)?;
    let dir = ckpt
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut info = ImportInfo {
        checkpoint: ckpt.clone(),
        step,
        warnings: vec![],
    };
    let cfg_path = dir.join("final_config.yaml");
    let raw_cfg = read_yaml(&cfg_path)?;
    let task = raw_cfg
        .get("task_config")
        .and_then(|t| t.get("task_name"))
        .and_then(|t| t.as_str())
        .unwrap_or("")
        .to_string();
    let lm_info = (task == "lm").then(|| raw_cfg.clone());
    let spd = spd_config_from_reference(raw_cfg, &mut info.warnings)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?;
    let tensors = pth::read_pth(&ckpt)?;
    let ck_err = |msg: String| anyhow::anyhow!("{}: {msg}", ckpt.display());
    let mut target_named = vec![];
    let mut comp: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> = Default::default();
    for t in tensors {
        let key = migrate_key(&t.name);
        if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
            return Err(ck_err(format!(
                "tensor '{}' contains a non-finite value ({}) at flat index {i}",
                t.name, t.data[i]
            )));
        }
        if let Some(k) = key.strip_prefix("target_model.") {
            target_named.push((k.to_string(), Tensor::from_vec(t.data, t.shape, device)?));
        } else if key.starts_with("_components.") || key.starts_with("_ci_fns.") {
            comp.insert(key, (t.shape, t.data));
        } else {
            return Err(ck_err(format!(
                "unexpected key '{}' (not a goodfire-ai/spd ComponentModel checkpoint)",
                t.name
            )));
        }
    }
    if target_named.is_empty() {
        return Err(ck_err(
            "no target_model.* tensors (not a goodfire-ai/spd ComponentModel checkpoint)".into(),
        ));
    }
    let spec = match &lm_info {
        Some(raw) => lm_target_spec(raw, &dir, &target_named)
            .map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?,
        None => target_spec(&task, &dir, &target_named, &mut info.warnings)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let target = TargetModel::new(spec, target_named, device)
        .map_err(|e| ck_err(format!("target model: {e}")))?;
    let mut rng = Rng::new(spd.seed);
    let mut model = ComponentModel::new(target, &spd, &mut rng)
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?;
    for j in 0..model.modules.len() {
        let dashed = model.modules[j].name.replace('.', "-");
        let mut take = |k: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
            let (s, d) = comp
                .remove(k)
                .ok_or_else(|| ck_err(format!("missing tensor '{k}'")))?;
            if s != shape {
                return Err(ck_err(format!(
                    "tensor '{k}' has shape {s:?}, the config needs {shape:?}"
                )));
            }
            Ok(Tensor::from_vec(d, s, device)?)
        };
        model.load_module_parameters(
            j,
            &format!("_components.{dashed}"),
            &format!("_ci_fns.{dashed}"),
            &mut take,
        )?;
        // The bias buffer duplicates the target's bias.
        comp.remove(&format!("_components.{dashed}.bias"));
    }
    if let Some(k) = comp.keys().next() {
        return Err(ck_err(format!(
            "tensor '{k}' belongs to no decomposed module of the config"
        )));
    }
    model.sync_tied()?;
    let cfg = spd;
    let tr = Trainer::from_model(model, cfg.clone(), Rng::new(cfg.seed))?;
    Ok((tr, info))
}

fn target_spec(
    task: &str,
    dir: &Path,
    named: &[(String, Tensor)],
    warnings: &mut Vec<String>,
) -> anyhow::Result<TargetSpec> {
    let shape = |k: &str| {
        named
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.dims().to_vec())
    };
    match task {
        "tms" => {
            let w1 = shape("linear1.weight").ok_or_else(|| {
                anyhow::anyhow!("tms checkpoint without target_model.linear1.weight")
            })?;
            let n_hidden_layers = named
                .iter()
                .filter(|(k, _)| k.starts_with("hidden_layers."))
                .count();
            let p = dir.join("tms_train_config.yaml");
            // Without the train config, tying is read off the checkpoint: a tied target stores
            // linear2.weight as exactly linear1.weightᵀ (one parameter), an untied one never does.
            let mut tied = match (
                named.iter().find(|(k, _)| k == "linear1.weight"),
                named.iter().find(|(k, _)| k == "linear2.weight"),
            ) {
                (Some((_, w1)), Some((_, w2))) => {
                    let t = w1.t()?.contiguous()?;
                    t.dims() == w2.dims()
                        && t.flatten_all()?.to_vec1::<f32>()?
                            == w2.flatten_all()?.to_vec1::<f32>()?
                }
                _ => true,
            };
            if !p.exists() {
                warnings.push(format!(
                    "{}: missing companion file; tied_weights = {tied} read off the checkpoint (linear2.weight {} linear1.weightᵀ)",
                    p.display(),
                    if tied { "equals" } else { "differs from" }
                ));
            }
            if p.exists() {
                let v = read_yaml(&p)?;
                let m = v.get("tms_model_config").unwrap_or(&v);
                tied = m
                    .get("tied_weights")
                    .and_then(|x| x.as_bool())
                    .unwrap_or(true);
                for (k, expect) in [
                    ("n_features", w1[1]),
                    ("n_hidden", w1[0]),
                    ("n_hidden_layers", n_hidden_layers),
                ] {
                    if let Some(x) = m.get(k).and_then(|x| x.as_u64())
                        && x as usize != expect
                    {
                        anyhow::bail!("{}: {k} = {x} but the checkpoint has {expect}", p.display());
                    }
                }
            }
            Ok(TargetSpec::Tms {
                n_features: w1[1],
                n_hidden: w1[0],
                n_hidden_layers,
                tied_weights: tied,
            })
        }
        "resid_mlp" => {
            let p = dir.join("resid_mlp_train_config.yaml");
            let v = read_yaml(&p)?;
            let m = v
                .get("resid_mlp_model_config")
                .ok_or_else(|| anyhow::anyhow!("{}: no resid_mlp_model_config", p.display()))?;
            let get = |k: &str| -> anyhow::Result<usize> {
                m.get(k)
                    .and_then(|x| x.as_u64())
                    .map(|x| x as usize)
                    .ok_or_else(|| anyhow::anyhow!("{}: missing or invalid '{k}'", p.display()))
            };
            let act = match m
                .get("act_fn_name")
                .and_then(|x| x.as_str())
                .unwrap_or("relu")
            {
                "relu" => ActFn::Relu,
                "gelu" => ActFn::Gelu,
                other => anyhow::bail!("{}: unknown act_fn_name '{other}'", p.display()),
            };
            Ok(TargetSpec::ResidMlp {
                n_features: get("n_features")?,
                d_embed: get("d_embed")?,
                d_mlp: get("d_mlp")?,
                n_layers: get("n_layers")?,
                act_fn: act,
                in_bias: m.get("in_bias").and_then(|x| x.as_bool()).unwrap_or(false),
                out_bias: m.get("out_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            })
        }
        "ih" => {
            let p = dir.join("ih_train_config.yaml");
            let v = read_yaml(&p)?;
            let m = v
                .get("ih_model_config")
                .ok_or_else(|| anyhow::anyhow!("{}: no ih_model_config", p.display()))?;
            let get = |k: &str| -> anyhow::Result<usize> {
                m.get(k)
                    .and_then(|x| x.as_u64())
                    .map(|x| x as usize)
                    .ok_or_else(|| anyhow::anyhow!("{}: missing or invalid '{k}'", p.display()))
            };
            let flag = |k: &str, default: bool| -> anyhow::Result<bool> {
                match m.get(k) {
                    None | Some(Value::Null) => Ok(default),
                    Some(x) => x.as_bool().ok_or_else(|| {
                        anyhow::anyhow!("{}: '{k}' must be true or false", p.display())
                    }),
                }
            };
            let dims = crate::model::IhDims {
                vocab_size: get("vocab_size")?,
                seq_len: get("seq_len")?,
                d_model: get("d_model")?,
                n_heads: get("n_heads")?,
                n_layers: get("n_layers")?,
                ff_fanout: m
                    .get("ff_fanout")
                    .and_then(|x| x.as_u64())
                    .map_or(4, |x| x as usize),
                use_ff: flag("use_ff", false)?,
                use_pos_encoding: flag("use_pos_encoding", true)?,
                use_layer_norm: flag("use_layer_norm", false)?,
            };
            let spec = TargetSpec::Ih(dims);
            spec.check_limits()
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            if let Some(s) = shape("token_embed.weight")
                && s != [dims.n_tokens(), dims.d_model]
            {
                anyhow::bail!(
                    "{}: vocab_size {} and d_model {} need token_embed.weight of shape [{}, {}], the checkpoint has {s:?}",
                    p.display(),
                    dims.vocab_size,
                    dims.d_model,
                    dims.n_tokens(),
                    dims.d_model
                );
            }
            Ok(spec)
        }
        other => {
            anyhow::bail!(
                "task '{other}' is not supported (spdlab imports tms, resid_mlp, ih and lm runs)"
            )
        }
    }
}

/// The tokenizer of a language-model run: its `tokenizer_name` as a local folder or file
/// (relative to the run folder, its parent or the working directory), else `tokenizer.json`
/// (or `tokenizer/`) in the run folder.
pub fn lm_tokenizer_path(run: &Path) -> Option<PathBuf> {
    let dir = if run.is_dir() {
        run.to_path_buf()
    } else {
        run.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let raw = read_yaml(&dir.join("final_config.yaml")).ok();
    let name = raw
        .as_ref()
        .and_then(|r| r.get("tokenizer_name"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let mut cands = if name.is_empty() {
        vec![]
    } else {
        local_bases(&dir, name)
    };
    cands.push(dir.join("tokenizer.json"));
    cands.push(dir.join("tokenizer"));
    cands.into_iter().find(|c| {
        c.is_file() && c.extension().is_some_and(|e| e == "json")
            || c.join("tokenizer.json").is_file()
    })
}

/// Where a path a run's config names may be: as given when absolute; else relative to the run
/// folder, to its parent (runs kept beside their target) or to the working directory (as the
/// reference resolves it).
fn local_bases(dir: &Path, name: &str) -> Vec<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        return vec![p.to_path_buf()];
    }
    let mut b = vec![dir.join(p)];
    if let Some(up) = dir.parent() {
        b.push(up.join(p));
    }
    b.push(p.to_path_buf());
    b
}

/// The text a language-model run trained on, tokenized as the reference does (its eval split:
/// `task_config.dataset_name` as a local folder of `<split>.jsonl` files or one file, relative
/// to the run folder, its parent or the working directory; the run's tokenizer; windows of
/// `seq_len`; the reference's default of 10 shards). None (with the reason) when the text or
/// the tokenizer is not on this machine.
pub fn lm_corpus(
    run: &Path,
    seq_len: usize,
    vocab: usize,
) -> Result<crate::data::TokenData, String> {
    let dir = if run.is_dir() {
        run.to_path_buf()
    } else {
        run.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let raw = read_yaml(&dir.join("final_config.yaml")).map_err(|e| e.to_string())?;
    let task = raw.get("task_config").cloned().unwrap_or(Value::Null);
    let name = task
        .get("dataset_name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let column = task
        .get("column_name")
        .and_then(|v| v.as_str())
        .unwrap_or("story");
    let split = task
        .get("eval_data_split")
        .and_then(|v| v.as_str())
        .unwrap_or("test");
    if task.get("is_tokenized").and_then(|v| v.as_bool()) == Some(true) {
        return Err(format!(
            "dataset '{name}' is pre-tokenized; spdlab reads text datasets"
        ));
    }
    let file = local_bases(&dir, name).iter().find_map(|b| {
        if b.is_dir() {
            [format!("{split}.jsonl"), "train.jsonl".to_string()]
                .iter()
                .map(|f| b.join(f))
                .find(|f| f.is_file())
        } else {
            b.is_file().then(|| b.clone())
        }
    });
    let file = file.ok_or_else(|| {
        format!("dataset '{name}' is not a local folder or file (spdlab downloads nothing)")
    })?;
    let tok_path = lm_tokenizer_path(run).ok_or("the run's tokenizer is not on this machine")?;
    let tok = crate::text::TextTokenizer::load(&tok_path).map_err(|e| e.to_string())?;
    let docs = crate::text::read_documents(&file, Some(column)).map_err(|e| e.to_string())?;
    let rows = crate::text::tokenize_and_concatenate(&docs, &tok, seq_len, false, 10, 1000)
        .map_err(|e| e.to_string())?;
    crate::data::TokenData::corpus(&rows, seq_len, vocab, file.display().to_string())
}

/// Where a language-model run's target lives locally: `pretrained_model_name` as a path
/// (absolute, or relative to the run folder or the working directory, as the reference
/// resolves it), a checkpoint `model_step_<N>.pt` (its `model_config.yaml` two folders up) or
/// a pretraining run folder; else `model_config.yaml` copied into the run folder.
pub fn lm_model_config_path(raw: &Value, dir: &Path) -> anyhow::Result<PathBuf> {
    let name = raw
        .get("pretrained_model_name")
        .or_else(|| raw.get("pretrained_model_name_hf"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let mut tried = vec![];
    if !name.is_empty() && !name.starts_with("wandb:") {
        for b in local_bases(dir, name) {
            let cands = if b.is_dir() {
                vec![b.join("model_config.yaml")]
            } else {
                // (Lexically: the checkpoint itself need not be here.)
                let parent = b.parent().unwrap_or(Path::new("."));
                let up = parent.parent().unwrap_or(Path::new("."));
                vec![
                    up.join("model_config.yaml"),
                    parent.join("model_config.yaml"),
                ]
            };
            for c in cands {
                if c.is_file() {
                    return Ok(c);
                }
                tried.push(c);
            }
        }
    }
    let local = dir.join("model_config.yaml");
    if local.is_file() {
        return Ok(local);
    }
    tried.push(local);
    anyhow::bail!(
        "the target model's config was not found (pretrained_model_name: {name:?}; looked at {}). spdlab reads nothing from model hubs or W&B: point pretrained_model_name at a local copy of the pretraining run (model_config.yaml and checkpoints/), or put its model_config.yaml in the run folder",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The target spec of a language-model run: the model config from its pretraining run (see
/// [`lm_model_config_path`]), the family from `pretrained_model_class` when the config has
/// no `model_type`, and the sequence length from `task_config.max_seq_len`.
fn lm_target_spec(
    raw: &Value,
    dir: &Path,
    named: &[(String, Tensor)],
) -> anyhow::Result<TargetSpec> {
    let class = raw
        .get("pretrained_model_class")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let family = class.rsplit('.').next().unwrap_or("");
    if !["LlamaSimpleMLP", "LlamaSimple", "GPT2Simple"].contains(&family) {
        anyhow::bail!(
            "pretrained_model_class '{class}' is not supported (spdlab implements spd.pretrain.models LlamaSimpleMLP, LlamaSimple and GPT2Simple)"
        );
    }
    let p = lm_model_config_path(raw, dir)?;
    let mut v = read_yaml(&p)?;
    if let Value::Object(m) = &mut v {
        m.entry("model_type".to_string())
            .or_insert_with(|| Value::String(family.to_string()));
    }
    let model: crate::model::lm::LmConfig = serde_json::from_value(v)
        .map_err(|e| anyhow::anyhow!("{}: not a reference model config: {e}", p.display()))?;
    let seq_len = raw
        .get("task_config")
        .and_then(|t| t.get("max_seq_len"))
        .and_then(|v| v.as_u64())
        .unwrap_or(512) as usize;
    let spec = TargetSpec::Lm { model, seq_len };
    spec.check_limits()
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    if let TargetSpec::Lm { model, .. } = &spec
        && let Some((_, t)) = named.iter().find(|(k, _)| k == "wte.weight")
        && t.dims() != [model.vocab_size, model.n_embd]
    {
        anyhow::bail!(
            "{}: vocab_size {} and n_embd {} need wte.weight of shape [{}, {}], the checkpoint has {:?}",
            p.display(),
            model.vocab_size,
            model.n_embd,
            model.vocab_size,
            model.n_embd,
            t.dims()
        );
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_migration() {
        assert_eq!(
            migrate_key("_gates.linear1.layers.0.W"),
            "_ci_fns.linear1.layers.0.W"
        );
        assert_eq!(
            migrate_key("patched_model.linear1.weight"),
            "target_model.linear1.weight"
        );
        assert_eq!(
            migrate_key("patched_model.layers.0.mlp_in.original.weight"),
            "target_model.layers.0.mlp_in.weight"
        );
        assert_eq!(
            migrate_key("patched_model.layers.0.mlp_in.components.U"),
            "_components.layers-0-mlp_in.U"
        );
    }

    #[test]
    fn checkpoint_names() {
        assert_eq!(checkpoint_step("model_10000.pth"), Some(10000));
        assert_eq!(checkpoint_step("tms.pth"), None);
        assert_eq!(checkpoint_step("model_final.pth"), None);
    }
}
