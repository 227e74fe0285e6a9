//! Trajectories over the timeline: per subcomponent its norm and mean CI against step, and an
//! alive/dead timeline of a module (alive at a frame: its largest CI on the fixed batch is
//! above a threshold, set with a slider). A click on the alive map selects the subcomponent
//! and shows that frame in every view.

use std::sync::Arc;

use eframe::egui;
use egui_plot::{Line, Plot, PlotPoints, VLine};

use crate::app::view::{Action, CsvJob, View, ViewCtx};
use crate::app::widgets;
use crate::timeline::TimelineIndex;

/// The alive map `[C][frames]` and the alive count per frame.
type AliveData = (Vec<Vec<bool>>, Vec<usize>);

pub struct TrajectoriesView {
    /// Alive threshold of the map (None: the run's `ci_alive_threshold`).
    pub threshold: Option<f32>,
    /// Draw only the subcomponents alive at some frame.
    pub only_alive: bool,
    /// The alive map's texture and what it was made from (timeline version, module,
    /// threshold bits).
    texture: Option<(egui::TextureHandle, (u64, usize, u32))>,
    /// Norm and mean-CI lines of a module (timeline version, module), thinned.
    lines: Option<((u64, usize), Arc<Lines>)>,
    /// The alive map and counts of (timeline version, module, threshold bits).
    alive: Option<((u64, usize, u32), Arc<AliveData>)>,
}

/// Points per trajectory line at most (min and max of each bucket kept): a module of 1000
/// subcomponents over 300 frames stays cheap to draw.
pub const LINE_POINTS: usize = 64;
/// Trajectory lines drawn at most per plot (the largest by peak norm, and the selection).
pub const MAX_LINES: usize = 24;

/// Per subcomponent: its norm and mean-CI trajectories as plot points.
pub struct Lines {
    pub norm: Vec<Vec<[f64; 2]>>,
    pub mean_ci: Vec<Vec<[f64; 2]>>,
}

impl Lines {
    pub fn new(t: &TimelineIndex, j: usize) -> Self {
        let c = t.stats.first().and_then(|s| s.get(j)).map_or(0, |m| m.norm.len());
        let series = |f: &dyn Fn(&crate::timeline::ModuleStats, usize) -> f32| -> Vec<Vec<[f64; 2]>> {
            (0..c)
                .map(|k| {
                    let pts: Vec<[f64; 2]> = t
                        .steps
                        .iter()
                        .zip(&t.stats)
                        .map(|(&s, st)| [s as f64, f(&st[j], k) as f64])
                        .collect();
                    super::training::thin(&pts, LINE_POINTS)
                })
                .collect()
        };
        Lines {
            norm: series(&|m, k| m.norm[k]),
            mean_ci: series(&|m, k| m.mean_ci[k]),
        }
    }
}

impl Default for TrajectoriesView {
    fn default() -> Self {
        TrajectoriesView {
            threshold: None,
            only_alive: true,
            texture: None,
            lines: None,
            alive: None,
        }
    }
}

/// Alive state of module `j`'s subcomponents at every frame: `[C][frames]`.
pub fn alive_map(t: &TimelineIndex, j: usize, thr: f32) -> Vec<Vec<bool>> {
    let c = t
        .stats
        .first()
        .and_then(|s| s.get(j))
        .map_or(0, |m| m.max_ci.len());
    (0..c)
        .map(|k| {
            t.stats
                .iter()
                .map(|s| s.get(j).and_then(|m| m.max_ci.get(k)).is_some_and(|&v| v > thr))
                .collect()
        })
        .collect()
}

/// Alive subcomponents of module `j` per frame.
pub fn alive_counts(t: &TimelineIndex, j: usize, thr: f32) -> Vec<usize> {
    t.stats
        .iter()
        .map(|s| {
            s.get(j)
                .map_or(0, |m| m.max_ci.iter().filter(|&&v| v > thr).count())
        })
        .collect()
}

impl View for TrajectoriesView {
    fn name(&self) -> &'static str {
        "trajectories"
    }
    fn label(&self) -> &'static str {
        "Trajectories"
    }
    fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        self.show(cx, ui)
    }
    fn csv(&self, cx: &ViewCtx) -> anyhow::Result<CsvJob> {
        let t = cx
            .session
            .timeline
            .clone()
            .filter(|t| !t.steps.is_empty())
            .ok_or_else(|| anyhow::anyhow!("this run has no timeline"))?;
        let names: Vec<String> = cx
            .require_snapshot()?
            .modules
            .iter()
            .map(|m| m.name.clone())
            .collect();
        Ok(Box::new(move || Ok(csv(&t, &names))))
    }
}

