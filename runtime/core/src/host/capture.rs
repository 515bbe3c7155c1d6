//! Capture mode: running events through a plugin version with nothing applied, emitted or
//! committed, to see what it would do (`spate replay`, shadow versions).
//!
//! A [`Capture`] puts an overlay in front of the plugin's state and cache: reads see the
//! current state plus what the capture's earlier events wrote; writes go to the overlay
//! only and vanish with it. Given the event's effect record, a key the event read when it
//! was handled is served the value it read then, so a replayed event gets the inputs the
//! original call got (not a state that has moved on, nor a replayed earlier event's
//! write it never saw), and a difference is the handler's alone. Each event is one attempt (no retries, no backoff), and ends in
//! an [`EffectRecord`] that can be compared with the effect record of the same event.

use super::journal::{CacheOp, DeadLetterKind};
use super::record::{EffectRecord, Outcome, RecordedReads};
use super::{HostServices, Invocation};
use crate::plugin::{CallOutcome, PluginVersion, TrapKind};
use crate::types::Event;
use crate::{ApplyOutcome, BackendError, BackendResult, Cache, StateStore, StateWrite};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Values written in a capture, by `(namespace, key)` (`None`: deleted).
type Overlay = BTreeMap<(String, String), Option<Vec<u8>>>;

/// State as a capture sees it: the store's, under the capture's own writes.
pub struct CaptureState {
    base: Arc<dyn StateStore>,
    overlay: Mutex<Overlay>,
    /// The current event's recorded reads, and the namespace they are of.
    pins: Mutex<Option<(String, Arc<RecordedReads>)>>,
}

impl CaptureState {
    /// An empty overlay over `base`.
    pub fn new(base: Arc<dyn StateStore>) -> Self {
        Self {
            base,
            overlay: Mutex::default(),
            pins: Mutex::default(),
        }
    }

    fn overlaid(&self, namespace: &str, key: &str) -> Option<Option<Vec<u8>>> {
        let pinned = self
            .pins
            .lock()
            .as_ref()
            .filter(|(ns, _)| ns == namespace)
            .and_then(|(_, reads)| reads.state_value(key));
        pinned.or_else(|| {
            self.overlay
                .lock()
                .get(&(namespace.to_owned(), key.to_owned()))
                .cloned()
        })
    }
}

#[async_trait]
impl StateStore for CaptureState {
    async fn get(&self, namespace: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        match self.overlaid(namespace, key) {
            Some(v) => Ok(v),
            None => self.base.get(namespace, key).await,
        }
    }

