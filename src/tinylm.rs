//! `tiny-lm`: a small language whose mechanisms are planted and known exactly, a tokenizer
//! trained on it, and a small llama-style model trained on it (the `tiny-lm` preset's target).
//!
//! The generator writes short stories of simple English. Three rules fix some words exactly:
//! - **day after**: "It was Monday. The next day was **Tuesday**." (the day after the day
//!   just named, Sunday → Monday);
//! - **copy**: a story introduces its hero ("There was a girl named Mia.") and every later
//!   mention after a cue ("Every day, **Mia** went to the park.", "Then **Mia** ...",
//!   "On Friday, **Mia** ...", "One day, **Mia** met Ben.") copies that name from earlier in
//!   the context (other names appear too: "met Ben" is free);
//! - **counting**: "Then Mia counted: four, **five**, **six**." (each number after the first
//!   is the one after the number before it).
//!
//! Every other word is free (chosen at random). Each word of the language is one token of
//! the trained tokenizer, so a rule's position is a token position, and a rule's accuracy is
//! how often the model's top next-token prediction there is the rule's word.

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor, Var};

use crate::model::lm::{LmConfig, LmFamily};
use crate::rng::Rng;

pub const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
pub const NAMES: [&str; 24] = [
    "Anna", "Ben", "Clara", "Dan", "Eva", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Kate", "Leo",
    "Mia", "Nick", "Olivia", "Paul", "Rose", "Sam", "Tina", "Umar", "Vera", "Will", "Yara", "Zoe",
];
pub const NUMBERS: [&str; 12] = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve",
];
const PLACES: [&str; 8] = [
    "park", "school", "shop", "river", "garden", "beach", "farm", "library",
];
const THINGS: [&str; 8] = ["cat", "dog", "bird", "ball", "kite", "book", "cake", "hat"];
const FILLERS: [&[&str]; 4] = [
    &["The", " sun", " was", " warm", "."],
    &["The", " sky", " was", " blue", "."],
    &["It", " was", " a", " good", " day", "."],
    &["The", " wind", " was", " cold", "."],
];

/// The end-of-text token of the tiny-lm tokenizer (the reference tokenizers' EOS).
pub const EOS: &str = "<|endoftext|>";

/// The planted rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    DayAfter,
    Copy,
    Count,
}

impl Rule {
    pub const ALL: [Rule; 3] = [Rule::DayAfter, Rule::Copy, Rule::Count];
    pub fn name(self) -> &'static str {
        match self {
            Rule::DayAfter => "day_after",
            Rule::Copy => "copy",
            Rule::Count => "count",
        }
    }
}

/// One generated story: its words (each one token; a word carries its leading space) and
/// where the rules fix the word.
#[derive(Clone, Debug, PartialEq)]
pub struct Doc {
    pub words: Vec<String>,
    /// (word index, rule) for every word a rule determines.
    pub rules: Vec<(usize, Rule)>,
}

impl Doc {
    pub fn text(&self) -> String {
        self.words.concat()
    }
}

struct Builder {
    words: Vec<String>,
    rules: Vec<(usize, Rule)>,
}

impl Builder {
    fn w(&mut self, s: &str) {
        // Sentence-initial words after the first sentence take a leading space.
        let s = if !self.words.is_empty() && !s.starts_with(' ') && !matches!(s, "." | "," | ":") {
            format!(" {s}")
        } else {
            s.to_string()
        };
        self.words.push(s);
    }
    fn ws(&mut self, s: &[&str]) {
        for w in s {
            self.w(w);
        }
    }
    fn rule(&mut self, s: &str, r: Rule) {
        self.rules.push((self.words.len(), r));
        self.w(s);
    }
}

