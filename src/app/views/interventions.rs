//! Interventions: mask a selection (subcomponents, clusters, layers), compare target, full
//! decomposition and intervened outputs, rank what breaks, summarise per feature, and trace
//! which mechanisms fire on one input. Sequence models: generated sequences or one chosen
//! sequence, ranked by the KL the intervention adds, and per position the KL and the top
//! predictions before and after. All maths runs on the worker (`Command::Intervene`).

use eframe::egui;
use egui_plot::{Bar, BarChart, Legend, Plot};

use std::sync::Arc;

use crate::app::sequence_picker::{SequencePicker, token_labels};
use crate::app::view::{CsvJob, View, ViewCtx};
use crate::interventions::{InterventionResult, MaskMode, Trace};
use crate::worker::{Command, Event, InputSet, InterventionOutcome, InterventionRequest, Snapshot};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Probes,
    Batch,
    Custom,
}

pub struct InterventionsView {
    pub select: String,
    pub selected_mode: MaskMode,
    pub other_mode: MaskMode,
    pub delta: bool,
    pub input_kind: InputKind,
    pub probe_value: f32,
    pub batch_n: usize,
    pub custom: Vec<f32>,
    /// Sequence models: the sequence of the "sequence" input.
    pub picker: SequencePicker,
    pub auto: bool,
    /// Index (into the result's inputs) of the input shown in detail.
    pub row: usize,
    pub trace_threshold: f32,
    last_sent: Option<InterventionRequest>,
    /// The timeline frame the last snapshot showed (None: live).
    frame: Option<usize>,
    last_traced: Option<(Vec<f32>, f32)>,
    prefilled: bool,
    /// The worker's latest intervention result and mechanism trace.
    pub outcome: Option<Arc<InterventionOutcome>>,
    pub trace: Option<Arc<Trace>>,
}

impl Default for InterventionsView {
    fn default() -> Self {
        InterventionsView {
            select: String::new(),
            selected_mode: MaskMode::Ablate,
            other_mode: MaskMode::Keep,
            delta: false,
            input_kind: InputKind::Probes,
            probe_value: 0.75,
            batch_n: 256,
            custom: vec![],
            picker: SequencePicker::default(),
            auto: true,
            row: 0,
            trace_threshold: 0.1,
            last_sent: None,
            frame: None,
            last_traced: None,
            prefilled: false,
            outcome: None,
            trace: None,
        }
    }
}

impl View for InterventionsView {
    fn name(&self) -> &'static str {
        "interventions"
    }
    fn label(&self) -> &'static str {
        "Interventions"
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, _cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let out = self
            .outcome
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no intervention has run yet"))?;
        Ok(Box::new(move || Ok(csv_text(&out))))
    }
    fn on_event(&mut self, e: &Event) {
        match e {
            Event::Loaded { .. } => {
                self.outcome = None;
                self.trace = None;
                self.picker = SequencePicker::default();
                self.prefilled = false;
            }
            Event::Intervened(o) => self.outcome = Some(o.clone()),
            Event::Traced(t) => self.trace = Some(t.clone()),
            Event::Snapshot(snap) if snap.frame != self.frame => {
                // Another timeline frame (or back to live): run the intervention on it.
                self.frame = snap.frame;
                self.last_sent = None;
            }
            _ => {}
        }
    }
}

impl InterventionsView {
    /// The request the current controls describe.
    pub fn request(&self) -> InterventionRequest {
        InterventionRequest {
            select: self.select.clone(),
            selected_mode: self.selected_mode,
            other_mode: self.other_mode,
            delta: self.delta,
            inputs: match self.input_kind {
                InputKind::Probes => InputSet::Probes(self.probe_value),
                InputKind::Batch => InputSet::Batch {
                    n: self.batch_n,
                    seed: 0,
                },
                InputKind::Custom => InputSet::Custom(self.custom.clone()),
            },
            seed: 0,
        }
    }
}

/// A mask-mode picker; the others may also be adversarial (PGD worst case).
fn mode_combo(ui: &mut egui::Ui, label: &str, mode: &mut MaskMode, others: bool) {
    egui::ComboBox::from_label(label)
        .selected_text(mode.label())
        .show_ui(ui, |ui| {
            for m in MaskMode::ALL {
                ui.selectable_value(mode, m, m.label());
            }
            if others {
                ui.selectable_value(mode, MaskMode::Adversarial, MaskMode::Adversarial.label());
            }
        });
}