    async fn scan_bounded(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
        max_bytes: usize,
    ) -> BackendResult<Vec<(String, Vec<u8>)>> {
        let mine: Vec<(String, Option<Vec<u8>>)> = {
            let overlay = self.overlay.lock();
            let from = (namespace.to_owned(), prefix.to_owned());
            overlay
                .range(from..)
                .take_while(|((ns, k), _)| ns == namespace && k.starts_with(prefix))
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect()
        };
        // Enough of the store's entries that the overlay's deletions cannot leave fewer
        // than `limit`.
        let extra = u32::try_from(mine.len()).unwrap_or(u32::MAX);
        let mut merged: BTreeMap<String, Vec<u8>> = self
            .base
            .scan_bounded(namespace, prefix, limit.saturating_add(extra), max_bytes)
            .await?
            .into_iter()
            .collect();
        for (k, v) in mine {
            match v {
                Some(v) => merged.insert(k, v),
                None => merged.remove(&k),
            };
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for (k, v) in merged.into_iter().take(limit as usize) {
            bytes += k.len() + v.len();
            out.push((k, v));
            if bytes > max_bytes {
                break;
            }
        }
        Ok(out)
    }

    async fn apply(&self, namespace: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome> {
        for w in writes {
            if let Some(expected) = &w.condition
                && self.get(namespace, &w.key).await? != *expected
            {
                return Ok(ApplyOutcome::Conflict { key: w.key.clone() });
            }
        }
        let mut overlay = self.overlay.lock();
        for w in writes {
            overlay.insert((namespace.to_owned(), w.key.clone()), w.value.clone());
        }
        Ok(ApplyOutcome::Applied)
    }
}

/// The cache as a capture sees it: the cache's values, under the capture's own writes.
pub struct CaptureCache {
    base: Arc<dyn Cache>,
    overlay: Mutex<HashMap<String, Option<Vec<u8>>>>,
    pins: Mutex<Option<Arc<RecordedReads>>>,
}

impl CaptureCache {
    /// An empty overlay over `base`.
    pub fn new(base: Arc<dyn Cache>) -> Self {
        Self {
            base,
            overlay: Mutex::default(),
            pins: Mutex::default(),
        }
    }
}

#[async_trait]
impl Cache for CaptureCache {
    async fn get(&self, key: &str) -> BackendResult<Option<Vec<u8>>> {
        let pinned = self.pins.lock().as_ref().and_then(|r| r.cache_value(key));
        let mine = pinned.or_else(|| self.overlay.lock().get(key).cloned());
        match mine {
            Some(v) => Ok(v),
            None => self.base.get(key).await,
        }
    }

    async fn set(&self, key: &str, value: Vec<u8>, _ttl: Duration) -> BackendResult<()> {
        self.overlay.lock().insert(key.to_owned(), Some(value));
        Ok(())
    }

    async fn delete(&self, key: &str) -> BackendResult<()> {
        self.overlay.lock().insert(key.to_owned(), None);
        Ok(())
    }

    async fn incr(&self, key: &str, delta: i64) -> BackendResult<i64> {
        let current = match self.get(key).await? {
            None => 0,
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| BackendError::Invalid(format!("`{key}` is not an integer")))?,
        };
        let next = current.saturating_add(delta);
        self.overlay
            .lock()
            .insert(key.to_owned(), Some(next.to_string().into_bytes()));
        Ok(next)
    }
}

/// A run of events through plugin versions in capture mode; see the [module
/// docs](self).
pub struct Capture {
    state: Arc<CaptureState>,
    cache: Arc<CaptureCache>,
    services: HostServices,
}

impl Capture {
    /// A capture over the plugin's `services` (its state view, the cache).
    pub fn new(services: &HostServices) -> Self {
        let state = Arc::new(CaptureState::new(Arc::clone(&services.state)));
        let cache = Arc::new(CaptureCache::new(Arc::clone(&services.cache)));
        Self {
            services: HostServices {
                state: Arc::clone(&state) as Arc<dyn StateStore>,
                cache: Arc::clone(&cache) as Arc<dyn Cache>,
                workflow_topic: services.workflow_topic.clone(),
            },
            state,
            cache,
        }
    }

    /// Run `event` through `version` once: what it did, as a record. A successful call's
    /// state and cache writes are seen by this capture's later events. With `recorded`
    /// (the event's effect record), the keys it read then read the same values now, and
    /// the call sees the attempt number the recorded call saw (`spate-attempt`), so a
    /// handler that behaves by attempt behaves the same.
    pub async fn run(
        &self,
        version: &Arc<dyn PluginVersion>,
        event: &Event,
        recorded: Option<&EffectRecord>,
    ) -> EffectRecord {
        let info = version.info();
        let reads = recorded.and_then(|r| r.reads.clone()).map(Arc::new);
        *self.state.pins.lock() = reads
            .as_ref()
            .map(|r| (info.namespace.clone(), Arc::clone(r)));
        *self.cache.pins.lock() = reads;
        let attempt = recorded.map_or(1, |r| r.attempts.max(1));
        let record = self.call(version, event, attempt).await;
        *self.state.pins.lock() = None;
        *self.cache.pins.lock() = None;
        record
    }

