//! The timeline bar (kittest, real worker): scrubbing moves every view to the frame; live
//! follow stops on scrub and resumes on the Live button.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use spdlab::app::{SpdApp, StartOptions};
use spdlab::io::spdlab_file::{self, FileExtras};
use spdlab::timeline::TimelineOptions;

/// A short run of `preset` with a timeline of f32 frames, saved in `dir`.
fn run_with_timeline(dir: &Path, preset: &str, steps: usize) -> PathBuf {
    let dev = Device::Cpu;
    let target = spdlab::presets::target_model(preset, &dev).unwrap();
    let mut cfg = spdlab::presets::spd_config(preset).unwrap();
    cfg.steps = steps;
    cfg.batch_size = cfg.batch_size.min(256);
    let mut tr = spdlab::spd::trainer::Trainer::new(target, cfg).unwrap();
    tr.set_timeline(TimelineOptions {
        max_frames: 12,
        f16: false,
        cap_bytes: 1 << 30,
    });
    let mut ex = FileExtras {
        preset: Some(preset.into()),
        ..Default::default()
    };
    spdlab::runner::run_training(
        &mut tr,
        &mut ex,
        &spdlab::runner::RunOptions { autosave: None },
        |_, _| {},
    )
    .unwrap();
    let p = dir.join(format!("{preset}.spdlab"));
    spdlab_file::save(&tr, &ex, &p).unwrap();
    p
}

/// The app on `file`'s `view`, once its snapshot and at least `frames` frames are in.
fn open_with_frames(file: &Path, view: &str, frames: usize) -> Harness<'static, SpdApp> {
    let mut h = common::app_on(file.to_path_buf(), Some(view), egui::vec2(1200.0, 800.0));
    common::wait(&mut h, "the timeline", |a| {
        a.session.snapshot.is_some()
            && a.session
                .timeline
                .as_ref()
                .is_some_and(|t| t.steps.len() >= frames)
    });
    h
}

fn settle(h: &mut Harness<'static, SpdApp>, what: &str) {
    common::wait(h, what, |a| a.session.frame_settled());
    h.step();
}

/// The snapshot the app shows equals one built from the frame's own decomposition.
fn assert_shows_frame(app: &SpdApp, file: &Path, step: usize) {
    let s = app.session.snapshot.as_ref().unwrap();
    assert_eq!(s.frame, Some(step));
    assert_eq!(s.step, step);
    let (tr, _) = spdlab_file::load(file, &Device::Cpu).unwrap();
    let tl = tr.timeline.as_ref().unwrap();
    let ft = spdlab::timeline::frame_trainer(&tr, tl, tl.frame_at(step).unwrap()).unwrap();
    let want = spdlab::worker::build_snapshot(&ft, 0.75, 256).unwrap();
    for (a, b) in s.modules.iter().zip(&want.modules) {
        assert_eq!(a.u, b.u, "{} U at step {step}", a.name);
        assert_eq!(a.v, b.v, "{} V at step {step}", a.name);
        assert_eq!(a.ci_probe, b.ci_probe, "{} probe CI at step {step}", a.name);
        assert_eq!(a.norms, b.norms);
    }
    // The directions view's data is the frame's.
    assert_eq!(
        spdlab::app::export::directions_csv(s),
        spdlab::app::export::directions_csv(&want)
    );
}

