//! The app's top bar (file, run controls, status and error line), the export buttons and the
//! side panel (new training run, config).

use eframe::egui;

use super::SpdApp;
use crate::worker::{Command, RunState};

impl SpdApp {
    pub(super) fn open_dialog(&mut self) {
        if let Some(p) = rfd::FileDialog::new()
            .add_filter("spdlab / torch", &["spdlab", "pth"])
            .pick_file()
        {
            self.open(p);
        }
    }

    pub(super) fn open_folder_dialog(&mut self) {
        if let Some(p) = rfd::FileDialog::new().pick_folder() {
            self.open(p);
        }
    }

    pub(super) fn save_dialog(&mut self) {
        if let Some(p) = rfd::FileDialog::new()
            .add_filter("spdlab", &["spdlab"])
            .save_file()
        {
            self.send(Command::Save(p));
        }
    }

    /// Keyboard shortcuts (not while a text field has the keyboard): space pauses or resumes
    /// training, Ctrl+O opens, Ctrl+S saves, Left/Right move the selection between
    /// subcomponents and Up/Down between decomposed modules.
    pub(super) fn shortcuts(&mut self, ctx: &egui::Context) {
        if ctx.egui_wants_keyboard_input() {
            return;
        }
        use egui::{Key, Modifiers};
        let (space, open, save, left, right, up, down) = ctx.input_mut(|i| {
            (
                i.consume_key(Modifiers::NONE, Key::Space),
                i.consume_key(Modifiers::COMMAND, Key::O),
                i.consume_key(Modifiers::COMMAND, Key::S),
                i.consume_key(Modifiers::NONE, Key::ArrowLeft),
                i.consume_key(Modifiers::NONE, Key::ArrowRight),
                i.consume_key(Modifiers::NONE, Key::ArrowUp),
                i.consume_key(Modifiers::NONE, Key::ArrowDown),
            )
        });
        if space {
            match self.session.state {
                RunState::Running => {
                    self.send(Command::Pause);
                }
                RunState::Paused | RunState::Idle => {
                    self.send(Command::Resume);
                }
                RunState::Finished => {}
            }
        }
        if open {
            self.open_dialog();
        }
        if save {
            self.save_dialog();
        }
        let Some(s) = self.session.snapshot.clone() else {
            return;
        };
        let n_mod = s.modules.len();
        if n_mod == 0 {
            return;
        }
        let sel = &mut self.selection;
        if up || down {
            sel.module = if up {
                (sel.module + n_mod - 1) % n_mod
            } else {
                (sel.module + 1) % n_mod
            };
            sel.component = None;
        }
        let c = s.modules[sel.module.min(n_mod - 1)].c;
        if (left || right) && c > 0 {
            sel.component = Some(match (sel.component, left) {
                (None, true) => c - 1,
                (None, false) => 0,
                (Some(k), true) => (k + c - 1) % c,
                (Some(k), false) => (k + 1) % c,
            });
        }
    }

