//! Stochastic Parameter Decomposition: components, causal importance, losses, training.

pub mod adam;
pub mod ci_op;
pub mod component_model;
pub mod config;
pub mod schedule;
pub mod trainer;
