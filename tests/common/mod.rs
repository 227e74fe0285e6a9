//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

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
