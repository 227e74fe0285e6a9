//! Causal-importance heatmap: inputs × subcomponents of one layer, uploaded as a texture once
//! per snapshot/setting change (not per frame), hoverable and clickable.

use eframe::egui;

use crate::app::cluster_state::ClusterState;
use crate::app::view::{CsvJob, View, ViewCtx};
use crate::app::heatmap;
use crate::app::widgets::{CLUSTER_COLOR, component_color, module_picker};
use crate::worker::{Command, Event, Snapshot};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InputSet {
    #[default]
    Probes,
    Batch,
    /// One row edited with a slider per input feature.
    Custom,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Order {
    AsIs,
    #[default]
    Hungarian,
    Density,
    /// Members of each cluster contiguous, clusters by id, dead/unclustered last.
    ByCluster,
}

/// What the heatmap's values are: (snapshot version, module, inputs, custom answers). The
/// colour range, gamma and scale are not part of it: the shader applies them, so changing
/// them uploads nothing.
type ValuesKey = (u64, usize, InputSet, u64);
/// What the column order is: the values' key, the order, the clusters' version and the
/// snapshot the shown Hungarian order was computed on. The shader reads columns through the order, so a new
/// order uploads one integer per column, not the values.
type OrderKey = (ValuesKey, Order, u64, Option<u64>);

/// The CI heatmap and its state. The Hungarian column order comes from the worker
/// (`Command::ColumnOrder`); until it arrives the columns are shown as is.
#[derive(Default)]
pub struct CiView {
    pub input_set: InputSet,
    pub order: Order,
    pub vmax: f32,
    /// Gamma and log scale of the colour map (applied in the shader).
    pub gamma: f32,
    pub log: bool,
    /// The values drawn (rows × C, as the snapshot stores them: shared, not copied), with
    /// the column order applied by the shader.
    values: Option<heatmap::Data>,
    values_key: Option<ValuesKey>,
    order_key: Option<OrderKey>,
    /// The Hungarian order asked for and not yet answered: (snapshot version, module). One
    /// request at a time: while training sends snapshots faster than the worker answers, the
    /// newest answer is shown until the next one arrives.
    hungarian_asked: Option<(u64, usize)>,
    /// The worker's answer: (snapshot version, module, order).
    pub hungarian: Option<(u64, usize, Vec<usize>)>,
    /// Column order drawn: `columns[x]` is the subcomponent at position x.
    pub columns: Vec<usize>,
    pub rows: usize,
    /// New values handed to the heatmap (one per snapshot, module or input set).
    pub uploads: u64,
    /// New column orders handed to the heatmap.
    pub orders: u64,
    /// The custom input row (one value per feature).
    pub custom_input: Vec<f32>,
    /// The worker's answer: (input, CI per module), and a counter of answers.
    pub custom_ci: Option<(Vec<f32>, Vec<Vec<f32>>)>,
    custom_results: u64,
    /// A request is with the worker / the input changed since the last request.
    custom_pending: bool,
    custom_dirty: bool,
    /// Snapshot version the custom CI was asked for (training moves the model).
    custom_asked_at: u64,
}

impl View for CiView {
    fn name(&self) -> &'static str {
        "ci"
    }
    fn label(&self) -> &'static str {
        "Causal importance"
    }
    fn file_stem(&self) -> &'static str {
        "causal-importance"
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        self.csv_job(cx)
    }
    fn on_event(&mut self, e: &Event) {
        match e {
            Event::Loaded { .. } => {
                self.reset_custom();
                self.hungarian = None;
                self.hungarian_asked = None;
            }
            Event::CustomCi { input, ci } => self.set_custom_result(input.clone(), ci.clone()),
            Event::ColumnOrder { key, module, order }
                if self.hungarian_asked == Some((*key, *module)) =>
            {
                self.hungarian = Some((*key, *module, order.clone()));
                self.hungarian_asked = None;
            }
            _ => {}
        }
    }
}

impl CiView {
    pub fn reset_custom(&mut self) {
        self.custom_input.clear();
        self.custom_ci = None;
        self.custom_pending = false;
        self.custom_dirty = true;
        self.custom_results += 1;
    }

    pub fn set_custom_result(&mut self, input: Vec<f32>, ci: Vec<Vec<f32>>) {
        self.custom_pending = false;
        self.custom_ci = Some((input, ci));
        self.custom_results += 1;
    }
}

