//! The views: one file each, a struct implementing [`View`] that owns its state. The registry
//! below is the one list of them: the tab bar, the `--view` names and the export file names
//! all come from it. Adding a view: a new file here and one line in `views!`, e.g.
//!
//! ```ignore
//! // src/app/views/norms.rs
//! use eframe::egui;
//! use crate::app::view::{View, ViewCtx};
//!
//! #[derive(Default)]
//! pub struct NormsView;
//!
//! impl View for NormsView {
//!     fn name(&self) -> &'static str { "norms" }
//!     fn label(&self) -> &'static str { "Norms" }
//!     fn ui(&mut self, cx: &mut ViewCtx, ui: &mut egui::Ui) {
//!         if let Some(s) = cx.snapshot() {
//!             ui.label(format!("{:?}", s.modules[cx.selection.module].norms));
//!         }
//!     }
//!     fn csv(&self, cx: &ViewCtx) -> anyhow::Result<String> {
//!         Ok(format!("{:?}\n", cx.require_snapshot()?.modules[0].norms))
//!     }
//! }
//! ```
//!
//! plus the line `norms => norms::NormsView,` in `views!` below. A view reads the snapshot, the
//! session and the clusters through [`ViewCtx`], changes the shared selection there, sends
//! worker commands with `cx.send` (answers arrive in `View::on_event`) and asks the app for
//! anything else with `cx.request`.

use super::view::View;

/// Declares each view's module and lists the views in tab order: one line per view.
macro_rules! views {
    ($($module:ident => $view:expr),* $(,)?) => {
        $(pub mod $module;)*

        /// Every view, in tab order.
        pub fn registry() -> Vec<Box<dyn View>> {
            vec![$(Box::new($view)),*]
        }
    };
}

views! {
    training => training::TrainingView,
    directions => directions::DirectionsView::default(),
    ci => ci::CiView::default(),
    summary => summary::SummaryView,
    clusters => clusters::ClustersView::default(),
    interventions => interventions::InterventionsView::default(),
    days => days::DaysView::default(),
    sequence => sequence::SequenceView::default(),
    prompt => prompt::PromptView::default(),
    attention => attention::AttentionView::default(),
    trajectories => trajectories::TrajectoriesView::default(),
    sweep => sweep::SweepView::default(),
}

/// The views' short names (`--view`), in tab order.
pub fn names() -> Vec<&'static str> {
    registry().iter().map(|v| v.name()).collect()
}

/// The view called `name` (its canonical name), if there is one.
pub fn from_name(name: &str) -> Option<String> {
    names().into_iter().find(|n| *n == name).map(str::to_string)
}
