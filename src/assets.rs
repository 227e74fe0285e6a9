//! Files shipped inside the binary.

/// Trained target of a preset (safetensors), if shipped.
pub fn target_bytes(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "tms-5-2" => include_bytes!("../assets/targets/tms-5-2.safetensors"),
        "tms-40-10" => include_bytes!("../assets/targets/tms-40-10.safetensors"),
        "resid-mlp-1" => include_bytes!("../assets/targets/resid-mlp-1.safetensors"),
        "resid-mlp-2" => include_bytes!("../assets/targets/resid-mlp-2.safetensors"),
        "resid-mlp-3" => include_bytes!("../assets/targets/resid-mlp-3.safetensors"),
        // spdlab train-target --preset ih --seed 2: induction accuracy 1.0000 on 8192
        // generated sequences (chance 1/128), final loss 0.0037.
        "ih" => include_bytes!("../assets/targets/ih.safetensors"),
        // spdlab train-target --preset tiny-lm --seed 0 (accuracies in
        // assets/tiny-lm/accuracy.json).
        "tiny-lm" => include_bytes!("../assets/tiny-lm/tiny-lm.safetensors"),
        _ => return None,
    })
}

/// The decomposition the app opens by default: the tms-5-2 preset trained with the full
/// reference config (seed 0, 10k steps; target-solution error 0, MMCS 1.000).
pub fn default_decomposition() -> &'static [u8] {
    include_bytes!("../assets/decompositions/tms-5-2.spdlab")
}

/// Decompositions shipped in the binary, by name.
pub fn decomposition(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "tms-5-2" => default_decomposition(),
        "days" => include_bytes!("../assets/decompositions/days.spdlab"),
        _ => return None,
    })
}

/// The tiny-lm tokenizer (`spdlab train-target --preset tiny-lm`: byte-level BPE trained on
/// the generated language; every word one token).
pub fn tiny_lm_tokenizer() -> &'static [u8] {
    include_bytes!("../assets/tiny-lm/tokenizer.json")
}
