//! The config editor: every field of the next run's SPD configuration, editable with inline
//! validation (a field that does not parse, or a config that `SpdConfig::validate` refuses,
//! shows its message and blocks the run); loss terms added, removed and tuned; load and save
//! as JSON (the `--config` format of the CLI).

use std::collections::BTreeMap;

use eframe::egui;

use crate::spd::config::{
    CiFnType, LossConfig, LossKind, MaskScope, PgdConfig, PgdInit, Routing, Sampling, ScheduleFn,
    SigmoidType, SpdConfig,
};

/// Edits a draft config. Numbers are typed as text (so `3e-4` works) and parsed on every
/// change; the draft only takes values that parse.
#[derive(Default)]
pub struct ConfigEditor {
    /// The config the next run starts with.
    pub draft: Option<SpdConfig>,
    /// Text of number fields, keyed by field path, while being edited.
    text: BTreeMap<String, String>,
    /// Fields whose text does not parse: path → message.
    field_errors: BTreeMap<String, String>,
}

/// Loss terms that can be added, with their default parameters.
fn new_loss(name: &str) -> Option<LossConfig> {
    let pgd = PgdConfig {
        init: PgdInit::Random,
        step_size: 0.1,
        n_steps: 1,
        mask_scope: MaskScope::SharedAcrossBatch,
    };
    let (kind, coeff) = match name {
        "ImportanceMinimalityLoss" => (
            LossKind::ImportanceMinimalityLoss {
                pnorm: 1.0,
                beta: 0.0,
                p_anneal_start_frac: 1.0,
                p_anneal_final_p: None,
                p_anneal_end_frac: 1.0,
                eps: 1e-12,
                module_weights: vec![],
            },
            1e-3,
        ),
        "StochasticReconLoss" => (LossKind::StochasticReconLoss, 1.0),
        "StochasticReconLayerwiseLoss" => (LossKind::StochasticReconLayerwiseLoss, 1.0),
        "FaithfulnessLoss" => (LossKind::FaithfulnessLoss, 1.0),
        "CIMaskedReconLoss" => (LossKind::CiMaskedReconLoss, 1.0),
        "CIMaskedReconLayerwiseLoss" => (LossKind::CiMaskedReconLayerwiseLoss, 1.0),
        "UnmaskedReconLoss" => (LossKind::UnmaskedReconLoss, 1.0),
        "StochasticReconSubsetLoss" => (
            LossKind::StochasticReconSubsetLoss {
                routing: Routing::UniformKSubset,
            },
            1.0,
        ),
        "PGDReconLoss" => (LossKind::PgdReconLoss { pgd }, 1.0),
        "PGDReconSubsetLoss" => (
            LossKind::PgdReconSubsetLoss {
                pgd,
                routing: Routing::UniformKSubset,
            },
            1.0,
        ),
        _ => return None,
    };
    Some(LossConfig::new(kind, Some(coeff)))
}

/// Gives `r` an accessible name (screen readers, UI tests).
fn named(ui: &egui::Ui, r: &egui::Response, label: &str) {
    ui.ctx()
        .accesskit_node_builder(r.id, |n| n.set_label(label.to_string()));
}

const LOSS_NAMES: [&str; 10] = [
    "ImportanceMinimalityLoss",
    "StochasticReconLoss",
    "StochasticReconLayerwiseLoss",
    "FaithfulnessLoss",
    "CIMaskedReconLoss",
    "CIMaskedReconLayerwiseLoss",
    "UnmaskedReconLoss",
    "StochasticReconSubsetLoss",
    "PGDReconLoss",
    "PGDReconSubsetLoss",
];

impl ConfigEditor {
    /// Starts editing `cfg` (forgets unfinished text).
    pub fn set(&mut self, cfg: SpdConfig) {
        self.draft = Some(cfg);
        self.text.clear();
        self.field_errors.clear();
    }

    /// Every problem: fields that do not parse, then the config's own validation.
    pub fn problems(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .field_errors
            .iter()
            .map(|(k, e)| format!("{k}: {e}"))
            .collect();
        v.extend(self.config_problems());
        v
    }