/// One row per (frame, module, subcomponent): step, norm, mean CI, max CI.
pub fn csv(t: &TimelineIndex, names: &[String]) -> String {
    let mut out = String::from("step,module,component,norm,mean_ci,max_ci\n");
    for (step, st) in t.steps.iter().zip(&t.stats) {
        for (m, name) in st.iter().zip(names) {
            for c in 0..m.norm.len() {
                out.push_str(&format!(
                    "{step},{name},{c},{},{},{}\n",
                    m.norm[c], m.mean_ci[c], m.max_ci[c]
                ));
            }
        }
    }
    out
}

impl TrajectoriesView {
    fn show(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
        widgets::module_picker(cx, ui);
        let Some(t) = cx.session.timeline.clone().filter(|t| !t.steps.is_empty()) else {
            ui.label(
                "This run has no timeline yet: frames are kept while it trains (spdlab train keeps 300 by default; --timeline-frames), and a goodfire-ai/spd run folder has one frame per model_<step>.pth.",
            );
            return;
        };
        let j = cx.selection.module;
        if t.stats[0].get(j).is_none() {
            return;
        }
        let run_thr = cx
            .session
            .config
            .as_ref()
            .map_or(0.0, |c| c.ci_alive_threshold as f32);
        let mut thr = self.threshold.unwrap_or(run_thr);
        ui.horizontal(|ui| {
            if ui
                .add(
                    egui::Slider::new(&mut thr, 0.0..=1.0)
                        .text("alive threshold: the largest CI on the fixed batch exceeds it"),
                )
                .changed()
            {
                self.threshold = Some(thr);
            }
            if ui
                .small_button("run's threshold")
                .on_hover_text(format!("ci_alive_threshold = {run_thr}"))
                .clicked()
            {
                self.threshold = None;
                thr = run_thr;
            }
            ui.checkbox(&mut self.only_alive, "only subcomponents alive at some frame");
        });
        let akey = (t.version, j, thr.to_bits());
        if self.alive.as_ref().is_none_or(|(k, _)| *k != akey) {
            let m = alive_map(&t, j, thr);
            let n = alive_counts(&t, j, thr);
            self.alive = Some((akey, Arc::new((m, n))));
        }
        let alive = self.alive.as_ref().map(|(_, a)| a.clone()).unwrap_or_default();
        let (map, counts) = (&alive.0, &alive.1);
        let ever: Vec<bool> = map.iter().map(|r| r.iter().any(|&a| a)).collect();
        let shown: Vec<usize> = (0..map.len())
            .filter(|&c| !self.only_alive || ever[c])
            .collect();
        let frame_step = cx.session.shown_frame();
        let sel = cx.selection.component;
        let h = ((ui.available_height() - 40.0) / 3.0).max(90.0);
        if self.lines.as_ref().is_none_or(|(k, _)| *k != (t.version, j)) {
            self.lines = Some(((t.version, j), Arc::new(Lines::new(&t, j))));
        }
        let lines = self.lines.as_ref().map(|(_, l)| l.clone()).unwrap_or_else(|| Arc::new(Lines::new(&t, j)));
        let line = |c: usize, pts: &[[f64; 2]]| {
            let mut l = Line::new(format!("{c}"), PlotPoints::from(pts.to_vec()))
                .color(widgets::component_color(c));
            if sel == Some(c) {
                l = l.width(3.0);
            } else if sel.is_some() {
                l = l.color(widgets::component_color(c).gamma_multiply(0.35));
            }
            l
        };
        ui.label(format!(
            "{} frames, steps {} to {}; {} of {} subcomponents alive at some frame, {} at the last",
            t.steps.len(),
            t.steps[0],
            t.steps[t.steps.len() - 1],
            ever.iter().filter(|&&a| a).count(),
            map.len(),
            map.iter().filter(|r| r.last() == Some(&true)).count()
        ));
        // The lines: the selected subcomponent and the largest by peak norm, at most
        // MAX_LINES (a hundred overlapping lines read as noise and cost frame time).
        let mut drawn: Vec<usize> = shown.clone();
        let peak = |c: usize| {
            t.stats
                .iter()
                .map(|st| st[j].norm[c])
                .fold(0f32, f32::max)
        };
        drawn.sort_by(|&a, &b| peak(b).total_cmp(&peak(a)));
        drawn.truncate(MAX_LINES);
        if let Some(c) = sel
            && c < map.len()
            && !drawn.contains(&c)
        {
            drawn.push(c);
        }
        if drawn.len() < shown.len() {
            ui.label(format!(
                "lines: the {} largest of {} by peak norm{}; select a subcomponent (alive map below, or any view) to add it",
                MAX_LINES,
                shown.len(),
                if sel.is_some() { " and the selection" } else { "" }
            ));
        }
        let shown_lines = drawn;
        ui.columns(2, |cols| {
            cols[0].label("norm ||V_c||*||U_c|| against step");
            Plot::new("traj-norm")
                .height(h)
                .allow_scroll(false)
                .show(&mut cols[0], |p| {
                    for &c in &shown_lines {
                        p.line(line(c, &lines.norm[c]));
                    }
                    if let Some(s) = frame_step {
                        p.vline(VLine::new("frame", s as f64).color(egui::Color32::WHITE));
                    }
                });
            cols[1].label("mean CI on the fixed batch against step");
            Plot::new("traj-mean-ci")
                .height(h)
                .allow_scroll(false)
                .show(&mut cols[1], |p| {
                    for &c in &shown_lines {
                        p.line(line(c, &lines.mean_ci[c]));
                    }
                    if let Some(s) = frame_step {
                        p.vline(VLine::new("frame", s as f64).color(egui::Color32::WHITE));
                    }
                });
        });
        ui.label("alive subcomponents against step");
        Plot::new("traj-alive")
            .height(h * 0.6)
            .allow_scroll(false)
            .show(ui, |p| {
                let pts: PlotPoints = t
                    .steps
                    .iter()
                    .zip(counts)
                    .map(|(&s, &n)| [s as f64, n as f64])
                    .collect();
                p.line(Line::new("alive", pts));
                if let Some(s) = frame_step {
                    p.vline(VLine::new("frame", s as f64).color(egui::Color32::WHITE));
                }
            });
        self.alive_map_ui(cx, ui, &t, j, thr, map, &shown);
    }

