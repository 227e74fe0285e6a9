//! Setting up and running SPD jobs (shared by the CLI, the tests and the GUI worker).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::io::spdlab_file::{self, FileExtras};
use crate::metrics::{EvalReport, evaluate};
use crate::model::{TargetModel, TargetSpec};
use crate::presets;
use crate::spd::config::SpdConfig;
use crate::spd::trainer::{StepRecord, Trainer};

/// Picks the compute device by name (`cpu` or `cuda`).
pub fn device(name: &str) -> anyhow::Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).map_err(|e| {
            anyhow::anyhow!(
                "cannot use cuda: {}",
                e.to_string().lines().next().unwrap_or("unknown error")
            )
        }),
        other => anyhow::bail!("unknown device '{other}' (use cpu or cuda)"),
    }
}

/// A config file: the reference's SPD fields plus where the target comes from.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigFile {
    #[serde(flatten)]
    pub spd: SpdConfig,
    /// Take the target (architecture and weights) of this preset.
    #[serde(default)]
    pub preset: Option<String>,
    /// Or: the target architecture ...
    #[serde(default)]
    pub target: Option<TargetSpec>,
    /// ... and its weights (safetensors with reference key names), relative to the config file.
    #[serde(default)]
    pub target_path: Option<PathBuf>,
}

/// Loads a JSON config file and its target.
pub fn load_config_file(
    path: &Path,
    dev: &Device,
) -> anyhow::Result<(SpdConfig, TargetModel, Option<String>)> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let cf: ConfigFile = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid config: {e}", path.display()))?;
    // A misspelt field would otherwise silently take its default (`batch_sizee: 16` trains
    // with 4096).
    let raw: serde_json::Value = serde_json::from_str(&text)?;
    crate::spd::config::check_unknown_fields(&raw, &serde_json::to_value(&cf)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    cf.spd
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: invalid config: {e}", path.display()))?;
    let target = match (&cf.preset, &cf.target, &cf.target_path) {
        (Some(p), None, None) => presets::target_model(p, dev)?,
        (None, Some(spec @ crate::model::TargetSpec::Lm { .. }), Some(tp)) => {
            // A language model: a reference pretraining checkpoint (`.pt`) or safetensors.
            let tp = if tp.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(tp)
            } else {
                tp.clone()
            };
            let named: Vec<(String, candle_core::Tensor)> =
                if tp.extension().is_some_and(|e| e == "safetensors") {
                    let bytes = std::fs::read(&tp).map_err(|e| {
                        anyhow::anyhow!("{}: cannot read target: {e}", tp.display())
                    })?;
                    crate::io::spdlab_file::read_tensors(&bytes, dev)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", tp.display()))?
                } else {
                    crate::io::pth::read_pth(&tp)?
                        .into_iter()
                        .map(|t| Ok((t.name, candle_core::Tensor::from_vec(t.data, t.shape, dev)?)))
                        .collect::<anyhow::Result<_>>()?
                };
            TargetModel::new(spec.clone(), named, dev)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tp.display()))?
        }
        (None, Some(spec), Some(tp)) => {
            let tp = if tp.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(tp)
            } else {
                tp.clone()
            };
            let bytes = std::fs::read(&tp)
                .map_err(|e| anyhow::anyhow!("{}: cannot read target: {e}", tp.display()))?;
            crate::io::target_file::target_from_safetensors_bytes(&bytes, spec, dev)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tp.display()))?
        }
        _ => anyhow::bail!(
            "{}: give either \"preset\" (use that preset's target) or both \"target\" (architecture) and \"target_path\" (weights)",
            path.display()
        ),
    };
    // Text and tokenizer paths are relative to the config's folder.
    let mut spd = cf.spd;
    let base = path.parent().unwrap_or(Path::new("."));
    let abs = |s: &mut Option<String>| {
        if let Some(v) = s.as_mut()
            && Path::new(v.as_str()).is_relative()
            && v != crate::tinylm::BUILTIN
        {
            *v = base.join(v.as_str()).display().to_string();
        }
    };
    abs(&mut spd.tokenizer_name);
    abs(&mut spd.task_config.dataset_name);
    Ok((spd, target, cf.preset))
}