/// Column order of module `j` by cluster: members of each cluster (at the shown k) in cluster
/// order, then every other subcomponent (dead or not clustered) by index.
pub fn cluster_columns(
    snapshot: &Snapshot,
    clusters: &ClusterState,
    j: usize,
    c: usize,
) -> Vec<usize> {
    let name = &snapshot.modules[j].name;
    let mut cols = vec![];
    let mut seen = vec![false; c];
    for r in &clusters.rows {
        for l in &r.members {
            if let (m, Some(i)) = crate::app::cluster_data::split_label(l)
                && m == name
                && i < c
                && !seen[i]
            {
                seen[i] = true;
                cols.push(i);
            }
        }
    }
    cols.extend((0..c).filter(|&i| !seen[i]));
    cols
}

impl CiView {
    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        module_picker(cx, ui);
        let Some(s) = cx.snapshot().cloned() else {
            return;
        };
        let has_clusters = cx.clusters.data.is_some();
        let st = &mut *self;
        if !has_clusters && st.order == Order::ByCluster {
            st.order = Order::AsIs;
        }
        if st.vmax <= 0.0 {
            st.vmax = 1.0;
        }
        if st.gamma <= 0.0 {
            st.gamma = 1.0;
        }
        ui.horizontal_wrapped(|ui| {
            ui.label("inputs:");
            ui.selectable_value(
                &mut st.input_set,
                InputSet::Probes,
                format!("one-hot probes (value {})", s.probe_value),
            );
            ui.selectable_value(
                &mut st.input_set,
                InputSet::Batch,
                format!("data batch ({})", s.n_batch),
            );
            ui.selectable_value(&mut st.input_set, InputSet::Custom, "custom");
            ui.separator();
            ui.label("columns:");
            ui.selectable_value(&mut st.order, Order::AsIs, "as is");
            ui.selectable_value(&mut st.order, Order::Hungarian, "Hungarian to diagonal");
            ui.selectable_value(&mut st.order, Order::Density, "by density");
            if ui
                .add_enabled(
                    has_clusters,
                    egui::Button::selectable(st.order == Order::ByCluster, "by cluster"),
                )
                .on_disabled_hover_text("no clustering: run one in the Clusters view")
                .clicked()
            {
                st.order = Order::ByCluster;
            }
        });
        if st.input_set == InputSet::Custom {
            self.custom_sliders(cx, ui, &s);
        }
        let mut probe = cx.settings.probe_value;
        ui.horizontal(|ui| {
            ui.add(egui::Slider::new(&mut self.vmax, 0.05..=1.0).text("colour max"))
                .on_hover_text("CI at or above this gets the brightest colour (no re-upload)");
            ui.add(egui::Slider::new(&mut self.gamma, 0.2..=3.0).text("gamma"))
                .on_hover_text("below 1 brightens small CI values");
            ui.checkbox(&mut self.log, "log")
                .on_hover_text("logarithmic colour scale from 1e-3 to the colour max");
            ui.separator();
            if ui
                .add(egui::Slider::new(&mut probe, 0.05..=1.0).text("probe value"))
                .drag_stopped()
            {
                cx.send(Command::SetProbeValue(probe));
            }
        });
        cx.settings.probe_value = probe;
        let j = cx.selection.module.min(s.modules.len() - 1);
        let by_cluster = if self.order == Order::ByCluster {
            cluster_columns(&s, cx.clusters, j, s.modules[j].c)
        } else {
            vec![]
        };
        let members = cx.selected_cluster_members(j);
        let version = cx.snapshot_version();
        // The Hungarian order is the worker's job: ask once per (snapshot, module), one
        // request at a time.
        let answered = self
            .hungarian
            .as_ref()
            .is_some_and(|(v, mj, _)| (*v, *mj) == (version, j));
        let waiting_for_this = self.hungarian_asked.is_some_and(|(_, mj)| mj == j);
        if self.order == Order::Hungarian && !answered && !waiting_for_this {
            self.hungarian_asked = Some((version, j));
            cx.send(Command::ColumnOrder {
                key: version,
                module: j,
                snapshot: s.clone(),
            });
        }
        // The newest answer for this module (of this snapshot or an earlier one).
        let hungarian = self
            .hungarian
            .as_ref()
            .filter(|(v, mj, o)| *v <= version && *mj == j && o.len() == s.modules[j].c)
            .map(|(v, _, o)| (*v, o.clone()));
        let hungarian_of = hungarian.as_ref().map(|(v, _)| *v);
        let hungarian = hungarian.map(|(_, o)| o);
        let st = &mut *self;
        let m = &s.modules[j];
        let custom: &[f32] = st
            .custom_ci
            .as_ref()
            .and_then(|(_, ci)| ci.get(j))
            .filter(|ci| ci.len() == m.c)
            .map(|v| v.as_slice())
            .unwrap_or(&[]);
        let (data, rows): (std::sync::Arc<Vec<f32>>, usize) = match st.input_set {
            InputSet::Probes => (m.ci_probe.clone(), s.n_probe),
            InputSet::Batch => (m.ci_batch.clone(), s.n_batch),
            InputSet::Custom => (
                std::sync::Arc::new(custom.to_vec()),
                custom.len() / m.c.max(1),
            ),
        };
        if rows == 0 {
            ui.label("computing the CI of the custom input...");
            return;
        }
        let values_key = (version, j, st.input_set, st.custom_results);
        let order_key = (
            values_key,
            st.order,
            cx.clusters.version,
            hungarian_of,
        );
        if st.values_key != Some(values_key) {
            // Every row is drawn as stored: the shader shows the strongest cell under each
            // pixel, and hover reads exact rows.
            st.uploads += 1;
            st.values = Some(heatmap::Data::new(data.clone(), rows, m.c, st.uploads));
            st.values_key = Some(values_key);
            st.rows = rows;
        }
        if st.order_key != Some(order_key) {
            st.columns = match st.order {
                Order::ByCluster => by_cluster,
                Order::AsIs => (0..m.c).collect(),
                Order::Hungarian => hungarian.unwrap_or_else(|| (0..m.c).collect()),
                Order::Density => {
                    let mut idx: Vec<usize> = (0..m.c).collect();
                    idx.sort_by(|&a, &b| m.mean_ci[b].total_cmp(&m.mean_ci[a]));
                    idx
                }
            };
            st.orders += 1;
            st.order_key = Some(order_key);
            let order = std::sync::Arc::new(st.columns.iter().map(|&c| c as u32).collect());
            st.values = st.values.take().map(|d| d.with_columns(order, st.orders));
        }
        let Some(values) = &st.values else { return };
        let mut avail = ui.available_size() - egui::vec2(0.0, 24.0);
        if st.input_set == InputSet::Custom {
            avail.y = avail.y.min(80.0);
        }
        // Each column's subcomponent colour (the same in every view) above the heatmap.
        let (bar, _) = ui.allocate_exact_size(egui::vec2(avail.x, 5.0), egui::Sense::hover());
        let w = bar.width() / m.c as f32;
        if w >= 2.0 {
            for (x, &c) in st.columns.iter().enumerate() {
                ui.painter().rect_filled(
                    egui::Rect::from_min_size(
                        egui::pos2(bar.left() + x as f32 * w, bar.top()),
                        egui::vec2(w, 4.0),
                    ),
                    0.0,
                    component_color(c),
                );
            }
        }
        let (rect, resp) = ui.allocate_exact_size(
            (avail - egui::vec2(0.0, 6.0)).max(egui::vec2(50.0, 50.0)),
            egui::Sense::click(),
        );
        let style = heatmap::Style {
            lo: if st.log { 1e-3 } else { 0.0 },
            hi: st.vmax,
            gamma: st.gamma,
            log: st.log,
            map: heatmap::ColorMap::Sequential,
        };
        heatmap::paint(ui, rect, egui::Id::unique("ci-heatmap"), values, style);
        let cell = |pos: egui::Pos2| heatmap::cell_at(rect, rows, m.c, pos);
        // Outline the column of subcomponent `c`, wherever the order put it.
        let outline = |c: usize, stroke: egui::Stroke| {
            if let Some(col) = st.columns.iter().position(|&k| k == c) {
                let w = rect.width() / m.c as f32;
                let r = egui::Rect::from_min_size(
                    egui::pos2(rect.left() + col as f32 * w, rect.top()),
                    egui::vec2(w, rect.height()),
                );
                ui.painter()
                    .rect_stroke(r, 0.0, stroke, egui::StrokeKind::Inside);
            }
        };
        for &mc in &members {
            outline(mc, egui::Stroke::new(2.0, CLUSTER_COLOR));
        }
        if let Some(sel) = cx.selection.component {
            outline(sel, egui::Stroke::new(1.5, egui::Color32::from_rgb(230, 80, 20)));
        }
        if let Some(pos) = resp.hover_pos()
            && let Some((r, x)) = cell(pos)
        {
            let c = st.columns[x];
            let input = match st.input_set {
                InputSet::Probes => s.probe_labels.get(r).cloned().unwrap_or_default(),
                InputSet::Custom => format!("custom input {}", custom_label(&st.custom_input)),
                InputSet::Batch => s.batch_row_label(r),
            };
            let v = data[r * m.c + c];
            resp.clone()
                .on_hover_text(format!("{input}\n{}:{c}\nCI = {v:.4}", m.name));
            if resp.clicked() {
                cx.selection.component = Some(c);
            }
        }
        let per_px = rows as f32 / (rect.height() * ui.ctx().pixels_per_point()).max(1.0);
        ui.label(format!(
            "{} rows x {} subcomponents of {} (lower-leaky CI; colour scale {} to {:.2}){}",
            rows,
            m.c,
            m.name,
            if st.log { "1e-3 (log)" } else { "0" },
            st.vmax,
            if per_px > 1.0 {
                format!("; {per_px:.1} rows per pixel, each pixel shows its strongest cell")
            } else {
                String::new()
            }
        ));
        if st.order == Order::Hungarian {
            match hungarian_of {
                None => {
                    ui.weak("(Hungarian order: waiting for the worker; shown as is)");
                }
                Some(v) if v < version => {
                    ui.weak("(Hungarian order of an earlier snapshot; the worker is updating it)");
                }
                Some(_) => {}
            }
        }
    }
}

