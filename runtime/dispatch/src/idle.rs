//! Warm instances of lanes that went quiet, shared by every pipeline of a runtime.
//!
//! A warm instance holds a sandbox pool slot. Kept per pipeline, quiet lanes of a few
//! plugins could pin every slot while other plugins' events wait for one; so all
//! pipelines share one budget (the oldest idle instance makes room for a newer one), an
//! idle instance lives at most the idle timeout, and a call that finds the pool full
//! evicts them all before it waits.

use super::pipeline::{LaneKey, WarmInstance};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shared idle budget; see the [module docs](self).
pub struct IdleInstances {
    cap: usize,
    ttl: Duration,
    owners: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seq: u64,
    /// By owner and lane: the instance, when it went idle, and its place in `order`.
    entries: HashMap<(u64, LaneKey), (WarmInstance, Instant, u64)>,
    /// Oldest first.
    order: BTreeMap<u64, (u64, LaneKey)>,
}

impl Inner {
    fn remove(&mut self, id: &(u64, LaneKey)) -> Option<WarmInstance> {
        let (instance, _, seq) = self.entries.remove(id)?;
        self.order.remove(&seq);
        Some(instance)
    }

    fn pop_oldest(&mut self) -> Option<(WarmInstance, Instant)> {
        let (_, id) = self.order.pop_first()?;
        self.entries.remove(&id).map(|(i, at, _)| (i, at))
    }
}

impl std::fmt::Debug for IdleInstances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleInstances")
            .field("cap", &self.cap)
            .field("ttl", &self.ttl)
            .field("len", &self.len())
            .finish()
    }
}

impl IdleInstances {
    /// At most `cap` idle instances across all pipelines, each kept at most `ttl`.
    pub fn new(cap: usize, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            cap,
            ttl,
            owners: AtomicU64::new(0),
            inner: Mutex::default(),
        })
    }

    /// A new owner id (one per pipeline).
    pub(super) fn owner(&self) -> u64 {
        self.owners.fetch_add(1, Ordering::Relaxed)
    }

    /// Idle instances held now.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep `instance` for `owner`'s lane `key`, dropping the oldest idle instance if
    /// the budget is full.
    pub(super) fn put(&self, owner: u64, key: LaneKey, instance: WarmInstance) {
        if self.cap == 0 {
            return;
        }
        let mut evicted = Vec::new();
        {
            let mut inner = self.inner.lock();
            let id = (owner, key);
            evicted.extend(inner.remove(&id));
            while inner.entries.len() >= self.cap {
                match inner.pop_oldest() {
                    Some((i, _)) => evicted.push(i),
                    None => break,
                }
            }
            inner.seq += 1;
            let seq = inner.seq;
            inner.order.insert(seq, id.clone());
            inner.entries.insert(id, (instance, Instant::now(), seq));
        }
        // Instances are dropped outside the lock: freeing a sandbox takes a while.
        drop(evicted);
    }

    /// Take back `owner`'s idle instance of lane `key`, if it is still kept.
    pub(super) fn take(&self, owner: u64, key: &LaneKey) -> Option<WarmInstance> {
        self.inner.lock().remove(&(owner, key.clone()))
    }

    /// Drop `owner`'s idle instances whose lane matches `which`.
    pub(super) fn forget(&self, owner: u64, which: impl Fn(&LaneKey) -> bool) {
        let dropped: Vec<WarmInstance> = {
            let mut inner = self.inner.lock();
            let ids: Vec<(u64, LaneKey)> = inner
                .entries
                .keys()
                .filter(|(o, k)| *o == owner && which(k))
                .cloned()
                .collect();
            ids.iter().filter_map(|id| inner.remove(id)).collect()
        };
        drop(dropped);
    }

    /// Drop the instances idle for longer than the idle timeout; returns how many.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut dropped = Vec::new();
        {
            let mut inner = self.inner.lock();
            while let Some((_, id)) = inner.order.first_key_value() {
                let expired = inner
                    .entries
                    .get(id)
                    .is_none_or(|(_, at, _)| now.duration_since(*at) >= self.ttl);
                if !expired {
                    break;
                }
                match inner.pop_oldest() {
                    Some((i, _)) => dropped.push(i),
                    None => break,
                }
            }
        }
        dropped.len()
    }

    /// Drop every idle instance (the sandbox pool is full and a call needs a slot);
    /// returns how many.
    pub fn evict_all(&self) -> usize {
        let dropped: Vec<WarmInstance> = {
            let mut inner = self.inner.lock();
            inner.order.clear();
            inner.entries.drain().map(|(_, (i, _, _))| i).collect()
        };
        dropped.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::{CallOutcome, PluginVersion};
    use spate_core::test_kit::FnPlugin;

    fn version() -> Arc<FnPlugin> {
        FnPlugin::new(
            "name = \"p\"\nversion = \"1.0.0\"\nsubscriptions = [{ topic = \"t\" }]\n",
            |mut inv| async move { CallOutcome::Ok(inv.take_journal()) },
        )
    }

    fn warm(v: &Arc<dyn PluginVersion>) -> WarmInstance {
        (Arc::clone(v), v.instance())
    }

    #[test]
    fn one_budget_across_owners_oldest_first() {
        let plugin = version();
        let v: Arc<dyn PluginVersion> = plugin.clone();
        let idle = IdleInstances::new(3, Duration::from_secs(60));
        let (a, b) = (idle.owner(), idle.owner());
        for i in 0..3 {
            idle.put(a, LaneKey::Partition(i), warm(&v));
        }
        idle.put(b, LaneKey::Partition(0), warm(&v));
        assert_eq!((idle.len(), plugin.live()), (3, 3));
        assert!(
            idle.take(a, &LaneKey::Partition(0)).is_none(),
            "the oldest made room"
        );
        assert!(idle.take(b, &LaneKey::Partition(0)).is_some());
        idle.forget(a, |k| *k == LaneKey::Partition(1));
        assert_eq!(idle.len(), 1);
        assert_eq!(idle.evict_all(), 1);
        assert_eq!(plugin.live(), 0, "evicted instances are dropped");
    }

    #[test]
    fn idle_instances_expire_after_the_timeout() {
        let plugin = version();
        let v: Arc<dyn PluginVersion> = plugin.clone();
        // 1 s, not 50 ms: consecutive statements must not outlast it on a loaded machine.
        let idle = IdleInstances::new(10, Duration::from_secs(1));
        let owner = idle.owner();
        idle.put(owner, LaneKey::Partition(0), warm(&v));
        assert_eq!(idle.expire(), 0);
        std::thread::sleep(Duration::from_millis(1_200));
        idle.put(owner, LaneKey::Partition(1), warm(&v));
        assert_eq!(idle.expire(), 1);
        assert_eq!((idle.len(), plugin.live()), (1, 1));
    }
}