/// One story from `rng`.
pub fn generate_doc(rng: &mut Rng) -> Doc {
    let mut b = Builder {
        words: vec![],
        rules: vec![],
    };
    let hero = NAMES[rng.below(NAMES.len())];
    let kid = if rng.below(2) == 0 { "girl" } else { "boy" };
    b.ws(&["There", " was", " a", &format!(" {kid}"), " named"]);
    b.w(&format!(" {hero}"));
    b.w(".");
    // Sentence kinds: 0 day pair, 1 count, 2-5 cue sentences, 6 filler.
    let mut kinds = vec![0usize];
    if rng.below(3) > 0 {
        kinds.push(0);
    }
    if rng.below(4) > 0 {
        kinds.push(1);
    }
    for _ in 0..2 + rng.below(2) {
        kinds.push(2 + rng.below(4));
    }
    if rng.below(2) == 0 {
        kinds.push(6);
    }
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i + 1));
    }
    for k in kinds {
        match k {
            0 => {
                let d = rng.below(7);
                b.ws(&[
                    "It",
                    " was",
                    &format!(" {}", DAYS[d]),
                    ".",
                    "The",
                    " next",
                    " day",
                    " was",
                ]);
                b.rule(&format!(" {}", DAYS[(d + 1) % 7]), Rule::DayAfter);
                b.w(".");
            }
            1 => {
                b.w("Then");
                b.rule(&format!(" {hero}"), Rule::Copy);
                b.ws(&[" counted", ":"]);
                let len = 3 + rng.below(4);
                let start = rng.below(NUMBERS.len() - len + 1);
                for j in 0..len {
                    let w = format!(" {}", NUMBERS[start + j]);
                    if j == 0 {
                        b.w(&w);
                    } else {
                        b.w(",");
                        b.rule(&w, Rule::Count);
                    }
                }
                b.w(".");
            }
            2 => {
                b.ws(&["Every", " day", ","]);
                b.rule(&format!(" {hero}"), Rule::Copy);
                b.ws(&[" went", " to", " the"]);
                b.w(&format!(" {}", PLACES[rng.below(PLACES.len())]));
                b.w(".");
            }
            3 => {
                b.w("Then");
                b.rule(&format!(" {hero}"), Rule::Copy);
                b.ws(&[" played", " with", " a"]);
                b.w(&format!(" {}", THINGS[rng.below(THINGS.len())]));
                b.w(".");
            }
            4 => {
                b.ws(&["One", " day", ","]);
                b.rule(&format!(" {hero}"), Rule::Copy);
                b.w(" met");
                let mut other = NAMES[rng.below(NAMES.len())];
                while other == hero {
                    other = NAMES[rng.below(NAMES.len())];
                }
                b.w(&format!(" {other}"));
                b.w(".");
            }
            5 => {
                b.w("On");
                b.w(&format!(" {}", DAYS[rng.below(7)]));
                b.w(",");
                b.rule(&format!(" {hero}"), Rule::Copy);
                b.ws(&[" went", " to", " the"]);
                b.w(&format!(" {}", PLACES[rng.below(PLACES.len())]));
                b.w(".");
            }
            _ => {
                let f = FILLERS[rng.below(FILLERS.len())];
                b.ws(f);
            }
        }
    }
    Doc {
        words: b.words,
        rules: b.rules,
    }
}

/// `n` stories from `seed` (the same seed gives the same stories).
pub fn generate(seed: u64, n: usize) -> Vec<Doc> {
    let mut rng = Rng::new(seed ^ 0x7419_1a3b);
    (0..n).map(|_| generate_doc(&mut rng)).collect()
}

/// Seeds of the text: target training, SPD training and held-out evaluation never share a
/// story stream.
pub const TRAIN_SEED: u64 = 1;
pub const SPD_SEED: u64 = 2;
pub const HELD_OUT_SEED: u64 = 3;
/// Stories in the SPD text (~2.5 M tokens).
pub const SPD_DOCS: usize = 40_000;

/// Every word the generator can write (each must be one token).
pub fn vocabulary() -> Vec<String> {
    // A story starts with "There"; every other word has a leading space.
    let mut out = vec!["There".to_string()];
    let mut rest: Vec<&str> = vec![
        "It", "The", "Then", "Every", "One", "On", "was", "a", "girl", "boy", "named", "next",
        "day", "counted", "went", "to", "the", "played", "with", "met", "sun", "sky", "warm",
        "blue", "good", "wind", "cold",
    ];
    rest.extend(DAYS);
    rest.extend(NAMES);
    rest.extend(NUMBERS);
    rest.extend(PLACES);
    rest.extend(THINGS);
    for w in rest {
        out.push(format!(" {w}"));
    }
    for p in [".", ",", ":"] {
        out.push(p.to_string());
    }
    out
}

/// Trains the byte-level BPE tokenizer of the language on `docs` (every word becomes one
/// token; EOS is `<|endoftext|>`). Returns its `tokenizer.json`.
pub fn train_tokenizer(docs: &[Doc]) -> anyhow::Result<String> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::models::{ModelWrapper, TrainerWrapper};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};
    let mut tok = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(1024)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let texts: Vec<String> = docs.iter().map(Doc::text).collect();
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    let json = tok
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("writing the tokenizer: {e}"))?;
    let check = crate::text::TextTokenizer::from_json(&json, "tiny-lm tokenizer")?;
    for w in vocabulary() {
        let ids = check.encode(&w)?;
        if ids.len() != 1 {
            anyhow::bail!(
                "the trained tokenizer splits {w:?} into {} tokens",
                ids.len()
            );
        }
    }
    Ok(json)
}

/// The shipped tokenizer (`assets/tiny-lm/tokenizer.json`).
pub fn tokenizer() -> anyhow::Result<crate::text::TextTokenizer> {
    crate::text::TextTokenizer::from_json(
        std::str::from_utf8(crate::assets::tiny_lm_tokenizer())?,
        BUILTIN,
    )
}

/// How configs name the built-in tokenizer and text (`tokenizer_name`,
/// `task_config.dataset_name`).
pub const BUILTIN: &str = "spdlab:tiny-lm";