impl InterventionsView {
    /// Sends the current request to the worker.
    fn run(&mut self, cx: &ViewCtx) {
        let req = self.request();
        self.last_sent = Some(req.clone());
        cx.send(Command::Intervene(req));
    }

    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        let Some(snap) = cx.snapshot().cloned() else {
            return;
        };
        let nf = snap.n_features;
        {
            let st = &mut *self;
            if st.custom.len() != nf {
                st.custom = vec![0.0; nf];
            }
            if !st.prefilled {
                // Start on something meaningful: the first cluster, else the first layer's most
                // used subcomponent (highest mean CI).
                st.prefilled = true;
                if snap.sequence.is_some() && st.input_kind == InputKind::Probes {
                    // Probes are one-hot rows, meaningless as token ids: generated sequences.
                    st.input_kind = InputKind::Batch;
                    st.batch_n = 64;
                }
                st.select = match (&snap.clusters, snap.modules.first()) {
                    (Some(c), _) if !c.clusters.is_empty() => {
                        format!("cluster:{}", c.clusters[0].id)
                    }
                    (_, Some(m)) => {
                        let best = (0..m.c)
                            .max_by(|&a, &b| m.mean_ci[a].total_cmp(&m.mean_ci[b]))
                            .unwrap_or(0);
                        format!("{}:{best}", m.name)
                    }
                    _ => String::new(),
                };
            }
        }
        self.controls(cx, ui, &snap);
        let st = &*self;
        let ready = !st.select.trim().is_empty();
        if st.auto && ready && st.last_sent.as_ref() != Some(&st.request()) {
            self.run(cx);
        }
        ui.separator();
        let Some(out) = self.outcome.clone() else {
            ui.label("Choose what to intervene on (e.g. linear1:3, cluster:0, layers.0.mlp_in:*) and press Run.");
            return;
        };
        let r = &out.result;
        ui.label(format!(
            "{} subcomponents {}, others {}, delta component {} | {} inputs",
            out.labels.len(),
            out.request.selected_mode.label(),
            out.request.other_mode.label(),
            if out.request.delta { "on" } else { "off" },
            r.inputs.len()
        ));
        let row = self.row.min(r.inputs.len().saturating_sub(1));
        ui.columns(2, |cols| {
            // Left: what breaks, then the per-feature summary.
            let ui = &mut cols[0];
            ui.strong(if r.positions.is_empty() {
                "What breaks (inputs by max |change| of the output)"
            } else {
                "What breaks (sequences by the KL the intervention adds)"
            });
            egui::ScrollArea::both()
                .id_salt("breaks")
                .max_height(ui.available_height() * 0.55)
                .show(ui, |ui| {
                    egui::Grid::new("breaks_grid").striped(true).show(ui, |ui| {
                        ui.strong("input");
                        ui.strong("max|change|");
                        ui.strong("loss base");
                        ui.strong("loss interv.");
                        ui.end_row();
                        for i in r.what_breaks().into_iter().take(200) {
                            let label = out.input_labels.get(i).cloned().unwrap_or_default();
                            if ui
                                .selectable_label(i == row, format!("{i}: {label}"))
                                .clicked()
                            {
                                self.row = i;
                            }
                            ui.label(format!("{:.4}", r.max_change[i]));
                            ui.label(format!("{:.3e}", r.loss_baseline[i]));
                            ui.label(format!("{:.3e}", r.loss_intervened[i]));
                            ui.end_row();
                        }
                    });
                });
            ui.separator();
            ui.strong("Per feature / class (baseline -> intervened)");
            egui::ScrollArea::both().id_salt("perfeat").show(ui, |ui| {
                egui::Grid::new("perfeat_grid")
                    .striped(true)
                    .show(ui, |ui| {
                        for f in &r.per_feature {
                            let broken = f.is_broken();
                            ui.label(&f.name);
                            ui.label(format!("{} inputs", f.n_inputs));
                            ui.label(format!(
                                "{} {:.3e} -> {:.3e}",
                                f.metric, f.baseline, f.intervened
                            ));
                            if broken {
                                ui.colored_label(egui::Color32::from_rgb(220, 60, 60), "broken");
                            } else {
                                ui.label("");
                            }
                            ui.end_row();
                        }
                    });
            });
            // Right: outputs side by side and the mechanism trace of the chosen input.
            let ui = &mut cols[1];
            if r.inputs.is_empty() {
                return;
            }
            ui.strong(format!(
                "Input {row}: {}",
                out.input_labels.get(row).cloned().unwrap_or_default()
            ));
            if let Some(dims) = snap.sequence {
                sequence_detail(ui, r, row, &dims);
                self.trace_panel(cx, ui, &r.inputs[row]);
                return;
            }
            let n_out = r.target[row].len();
            let series = [
                ("target", &r.target[row], egui::Color32::from_gray(120)),
                (
                    "full decomposition",
                    &r.full[row],
                    egui::Color32::from_rgb(31, 119, 180),
                ),
                (
                    "intervened",
                    &r.intervened[row],
                    egui::Color32::from_rgb(230, 80, 20),
                ),
            ];
            Plot::new("iv_outputs")
                .legend(Legend::default())
                .height(180.0)
                .allow_scroll(false)
                .show(ui, |p| {
                    for (s, (name, vals, color)) in series.iter().enumerate() {
                        let w = 0.8 / 3.0;
                        let bars: Vec<Bar> = (0..n_out)
                            .map(|k| {
                                Bar::new(k as f64 + (s as f64 - 1.0) * w, vals[k] as f64).width(w)
                            })
                            .collect();
                        p.bar_chart(BarChart::new(*name, bars).color(*color));
                    }
                });
            self.trace_panel(cx, ui, &r.inputs[row]);
        });
    }

    fn controls(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui, snap: &Snapshot) {
        let clusters = snap.clusters.clone();
        let mut run_now = false;
        let st = &mut *self;
        ui.horizontal_wrapped(|ui| {
            ui.label("select:");
            ui.add(
                egui::TextEdit::singleline(&mut st.select)
                    .desired_width(260.0)
                    .hint_text("linear1:3, cluster:0, layers.0.mlp_in:*"),
            );
            if let Some(c) = cx.selection.component
                && let Some(m) = snap.modules.get(cx.selection.module)
                && ui
                    .button(format!("+ {}:{c}", m.name))
                    .on_hover_text("add the selected subcomponent")
                    .clicked()
            {
                if !st.select.trim().is_empty() {
                    st.select.push_str(", ");
                }
                st.select.push_str(&format!("{}:{c}", m.name));
            }
            if let Some(cl) = &clusters {
                egui::ComboBox::from_label("add a cluster")
                    .selected_text("+ cluster")
                    .show_ui(ui, |ui| {
                        for c in &cl.clusters {
                            let text = format!(
                                "cluster {} (rank {}, {})",
                                c.id,
                                c.rank,
                                c.layers.join(",")
                            );
                            if ui.selectable_label(false, text).clicked() {
                                if !st.select.trim().is_empty() {
                                    st.select.push_str(", ");
                                }
                                st.select.push_str(&format!("cluster:{}", c.id));
                            }
                        }
                    });
            }
            for m in &snap.modules {
                if ui
                    .small_button(format!("{}:*", m.name))
                    .on_hover_text("the whole layer")
                    .clicked()
                {
                    st.select = format!("{}:*", m.name);
                }
            }
            if ui.small_button("clear").clicked() {
                st.select.clear();
            }
        });
        ui.horizontal_wrapped(|ui| {
            mode_combo(ui, "for the selection,", &mut st.selected_mode, false);
            mode_combo(ui, "for the others", &mut st.other_mode, true);
            ui.checkbox(&mut st.delta, "delta component");
            ui.label(if st.delta {
                "(delta ON: the residual W - sum U V stays in)"
            } else {
                "(delta OFF: ablated subcomponents are removed entirely)"
            });
        });
        let seq = snap.sequence;
        ui.horizontal_wrapped(|ui| {
            ui.label("inputs:");
            if seq.is_some() {
                ui.selectable_value(&mut st.input_kind, InputKind::Batch, "generated sequences");
                ui.selectable_value(&mut st.input_kind, InputKind::Custom, "one sequence");
            } else {
                ui.selectable_value(&mut st.input_kind, InputKind::Probes, "probes");
                ui.selectable_value(&mut st.input_kind, InputKind::Batch, "data batch");
                ui.selectable_value(&mut st.input_kind, InputKind::Custom, "custom");
            }
            match st.input_kind {
                InputKind::Probes => {
                    ui.add(egui::Slider::new(&mut st.probe_value, -1.0..=1.0).text("value"));
                }
                InputKind::Batch => {
                    ui.add(
                        egui::DragValue::new(&mut st.batch_n)
                            .range(1..=8192)
                            .prefix("n "),
                    );
                }
                InputKind::Custom => {}
            }
            ui.checkbox(&mut st.auto, "auto");
            run_now = ui.button("Run").clicked();
        });
        if run_now {
            self.run(cx);
        }
        if self.input_kind == InputKind::Custom {
            match seq {
                Some(dims) => {
                    self.picker.ui(ui, snap, &dims);
                    if self.picker.tokens.len() == snap.n_features {
                        self.custom.clone_from(&self.picker.tokens);
                    }
                }
                None => self.custom_sliders(cx, ui, snap),
            }
        }
    }

    /// One slider per input feature (a scroll area for wide inputs).
    fn custom_sliders(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui, snap: &Snapshot) {
        let range = cx
            .session
            .config
            .as_ref()
            .and_then(|c| c.task_config.value_range)
            .unwrap_or((-1.0, 1.0));
        let lo = range.0.min(0.0);
        let hi = range.1.max(1.0);
        let st = &mut *self;
        egui::ScrollArea::horizontal()
            .id_salt("iv_custom")
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    for (i, v) in st.custom.iter_mut().enumerate().take(snap.n_features) {
                        ui.vertical(|ui| {
                            ui.add(egui::Slider::new(v, lo..=hi).vertical().show_value(false));
                            ui.small(format!("f{i}"));
                        });
                    }
                    if ui.small_button("zero").clicked() {
                        st.custom.iter_mut().for_each(|v| *v = 0.0);
                    }
                });
            });
    }

    fn trace_panel(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui, input: &[f32]) {
        let thr = self.trace_threshold;
        let key = (input.to_vec(), thr);
        if self.last_traced.as_ref() != Some(&key) {
            self.last_traced = Some(key);
            self.trace = None;
            cx.send(Command::Trace {
                input: input.to_vec(),
                threshold: thr,
            });
        }
        ui.strong(if self.picker.tokens.is_empty() && self.input_kind != InputKind::Custom {
            "Mechanism trace: what fires on this input"
        } else {
            "Mechanism trace: what fires on this input (sequences: at each subcomponent's strongest position)"
        });
        ui.add(egui::Slider::new(&mut self.trace_threshold, 0.01..=0.99).text("CI threshold"));
        let Some(t) = self.trace.clone() else {
            ui.label("tracing...");
            return;
        };
        if !t.clusters.is_empty() {
            let cl: Vec<String> = t
                .clusters
                .iter()
                .map(|(id, g, k)| format!("cluster {id} (max CI {g:.2}, {k} firing)"))
                .collect();
            ui.label(format!("clusters: {}", cl.join(", ")));
        }
        let snap = cx.snapshot().cloned();
        egui::ScrollArea::both().id_salt("trace").show(ui, |ui| {
            egui::Grid::new("trace_grid").striped(true).show(ui, |ui| {
                let seq = t.entries.iter().any(|e| e.position.is_some());
                ui.strong("subcomponent");
                if seq {
                    ui.strong("at position");
                }
                ui.strong("CI");
                ui.strong("cluster");
                ui.strong("write size");
                ui.strong("read V / write U");
                ui.end_row();
                for e in &t.entries {
                    let selected =
                        cx.selection.module == e.module && cx.selection.component == Some(e.index);
                    if ui.selectable_label(selected, &e.label).clicked() {
                        cx.selection.module = e.module;
                        cx.selection.component = Some(e.index);
                    }
                    if seq {
                        ui.label(e.position.map(|p| p.to_string()).unwrap_or_default());
                    }
                    ui.label(format!("{:.3}", e.ci));
                    ui.label(e.cluster.map(|c| c.to_string()).unwrap_or("-".into()));
                    ui.label(format!("{:.3}", e.contribution));
                    if let Some(m) = snap.as_ref().and_then(|s| s.modules.get(e.module)) {
                        let v: Vec<f32> = (0..m.d_in).map(|i| m.v[i * m.c + e.index]).collect();
                        let u: Vec<f32> = m.u[e.index * m.d_out..(e.index + 1) * m.d_out].to_vec();
                        ui.horizontal(|ui| {
                            crate::app::widgets::value_strip(ui, &v);
                            ui.label("/");
                            crate::app::widgets::value_strip(ui, &u);
                        });
                    }
                    ui.end_row();
                }
            });
        });
    }
}


