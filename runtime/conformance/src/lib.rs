//! Backend conformance suites: one set of tests for the state contract
//! ([`StateStore`](spate_core::StateStore)) and one for the cache contract
//! ([`Cache`](spate_core::Cache)), written once and run against every implementation —
//! the embedded store and in-process cache (`runtime/core/tests/conformance.rs`), the CQL
//! store (`runtime/state-cql/tests`), the Redis cache (`runtime/cache-redis/tests`) and the
//! read-through tier over each.
//!
//! The embedded backends define the contract; a backend that cannot support a group of
//! cases (the in-process CQL test server has no TTL, range scans or lightweight
//! transactions) leaves the group out, and its test file says why.
//!
//! With the `services` feature, the `services` module starts the real servers the suites and the
//! end-to-end tests run against. This crate is for tests and benchmarks only.

pub mod cache;
#[cfg(feature = "services")]
pub mod services;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// An id unique to this process and run (namespaces and key prefixes of one test).
pub fn unique_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "t{:x}{:x}{}",
        nanos,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
