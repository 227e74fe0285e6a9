//! The prompt view on a goodfire-ai/spd language-model run (kittest, real worker): the text's
//! tokens, CI per token equal to the engine's, next-token predictions; a click selects.

mod common;

use std::path::Path;

use eframe::egui;
use egui_kittest::kittest::Queryable;
use spdlab::app::views::prompt::PromptView;

/// The prompt view's answer shown now.
fn shown(
    h: &egui_kittest::Harness<'static, spdlab::app::SpdApp>,
) -> std::sync::Arc<spdlab::text::PromptResult> {
    h.state()
        .view::<PromptView>()
        .unwrap()
        .result
        .clone()
        .unwrap()
}

/// The component page shown now.
fn shown_page(
    h: &egui_kittest::Harness<'static, spdlab::app::SpdApp>,
) -> std::sync::Arc<spdlab::text::ComponentPage> {
    h.state()
        .view::<PromptView>()
        .unwrap()
        .page
        .clone()
        .unwrap()
}

#[test]
fn prompt_view_shows_tokens_ci_and_predictions() {
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref-lm-run/spd-run");
    let mut h = common::app_on(run.clone(), Some("prompt"), egui::vec2(1300.0, 850.0));
    common::wait(&mut h, "the prompt's answer", |a| {
        a.view::<PromptView>().is_some_and(|v| v.result.is_some())
    });
    h.run_steps(2);
    let r = shown(&h);
    let text = h.state().view::<PromptView>().unwrap().text.clone();
    // What the engine computes for the same text.
    let (tr, _, _) = spdlab::io::load_any(&run, &candle_core::Device::Cpu).unwrap();
    let tok =
        spdlab::text::TextTokenizer::load(&spdlab::io::reference::lm_tokenizer_path(&run).unwrap())
            .unwrap();
    let want = spdlab::text::run_prompt(&tr.model, &tok, &text, None).unwrap();
    assert_eq!(r.ids, want.ids);
    assert_eq!(r.ci, want.ci);
    assert_eq!(r.top_target, want.top_target);
    h.get_by_label_contains(&format!("{} tokens:", r.ids.len()));
    h.get_by_label_contains("next-token predictions");
    // A new prompt is tokenized and run again.
    h.state_mut().view_mut::<PromptView>().unwrap().text = "Tom sang.".into();
    common::wait(&mut h, "the new prompt", |a| {
        a.view::<PromptView>()
            .and_then(|v| v.result.as_ref())
            .is_some_and(|r| r.text == "Tom sang.")
    });
    let n = h
        .state()
        .view::<PromptView>()
        .unwrap()
        .result
        .as_ref()
        .unwrap()
        .ids
        .len();
    assert_eq!(n, tok.encode("Tom sang.").unwrap().len());
    // Clicking a token chip moves the predictions to it.
    h.run_steps(2);
    let second = format!(
        "\"{}\"",
        h.state()
            .view::<PromptView>()
            .unwrap()
            .result
            .as_ref()
            .unwrap()
            .tokens[1]
    );
    h.get_all_by_label(&second).next().unwrap().click();
    h.run_steps(2);
    assert_eq!(h.state().view::<PromptView>().unwrap().position, 1);
    // An intervention on the prompt: ablating a whole MLP layer, under CI-masked others and
    // stochastic masks.
    {
        let v = h.state_mut().view_mut::<PromptView>().unwrap();
        v.select = "h.1.mlp.c_fc:*".into();
        v.scale = 0.0;
    }
    common::wait(&mut h, "the intervention", |a| {
        a.view::<PromptView>()
            .and_then(|v| v.result.as_ref())
            .is_some_and(|r| r.intervention.is_some())
    });
    h.run_steps(2);
    let r = shown(&h);
    let iv = r.intervention.as_ref().unwrap();
    assert_eq!(iv.labels.len(), 16);
    assert_eq!(iv.regimes.len(), 3);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    for reg in &iv.regimes {
        assert_eq!(reg.top_after.len(), n);
        assert!(
            mean(&reg.kl_after) > mean(&reg.kl_before),
            "{}: ablating h.1.mlp.c_fc must move the outputs away from the target",
            reg.name
        );
    }
    // The CI-masked regime's "before" is the CI-masked decomposition itself.
    assert_eq!(iv.regimes[0].top_before, r.top_masked);
    // The adversarial (PGD) worst case is further from the target than the CI masks and than
    // random masks in the same range.
    assert!(iv.regimes[2].name.contains("PGD"));
    assert!(mean(&iv.regimes[2].kl_before) > mean(&iv.regimes[1].kl_before));
    assert!(mean(&iv.regimes[2].kl_before) > mean(&iv.regimes[0].kl_before));
    assert_eq!(h.get_all_by_label_contains("KL(target||.) here").count(), 3);
    // The component page of a selected subcomponent: contexts over the run's text, and the
    // tokens a residual-stream writer promotes and suppresses.
    {
        let a = h.state_mut();
        a.selection.module = tr.model.module_index("h.1.mlp.down_proj").unwrap();
        a.selection.component = Some(3);
    }
    common::wait(&mut h, "the component page", |a| {
        a.view::<PromptView>()
            .and_then(|v| v.page.as_ref())
            .is_some_and(|p| p.module == "h.1.mlp.down_proj" && p.c == 3)
    });
    h.run_steps(2);
    let page = shown_page(&h);
    assert!(page.windows > 100 && !page.contexts.is_empty());
    assert_eq!(page.promoted.len(), 10);
    assert_eq!(page.suppressed.len(), 10);
    assert!(page.promoted[0].1 >= page.suppressed[0].1);
    assert!(
        page.contexts.windows(2).all(|w| w[0].0 >= w[1].0),
        "strongest first"
    );
    h.get_by_label_contains("top-activating contexts");
    h.get_by_label_contains("promotes:");
    // The harvest: one pass over the text for every subcomponent (a job with progress); the
    // page then comes from it, at least as strong as the 4,096-window scan.
    h.get_by_label("Harvest").click();
    common::wait(&mut h, "the harvested page", |a| {
        a.view::<PromptView>()
            .and_then(|v| v.page.as_ref())
            .is_some_and(|p| p.harvested.is_some())
    });
    h.run_steps(2);
    let hp = shown_page(&h);
    assert_eq!((hp.module.as_str(), hp.c), ("h.1.mlp.down_proj", 3));
    assert!(hp.positions >= page.positions);
    assert!(hp.contexts[0].0 >= page.contexts[0].0);
    assert_eq!(hp.promoted, page.promoted);
    if hp.firing > 0.0 {
        assert!(!hp.fires_on.is_empty());
        h.get_by_label_contains("fires on:");
    }
    h.get_by_label_contains("pages from the stored harvest");
    // CSV: one row per token, module and subcomponent.
    let d = tempfile::tempdir().unwrap();
    let csv = d.path().join("prompt.csv");
    h.state_mut().export_csv(&csv).unwrap();
    common::wait(&mut h, "the CSV", |_| csv.exists());
    let rows = std::fs::read_to_string(&csv).unwrap().lines().count() - 1;
    assert_eq!(rows, n * 12 * 16);
}

