//! Inputs of a decomposition's target: one-hot probes, rows from a JSON file or the training
//! distribution, and their short descriptions. Shared by the CLI, the worker and the metrics.

use std::path::Path;

use serde::Deserialize;

/// Largest input value accepted (toy features live in [-1, 1]).
pub const MAX_INPUT_ABS: f32 = 1e6;

/// Reads `{"inputs": [[...], ...]}` with rows of length `n_features`.
pub fn read_inputs(path: &Path, n_features: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    #[derive(Deserialize)]
    struct Inputs {
        inputs: Vec<Vec<f32>>,
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let inp: Inputs = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{}: expected {{\"inputs\": [[...], ...]}}: {e}",
            path.display()
        )
    })?;
    if inp.inputs.is_empty() {
        anyhow::bail!("{}: no inputs", path.display());
    }
    crate::limits::check(
        "inputs (rows)",
        inp.inputs.len(),
        crate::limits::MAX_SAMPLES,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for (i, r) in inp.inputs.iter().enumerate() {
        if r.len() != n_features {
            anyhow::bail!(
                "{}: input {i} has {} values, the model has {n_features} features",
                path.display(),
                r.len()
            );
        }
        if r.iter().any(|x| !x.is_finite()) {
            anyhow::bail!("{}: input {i} contains a non-finite value", path.display());
        }
        // Far beyond any feature scale; larger values overflow f32 inside the model.
        if let Some(x) = r.iter().find(|x| x.abs() > MAX_INPUT_ABS) {
            anyhow::bail!(
                "{}: input {i} has the value {x:e}, outside ±{MAX_INPUT_ABS:e} (outputs would overflow)",
                path.display()
            );
        }
    }
    Ok(inp.inputs)
}

/// Probe inputs of a model: one row per feature with that feature at `value` (for targets with
/// grouped one-hot inputs, such as days, every combination of one feature per group).
pub fn probe_inputs(spec: &crate::model::TargetSpec, value: f32) -> Vec<Vec<f32>> {
    let nf = spec.n_features();
    match spec.input_groups() {
        Some(groups) => {
            let mut rows: Vec<Vec<f32>> = vec![vec![0.0; nf]];
            let mut start = 0;
            for (g, optional) in groups {
                let mut next = vec![];
                for r in &rows {
                    if optional {
                        next.push(r.clone());
                    }
                    for i in 0..g {
                        let mut r = r.clone();
                        r[start + i] = 1.0;
                        next.push(r);
                    }
                }
                rows = next;
                start += g;
            }
            rows
        }
        None => (0..nf)
            .map(|i| {
                let mut r = vec![0.0; nf];
                r[i] = value;
                r
            })
            .collect(),
    }
}

/// Resolves an input-set argument: `probes` or `probes:VALUE` (one-hot probes, default 0.75),
/// `batch:N` or `batch:N:SEED` (N rows from the training distribution), or a JSON file
/// `{"inputs": [[...], ...]}`.
pub fn resolve_inputs(
    arg: &str,
    tr: &crate::spd::trainer::Trainer,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let nf = tr.model.target.spec.n_features();
    if arg == "probes" || arg.starts_with("probes:") {
        let v = match arg.strip_prefix("probes:") {
            Some(s) => s
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite() && v.abs() <= MAX_INPUT_ABS)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--inputs {arg}: the probe value must be a number within ±{MAX_INPUT_ABS:e}"
                    )
                })?,
            None => 0.75,
        };
        return Ok(probe_inputs(&tr.model.target.spec, v));
    }
    if let Some(rest) = arg.strip_prefix("batch:") {
        let mut it = rest.split(':');
        let n: usize = it
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|&n| n > 0 && n <= 1 << 20)
            .ok_or_else(|| {
                anyhow::anyhow!("--inputs {arg}: expected batch:N with 0 < N <= 1048576")
            })?;
        let seed: u64 = match it.next() {
            Some(s) => s
                .parse()
                .map_err(|_| anyhow::anyhow!("--inputs {arg}: bad seed"))?,
            None => 0,
        };
        let raw = tr.data.batch(&mut crate::rng::Rng::new(seed), n);
        return Ok(raw.chunks(nf).map(|r| r.to_vec()).collect());
    }
    let rows = read_inputs(Path::new(arg), nf)?;
    check_rows(&tr.model.target.spec, &rows).map_err(|e| anyhow::anyhow!("{arg}: {e}"))?;
    Ok(rows)
}