/// A story as token ids (one per word) and its rules at token positions.
pub fn encode_doc(
    tok: &crate::text::TextTokenizer,
    ids_of: &HashMap<String, u32>,
    doc: &Doc,
) -> anyhow::Result<Vec<u32>> {
    doc.words
        .iter()
        .map(|w| match ids_of.get(w) {
            Some(&i) => Ok(i),
            None => {
                let ids = tok.encode(w)?;
                anyhow::ensure!(ids.len() == 1, "{w:?} is not one token");
                Ok(ids[0])
            }
        })
        .collect()
}

/// Token id of every word of the language.
pub fn word_ids(tok: &crate::text::TextTokenizer) -> anyhow::Result<HashMap<String, u32>> {
    let mut m = HashMap::new();
    for w in vocabulary() {
        let ids = tok.encode(&w)?;
        anyhow::ensure!(
            ids.len() == 1,
            "{}: {w:?} is not one token (not the tiny-lm tokenizer?)",
            tok.path.display()
        );
        m.insert(w, ids[0]);
    }
    Ok(m)
}

/// The stories as one token stream, each followed by EOS (as the reference joins documents).
pub fn token_stream(tok: &crate::text::TextTokenizer, docs: &[Doc]) -> anyhow::Result<Vec<u32>> {
    let ids_of = word_ids(tok)?;
    let mut out = vec![];
    for d in docs {
        out.extend(encode_doc(tok, &ids_of, d)?);
        out.push(tok.eos_id);
    }
    Ok(out)
}

/// Non-overlapping windows of `seq_len` tokens of `n_docs` stories of `seed` (the SPD text).
pub fn corpus_rows(
    tok: &crate::text::TextTokenizer,
    seed: u64,
    n_docs: usize,
    seq_len: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let stream = token_stream(tok, &generate(seed, n_docs))?;
    Ok(stream
        .chunks_exact(seq_len.max(1))
        .map(|c| c.to_vec())
        .collect())
}

/// The target's architecture: LlamaSimpleMLP, 2 layers, d_model 64, 4 heads, MLP 256,
/// contexts of 128 tokens.
pub fn model_config(vocab_size: usize) -> LmConfig {
    LmConfig {
        model_type: LmFamily::LlamaSimpleMLP,
        block_size: 128,
        vocab_size,
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        n_intermediate: Some(256),
        mlp_bias: false,
        attn_bias: false,
        rotary_adjacent_pairs: false,
        rotary_dim: None,
        rotary_base: 10000.0,
        n_ctx: Some(128),
        n_key_value_heads: Some(4),
        use_grouped_query_attention: true,
        flash_attention: true,
        rms_norm_eps: 1e-6,
    }
}

/// Per-rule accuracy: how often the top next-token prediction at a rule's position is the
/// rule's word.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RuleAccuracy {
    pub day_after: f64,
    pub copy: f64,
    pub count: f64,
    /// Rule positions scored, per rule.
    pub n: [usize; 3],
    /// Mean cross-entropy over all next-token predictions inside the stories (nats/token).
    pub ce: f64,
}

impl RuleAccuracy {
    pub fn get(&self, r: Rule) -> f64 {
        match r {
            Rule::DayAfter => self.day_after,
            Rule::Copy => self.copy,
            Rule::Count => self.count,
        }
    }
}

/// A held-out story as a model's row: its tokens padded with EOS, how many are the story's,
/// and its rules (token position, rule) inside them.
#[derive(Clone, Debug)]
pub struct EvalRow {
    pub ids: Vec<u32>,
    pub len: usize,
    pub rules: Vec<(usize, Rule)>,
}

/// Held-out stories as rows for a model of `seq_len` tokens: each story from position 0,
/// padded with EOS (a causal model's earlier positions do not see the padding).
pub fn eval_rows(
    tok: &crate::text::TextTokenizer,
    docs: &[Doc],
    seq_len: usize,
) -> anyhow::Result<Vec<EvalRow>> {
    let ids_of = word_ids(tok)?;
    let mut out = vec![];
    for d in docs {
        let mut ids = encode_doc(tok, &ids_of, d)?;
        let len = ids.len().min(seq_len);
        ids.truncate(seq_len);
        ids.resize(seq_len, tok.eos_id);
        let rules = d.rules.iter().copied().filter(|(p, _)| *p < len).collect();
        out.push(EvalRow { ids, len, rules });
    }
    Ok(out)
}

