//! Limits on every size and count that comes from a file, a config or a flag.
//!
//! A number read from input must never size an allocation or a loop unchecked: a 62 KB file
//! saying `C: 10^12` once made spdlab try to allocate 20 TB. Each field has a generous upper
//! bound (far above the largest goodfire-ai/spd configs, LMs included), checked when the value
//! is read; allocations sized from input also pass [`check_memory`], which compares an estimate
//! with the machine's memory. Errors name the field, the value and the limit; the caller adds
//! the file.

/// Subcomponents per module (`C`). The reference's largest LM configs use a few thousand.
pub const MAX_C: usize = 1 << 17; // 131,072
/// Width of one CI-function hidden layer (the reference uses 8–1,000 or so).
pub const MAX_CI_HIDDEN: usize = 1 << 16; // 65,536
/// Number of CI-function hidden layers.
pub const MAX_CI_HIDDEN_LAYERS: usize = 16;
/// Rows of a training or evaluation batch (reference toy configs: 2,048–4,096; LMs: ≤ 1,024).
pub const MAX_BATCH: usize = 1 << 20; // 1,048,576
/// Training steps (reference runs: 10k–400k).
pub const MAX_STEPS: usize = 100_000_000;
/// Faithfulness warm-up steps (reference: 200–400).
pub const MAX_WARMUP_STEPS: usize = 10_000_000;
/// Evaluation batches of one evaluation (reference: 1–100).
pub const MAX_EVAL_STEPS: usize = 100_000;
/// Mask samples per step.
pub const MAX_MASK_SAMPLES: usize = 4_096;
/// PGD ascent steps per loss evaluation.
pub const MAX_PGD_STEPS: usize = 100_000;
/// Decomposed modules of one model.
pub const MAX_MODULES: usize = 4_096;
/// Any one dimension of a target model (features, hidden width, d_embed, d_mlp, vocabulary).
pub const MAX_DIM: usize = 1 << 21; // 2,097,152 (vocabularies of 256k included)
/// Layers of a target model.
pub const MAX_LAYERS: usize = 1_024;
/// Rows drawn for clustering or an input set.
pub const MAX_SAMPLES: usize = 1 << 20;
/// Sequence length of the coming sequence models (reference LMs: ≤ 2,048).
pub const MAX_SEQ_LEN: usize = 1 << 16;
/// Tokens per sequence of a language-model decomposition (attention scores grow with its
/// square; the reference's configs use 512).
pub const MAX_LM_SEQ_LEN: usize = 8192;
/// Timeline frames in a file.
pub const MAX_FRAMES: usize = 1 << 20;
/// Size of a safetensors header (JSON) we are willing to parse.
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// A value above its limit, or otherwise out of range.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitError(pub String);

impl std::fmt::Display for LimitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitError {}

/// `field = value` must be at most `max`.
pub fn check(field: &str, value: usize, max: usize) -> Result<(), LimitError> {
    if value > max {
        Err(LimitError(format!(
            "{field} = {value} is above spdlab's limit of {max}"
        )))
    } else {
        Ok(())
    }
}

/// `field` must be in `1..=max`.
pub fn check_positive(field: &str, value: usize, max: usize) -> Result<(), LimitError> {
    if value == 0 {
        return Err(LimitError(format!("{field} must be at least 1, got 0")));
    }
    check(field, value, max)
}

/// The product of `factors` (element counts), or an error naming `what` on overflow.
pub fn product(what: &str, factors: &[usize]) -> Result<usize, LimitError> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| LimitError(format!("{what}: size {factors:?} overflows")))
}

/// Memory spdlab allows itself for one allocation plan: the machine's physical memory, or
/// `SPDLAB_MAX_MEMORY_MB` when set (lower it to fail early, raise it for swap-backed runs).
pub fn memory_budget_bytes() -> u64 {
    if let Some(mb) = std::env::var("SPDLAB_MAX_MEMORY_MB")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        return mb.saturating_mul(1 << 20);
    }
    physical_memory_bytes().unwrap_or(16 << 30)
}

fn physical_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `what` needs about `elements` f32 values: an error when that exceeds the memory budget.
pub fn check_memory(what: &str, elements: u128) -> Result<(), LimitError> {
    let bytes = elements.saturating_mul(4);
    let budget = memory_budget_bytes() as u128;
    if bytes > budget {
        Err(LimitError(format!(
            "{what} would need about {} of memory, more than this machine's {} (set SPDLAB_MAX_MEMORY_MB to change the limit)",
            human_bytes(bytes),
            human_bytes(budget)
        )))
    } else {
        Ok(())
    }
}

/// `1.5 GB`-style size.
pub fn human_bytes(b: u128) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_field_value_and_limit() {
        let e = check("C", 1_000_000_000_000, MAX_C).unwrap_err().0;
        assert!(
            e.contains("C = 1000000000000") && e.contains("131072"),
            "{e}"
        );
        assert!(check("C", MAX_C, MAX_C).is_ok());
        let e = check_positive("steps", 0, MAX_STEPS).unwrap_err().0;
        assert!(e.contains("steps must be at least 1"), "{e}");
        assert!(product("V", &[usize::MAX, 2]).is_err());
        assert_eq!(product("V", &[3, 4]).unwrap(), 12);
    }

    #[test]
    fn memory_estimates_are_checked() {
        assert!(check_memory("small", 1000).is_ok());
        let e = check_memory("huge", 5_000_000_000_000).unwrap_err().0;
        assert!(e.contains("huge would need about 20.0 TB"), "{e}");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1_500_000_000), "1.5 GB");
    }
}