/// The target weights file a JSON config names (resolved against the config's folder).
pub fn config_target_path(path: &Path) -> anyhow::Result<Option<PathBuf>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid config: {e}", path.display()))?;
    Ok(v.get("target_path").and_then(|t| t.as_str()).map(|t| {
        let t = Path::new(t);
        if t.is_relative() {
            path.parent().unwrap_or(Path::new(".")).join(t)
        } else {
            t.to_path_buf()
        }
    }))
}

/// Result of a finished training run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub preset: Option<String>,
    pub steps: usize,
    pub seconds: f64,
    pub steps_per_second: f64,
    pub losses: std::collections::BTreeMap<String, f64>,
    pub l0: std::collections::BTreeMap<String, f64>,
    pub mmcs: std::collections::BTreeMap<String, f64>,
    pub ml2r: std::collections::BTreeMap<String, f64>,
    pub target_solution_error: Option<crate::metrics::TargetSolutionError>,
    /// TMS and residual-MLP targets: per module, how subcomponents answer single features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_response:
        Option<std::collections::BTreeMap<String, crate::metrics::FeatureResponse>>,
    /// Sweep points of targets with a known answer: the clustering (default options) scored
    /// against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clustering: Option<ClusteringScore>,
    /// Language models: the reference's CEandKLLosses keys (`ce_target`,
    /// `ce_difference_ci_masked`, `kl_ci_masked`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce_kl: Option<std::collections::BTreeMap<String, f64>>,
    /// tiny-lm runs: the planted rules' accuracies (target, CI-masked) on held-out stories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<crate::tinylm::DecompositionRules>,
    pub out: Option<PathBuf>,
}

/// A clustering against the known answer: at the minimum description length and at the best
/// cut of the merge history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusteringScore {
    pub k: usize,
    pub purity: f64,
    pub ari: f64,
    pub best_k: usize,
    pub best_ari: f64,
}

impl ClusteringScore {
    /// Clusters `tr` with the default options and scores it, where the target's answer is
    /// known (None otherwise).
    pub fn of(tr: &Trainer) -> anyhow::Result<Option<ClusteringScore>> {
        if crate::cluster::score::ground_truth(&tr.model)?.is_none() {
            return Ok(None);
        }
        let opts = crate::cluster::ClusterOptions::default();
        let h = crate::cluster::cluster(tr, &opts)?;
        let res = crate::cluster::summarize(&h, &opts, h.best_k()).with_score(&tr.model)?;
        let Some(sc) = &res.score else {
            return Ok(None);
        };
        Ok(match (sc.at(res.k), sc.best()) {
            (Some((k, purity, ari)), Some((best_k, _, best_ari))) => Some(ClusteringScore {
                k,
                purity,
                ari,
                best_k,
                best_ari,
            }),
            _ => None,
        })
    }
}

impl TrainSummary {
    /// The summary of a run of `total` steps that trained from `start_step` in `secs`.
    pub fn new(
        report: &crate::metrics::EvalReport,
        preset: Option<String>,
        (total, start_step, secs): (usize, usize, f64),
        out: PathBuf,
    ) -> Self {
        let trained = (total + 1).saturating_sub(start_step);
        TrainSummary {
            preset,
            steps: total,
            seconds: secs,
            steps_per_second: trained as f64 / secs.max(1e-9),
            losses: report.losses.clone(),
            l0: report.l0.clone(),
            mmcs: report.mmcs.clone(),
            ml2r: report.ml2r.clone(),
            target_solution_error: report.target_solution_error.clone(),
            feature_response: report.feature_response.clone(),
            clustering: None,
            ce_kl: report.ce_kl.clone(),
            rules: None,
            out: Some(out),
        }
    }
}

/// Options of a training run.
pub struct RunOptions {
    /// Save a recovery file at this interval (None = never).
    pub autosave: Option<(PathBuf, Duration)>,
}

