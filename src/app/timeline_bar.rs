//! The timeline bar under the views: scrub to a frame (every view shows it), play and pause at
//! a chosen speed, return to the live run, and export the current view over the timeline as
//! an animated GIF or numbered PNGs (with the step shown).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eframe::egui;

use super::SpdApp;
use crate::worker::Command;

/// Playback of the timeline.
#[derive(Clone, Debug)]
pub struct Playback {
    pub playing: bool,
    /// Frames per second.
    pub fps: f32,
    /// Frames of an animation export at most (evenly chosen, first and last included).
    pub export_frames: usize,
    pub(super) last: Option<Instant>,
}

impl Default for Playback {
    fn default() -> Self {
        Playback {
            playing: false,
            fps: 8.0,
            export_frames: 120,
            last: None,
        }
    }
}

/// Where an animation goes.
#[derive(Clone, Debug, PartialEq)]
pub enum AnimTarget {
    /// One animated GIF.
    Gif(PathBuf),
    /// `frame_0000_step_<step>.png`, ... in this folder.
    Pngs(PathBuf),
}

impl AnimTarget {
    /// `.gif` paths are GIFs; anything else is a folder of PNGs.
    pub fn from_path(p: PathBuf) -> Self {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gif")) {
            AnimTarget::Gif(p)
        } else {
            AnimTarget::Pngs(p)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    /// Ask for the frame.
    Show,
    /// Wait for its snapshot.
    Wait,
    /// Let the view draw it for this many more frames.
    Paint(u8),
    /// Wait for the screenshot.
    Shot,
}

/// An animation export in progress: one frame after the other is shown, drawn and captured.
pub struct AnimExport {
    pub target: AnimTarget,
    pub steps: Vec<usize>,
    pub next: usize,
    stage: Stage,
    shots: Arc<Mutex<Vec<Option<image::RgbaImage>>>>,
    /// Milliseconds per frame in the GIF.
    pub delay_ms: u32,
    /// The frame shown before (restored at the end).
    return_to: Option<usize>,
    /// Close the app when done (`--export-animation`).
    pub exit_when_done: bool,
}

/// Encodes frames as an endlessly looping animated GIF (all cropped to the first's size).
pub fn encode_gif(frames: &[image::RgbaImage], delay_ms: u32) -> anyhow::Result<Vec<u8>> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let Some(first) = frames.first() else {
        anyhow::bail!("no frames to encode");
    };
    let (w, h) = first.dimensions();
    let mut out = vec![];
    {
        let mut enc = GifEncoder::new_with_speed(&mut out, 10);
        enc.set_repeat(Repeat::Infinite)?;
        for f in frames {
            let img = if f.dimensions() == (w, h) {
                f.clone()
            } else {
                let mut c = image::RgbaImage::new(w, h);
                image::imageops::overlay(&mut c, f, 0, 0);
                c
            };
            enc.encode_frame(image::Frame::from_parts(
                img,
                0,
                0,
                image::Delay::from_numer_denom_ms(delay_ms, 1),
            ))?;
        }
    }
    Ok(out)
}

/// At most `k` (≥ 2) of `steps`, evenly spread, the first and the last included.
pub fn spread(steps: &[usize], k: usize) -> Vec<usize> {
    let n = steps.len();
    let k = k.max(2);
    if n <= k {
        return steps.to_vec();
    }
    let mut out: Vec<usize> = (0..k).map(|i| steps[i * (n - 1) / (k - 1)]).collect();
    out.dedup();
    out
}

/// Crops a screenshot to `rect` (points), as RGBA.
pub fn crop(image: &egui::ColorImage, rect: egui::Rect, ppp: f32) -> Option<image::RgbaImage> {
    let [w, h] = image.size;
    let ppp = if ppp > 0.0 { ppp } else { 1.0 };
    let clamp = |v: f32, hi: usize| ((v * ppp).round().max(0.0) as usize).min(hi);
    let (x0, x1) = (clamp(rect.min.x, w), clamp(rect.max.x, w));
    let (y0, y1) = (clamp(rect.min.y, h), clamp(rect.max.y, h));
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    let mut rgba = Vec::with_capacity((x1 - x0) * (y1 - y0) * 4);
    for y in y0..y1 {
        for p in &image.pixels[y * w + x0..y * w + x1] {
            rgba.extend_from_slice(&p.to_srgba_unmultiplied());
        }
    }
    image::RgbaImage::from_raw((x1 - x0) as u32, (y1 - y0) as u32, rgba)
}

impl SpdApp {
    /// Steps of the timeline's frames (empty without one).
    pub fn timeline_steps(&self) -> Vec<usize> {
        self.session
            .timeline
            .as_ref()
            .map(|t| t.steps.clone())
            .unwrap_or_default()
    }

    /// Index of the frame the bar points at: the one asked for, else (live) the newest.
    pub fn timeline_index(&self) -> Option<usize> {
        let t = self.session.timeline.as_ref()?;
        if t.steps.is_empty() {
            return None;
        }
        Some(match self.session.want_frame {
            Some(s) => t.nearest(s).unwrap_or(0),
            None => t.steps.len() - 1,
        })
    }

