//! Choosing a token sequence (sequence models): one of the snapshot's sample sequences, a
//! newly generated one (the training distribution's generator, seeded), or one typed as
//! token ids (`BOS` and `S` accepted for 0 and the induction token).

use eframe::egui;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::app::view::ViewCtx;
use crate::model::IhDims;
use crate::sequence::SequenceProbe;
use crate::worker::{Command, Event, Snapshot};

/// Keys of `Command::Sequence` requests, unique across the views that ask.
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// A view's link to the worker's sequence probes: asks once per (snapshot, sequence,
/// selection), one request at a time, and keeps the newest answer.
#[derive(Default)]
pub struct ProbeLink {
    /// The request in flight or answered: (key, snapshot version, sequence version,
    /// selection).
    asked: Option<(u64, u64, u64, String)>,
    /// The key of the shown answer (texture versions derive from it).
    pub shown: u64,
    pub probe: Option<Arc<SequenceProbe>>,
}

impl ProbeLink {
    /// Takes this link's answers; forgets everything when a new run is loaded.
    pub fn on_event(&mut self, e: &Event) {
        match e {
            Event::Loaded { .. } => *self = ProbeLink::default(),
            Event::Sequence { key, probe } if self.asked.as_ref().is_some_and(|a| a.0 == *key) => {
                self.probe = Some(probe.clone());
                self.shown = *key;
            }
            _ => {}
        }
    }

