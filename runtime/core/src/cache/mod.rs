//! The cache seam: a cache with expiry ([`Cache`]), the embedded in-process cache
//! ([`MokaCache`]) and the fail-open wrapper every remote cache runs behind
//! ([`GuardedCache`]). The Redis implementation is the `spate-cache-redis` crate.

pub mod guard;
pub mod memory;

pub use guard::GuardedCache;
pub use memory::{MemorySettings, MokaCache};

use crate::error::BackendResult;
use async_trait::async_trait;
use std::time::Duration;

/// A cache with expiry. Keys arrive fully prefixed by the host layer.
#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// The cached value, if present and unexpired.
    async fn get(&self, key: &str) -> BackendResult<Option<Vec<u8>>>;

    /// Cache `value` for `ttl`.
    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> BackendResult<()>;

    /// Forget `key`.
    async fn delete(&self, key: &str) -> BackendResult<()>;

    /// Add `delta` to the decimal integer at `key` (missing = 0) and return the result.
    /// A value that is not an integer is an [`BackendError::Invalid`](crate::BackendError::Invalid).
    async fn incr(&self, key: &str, delta: i64) -> BackendResult<i64>;
}