    pub(super) fn top_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            ui.strong("spdlab");
            ui.separator();
            if ui
                .button("Open...")
                .on_hover_text("Open a .spdlab file or a goodfire-ai/spd run (Ctrl+O)")
                .clicked()
            {
                self.open_dialog();
            }
            if ui
                .button("Open folder...")
                .on_hover_text("Open a sweep folder (spdlab sweep) or a goodfire-ai/spd run folder")
                .clicked()
            {
                self.open_folder_dialog();
            }
            ui.menu_button("Recent", |ui| {
                if self.settings.recent.is_empty() {
                    ui.label("no recent files");
                }
                for p in self.settings.recent.clone() {
                    if ui.button(p.display().to_string()).clicked() {
                        self.open(p);
                        ui.close();
                    }
                }
            });
            if ui
                .button("Save...")
                .on_hover_text("Save the decomposition as a .spdlab file (Ctrl+S)")
                .clicked()
            {
                self.save_dialog();
            }
            ui.separator();
            match self.session.state {
                RunState::Running => {
                    if ui.button("Pause").clicked() {
                        self.send(Command::Pause);
                    }
                    if ui.button("Stop").clicked() {
                        self.send(Command::Stop);
                    }
                }
                RunState::Paused => {
                    if ui.button("Resume").clicked() {
                        self.send(Command::Resume);
                    }
                    if ui.button("Stop").clicked() {
                        self.send(Command::Stop);
                    }
                }
                RunState::Idle => {
                    if ui.button("Start").clicked() {
                        self.send(Command::Start);
                    }
                }
                RunState::Finished => {}
            }
            ui.separator();
            let total = self
                .session
                .config
                .as_ref()
                .map(|c| c.steps + 1)
                .unwrap_or(0);
            let step = self.step();
            let eta = if self.session.steps_per_sec > 0.0 && self.session.state == RunState::Running
            {
                format!(
                    ", ETA {:.0} s",
                    (total.saturating_sub(step)) as f32 / self.session.steps_per_sec
                )
            } else {
                String::new()
            };
            ui.label(format!(
                "{} | step {step}/{total} | {:.0} steps/s{eta} | {}",
                self.session.description, self.session.steps_per_sec, self.session.status
            ));
            // A long job on the worker, seen from every view.
            if let Some(j) = self.clusters.job.clone() {
                ui.separator();
                ui.spinner();
                ui.label(format!(
                    "clustering: {} ({:.0}%)",
                    j.stage,
                    100.0 * j.fraction
                ));
                if j.id.is_some()
                    && ui
                        .small_button("cancel")
                        .on_hover_text("Cancel the clustering")
                        .clicked()
                {
                    self.send(Command::Cancel(crate::worker::JobKind::Clustering));
                }
            }
        });
        if let Some(e) = self.session.error.clone() {
            ui.horizontal(|ui| {
                ui.colored_label(egui::Color32::from_rgb(220, 60, 60), format!("Error: {e}"));
                if ui.small_button("dismiss").clicked() {
                    self.session.error = None;
                }
            });
        }
    }

    pub(super) fn export_buttons(&mut self, ui: &mut egui::Ui) {
        let stem = self.views[self.current()].file_stem();
        if ui
            .button("Export PNG...")
            .on_hover_text("Save a picture of this view")
            .clicked()
            && let Some(p) = rfd::FileDialog::new()
                .add_filter("png", &["png"])
                .set_file_name(format!("{stem}.png"))
                .save_file()
        {
            self.export_png(ui.ctx(), p);
        }
        if ui
            .button("Export CSV...")
            .on_hover_text("Save the data of this view")
            .clicked()
            && let Some(p) = rfd::FileDialog::new()
                .add_filter("csv", &["csv"])
                .set_file_name(format!("{stem}.csv"))
                .save_file()
        {
            match self.export_csv(&p) {
                Ok(()) => self.session.status = format!("exported {}", p.display()),
                Err(e) => self.session.error = Some(format!("export failed: {e:#}")),
            }
        }
    }

    pub(super) fn side_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("New training run");
        egui::ComboBox::from_label("preset")
            .selected_text(self.settings.preset.clone())
            .show_ui(ui, |ui| {
                for p in crate::presets::PRESETS {
                    if ui
                        .selectable_label(self.settings.preset == p.name, p.name)
                        .on_hover_text(p.description)
                        .clicked()
                    {
                        self.settings.preset = p.name.to_string();
                        if let Ok(c) = crate::presets::spd_config(p.name) {
                            self.settings.steps = c.steps;
                            self.settings.lr = c.lr_schedule.start_val;
                            self.settings.seed = c.seed;
                        }
                        self.reset_editor();
                    }
                }
            });
        let devices: &[&str] = if cfg!(feature = "cuda") {
            &["cpu", "cuda"]
        } else {
            &["cpu"]
        };
        egui::ComboBox::from_label("device")
            .selected_text(self.settings.device.clone())
            .show_ui(ui, |ui| {
                for d in devices {
                    ui.selectable_value(&mut self.settings.device, d.to_string(), *d);
                }
            })
            .response
            .on_hover_text("cuda needs a build with --features cuda and an NVIDIA GPU");
        let valid = self.editor.valid().is_some();
        ui.horizontal(|ui| {
            if ui
                .add_enabled(valid, egui::Button::new("New run"))
                .on_hover_text("Load the preset's target with the configuration below")
                .on_disabled_hover_text("fix the configuration first (messages below)")
                .clicked()
            {
                self.send(Command::SetDevice(self.settings.device.clone()));
                self.new_run();
            }
            if ui
                .button("Reset")
                .on_hover_text("Start the configuration over from the preset")
                .clicked()
            {
                self.reset_editor();
            }
            if matches!(self.session.state, RunState::Running | RunState::Paused)
                && ui
                    .add_enabled(valid, egui::Button::new("Apply now"))
                    .on_hover_text(
                        "Apply the learning rate and loss coefficients to the running training \
                         (marked on the training curves)",
                    )
                    .clicked()
            {
                self.apply_live_changes();
            }
        });
        ui.horizontal(|ui| {
            if ui
                .button("Load config...")
                .on_hover_text("a --config JSON file")
                .clicked()
                && let Some(p) = rfd::FileDialog::new()
                    .add_filter("json", &["json"])
                    .pick_file()
            {
                self.load_config(&p);
            }
            if ui
                .button("Save config...")
                .on_hover_text("as --config JSON")
                .clicked()
                && let Some(p) = rfd::FileDialog::new()
                    .add_filter("json", &["json"])
                    .save_file()
                && let Err(e) = self.editor.save_json(&p, &self.settings.preset)
            {
                self.session.error = Some(e);
            }
        });
        egui::ScrollArea::vertical()
            .id_salt("cfg-editor")
            .max_height(ui.available_height() * 0.6)
            .show(ui, |ui| {
                if self.editor.ui(ui)
                    && let Some(d) = &self.editor.draft
                {
                    self.settings.steps = d.steps;
                    self.settings.seed = d.seed;
                    self.settings.lr = d.lr_schedule.start_val;
                }
            });
        ui.separator();
        if let Some(c) = &self.session.config {
            ui.heading("Running config");
            egui::Grid::new("cfg").num_columns(2).show(ui, |ui| {
                ui.label("steps");
                ui.label(c.steps.to_string());
                ui.end_row();
                ui.label("batch");
                ui.label(c.batch_size.to_string());
                ui.end_row();
                ui.label("ci_fn");
                ui.label(format!("{:?} {:?}", c.ci_fn_type, c.ci_fn_hidden_dims));
                ui.end_row();
                for o in &c.ci_fn_type_overrides {
                    ui.label(format!("ci_fn of {}", o.module_pattern));
                    ui.label(format!("{:?}", o.ci_fn_type));
                    ui.end_row();
                }
                ui.label("lr");
                ui.label(format!(
                    "{:.1e} {:?}",
                    c.lr_schedule.start_val, c.lr_schedule.fn_type
                ));
                ui.end_row();
                for m in &c.module_info {
                    ui.label(format!("C of {}", m.module_pattern));
                    ui.label(m.c.to_string());
                    ui.end_row();
                }
                for l in &c.loss_metric_configs {
                    ui.label(l.name());
                    ui.label(
                        l.coeff()
                            .map(|x| format!("{x:e}"))
                            .unwrap_or("eval only".into()),
                    );
                    ui.end_row();
                    if let crate::spd::config::LossKind::ImportanceMinimalityLoss {
                        pnorm,
                        module_weights,
                        ..
                    } = &l.kind
                    {
                        ui.label("  p");
                        ui.label(pnorm.to_string());
                        ui.end_row();
                        for w in module_weights {
                            ui.label(format!("  weight of {}", w.module_pattern));
                            ui.label(format!("x{}", w.weight));
                            ui.end_row();
                        }
                    }
                }
            });
        }
    }
}
