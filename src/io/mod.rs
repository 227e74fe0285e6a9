//! Files: the `.spdlab` format, target files, atomic writes.

pub mod atomic;
pub mod output;
pub mod pth;
pub mod reference;
pub mod spdlab_file;
pub mod target_file;

use std::path::Path;

use candle_core::Device;

use crate::spd::trainer::Trainer;

/// Opens anything spdlab reads: a `.spdlab` file, or a goodfire-ai/spd run (folder or `.pth`).
/// Returns the trainer, the file extras, and import warnings.
pub fn load_any(
    path: &Path,
    device: &Device,
) -> anyhow::Result<(Trainer, spdlab_file::FileExtras, Vec<String>)> {
    if reference::is_reference_run(path) {
        let (mut tr, mut info) = reference::import(path, device)?;
        tr.timeline = reference::timeline(&info.checkpoint, &tr, device, &mut info.warnings)?;
        if let crate::model::TargetSpec::Lm { model, seq_len } = &tr.model.target.spec {
            match reference::lm_corpus(&info.checkpoint, *seq_len, model.vocab_size) {
                Ok(d) => tr.data = crate::data::TaskData::Tokens(d),
                Err(e) => info.warnings.push(format!(
                    "no local text for this language model ({e}): batches are random tokens"
                )),
            }
        }
        let extras = spdlab_file::FileExtras {
            preset: None,
            warmup_done: true,
            extra: Default::default(),
        };
        Ok((tr, extras, info.warnings))
    } else {
        let (tr, extras) = spdlab_file::load(path, device)?;
        Ok((tr, extras, vec![]))
    }
}
