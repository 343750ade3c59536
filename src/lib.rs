//! trackersync: a peer-to-peer sync node for tracker items.
//!
//! Modules in reading order: the pure core first (clock, model, registers, documents), then
//! storage and the repo that owns documents, then the node's edges (local API, CLI).
//! ARCHITECTURE.md has the codemap and the invariants.

pub mod api;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod fuzzing;
pub mod hlc;
pub mod item;
pub mod metrics;
pub mod model;
pub mod net;
pub mod node;
pub mod peer;
pub mod register;
pub mod repo;
pub mod schema;
pub mod store;
pub mod synclog;
