//! Spate core: the event types, the backend traits with their embedded implementations,
//! the host API's effect journal and capability checks, and the dispatcher.
//!
//! This crate knows nothing of WebAssembly, Kafka, ScyllaDB or Redis: the sandbox lives in
//! `spate-engine`, and cluster backends implement the traits in [`backend`] in crates of
//! their own, so the core builds and tests without their C libraries or drivers.

pub mod backend;
pub mod cache_guard;
pub mod dispatch;
pub mod embedded;
pub mod host;
pub mod manifest;
pub mod plugin;
pub mod tiered;
pub mod types;

pub use backend::{
    ApplyOutcome, BackendError, BackendResult, Cache, Entry, EventBus, EventSource, Expiry,
    SourceMessage, StartPosition, StateStore, StateWrite, Subscription,
};
pub use manifest::Manifest;
pub use types::{Appended, Event, Header, NewEvent, TopicPartition};
