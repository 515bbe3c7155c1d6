//! Spate core: the contract between the runtime's parts, grouped by seam.
//!
//! - [`types`], [`manifest`]: events and a plugin's declaration.
//! - [`plugin`]: what a sandbox offers the dispatcher (versions, instances, call outcomes).
//! - [`host`]: the host API's capability checks and the effect journal a call records.
//! - [`events`], [`state`], [`cache`]: each backend trait with its embedded implementation
//!   beside it (the `redb` log and state store share [`storage`]'s plumbing).
//!
//! This crate knows nothing of WebAssembly, Kafka, ScyllaDB or Redis, nor of how events
//! are dispatched: the sandbox lives in `spate-engine`, the dispatcher in
//! `spate-dispatch`, and cluster backends implement the seams' traits in crates of their
//! own, so the core builds and tests without their C libraries or drivers.

pub mod cache;
pub mod error;
pub mod events;
pub mod filter;
pub mod host;
pub mod manifest;
pub mod metric_names;
pub mod millis;
pub mod plugin;
pub mod state;
pub mod storage;
#[cfg(any(test, feature = "test-kit"))]
pub mod test_kit;
pub mod types;

pub use cache::Cache;
pub use error::{BackendError, BackendResult};
pub use events::{
    ChangeFeed, EmitTicket, EventBus, EventSource, SourceMessage, SourcePosition, StartPosition,
    Subscription, Transactional, Transactions,
};
pub use manifest::Manifest;
pub use state::{ApplyOutcome, Entry, Expiry, StateStore, StateWrite};
pub use types::{Appended, Event, Header, NewEvent, TopicPartition};