/// The day-after demonstration in the app: on a tiny-lm decomposition with a stored
/// clustering, "Find its clusters" runs the unlearning search on the worker (progress, then
/// the answer) and the clusters it found become the prompt's intervention, ablated.
#[test]
fn unlearning_a_rule_ablates_the_clusters_found() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny.spdlab");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spdlab"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let f = file.to_str().unwrap();
    run(&[
        "--threads",
        "2",
        "train",
        "--preset",
        "tiny-lm",
        "--steps",
        "20",
        "--out",
        f,
        "--timeline-frames",
        "0",
        "--autosave-secs",
        "0",
    ]);
    // Without a clustering the search says what to do first.
    let mut h = common::app_on(file.clone(), Some("prompt"), egui::vec2(1300.0, 850.0));
    common::wait(&mut h, "the prompt's answer", |a| {
        a.view::<PromptView>().is_some_and(|v| v.result.is_some())
    });
    h.run_steps(2);
    assert_eq!(
        h.state().view::<PromptView>().unwrap().text,
        spdlab::app::views::prompt::TINY_LM_STORY
    );
    h.get_by_label("Find its clusters").click();
    let t0 = std::time::Instant::now();
    while h.state().session.error.is_none() {
        assert!(t0.elapsed().as_secs() < 60, "no error without clusters");
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.step();
    }
    let e = h.state().session.error.clone().unwrap();
    assert!(e.contains("cluster this run first"), "{e}");
    drop(h);
    run(&["cluster", f, "--save", f, "--samples", "256"]);
    let mut h = common::app_on(file.clone(), Some("prompt"), egui::vec2(1300.0, 850.0));
    common::wait(&mut h, "the prompt's answer", |a| {
        a.view::<PromptView>().is_some_and(|v| v.result.is_some())
    });
    h.state_mut()
        .view_mut::<PromptView>()
        .unwrap()
        .unlearn_stories = 12;
    h.run_steps(2);
    h.get_by_label("Find its clusters").click();
    h.run_steps(1);
    assert!(h.state().view::<PromptView>().unwrap().unlearning.is_some());
    common::wait(&mut h, "the unlearning search", |a| {
        a.view::<PromptView>()
            .is_some_and(|v| v.unlearned.is_some())
    });
    let v = h.state().view::<PromptView>().unwrap();
    let u = v.unlearned.clone().unwrap();
    assert!(v.unlearning.is_none());
    assert_eq!(u.rule, "day_after");
    assert_eq!(
        u.candidates.len(),
        u.candidates.len().min(spdlab::tinylm::MAX_CANDIDATES)
    );
    let spec: Vec<String> = u
        .chosen
        .iter()
        .map(|(id, _)| format!("cluster:{id}"))
        .collect();
    assert_eq!(v.select, spec.join(","));
    assert_eq!(v.scale, 0.0);
    h.run_steps(2);
    h.get_by_label_contains("held-out stories");
    if !u.chosen.is_empty() {
        // The prompt runs again with the clusters ablated.
        common::wait(&mut h, "the intervention", |a| {
            a.view::<PromptView>()
                .and_then(|v| v.result.as_ref())
                .is_some_and(|r| r.intervention.is_some())
        });
    }
}