#[test]
fn scrubbing_moves_every_view_to_the_frame() {
    let d = tempfile::tempdir().unwrap();
    let file = run_with_timeline(d.path(), "tms-5-2", 400);
    let mut h = open_with_frames(&file, "directions", 10);
    let steps = h.state().timeline_steps();
    assert_eq!(steps[0], 0);
    assert_eq!(*steps.last().unwrap(), 401);
    // Live at first: the bar points at the newest frame, the views at the run.
    assert_eq!(h.state().timeline_index(), Some(steps.len() - 1));
    assert_eq!(h.state().session.shown_frame(), None);
    h.get_by_label_contains("live");
    // Interventions run on the frame shown: ask for one live, then scrub.
    h.state_mut().set_view("interventions");
    common::wait(&mut h, "a live intervention", |a| {
        a.view::<spdlab::app::views::interventions::InterventionsView>()
            .is_some_and(|v| v.outcome.is_some())
    });
    let live_out = h
        .state()
        .view::<spdlab::app::views::interventions::InterventionsView>()
        .unwrap()
        .outcome
        .clone()
        .unwrap();
    let target = steps[2];
    h.state_mut().scrub_to(2);
    settle(&mut h, "frame 2");
    assert_shows_frame(h.state(), &file, target);
    common::wait(&mut h, "the intervention on the frame", |a| {
        a.view::<spdlab::app::views::interventions::InterventionsView>()
            .and_then(|v| v.outcome.as_ref())
            .is_some_and(|o| !std::sync::Arc::ptr_eq(o, &live_out))
    });
    let on_frame = h
        .state()
        .view::<spdlab::app::views::interventions::InterventionsView>()
        .unwrap()
        .outcome
        .clone()
        .unwrap();
    // It is the frame's intervention, not the live run's.
    let (tr, _) = spdlab_file::load(&file, &Device::Cpu).unwrap();
    let tl = tr.timeline.as_ref().unwrap();
    let ft = spdlab::timeline::frame_trainer(&tr, tl, tl.frame_at(target).unwrap()).unwrap();
    let want = spdlab::worker::intervene(&ft, None, on_frame.request.clone()).unwrap();
    assert_eq!(on_frame.result.intervened, want.result.intervened);
    assert_ne!(on_frame.result.intervened, live_out.result.intervened);
    // Every view draws the frame (and the bar names it).
    for name in spdlab::app::view_names() {
        h.state_mut().set_view(name);
        h.step();
        h.step();
        assert_eq!(h.state().session.shown_frame(), Some(target), "{name}");
    }
    h.get_by_label_contains(&format!("step {target} · frame 3/"));
    // Scrub on: each frame in turn.
    h.state_mut().set_view("ci");
    for i in [0, steps.len() / 2, steps.len() - 1] {
        h.state_mut().scrub_to(i);
        settle(&mut h, "a frame");
        assert_shows_frame(h.state(), &file, steps[i]);
    }
    // Back to live.
    h.get_by_label("Live").click();
    common::wait(&mut h, "the live run", |a| {
        a.session.frame_settled() && a.session.shown_frame().is_none()
    });
    assert_eq!(h.state().session.snapshot.as_ref().unwrap().step, 401);
}

#[test]
fn the_days_view_follows_the_frame() {
    let d = tempfile::tempdir().unwrap();
    let file = run_with_timeline(d.path(), "days", 300);
    let mut h = open_with_frames(&file, "days", 3);
    let live = h.state().session.snapshot.clone().unwrap();
    h.state_mut().scrub_to(0);
    settle(&mut h, "frame 0");
    h.step();
    let s = h.state().session.snapshot.clone().unwrap();
    assert_eq!(s.frame, Some(0));
    let (tr, _) = spdlab_file::load(&file, &Device::Cpu).unwrap();
    let tl = tr.timeline.as_ref().unwrap();
    let ft = spdlab::timeline::frame_trainer(&tr, tl, &tl.frames[0]).unwrap();
    let want = spdlab::metrics::days::days_view_data(&ft.model, None).unwrap();
    let got = s.days.as_ref().unwrap();
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
    assert_ne!(
        format!("{got:?}"),
        format!("{:?}", live.days.as_ref().unwrap())
    );
}