/// Rule accuracies of `logits_of` (token rows `[b, s]` → logits `[b·s, vocab]`) on `n`
/// held-out stories.
pub fn rule_accuracy(
    tok: &crate::text::TextTokenizer,
    n: usize,
    seq_len: usize,
    device: &Device,
    logits_of: impl FnMut(&Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<RuleAccuracy> {
    let rows = eval_rows(tok, &generate(HELD_OUT_SEED, n), seq_len)?;
    score_rows(&rows, seq_len, device, logits_of)
}

/// The index of a row's largest value (the top next-token prediction).
fn argmax(row: &[f32]) -> Option<u32> {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(j, _)| j as u32)
}

/// Scores [`eval_rows`] in batches of 64 with `logits_of`.
fn score_rows(
    rows: &[EvalRow],
    seq_len: usize,
    device: &Device,
    logits_of: impl FnMut(&Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<RuleAccuracy> {
    score_rows_with(rows, seq_len, device, logits_of, |_, _, _| {})
}

/// [`score_rows`], also telling `on_rule(rule, expected word, predicted right)` at every
/// rule position.
fn score_rows_with(
    rows: &[EvalRow],
    seq_len: usize,
    device: &Device,
    mut logits_of: impl FnMut(&Tensor) -> anyhow::Result<Tensor>,
    mut on_rule: impl FnMut(Rule, u32, bool),
) -> anyhow::Result<RuleAccuracy> {
    let mut hit = [0usize; 3];
    let mut tot = [0usize; 3];
    let (mut ce, mut ce_n) = (0f64, 0usize);
    for chunk in rows.chunks(64) {
        let b = chunk.len();
        let flat: Vec<u32> = chunk.iter().flat_map(|r| r.ids.iter().copied()).collect();
        let x = Tensor::from_vec(flat, (b, seq_len), device)?;
        let logits = logits_of(&x)?;
        let logp = crate::model::ih::log_softmax_last(&logits)?.to_vec2::<f32>()?;
        for (i, EvalRow { ids, len, rules }) in chunk.iter().enumerate() {
            for p in 1..*len {
                ce -= logp[i * seq_len + p - 1][ids[p] as usize] as f64;
                ce_n += 1;
            }
            for &(p, r) in rules {
                if p == 0 {
                    continue;
                }
                let right = argmax(&logp[i * seq_len + p - 1]) == Some(ids[p]);
                let k = Rule::ALL.iter().position(|&x| x == r).unwrap_or(0);
                tot[k] += 1;
                hit[k] += right as usize;
                on_rule(r, ids[p], right);
            }
        }
    }
    let acc = |k: usize| hit[k] as f64 / tot[k].max(1) as f64;
    Ok(RuleAccuracy {
        day_after: acc(0),
        copy: acc(1),
        count: acc(2),
        n: tot,
        ce: ce / ce_n.max(1) as f64,
    })
}

/// Target-training recipe of the tiny-lm model.
#[derive(Clone, Debug)]
pub struct TrainRecipe {
    pub seed: u64,
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub n_docs: usize,
}

impl Default for TrainRecipe {
    fn default() -> Self {
        TrainRecipe {
            seed: 0,
            steps: 3000,
            batch_size: 32,
            seq_len: 128,
            lr: 3e-3,
            warmup: 100,
            weight_decay: 0.01,
            n_docs: 40_000,
        }
    }
}

/// Trains the tiny-lm target: next-token cross-entropy on windows of the story stream, AdamW
/// with a linear warm-up and a cosine decay to 10 %, the batch split over
/// [`crate::parallel::threads`] threads. Returns the weights (reference parameter names) and
/// the final loss.
pub fn train_target(
    tok: &crate::text::TextTokenizer,
    cfg: &LmConfig,
    recipe: &TrainRecipe,
    device: &Device,
    mut progress: impl FnMut(usize, f32),
) -> anyhow::Result<(Vec<(String, Tensor)>, f32)> {
    use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
    let stream = token_stream(tok, &generate(TRAIN_SEED ^ recipe.seed, recipe.n_docs))?;
    let s = recipe.seq_len.min(cfg.block_size);
    anyhow::ensure!(stream.len() > s + 1, "too little text");
    let mut rng = Rng::new(recipe.seed);
    let mut vars: Vec<(String, Var)> = vec![];
    for (k, shape) in cfg.param_shapes() {
        let n: usize = shape.iter().product();
        let t = if k.contains("rms") || k == "ln_f.weight" {
            Tensor::ones(shape.as_slice(), DType::F32, device)?
        } else {
            // GPT-2 style init: N(0, 0.02); output projections scaled by 1/sqrt(2·layers).
            let std = if k.ends_with("o_proj.weight") || k.ends_with("down_proj.weight") {
                0.02 / (2.0 * cfg.n_layer as f32).sqrt()
            } else {
                0.02
            };
            Tensor::from_vec(rng.normal_vec(n, std), shape.as_slice(), device)?
        };
        vars.push((k, Var::from_tensor(&t)?));
    }
    let mut opt = AdamW::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: recipe.lr,
            weight_decay: recipe.weight_decay,
            ..Default::default()
        },
    )?;
    let rotary = crate::model::lm::rotary_tables(cfg, s, device)?;
    let linears = cfg.linear_modules();
    let shards = crate::parallel::threads().clamp(1, recipe.batch_size);
    let mut last = f32::NAN;
    for step in 0..recipe.steps {
        let lr = if step < recipe.warmup {
            recipe.lr * (step + 1) as f64 / recipe.warmup as f64
        } else {
            let t = (step - recipe.warmup) as f64 / (recipe.steps - recipe.warmup).max(1) as f64;
            recipe.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
        };
        opt.set_learning_rate(lr);
        let b = recipe.batch_size;
        let mut x = Vec::with_capacity(b * s);
        let mut y = Vec::with_capacity(b * s);
        for _ in 0..b {
            let o = rng.below(stream.len() - s - 1);
            x.extend_from_slice(&stream[o..o + s]);
            y.extend_from_slice(&stream[o + 1..o + s + 1]);
        }
        let params: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let per = b.div_ceil(shards);
        let results: Vec<anyhow::Result<(candle_core::backprop::GradStore, f32)>> =
            std::thread::scope(|sc| {
                let hs: Vec<_> = (0..shards)
                    .map(|i| {
                        let (lo, hi) = (i * per, ((i + 1) * per).min(b));
                        let (x, y, params, rotary, linears) = (&x, &y, &params, &rotary, &linears);
                        sc.spawn(move || -> anyhow::Result<_> {
                            let n = hi - lo;
                            let xs = Tensor::from_slice(&x[lo * s..hi * s], (n, s), device)?;
                            let ys = Tensor::from_slice(&y[lo * s..hi * s], n * s, device)?;
                            let mut run = |i: usize, a: &Tensor| -> candle_core::Result<Tensor> {
                                a.matmul(&params[&linears[i].1].t()?)
                            };
                            let logits = crate::model::lm::forward_core(
                                cfg,
                                &|k| &params[k],
                                rotary.as_ref(),
                                &xs,
                                &mut run,
                                None,
                            )?;
                            let loss = candle_nn::loss::cross_entropy(&logits, &ys)?;
                            let scaled = (&loss * (n as f64 / b as f64))?;
                            Ok((scaled.backward()?, loss.to_scalar::<f32>()?))
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("a shard panicked")))
                    })
                    .collect()
            });
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        let mut loss = 0f32;
        for (i, r) in results.into_iter().enumerate() {
            let (g, l) = r?;
            let n = ((i + 1) * per).min(b) - i * per;
            loss += l * n as f32 / b as f32;
            match grads.as_mut() {
                None => grads = Some(g),
                Some(acc) => {
                    for (_, v) in &vars {
                        if let (Some(a), Some(o)) = (acc.get(v.as_tensor()), g.get(v.as_tensor())) {
                            let sum = (a + o)?;
                            acc.insert(v.as_tensor(), sum);
                        }
                    }
                }
            }
        }
        if let Some(g) = grads {
            opt.step(&g)?;
        }
        if !loss.is_finite() {
            anyhow::bail!("tiny-lm training diverged at step {step} (loss {loss})");
        }
        last = loss;
        if step % 50 == 0 || step + 1 == recipe.steps {
            progress(step, loss);
        }
    }
    Ok((
        vars.into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect(),
        last,
    ))
}

/// Rule accuracies of a tiny-lm decomposition on `n` held-out stories: the target, the
/// CI-masked decomposition, and (with a selection) the CI-masked decomposition with the
/// selection ablated (mask 0, no delta component).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecompositionRules {
    pub stories: usize,
    pub target: RuleAccuracy,
    pub ci_masked: RuleAccuracy,
    pub ablated: Option<RuleAccuracy>,
}