    /// Scrubs to frame `i` of the timeline (clamped): every view shows it; live follow stops.
    pub fn scrub_to(&mut self, i: usize) {
        let steps = self.timeline_steps();
        if let Some(&s) = steps.get(i.min(steps.len().saturating_sub(1))) {
            self.session.show_frame(Some(s));
        }
    }

    /// Back to the live run (the bar follows the newest frame again).
    pub fn go_live(&mut self) {
        self.playback.playing = false;
        self.session.show_frame(None);
    }

    /// Starts an animation export of the current view over every frame.
    pub fn export_animation(&mut self, target: AnimTarget) {
        let steps = self.timeline_steps();
        if steps.len() < 2 {
            self.session.error = Some("export failed: the run has no timeline to animate".into());
            return;
        }
        self.playback.playing = false;
        let steps = spread(&steps, self.playback.export_frames);
        let n = steps.len();
        self.anim = Some(AnimExport {
            target,
            steps,
            next: 0,
            stage: Stage::Show,
            shots: Arc::new(Mutex::new(vec![None; n])),
            delay_ms: (1000.0 / self.playback.fps.max(0.5)) as u32,
            return_to: self.session.want_frame,
            exit_when_done: false,
        });
    }

    /// Advances playback and a running export (called once per frame).
    pub(super) fn tick_timeline(&mut self, ctx: &egui::Context) {
        if self.anim.is_some() {
            self.tick_export(ctx);
            return;
        }
        if !self.playback.playing {
            return;
        }
        let steps = self.timeline_steps();
        let Some(i) = self.timeline_index() else {
            self.playback.playing = false;
            return;
        };
        let period = Duration::from_secs_f32(1.0 / self.playback.fps.clamp(0.5, 60.0));
        let due = self.playback.last.is_none_or(|t| t.elapsed() >= period);
        if due && self.session.frame_settled() {
            if i + 1 >= steps.len() {
                self.playback.playing = false;
            } else {
                self.scrub_to(i + 1);
                self.playback.last = Some(Instant::now());
            }
        }
        ctx.request_repaint_after(period / 2);
    }

