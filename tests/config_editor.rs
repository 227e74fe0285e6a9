//! The config editor: typed fields parse into the draft, bad values show their message and
//! make the draft invalid, loss terms are added and removed, JSON round-trips.

use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use spdlab::app::config_editor::ConfigEditor;
use spdlab::spd::config::LossConfig;

fn harness() -> Harness<'static, ConfigEditor> {
    let mut ed = ConfigEditor::default();
    ed.set(spdlab::presets::spd_config("tms-5-2").unwrap());
    Harness::builder()
        .with_size(egui::vec2(500.0, 1400.0))
        .build_ui_state(
            |ui, ed: &mut ConfigEditor| {
                ed.ui(ui);
            },
            ed,
        )
}

fn coeff(ed: &ConfigEditor, name: &str) -> Option<f64> {
    ed.draft
        .as_ref()
        .unwrap()
        .loss_metric_configs
        .iter()
        .find(|l| l.name() == name)
        .and_then(LossConfig::coeff)
}

#[test]
fn fields_parse_validate_and_round_trip() {
    let mut h = harness();
    h.run();
    h.get_by_label("ImportanceMinimalityLoss.coeff")
        .set_text_value_accesskit("1e-2");
    h.run();
    h.get_by_label("C.linear1").set_text_value_accesskit("33");
    h.run();
    assert_eq!(coeff(h.state(), "ImportanceMinimalityLoss"), Some(0.01));
    assert_eq!(h.state().draft.as_ref().unwrap().module_info[0].c, 33);
    assert!(h.state().valid().is_some(), "{:?}", h.state().problems());
    // A value that does not parse, and one the config refuses: messages, no valid draft.
    h.get_by_label("batch_size")
        .set_text_value_accesskit("lots");
    h.run();
    h.get_by_label_contains("'lots' is not a number");
    assert!(h.state().valid().is_none());
    h.get_by_label("batch_size").set_text_value_accesskit("512");
    h.get_by_label("steps").set_text_value_accesskit("0");
    h.run();
    assert!(
        h.state()
            .problems()
            .iter()
            .any(|p| p.contains("steps: must be at least 1")),
        "{:?}",
        h.state().problems()
    );
    h.get_by_label("steps").set_text_value_accesskit("2000");
    h.run();
    assert!(h.state().valid().is_some(), "{:?}", h.state().problems());
    assert_eq!(h.state().draft.as_ref().unwrap().batch_size, 512);
    assert_eq!(h.state().draft.as_ref().unwrap().steps, 2000);
    // Remove a loss term and add another.
    h.get_by_label("remove StochasticReconLayerwiseLoss")
        .click();
    h.run();
    assert_eq!(coeff(h.state(), "StochasticReconLayerwiseLoss"), None);
    h.get_by_label("add a loss term").click();
    h.run();
    h.get_by_label("FaithfulnessLoss").click();
    h.run();
    assert_eq!(coeff(h.state(), "FaithfulnessLoss"), Some(1.0));
    // JSON round trip in the CLI's --config format.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("cfg.json");
    h.state().save_json(&p, "tms-5-2").unwrap();
    let mut again = ConfigEditor::default();
    assert_eq!(again.load_json(&p).unwrap().as_deref(), Some("tms-5-2"));
    assert_eq!(again.draft, h.state().draft);
    // A misspelt field in a loaded file is named.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["batch_sizee"] = 3.into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = again.load_json(&p).unwrap_err();
    assert!(e.contains("did you mean 'batch_size'"), "{e}");
    // An unknown preset is named.
    v.as_object_mut().unwrap().remove("batch_sizee");
    v["preset"] = "no-such-preset".into();
    std::fs::write(&p, v.to_string()).unwrap();
    let e = again.load_json(&p).unwrap_err();
    assert!(e.contains("no-such-preset"), "{e}");
}