pub fn decomposition_rules(
    model: &crate::spd::component_model::ComponentModel,
    tok: &crate::text::TextTokenizer,
    n: usize,
    ablate: Option<&crate::interventions::Selection>,
) -> anyhow::Result<DecompositionRules> {
    use crate::interventions::{Intervention, MaskMode, Selection, run_intervention};
    let crate::model::TargetSpec::Lm {
        seq_len,
        model: cfg,
    } = &model.target.spec
    else {
        anyhow::bail!("rule accuracies need a language-model decomposition");
    };
    let (s, v) = (*seq_len, cfg.vocab_size);
    let iv = Intervention {
        selection: ablate.cloned().unwrap_or_else(|| Selection::empty(model)),
        selected_mode: MaskMode::Ablate,
        other_mode: MaskMode::Ci,
        delta: false,
    };
    let mut rng = Rng::new(0);
    let rows = eval_rows(tok, &generate(HELD_OUT_SEED, n), s)?;
    let dev = model.device().clone();
    // One intervention per batch gives the target, CI-masked and ablated logits.
    let mut outs: Vec<[Tensor; 3]> = vec![];
    for chunk in rows.chunks(64) {
        let x: Vec<Vec<f32>> = chunk
            .iter()
            .map(|r| r.ids.iter().map(|&t| t as f32).collect())
            .collect();
        let r = run_intervention(model, &x, &iv, &mut rng)?;
        let t = |o: &[Vec<f32>]| -> candle_core::Result<Tensor> {
            Tensor::from_vec(o.concat(), (o.len(), v), &dev)
        };
        outs.push([t(&r.target)?, t(&r.baseline)?, t(&r.intervened)?]);
    }
    let pick = |k: usize| -> anyhow::Result<RuleAccuracy> {
        let mut it = outs.iter();
        score_rows(&rows, s, &dev, |_| {
            Ok(it
                .next()
                .ok_or_else(|| anyhow::anyhow!("batch count changed"))?[k]
                .clone())
        })
    };
    Ok(DecompositionRules {
        stories: n,
        target: pick(0)?,
        ci_masked: pick(1)?,
        ablated: if ablate.is_some() {
            Some(pick(2)?)
        } else {
            None
        },
    })
}