    /// Asks the worker for `tokens` (sequence `version`) with `select` ablated, unless that
    /// was asked for this snapshot already or another request is still in flight.
    pub fn request(&mut self, cx: &ViewCtx, tokens: &[f32], version: u64, select: &str) {
        let snap = cx.snapshot_version();
        let answered = self
            .asked
            .as_ref()
            .is_some_and(|a| (a.1, a.2, a.3.as_str()) == (snap, version, select));
        let waiting = self.asked.as_ref().is_some_and(|a| a.0 != self.shown);
        if tokens.is_empty() || answered || waiting {
            return;
        }
        let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        if cx.send(Command::Sequence {
            key,
            tokens: tokens.to_vec(),
            select: select.to_string(),
        }) {
            self.asked = Some((key, snap, version, select.to_string()));
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SequencePicker {
    /// Index among the snapshot's sample sequences, when one is shown.
    pub sample: Option<usize>,
    /// The sequence shown (token ids as f32), once chosen.
    pub tokens: Vec<f32>,
    /// The text field (typed tokens).
    pub text: String,
    pub error: Option<String>,
    /// Sequences generated so far (the seed of the next).
    generated: u64,
    /// Bumped when the sequence changes.
    pub version: u64,
}

/// Parses typed tokens: whole numbers, `BOS` (0) or `S` (the induction token), separated by
/// spaces or commas; exactly `seq_len` of them.
pub fn parse_tokens(text: &str, dims: &IhDims) -> Result<Vec<f32>, String> {
    let mut out = vec![];
    for (i, w) in text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .enumerate()
    {
        let v = match w {
            "BOS" | "bos" => 0,
            "S" | "s" => dims.induction_token(),
            _ => w
                .parse::<usize>()
                .map_err(|_| format!("token {i} ('{w}') is not a token id"))?,
        };
        if v >= dims.n_tokens() {
            return Err(format!(
                "token {i} ({v}) is outside the vocabulary (0..{})",
                dims.n_tokens() - 1
            ));
        }
        out.push(v as f32);
    }
    if out.len() != dims.seq_len {
        return Err(format!(
            "{} tokens; the model takes {} (BOS, tokens, ..., S)",
            out.len(),
            dims.seq_len
        ));
    }
    Ok(out)
}

/// Tokens as text (`BOS`, `S` named).
pub fn tokens_text(tokens: &[f32], dims: &IhDims) -> String {
    token_labels(tokens.iter().map(|&t| t as usize), dims).join(" ")
}

/// Each token's label (`BOS`, `S`, or its id), for axes and hovers.
pub fn token_labels(tokens: impl IntoIterator<Item = usize>, dims: &IhDims) -> Vec<String> {
    tokens
        .into_iter()
        .map(|t| match t {
            0 => "BOS".to_string(),
            k if k == dims.induction_token() => "S".to_string(),
            k => k.to_string(),
        })
        .collect()
}

impl SequencePicker {
    /// Draws the controls; returns true when the sequence changed.
    pub fn ui(&mut self, ui: &mut egui::Ui, s: &Snapshot, dims: &IhDims) -> bool {
        let nf = s.n_features;
        let n_samples = s.probe_inputs.len() / nf.max(1);
        let mut changed = false;
        if self.tokens.len() != nf && n_samples > 0 {
            self.sample = Some(0);
            self.tokens = s.probe_inputs[..nf].to_vec();
            self.text = tokens_text(&self.tokens, dims);
            changed = true;
        }
        ui.horizontal(|ui| {
            ui.label("sequence:");
            for i in 0..n_samples {
                if ui
                    .selectable_label(self.sample == Some(i), format!("sample {i}"))
                    .on_hover_text("a sample sequence of the training distribution")
                    .clicked()
                {
                    self.sample = Some(i);
                    self.tokens = s.probe_inputs[i * nf..(i + 1) * nf].to_vec();
                    self.text = tokens_text(&self.tokens, dims);
                    changed = true;
                }
            }
            if ui
                .button("new")
                .on_hover_text("generate another sequence from the data generator")
                .clicked()
            {
                self.generated += 1;
                if let Ok(d) = crate::data::InductionData::new(dims, None) {
                    let mut rng = crate::rng::Rng::new(0x9e9 + self.generated);
                    self.tokens = d.batch(&mut rng, 1);
                    self.sample = None;
                    self.text = tokens_text(&self.tokens, dims);
                    changed = true;
                }
            }
        });
        ui.horizontal(|ui| {
            let r = ui.add(
                egui::TextEdit::singleline(&mut self.text)
                    .desired_width(ui.available_width() - 70.0)
                    .hint_text("token ids: BOS 12 5 ... S"),
            );
            ui.ctx()
                .accesskit_node_builder(r.id, |n| n.set_label("tokens".to_string()));
            let apply = ui
                .button("apply")
                .on_hover_text("show the typed sequence")
                .clicked()
                || (r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)));
            if apply {
                match parse_tokens(&self.text, dims) {
                    Ok(t) => {
                        self.error = None;
                        if t != self.tokens {
                            self.tokens = t;
                            self.sample = None;
                            changed = true;
                        }
                    }
                    Err(e) => self.error = Some(e),
                }
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(egui::Color32::from_rgb(220, 80, 60), e);
        }
        if changed {
            self.version += 1;
        }
        changed
    }
}

/// One `[s, s]` query × key map (one head of one block): built once per worker answer, with
/// its colour scale (weights 0..1; score changes symmetric around 0 at their largest |value|).
pub struct QueryKeyMap {
    pub data: crate::app::heatmap::Data,
    pub style: crate::app::heatmap::Style,
    /// What a cell holds, for the hover text ("weight", "score change").
    pub what: &'static str,
}

impl QueryKeyMap {
    /// Attention weights of head `h` of `vals` (`[heads, s, s]`).
    pub fn weights(vals: &[f32], h: usize, s: usize, version: u64) -> Self {
        Self::new(vals, h, s, version, "weight")
    }

    /// Score changes of head `h` of `vals` (`[heads, s, s]`), diverging around 0.
    pub fn score_change(vals: &[f32], h: usize, s: usize, version: u64) -> Self {
        let mut m = Self::new(vals, h, s, version, "score change");
        let max = m.data.values.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
        m.style = crate::app::heatmap::Style::diverging(max);
        m
    }

    fn new(vals: &[f32], h: usize, s: usize, version: u64, what: &'static str) -> Self {
        let head = vals[h * s * s..(h + 1) * s * s].to_vec();
        QueryKeyMap {
            data: crate::app::heatmap::Data::new(Arc::new(head), s, s, version),
            style: crate::app::heatmap::Style::sequential(0.0, 1.0),
            what,
        }
    }

    /// Draws the map in a `side`-sized square; hover names query and key (position and
    /// token) and the value. Returns the clicked query position.
    pub fn show(
        &self,
        ui: &mut egui::Ui,
        id: egui::Id,
        side: f32,
        tokens: &[String],
    ) -> Option<usize> {
        let s = self.data.rows;
        let (rect, resp) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::click());
        crate::app::heatmap::paint(ui, rect, id, &self.data, self.style);
        let pos = resp.hover_pos()?;
        let (q, k) = crate::app::heatmap::cell_at(rect, s, s, pos)?;
        let name = |i: usize| tokens.get(i).cloned().unwrap_or_default();
        resp.clone().on_hover_text(format!(
            "query {q} ({}), key {k} ({})\n{} {:.4}",
            name(q),
            name(k),
            self.what,
            self.data.get(q, k).unwrap_or(0.0)
        ));
        resp.clicked().then_some(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_tokens_parse_with_names_and_limits() {
        let d = IhDims::attention_only(5, 4, 4, 1, 1);
        assert_eq!(
            parse_tokens("BOS 3, 5 S", &d).unwrap(),
            vec![0.0, 3.0, 5.0, 6.0]
        );
        assert!(
            parse_tokens("BOS 3 7 S", &d)
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            parse_tokens("BOS 3 S", &d)
                .unwrap_err()
                .contains("3 tokens")
        );
        assert!(parse_tokens("BOS x 1 S", &d).unwrap_err().contains("'x'"));
        assert_eq!(tokens_text(&[0.0, 3.0, 6.0], &d), "BOS 3 S");
    }
}
