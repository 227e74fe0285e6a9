//! The sequence views with the real worker on a goodfire-ai/spd ih run: the sequence CI view
//! gets every module's CI at every position of a sample sequence, typed tokens are checked,
//! and the attention view shows target / full / ablated patterns that are causal and sum to
//! one per query.

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use spdlab::app::SpdApp;
use spdlab::app::views::attention::AttentionView;
use spdlab::app::views::sequence::SequenceView;

mod common;
use common::wait;

fn harness(view: &str) -> Harness<'static, SpdApp> {
    let run =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref-ih-tiny");
    common::app_on(run, Some(view), egui::vec2(1300.0, 900.0))
}

#[test]
fn sequence_ci_view_shows_every_module_at_every_position() {
    let mut h = harness("sequence");
    wait(&mut h, "the sequence's CI", |a| {
        a.view::<SequenceView>()
            .is_some_and(|v| v.link.probe.is_some())
    });
    h.run();
    let v = h.state().view::<SequenceView>().unwrap();
    let p = v.link.probe.clone().unwrap();
    assert_eq!(p.tokens.len(), 64);
    assert_eq!(p.modules.len(), 8);
    for (j, ci) in p.ci.iter().enumerate() {
        assert_eq!(ci.len(), 64 * p.c[j]);
        assert!(ci.iter().all(|x| (0.0..=1.0).contains(x)));
    }
    // The engine's CI of the same sequence, position by position.
    let snap = h.state().session.snapshot.clone().unwrap();
    assert_eq!(
        p.tokens.iter().map(|&t| t as f32).collect::<Vec<_>>(),
        snap.probe_inputs[..64]
    );
    let (tr, _) = spdlab::io::reference::import(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref-ih-tiny"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let rep =
        spdlab::runner::ci_report(&tr.model, &[snap.probe_inputs[..64].to_vec()], false).unwrap();
    for (j, m) in p.modules.iter().enumerate() {
        let want: Vec<f32> = rep.ci[m].iter().flatten().copied().collect();
        assert_eq!(p.ci[j], want, "{m}");
    }
    // The induction position is named.
    h.get_by_label_contains("induction: position 63");
    // A typed sequence of the wrong length is refused with its reason.
    h.state_mut()
        .view_mut::<SequenceView>()
        .unwrap()
        .picker
        .text = "BOS 1 2 S".into();
    h.run();
    h.get_by_label("apply").click();
    h.run();
    h.get_by_label_contains("4 tokens; the model takes 64");
    // "new" generates another sequence and the worker answers for it.
    let before = p.tokens.clone();
    h.get_by_label("new").click();
    h.run();
    wait(&mut h, "the new sequence's CI", |a| {
        a.view::<SequenceView>()
            .and_then(|v| v.link.probe.clone())
            .is_some_and(|p| p.tokens != before)
    });
    assert!(h.state().session.error.is_none());
    let _ = h.render().expect("render");
    // CSV export (written by the worker): one row per (module, subcomponent, position).
    let d = tempfile::tempdir().unwrap();
    let csv = d.path().join("sequence.csv");
    h.state_mut().export_csv(&csv).unwrap();
    wait(&mut h, "the CSV", |_| csv.exists());
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(
        text.lines().next(),
        Some("module,component,position,token,ci")
    );
    assert_eq!(text.lines().count(), 1 + 8 * 10 * 64);
}

/// The attention view's current answer from the worker.
fn attention_probe(
    h: &Harness<'static, SpdApp>,
) -> std::sync::Arc<spdlab::sequence::SequenceProbe> {
    let v = h.state().view::<AttentionView>().unwrap();
    v.link.probe.clone().expect("an answer")
}

#[test]
fn attention_view_shows_target_full_and_ablated_patterns() {
    let mut h = harness("attention");
    wait(&mut h, "the attention patterns", |a| {
        a.view::<AttentionView>()
            .is_some_and(|v| v.link.probe.is_some())
    });
    let p = attention_probe(&h);
    assert_eq!(p.attention.len(), 2);
    assert!(p.attention[0].ablated.is_none(), "nothing selected yet");
    let s = 64;
    for a in &p.attention {
        for pat in [&a.target, &a.full] {
            for q in 0..s {
                let row = &pat[q * s..(q + 1) * s];
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
                assert!(row[q + 1..].iter().all(|&w| w == 0.0), "causal");
            }
        }
    }
    // Ablate all of block 1's q_proj: the ablated pattern of block 1 changes, block 0's not.
    h.state_mut().view_mut::<AttentionView>().unwrap().select = "blocks.1.attn.q_proj:*".into();
    wait(&mut h, "the ablated patterns", |a| {
        a.view::<AttentionView>()
            .and_then(|v| v.link.probe.clone())
            .is_some_and(|p| !p.selection.is_empty())
    });
    let p = attention_probe(&h);
    assert_eq!(p.selection.len(), 10);
    let abl0 = p.attention[0].ablated.as_ref().unwrap();
    let abl1 = p.attention[1].ablated.as_ref().unwrap();
    assert_eq!(
        abl0, &p.attention[0].full,
        "block 0 does not read block 1's q"
    );
    let d: f32 = abl1
        .iter()
        .zip(&p.attention[1].full)
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(d > 1.0, "ablating q of block 1 changes its pattern ({d})");
    assert!(p.kl_ablated[63] > p.kl_full[63]);
    h.run();
    h.get_by_label_contains("ablated: blocks.1.attn.q_proj:0");
    h.get_by_label_contains("target top 3:");
    let _ = h.render().expect("render");
    assert!(h.state().session.error.is_none());
    let d = tempfile::tempdir().unwrap();
    let csv = d.path().join("attention.csv");
    h.state_mut().export_csv(&csv).unwrap();
    wait(&mut h, "the CSV", |_| csv.exists());
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 1 + 2 * 64 * 64);
    assert!(
        text.lines()
            .nth(1)
            .unwrap()
            .split(',')
            .all(|f| !f.is_empty()),
        "ablated column filled"
    );
}