#[test]
fn live_follow_stops_on_scrub_and_resumes_on_the_button() {
    let mut h = Harness::builder()
        .with_size(egui::vec2(1200.0, 800.0))
        .wgpu()
        .build_eframe(|cc| {
            let w = spdlab::worker::WorkerHandle::spawn(Device::Cpu, Box::new(|| {}));
            SpdApp::new(
                cc,
                Some(w),
                StartOptions {
                    train_preset: Some("tms-5-2".into()),
                    view: Some("directions".into()),
                    ..Default::default()
                },
            )
        });
    let frames = |a: &SpdApp| a.session.timeline.as_ref().map_or(0, |t| t.steps.len());
    common::wait(&mut h, "three frames while training", |a| frames(a) >= 3);
    // Live: the views show the running decomposition, the bar its newest frame.
    assert_eq!(h.state().session.want_frame, None);
    assert_eq!(h.state().timeline_index(), Some(frames(h.state()) - 1));
    // Scrub back: the frame stays while training goes on and frames arrive.
    h.state_mut().scrub_to(1);
    settle(&mut h, "frame 1");
    let held = h.state().session.shown_frame().unwrap();
    let n0 = frames(h.state());
    let step0 = h.state().session.step();
    let t0 = Instant::now();
    while frames(h.state()) < n0 + 2 {
        assert!(t0.elapsed() < Duration::from_secs(90), "no new frames");
        std::thread::sleep(Duration::from_millis(30));
        h.step();
    }
    assert!(h.state().session.step() > step0, "training went on");
    assert_eq!(h.state().session.shown_frame(), Some(held));
    assert_eq!(h.state().timeline_index(), Some(1));
    // The Live button: the views follow the run again, the bar its newest frame.
    h.get_by_label("Live").click();
    common::wait(&mut h, "live again", |a| {
        a.session.frame_settled() && a.session.shown_frame().is_none()
    });
    let n1 = frames(h.state());
    let t0 = Instant::now();
    while frames(h.state()) < n1 + 1 {
        assert!(t0.elapsed() < Duration::from_secs(90), "no new frames");
        std::thread::sleep(Duration::from_millis(30));
        h.step();
    }
    assert_eq!(h.state().timeline_index(), Some(frames(h.state()) - 1));
    let snap_step = h.state().session.snapshot.as_ref().unwrap().step;
    assert!(snap_step > held, "live snapshot at {snap_step}");
    h.state_mut().send_command(spdlab::worker::Command::Pause);
}

#[test]
fn trajectories_click_on_the_alive_map_selects_and_scrubs() {
    let d = tempfile::tempdir().unwrap();
    let file = run_with_timeline(d.path(), "tms-5-2", 400);
    let mut h = open_with_frames(&file, "trajectories", 10);
    h.run_steps(3);
    h.get_by_label_contains("frames, steps 0 to 401");
    // The CSV: one row per frame, module and subcomponent.
    let csv_path = d.path().join("traj.csv");
    h.state_mut().export_csv(&csv_path).unwrap();
    common::wait(&mut h, "the CSV", |_| csv_path.exists());
    let n_frames = h.state().timeline_steps().len();
    let rows = std::fs::read_to_string(&csv_path).unwrap().lines().count() - 1;
    assert_eq!(rows, n_frames * 2 * 20, "frames x modules x C");
    // A click low on the map, a fifth of the way along: that subcomponent and frame.
    let r = h.state().view_rect.unwrap();
    let p = egui::pos2(r.left() + r.width() * 0.2, r.bottom() - 8.0);
    h.event(egui::Event::PointerMoved(p));
    h.run_steps(2);
    h.event(egui::Event::PointerButton {
        pos: p,
        button: egui::PointerButton::Primary,
        pressed: true,
        modifiers: Default::default(),
    });
    h.event(egui::Event::PointerButton {
        pos: p,
        button: egui::PointerButton::Primary,
        pressed: false,
        modifiers: Default::default(),
    });
    h.run_steps(2);
    assert!(
        h.state().selection.component.is_some(),
        "a subcomponent is selected"
    );
    let steps = h.state().timeline_steps();
    let want = h.state().session.want_frame.expect("a frame is shown");
    let i = steps.iter().position(|&s| s == want).unwrap();
    assert!(
        i >= n_frames / 10 && i <= n_frames * 3 / 10,
        "frame {i} of {n_frames}"
    );
    settle(&mut h, "the clicked frame");
    assert_shows_frame(h.state(), &file, want);
}
