//! The state tier every plugin's state calls go through: counts state-store reads per
//! plugin and, when configured, serves `get` read-through from a cache.
//!
//! It composes an `Arc<dyn StateStore>` and an `Arc<dyn Cache>` and knows neither backend,
//! so the core stays free of Redis and CQL. It owns the cached copies of state values and
//! their consistency with the store; it does not own the plugins' own cache entries (those
//! go to the cache directly, under the plugin's prefix) or scans (always from the store).
//!
//! Read-through (`get`): the cache first; on a miss one caller per key reads the store
//! (single flight: concurrent misses on a key wait for that read) and fills the cache with
//! the value, or with a marker for "absent", for at most [`ReadThroughConfig::ttl`] and
//! never past the value's own expiry.
//!
//! Writes (`apply`): the store first; once it succeeded, the cached copies of the written
//! keys are updated ([`WritePolicy::Update`]) or deleted ([`WritePolicy::Invalidate`]).
//! A refused compare-and-swap, or a store error after which the write may or may not have
//! landed, deletes the cached copies so the retry reads the store.
//!
//! Consistency within one process: keys hash to stripes, each with a lock and a write
//! generation. A write holds its stripes' locks from before the store write until the
//! cache is updated and bumps their generations; a fill takes the lock and is dropped if
//! the generation moved since its store read began, and a caller only joins an in-flight
//! read that began after the last write it could have seen. So a `get` never returns, and
//! the cache never keeps, a value older than a write that had already returned. When a
//! cache update fails (Redis down), the key is remembered as *suspect* and read from the
//! store, and repaired in the cache, until an update succeeds; if too many keys are suspect
//! the tier stops trusting the cache for one TTL, after which every copy older than the
//! failure has expired. Across processes the cached copy can be stale by at most the TTL
//! (another pod's write to a key this pod has cached); keys normally stay on one pod, since
//! events are partitioned by key.

mod counting;
mod read_through;

pub use counting::TierStats;
pub use read_through::{ReadThroughConfig, WritePolicy};

use counting::Counters;
use read_through::{
    Flight, FlightGuard, Layer, STRIPES, SUSPECTS_DRAINED_PER_WRITE, Stripe, Suspects, Suspicion,
    decode,
};

use crate::{ApplyOutcome, BackendResult, Cache, SourcePosition, StateStore, StateWrite};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Cache keys starting with this belong to the runtime; plugin cache prefixes may not.
pub const RESERVED_CACHE_PREFIX: &str = "_spate";

/// The state tier; see the [module docs](self). Hand each plugin its own view with
/// [`StateTier::for_plugin`] so its metrics carry its name.
pub struct StateTier {
    store: Arc<dyn StateStore>,
    layer: Option<Layer>,
    plugins: Mutex<HashMap<String, Arc<Counters>>>,
}