/// What ablating one cluster does to the rules.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterEffect {
    pub id: usize,
    pub members: Vec<String>,
    pub accuracy: RuleAccuracy,
}

/// The tiny-lm report of a decomposition: rule accuracies of the target and the CI-masked
/// decomposition, with a selection ablated, and a targeted unlearning of one rule.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RulesReport {
    pub stories: usize,
    pub target: RuleAccuracy,
    pub ci_masked: RuleAccuracy,
    /// `--ablate`: the selection and the accuracies with it ablated.
    pub ablated: Option<(Vec<String>, RuleAccuracy)>,
    pub unlearning: Option<Unlearning>,
}

pub fn rules_report(
    model: &crate::spd::component_model::ComponentModel,
    tok: &crate::text::TextTokenizer,
    stories: usize,
    ablate: Option<&crate::interventions::Selection>,
    unlearn_rule: Option<(Rule, &crate::cluster::ClusteringResult)>,
) -> anyhow::Result<RulesReport> {
    let base = decomposition_rules(model, tok, stories, ablate)?;
    let unlearning = match unlearn_rule {
        Some((r, cl)) => Some(unlearn(model, tok, cl, r, stories, (0.2, 0.9), &|_, _| {
            true
        })?),
        None => None,
    };
    Ok(RulesReport {
        stories,
        ablated: ablate.zip(base.ablated).map(|(s, a)| (s.labels(model), a)),
        target: base.target,
        ci_masked: base.ci_masked,
        unlearning,
    })
}

impl Rule {
    pub fn parse(s: &str) -> anyhow::Result<Rule> {
        Rule::ALL
            .iter()
            .copied()
            .find(|r| r.name() == s)
            .ok_or_else(|| anyhow::anyhow!("unknown rule '{s}' (day_after, copy, count)"))
    }
}

/// Clusters tried alone by [`unlearn`].
pub const MAX_CANDIDATES: usize = 64;

/// Rule accuracies on `rows` of the decomposition with `selection` ablated and the other
/// subcomponents at their CI (as [`decomposition_rules`]' `ablated`, with one CI pass and one
/// masked forward per batch).
pub fn ablated_accuracy(
    model: &crate::spd::component_model::ComponentModel,
    rows: &[EvalRow],
    selection: &crate::interventions::Selection,
) -> anyhow::Result<RuleAccuracy> {
    ablated_accuracy_with(model, rows, selection, |_, _, _| {})
}

/// [`ablated_accuracy`] with [`score_rows_with`]'s per-position report.
fn ablated_accuracy_with(
    model: &crate::spd::component_model::ComponentModel,
    rows: &[EvalRow],
    selection: &crate::interventions::Selection,
    on_rule: impl FnMut(Rule, u32, bool),
) -> anyhow::Result<RuleAccuracy> {
    let crate::model::TargetSpec::Lm { seq_len, .. } = &model.target.spec else {
        anyhow::bail!("rule accuracies need a language-model decomposition");
    };
    score_rows_with(
        rows,
        *seq_len,
        model.device(),
        |x| crate::interventions::ablated_outputs(model, x, selection),
        on_rule,
    )
}

/// Targeted unlearning: the clusters whose ablation removes one rule and spares the others.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Unlearning {
    pub rule: &'static str,
    /// Clusters active where the rule applies (mean over the rule's positions with one
    /// expected word of the cluster's largest member CI ≥ 0.05), with their effect when
    /// ablated alone.
    pub candidates: Vec<ClusterEffect>,
    /// The clusters ablated together (in the order added) and the accuracies after each.
    pub chosen: Vec<(usize, RuleAccuracy)>,
    /// The accuracies with every chosen cluster ablated.
    pub accuracy: RuleAccuracy,
    pub ablated: Vec<String>,
}

