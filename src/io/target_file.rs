//! Target models on disk: safetensors with the reference's state-dict key names and the
//! architecture as JSON metadata (`spdlab_target`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::model::{TargetModel, TargetSpec};

/// Serialises a target (its spec in the metadata). Tied tensors are stored once.
pub fn target_to_safetensors_bytes(model: &TargetModel) -> anyhow::Result<Vec<u8>> {
    let mut tensors: Vec<(String, Tensor)> = vec![];
    for (k, t) in &model.params {
        let tied = k == "W_U"
            || (k == "linear2.weight"
                && matches!(
                    model.spec,
                    TargetSpec::Tms {
                        tied_weights: true,
                        ..
                    }
                ));
        if !tied {
            tensors.push((k.clone(), t.contiguous()?));
        }
    }
    let mut meta = HashMap::new();
    meta.insert(
        "spdlab_target".to_string(),
        serde_json::to_string(&model.spec)?,
    );
    Ok(safetensors::serialize(
        tensors
            .iter()
            .map(|(k, t)| (k.as_str(), super::spdlab_file::TensorView(t))),
        Some(meta),
    )?)
}

/// Reads a target; when the file carries a spec it must equal `expect` (if given).
pub fn target_from_safetensors_bytes(
    bytes: &[u8],
    expect: &TargetSpec,
    device: &Device,
) -> anyhow::Result<TargetModel> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)?;
    if let Some(s) = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("spdlab_target"))
    {
        let spec: TargetSpec = serde_json::from_str(s)?;
        // A language model's sequence length is the decomposition's window, not part of the
        // architecture.
        let same = match (&spec, expect) {
            (TargetSpec::Lm { model: a, .. }, TargetSpec::Lm { model: b, .. }) => a == b,
            _ => &spec == expect,
        };
        if !same {
            anyhow::bail!("target architecture {spec:?} differs from the expected {expect:?}");
        }
    }
    let named = super::spdlab_file::read_tensors(bytes, device)?;
    TargetModel::new(expect.clone(), named, device)
}

pub fn save_target(model: &TargetModel, path: &Path) -> anyhow::Result<()> {
    let bytes = target_to_safetensors_bytes(model)?;
    super::atomic::write_atomic(path, &bytes)
        .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))
}