    fn tick_export(&mut self, ctx: &egui::Context) {
        let Some(a) = self.anim.as_mut() else {
            return;
        };
        ctx.request_repaint();
        let step = a.steps[a.next];
        match a.stage {
            Stage::Show => {
                a.stage = Stage::Wait;
                self.session.show_frame(Some(step));
            }
            Stage::Wait => {
                if self.session.frame_settled() && self.session.shown_frame() == Some(step) {
                    a.stage = Stage::Paint(2);
                }
            }
            Stage::Paint(k) if k > 0 => a.stage = Stage::Paint(k - 1),
            Stage::Paint(_) => {
                let Some(rect) = self.view_rect else {
                    return;
                };
                a.stage = Stage::Shot;
                let shots = a.shots.clone();
                let i = a.next;
                let ppp = ctx.pixels_per_point();
                ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
                    egui::ScreenshotCallback::new(move |image| {
                        if let Ok(mut s) = shots.lock() {
                            s[i] = Some(crop(&image, rect, ppp).unwrap_or_default());
                        }
                    }),
                ));
            }
            Stage::Shot => {
                let done = a.shots.lock().map(|s| s[a.next].is_some()).unwrap_or(false);
                if done {
                    a.next += 1;
                    a.stage = Stage::Show;
                    if a.next == a.steps.len() {
                        self.finish_export(ctx);
                    }
                }
            }
        }
    }

    fn finish_export(&mut self, ctx: &egui::Context) {
        let Some(a) = self.anim.take() else {
            return;
        };
        let frames: Vec<image::RgbaImage> = a
            .shots
            .lock()
            .map(|mut s| s.iter_mut().filter_map(Option::take).collect())
            .unwrap_or_default();
        let n = frames.len();
        match &a.target {
            AnimTarget::Gif(path) => {
                let delay = a.delay_ms;
                let job = crate::worker::ExportJob::new(move || encode_gif(&frames, delay));
                if !self.send(Command::Export {
                    path: path.clone(),
                    job: job.clone(),
                }) && let Err(e) = job
                    .run()
                    .and_then(|b| super::export::write_atomic(path, &b))
                {
                    self.session.error = Some(format!("export failed: {e:#}"));
                }
            }
            AnimTarget::Pngs(dir) => {
                if let Err(e) = std::fs::create_dir_all(dir) {
                    self.session.error = Some(format!("{}: cannot create: {e}", dir.display()));
                } else {
                    for (i, (img, step)) in frames.into_iter().zip(&a.steps).enumerate() {
                        let path = dir.join(format!("frame_{i:04}_step_{step:08}.png"));
                        let job =
                            crate::worker::ExportJob::new(move || super::export::png_bytes(&img));
                        if !self.send(Command::Export {
                            path: path.clone(),
                            job: job.clone(),
                        }) && let Err(e) = job
                            .run()
                            .and_then(|b| super::export::write_atomic(&path, &b))
                        {
                            self.session.error = Some(format!("export failed: {e:#}"));
                        }
                    }
                }
            }
        }
        self.session.status = format!("exporting {n} frames...");
        self.session.show_frame(a.return_to);
        if a.exit_when_done {
            self.exit_on_export = match &a.target {
                AnimTarget::Gif(p) => Some(p.clone()),
                AnimTarget::Pngs(dir) => a
                    .steps
                    .last()
                    .map(|s| dir.join(format!("frame_{:04}_step_{s:08}.png", a.steps.len() - 1))),
            };
        }
        ctx.request_repaint();
    }

    /// Whether an animation export is running, and how far it is (frames captured, total).
    pub fn export_progress(&self) -> Option<(usize, usize)> {
        self.anim.as_ref().map(|a| (a.next, a.steps.len()))
    }

    /// The bar (shown when the run has a timeline).
    pub(super) fn timeline_bar(&mut self, ui: &mut egui::Ui) {
        let Some(t) = self.session.timeline.clone() else {
            return;
        };
        let n = t.steps.len();
        ui.horizontal(|ui| {
            let name = ui.label("Timeline");
            if n == 0 {
                ui.label("no frames yet (they come while the run trains)");
                return;
            }
            let playing = self.playback.playing;
            if ui
                .add_enabled(n > 1 && self.anim.is_none(), egui::Button::new(if playing { "Pause" } else { "Play" }))
                .on_hover_text("Play the frames in order at the chosen speed")
                .clicked()
            {
                self.playback.playing = !playing;
                self.playback.last = None;
                if !playing && self.timeline_index() == Some(n - 1) {
                    // From the end (or live): start over.
                    self.scrub_to(0);
                }
            }
            ui.add(
                egui::DragValue::new(&mut self.playback.fps)
                    .range(0.5..=60.0)
                    .speed(0.2)
                    .suffix(" fps"),
            )
            .on_hover_text("Playback speed (and the GIF's frame rate)");
            let live = self.session.want_frame.is_none();
            let mut idx = self.timeline_index().unwrap_or(0);
            let right = 400.0;
            ui.spacing_mut().slider_width = (ui.available_width() - right).max(80.0);
            let r = ui.add_enabled(
                n > 1 && self.anim.is_none(),
                egui::Slider::new(&mut idx, 0..=n - 1).show_value(false),
            )
            .labelled_by(name.id);
            if r.changed() {
                self.playback.playing = false;
                self.scrub_to(idx);
            }
            let step = t.steps[idx.min(n - 1)];
            let shown = match (live, self.session.shown_frame()) {
                (true, _) => format!("live · step {step}"),
                (false, Some(s)) if s == step => format!("step {step}"),
                (false, _) => format!("step {step} (loading)"),
            };
            ui.label(format!("{shown} · frame {}/{n}", idx + 1))
                .on_hover_text(format!(
                    "{} frames, every {} steps, {:.1} MB{}",
                    n,
                    t.every,
                    t.bytes as f64 / (1 << 20) as f64,
                    t.options
                        .map(|o| format!(
                            " ({}, at most {} frames / {} MB)",
                            if o.f16 { "f16" } else { "f32" },
                            o.max_frames,
                            o.cap_bytes >> 20
                        ))
                        .unwrap_or_default()
                ));
            if ui
                .add_enabled(!live, egui::Button::new("Live"))
                .on_hover_text("Back to the live run; the bar follows the newest frame")
                .clicked()
            {
                self.go_live();
            }
            match self.export_progress() {
                Some((i, total)) => {
                    ui.add(
                        egui::ProgressBar::new(i as f32 / total.max(1) as f32)
                            .desired_width(80.0)
                            .text(format!("{i}/{total}")),
                    );
                    if ui.button("Cancel").clicked() {
                        let back = self.anim.take().and_then(|a| a.return_to);
                        self.session.show_frame(back);
                    }
                }
                None => {
                    ui.menu_button("Animate...", |ui| {
                        ui.horizontal(|ui| {
                            ui.label("frames");
                            ui.add(
                                egui::DragValue::new(&mut self.playback.export_frames)
                                    .range(2..=100_000),
                            )
                            .on_hover_text("At most this many frames, evenly spread (first and last included); the speed is the fps above");
                        });
                        let stem = self.views[self.current()].file_stem();
                        if ui
                            .button("Animated GIF...")
                            .on_hover_text("This view over every frame, with the step shown")
                            .clicked()
                        {
                            ui.close();
                            if let Some(p) = rfd::FileDialog::new()
                                .add_filter("gif", &["gif"])
                                .set_file_name(format!("{stem}-timeline.gif"))
                                .save_file()
                            {
                                self.export_animation(AnimTarget::Gif(p));
                            }
                        }
                        if ui
                            .button("PNG frames...")
                            .on_hover_text("One numbered PNG per frame, in a folder")
                            .clicked()
                        {
                            ui.close();
                            if let Some(p) = rfd::FileDialog::new().pick_folder() {
                                self.export_animation(AnimTarget::Pngs(p));
                            }
                        }
                    });
                }
            }
        });
    }
}