/// Finds clusters carrying `rule`: candidates are the clusters active at the rule's
/// positions (for some expected word); each is ablated alone and ranked by how much more it
/// lowers `rule` than the other rules; then they are ablated together in that order while
/// the other rules stay ≥ `keep` (a cluster that would take one below, or raise `rule`, is
/// skipped), until `rule` is ≤ `target`. Short of that, clusters whose removal does not
/// raise `rule` but frees room on the other rules are dropped again, and the next round
/// tries first the clusters most active where the words the rule still gets right are
/// expected, then the skipped candidates again (up to three rounds). Drops are measured from
/// the CI-masked decomposition's accuracies on the same `stories`. `progress(stage, fraction)` is told how far
/// the search is; it stops the search (an error) by answering false.
#[allow(clippy::too_many_arguments)]
pub fn unlearn(
    model: &crate::spd::component_model::ComponentModel,
    tok: &crate::text::TextTokenizer,
    clusters: &crate::cluster::ClusteringResult,
    rule: Rule,
    stories: usize,
    (target, keep): (f64, f64),
    progress: &dyn Fn(&'static str, f32) -> bool,
) -> anyhow::Result<Unlearning> {
    use crate::interventions::Selection;
    let crate::model::TargetSpec::Lm { seq_len, .. } = &model.target.spec else {
        anyhow::bail!("unlearning needs a language-model decomposition");
    };
    let s = *seq_len;
    let rows = eval_rows(tok, &generate(HELD_OUT_SEED, stories), s)?;
    // Each cluster's activity where the rule's word is predicted (position p − 1), per
    // expected word: a mechanism may serve only some of the rule's cases (one day pair).
    let mut act: HashMap<(usize, u32), (f64, usize)> = HashMap::new();
    let mut everywhere: HashMap<usize, (f64, usize)> = HashMap::new();
    let index: HashMap<String, (usize, usize)> = model
        .modules
        .iter()
        .enumerate()
        .flat_map(|(j, m)| (0..m.c).map(move |c| (format!("{}:{c}", m.name), (j, c))))
        .collect();
    let members: Vec<(usize, Vec<(usize, usize)>)> = clusters
        .clusters
        .iter()
        .map(|c| {
            (
                c.id,
                c.members
                    .iter()
                    .filter_map(|m| index.get(m).copied())
                    .collect(),
            )
        })
        .collect();
    for chunk in rows.chunks(64) {
        let flat: Vec<f32> = chunk
            .iter()
            .flat_map(|r| r.ids.iter().map(|&t| t as f32))
            .collect();
        let x = Tensor::from_vec(flat, (chunk.len(), s), model.device())?;
        let ci: Vec<Vec<f32>> = crate::interventions::lower_ci(model, &x)?
            .iter()
            .map(|t| t.flatten_all()?.to_vec1())
            .collect::<candle_core::Result<_>>()?;
        for (i, EvalRow { ids, len, rules }) in chunk.iter().enumerate() {
            // Activity everywhere (positions predicting a word of the story).
            for p in 0..len.saturating_sub(1) {
                let row = i * s + p;
                for (id, mem) in &members {
                    let g = mem
                        .iter()
                        .map(|&(j, c)| ci[j][row * model.modules[j].c + c])
                        .fold(0f32, f32::max);
                    let e = everywhere.entry(*id).or_insert((0.0, 0));
                    e.0 += g as f64;
                    e.1 += 1;
                }
            }
            for &(p, r) in rules {
                if r != rule || p == 0 {
                    continue;
                }
                let row = i * s + p - 1;
                for (id, mem) in &members {
                    let g = mem
                        .iter()
                        .map(|&(j, c)| ci[j][row * model.modules[j].c + c])
                        .fold(0f32, f32::max);
                    let e = act.entry((*id, ids[p])).or_insert((0.0, 0));
                    e.0 += g as f64;
                    e.1 += 1;
                }
            }
        }
    }
    let sel_of = |ids: &[usize]| -> anyhow::Result<Selection> {
        let mut sel = Selection::empty(model);
        for &id in ids {
            sel.add_cluster(model, clusters, id)?;
        }
        Ok(sel)
    };
    // Evaluations so far, against a rough total (each candidate alone, then about three
    // passes over them).
    let evals = std::cell::Cell::new(0usize);
    let eval = |ids: &[usize]| -> anyhow::Result<RuleAccuracy> {
        let n = evals.get();
        evals.set(n + 1);
        let stage = if n < MAX_CANDIDATES {
            "trying clusters alone"
        } else {
            "combining clusters"
        };
        if !progress(stage, (n as f32 / (4 * MAX_CANDIDATES) as f32).min(0.99)) {
            anyhow::bail!("cancelled");
        }
        ablated_accuracy(model, &rows, &sel_of(ids)?)
    };
    // The clusters active where the rule applies (mean largest member CI ≥ 0.05 where one
    // of its words is expected, over at least 5 positions), the most specific to it first
    // (the mean over all its positions minus the mean over every position), at most
    // MAX_CANDIDATES.
    let mean_of = |(sum, n): (f64, usize)| sum / n.max(1) as f64;
    let everywhere_mean = |id: usize| mean_of(everywhere.get(&id).copied().unwrap_or((0.0, 0)));
    // The rule's expected words, and a cluster's largest mean activity where one of `words`
    // is expected (over ≥ 5 positions).
    let rule_words: HashSet<u32> = act.keys().map(|&(_, w)| w).collect();
    let peak = |id: usize, words: &HashSet<u32>| {
        words
            .iter()
            .filter_map(|w| act.get(&(id, *w)).filter(|e| e.1 >= 5).copied())
            .map(mean_of)
            .fold(0.0, f64::max)
    };
    let over_rule = |id: usize| {
        let (sum, n) = rule_words
            .iter()
            .filter_map(|w| act.get(&(id, *w)))
            .fold((0.0, 0), |(s, n), e| (s + e.0, n + e.1));
        mean_of((sum, n))
    };
    // (specificity: the mean over the rule's positions minus the mean everywhere, index into
    // `members`) of the clusters active for some expected word.
    let mut active: Vec<(f64, usize)> = members
        .iter()
        .enumerate()
        .filter(|(_, (id, _))| peak(*id, &rule_words) >= 0.05)
        .map(|(k, (id, _))| (over_rule(*id) - everywhere_mean(*id), k))
        .collect();
    active.sort_by(|a, b| b.0.total_cmp(&a.0));
    active.truncate(MAX_CANDIDATES);
    // What the drops are measured from: nothing ablated.
    let base = eval(&[])?;
    let mut candidates = vec![];
    for (_, k) in active {
        let (id, mem) = (members[k].0, &members[k].1);
        candidates.push(ClusterEffect {
            id,
            members: mem
                .iter()
                .map(|&(j, c)| format!("{}:{c}", model.modules[j].name))
                .collect(),
            accuracy: eval(&[id])?,
        });
    }
    let others: Vec<Rule> = Rule::ALL.iter().copied().filter(|&r| r != rule).collect();
    let score = |a: &RuleAccuracy| {
        let drop = |r: Rule| base.get(r) - a.get(r);
        drop(rule) - others.iter().map(|&r| drop(r)).fold(0.0, f64::max)
    };
    candidates.sort_by(|a, b| score(&b.accuracy).total_cmp(&score(&a.accuracy)));
    // The expected words of the rule's positions still predicted right with `ids` ablated.
    let surviving_words = |ids: &[usize]| -> anyhow::Result<HashSet<u32>> {
        let mut words = HashSet::new();
        ablated_accuracy_with(model, &rows, &sel_of(ids)?, |r, w, right| {
            if r == rule && right {
                words.insert(w);
            }
        })?;
        Ok(words)
    };
    let mut chosen: Vec<(usize, RuleAccuracy)> = vec![];
    let mut ids: Vec<usize> = vec![];
    let mut acc = base;
    // Clusters tried in this round, best first (the first round: the ranked candidates).
    let mut pool: Vec<usize> = candidates.iter().map(|c| c.id).collect();
    let spares = |a: &RuleAccuracy| others.iter().all(|&r| a.get(r) >= keep);
    // The other rules' accuracy left above the floor (what further ablations may spend).
    let slack = |a: &RuleAccuracy| {
        others
            .iter()
            .map(|&r| a.get(r) - keep)
            .fold(f64::INFINITY, f64::min)
    };
    for round in 0..3 {
        // Add: in ranked order, every candidate that spares the other rules and does not
        // raise this one (redundant mechanisms: a cluster may matter only once others are
        // gone).
        for &cid in &pool {
            if acc.get(rule) <= target {
                break;
            }
            if ids.contains(&cid) {
                continue;
            }
            let mut try_ids = ids.clone();
            try_ids.push(cid);
            let a = eval(&try_ids)?;
            if spares(&a) && a.get(rule) <= acc.get(rule) {
                ids = try_ids;
                acc = a.clone();
                chosen.push((cid, a));
            }
        }
        if acc.get(rule) <= target || round == 2 {
            break;
        }
        // Prune: drop every chosen cluster whose removal leaves this rule no higher and
        // gives the other rules more room; the freed room lets the next round add clusters
        // that were skipped for taking another rule below the floor.
        let mut pruned = false;
        for id in ids.clone() {
            let try_ids: Vec<usize> = ids.iter().copied().filter(|&i| i != id).collect();
            let a = eval(&try_ids)?;
            if a.get(rule) <= acc.get(rule) && slack(&a) > slack(&acc) {
                ids = try_ids;
                acc = a;
                chosen.retain(|(i, _)| *i != id);
                pruned = true;
            }
        }
        // Aim at what survives: the clusters most active where the words still predicted
        // right are expected (e.g. the day pairs the ablation has not reached), best first.
        let words = surviving_words(&ids)?;
        let mut aimed: Vec<(f64, usize)> = members
            .iter()
            .filter(|(id, _)| !ids.contains(id))
            .filter_map(|(id, _)| {
                let h = peak(*id, &words);
                (h >= 0.05).then_some((h - everywhere_mean(*id), *id))
            })
            .collect();
        aimed.sort_by(|a, b| b.0.total_cmp(&a.0));
        aimed.truncate(MAX_CANDIDATES / 2);
        if aimed.is_empty() && !pruned {
            break;
        }
        pool = aimed.into_iter().map(|(_, id)| id).chain(pool).collect();
    }
    Ok(Unlearning {
        rule: rule.name(),
        ablated: sel_of(&ids)?.labels(model),
        candidates,
        chosen,
        accuracy: acc,
    })
}