/// The description of a custom or batch row (the engine's wording, shared with the CLI).
pub fn custom_label(input: &[f32]) -> String {
    crate::inputs::describe_features(input)
}

impl CiView {
    /// One slider per input feature; the CI of the edited row is asked from the worker (one request
    /// in flight at a time, the latest input wins).
    fn custom_sliders(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui, s: &Snapshot) {
        let nf = s.n_features;
        let (lo, hi) = s.value_range;
        let version = cx.snapshot_version();
        let st = &mut *self;
        if st.custom_input.len() != nf {
            st.custom_input = vec![0.0; nf];
            if let Some(x) = st.custom_input.first_mut() {
                *x = hi * 0.75;
            }
            st.custom_dirty = true;
        }
        let mut changed = false;
        ui.horizontal(|ui| {
            ui.label(format!("custom input ({nf} features, range {lo} to {hi}):"));
            if ui.small_button("zero all").clicked() {
                st.custom_input.iter_mut().for_each(|x| *x = 0.0);
                changed = true;
            }
            if st.custom_pending {
                ui.spinner();
            }
        });
        egui::ScrollArea::vertical()
            .id_salt("custom-sliders")
            .max_height(70.0)
            .show(ui, |ui| {
                let cols = ((ui.available_width() / 190.0) as usize).max(1);
                ui.spacing_mut().slider_width = 100.0;
                egui::Grid::new("custom-grid").show(ui, |ui| {
                    for (i, v) in st.custom_input.iter_mut().enumerate() {
                        ui.horizontal(|ui| {
                            let l = ui.label(format!("f{i}"));
                            changed |= ui
                                .add(egui::Slider::new(v, lo..=hi))
                                .labelled_by(l.id)
                                .changed();
                        });
                        if (i + 1) % cols == 0 {
                            ui.end_row();
                        }
                    }
                });
            });
        if changed || st.custom_asked_at != version {
            st.custom_dirty = true;
        }
        if st.custom_dirty && !st.custom_pending {
            let input = st.custom_input.clone();
            if cx.send(Command::CustomCi(input)) {
                st.custom_dirty = false;
                st.custom_pending = true;
                st.custom_asked_at = version;
            }
        }
    }
}