    /// The alive/dead map: rows the shown subcomponents, columns the frames.
    #[allow(clippy::too_many_arguments)]
    fn alive_map_ui(
        &mut self,
        cx: &mut ViewCtx,
        ui: &mut egui::Ui,
        t: &Arc<TimelineIndex>,
        j: usize,
        thr: f32,
        map: &[Vec<bool>],
        shown: &[usize],
    ) {
        ui.label("alive (green; the selection yellow) and dead (dark) per subcomponent (rows) and frame (columns); click: select it and show that frame");
        let n = t.steps.len();
        if shown.is_empty() || n == 0 {
            ui.label("(no subcomponent is alive at this threshold)");
            return;
        }
        let key = (
            t.version,
            j,
            thr.to_bits() ^ ((shown.len() as u32) << 20) ^ cx.selection.component.map_or(0, |c| c as u32 + 1).rotate_left(12),
        );
        if self.texture.as_ref().is_none_or(|(_, k)| *k != key) {
            let mut img = egui::ColorImage::new([n, shown.len()], vec![egui::Color32::BLACK; n * shown.len()]);
            for (r, &c) in shown.iter().enumerate() {
                let col = if cx.selection.component == Some(c) {
                    egui::Color32::from_rgb(255, 210, 60)
                } else {
                    egui::Color32::from_rgb(90, 180, 110)
                };
                for (px, &alive) in img.pixels[r * n..(r + 1) * n].iter_mut().zip(&map[c]) {
                    *px = if alive {
                        col
                    } else {
                        egui::Color32::from_gray(28)
                    };
                }
            }
            let tex = ui
                .ctx()
                .load_texture("alive-map", img, egui::TextureOptions::NEAREST);
            self.texture = Some((tex, key));
        }
        let Some((tex, _)) = &self.texture else {
            return;
        };
        let size = egui::vec2(
            ui.available_width(),
            ui.available_height().clamp(60.0, (shown.len() as f32 * 6.0).max(60.0)),
        );
        let (rect, resp) = ui.allocate_exact_size(size, egui::Sense::click());
        ui.painter().image(
            tex.id(),
            rect,
            egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0)),
            egui::Color32::WHITE,
        );
        let cell = |p: egui::Pos2| {
            let f = (((p.x - rect.left()) / rect.width()) * n as f32).floor() as usize;
            let r = (((p.y - rect.top()) / rect.height()) * shown.len() as f32).floor() as usize;
            (f.min(n - 1), shown[r.min(shown.len() - 1)])
        };
        if let Some(s) = cx.session.shown_frame()
            && let Some(f) = t.steps.iter().position(|&x| x == s)
        {
            let x = rect.left() + (f as f32 + 0.5) / n as f32 * rect.width();
            ui.painter().vline(x, rect.y_range(), egui::Stroke::new(1.5, egui::Color32::WHITE));
        }
        if let Some(p) = resp.hover_pos() {
            let (f, c) = cell(p);
            let m = &t.stats[f][j];
            resp.clone().on_hover_text(format!(
                "subcomponent {c}, step {}: {} (max CI {:.3}, mean CI {:.3}, norm {:.3})",
                t.steps[f],
                if map[c][f] { "alive" } else { "dead" },
                m.max_ci[c],
                m.mean_ci[c],
                m.norm[c]
            ));
        }
        if resp.clicked()
            && let Some(p) = resp.interact_pointer_pos()
        {
            let (f, c) = cell(p);
            cx.selection.component = Some(c);
            cx.request(Action::ShowFrame(Some(t.steps[f])));
        }
    }
}
