//! Stochastic Parameter Decomposition: components, causal importance, losses, training.

pub mod adam;
// Polynomial coefficients of the vectorised erf/exp are written out in full on purpose.
#[allow(
    clippy::excessive_precision,
    clippy::approx_constant,
    clippy::manual_clamp
)]
pub mod ci_op;
pub mod component_model;
pub mod config;
pub mod schedule;
pub mod trainer;