#[test]
fn interventions_view_on_sequences_reports_every_position() {
    use spdlab::app::views::interventions::{InputKind, InterventionsView};
    let mut h = harness("interventions");
    let iv = |h: &Harness<'static, SpdApp>| {
        h.state()
            .view::<InterventionsView>()
            .unwrap()
            .outcome
            .clone()
    };
    wait(&mut h, "the intervention on generated sequences", |a| {
        a.view::<InterventionsView>()
            .is_some_and(|v| v.outcome.is_some())
    });
    // Sequence models start on generated sequences (probes are not token ids).
    assert_eq!(
        h.state().view::<InterventionsView>().unwrap().input_kind,
        InputKind::Batch
    );
    h.state_mut()
        .view_mut::<InterventionsView>()
        .unwrap()
        .select = "blocks.1.attn.q_proj:*".into();
    wait(&mut h, "the q ablation", |a| {
        a.view::<InterventionsView>()
            .and_then(|v| v.outcome.clone())
            .is_some_and(|o| o.request.select == "blocks.1.attn.q_proj:*")
    });
    let o = iv(&h).unwrap();
    let r = &o.result;
    assert_eq!(r.inputs.len(), 64);
    assert_eq!(r.positions.len(), 64 * 64);
    // The per-sequence loss is the mean of the per-position KLs.
    for i in 0..64 {
        let mean: f32 = r.positions[i * 64..(i + 1) * 64]
            .iter()
            .map(|p| p.kl_intervened)
            .sum::<f32>()
            / 64.0;
        assert!((mean - r.loss_intervened[i]).abs() <= 1e-5 * mean.max(1.0));
    }
    // Ranked by the KL the ablation adds; ablating layer 1's queries breaks induction.
    let order = r.what_breaks();
    assert!(r.loss_change[order[0]] >= r.loss_change[order[63]]);
    let ind = r
        .per_feature
        .iter()
        .find(|f| f.name.starts_with("induction"))
        .unwrap();
    assert!(ind.intervened < ind.baseline, "{ind:?}");
    h.run();
    h.get_by_label_contains("What breaks (sequences by the KL");
    h.get_by_label("KL interv.");
    // One chosen sequence: the picker's tokens are the input.
    h.state_mut()
        .view_mut::<InterventionsView>()
        .unwrap()
        .input_kind = InputKind::Custom;
    wait(&mut h, "the intervention on one sequence", |a| {
        a.view::<InterventionsView>()
            .and_then(|v| v.outcome.clone())
            .is_some_and(|o| o.result.inputs.len() == 1)
    });
    let o = iv(&h).unwrap();
    let tokens = h
        .state()
        .view::<InterventionsView>()
        .unwrap()
        .picker
        .tokens
        .clone();
    assert_eq!(o.result.inputs[0], tokens);
    assert_eq!(o.result.positions.len(), 64);
    wait(&mut h, "the trace", |a| {
        a.view::<InterventionsView>()
            .is_some_and(|v| v.trace.is_some())
    });
    let t = h
        .state()
        .view::<InterventionsView>()
        .unwrap()
        .trace
        .clone()
        .unwrap();
    assert!(!t.entries.is_empty());
    assert!(t.entries.iter().all(|e| e.position.is_some_and(|p| p < 64)));
    h.run();
    let _ = h.render().expect("render");
    let d = tempfile::tempdir().unwrap();
    let csv = d.path().join("iv.csv");
    h.state_mut().export_csv(&csv).unwrap();
    wait(&mut h, "the CSV", |_| csv.exists());
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count(), 1 + 64);
    assert!(text.starts_with("input,position,token,kl_baseline"));
}
