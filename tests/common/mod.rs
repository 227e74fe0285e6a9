//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui;
use egui_kittest::Harness;
use spdlab::app::{SpdApp, StartOptions};

/// The reference TMS 5-2 run shipped as a fixture (made by goodfire-ai/spd).
pub const RUN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ref-tms_5-2");

/// A copy of the reference run's files in `dir/run`.
pub fn copy_run(dir: &Path) -> PathBuf {
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    for f in [
        "final_config.yaml",
        "model_10000.pth",
        "tms.pth",
        "tms_train_config.yaml",
    ] {
        std::fs::copy(Path::new(RUN).join(f), run.join(f)).unwrap();
    }
    run
}

/// The app with a real worker, opened on `file` (and `view`, if given).
pub fn app_on(file: PathBuf, view: Option<&str>, size: egui::Vec2) -> Harness<'static, SpdApp> {
    let view = view.map(str::to_string);
    Harness::builder()
        .with_size(size)
        .wgpu()
        .build_eframe(move |cc| {
            let w = spdlab::worker::WorkerHandle::spawn(candle_core::Device::Cpu, Box::new(|| {}));
            SpdApp::new(
                cc,
                Some(w),
                StartOptions {
                    file: Some(file.clone()),
                    view: view.clone(),
                    ..Default::default()
                },
            )
        })
}

/// Steps the app until `done` (at most 90 s); a worker error fails the test.
pub fn wait(h: &mut Harness<'static, SpdApp>, what: &str, done: impl Fn(&SpdApp) -> bool) {
    let t0 = Instant::now();
    while !done(h.state()) {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}"
        );
        if let Some(e) = &h.state().session.error {
            panic!("{what}: {e}");
        }
        std::thread::sleep(Duration::from_millis(20));
        h.step();
    }
}
