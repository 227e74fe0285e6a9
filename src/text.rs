//! Text for language models: a `tokenizer.json` tokenizer (the `tokenizers` crate, as the
//! reference's HF fast tokenizers), local text files (plain text or JSONL), and the reference's
//! tokenize-and-concatenate chunking (`spd/data.py`): documents joined by the EOS string,
//! tokenized in 20 character chunks per map batch, cut into non-overlapping windows of `n_ctx`
//! tokens, the tail of each batch dropped. Nothing is downloaded: a tokenizer named by a model
//! hub id is opened from a local copy.

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

    /// The text of `ids` (special tokens kept, as `tokenizer.decode(ids)`).
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }

    /// Each token's text (for labels).
    pub fn token_strings(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| self.decode(&[i]).unwrap_or_else(|_| format!("<{i}>")))
            .collect()
    }
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