impl StateTier {
    /// Reads go straight to `store`; only counted.
    pub fn direct(store: Arc<dyn StateStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            layer: None,
            plugins: Mutex::new(HashMap::new()),
        })
    }

    /// Reads go through `cache` to `store`.
    pub fn read_through(
        store: Arc<dyn StateStore>,
        cache: Arc<dyn Cache>,
        config: ReadThroughConfig,
    ) -> Arc<Self> {
        let stripes = (0..STRIPES)
            .map(|_| Stripe {
                lock: tokio::sync::Mutex::new(()),
                generation: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Self {
            store,
            layer: Some(Layer {
                cache,
                config,
                stripes,
                flights: Mutex::new(HashMap::new()),
                next_flight: AtomicU64::new(0),
                suspects: Mutex::new(Suspects::default()),
            }),
            plugins: Mutex::new(HashMap::new()),
        })
    }

    /// Whether reads go through a cache.
    pub fn is_read_through(&self) -> bool {
        self.layer.is_some()
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// The state store as `plugin` sees it: this tier, counting under its name.
    pub fn for_plugin(self: &Arc<Self>, plugin: &str) -> Arc<dyn StateStore> {
        Arc::new(PluginState {
            tier: Arc::clone(self),
            counters: self.counters(plugin),
        })
    }

    /// Counters of `plugin` (zero if it never read state).
    pub fn stats(&self, plugin: &str) -> TierStats {
        self.plugins
            .lock()
            .ok()
            .and_then(|p| p.get(plugin).map(|c| c.snapshot()))
            .unwrap_or_default()
    }

    /// Counters summed over every plugin.
    pub fn total(&self) -> TierStats {
        let mut total = TierStats::default();
        if let Ok(plugins) = self.plugins.lock() {
            for c in plugins.values() {
                total.add(&c.snapshot());
            }
        }
        total
    }

    /// Keys currently suspected of having a stale cached copy.
    pub fn suspect_keys(&self) -> usize {
        self.layer
            .as_ref()
            .and_then(|l| l.suspects.lock().ok().map(|s| s.keys.len()))
            .unwrap_or(0)
    }

    fn counters(&self, plugin: &str) -> Arc<Counters> {
        match self.plugins.lock() {
            Ok(mut p) => Arc::clone(
                p.entry(plugin.to_owned())
                    .or_insert_with(|| Arc::new(Counters::new(plugin))),
            ),
            // A poisoned map only loses counting, never a read.
            Err(_) => Arc::new(Counters::new(plugin)),
        }
    }

    async fn read(&self, c: &Counters, ns: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        c.get();
        let Some(layer) = &self.layer else {
            c.store_read();
            return self.store.get(ns, key).await;
        };
        match layer.suspicion(ns, key) {
            Suspicion::None => {}
            Suspicion::Key => {
                c.bypassed.fetch_add(1, Ordering::Relaxed);
                return self.read_and_repair(c, layer, ns, key).await;
            }
            Suspicion::All => {
                c.bypassed.fetch_add(1, Ordering::Relaxed);
                c.store_read();
                return self.store.get(ns, key).await;
            }
        }
        let ck = layer.cache_key(ns, key);
        match layer.cache.get(&ck).await {
            Ok(Some(bytes)) => {
                if let Some(v) = decode(&bytes) {
                    c.hit();
                    return Ok(v);
                }
            }
            Ok(None) => {}
            Err(_) => c.error(),
        }
        c.miss();
        self.single_flight(c, layer, ns, key, &ck).await
    }

    async fn single_flight(
        &self,
        c: &Counters,
        layer: &Layer,
        ns: &str,
        key: &str,
        ck: &str,
    ) -> BackendResult<Option<Vec<u8>>> {
        let stripe = layer.stripe(ns, key);
        let generation = stripe.generation.load(Ordering::Acquire);
        let fk = (ns.to_owned(), key.to_owned());
        let role = match layer.flights.lock() {
            Ok(mut flights) => match flights.get(&fk) {
                // Only a read that began after every write this caller could have seen.
                Some(f) if f.generation == generation => Role::Follow(f.rx.clone()),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    let id = layer.next_flight.fetch_add(1, Ordering::Relaxed);
                    flights.insert(fk.clone(), Flight { generation, id, rx });
                    Role::Lead(tx, id)
                }
            },
            Err(_) => Role::Alone,
        };
        match role {
            Role::Follow(mut rx) => {
                c.coalesced.fetch_add(1, Ordering::Relaxed);
                loop {
                    if let Some(v) = rx.borrow_and_update().clone() {
                        return Ok(v);
                    }
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
                // The leader failed or was cancelled: read for ourselves.
                c.store_read();
                self.store.get(ns, key).await
            }
            Role::Alone => {
                c.store_read();
                self.store.get(ns, key).await
            }
            Role::Lead(tx, id) => {
                let _flight = FlightGuard { layer, key: fk, id };
                c.store_read();
                let entry = self.store.get_entry(ns, key).await?;
                let value = entry.as_ref().map(|e| e.value.clone());
                tx.send_replace(Some(value.clone()));
                layer.fill(c, ns, key, ck, Some(generation), entry).await;
                Ok(value)
            }
        }
    }

    /// A read of a key whose cached copy may be stale: from the store, then the cache is
    /// corrected; the key stops being suspect once that succeeds.
    async fn read_and_repair(
        &self,
        c: &Counters,
        layer: &Layer,
        ns: &str,
        key: &str,
    ) -> BackendResult<Option<Vec<u8>>> {
        let generation = layer.stripe(ns, key).generation.load(Ordering::Acquire);
        c.store_read();
        let entry = self.store.get_entry(ns, key).await?;
        let value = entry.as_ref().map(|e| e.value.clone());
        let ck = layer.cache_key(ns, key);
        if layer.fill(c, ns, key, &ck, Some(generation), entry).await {
            layer.clear_suspect(ns, key);
        }
        Ok(value)
    }

    async fn write(
        &self,
        c: &Counters,
        ns: &str,
        writes: &[StateWrite],
    ) -> BackendResult<ApplyOutcome> {
        let Some(layer) = &self.layer else {
            return self.store.apply(ns, writes).await;
        };
        if writes.is_empty() {
            return self.store.apply(ns, writes).await;
        }
        let mut stripes: Vec<usize> = writes
            .iter()
            .map(|w| layer.stripe_index(ns, &w.key))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        // In index order, so two batches never wait on each other crosswise.
        let mut guards = Vec::with_capacity(stripes.len());
        for &i in &stripes {
            guards.push(layer.stripes[i].lock.lock().await);
        }
        let result = self.store.apply(ns, writes).await;
        for &i in &stripes {
            layer.stripes[i].generation.fetch_add(1, Ordering::AcqRel);
        }
        match &result {
            Ok(ApplyOutcome::Applied) => {
                for w in writes {
                    layer.after_write(c, ns, w).await;
                }
            }
            // Nothing was written, but the copy the guest's compare-and-swap read may be
            // stale; or the store failed after perhaps applying the batch.
            Ok(ApplyOutcome::Conflict { .. }) | Err(_) => {
                for w in writes {
                    layer.invalidate(c, ns, &w.key).await;
                }
            }
        }
        drop(guards);
        if matches!(result, Ok(ApplyOutcome::Applied)) {
            layer.drain_suspects(c, SUSPECTS_DRAINED_PER_WRITE).await;
        }
        result
    }

    async fn list(
        &self,
        c: &Counters,
        ns: &str,
        prefix: &str,
        limit: u32,
        max_bytes: usize,
    ) -> BackendResult<Vec<(String, Vec<u8>)>> {
        c.scans.fetch_add(1, Ordering::Relaxed);
        self.store.scan_bounded(ns, prefix, limit, max_bytes).await
    }
}

enum Role {
    Lead(watch::Sender<Option<Option<Vec<u8>>>>, u64),
    Follow(watch::Receiver<Option<Option<Vec<u8>>>>),
    Alone,
}

/// One plugin's view of the tier (its reads counted under its name).
struct PluginState {
    tier: Arc<StateTier>,
    counters: Arc<Counters>,
}

#[async_trait]
impl StateStore for PluginState {
    async fn get(&self, namespace: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        self.tier.read(&self.counters, namespace, key).await
    }

    async fn scan_bounded(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
        max_bytes: usize,
    ) -> BackendResult<Vec<(String, Vec<u8>)>> {
        self.tier
            .list(&self.counters, namespace, prefix, limit, max_bytes)
            .await
    }

    async fn apply(&self, namespace: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome> {
        self.tier.write(&self.counters, namespace, writes).await
    }

    // A direct tier adds nothing to writes, so the store's checkpoints pass through. A
    // read-through tier copies values into a cache on every write: it takes none.
    fn checkpoints(&self) -> bool {
        self.tier.layer.is_none() && self.tier.store.checkpoints()
    }

    fn shared(&self) -> bool {
        self.tier.store.shared()
    }

    async fn commit_checkpoint(
        &self,
        writes: &[(String, Vec<StateWrite>)],
        home: &str,
        positions: &[SourcePosition],
    ) -> BackendResult<()> {
        self.tier
            .store
            .commit_checkpoint(writes, home, positions)
            .await
    }

    fn prepares(&self) -> bool {
        self.checkpoints() && self.tier.store.prepares()
    }

    async fn prepare_checkpoint(
        &self,
        writes: &[(String, Vec<StateWrite>)],
        home: &str,
        positions: &[SourcePosition],
    ) -> BackendResult<()> {
        self.tier
            .store
            .prepare_checkpoint(writes, home, positions)
            .await
    }

    async fn pending_checkpoint(&self, home: &str) -> BackendResult<Option<Vec<SourcePosition>>> {
        self.tier.store.pending_checkpoint(home).await
    }

    async fn resolve_checkpoint(&self, home: &str, keep: bool) -> BackendResult<()> {
        self.tier.store.resolve_checkpoint(home, keep).await
    }

    async fn source_position(
        &self,
        home: &str,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> BackendResult<Option<SourcePosition>> {
        self.tier
            .store
            .source_position(home, group, topic, partition)
            .await
    }
}

/// The tier used directly counts under the plugin name `_`.
#[async_trait]
impl StateStore for StateTier {
    async fn get(&self, namespace: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        let c = self.counters("_");
        self.read(&c, namespace, key).await
    }

    async fn scan_bounded(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
        max_bytes: usize,
    ) -> BackendResult<Vec<(String, Vec<u8>)>> {
        let c = self.counters("_");
        self.list(&c, namespace, prefix, limit, max_bytes).await
    }

    async fn apply(&self, namespace: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome> {
        let c = self.counters("_");
        self.write(&c, namespace, writes).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::{BackendError, Entry};
    use crate::{cache::MokaCache, state::EmbeddedStateStore};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// The embedded store, optionally slow to answer reads (the value is read first, then
    /// the answer is delayed, as a slow network would), counting reads.
    struct SlowStore {
        inner: Arc<EmbeddedStateStore>,
        delay: Mutex<Duration>,
        reads: AtomicU64,
    }

    impl SlowStore {
        fn new(dir: &std::path::Path) -> Arc<Self> {
            Arc::new(Self {
                inner: EmbeddedStateStore::open(dir).unwrap(),
                delay: Mutex::new(Duration::ZERO),
                reads: AtomicU64::new(0),
            })
        }
        fn set_delay(&self, d: Duration) {
            *self.delay.lock().unwrap() = d;
        }
        async fn pause(&self) {
            let d = *self.delay.lock().unwrap();
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
        }
    }

    #[async_trait]
    impl StateStore for SlowStore {
        async fn get(&self, ns: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let v = self.inner.get(ns, key).await;
            self.pause().await;
            v
        }
        async fn get_entry(&self, ns: &str, key: &str) -> BackendResult<Option<Entry>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            let v = self.inner.get_entry(ns, key).await;
            self.pause().await;
            v
        }
        async fn scan_bounded(
            &self,
            ns: &str,
            prefix: &str,
            limit: u32,
            max_bytes: usize,
        ) -> BackendResult<Vec<(String, Vec<u8>)>> {
            self.inner.scan_bounded(ns, prefix, limit, max_bytes).await
        }
        async fn apply(&self, ns: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome> {
            self.inner.apply(ns, writes).await
        }
    }

    /// The in-process cache, with writes that fail on demand (Redis gone).
    #[derive(Default)]
    struct FlakyCache {
        inner: MokaCache,
        writes_fail: AtomicBool,
    }

    impl FlakyCache {
        fn check(&self) -> BackendResult<()> {
            if self.writes_fail.load(Ordering::Relaxed) {
                Err(BackendError::Unavailable("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    #[async_trait]
    impl Cache for FlakyCache {
        async fn get(&self, key: &str) -> BackendResult<Option<Vec<u8>>> {
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

    fn put(key: &str, value: &str) -> StateWrite {
        StateWrite {
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
            ttl: None,
            condition: None,
        }
    }

    fn val(v: &str) -> Option<Vec<u8>> {
        Some(v.as_bytes().to_vec())
    }

    fn tier(
        store: Arc<dyn StateStore>,
        cache: Arc<dyn Cache>,
        on_write: WritePolicy,
    ) -> Arc<StateTier> {
        StateTier::read_through(
            store,
            cache,
            ReadThroughConfig {
                on_write,
                ..ReadThroughConfig::default()
            },
        )
    }

    #[tokio::test]
    async fn hits_skip_the_store_and_writes_keep_the_copy_current() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        let t = tier(
            store.clone(),
            Arc::new(MokaCache::default()),
            WritePolicy::Update,
        );
        let s = t.for_plugin("p");
        store.inner.apply("ns", &[put("k", "1")]).await.unwrap();
        for _ in 0..10 {
            assert_eq!(s.get("ns", "k").await.unwrap(), val("1"));
        }
        assert_eq!(s.get("ns", "missing").await.unwrap(), None);
        assert_eq!(s.get("ns", "missing").await.unwrap(), None);
        s.apply("ns", &[put("k", "2")]).await.unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), val("2"));
        s.apply(
            "ns",
            &[StateWrite {
                value: None,
                ..put("k", "")
            }],
        )
        .await
        .unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), None);
        let stats = t.stats("p");
        assert_eq!(stats.gets, 14);
        assert_eq!(stats.store_reads, 2, "one per key, absence cached too");
        assert_eq!(stats.cache_hits, 12);
        assert_eq!(store.reads.load(Ordering::Relaxed), 2);
        assert_eq!(t.stats("other"), TierStats::default());
    }

    #[tokio::test]
    async fn invalidate_policy_drops_the_copy_on_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        let t = tier(
            store.clone(),
            Arc::new(MokaCache::default()),
            WritePolicy::Invalidate,
        );
        let s = t.for_plugin("p");
        s.apply("ns", &[put("k", "1")]).await.unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), val("1"));
        assert_eq!(s.get("ns", "k").await.unwrap(), val("1"));
        s.apply("ns", &[put("k", "2")]).await.unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), val("2"));
        assert_eq!(t.stats("p").store_reads, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_misses_on_one_key_read_the_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        store.inner.apply("ns", &[put("hot", "h")]).await.unwrap();
        store.set_delay(Duration::from_millis(200));
        let t = tier(
            store.clone(),
            Arc::new(MokaCache::default()),
            WritePolicy::Update,
        );
        let s = t.for_plugin("p");
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.get("ns", "hot").await.unwrap() })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), val("h"));
        }
        assert_eq!(store.reads.load(Ordering::Relaxed), 1);
        let stats = t.stats("p");
        assert_eq!(stats.store_reads, 1);
        assert_eq!(stats.cache_misses + stats.cache_hits, 32);
        assert_eq!(stats.coalesced + 1, stats.cache_misses);
    }

    /// A read that began before a write returns the old value, but neither it nor the cache
    /// may show that value to anyone after the write returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_slow_fill_never_hides_a_finished_write() {
        for policy in [WritePolicy::Update, WritePolicy::Invalidate] {
            let dir = tempfile::tempdir().unwrap();
            let store = SlowStore::new(dir.path());
            store.inner.apply("ns", &[put("k", "old")]).await.unwrap();
            let t = tier(store.clone(), Arc::new(MokaCache::default()), policy);
            let s = t.for_plugin("p");
            // The reader has 300 ms (not 50) to reach the store before the write, and is
            // still in its pause when the write lands.
            store.set_delay(Duration::from_millis(1_000));
            let slow = {
                let s = s.clone();
                tokio::spawn(async move { s.get("ns", "k").await.unwrap() })
            };
            tokio::time::sleep(Duration::from_millis(300)).await;
            store.set_delay(Duration::ZERO);
            s.apply("ns", &[put("k", "new")]).await.unwrap();
            // After the write returned: never the old value, from the cache or the flight.
            assert_eq!(s.get("ns", "k").await.unwrap(), val("new"), "{policy:?}");
            assert_eq!(slow.await.unwrap(), val("old"), "{policy:?}");
            assert_eq!(s.get("ns", "k").await.unwrap(), val("new"), "{policy:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancelled_leader_does_not_strand_its_followers() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        store.inner.apply("ns", &[put("k", "v")]).await.unwrap();
        // The leader's read lasts 1 s, and each step below gets 250 ms (not 50) to happen in.
        store.set_delay(Duration::from_millis(1_000));
        let t = tier(
            store.clone(),
            Arc::new(MokaCache::default()),
            WritePolicy::Update,
        );
        let s = t.for_plugin("p");
        let leader = {
            let s = s.clone();
            tokio::spawn(async move { s.get("ns", "k").await })
        };
        tokio::time::sleep(Duration::from_millis(250)).await;
        let follower = {
            let s = s.clone();
            tokio::spawn(async move { s.get("ns", "k").await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(250)).await;
        leader.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .expect("the follower finished")
            .unwrap();
        assert_eq!(got, val("v"));
        assert_eq!(t.stats("p").coalesced, 1);
    }

    #[tokio::test]
    async fn cached_copies_never_outlive_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        let t = tier(
            store.clone(),
            Arc::new(MokaCache::default()),
            WritePolicy::Update,
        );
        let s = t.for_plugin("p");
        // Written through the tier: the copy gets the value's TTL. The TTLs are long enough
        // for the two fsyncs and the reads below on a loaded machine.
        s.apply(
            "ns",
            &[StateWrite {
                ttl: Some(Duration::from_millis(1_000)),
                ..put("short", "x")
            }],
        )
        .await
        .unwrap();
        // Written by someone else: the fill learns the remaining TTL from the store.
        store
            .inner
            .apply(
                "ns",
                &[StateWrite {
                    ttl: Some(Duration::from_millis(1_500)),
                    ..put("other", "y")
                }],
            )
            .await
            .unwrap();
        assert_eq!(s.get("ns", "short").await.unwrap(), val("x"));
        assert_eq!(s.get("ns", "other").await.unwrap(), val("y"));
        assert_eq!(s.get("ns", "other").await.unwrap(), val("y"));
        assert_eq!(t.stats("p").cache_hits, 2);
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert_eq!(s.get("ns", "short").await.unwrap(), None);
        assert_eq!(s.get("ns", "other").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_refused_compare_and_swap_drops_a_stale_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        let t = tier(
            store.clone(),
            Arc::new(MokaCache::default()),
            WritePolicy::Update,
        );
        let s = t.for_plugin("p");
        s.apply("ns", &[put("n", "1")]).await.unwrap();
        // Another process moves the value on; this one still has the old copy.
        store.inner.apply("ns", &[put("n", "2")]).await.unwrap();
        assert_eq!(s.get("ns", "n").await.unwrap(), val("1"));
        let cas = StateWrite {
            condition: Some(val("1")),
            ..put("n", "3")
        };
        assert_eq!(
            s.apply("ns", &[cas]).await.unwrap(),
            ApplyOutcome::Conflict { key: "n".into() }
        );
        // The retry reads the store, so its compare-and-swap can succeed.
        assert_eq!(s.get("ns", "n").await.unwrap(), val("2"));
        let cas = StateWrite {
            condition: Some(val("2")),
            ..put("n", "3")
        };
        assert_eq!(s.apply("ns", &[cas]).await.unwrap(), ApplyOutcome::Applied);
        assert_eq!(s.get("ns", "n").await.unwrap(), val("3"));
    }

    #[tokio::test]
    async fn a_failed_cache_update_sends_reads_to_the_store_until_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        let cache = Arc::new(FlakyCache::default());
        let t = tier(store.clone(), cache.clone(), WritePolicy::Update);
        let s = t.for_plugin("p");
        s.apply("ns", &[put("k", "1")]).await.unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), val("1"));

        // The cache keeps its data but refuses writes (a partition, a full Redis, ...).
        cache.writes_fail.store(true, Ordering::Relaxed);
        s.apply("ns", &[put("k", "2")]).await.unwrap();
        assert_eq!(t.suspect_keys(), 1);
        let reads = t.stats("p").store_reads;
        assert_eq!(
            s.get("ns", "k").await.unwrap(),
            val("2"),
            "not the stale copy"
        );
        assert_eq!(s.get("ns", "k").await.unwrap(), val("2"));
        assert_eq!(t.stats("p").store_reads, reads + 2);
        assert!(t.stats("p").cache_errors >= 3);

        cache.writes_fail.store(false, Ordering::Relaxed);
        assert_eq!(s.get("ns", "k").await.unwrap(), val("2"));
        assert_eq!(t.suspect_keys(), 0, "repaired");
        assert_eq!(s.get("ns", "k").await.unwrap(), val("2"));
        assert_eq!(t.stats("p").store_reads, reads + 3, "a hit again");
    }

    #[tokio::test]
    async fn suspects_drain_through_later_writes_even_if_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        let cache = Arc::new(FlakyCache::default());
        let t = tier(store.clone(), cache.clone(), WritePolicy::Update);
        let s = t.for_plugin("p");
        cache.writes_fail.store(true, Ordering::Relaxed);
        for i in 0..20 {
            s.apply("ns", &[put(&format!("once/{i}"), "x")])
                .await
                .unwrap();
        }
        assert_eq!(t.suspect_keys(), 20);
        cache.writes_fail.store(false, Ordering::Relaxed);
        for _ in 0..3 {
            s.apply("ns", &[put("other", "y")]).await.unwrap();
        }
        assert_eq!(t.suspect_keys(), 0);
        assert_eq!(s.get("ns", "once/3").await.unwrap(), val("x"));
    }

    #[tokio::test]
    async fn too_many_suspects_bypass_the_cache_for_one_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        let cache = Arc::new(FlakyCache::default());
        let t = StateTier::read_through(
            store.clone(),
            cache.clone(),
            ReadThroughConfig {
                // 1 s, not 300 ms: the three gets below must fall within one bypass window.
                ttl: Duration::from_millis(1_000),
                max_suspect_keys: 2,
                ..ReadThroughConfig::default()
            },
        );
        let s = t.for_plugin("p");
        for k in ["a", "b", "c"] {
            s.apply("ns", &[put(k, "1")]).await.unwrap();
            assert_eq!(s.get("ns", k).await.unwrap(), val("1"));
        }
        cache.writes_fail.store(true, Ordering::Relaxed);
        for k in ["a", "b", "c"] {
            s.apply("ns", &[put(k, "2")]).await.unwrap();
        }
        cache.writes_fail.store(false, Ordering::Relaxed);
        for k in ["a", "b", "c"] {
            assert_eq!(s.get("ns", k).await.unwrap(), val("2"), "{k}");
        }
        assert!(t.stats("p").bypassed >= 3);
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        // Every copy older than the failure has expired; the cache is trusted again.
        for k in ["a", "b", "c"] {
            assert_eq!(s.get("ns", k).await.unwrap(), val("2"), "{k}");
        }
        let before = t.stats("p").store_reads;
        assert_eq!(s.get("ns", "a").await.unwrap(), val("2"));
        assert_eq!(t.stats("p").store_reads, before);
    }

    #[tokio::test]
    async fn a_direct_tier_counts_reads_per_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlowStore::new(dir.path());
        let t = StateTier::direct(store.clone());
        assert!(!t.is_read_through());
        let a = t.for_plugin("a");
        let b = t.for_plugin("b");
        for _ in 0..3 {
            a.get("ns", "k").await.unwrap();
        }
        b.get("ns", "k").await.unwrap();
        b.scan("ns", "", 10).await.unwrap();
        assert_eq!(t.stats("a").store_reads, 3);
        assert_eq!(t.stats("b").store_reads, 1);
        assert_eq!(t.stats("b").scans, 1);
        assert_eq!(t.total().store_reads, 4);
    }

    /// The saving the tier exists for: a Zipf-like read-modify-write workload (each event
    /// reads its key's state and writes it back) reads the store far less through the tier.
    #[tokio::test]
    async fn a_skewed_workload_reads_the_store_at_least_80_percent_less() {
        async fn run(store: Arc<dyn StateStore>, keys: &[u32]) {
            for (i, k) in keys.iter().enumerate() {
                let key = format!("k{k}");
                let n = store.get("ns", &key).await.unwrap();
                let n: u64 = n.map_or(0, |v| String::from_utf8(v).unwrap().parse().unwrap());
                // A few writes with a TTL and a few deletes too.
                let w = match i % 50 {
                    0 => StateWrite {
                        value: None,
                        ..put(&key, "")
                    },
                    1 => StateWrite {
                        ttl: Some(Duration::from_secs(3600)),
                        ..put(&key, &(n + 1).to_string())
                    },
                    _ => put(&key, &(n + 1).to_string()),
                };
                store.apply("ns", &[w]).await.unwrap();
            }
        }
        let keys = spate_conformance::zipf_keys(1_000, 1.0, 5_000, 1);
        let plain = StateTier::direct(Arc::new(MemStore::default()));
        run(plain.for_plugin("p"), &keys).await;
        let cached = tier(
            Arc::new(MemStore::default()),
            Arc::new(MokaCache::default()),
            WritePolicy::Update,
        );
        run(cached.for_plugin("p"), &keys).await;
        let (without, with) = (plain.stats("p").store_reads, cached.stats("p").store_reads);
        assert_eq!(without, 5_000);
        assert!(
            with * 5 <= without,
            "store reads: {with} with the tier vs {without} without"
        );
        // Same answers both ways.
        for k in 0..1_000 {
            let key = format!("k{k}");
            assert_eq!(
                plain.store().get("ns", &key).await.unwrap(),
                cached.store().get("ns", &key).await.unwrap()
            );
        }
    }

    /// Unconditional writes in a map, no expiry: enough to count reads.
    #[derive(Default)]
    struct MemStore {
        map: Mutex<HashMap<(String, String), Vec<u8>>>,
    }

    #[async_trait]
    impl StateStore for MemStore {
        async fn get(&self, ns: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
            let map = self.map.lock().unwrap();
            Ok(map.get(&(ns.to_owned(), key.to_owned())).cloned())
        }
        async fn scan_bounded(
            &self,
            _: &str,
            _: &str,
            _: u32,
            _: usize,
        ) -> BackendResult<Vec<(String, Vec<u8>)>> {
            Ok(Vec::new())
        }
        async fn apply(&self, ns: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome> {
            let mut map = self.map.lock().unwrap();
            for w in writes {
                let k = (ns.to_owned(), w.key.clone());
                match &w.value {
                    Some(v) => map.insert(k, v.clone()),
                    None => map.remove(&k),
                };
            }
            Ok(ApplyOutcome::Applied)
        }
    }
}