/// Checks input rows against the model: for sequence models every value must be a token id
/// (a whole number in 0..vocab + 2).
pub fn check_rows(spec: &crate::model::TargetSpec, rows: &[Vec<f32>]) -> Result<(), String> {
    let (n, what) = match spec {
        crate::model::TargetSpec::Ih(d) => (
            d.n_tokens(),
            format!(
                "0..{}: 0 = BOS, 1..={} tokens, {} = S",
                d.n_tokens() - 1,
                d.vocab_size,
                d.induction_token()
            ),
        ),
        crate::model::TargetSpec::Lm { model, .. } => {
            (model.vocab_size, format!("0..{}", model.vocab_size - 1))
        }
        _ => return Ok(()),
    };
    for (i, r) in rows.iter().enumerate() {
        if let Some((p, v)) = r
            .iter()
            .enumerate()
            .find(|(_, v)| v.fract() != 0.0 || **v < 0.0 || **v >= n as f32)
        {
            return Err(format!(
                "input {i}, position {p}: {v} is not a token id ({what})"
            ));
        }
    }
    Ok(())
}

/// The first token ids of a sequence (`12 7 301 ... (32 tokens)`).
pub fn describe_tokens(x: &[f32]) -> String {
    let head: Vec<String> = x.iter().take(8).map(|&v| (v as u32).to_string()).collect();
    format!("{} ... ({} tokens)", head.join(" "), x.len())
}

/// Short description of an input row: its active features (`f3=0.75`), or the (day, op) label.
pub fn describe_input(spec: &crate::model::TargetSpec, x: &[f32]) -> String {
    if let crate::model::TargetSpec::Days { n_days, n_ops } = spec
        && let Some((d, o)) = crate::model::days::decode_input(*n_days, *n_ops, x)
    {
        return crate::model::days::input_label(*n_days, d, o);
    }
    if let crate::model::TargetSpec::Ih(dims) = spec {
        return describe_sequence(dims, x);
    }
    if let crate::model::TargetSpec::Lm { .. } = spec {
        return describe_tokens(x);
    }
    describe_features(x)
}

/// Description of position `p` of sequence `i` (`x` its tokens).
pub fn describe_position(spec: &crate::model::TargetSpec, i: usize, x: &[f32], p: usize) -> String {
    match spec {
        crate::model::TargetSpec::Ih(d) => format!(
            "sequence {i}, position {p}: token {} ({})",
            x.get(p).map_or(0, |&v| v as u32),
            describe_sequence(d, x)
        ),
        crate::model::TargetSpec::Lm { .. } => format!(
            "sequence {i}, position {p}: token {} ({})",
            x.get(p).map_or(0, |&v| v as u32),
            describe_tokens(x)
        ),
        _ => describe_input(spec, x),
    }
}

/// Short description of a token sequence: where the induction pair is and the answer, or
/// the first tokens (`S` is the induction token, `BOS` token 0).
pub fn describe_sequence(dims: &crate::model::IhDims, x: &[f32]) -> String {
    let t: Vec<u32> = x.iter().map(|&v| v as u32).collect();
    let name = |v: u32| match v as usize {
        0 => "BOS".to_string(),
        k if k == dims.induction_token() => "S".to_string(),
        k => k.to_string(),
    };
    match crate::model::ih::induction_answer(&t, dims) {
        Some((p, m)) => format!("S at {p}, then {m}; the last S should predict {m}"),
        None => {
            let head: Vec<String> = t.iter().take(8).map(|&v| name(v)).collect();
            format!(
                "{} ... ({} tokens, no induction pair)",
                head.join(" "),
                t.len()
            )
        }
    }
}

/// Short description of a feature row: its active features (`f3=0.75`, at most six named).
pub fn describe_features(x: &[f32]) -> String {
    let active: Vec<String> = x
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0.0)
        .map(|(i, v)| format!("f{i}={v:.2}"))
        .collect();
    if active.is_empty() {
        "(all zero)".into()
    } else if active.len() > 6 {
        format!("{} ... ({} active)", active[..6].join(" "), active.len())
    } else {
        active.join(" ")
    }
}