/// Runs warm-up (if not done) and all remaining steps; `on_step` sees every step record.
pub fn run_training(
    tr: &mut Trainer,
    extras: &mut FileExtras,
    opts: &RunOptions,
    mut on_step: impl FnMut(&Trainer, &StepRecord),
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    if !extras.warmup_done {
        tr.faithfulness_warmup()?;
        extras.warmup_done = true;
    }
    let mut last_save = Instant::now();
    while !tr.is_done() {
        let rec = tr.step()?;
        on_step(tr, &rec);
        if let Some((path, every)) = &opts.autosave
            && last_save.elapsed() >= *every
            && !tr.is_done()
        {
            spdlab_file::save(tr, extras, path)?;
            last_save = Instant::now();
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Final evaluation with the config's eval budget.
pub fn final_eval(tr: &mut Trainer) -> anyhow::Result<EvalReport> {
    let (n, b) = (tr.config.n_eval_steps, tr.config.eval_batch_size);
    evaluate(tr, n, b)
}

/// CI values and outputs on chosen inputs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CiReport {
    /// "lower_leaky" or "upper_leaky".
    pub ci_type: String,
    pub inputs: Vec<Vec<f32>>,
    /// Sequence models: tokens per input. Every per-row field below then has one row per
    /// position, row = input · seq_len + position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    /// Sequence models: KL(target ‖ CI-masked decomposition) per row (position), nats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kl_ci_masked: Vec<f32>,
    /// Module name → per input (per position for sequences), per subcomponent.
    pub ci: std::collections::BTreeMap<String, Vec<Vec<f32>>>,
    pub pre_sigmoid: std::collections::BTreeMap<String, Vec<Vec<f32>>>,
    pub component_acts: std::collections::BTreeMap<String, Vec<Vec<f32>>>,
    pub target_output: Vec<Vec<f32>>,
    /// All masks 1, no delta component.
    pub unmasked_output: Vec<Vec<f32>>,
    /// Masks = lower-leaky CI, no delta component.
    pub ci_masked_output: Vec<Vec<f32>>,
}

pub fn ci_report(
    model: &crate::spd::component_model::ComponentModel,
    x: &[Vec<f32>],
    upper: bool,
) -> anyhow::Result<CiReport> {
    let n = x.len();
    let nf = model.target.spec.n_features();
    let flat: Vec<f32> = x.iter().flatten().copied().collect();
    let xt = candle_core::Tensor::from_vec(flat, (n, nf), model.device())?;
    let fold = crate::model::Fold::new();
    let (target_out, inputs) = model.target.forward_with_inputs(&xt, &fold)?;
    let (ci, acts) = model.causal_importances(&inputs, None, &fold)?;
    let mut rep = CiReport {
        ci_type: if upper {
            "upper_leaky".into()
        } else {
            "lower_leaky".into()
        },
        inputs: x.to_vec(),
        seq_len: model.target.spec.is_sequence().then_some(nf),
        kl_ci_masked: vec![],
        ci: Default::default(),
        pre_sigmoid: Default::default(),
        component_acts: Default::default(),
        target_output: target_out.to_vec2()?,
        unmasked_output: vec![],
        ci_masked_output: vec![],
    };
    for (j, m) in model.modules.iter().enumerate() {
        let c = if upper { &ci[j].upper } else { &ci[j].lower };
        rep.ci.insert(m.name.clone(), c.to_vec2()?);
        rep.pre_sigmoid
            .insert(m.name.clone(), ci[j].pre_sigmoid.to_vec2()?);
        rep.component_acts
            .insert(m.name.clone(), acts[j].to_vec2()?);
    }
    let ones = crate::spd::trainer::unit_masks(&ci)?;
    rep.unmasked_output = model.forward_masked(&xt, &ones, &fold)?.to_vec2()?;
    let cim = crate::spd::trainer::ci_masks(&ci);
    let masked = model.forward_masked(&xt, &cim, &fold)?;
    if model.target.spec.is_sequence() {
        rep.kl_ci_masked = crate::spd::trainer::kl_rows(&masked, &target_out)?.to_vec1()?;
    }
    rep.ci_masked_output = masked.to_vec2()?;
    Ok(rep)
}
