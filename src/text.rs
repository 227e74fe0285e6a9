//! Text for language models: a `tokenizer.json` tokenizer (the `tokenizers` crate, as the
//! reference's HF fast tokenizers), local text files (plain text or JSONL), and the reference's
//! tokenize-and-concatenate chunking (`spd/data.py`): documents joined by the EOS string,
//! tokenized in 20 character chunks per map batch, cut into non-overlapping windows of `n_ctx`
//! tokens, the tail of each batch dropped. Nothing is downloaded: a tokenizer named by a model
//! hub id is opened from a local copy.

use crate::sequence::{softmax, top_k, top_k_probs};

use std::path::{Path, PathBuf};

/// Most bytes of text read from one file.
pub const MAX_TEXT_BYTES: u64 = 1 << 31;

/// A tokenizer with its end-of-text token.
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    /// The EOS string (joins documents) and its id.
    pub eos: String,
    pub eos_id: u32,
    /// Where it was read from.
    pub path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("eos", &self.eos)
            .field("vocab", &self.vocab_size())
            .finish()
    }
}

impl TextTokenizer {
    /// Reads `tokenizer.json` (a file, or a folder holding it, as `save_pretrained` writes; the
    /// EOS token comes from `tokenizer_config.json` beside it, else `<|endoftext|>`).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            anyhow::bail!(
                "{}: no tokenizer.json here (spdlab reads tokenizers from local files; for a model-hub tokenizer, point at a local copy of its folder)",
                path.display()
            );
        }
        let len = std::fs::metadata(&file)?.len();
        crate::limits::check("tokenizer.json size (bytes)", len as usize, 1 << 30)?;
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("{}: not a tokenizer.json: {e}", file.display()))?;
        let cfg = file.with_file_name("tokenizer_config.json");
        let eos = std::fs::read_to_string(&cfg)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| match &v["eos_token"] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                _ => None,
            })
            .unwrap_or_else(|| "<|endoftext|>".to_string());
        let eos_id = inner.token_to_id(&eos).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the end-of-text token {eos:?} is not in the vocabulary",
                file.display()
            )
        })?;
        Ok(TextTokenizer {
            inner,
            eos,
            eos_id,
            path: file,
        })
    }

    /// A tokenizer from `tokenizer.json` text (EOS `<|endoftext|>`); `name` names it in errors.
    pub fn from_json(json: &str, name: &str) -> anyhow::Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| anyhow::anyhow!("{name}: not a tokenizer.json: {e}"))?;
        let eos = "<|endoftext|>".to_string();
        let eos_id = inner
            .token_to_id(&eos)
            .ok_or_else(|| anyhow::anyhow!("{name}: no {eos:?} token"))?;
        Ok(TextTokenizer {
            inner,
            eos,
            eos_id,
            path: PathBuf::from(name),
        })
    }

    /// The tokenizer a config names: the built-in `spdlab:tiny-lm`, or a local file or folder.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        if name == crate::tinylm::BUILTIN {
            crate::tinylm::tokenizer()
        } else {
            Self::load(Path::new(name))
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` without added special tokens (`add_special_tokens=False`).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of `text` for a model of `vocab` tokens: at least one, every id inside it.
    pub fn encode_for(&self, text: &str, vocab: usize) -> anyhow::Result<Vec<u32>> {
        let ids = self.encode(text)?;
        if ids.is_empty() {
            anyhow::bail!("the text has no tokens");
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            anyhow::bail!(
                "{}: token id {t} is outside the model's vocabulary ({vocab}): not the run's tokenizer?",
                self.path.display()
            );
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens kept, as `tokenizer.decode(ids)`).
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }

    /// Each token's text (for labels; see [`displayable`]).
    pub fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&i| self.token_text(i)).collect()
    }

    /// One token's text for display.
    pub fn token_text(&self, id: u32) -> String {
        displayable(&self.decode(&[id]).unwrap_or_else(|_| format!("<{id}>")))
    }
}

/// Text for display: ASCII and Latin letters as they are; other characters (a byte-level
/// token's partial UTF-8 decodes to U+FFFD) as `\u{..}` escapes, which every font can draw.
pub fn displayable(s: &str) -> String {
    s.chars()
        .map(|ch| match ch {
            ' '..='~' | '\u{a0}'..='\u{17f}' => ch.to_string(),
            '\n' => "\\n".to_string(),
            _ => format!("\\u{{{:x}}}", ch as u32),
        })
        .collect()
}

/// Documents of a local text file: JSONL (one object per line; the `column` field, default
/// `story` then `text`) or plain text (documents separated by blank lines).
pub fn read_documents(path: &Path, column: Option<&str>) -> anyhow::Result<Vec<String>> {
    let err = |m: String| anyhow::anyhow!("{}: {m}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if meta.len() > MAX_TEXT_BYTES {
        return Err(err(format!(
            "{} bytes of text; spdlab reads at most {MAX_TEXT_BYTES} from one file",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read as UTF-8 text: {e}")))?;
    let jsonl = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
    if jsonl {
        let mut out = vec![];
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| err(format!("line {}: not JSON: {e}", i + 1)))?;
            let field = match column {
                Some(c) => v.get(c),
                None => v.get("story").or_else(|| v.get("text")),
            };
            let s = field.and_then(|f| f.as_str()).ok_or_else(|| {
                err(format!(
                    "line {}: no text field {}",
                    i + 1,
                    column.map_or("\"story\" or \"text\"".to_string(), |c| format!("{c:?}"))
                ))
            })?;
            out.push(s.to_string());
        }
        Ok(out)
    } else {
        Ok(text
            .split("\n\n")
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .collect())
    }
}

/// The reference's `tokenize_and_concatenate` on `docs`: the documents are split into
/// `num_proc` contiguous shards (as `datasets.map(num_proc=...)` does), each processed in map
/// batches of `batch` documents; a batch's documents are joined by the EOS string, cut into 20
/// equal character chunks, each tokenized on its own (with `to_lower`, the lower-cased EOS
/// string in a chunk is put back first), concatenated and cut into rows of `n_ctx` tokens; the
/// tail of each batch is dropped. Returns the rows.
pub fn tokenize_and_concatenate(
    docs: &[String],
    tok: &TextTokenizer,
    n_ctx: usize,
    to_lower: bool,
    num_proc: usize,
    batch: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    if n_ctx == 0 {
        anyhow::bail!("n_ctx must be at least 1");
    }
    let n = docs.len();
    let k = num_proc.clamp(1, n.max(1));
    let (div, rem) = (n / k, n % k);
    let mut rows = vec![];
    for i in 0..k {
        let start = i * div + i.min(rem);
        let end = start + div + usize::from(i < rem);
        for b in docs[start..end].chunks(batch.max(1)) {
            let full = b.join(&tok.eos);
            let chars: Vec<char> = full.chars().collect();
            let len = (chars.len().max(1) - 1) / 20 + 1;
            let mut tokens = vec![];
            for c in 0..20 {
                let lo = (c * len).min(chars.len());
                let hi = ((c + 1) * len).min(chars.len());
                let mut chunk: String = chars[lo..hi].iter().collect();
                if to_lower {
                    chunk = chunk.replace(&tok.eos.to_lowercase(), &tok.eos);
                }
                tokens.extend(tok.encode(&chunk)?);
            }
            for r in tokens.chunks_exact(n_ctx) {
                rows.push(r.to_vec());
            }
        }
    }
    Ok(rows)
}

/// A prompt through a language-model decomposition: its tokens, CI per module per token, and
/// the next-token predictions of the target and of the CI-masked decomposition.
#[derive(Clone, Debug)]
pub struct PromptResult {
    pub text: String,
    pub ids: Vec<u32>,
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Tokens of the text beyond the model's sequence length (left out).
    pub dropped: usize,
    pub modules: Vec<String>,
    /// Lower-leaky CI per module, `[n_tokens, C]` row-major.
    pub ci: Vec<Vec<f32>>,
    pub c: Vec<usize>,
    /// Per position, the 5 most likely next tokens (text, probability): target, CI-masked.
    pub top_target: Vec<Vec<(String, f32)>>,
    pub top_masked: Vec<Vec<(String, f32)>>,
    /// KL(target ‖ CI-masked) per position, nats.
    pub kl: Vec<f32>,
    /// An intervention on the prompt, when one was asked for.
    pub intervention: Option<PromptIntervention>,
}

/// A selection masked on a prompt, under two regimes for everything else: CI-masked others,
/// and stochastic masks (g + (1 − g)·U, mean over `samples` draws).
#[derive(Clone, Debug)]
pub struct PromptIntervention {
    pub select: String,
    /// The selection's mask (0 = ablate, 1 = keep, 2 = boost, ...).
    pub scale: f32,
    /// The selection's labels (`module:index`).
    pub labels: Vec<String>,
    /// Per regime: its name, the top-5 next tokens per position before (the regime's own
    /// masks) and after, and KL(target ‖ ·) per position before and after.
    pub regimes: Vec<RegimeResult>,
}

#[derive(Clone, Debug)]
pub struct RegimeResult {
    pub name: &'static str,
    pub top_before: Vec<Vec<(String, f32)>>,
    pub top_after: Vec<Vec<(String, f32)>>,
    pub kl_before: Vec<f32>,
    pub kl_after: Vec<f32>,
}

/// A prompt's row: its tokens padded with EOS to the sequence length.
pub fn row_of(ids: &[u32], seq_len: usize, tok: &TextTokenizer) -> Vec<f32> {
    let mut row: Vec<f32> = ids.iter().map(|&t| t as f32).collect();
    row.resize(seq_len, tok.eos_id as f32);
    row
}

/// Adds softmax(`logits`) / `samples` to `acc`.
fn add_probs(acc: &mut [f32], logits: &[f32], samples: usize) {
    for (a, p) in acc.iter_mut().zip(softmax(logits)) {
        *a += p / samples as f32;
    }
}

/// Runs `text` through a language-model decomposition (the first `seq_len` tokens; the rest
/// is reported as dropped; a short prompt is padded with EOS, which earlier positions of a
/// causal model never see).
pub fn run_prompt(
    model: &crate::spd::component_model::ComponentModel,
    tok: &TextTokenizer,
    text: &str,
    intervention: Option<(&crate::interventions::Selection, String, f32)>,
) -> anyhow::Result<PromptResult> {
    let crate::model::TargetSpec::Lm {
        model: cfg,
        seq_len,
    } = &model.target.spec
    else {
        anyhow::bail!("prompts need a language-model decomposition");
    };
    let all = tok.encode_for(text, cfg.vocab_size)?;
    let n = all.len().min(*seq_len);
    let ids = all[..n].to_vec();
    let row = row_of(&ids, *seq_len, tok);
    let rep = crate::runner::ci_report(model, std::slice::from_ref(&row), false)?;
    let names: Vec<String> = model.modules.iter().map(|m| m.name.clone()).collect();
    let ci = names.iter().map(|m| rep.ci[m][..n].concat()).collect();
    let top = |out: &[Vec<f32>]| -> Vec<Vec<(String, f32)>> {
        out[..n]
            .iter()
            .map(|l| {
                top_k(l, 5)
                    .into_iter()
                    .map(|(i, p)| (tok.token_text(i), p))
                    .collect()
            })
            .collect()
    };
    let intervention = match intervention {
        None => None,
        Some((sel, spec, scale)) => {
            use crate::interventions::{Intervention, MaskMode, run_intervention};
            let mut rng = crate::rng::Rng::new(0x9e0);
            let mut regimes = vec![];
            let target_p: Vec<Vec<f32>> =
                rep.target_output[..n].iter().map(|l| softmax(l)).collect();
            for (name, other, samples) in [
                ("CI-masked others", MaskMode::Ci, 1),
                (
                    "stochastic masks (mean of 8 draws)",
                    MaskMode::Stochastic,
                    8,
                ),
                (
                    "adversarial (PGD worst case, 20 steps)",
                    MaskMode::Adversarial,
                    1,
                ),
            ] {
                let iv = Intervention {
                    selection: sel.clone(),
                    selected_mode: MaskMode::Scale(scale),
                    other_mode: other,
                    delta: false,
                };
                // Probabilities averaged over the draws (one draw for CI-masked others).
                let mut before = vec![vec![0f32; cfg.vocab_size]; n];
                let mut after = vec![vec![0f32; cfg.vocab_size]; n];
                for _ in 0..samples {
                    let r = run_intervention(model, std::slice::from_ref(&row), &iv, &mut rng)?;
                    for p in 0..n {
                        add_probs(&mut before[p], &r.baseline[p], samples);
                        add_probs(&mut after[p], &r.intervened[p], samples);
                    }
                }
                let kl = |q: &[Vec<f32>]| -> Vec<f32> {
                    target_p
                        .iter()
                        .zip(q)
                        .map(|(p, q)| {
                            p.iter()
                                .zip(q)
                                .filter(|(a, _)| **a > 0.0)
                                .map(|(a, b)| a * (a.ln() - b.max(1e-30).ln()))
                                .sum()
                        })
                        .collect()
                };
                let top = |probs: &[Vec<f32>]| -> Vec<Vec<(String, f32)>> {
                    probs
                        .iter()
                        .map(|pr| {
                            top_k_probs(pr, 5)
                                .into_iter()
                                .map(|(i, p)| (tok.token_text(i), p))
                                .collect()
                        })
                        .collect()
                };
                regimes.push(RegimeResult {
                    name,
                    top_before: top(&before),
                    top_after: top(&after),
                    kl_before: kl(&before),
                    kl_after: kl(&after),
                });
            }
            Some(PromptIntervention {
                select: spec,
                scale,
                labels: sel.labels(model),
                regimes,
            })
        }
    };
    Ok(PromptResult {
        intervention,
        text: text.to_string(),
        tokens: tok.token_strings(&ids),
        dropped: all.len() - n,
        c: model.modules.iter().map(|m| m.c).collect(),
        modules: names,
        ci,
        top_target: top(&rep.target_output),
        top_masked: top(&rep.ci_masked_output),
        kl: rep.kl_ci_masked[..n].to_vec(),
        ids,
    })
}

/// The tokenizer of a language-model run opened from `file`: the built-in one when the
/// config names it, else the config's `tokenizer_name` as a local path, else what
/// [`crate::io::reference::lm_tokenizer_path`] finds for a reference run.
pub fn run_tokenizer(
    cfg: &crate::spd::config::SpdConfig,
    file: &Path,
) -> anyhow::Result<TextTokenizer> {
    if let Some(name) = cfg.tokenizer_name.as_deref()
        && (name == crate::tinylm::BUILTIN || Path::new(name).exists())
    {
        return TextTokenizer::named(name);
    }
    let p = crate::io::reference::lm_tokenizer_path(file).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no tokenizer found (the run's tokenizer_name is not a local folder and there is no tokenizer.json beside it); give --tokenizer PATH",
            file.display()
        )
    })?;
    TextTokenizer::load(&p)
}

/// The training text of a config (`task_config.dataset_name`: a JSONL file or a folder of
/// `<split>.jsonl` files; `tokenizer_name`), tokenized as the reference does (10 shards,
/// windows of `seq_len`). The reason when there is none.
pub fn config_corpus(
    cfg: &crate::spd::config::SpdConfig,
    seq_len: usize,
    vocab: usize,
) -> Result<crate::data::TokenData, String> {
    let t = &cfg.task_config;
    let name = t
        .dataset_name
        .as_deref()
        .ok_or("the config names no task_config.dataset_name")?;
    let tok_name = cfg
        .tokenizer_name
        .as_deref()
        .ok_or("the config names no tokenizer_name")?;
    if name == crate::tinylm::BUILTIN {
        let tok = TextTokenizer::named(tok_name).map_err(|e| e.to_string())?;
        let rows = crate::tinylm::corpus_rows(
            &tok,
            crate::tinylm::SPD_SEED,
            crate::tinylm::SPD_DOCS,
            seq_len,
        )
        .map_err(|e| e.to_string())?;
        return crate::data::TokenData::corpus(
            &rows,
            seq_len,
            vocab,
            format!(
                "{} stories generated by the tiny-lm language (seed {})",
                crate::tinylm::SPD_DOCS,
                crate::tinylm::SPD_SEED
            ),
        );
    }
    let split = t.train_data_split.as_deref().unwrap_or("train");
    let p = Path::new(name);
    let file = if p.is_dir() {
        p.join(format!("{split}.jsonl"))
    } else {
        p.to_path_buf()
    };
    if !file.is_file() {
        return Err(format!(
            "{}: no such text file (spdlab reads local text only)",
            file.display()
        ));
    }
    let tok = TextTokenizer::named(tok_name).map_err(|e| e.to_string())?;
    let docs = read_documents(&file, t.column_name.as_deref()).map_err(|e| e.to_string())?;
    let rows = tokenize_and_concatenate(&docs, &tok, seq_len, false, 10, 1000)
        .map_err(|e| e.to_string())?;
    crate::data::TokenData::corpus(&rows, seq_len, vocab, file.display().to_string())
}

/// What one subcomponent of a language-model decomposition does: where it fires on the text
/// and, for a module that writes the residual stream, the tokens its write direction promotes
/// and suppresses through the unembedding.
#[derive(Clone, Debug)]
pub struct ComponentPage {
    pub module: String,
    pub c: usize,
    /// Top-activating contexts: (CI, text before, the token, text after), strongest first.
    pub contexts: Vec<(f32, String, String, String)>,
    /// Windows and token positions scanned, and the fraction of positions with CI > 0.5.
    pub windows: usize,
    pub positions: usize,
    pub firing: f32,
    /// Tokens whose logit U_c · wteᵀ is largest / smallest (direct effect, before ln_f's
    /// scaling); empty for modules that do not write the residual stream.
    pub promoted: Vec<(String, f32)>,
    pub suppressed: Vec<(String, f32)>,
    /// Where the text came from.
    pub source: String,
    /// The tokens it fires on most (text, firings), from a stored harvest.
    pub fires_on: Vec<(String, u64)>,
    /// Whether the page comes from a stored harvest (of the run at this step).
    pub harvested: Option<usize>,
}

/// The direct effect of subcomponent `c` of module `m` on the logits (U_c · wteᵀ): the 10
/// most promoted and suppressed tokens; empty for modules that do not write the residual
/// stream.
#[allow(clippy::type_complexity)]
fn direct_effect(
    model: &crate::spd::component_model::ComponentModel,
    m: &crate::spd::component_model::DecomposedModule,
    c: usize,
    tok: &TextTokenizer,
) -> anyhow::Result<(Vec<(String, f32)>, Vec<(String, f32)>)> {
    let (mut promoted, mut suppressed) = (vec![], vec![]);
    if let crate::model::TargetSpec::Lm { model: cfg, .. } = &model.target.spec
        && m.d_out == cfg.n_embd
        && (m.name.ends_with("o_proj") || m.name.ends_with("down_proj"))
    {
        let u = m.u.as_tensor().narrow(0, c, 1)?;
        let logits: Vec<f32> = u
            .matmul(&model.target.param("wte.weight").t()?)?
            .flatten_all()?
            .to_vec1()?;
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let name = |i: usize| tok.token_text(i as u32);
        promoted = idx.iter().take(10).map(|&i| (name(i), logits[i])).collect();
        suppressed = idx
            .iter()
            .rev()
            .take(10)
            .map(|&i| (name(i), logits[i]))
            .collect();
    }
    Ok((promoted, suppressed))
}

/// A component page from a stored harvest (no scan).
pub fn harvested_page(
    model: &crate::spd::component_model::ComponentModel,
    h: &crate::harvest::Harvest,
    tok: &TextTokenizer,
    j: usize,
    c: usize,
) -> anyhow::Result<ComponentPage> {
    let m = model
        .modules
        .get(j)
        .ok_or_else(|| anyhow::anyhow!("no module {j}"))?;
    let ch = h
        .component(&m.name, c)
        .ok_or_else(|| anyhow::anyhow!("the harvest has no {}:{c}", m.name))?;
    let text = |ids: &[u32]| displayable(&tok.decode(ids).unwrap_or_default());
    let contexts = ch
        .contexts
        .iter()
        .map(|(g, ids, at)| {
            (
                *g,
                text(&ids[..*at]),
                text(&ids[*at..*at + 1]),
                text(&ids[*at + 1..]),
            )
        })
        .collect();
    let (promoted, suppressed) = direct_effect(model, m, c, tok)?;
    Ok(ComponentPage {
        module: m.name.clone(),
        c,
        contexts,
        windows: h.windows,
        positions: h.positions as usize,
        firing: ch.firing as f32 / h.positions.max(1) as f32,
        promoted,
        suppressed,
        source: h.source.clone(),
        fires_on: ch
            .tokens
            .iter()
            .map(|&(t, n)| (tok.token_text(t), n))
            .collect(),
        harvested: Some(h.step),
    })
}

/// Scans up to `max_windows` windows of `data` for subcomponent `c` of module `j`.
pub fn component_page(
    model: &crate::spd::component_model::ComponentModel,
    data: &crate::data::TokenData,
    tok: &TextTokenizer,
    j: usize,
    c: usize,
    max_windows: usize,
) -> anyhow::Result<ComponentPage> {
    use candle_core::Tensor;
    let m = model
        .modules
        .get(j)
        .ok_or_else(|| anyhow::anyhow!("no module {j}"))?;
    if c >= m.c {
        anyhow::bail!("{} has {} subcomponents, not {}", m.name, m.c, c + 1);
    }
    let s = data.seq_len;
    let rows: Vec<Vec<u32>> = match &data.rows {
        Some(r) => r
            .chunks(s)
            .take(max_windows.max(1))
            .map(|w| w.to_vec())
            .collect(),
        None => anyhow::bail!(
            "no text loaded for this run ({}): nothing to scan",
            data.source
        ),
    };
    let mut hits: Vec<(f32, usize, usize)> = vec![];
    let mut firing = 0usize;
    for (b, chunk) in rows.chunks(64).enumerate() {
        let flat: Vec<f32> = chunk.iter().flatten().map(|&t| t as f32).collect();
        let x = Tensor::from_vec(flat, (chunk.len(), s), model.device())?;
        let ci = crate::interventions::lower_ci(model, &x)?;
        let col: Vec<f32> = ci[j].narrow(1, c, 1)?.flatten_all()?.to_vec1()?;
        for (i, &g) in col.iter().enumerate() {
            if g > crate::harvest::FIRING {
                firing += 1;
            }
            hits.push((g, b * 64 + i / s, i % s));
        }
        hits.sort_by(|a, b| b.0.total_cmp(&a.0));
        hits.truncate(20);
    }
    let positions = rows.len() * s;
    let contexts = hits
        .iter()
        .filter(|h| h.0 > 0.0)
        .map(|&(g, w, p)| {
            let row = &rows[w];
            let text = |ids: &[u32]| displayable(&tok.decode(ids).unwrap_or_default());
            let before = text(&row[p.saturating_sub(12)..p]);
            let at = text(&row[p..p + 1]);
            let after = text(&row[p + 1..(p + 4).min(s)]);
            (g, before, at, after)
        })
        .collect();
    // Direct effect on the logits of a residual-stream writer: U_c · wteᵀ.
    let (promoted, suppressed) = direct_effect(model, m, c, tok)?;
    Ok(ComponentPage {
        module: m.name.clone(),
        c,
        contexts,
        windows: rows.len(),
        positions,
        firing: firing as f32 / positions.max(1) as f32,
        promoted,
        suppressed,
        source: data.source.clone(),
        fires_on: vec![],
        harvested: None,
    })
}
