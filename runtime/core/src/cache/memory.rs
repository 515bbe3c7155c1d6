//! The embedded cache: an in-process, size-bounded cache on `moka` with a TTL per entry.
//!
//! It owns expiry, eviction and atomic counters; key prefixes come from the host layer.
//! Nothing survives a restart. Values set with `set` expire after their TTL; counters
//! created by `incr` never expire, and `incr` on a value set with a TTL keeps that TTL
//! (as Redis does).

use crate::{BackendError, BackendResult, Cache};
use async_trait::async_trait;
use moka::Expiry;
use moka::ops::compute::Op;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default capacity: 64 MiB of keys and values.
const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Bookkeeping bytes charged per entry on top of its key and value.
const ENTRY_OVERHEAD: usize = 64;

/// How long a cached value lives.
#[derive(Clone, Copy, Debug)]
enum Lifetime {
    /// This long from its last write.
    Ttl(Duration),
    /// Until evicted.
    Forever,
    /// Whatever remained of the value it replaced (an `incr` of a value with a TTL).
    Inherit,
}

#[derive(Clone, Debug)]
struct Entry {
    value: Arc<[u8]>,
    lifetime: Lifetime,
}

struct EntryExpiry;

impl Expiry<String, Entry> for EntryExpiry {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _at: Instant) -> Option<Duration> {
        match entry.lifetime {
            Lifetime::Ttl(ttl) => Some(ttl),
            Lifetime::Forever | Lifetime::Inherit => None,
        }
    }

    fn expire_after_update(
        &self,
        _key: &String,
        entry: &Entry,
        _at: Instant,
        remaining: Option<Duration>,
    ) -> Option<Duration> {
        match entry.lifetime {
            Lifetime::Ttl(ttl) => Some(ttl),
            Lifetime::Forever => None,
            Lifetime::Inherit => remaining,
        }
    }
}

/// The in-process cache's `[cache]` section (`type = "memory"`, the default).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MemorySettings {
    /// Most bytes of keys and values kept; least recently used entries go first.
    pub max_bytes: u64,
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            max_bytes: 256 << 20,
        }
    }
}

/// The in-process cache; see the [module docs](self).
pub struct MokaCache {
    inner: moka::sync::Cache<String, Entry>,
}

impl MokaCache {
    /// A cache holding at most about `max_bytes` of keys and values (each entry is also
    /// charged a small fixed overhead); the least useful entries are evicted beyond that.
    pub fn new(max_bytes: u64) -> Self {
        let inner = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, entry: &Entry| {
                u32::try_from(key.len() + entry.value.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry)
            .build();
        Self { inner }
    }

    /// A cache as its settings ask.
    pub fn with_settings(settings: &MemorySettings) -> Self {
        Self::new(settings.max_bytes)
    }
}

impl Default for MokaCache {
    /// A cache of 64 MiB.
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BYTES)
    }
}

fn parse_counter(value: &[u8]) -> BackendResult<i64> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| BackendError::Invalid("cached value is not a decimal integer".into()))
}

#[async_trait]
impl Cache for MokaCache {
    async fn get(&self, key: &str) -> BackendResult<Option<Vec<u8>>> {
        Ok(self.inner.get(key).map(|e| e.value.to_vec()))
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> BackendResult<()> {
        let entry = Entry {
            value: value.into(),
            lifetime: Lifetime::Ttl(ttl),
        };
        self.inner.insert(key.to_owned(), entry);
        Ok(())
    }

    async fn delete(&self, key: &str) -> BackendResult<()> {
        self.inner.invalidate(key);
        Ok(())
    }

    async fn incr(&self, key: &str, delta: i64) -> BackendResult<i64> {
        let mut result = 0;
        // Compute calls on one key run one at a time, so concurrent increments all count.
        self.inner
            .entry(key.to_owned())
            .and_try_compute_with(|current| {
                let (base, lifetime) = match current {
                    None => (0, Lifetime::Forever),
                    Some(e) => (parse_counter(&e.value().value)?, Lifetime::Inherit),
                };
                result = base.checked_add(delta).ok_or_else(|| {
                    BackendError::Invalid("increment would overflow a 64-bit integer".into())
                })?;
                Ok::<_, BackendError>(Op::Put(Entry {
                    value: result.to_string().into_bytes().into(),
                    lifetime,
                }))
            })?;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn get_set_delete() {
        let c = MokaCache::default();
        assert_eq!(c.get("k").await.unwrap(), None);
        c.set("k", b"v1".to_vec(), LONG).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(b"v1".to_vec()));
        c.set("k", b"v2".to_vec(), LONG).await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(b"v2".to_vec()));
        c.delete("k").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), None);
        c.delete("k").await.unwrap();
    }

    #[tokio::test]
    async fn values_expire_after_their_ttl() {
        let c = MokaCache::default();
        c.set("short", b"x".to_vec(), Duration::from_millis(50))
            .await
            .unwrap();
        c.set("long", b"y".to_vec(), LONG).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(c.get("short").await.unwrap(), None);
        assert_eq!(c.get("long").await.unwrap(), Some(b"y".to_vec()));
        // A new TTL on rewrite replaces the old one.
        c.set("long", b"z".to_vec(), Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(c.get("long").await.unwrap(), None);
    }

    #[tokio::test]
    async fn incr_counts_and_rejects_non_integers() {
        let c = MokaCache::default();
        assert_eq!(c.incr("n", 5).await.unwrap(), 5);
        assert_eq!(c.incr("n", -7).await.unwrap(), -2);
        assert_eq!(c.get("n").await.unwrap(), Some(b"-2".to_vec()));
        c.set("s", b"41".to_vec(), LONG).await.unwrap();
        assert_eq!(c.incr("s", 1).await.unwrap(), 42);
        c.set("word", b"abc".to_vec(), LONG).await.unwrap();
        assert!(matches!(
            c.incr("word", 1).await,
            Err(BackendError::Invalid(_))
        ));
        assert_eq!(c.get("word").await.unwrap(), Some(b"abc".to_vec()));
        c.set("max", i64::MAX.to_string().into_bytes(), LONG)
            .await
            .unwrap();
        assert!(matches!(
            c.incr("max", 1).await,
            Err(BackendError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn incr_keeps_an_existing_ttl_and_new_counters_do_not_expire() {
        let c = MokaCache::default();
        // 1 s, not 50 ms: the incr below must come before the expiry on a loaded machine.
        c.set("ttl", b"1".to_vec(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(c.incr("ttl", 1).await.unwrap(), 2);
        assert_eq!(c.incr("counter", 1).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        assert_eq!(c.get("ttl").await.unwrap(), None);
        assert_eq!(c.get("counter").await.unwrap(), Some(b"1".to_vec()));
        // An expired value counts as missing.
        assert_eq!(c.incr("ttl", 1).await.unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_increments_all_count() {
        let c = Arc::new(MokaCache::default());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    for _ in 0..100 {
                        c.incr("hits", 1).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(c.get("hits").await.unwrap(), Some(b"1600".to_vec()));
    }

    #[tokio::test]
    async fn capacity_bounds_the_cache() {
        let c = MokaCache::new(64 * 1024);
        for i in 0..1000 {
            c.set(&format!("k{i}"), vec![0; 1024], LONG).await.unwrap();
        }
        c.inner.run_pending_tasks();
        assert!(c.inner.weighted_size() <= 64 * 1024);
        assert!(c.inner.entry_count() < 1000);
    }
}