/// Sequence models: per position of input `row`, the KL against the target before and after
/// and the top predictions, with a plot of the KLs along the sequence.
fn sequence_detail(ui: &mut egui::Ui, r: &InterventionResult, row: usize, dims: &crate::model::IhDims) {
    let s = dims.seq_len;
    let Some(ps) = r.positions.get(row * s..(row + 1) * s) else {
        return;
    };
    let text = token_labels(r.inputs[row].iter().map(|&t| t as usize), dims);
    Plot::new("iv_kl_positions")
        .legend(Legend::default())
        .height(120.0)
        .allow_scroll(false)
        .x_axis_label("position")
        .y_axis_label("KL vs target")
        .show(ui, |p| {
            let pts = |f: &dyn Fn(&crate::interventions::PositionOutcome) -> f32| {
                egui_plot::PlotPoints::from_iter(
                    ps.iter().enumerate().map(|(i, o)| [i as f64, f(o) as f64]),
                )
            };
            p.line(egui_plot::Line::new("baseline", pts(&|o| o.kl_baseline)));
            p.line(egui_plot::Line::new("intervened", pts(&|o| o.kl_intervened)));
        });
    let fmt = |t: &[(u32, f32); 3]| {
        t.iter()
            .map(|(k, p)| format!("{k}:{p:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let answer = crate::model::ih::induction_answer(
        &r.inputs[row].iter().map(|&v| v as u32).collect::<Vec<_>>(),
        dims,
    );
    egui::ScrollArea::vertical()
        .id_salt("iv_positions")
        .max_height(ui.available_height() * 0.5)
        .show(ui, |ui| {
            egui::Grid::new("iv_positions_grid").striped(true).show(ui, |ui| {
                for h in ["pos", "token", "KL base", "KL interv.", "target top 3", "intervened top 3"] {
                    ui.strong(h);
                }
                ui.end_row();
                for (i, o) in ps.iter().enumerate() {
                    let pos = if i == s - 1 && answer.is_some() {
                        format!("{i} (induction)")
                    } else {
                        i.to_string()
                    };
                    ui.label(pos);
                    ui.label(&text[i]);
                    ui.label(format!("{:.2e}", o.kl_baseline));
                    let changed = o.top_intervened[0].0 != o.top_target[0].0;
                    ui.label(format!("{:.2e}", o.kl_intervened));
                    ui.label(fmt(&o.top_target));
                    if changed {
                        ui.colored_label(egui::Color32::from_rgb(220, 60, 60), fmt(&o.top_intervened));
                    } else {
                        ui.label(fmt(&o.top_intervened));
                    }
                    ui.end_row();
                }
            });
        });
}

/// CSV of the latest intervention: one row per input with its losses and every output of the
/// target, the full decomposition and the intervened model; for sequence models one row per
/// (input, position) with the KLs and top predictions.
fn csv_text(out: &InterventionOutcome) -> String {
    let r = &out.result;
    if !r.positions.is_empty() {
        // Sequence models: one row per (input, position).
        let s = r.positions.len() / r.inputs.len().max(1);
        let mut t = String::from(
            "input,position,token,kl_baseline,kl_intervened,target_top1,target_p1,baseline_top1,baseline_p1,intervened_top1,intervened_p1\n",
        );
        for (k, o) in r.positions.iter().enumerate() {
            let (i, p) = (k / s, k % s);
            t.push_str(&format!(
                "{i},{p},{},{},{},{},{},{},{},{},{}\n",
                r.inputs[i][p],
                o.kl_baseline,
                o.kl_intervened,
                o.top_target[0].0,
                o.top_target[0].1,
                o.top_baseline[0].0,
                o.top_baseline[0].1,
                o.top_intervened[0].0,
                o.top_intervened[0].1
            ));
        }
        return t;
    }
    {
        let n_out = r.target.first().map_or(0, |t| t.len());
        let mut s =
            String::from("input,label,max_change,loss_baseline,loss_intervened,loss_change");
        for kind in ["target", "full", "intervened"] {
            for k in 0..n_out {
                s.push_str(&format!(",{kind}_{k}"));
            }
        }
        s.push('\n');
        for i in 0..r.inputs.len() {
            s.push_str(&format!(
                "{i},\"{}\",{},{},{},{}",
                out.input_labels.get(i).cloned().unwrap_or_default(),
                r.max_change[i],
                r.loss_baseline[i],
                r.loss_intervened[i],
                r.loss_change[i]
            ));
            for o in [&r.target[i], &r.full[i], &r.intervened[i]] {
                for v in o {
                    s.push_str(&format!(",{v}"));
                }
            }
            s.push('\n');
        }
        s
    }
}
