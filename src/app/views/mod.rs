//! The views: one file each, a struct implementing [`View`] that owns its state. The registry
//! below is the one list of them: the tab bar, the `--view` names and the export file names
//! all come from it. Adding a view: a new file here and one line in `registry`.

pub mod ci;
pub mod clusters;
pub mod days;
pub mod directions;
pub mod interventions;
pub mod summary;
pub mod training;

use super::view::View;

/// Every view, in tab order.
pub fn registry() -> Vec<Box<dyn View>> {
    vec![
        Box::new(training::TrainingView),
        Box::new(directions::DirectionsView::default()),
        Box::new(ci::CiView::default()),
        Box::new(summary::SummaryView),
        Box::new(clusters::ClustersView::default()),
        Box::new(interventions::InterventionsView::default()),
        Box::new(days::DaysView::default()),
    ]
}

/// The views' short names (`--view`), in tab order.
pub fn names() -> Vec<&'static str> {
    registry().iter().map(|v| v.name()).collect()
}

/// The view called `name` (its canonical name), if there is one.
pub fn from_name(name: &str) -> Option<String> {
    names().into_iter().find(|n| *n == name).map(str::to_string)
}