    async fn call(
        &self,
        version: &Arc<dyn PluginVersion>,
        event: &Event,
        attempt: u32,
    ) -> EffectRecord {
        let info = version.info();
        let label = info.manifest.version.to_string();
        if !info.manifest.filter.matches(event) {
            return EffectRecord::new(event, &label, Outcome::Filtered, 0, None);
        }
        let invocation = Invocation::new(
            Arc::clone(info),
            self.services.clone(),
            Arc::new(event.with_attempt(attempt)),
        );
        let failed = |kind: DeadLetterKind, reason: String| {
            EffectRecord::new(
                event,
                &label,
                Outcome::failed(kind, &reason, "not-retried"),
                attempt,
                None,
            )
        };
        let journal = match version.instance().call(invocation).await {
            CallOutcome::Ok(journal) => journal,
            CallOutcome::Retry(reason) => return failed(DeadLetterKind::RetriesExhausted, reason),
            CallOutcome::Reject(reason) => return failed(DeadLetterKind::Rejected, reason),
            CallOutcome::Trap(kind, message) => return failed(DeadLetterKind::Trap(kind), message),
        };
        let effects = journal.into_effects(&info.namespace);
        match self.state.apply(&effects.namespace, &effects.writes).await {
            Ok(ApplyOutcome::Applied) => {}
            Ok(ApplyOutcome::Conflict { key }) => {
                return failed(
                    DeadLetterKind::StateConflict,
                    format!("compare-and-swap on `{key}` lost to an earlier write"),
                );
            }
            Err(e) => {
                return failed(
                    DeadLetterKind::Trap(TrapKind::Infrastructure),
                    format!("state: {e}"),
                );
            }
        }
        for op in &effects.cache {
            // The overlay never fails but for a counter over a non-integer, which the
            // real cache would refuse the same way (best effort, as at a checkpoint).
            let _ = match op {
                CacheOp::Set { key, value, ttl } => self.cache.set(key, value.clone(), *ttl).await,
                CacheOp::Delete { key } => self.cache.delete(key).await,
                CacheOp::Incr { key, delta } => self.cache.incr(key, *delta).await.map(|_| ()),
            };
        }
        EffectRecord::new(event, &label, Outcome::Ok, attempt, Some(&effects))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::cache::MokaCache;
    use crate::state::EmbeddedStateStore;

    #[tokio::test]
    async fn the_overlay_reads_through_and_never_writes_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStateStore::open(dir.path()).unwrap();
        let put = |k: &str, v: &str| StateWrite {
            key: k.into(),
            value: Some(v.as_bytes().to_vec()),
            ttl: None,
            condition: None,
        };
        store
            .apply("ns", &[put("a", "1"), put("b", "2"), put("c", "3")])
            .await
            .unwrap();
        let capture = CaptureState::new(store.clone());
        let mut delete_b = put("b", "");
        delete_b.value = None;
        capture
            .apply("ns", &[put("a", "10"), delete_b, put("d", "4")])
            .await
            .unwrap();
        assert_eq!(capture.get("ns", "a").await.unwrap(), Some(b"10".to_vec()));
        assert_eq!(capture.get("ns", "b").await.unwrap(), None);
        assert_eq!(capture.get("ns", "c").await.unwrap(), Some(b"3".to_vec()));
        let keys: Vec<String> = capture
            .scan_bounded("ns", "", 10, usize::MAX)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a", "c", "d"]);
        assert_eq!(
            capture
                .scan_bounded("ns", "", 2, usize::MAX)
                .await
                .unwrap()
                .len(),
            2
        );
        // A condition is checked against what the capture sees.
        let mut cas = put("a", "11");
        cas.condition = Some(Some(b"1".to_vec()));
        assert!(matches!(
            capture.apply("ns", &[cas]).await.unwrap(),
            ApplyOutcome::Conflict { .. }
        ));
        // The store is untouched.
        assert_eq!(store.get("ns", "a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get("ns", "d").await.unwrap(), None);

        let cache = Arc::new(MokaCache::new(1 << 20));
        cache
            .set("n", b"5".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        let c = CaptureCache::new(cache.clone());
        assert_eq!(c.incr("n", 2).await.unwrap(), 7);
        assert_eq!(c.get("n").await.unwrap(), Some(b"7".to_vec()));
        assert_eq!(cache.get("n").await.unwrap(), Some(b"5".to_vec()));
    }
}
