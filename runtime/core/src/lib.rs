//! Spate core: the event types, the backend traits with their embedded implementations,
//! the plugin contract ([`plugin`]), and the host API's capability checks and effect
//! journal ([`host`]).
//!
//! This crate knows nothing of WebAssembly, Kafka, ScyllaDB or Redis, nor of how events
//! are dispatched: the sandbox lives in `spate-engine`, the dispatcher in
//! `spate-dispatch`, and cluster backends implement the traits in [`backend`] in crates
//! of their own, so the core builds and tests without their C libraries or drivers.

pub mod backend;
pub mod cache_guard;
pub mod embedded;
pub mod host;
pub mod manifest;
pub mod metric_names;
pub mod millis;
pub mod parked;
pub mod plugin;
#[cfg(any(test, feature = "test-kit"))]
pub mod test_kit;
pub mod tiered;
pub mod types;

pub use backend::{
    ApplyOutcome, BackendError, BackendResult, Cache, Entry, EventBus, EventSource, Expiry,
    SourceMessage, StartPosition, StateStore, StateWrite, Subscription,
};
pub use manifest::Manifest;
pub use types::{Appended, Event, Header, NewEvent, TopicPartition};