impl CiView {
    /// CSV of the heatmap as shown: rows = inputs (labelled), columns = subcomponents in the
    /// shown order.
    fn csv_job(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let s = cx.require_snapshot()?.clone();
        let st = self;
        let j = cx.selection.module.min(s.modules.len().saturating_sub(1));
        let m = s
            .modules
            .get(j)
            .ok_or_else(|| anyhow::anyhow!("the decomposition has no modules"))?;
        let columns: Vec<usize> = if st.columns.len() == m.c {
            st.columns.clone()
        } else {
            (0..m.c).collect()
        };
        let custom = match (st.input_set, &st.custom_ci) {
            (InputSet::Custom, Some((input, ci))) if ci.get(j).is_some_and(|v| v.len() == m.c) => {
                Some((input.clone(), ci[j].clone()))
            }
            (InputSet::Custom, _) => anyhow::bail!("the custom input's CI has not arrived yet"),
            _ => None,
        };
        let input_set = st.input_set;
        Ok(Box::new(move || {
            let m = &s.modules[j];
            let nf = s.n_features;
            let (data, labels): (&[f32], Vec<String>) = match (input_set, &custom) {
                (InputSet::Custom, Some((input, ci))) => {
                    (ci, vec![format!("custom: {}", custom_label(input))])
                }
                (InputSet::Probes, _) | (InputSet::Custom, None) => (
                    &m.ci_probe,
                    if s.probe_labels.len() == s.n_probe {
                        s.probe_labels.clone()
                    } else {
                        (0..nf)
                            .map(|i| format!("feature {i} = {}", s.probe_value))
                            .collect()
                    },
                ),
                (InputSet::Batch, _) => (
                    &m.ci_batch,
                    (0..s.n_batch).map(|r| s.batch_row_label(r)).collect(),
                ),
            };
            Ok(crate::app::export::ci_csv(m, data, &labels, &columns))
        }))
    }
}
