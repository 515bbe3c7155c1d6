//! The `spate` binary's library: configuration, runtime assembly (backends, registry,
//! supervisor), the HTTP API and the CLI client. `main.rs` only wires these together;
//! tests drive [`api::router`] in-process.

pub mod api;
pub mod config;
pub mod node;
pub mod runtime;
pub mod serve;
pub mod telemetry;

pub use config::Config;
pub use runtime::{Backends, Runtime};
