//! spdlab: Stochastic Parameter Decomposition of neural networks.
//!
//! The engine (models, SPD, metrics, data, I/O) imports no UI crate.

pub mod assets;
pub mod cluster;
pub mod compare;
pub mod data;
pub mod harvest;
pub mod inputs;
pub mod interventions;
pub mod io;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod presets;
pub mod rng;
pub mod runner;
pub mod sequence;
pub mod spd;
pub mod sweep;
pub mod text;
pub mod timeline;
pub mod tinylm;
pub mod worker;

/// The desktop app (the only module that uses a UI crate).
pub mod app;
