//! SPD configuration, using the reference implementation's field names so that a researcher's
//! goodfire-ai/spd configs carry over (`C`, `ci_fn_type`, `ci_fn_hidden_dims`, `sigmoid_type`,
//! `pnorm`, `coeff`, ...). Unknown enum values are rejected with a message naming the field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::TargetSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CiFnType {
    Mlp,
    VectorMlp,
    SharedMlp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigmoidType {
    /// Lower-leaky hard sigmoid for masks (custom backward), upper-leaky for the minimality loss.
    LeakyHard,
    Hard,
    UpperLeakyHard,
    Normal,
    SwishHard,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    Continuous,
    Binomial,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleFn {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputLossType {
    Mse,
    /// KL(target ‖ decomposition) of the softmax over the last dimension, per row (position),
    /// averaged over rows (the reference's choice for language and induction models).
    Kl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataGenerationType {
    AtLeastZeroActive,
    ExactlyOneActive,
    ExactlyTwoActive,
    ExactlyThreeActive,
    ExactlyFourActive,
    ExactlyFiveActive,
}

impl DataGenerationType {
    /// Number of active features for the `exactly_n_active` kinds.
    pub fn exactly_n(self) -> Option<usize> {
        match self {
            DataGenerationType::AtLeastZeroActive => None,
            DataGenerationType::ExactlyOneActive => Some(1),
            DataGenerationType::ExactlyTwoActive => Some(2),
            DataGenerationType::ExactlyThreeActive => Some(3),
            DataGenerationType::ExactlyFourActive => Some(4),
            DataGenerationType::ExactlyFiveActive => Some(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleInfo {
    pub module_pattern: String,
    #[serde(rename = "C")]
    pub c: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub start_val: f64,
    #[serde(default)]
    pub warmup_pct: f64,
    #[serde(default = "one")]
    pub final_val_frac: f64,
    #[serde(default = "default_fn_type")]
    pub fn_type: ScheduleFn,
}

fn one() -> f64 {
    1.0
}
fn default_fn_type() -> ScheduleFn {
    ScheduleFn::Constant
}

/// A loss entry: a coefficient and the term it weighs. `coeff: None` means evaluated and
/// logged but not trained on. Serialised flat, as the reference writes it:
/// `{"classname": "...", "coeff": ..., <the term's parameters>}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    #[serde(flatten)]
    pub kind: LossKind,
    pub coeff: Option<f64>,
}

/// The loss terms (the reference's `classname`s) and their parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "classname")]
pub enum LossKind {
    ImportanceMinimalityLoss {
        pnorm: f64,
        #[serde(default)]
        beta: f64,
        #[serde(default = "one")]
        p_anneal_start_frac: f64,
        #[serde(default)]
        p_anneal_final_p: Option<f64>,
        #[serde(default = "one")]
        p_anneal_end_frac: f64,
        #[serde(default = "default_eps")]
        eps: f64,
        /// spdlab extension: a weight on the term of modules matching a pattern (first match
        /// wins; others weigh 1). Empty in reference configs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        module_weights: Vec<ModuleWeight>,
    },
    StochasticReconLoss,
    StochasticReconLayerwiseLoss,
    FaithfulnessLoss,
    #[serde(rename = "CIMaskedReconLoss")]
    CiMaskedReconLoss,
    #[serde(rename = "CIMaskedReconLayerwiseLoss")]
    CiMaskedReconLayerwiseLoss,
    UnmaskedReconLoss,
    /// Stochastic recon where each row replaces a random subset of modules (the others run
    /// the target weights).
    StochasticReconSubsetLoss {
        #[serde(default)]
        routing: Routing,
    },
    /// Adversarial (PGD) masks on all modules.
    #[serde(rename = "PGDReconLoss")]
    PgdReconLoss {
        #[serde(flatten)]
        pgd: PgdConfig,
    },
    /// Adversarial masks with subset routing.
    #[serde(rename = "PGDReconSubsetLoss")]
    PgdReconSubsetLoss {
        #[serde(flatten)]
        pgd: PgdConfig,
        #[serde(default)]
        routing: Routing,
    },
}

/// Which modules a row routes through its components (the others use the target weights).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Routing {
    /// k ~ U{1..n_modules}, then a uniformly random k-subset of modules, per row.
    #[default]
    UniformKSubset,
    /// Each module independently with probability p, per row.
    StaticProbability { p: f64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PgdInit {
    #[default]
    Random,
    Ones,
    Zeroes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskScope {
    UniquePerDatapoint,
    #[default]
    SharedAcrossBatch,
}

/// Projected-gradient-ascent adversarial masks: sources a ∈ [0,1]^(C+1) per module,
/// a ← clamp(a + step_size·sign(∇ₐ loss), 0, 1) for n_steps, loss at the final a.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PgdConfig {
    #[serde(default)]
    pub init: PgdInit,
    pub step_size: f64,
    pub n_steps: usize,
    #[serde(default)]
    pub mask_scope: MaskScope,
}

fn default_eps() -> f64 {
    1e-12
}

impl LossConfig {
    pub fn new(kind: LossKind, coeff: Option<f64>) -> Self {
        LossConfig { kind, coeff }
    }
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }
    pub fn coeff(&self) -> Option<f64> {
        self.coeff
    }
}

impl LossKind {
    pub fn name(&self) -> &'static str {
        match self {
            LossKind::ImportanceMinimalityLoss { .. } => "ImportanceMinimalityLoss",
            LossKind::StochasticReconLoss => "StochasticReconLoss",
            LossKind::StochasticReconLayerwiseLoss => "StochasticReconLayerwiseLoss",
            LossKind::FaithfulnessLoss => "FaithfulnessLoss",
            LossKind::CiMaskedReconLoss => "CIMaskedReconLoss",
            LossKind::CiMaskedReconLayerwiseLoss => "CIMaskedReconLayerwiseLoss",
            LossKind::UnmaskedReconLoss => "UnmaskedReconLoss",
            LossKind::StochasticReconSubsetLoss { .. } => "StochasticReconSubsetLoss",
            LossKind::PgdReconLoss { .. } => "PGDReconLoss",
            LossKind::PgdReconSubsetLoss { .. } => "PGDReconSubsetLoss",
        }
    }
}

/// Expected CI pattern of one layer on single-feature inputs (the reference's IdentityCIError).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityCiPattern {
    pub layer_pattern: String,
    pub n_features: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseCiPattern {
    pub layer_pattern: String,
    pub k: usize,
}

/// The task: the data distribution SPD trains on (toy sparse-feature data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskConfig {
    #[serde(default = "default_task_name")]
    pub task_name: String,
    /// Sparse-feature tasks: the probability of each feature being active (not used by the
    /// induction task).
    #[serde(default)]
    pub feature_probability: f64,
    #[serde(default = "default_data_gen")]
    pub data_generation_type: DataGenerationType,
    /// Feature value range; `None` = the task's default ((0,1) for TMS, (-1,1) for resid_mlp).
    #[serde(default)]
    pub value_range: Option<(f32, f32)>,
    /// Induction task: the window of positions the (S, M) pair is planted in (None: the
    /// sequence length − 3, as the reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_window: Option<usize>,
    /// Language models: the text (a JSONL file, or a folder of `<split>.jsonl` files), as the
    /// reference's `dataset_name` (local only), its text field and the training split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_data_split: Option<String>,
}

fn default_task_name() -> String {
    "tms".into()
}
fn default_data_gen() -> DataGenerationType {
    DataGenerationType::AtLeastZeroActive
}

/// A per-module weight of the importance-minimality term (spdlab extension).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleWeight {
    pub module_pattern: String,
    pub weight: f64,
}

/// The weight of `module` under `weights` (first matching pattern; 1 when none matches).
pub fn module_weight(weights: &[ModuleWeight], module: &str) -> f64 {
    weights
        .iter()
        .find(|w| fnmatch(&w.module_pattern, module))
        .map_or(1.0, |w| w.weight)
}

/// A per-module CI-function type (see [`SpdConfig::ci_fn_type_overrides`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CiFnOverride {
    pub module_pattern: String,
    pub ci_fn_type: CiFnType,
}

impl SpdConfig {
    /// The CI-function type of a module.
    pub fn ci_fn_type_of(&self, module: &str) -> CiFnType {
        self.ci_fn_type_overrides
            .iter()
            .find(|o| fnmatch(&o.module_pattern, module))
            .map_or(self.ci_fn_type, |o| o.ci_fn_type)
    }
}

/// The full SPD configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpdConfig {
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_n_mask")]
    pub n_mask_samples: usize,
    #[serde(default = "default_ci_fn_type")]
    pub ci_fn_type: CiFnType,
    /// spdlab extension: a different CI-function type for modules matching a pattern (first
    /// match wins; others use `ci_fn_type`). Empty in reference configs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ci_fn_type_overrides: Vec<CiFnOverride>,
    #[serde(default = "default_hidden")]
    pub ci_fn_hidden_dims: Vec<usize>,
    #[serde(default = "default_sampling")]
    pub sampling: Sampling,
    #[serde(default = "default_sigmoid")]
    pub sigmoid_type: SigmoidType,
    pub module_info: Vec<ModuleInfo>,
    #[serde(default = "default_true")]
    pub use_delta_component: bool,
    pub loss_metric_configs: Vec<LossConfig>,
    #[serde(default = "default_output_loss")]
    pub output_loss_type: OutputLossType,
    pub lr_schedule: ScheduleConfig,
    pub steps: usize,
    pub batch_size: usize,
    #[serde(default)]
    pub grad_clip_norm_components: Option<f64>,
    #[serde(default)]
    pub grad_clip_norm_ci_fns: Option<f64>,
    #[serde(default)]
    pub faithfulness_warmup_steps: usize,
    #[serde(default = "default_fw_lr")]
    pub faithfulness_warmup_lr: f64,
    #[serde(default)]
    pub faithfulness_warmup_weight_decay: f64,
    #[serde(default = "default_log_freq")]
    pub train_log_freq: usize,
    #[serde(default = "default_eval_freq")]
    pub eval_freq: usize,
    #[serde(default = "default_eval_batch")]
    pub eval_batch_size: usize,
    #[serde(default = "default_n_eval_steps")]
    pub n_eval_steps: usize,
    #[serde(default = "default_alive")]
    pub ci_alive_threshold: f64,
    /// Language models: the tokenizer (a local `tokenizer.json` or its folder), as the
    /// reference's `tokenizer_name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_name: Option<String>,
    /// Layers expected to be identity-like (one subcomponent per feature) on single-feature inputs.
    #[serde(default)]
    pub identity_ci: Vec<IdentityCiPattern>,
    /// Layers expected to be dense (k subcomponents active for every feature).
    #[serde(default)]
    pub dense_ci: Vec<DenseCiPattern>,
    pub task_config: TaskConfig,
}

fn default_n_mask() -> usize {
    1
}
fn default_ci_fn_type() -> CiFnType {
    CiFnType::VectorMlp
}
fn default_hidden() -> Vec<usize> {
    vec![8]
}
fn default_sampling() -> Sampling {
    Sampling::Continuous
}
fn default_sigmoid() -> SigmoidType {
    SigmoidType::LeakyHard
}
fn default_true() -> bool {
    true
}
fn default_output_loss() -> OutputLossType {
    OutputLossType::Mse
}
fn default_fw_lr() -> f64 {
    1e-3
}
fn default_log_freq() -> usize {
    100
}
fn default_eval_freq() -> usize {
    1000
}
fn default_eval_batch() -> usize {
    4096
}
fn default_n_eval_steps() -> usize {
    10
}
fn default_alive() -> f64 {
    0.1
}

impl SpdConfig {
    /// Checks the values serde cannot: returns a list of problems, empty if fine.
    pub fn validate(&self) -> Result<(), String> {
        use crate::limits::{self, check, check_positive};
        let mut errs: Vec<String> = vec![];
        if self.module_info.is_empty() {
            errs.push("module_info is empty".to_string());
        }
        let lim = |errs: &mut Vec<String>, r: Result<(), limits::LimitError>| {
            if let Err(e) = r {
                errs.push(e.0);
            }
        };
        lim(
            &mut errs,
            check(
                "module_info (number of entries)",
                self.module_info.len(),
                limits::MAX_MODULES,
            ),
        );
        for m in &self.module_info {
            lim(
                &mut errs,
                check_positive(
                    &format!("module_info '{}': C", m.module_pattern),
                    m.c,
                    limits::MAX_C,
                ),
            );
        }
        lim(
            &mut errs,
            check(
                "ci_fn_hidden_dims (number of layers)",
                self.ci_fn_hidden_dims.len(),
                limits::MAX_CI_HIDDEN_LAYERS,
            ),
        );
        for &h in &self.ci_fn_hidden_dims {
            lim(
                &mut errs,
                check("ci_fn_hidden_dims entry", h, limits::MAX_CI_HIDDEN),
            );
        }
        lim(
            &mut errs,
            check_positive("batch_size", self.batch_size, limits::MAX_BATCH),
        );
        lim(
            &mut errs,
            check_positive("eval_batch_size", self.eval_batch_size, limits::MAX_BATCH),
        );
        lim(
            &mut errs,
            check_positive("steps", self.steps, limits::MAX_STEPS),
        );
        lim(
            &mut errs,
            check(
                "faithfulness_warmup_steps",
                self.faithfulness_warmup_steps,
                limits::MAX_WARMUP_STEPS,
            ),
        );
        lim(
            &mut errs,
            check_positive("n_eval_steps", self.n_eval_steps, limits::MAX_EVAL_STEPS),
        );
        lim(
            &mut errs,
            check_positive(
                "n_mask_samples",
                self.n_mask_samples,
                limits::MAX_MASK_SAMPLES,
            ),
        );
        for l in &self.loss_metric_configs {
            if let LossKind::PgdReconLoss { pgd, .. } | LossKind::PgdReconSubsetLoss { pgd, .. } =
                &l.kind
            {
                lim(
                    &mut errs,
                    check(
                        &format!("{}: n_steps", l.name()),
                        pgd.n_steps,
                        limits::MAX_PGD_STEPS,
                    ),
                );
                if !(pgd.step_size.is_finite() && pgd.step_size >= 0.0) {
                    errs.push(format!(
                        "{}: step_size must be a finite number >= 0, got {}",
                        l.name(),
                        pgd.step_size
                    ));
                }
            }
        }
        for (field, v) in [
            ("faithfulness_warmup_lr", self.faithfulness_warmup_lr),
            (
                "faithfulness_warmup_weight_decay",
                self.faithfulness_warmup_weight_decay,
            ),
            ("ci_alive_threshold", self.ci_alive_threshold),
        ] {
            if !v.is_finite() {
                errs.push(format!("{field} must be finite, got {v}"));
            }
        }
        for (field, v) in [
            ("grad_clip_norm_components", self.grad_clip_norm_components),
            ("grad_clip_norm_ci_fns", self.grad_clip_norm_ci_fns),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                errs.push(format!("{field} must be a finite number > 0, got {v}"));
            }
        }
        if let Some((lo, hi)) = self.task_config.value_range
            && !(lo.is_finite() && hi.is_finite() && lo <= hi)
        {
            errs.push(format!(
                "task_config.value_range must be finite with low <= high, got ({lo}, {hi})"
            ));
        }
        if std::iter::once(self.ci_fn_type)
            .chain(self.ci_fn_type_overrides.iter().map(|o| o.ci_fn_type))
            .any(|t| matches!(t, CiFnType::Mlp | CiFnType::VectorMlp))
            && self.ci_fn_hidden_dims.is_empty()
        {
            errs.push(format!(
                "ci_fn_type {:?} needs at least one hidden layer in ci_fn_hidden_dims",
                self.ci_fn_type
            ));
        }
        if self.ci_fn_hidden_dims.contains(&0) {
            errs.push("ci_fn_hidden_dims entries must be > 0".into());
        }
        let s = &self.lr_schedule;
        if !(s.start_val.is_finite() && s.start_val >= 0.0) {
            errs.push("lr_schedule.start_val must be a finite non-negative number".into());
        }
        if !(0.0..=1.0).contains(&s.warmup_pct) {
            errs.push("lr_schedule.warmup_pct must be in [0, 1]".into());
        }
        if s.fn_type == ScheduleFn::Constant && s.final_val_frac != 1.0 {
            errs.push("lr_schedule: a constant schedule needs final_val_frac = 1".into());
        }
        if !(0.0..=1.0).contains(&self.task_config.feature_probability) {
            errs.push("task_config.feature_probability must be in [0, 1]".into());
        }
        if self.loss_metric_configs.iter().all(|l| l.coeff().is_none()) {
            errs.push("loss_metric_configs has no loss with a coefficient".into());
        }
        for l in &self.loss_metric_configs {
            if let Some(c) = l.coeff()
                && !c.is_finite()
            {
                errs.push(format!("{}: coeff must be finite", l.name()));
            }
            if let LossKind::ImportanceMinimalityLoss {
                pnorm,
                module_weights,
                ..
            } = &l.kind
            {
                if !(pnorm.is_finite() && *pnorm > 0.0) {
                    errs.push("ImportanceMinimalityLoss: pnorm must be finite and > 0".into());
                }
                for w in module_weights {
                    if !(w.weight.is_finite() && w.weight >= 0.0) {
                        errs.push(format!(
                            "ImportanceMinimalityLoss: module weight of '{}' must be finite and >= 0, got {}",
                            w.module_pattern, w.weight
                        ));
                    }
                    if !self.module_info.iter().any(|m| {
                        fnmatch(&w.module_pattern, &m.module_pattern)
                            || fnmatch(&m.module_pattern, &w.module_pattern)
                    }) {
                        errs.push(format!(
                            "ImportanceMinimalityLoss: module weight pattern '{}' matches no decomposed module",
                            w.module_pattern
                        ));
                    }
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }

    pub fn loss(&self, name: &str) -> Option<&LossConfig> {
        self.loss_metric_configs.iter().find(|l| l.name() == name)
    }
}

/// A complete run description: the SPD config plus the target model it decomposes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    #[serde(flatten)]
    pub spd: SpdConfig,
    /// The target model's architecture (weights come from the preset's asset or the file).
    #[serde(default)]
    pub target: Option<TargetSpec>,
}

/// Finds fields of `raw` (a config as written) that the typed config does not know: `typed`
/// is the parsed config serialised again, which holds every known field the input gave. An
/// unknown field is an error naming it (with its path) and the closest known name.
pub fn check_unknown_fields(raw: &Value, typed: &Value) -> Result<(), String> {
    fn walk(raw: &Value, typed: &Value, path: &str) -> Result<(), String> {
        match (raw, typed) {
            (Value::Object(r), Value::Object(t)) => {
                for (k, v) in r {
                    let here = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match t.get(k) {
                        Some(tv) => walk(v, tv, &here)?,
                        // Empty lists and nulls serialise to nothing where they are the default.
                        None if v.is_null() || v.as_array().is_some_and(|a| a.is_empty()) => {}
                        None => {
                            let mut msg = format!("unknown field '{here}'");
                            if let Some(best) = closest(k, t.keys()) {
                                msg.push_str(&format!(" (did you mean '{best}'?)"));
                            }
                            return Err(msg);
                        }
                    }
                }
                Ok(())
            }
            (Value::Array(r), Value::Array(t)) if r.len() == t.len() => {
                for (i, (a, b)) in r.iter().zip(t).enumerate() {
                    walk(a, b, &format!("{path}[{i}]"))?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    walk(raw, typed, "")
}

/// The candidate nearest to `name` by edit distance, if reasonably near.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a String>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 2).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.as_str())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// fnmatch-style match of a module path (`*` any run, `?` any char), as the reference uses.
pub fn fnmatch(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let (mut star, mut mark) = (None::<usize>, 0usize);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            pi += 1;
            mark = ni;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnmatch_patterns() {
        assert!(fnmatch("linear1", "linear1"));
        assert!(!fnmatch("linear1", "linear12"));
        assert!(fnmatch("layers.*.mlp_in", "layers.0.mlp_in"));
        assert!(fnmatch("layers.*.mlp_in", "layers.12.mlp_in"));
        assert!(!fnmatch("layers.*.mlp_in", "layers.0.mlp_out"));
        assert!(fnmatch("hidden_layers.?", "hidden_layers.0"));
        assert!(fnmatch("*", "anything"));
    }

    #[test]
    fn loss_entries_are_coeff_plus_kind_serialised_flat() {
        for raw in [
            r#"{"classname":"PGDReconLoss","coeff":null,"init":"ones","step_size":0.1,"n_steps":2,"mask_scope":"unique_per_datapoint"}"#,
            r#"{"classname":"StochasticReconLoss","coeff":2.0}"#,
            r#"{"classname":"ImportanceMinimalityLoss","coeff":0.003,"pnorm":2.0,"beta":0.5,"p_anneal_start_frac":0.0,"p_anneal_final_p":0.5,"p_anneal_end_frac":1.0,"eps":1e-12}"#,
        ] {
            let v: Value = serde_json::from_str(raw).unwrap();
            let l: LossConfig = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(serde_json::to_value(&l).unwrap(), v, "{raw}");
        }
        let l: LossConfig = serde_json::from_str(
            r#"{"classname":"PGDReconLoss","coeff":null,"step_size":0.1,"n_steps":2}"#,
        )
        .unwrap();
        assert_eq!(l.coeff, None);
        assert!(matches!(l.kind, LossKind::PgdReconLoss { ref pgd } if pgd.n_steps == 2));
        let l: LossConfig =
            serde_json::from_str(r#"{"classname":"UnmaskedReconLoss","coeff":1}"#).unwrap();
        assert_eq!(l, LossConfig::new(LossKind::UnmaskedReconLoss, Some(1.0)));
        assert_eq!(l.name(), "UnmaskedReconLoss");
    }

    #[test]
    fn unknown_values_are_rejected() {
        let bad = r#"{"classname":"StochasticReconLoss","coeff":1.0}"#;
        assert!(serde_json::from_str::<LossConfig>(bad).is_ok());
        let bad = r#"{"classname":"NoSuchLoss","coeff":1.0}"#;
        let e = serde_json::from_str::<LossConfig>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NoSuchLoss"), "{e}");
        let e = serde_json::from_str::<SigmoidType>("\"wobbly\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wobbly"), "{e}");
    }

    #[test]
    fn unknown_fields_are_named_with_the_closest_known_name() {
        let mut v = serde_json::to_value(crate::presets::spd_config("tms-5-2").unwrap()).unwrap();
        let typed = v.clone();
        assert!(check_unknown_fields(&v, &typed).is_ok());
        v["batch_sizee"] = 16.into();
        let e = check_unknown_fields(&v, &typed).unwrap_err();
        assert_eq!(
            e,
            "unknown field 'batch_sizee' (did you mean 'batch_size'?)"
        );
        let mut v = typed.clone();
        v["loss_metric_configs"][0]["pnrom"] = 2.0.into();
        let e = check_unknown_fields(&v, &typed).unwrap_err();
        assert!(
            e.contains("'loss_metric_configs[0].pnrom'") && e.contains("'pnorm'"),
            "{e}"
        );
        let mut v = typed.clone();
        v["zzzzzzzzzzzz"] = 1.into();
        assert_eq!(
            check_unknown_fields(&v, &typed).unwrap_err(),
            "unknown field 'zzzzzzzzzzzz'"
        );
    }

    #[test]
    fn limits_are_checked_with_the_field_named() {
        let mut cfg = crate::presets::spd_config("tms-5-2").unwrap();
        cfg.module_info[0].c = 1_000_000_000_000;
        cfg.ci_fn_hidden_dims = vec![1_000_000_000];
        cfg.batch_size = 1_000_000_000;
        cfg.eval_batch_size = 1_000_000_000_000;
        cfg.n_eval_steps = 1_000_000_000_000;
        cfg.faithfulness_warmup_steps = 1_000_000_000_000;
        cfg.steps = 0;
        let e = cfg.validate().unwrap_err();
        for want in [
            "module_info 'linear1': C = 1000000000000 is above spdlab's limit of 131072",
            "ci_fn_hidden_dims entry = 1000000000",
            "batch_size = 1000000000",
            "eval_batch_size = 1000000000000",
            "n_eval_steps = 1000000000000",
            "faithfulness_warmup_steps = 1000000000000",
            "steps must be at least 1",
        ] {
            assert!(e.contains(want), "{want} not in {e}");
        }
    }

    #[test]
    fn minimality_module_weights() {
        let ws = vec![
            ModuleWeight {
                module_pattern: "embed".into(),
                weight: 10.0,
            },
            ModuleWeight {
                module_pattern: "layers.*".into(),
                weight: 0.5,
            },
        ];
        assert_eq!(module_weight(&ws, "embed"), 10.0);
        assert_eq!(module_weight(&ws, "layers.0.mlp_in"), 0.5);
        assert_eq!(module_weight(&ws, "unembed"), 1.0);
        // Reference configs (no weights) serialise without the field.
        let plain = r#"{"classname":"ImportanceMinimalityLoss","coeff":0.003,"pnorm":1.0}"#;
        let l: LossConfig = serde_json::from_str(plain).unwrap();
        assert!(
            !serde_json::to_string(&l)
                .unwrap()
                .contains("module_weights")
        );
        // Bad weights and patterns that match no module are named.
        let mut cfg = crate::presets::spd_config("days").unwrap();
        if let LossKind::ImportanceMinimalityLoss { module_weights, .. } =
            &mut cfg.loss_metric_configs[0].kind
        {
            module_weights.push(ModuleWeight {
                module_pattern: "embd".into(),
                weight: 2.0,
            });
            module_weights.push(ModuleWeight {
                module_pattern: "mlp_in".into(),
                weight: f64::NAN,
            });
        } else {
            panic!("days preset: first loss is not the minimality loss");
        }
        let e = cfg.validate().unwrap_err();
        assert!(e.contains("'embd' matches no decomposed module"), "{e}");
        assert!(e.contains("module weight of 'mlp_in'"), "{e}");
    }
}
