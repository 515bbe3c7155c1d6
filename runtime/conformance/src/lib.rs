//! Backend conformance suites: one set of tests for the state contract
//! ([`StateStore`](spate_core::StateStore)) and one for the cache contract
//! ([`Cache`](spate_core::Cache)), written once and run against every implementation —
//! the embedded store and in-process cache (`runtime/core/tests/conformance.rs`), the CQL
//! store (`runtime/state-cql/tests`), the Redis cache (`runtime/cache-redis/tests`) and the
//! read-through tier over each.
//!
//! The embedded backends define the contract; every backend runs every group of cases.
//!
//! With the `services` feature, it starts the real servers the suites and the end-to-end
//! tests run against, each on free loopback ports: `services` a `redis-server` and a fault
//! proxy, `kafka` an Apache Kafka broker (with rdkafka helpers to produce and read back),
//! `cassandra` an Apache Cassandra node, the last two from their Maven Central jars (`jvm`).
//! This crate is for tests and benchmarks only.

pub mod cache;
#[cfg(feature = "services")]
pub mod cassandra;
#[cfg(feature = "services")]
pub mod jvm;
#[cfg(feature = "services")]
pub mod kafka;
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

/// `n` draws from a Zipf(`s`) distribution over key ranks `0..keys` (rank 0 the most
/// frequent), deterministic for a `seed`: the skewed workload of the read-through tests
/// and the tier benchmark.
pub fn zipf_keys(keys: u32, s: f64, n: usize, seed: u64) -> Vec<u32> {
    let weights: Vec<f64> = (1..=keys).map(|r| 1.0 / f64::from(r).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    let cdf: Vec<f64> = weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect();
    let last = cdf.len().saturating_sub(1);
    // xorshift64: deterministic and dependency-free.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            u32::try_from(cdf.partition_point(|&c| c < u).min(last)).unwrap_or(0)
        })
        .collect()
}