    /// What `SpdConfig::validate` finds in the draft (fields that parse but do not fit).
    fn config_problems(&self) -> Vec<String> {
        match self.draft.as_ref().map(SpdConfig::validate) {
            Some(Err(e)) => e.split("; ").map(str::to_string).collect(),
            _ => vec![],
        }
    }

    /// The draft when it is valid.
    pub fn valid(&self) -> Option<&SpdConfig> {
        self.problems()
            .is_empty()
            .then_some(self.draft.as_ref())
            .flatten()
    }

    /// Reads a config JSON file (the CLI's `--config` format; a custom target is ignored).
    /// Returns the preset the file names, if it names one.
    pub fn load_json(&mut self, path: &std::path::Path) -> Result<Option<String>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let cf: crate::runner::ConfigFile =
            serde_json::from_value(raw.clone()).map_err(|e| format!("{}: {e}", path.display()))?;
        let typed = serde_json::to_value(&cf).map_err(|e| e.to_string())?;
        crate::spd::config::check_unknown_fields(&raw, &typed)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(p) = &cf.preset {
            crate::presets::find(p).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        self.set(cf.spd);
        Ok(cf.preset)
    }

    /// Writes the draft as config JSON (with `preset` so `spdlab train --config` runs it).
    pub fn save_json(&self, path: &std::path::Path, preset: &str) -> Result<(), String> {
        let Some(d) = &self.draft else {
            return Err("no config to save".into());
        };
        let mut v = serde_json::to_value(d).map_err(|e| e.to_string())?;
        v["preset"] = serde_json::Value::String(preset.to_string());
        let text = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        crate::io::atomic::write_atomic(path, text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A number field typed as text: parsed on every change; an unparsable or out-of-range
    /// value is kept as text with its message and leaves `value` unchanged.
    fn number<T>(
        &mut self,
        ui: &mut egui::Ui,
        path: &str,
        value: &mut T,
        check: impl Fn(T) -> Result<(), String>,
    ) where
        T: std::str::FromStr + std::fmt::Display + Copy,
    {
        let text = self
            .text
            .entry(path.to_string())
            .or_insert_with(|| value.to_string());
        let bad = self.field_errors.contains_key(path);
        let mut edit = egui::TextEdit::singleline(text).desired_width(80.0);
        if bad {
            edit = edit.text_color(ui.visuals().error_fg_color);
        }
        let resp = ui.add(edit).on_hover_text(path);
        named(ui, &resp, path);
        if resp.changed() {
            match text.trim().parse::<T>() {
                Ok(v) => match check(v) {
                    Ok(()) => {
                        *value = v;
                        self.field_errors.remove(path);
                    }
                    Err(e) => {
                        self.field_errors.insert(path.to_string(), e);
                    }
                },
                Err(_) => {
                    self.field_errors.insert(
                        path.to_string(),
                        format!("'{}' is not a number", text.trim()),
                    );
                }
            }
        }
        if let Some(e) = self.field_errors.get(path) {
            ui.colored_label(ui.visuals().error_fg_color, e);
        }
    }

    /// Draws the editor. Returns true when a field changed.
    pub fn ui(&mut self, ui: &mut egui::Ui) -> bool {
        let Some(mut d) = self.draft.take() else {
            ui.label("no config");
            return false;
        };
        let before = serde_json::to_string(&d).unwrap_or_default();
        let pos = |v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err("must be a finite number > 0".to_string())
            }
        };
        let nonneg = |v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err("must be a finite number >= 0".to_string())
            }
        };
        let count = |v: usize| {
            if v >= 1 {
                Ok(())
            } else {
                Err("must be at least 1".to_string())
            }
        };
        egui::CollapsingHeader::new("Training")
            .default_open(true)
            .show(ui, |ui| {
                egui::Grid::new("cfg-train").num_columns(2).show(ui, |ui| {
                    ui.label("random seed");
                    self.number(ui, "seed", &mut d.seed, |_| Ok(()));
                    ui.end_row();
                    ui.label("training steps");
                    self.number(ui, "steps", &mut d.steps, count);
                    ui.end_row();
                    ui.label("batch size");
                    self.number(ui, "batch_size", &mut d.batch_size, count);
                    ui.end_row();
                    ui.label("lr");
                    self.number(
                        ui,
                        "lr_schedule.start_val",
                        &mut d.lr_schedule.start_val,
                        nonneg,
                    );
                    ui.end_row();
                    ui.label("lr schedule");
                    let r = egui::ComboBox::from_id_salt("cfg-lr-fn")
                        .selected_text(format!("{:?}", d.lr_schedule.fn_type))
                        .show_ui(ui, |ui| {
                            for f in [ScheduleFn::Constant, ScheduleFn::Linear, ScheduleFn::Cosine]
                            {
                                ui.selectable_value(
                                    &mut d.lr_schedule.fn_type,
                                    f,
                                    format!("{f:?}"),
                                );
                            }
                        });
                    named(ui, &r.response, "lr schedule");
                    ui.end_row();
                    ui.label("lr warm-up fraction");
                    self.number(
                        ui,
                        "lr_schedule.warmup_pct",
                        &mut d.lr_schedule.warmup_pct,
                        nonneg,
                    );
                    ui.end_row();
                    ui.label("lr final fraction");
                    self.number(
                        ui,
                        "lr_schedule.final_val_frac",
                        &mut d.lr_schedule.final_val_frac,
                        nonneg,
                    );
                    ui.end_row();
                    ui.label("faithfulness warm-up steps");
                    self.number(
                        ui,
                        "faithfulness_warmup_steps",
                        &mut d.faithfulness_warmup_steps,
                        |_| Ok(()),
                    );
                    ui.end_row();
                    ui.label("warm-up lr");
                    self.number(
                        ui,
                        "faithfulness_warmup_lr",
                        &mut d.faithfulness_warmup_lr,
                        nonneg,
                    );
                    ui.end_row();
                    ui.label("warm-up weight decay");
                    self.number(
                        ui,
                        "faithfulness_warmup_weight_decay",
                        &mut d.faithfulness_warmup_weight_decay,
                        nonneg,
                    );
                    ui.end_row();
                });
            });
        egui::CollapsingHeader::new("Decomposition")
            .default_open(true)
            .show(ui, |ui| {
                egui::Grid::new("cfg-dec").num_columns(2).show(ui, |ui| {
                    for i in 0..d.module_info.len() {
                        let name = d.module_info[i].module_pattern.clone();
                        ui.label(format!("C of {name}"));
                        self.number(ui, &format!("C.{name}"), &mut d.module_info[i].c, count);
                        ui.end_row();
                    }
                    ui.label("CI function");
                    let r = egui::ComboBox::from_id_salt("cfg-ci-fn")
                        .selected_text(format!("{:?}", d.ci_fn_type))
                        .show_ui(ui, |ui| {
                            for t in [CiFnType::Mlp, CiFnType::VectorMlp, CiFnType::SharedMlp] {
                                ui.selectable_value(&mut d.ci_fn_type, t, format!("{t:?}"));
                            }
                        });
                    named(ui, &r.response, "CI function");
                    ui.end_row();
                    ui.label("CI hidden sizes");
                    let path = "ci_fn_hidden_dims";
                    let text = self.text.entry(path.into()).or_insert_with(|| {
                        d.ci_fn_hidden_dims
                            .iter()
                            .map(|h| h.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    });
                    if ui
                        .add(egui::TextEdit::singleline(text).desired_width(80.0))
                        .on_hover_text("comma-separated widths, e.g. 16 or 64, 64")
                        .changed()
                    {
                        let parsed: Result<Vec<usize>, _> = text
                            .split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::parse::<usize>)
                            .collect();
                        match parsed {
                            Ok(v) => {
                                d.ci_fn_hidden_dims = v;
                                self.field_errors.remove(path);
                            }
                            Err(_) => {
                                self.field_errors
                                    .insert(path.into(), "comma-separated whole numbers".into());
                            }
                        }
                    }
                    ui.end_row();
                    ui.label("sigmoid");
                    let r = egui::ComboBox::from_id_salt("cfg-sigmoid")
                        .selected_text(format!("{:?}", d.sigmoid_type))
                        .show_ui(ui, |ui| {
                            for t in [
                                SigmoidType::LeakyHard,
                                SigmoidType::Hard,
                                SigmoidType::UpperLeakyHard,
                                SigmoidType::Normal,
                                SigmoidType::SwishHard,
                            ] {
                                ui.selectable_value(&mut d.sigmoid_type, t, format!("{t:?}"));
                            }
                        });
                    named(ui, &r.response, "sigmoid");
                    ui.end_row();
                    ui.label("sampling");
                    let r = egui::ComboBox::from_id_salt("cfg-sampling")
                        .selected_text(format!("{:?}", d.sampling))
                        .show_ui(ui, |ui| {
                            for t in [Sampling::Continuous, Sampling::Binomial] {
                                ui.selectable_value(&mut d.sampling, t, format!("{t:?}"));
                            }
                        });
                    named(ui, &r.response, "sampling");
                    ui.end_row();
                    ui.label("mask samples");
                    self.number(ui, "n_mask_samples", &mut d.n_mask_samples, count);
                    ui.end_row();
                    ui.label("delta component");
                    ui.checkbox(&mut d.use_delta_component, "")
                        .on_hover_text("train with W − Σ subcomponents as an extra masked term");
                    ui.end_row();
                });
            });
        egui::CollapsingHeader::new("Loss terms")
            .default_open(true)
            .show(ui, |ui| {
                let mut remove = None;
                for i in 0..d.loss_metric_configs.len() {
                    let name = d.loss_metric_configs[i].name();
                    ui.horizontal(|ui| {
                        ui.label(name);
                        let r = ui
                            .small_button("remove")
                            .on_hover_text(format!("remove {name}"));
                        named(ui, &r, &format!("remove {name}"));
                        if r.clicked() {
                            remove = Some(i);
                        }
                    });
                    egui::Grid::new(("cfg-loss", i))
                        .num_columns(2)
                        .show(ui, |ui| {
                            let l = &mut d.loss_metric_configs[i];
                            ui.label("  coeff");
                            let old = l.coeff().unwrap_or(0.0);
                            let mut c = old;
                            self.number(ui, &format!("{name}.coeff"), &mut c, nonneg);
                            if c != old {
                                l.coeff = Some(c);
                            }
                            ui.end_row();
                            match &mut l.kind {
                                LossKind::ImportanceMinimalityLoss { pnorm, .. } => {
                                    ui.label("  p");
                                    self.number(ui, &format!("{name}.pnorm"), pnorm, pos);
                                    ui.end_row();
                                }
                                LossKind::PgdReconLoss { pgd, .. }
                                | LossKind::PgdReconSubsetLoss { pgd, .. } => {
                                    ui.label("  step size");
                                    self.number(
                                        ui,
                                        &format!("{name}.step_size"),
                                        &mut pgd.step_size,
                                        pos,
                                    );
                                    ui.end_row();
                                    ui.label("  steps");
                                    self.number(
                                        ui,
                                        &format!("{name}.n_steps"),
                                        &mut pgd.n_steps,
                                        |_| Ok(()),
                                    );
                                    ui.end_row();
                                }
                                _ => {}
                            }
                        });
                }
                if let Some(i) = remove {
                    let prefix = format!("{}.", d.loss_metric_configs.remove(i).name());
                    self.text.retain(|k, _| !k.starts_with(&prefix));
                    self.field_errors.retain(|k, _| !k.starts_with(&prefix));
                }
                let r = egui::ComboBox::from_id_salt("cfg-add-loss")
                    .selected_text("add a loss term")
                    .show_ui(ui, |ui| {
                        for n in LOSS_NAMES {
                            let present = d.loss_metric_configs.iter().any(|l| l.name() == n);
                            if ui.add_enabled(!present, egui::Button::new(n)).clicked()
                                && let Some(l) = new_loss(n)
                            {
                                d.loss_metric_configs.push(l);
                            }
                        }
                    });
                named(ui, &r.response, "add a loss term");
            });
        let changed = serde_json::to_string(&d).unwrap_or_default() != before;
        self.draft = Some(d);
        for p in self.config_problems() {
            ui.colored_label(ui.visuals().error_fg_color, p.to_string());
        }
        changed
    }
}
