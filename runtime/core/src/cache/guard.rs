//! A cache that fails open: while its backend is unreachable, reads are misses and writes
//! fail fast, so a cache outage never holds up an event.
//!
//! [`GuardedCache`] wraps any [`Cache`] (in practice Redis). The first
//! [`BackendError::Unavailable`] marks the cache *degraded* (gauge `spate_cache_degraded`
//! = 1) and, for `retry_interval`, every call is answered without touching the backend:
//! `get` with a miss, writes with `Unavailable` (the dispatcher applies cache writes best
//! effort, and the read-through tier remembers what it could not update). After the
//! interval the next call probes the backend again; the first success clears the degraded
//! state. Reconnecting is the wrapped client's job (redis-rs' `ConnectionManager`).
//!
//! Plugins therefore see a cache miss, never a trap, while Redis is down — a cache may
//! forget anything at any time, and an outage is the extreme case of that.

use crate::{BackendError, BackendResult, Cache};
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// A fail-open wrapper around a cache; see the [module docs](self).
pub struct GuardedCache {
    inner: Arc<dyn Cache>,
    name: String,
    retry_interval: Duration,
    /// While set and in the future, calls skip the backend.
    open_until: Mutex<Option<Instant>>,
    degraded: AtomicBool,
    outages: AtomicU64,
    skipped: AtomicU64,
}

impl GuardedCache {
    /// Guard `inner`, labelled `name` in metrics (`cache="redis"`), re-probing a degraded
    /// backend every `retry_interval`.
    pub fn new(inner: Arc<dyn Cache>, name: &str, retry_interval: Duration) -> Self {
        metrics::gauge!(crate::metric_names::CACHE_DEGRADED, "cache" => name.to_owned()).set(0.0);
        Self {
            inner,
            name: name.to_owned(),
            retry_interval,
            open_until: Mutex::new(None),
            degraded: AtomicBool::new(false),
            outages: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Whether the backend is currently considered unreachable.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// How many times the backend went from healthy to unreachable.
    pub fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// Calls answered without the backend because it was degraded.
    pub fn skipped_calls(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Whether calls should skip the backend right now.
    fn is_open(&self) -> bool {
        let Ok(open) = self.open_until.lock() else {
            return false;
        };
        match *open {
            Some(until) if Instant::now() < until => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    fn succeeded(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            if let Ok(mut open) = self.open_until.lock() {
                *open = None;
            }
            metrics::gauge!(crate::metric_names::CACHE_DEGRADED, "cache" => self.name.clone())
                .set(0.0);
            info!(cache = %self.name, "cache reachable again");
        }
    }

    fn failed(&self, error: &BackendError) {
        if !matches!(error, BackendError::Unavailable(_)) {
            return;
        }
        if let Ok(mut open) = self.open_until.lock() {
            *open = Some(Instant::now() + self.retry_interval);
        }
        metrics::counter!(crate::metric_names::CACHE_UNAVAILABLE_TOTAL, "cache" => self.name.clone())
            .increment(1);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(crate::metric_names::CACHE_DEGRADED, "cache" => self.name.clone())
                .set(1.0);
            warn!(cache = %self.name, %error, retry_in = ?self.retry_interval,
                "cache unreachable; reads are misses and writes are skipped until it answers");
        }
    }

    fn skipped_error(&self) -> BackendError {
        BackendError::Unavailable(format!(
            "cache `{}` is degraded; the next probe is within {:?}",
            self.name, self.retry_interval
        ))
    }

    async fn write<T>(
        &self,
        call: impl std::future::Future<Output = BackendResult<T>>,
    ) -> BackendResult<T> {
        if self.is_open() {
            return Err(self.skipped_error());
        }
        let result = call.await;
        match &result {
            Ok(_) => self.succeeded(),
            Err(e) => self.failed(e),
        }
        result
    }
}

#[async_trait]
impl Cache for GuardedCache {
    async fn get(&self, key: &str) -> BackendResult<Option<Vec<u8>>> {
        if self.is_open() {
            return Ok(None);
        }
        match self.inner.get(key).await {
            Ok(v) => {
                self.succeeded();
                Ok(v)
            }
            Err(e @ BackendError::Unavailable(_)) => {
                self.failed(&e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> BackendResult<()> {
        self.write(self.inner.set(key, value, ttl)).await
    }

    async fn delete(&self, key: &str) -> BackendResult<()> {
        self.write(self.inner.delete(key)).await
    }

    async fn incr(&self, key: &str, delta: i64) -> BackendResult<i64> {
        self.write(self.inner.incr(key, delta)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::cache::MokaCache;

    /// A cache that is down while `down` is set, and counts the calls that reach it.
    struct Flaky {
        inner: MokaCache,
        down: AtomicBool,
        calls: AtomicU64,
    }

    impl Flaky {
        fn check(&self) -> BackendResult<()> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.down.load(Ordering::Relaxed) {
                Err(BackendError::Unavailable("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl Cache for Flaky {
        async fn get(&self, key: &str) -> BackendResult<Option<Vec<u8>>> {
            self.check()?;
            self.inner.get(key).await
        }
        async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> BackendResult<()> {
            self.check()?;
            self.inner.set(key, value, ttl).await
        }
        async fn delete(&self, key: &str) -> BackendResult<()> {
            self.check()?;
            self.inner.delete(key).await
        }
        async fn incr(&self, key: &str, delta: i64) -> BackendResult<i64> {
            self.check()?;
            self.inner.incr(key, delta).await
        }
    }

    #[tokio::test]
    async fn an_outage_turns_reads_into_misses_and_skips_the_backend_until_the_probe() {
        let flaky = Arc::new(Flaky {
            inner: MokaCache::default(),
            down: AtomicBool::new(false),
            calls: AtomicU64::new(0),
        });
        // 1 s, not 100 ms: the 20 degraded calls below must all fall within one interval.
        let guard = GuardedCache::new(flaky.clone(), "test", Duration::from_secs(1));
        guard
            .set("k", b"v".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(guard.get("k").await.unwrap(), Some(b"v".to_vec()));
        assert!(!guard.is_degraded());

        flaky.down.store(true, Ordering::Relaxed);
        assert_eq!(guard.get("k").await.unwrap(), None, "a miss, not an error");
        assert!(guard.is_degraded());
        assert_eq!(guard.outages(), 1);
        let calls = flaky.calls.load(Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(guard.get("k").await.unwrap(), None);
            assert!(matches!(
                guard.incr("n", 1).await,
                Err(BackendError::Unavailable(_))
            ));
        }
        assert_eq!(
            flaky.calls.load(Ordering::Relaxed),
            calls,
            "no call reached the backend while degraded"
        );
        assert!(guard.skipped_calls() >= 20);

        // Still down at the probe: degraded for another interval, one call spent.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert_eq!(guard.get("k").await.unwrap(), None);
        assert_eq!(flaky.calls.load(Ordering::Relaxed), calls + 1);
        assert!(guard.is_degraded());

        flaky.down.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        assert_eq!(guard.get("k").await.unwrap(), Some(b"v".to_vec()));
        assert!(!guard.is_degraded());
        assert_eq!(guard.outages(), 1);
    }

    #[tokio::test]
    async fn refusals_pass_through_and_do_not_degrade() {
        let guard = GuardedCache::new(
            Arc::new(MokaCache::default()),
            "test",
            Duration::from_secs(1),
        );
        guard
            .set("word", b"abc".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(
            guard.incr("word", 1).await,
            Err(BackendError::Invalid(_))
        ));
        assert!(!guard.is_degraded());
    }
}
