//! Checkpoints: a plugin's effects made durable per checkpoint instead of per event.
//!
//! A handler's journal still applies only when it returns ok, and as one unit, but it is
//! applied in memory, at once ([`Checkpointer::finish`]): state writes go to a write-back
//! view the next events read (read-your-writes across events, no wait for a disk), emits
//! are queued for a sender task that publishes them as they come (no wait for the broker
//! per event), cache writes wait for the checkpoint, and the event's offset is marked done
//! in its partition's [`Watermark`] — all under one lock, so a checkpoint sees an event's
//! effects and its position together or not at all.
//!
//! Every `interval`, or after `max_events` events, a checkpoint takes what was applied
//! since the last one, waits until the broker (or log) has acknowledged every emit queued
//! before it, and writes the state and the positions it covers in one unit
//! ([`StateStore::commit_checkpoint`]: one redb transaction for the embedded store). Only
//! then may the pipelines commit those positions to their source. After a crash the
//! store's positions say where to resume and which events above them are already done, so
//! a replayed event never applies its state twice.
//!
//! With exactly-once emits ([`Checkpointer::exactly_once`], Kafka), emits are sent in a
//! transaction instead, and a checkpoint ends it: the state and positions are written
//! first, keeping what they overwrite ([`StateStore::prepare_checkpoint`]), then the
//! transaction commits the emits together with the positions, tagged with the
//! checkpoint's id, then the store forgets what it kept. Emits of events finished after
//! the checkpoint was taken wait for the next transaction. A transaction that fails makes
//! the checkpointer fail ([`Checkpointer::failed`]): its pipelines restart with a new
//! one, which puts the kept values back unless the broker shows the checkpoint's id as
//! committed, so state, positions and visible emits always agree.
//!
//! Stores shared with other runtimes ([`StateStore::checkpoints`] is `false`, CQL) cannot
//! be fronted by a view that only this process sees: their writes are applied event by
//! event by the caller, conditions checked by the store, and only emits, cache writes and
//! positions go through the checkpoint.

use super::watermark::Watermark;
use async_trait::async_trait;
use parking_lot::Mutex;
use spate_core::host::CacheOp;
pub use spate_core::host::Effects;
use spate_core::types::{NewEvent, TopicPartition};
use spate_core::{
    BackendError, BackendResult, Cache, Entry, EventBus, Expiry, SourcePosition, StateStore,
    StateWrite, Transactional, Transactions,
};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// When checkpoints are taken and how much they may hold.
#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    /// Longest time between checkpoints.
    pub interval: Duration,
    /// A checkpoint is taken early once this many events finished since the last one.
    pub max_events: usize,
    /// Most bytes of state writes, or of emits not yet acknowledged, held in memory:
    /// events wait above it until a checkpoint (or the broker) catches up.
    pub max_bytes: usize,
    /// Longest delay between retries of an emit the broker refused.
    pub max_backoff: Duration,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            max_events: 8192,
            max_bytes: 64 << 20,
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Most bytes of writes one checkpoint sends a store shared with other runtimes.
const SHARED_MAX_BYTES: usize = 4 << 20;

/// A state write applied to the view and not yet durable.
#[derive(Clone, Debug)]
struct Pending {
    value: Option<Vec<u8>>,
    /// Wall-clock millis when it expires; 0 = never.
    expires_at: u64,
}

impl Pending {
    /// The value as a read at `now` sees it (`None`: absent or expired).
    fn live(&self, now: u64) -> Option<&Vec<u8>> {
        self.value
            .as_ref()
            .filter(|_| self.expires_at == 0 || self.expires_at > now)
    }

    fn bytes(&self, key: &str) -> usize {
        key.len() + self.value.as_ref().map_or(0, Vec::len) + 16
    }
}

/// namespace -> key -> pending write.
type Overlay = HashMap<String, BTreeMap<String, Pending>>;

/// An emit queued for the sender.
struct Queued {
    seq: u64,
    topic: String,
    event: NewEvent,
}

/// What a checkpoint sees; guarded by one lock.
#[derive(Default)]
struct Inner {
    /// Writes applied since the last checkpoint was taken.
    dirty: Overlay,
    dirty_bytes: usize,
    /// The writes of the checkpoint being made durable: still read until it is.
    flushing: Option<Arc<Overlay>>,
    /// Bumped when a checkpoint's writes reach the store (and leave `flushing`).
    generation: u64,
    /// Per (topic, partition): what is read, in flight and done.
    /// (Keyed by topic first, so a lookup by `&str` allocates nothing.)
    marks: HashMap<String, HashMap<u32, Watermark>>,
    /// Per (topic, partition): the position the last durable checkpoint covers.
    durable: HashMap<String, HashMap<u32, u64>>,
    /// Emits not yet taken by the sender.
    queue: VecDeque<Queued>,
    /// Bytes of emits queued and not yet acknowledged.
    unacked_bytes: usize,
    /// Sequence number of the last emit queued.
    seq: u64,
    /// Cache writes, applied by the next checkpoint.
    cache: Vec<CacheOp>,
    /// Events finished since the last checkpoint was taken.
    events: usize,
    /// Exactly-once: emits queued after this one wait until the checkpoint that took it
    /// has committed its transaction.
    barrier: Option<u64>,
}

/// What [`Checkpointer::track`] says about an event just read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Track {
    /// Handle it.
    New,
    /// Already read (a re-delivery), or its partition is not assigned here: drop it.
    Seen,
    /// A checkpoint recorded it as done before a restart: drop it.
    Done,
}

/// Why [`Checkpointer::finish`] did not apply an event's effects.
#[derive(Debug)]
pub enum FinishError {
    /// A compare-and-swap's expected value no longer holds: nothing was applied.
    Conflict(String),
    /// The store could not be read to check a condition.
    Backend(BackendError),
}

/// One plugin's checkpoints: its write-back view, its emit sender, and the positions of
/// every partition its pipelines read. See the [module docs](self).
pub struct Checkpointer {
    group: String,
    /// The plugin's namespace: where the store keeps the positions.
    namespace: String,
    state: Arc<dyn StateStore>,
    cache: Arc<dyn Cache>,
    bus: Arc<dyn EventBus>,
    write_back: bool,
    shared: bool,
    config: CheckpointConfig,
    inner: Mutex<Inner>,
    /// Wakes the checkpoint loop before its interval.
    due: Arc<Notify>,
    /// Wakes the emit sender.
    queued: Arc<Notify>,
    /// Sequence number of the last emit acknowledged.
    acked: watch::Sender<u64>,
    /// Checkpoints made durable so far.
    checkpoints: watch::Sender<u64>,
    /// One checkpoint at a time.
    flush: tokio::sync::Mutex<()>,
    /// The background tasks, while a pipeline uses the checkpointer.
    tasks: Mutex<(usize, Option<Tasks>)>,
    /// Exactly-once emits, if asked for.
    eos: Option<ExactlyOnce>,
    /// Cancelled when a transaction failed: see [`Checkpointer::failed`].
    failed: CancellationToken,
}

/// Exactly-once emits: who opens the transactions, under which id, and the open one.
struct ExactlyOnce {
    opener: Arc<dyn Transactional>,
    id: String,
    txn: tokio::sync::OnceCell<Arc<dyn Transactions>>,
}

/// The id a checkpoint's transaction tags the committed positions with: a digest of the
/// positions, so a restart recomputes it from the store's pending checkpoint. Two
/// checkpoints with equal positions cover the same events.
fn checkpoint_id(positions: &[SourcePosition]) -> String {
    use sha2::{Digest, Sha256};
    let mut sorted: Vec<&SourcePosition> = positions.iter().collect();
    sorted.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let mut h = Sha256::new();
    for p in sorted {
        h.update(p.group.as_bytes());
        h.update([0]);
        h.update(p.topic.as_bytes());
        h.update([0]);
        h.update(p.partition.to_le_bytes());
        h.update(p.encode());
        h.update([0xff]);
    }
    format!("spate-ckpt-{}", hex::encode(&h.finalize()[..12]))
}

/// The sender and checkpoint tasks, and how to stop them.
struct Tasks {
    stop: CancellationToken,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn expires_at(now: u64, ttl: Option<Duration>) -> u64 {
    match ttl {
        None => 0,
        Some(ttl) => {
            let ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
            now.saturating_add(ms).max(1)
        }
    }
}

/// The overlay's answer for `key`: `Some(value or absence)` if it holds a write of it.
/// The first key of `writes` whose condition does not hold against the view (or, for a
/// key it does not hold, the `stored` value).
fn conflict(
    inner: &Inner,
    namespace: &str,
    writes: &[StateWrite],
    stored: &HashMap<String, Option<Vec<u8>>>,
    now: u64,
) -> Option<String> {
    writes.iter().find_map(|w| {
        let expected = w.condition.as_ref()?;
        let current = match overlay_get(inner, namespace, &w.key, now) {
            Some(v) => v.cloned(),
            None => stored.get(&w.key).cloned().flatten(),
        };
        (current.as_ref() != expected.as_ref()).then(|| w.key.clone())
    })
}

impl Inner {
    /// Take one unit's effects: its state and side writes into the view, its emits into
    /// the sender's queue, its cache writes for the checkpoint.
    fn take(
        &mut self,
        now: u64,
        (namespace, writes): (String, Vec<StateWrite>),
        side: Vec<(String, StateWrite)>,
        emits: Vec<spate_core::host::PendingEmit>,
        cache: Vec<CacheOp>,
    ) {
        let pending = |w: StateWrite| {
            let p = Pending {
                expires_at: expires_at(now, w.ttl),
                value: w.value,
            };
            (p.bytes(&w.key), w.key, p)
        };
        for (ns, w) in side {
            let (bytes, key, p) = pending(w);
            self.dirty_bytes += bytes;
            self.dirty.entry(ns).or_default().insert(key, p);
        }
        if !writes.is_empty() {
            let ns = self.dirty.entry(namespace).or_default();
            for w in writes {
                let (bytes, key, p) = pending(w);
                self.dirty_bytes += bytes;
                ns.insert(key, p);
            }
        }
        for e in emits {
            self.seq += 1;
            self.unacked_bytes += e.event.payload.len() + 64;
            self.queue.push_back(Queued {
                seq: self.seq,
                topic: e.topic,
                event: e.event,
            });
        }
        self.cache.extend(cache);
        self.events += 1;
    }
}

fn overlay_get<'a>(
    inner: &'a Inner,
    namespace: &str,
    key: &str,
    now: u64,
) -> Option<Option<&'a Vec<u8>>> {
    let hit = |o: &'a Overlay| o.get(namespace).and_then(|m| m.get(key));
    hit(&inner.dirty)
        .or_else(|| inner.flushing.as_deref().and_then(hit))
        .map(|p| p.live(now))
}

impl Checkpointer {
    /// Checkpoints of consumer `group`'s effects on `state` (positions kept with
    /// `namespace`, the plugin's), `cache` and `bus`.
    pub fn new(
        group: &str,
        namespace: &str,
        state: Arc<dyn StateStore>,
        cache: Arc<dyn Cache>,
        bus: Arc<dyn EventBus>,
        config: CheckpointConfig,
    ) -> Arc<Self> {
        Self::build(group, namespace, state, cache, bus, config, None)
    }

    /// [`Checkpointer::new`] with exactly-once emits: each checkpoint is one transaction
    /// opened by `opener` under `id` (stable across restarts of this runtime, so a new
    /// process fences the one that died and aborts what it left open), committed with the
    /// positions it covers. The store must [prepare](StateStore::prepares) checkpoints.
    #[allow(clippy::too_many_arguments)]
    pub fn exactly_once(
        group: &str,
        namespace: &str,
        state: Arc<dyn StateStore>,
        cache: Arc<dyn Cache>,
        bus: Arc<dyn EventBus>,
        config: CheckpointConfig,
        opener: Arc<dyn Transactional>,
        id: &str,
    ) -> Arc<Self> {
        let eos = ExactlyOnce {
            opener,
            id: id.to_owned(),
            txn: tokio::sync::OnceCell::new(),
        };
        Self::build(group, namespace, state, cache, bus, config, Some(eos))
    }

    fn build(
        group: &str,
        namespace: &str,
        state: Arc<dyn StateStore>,
        cache: Arc<dyn Cache>,
        bus: Arc<dyn EventBus>,
        mut config: CheckpointConfig,
        eos: Option<ExactlyOnce>,
    ) -> Arc<Self> {
        if state.shared() {
            // A shared store takes a checkpoint as one request: keep it well under the
            // largest one it accepts.
            config.max_bytes = config.max_bytes.min(SHARED_MAX_BYTES);
        }
        Arc::new(Self {
            group: group.to_owned(),
            namespace: namespace.to_owned(),
            write_back: state.checkpoints(),
            shared: state.shared(),
            state,
            cache,
            bus,
            config,
            inner: Mutex::new(Inner::default()),
            due: Arc::new(Notify::new()),
            queued: Arc::new(Notify::new()),
            acked: watch::Sender::new(0),
            checkpoints: watch::Sender::new(0),
            flush: tokio::sync::Mutex::new(()),
            tasks: Mutex::new((0, None)),
            eos,
            failed: CancellationToken::new(),
        })
    }

    /// Whether emits and positions are committed in transactions: the pipelines then
    /// commit nothing to the source themselves.
    pub fn transactional(&self) -> bool {
        self.eos.is_some()
    }

    /// Cancelled once a transaction failed: what was applied since the last checkpoint is
    /// void (its emits were aborted), so the pipelines must stop and the plugin restart
    /// with a new checkpointer, which resumes from the last committed checkpoint.
    pub fn failed(&self) -> &CancellationToken {
        &self.failed
    }

    fn fail(&self, why: &str) {
        if !self.failed.is_cancelled() {
            warn!(group = %self.group, reason = why, "exactly-once transaction failed; the plugin restarts from its last committed checkpoint");
            metrics::counter!(spate_core::metric_names::TRANSACTION_FAILURES_TOTAL, "plugin" => self.group.clone())
                .increment(1);
            self.failed.cancel();
        }
    }

    /// The open transactions, after resolving the checkpoint a crash may have left
    /// pending: kept if the broker shows its id committed, else undone.
    async fn transactions(&self) -> BackendResult<&Arc<dyn Transactions>> {
        let Some(eos) = &self.eos else {
            return Err(BackendError::Invalid("not exactly-once".into()));
        };
        eos.txn
            .get_or_try_init(|| async {
                if !self.state.prepares() {
                    return Err(BackendError::Invalid(
                        "exactly-once emits need a state store that can take back a checkpoint (the embedded store, without a read-through tier)".into(),
                    ));
                }
                let txn = eos.opener.transactions(&eos.id, &self.group).await?;
                if let Some(pending) = self.state.pending_checkpoint(&self.namespace).await? {
                    let id = checkpoint_id(&pending);
                    let mut keep = false;
                    for p in &pending {
                        let tp = TopicPartition::new(p.topic.clone(), p.partition);
                        if txn.committed_checkpoint(&tp).await?.as_deref() == Some(id.as_str()) {
                            keep = true;
                            break;
                        }
                    }
                    self.state.resolve_checkpoint(&self.namespace, keep).await?;
                    info!(group = %self.group, checkpoint = %id, committed = keep, "resolved the checkpoint a crash left pending (undone unless its transaction committed)");
                }
                Ok(txn)
            })
            .await
    }

    /// Whether state writes go to the write-back view (else the caller applies them).
    pub fn write_back(&self) -> bool {
        self.write_back
    }

    /// Whether other runtimes write the store too: a compare-and-swap is then decided by
    /// the store (see [`Checkpointer::finish`]).
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// The state as handlers read it: the view's pending writes over the store.
    pub fn view(self: &Arc<Self>) -> Arc<dyn StateStore> {
        Arc::new(View(Arc::clone(self)))
    }

    /// A pipeline starts using the checkpointer: the first one starts its tasks.
    pub fn enter(self: &Arc<Self>) {
        let mut t = self.tasks.lock();
        t.0 += 1;
        if t.1.is_none() {
            let stop = CancellationToken::new();
            // The tasks hold it weakly: once its pipelines and their supervisor let go
            // (even if a pipeline was aborted and never left), they end, and so does its
            // hold on the store and the bus.
            let handles = vec![
                tokio::spawn(Self::send_loop(
                    Arc::downgrade(self),
                    Arc::clone(&self.queued),
                    stop.clone(),
                )),
                tokio::spawn(Self::checkpoint_loop(
                    Arc::downgrade(self),
                    Arc::clone(&self.due),
                    self.config.interval,
                    stop.clone(),
                )),
            ];
            t.1 = Some(Tasks { stop, handles });
        }
    }

    /// A pipeline is done with it (after its final checkpoint): the last one stops its
    /// tasks and waits for them, so nothing holds the store or the bus once it returns.
    pub async fn leave(&self) {
        let tasks = {
            let mut t = self.tasks.lock();
            t.0 = t.0.saturating_sub(1);
            if t.0 == 0 { t.1.take() } else { None }
        };
        if let Some(tasks) = tasks {
            tasks.stop.cancel();
            for mut h in tasks.handles {
                // A checkpoint waiting for acknowledgements that will not come (the
                // broker is gone) must not hold shutdown up.
                if tokio::time::timeout(Duration::from_secs(5), &mut h)
                    .await
                    .is_err()
                {
                    h.abort();
                }
            }
        }
    }

    /// `topic`/`partition` was assigned with the source's committed position `start`:
    /// where reading really resumes is the later of that and the last checkpoint's
    /// position, whose done offsets above it are then skipped. Returns the position.
    pub async fn assign(&self, topic: &str, partition: u32, start: u64) -> BackendResult<u64> {
        if self.eos.is_some() {
            self.transactions().await?;
        }
        let recorded = if self.write_back {
            self.state
                .source_position(&self.namespace, &self.group, topic, partition)
                .await?
        } else {
            None
        };
        let mark = match recorded {
            Some(p) if p.next >= start => Watermark::restored(p.next, p.done),
            _ => Watermark::new(start),
        };
        let from = mark.committable();
        let mut g = self.inner.lock();
        g.marks
            .entry(topic.to_owned())
            .or_default()
            .insert(partition, mark);
        g.durable
            .entry(topic.to_owned())
            .or_default()
            .insert(partition, from);
        Ok(from)
    }

    /// Forget revoked partitions (after the checkpoint that covers what they finished).
    pub fn release(&self, topic: &str, partitions: impl IntoIterator<Item = u32>) {
        let mut g = self.inner.lock();
        for p in partitions {
            if let Some(m) = g.marks.get_mut(topic) {
                m.remove(&p);
            }
            if let Some(d) = g.durable.get_mut(topic) {
                d.remove(&p);
            }
        }
    }

    /// An event at `offset` was read.
    pub fn track(&self, topic: &str, partition: u32, offset: u64) -> Track {
        let mut g = self.inner.lock();
        let Some(mark) = g.marks.get_mut(topic).and_then(|m| m.get_mut(&partition)) else {
            return Track::Seen;
        };
        if offset < mark.next_offset() {
            Track::Seen
        } else if mark.track(offset) {
            Track::New
        } else {
            Track::Done
        }
    }

    /// The position the last durable checkpoint covers in `topic`/`partition`.
    pub fn durable(&self, topic: &str, partition: u32) -> Option<u64> {
        self.inner
            .lock()
            .durable
            .get(topic)
            .and_then(|d| d.get(&partition))
            .copied()
    }

    /// The event at `offset` finished with `effects`: apply them all (state to the view,
    /// emits to the sender, cache writes to the next checkpoint) and mark it done, or, if
    /// a condition fails, nothing. Waits first while the view or the unacknowledged emits
    /// hold more than `max_bytes`.
    pub async fn finish(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        effects: Effects,
    ) -> Result<(), FinishError> {
        self.record(topic, partition, Some(offset), effects).await
    }

    /// The event at `offset` is done with no effects (a manifest filter passed it over):
    /// marked done at once, without waiting for room.
    pub fn skip(&self, topic: &str, partition: u32, offset: u64) {
        let mut g = self.inner.lock();
        let Some(mark) = g.marks.get_mut(topic).and_then(|m| m.get_mut(&partition)) else {
            return; // revoked meanwhile
        };
        mark.complete(offset);
        g.events += 1;
        let due = g.events >= self.config.max_events;
        drop(g);
        if due {
            self.due.notify_one();
        }
    }

    /// [`Checkpointer::finish`] for effects that belong to no source position (a parked
    /// event redriven, a request carried out): applied the same way while `partition` is
    /// still assigned, dropped if it was revoked (its next owner does the work again).
    pub async fn apply(
        &self,
        topic: &str,
        partition: u32,
        effects: Effects,
    ) -> Result<(), FinishError> {
        self.record(topic, partition, None, effects).await
    }

    async fn record(
        &self,
        topic: &str,
        partition: u32,
        offset: Option<u64>,
        effects: Effects,
    ) -> Result<(), FinishError> {
        self.wait_for_room().await;
        if self.failed.is_cancelled() {
            return Err(FinishError::Backend(BackendError::Unavailable(
                "an exactly-once checkpoint failed; the plugin restarts from its last one".into(),
            )));
        }
        let Effects {
            namespace,
            mut writes,
            cache,
            emits,
            mut side,
            reads: _,
        } = effects;
        if !self.write_back {
            writes.clear();
            side.clear();
        }
        loop {
            let (generation, stored) = self.read_missing(&namespace, &writes).await?;
            let mut g = self.inner.lock();
            if !stored.is_empty() && g.generation != generation {
                // A checkpoint landed meanwhile: what was read may be stale.
                continue;
            }
            let now = now_ms();
            if let Some(key) = conflict(&g, &namespace, &writes, &stored, now) {
                return Err(FinishError::Conflict(key));
            }
            let Some(mark) = g.marks.get_mut(topic).and_then(|m| m.get_mut(&partition)) else {
                // Revoked meanwhile: its next owner handles the event again.
                if offset.is_none() {
                    return Err(FinishError::Backend(BackendError::Unavailable(format!(
                        "{topic}/{partition} is no longer assigned here"
                    ))));
                }
                return Ok(());
            };
            if let Some(offset) = offset {
                mark.complete(offset);
            }
            let had_emits = !emits.is_empty();
            g.take(now, (namespace, writes), side, emits, cache);
            let due = g.events >= self.config.max_events;
            drop(g);
            if had_emits {
                self.queued.notify_one();
            }
            if due {
                self.due.notify_one();
            }
            return Ok(());
        }
    }

    /// The stored values of the keys `writes` has conditions on and the view does not
    /// hold (read without the lock), with the view's generation when it was checked.
    async fn read_missing(
        &self,
        namespace: &str,
        writes: &[StateWrite],
    ) -> Result<(u64, HashMap<String, Option<Vec<u8>>>), FinishError> {
        let (generation, missing) = {
            let g = self.inner.lock();
            let now = now_ms();
            let missing: Vec<String> = writes
                .iter()
                .filter(|w| w.condition.is_some())
                .filter(|w| overlay_get(&g, namespace, &w.key, now).is_none())
                .map(|w| w.key.clone())
                .collect();
            (g.generation, missing)
        };
        let mut stored = HashMap::with_capacity(missing.len());
        for key in missing {
            let value = self
                .state
                .get(namespace, &key)
                .await
                .map_err(FinishError::Backend)?;
            stored.insert(key, value);
        }
        Ok((generation, stored))
    }

    async fn wait_for_room(&self) {
        loop {
            let (full, mut acked, mut done) = {
                let g = self.inner.lock();
                (
                    g.dirty_bytes > self.config.max_bytes
                        || g.unacked_bytes > self.config.max_bytes,
                    self.acked.subscribe(),
                    self.checkpoints.subscribe(),
                )
            };
            if !full || self.failed.is_cancelled() {
                return;
            }
            self.due.notify_one();
            tokio::select! {
                _ = acked.changed() => {}
                _ = done.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Take a checkpoint now, and return once it is durable: what every event finished
    /// before the call did is then in the store and its position may be committed.
    pub async fn checkpoint(&self) -> BackendResult<()> {
        let _one = self.flush.lock().await;
        if self.failed.is_cancelled() {
            return Err(BackendError::Unavailable(
                "an exactly-once checkpoint failed".into(),
            ));
        }
        let (snapshot, positions, target, cache) = {
            let mut g = self.inner.lock();
            if self.eos.is_some() {
                if g.events == 0 && g.queue.is_empty() && g.unacked_bytes == 0 {
                    // Nothing new: no transaction to commit.
                    return Ok(());
                }
                g.barrier = Some(g.seq);
            }
            let snapshot = Arc::new(std::mem::take(&mut g.dirty));
            g.dirty_bytes = 0;
            g.flushing = Some(Arc::clone(&snapshot));
            g.events = 0;
            let positions: Vec<SourcePosition> = g
                .marks
                .iter()
                .flat_map(|(topic, marks)| {
                    marks.iter().map(|(partition, m)| SourcePosition {
                        group: self.group.clone(),
                        topic: topic.clone(),
                        partition: *partition,
                        next: m.committable(),
                        done: m.done_above(),
                    })
                })
                .collect();
            (snapshot, positions, g.seq, std::mem::take(&mut g.cache))
        };
        // Every emit of the events covered is on the broker before their positions are
        // recorded.
        let mut acked = self.acked.subscribe();
        let acked = tokio::select! {
            a = acked.wait_for(|a| *a >= target) => a.is_ok(),
            _ = self.failed.cancelled() => false,
        };
        if !acked {
            self.restore(snapshot, cache);
            return Err(BackendError::Unavailable("the emit sender stopped".into()));
        }
        if self.write_back {
            let now = now_ms();
            let writes: Vec<(String, Vec<StateWrite>)> = snapshot
                .iter()
                .map(|(ns, entries)| {
                    let writes = entries
                        .iter()
                        .map(|(key, p)| {
                            let live = p.live(now);
                            StateWrite {
                                key: key.clone(),
                                value: live.cloned(),
                                ttl: (p.expires_at != 0 && live.is_some())
                                    .then(|| Duration::from_millis(p.expires_at - now)),
                                condition: None,
                            }
                        })
                        .collect();
                    (ns.clone(), writes)
                })
                .collect();
            let written = if self.eos.is_some() {
                self.state
                    .prepare_checkpoint(&writes, &self.namespace, &positions)
                    .await
            } else {
                self.state
                    .commit_checkpoint(&writes, &self.namespace, &positions)
                    .await
            };
            if let Err(e) = written {
                // Exactly-once: the transaction stays open with its emits; the next
                // checkpoint commits them with these writes.
                self.restore(snapshot, cache);
                return Err(e);
            }
        }
        if self.eos.is_some() {
            self.commit_transaction(&positions).await?;
        }
        for op in cache {
            let r = match op {
                CacheOp::Set { key, value, ttl } => self.cache.set(&key, value, ttl).await,
                CacheOp::Delete { key } => self.cache.delete(&key).await,
                CacheOp::Incr { key, delta } => self.cache.incr(&key, delta).await.map(|_| ()),
            };
            // The cache may forget anything at any time: a failed write fails nothing.
            if let Err(e) = r {
                metrics::counter!(spate_core::metric_names::CACHE_ERRORS_TOTAL, "plugin" => self.group.clone())
                    .increment(1);
                warn!(error = %e, "cache write failed at a checkpoint");
            }
        }
        {
            let mut g = self.inner.lock();
            g.flushing = None;
            g.generation += 1;
            // Partitions released meanwhile stay forgotten.
            for p in positions {
                if let Some(d) = g
                    .durable
                    .get_mut(&p.topic)
                    .and_then(|d| d.get_mut(&p.partition))
                {
                    *d = (*d).max(p.next);
                }
            }
        }
        self.checkpoints.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Exactly-once: commit the transaction holding the emits the prepared checkpoint
    /// covers, with its positions; then the store forgets what it kept, and the emits
    /// held back meanwhile go into the next transaction. A failure fails the checkpointer
    /// and takes the prepared checkpoint back.
    async fn commit_transaction(&self, positions: &[SourcePosition]) -> BackendResult<()> {
        let txn = self.transactions().await?;
        let offsets: Vec<(TopicPartition, u64)> = positions
            .iter()
            .map(|p| (TopicPartition::new(p.topic.clone(), p.partition), p.next))
            .collect();
        if let Err(e) = txn.commit(&offsets, &checkpoint_id(positions)).await {
            self.fail(&e.to_string());
            // If this fails too, the next checkpointer's recovery undoes it.
            let _ = self.state.resolve_checkpoint(&self.namespace, false).await;
            return Err(e);
        }
        if let Err(e) = self.state.resolve_checkpoint(&self.namespace, true).await {
            // Still pending: a restart finds the id committed and keeps it.
            warn!(group = %self.group, error = %e, "could not clear a committed checkpoint's undo record");
        }
        self.inner.lock().barrier = None;
        self.queued.notify_one();
        Ok(())
    }

    /// A checkpoint failed: its writes go back under the ones applied since (which are
    /// newer), to be written by the next one.
    fn restore(&self, snapshot: Arc<Overlay>, cache: Vec<CacheOp>) {
        let mut g = self.inner.lock();
        g.flushing = None;
        let newer = std::mem::take(&mut g.dirty);
        let mut merged = Arc::try_unwrap(snapshot).unwrap_or_else(|a| (*a).clone());
        for (ns, entries) in newer {
            merged.entry(ns).or_default().extend(entries);
        }
        g.dirty_bytes = merged
            .values()
            .flat_map(|m| m.iter())
            .map(|(k, p)| p.bytes(k))
            .sum();
        g.dirty = merged;
        let later = std::mem::take(&mut g.cache);
        g.cache = cache;
        g.cache.extend(later);
    }

    async fn checkpoint_loop(
        this: Weak<Self>,
        due: Arc<Notify>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        // The first checkpoint is due one interval after the start, not at once.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = due.notified() => {}
            }
            let Some(me) = this.upgrade() else { return };
            if stop.is_cancelled() {
                return;
            }
            if let Err(e) = me.checkpoint().await {
                if me.failed.is_cancelled() {
                    return;
                }
                warn!(group = %me.group, error = %e, "checkpoint failed; retrying");
                drop(me);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }

    /// Publish queued emits in order, as they come, and record how far the broker has
    /// acknowledged them. A refused batch is sent again (same idempotency ids) until it
    /// is taken.
    async fn send_loop(this: Weak<Self>, queued: Arc<Notify>, stop: CancellationToken) {
        loop {
            let Some(me) = this.upgrade() else { return };
            let batch: Vec<Queued> = {
                let mut g = me.inner.lock();
                let upto = g.barrier.unwrap_or(u64::MAX);
                let n = g.queue.iter().take_while(|q| q.seq <= upto).count();
                g.queue.drain(..n).collect()
            };
            if me.failed.is_cancelled() {
                return;
            }
            let Some(last) = batch.last().map(|q| q.seq) else {
                drop(me);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = queued.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                continue;
            };
            tokio::select! {
                // Stopped after the final checkpoint: what it did not cover is not
                // committed, and is handled again after a restart.
                _ = stop.cancelled() => return,
                _ = me.send(batch, last) => {}
            }
        }
    }

    async fn send(&self, batch: Vec<Queued>, last: u64) {
        {
            let bytes: usize = batch.iter().map(|q| q.event.payload.len() + 64).sum();
            // Runs of one topic, in order: each is one send.
            let mut runs: Vec<(String, Vec<NewEvent>)> = Vec::new();
            for q in batch {
                match runs.last_mut() {
                    Some((t, events)) if *t == q.topic => events.push(q.event),
                    _ => runs.push((q.topic, vec![q.event])),
                }
            }
            if self.eos.is_some() {
                // In a transaction: a send that fails has put it in error; it can only be
                // aborted, with everything since the last checkpoint.
                if let Err(e) = self.send_in_transaction(runs).await {
                    self.fail(&e.to_string());
                    return;
                }
                let mut g = self.inner.lock();
                g.unacked_bytes = g.unacked_bytes.saturating_sub(bytes);
                drop(g);
                self.acked.send_replace(last);
                return;
            }
            let mut tickets = Vec::with_capacity(runs.len());
            for (topic, events) in &runs {
                tickets.push(self.bus.send(topic, events.clone()).await);
            }
            for ((topic, events), ticket) in runs.into_iter().zip(tickets) {
                let sent = match ticket {
                    Ok(t) => t.await.map(|_| ()),
                    Err(e) => Err(e),
                };
                if let Err(e) = sent {
                    self.resend(&topic, events, e).await;
                }
            }
            {
                let mut g = self.inner.lock();
                g.unacked_bytes = g.unacked_bytes.saturating_sub(bytes);
            }
            self.acked.send_replace(last);
        }
    }

    async fn send_in_transaction(&self, runs: Vec<(String, Vec<NewEvent>)>) -> BackendResult<()> {
        let txn = self.transactions().await?;
        let mut tickets = Vec::with_capacity(runs.len());
        for (topic, events) in runs {
            tickets.push(txn.send(&topic, events).await?);
        }
        for t in tickets {
            t.await?;
        }
        Ok(())
    }

    async fn resend(&self, topic: &str, events: Vec<NewEvent>, first: BackendError) {
        let mut delay = Duration::from_millis(50);
        let mut error = first;
        loop {
            metrics::counter!(spate_core::metric_names::EMIT_RETRIES_TOTAL, "plugin" => self.group.clone())
                .increment(1);
            warn!(%topic, error = %error, ?delay, "emit failed; sending again");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.config.max_backoff);
            match self.bus.append(topic, events.clone()).await {
                Ok(_) => return,
                Err(e) => error = e,
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let t = self.tasks.get_mut();
        if let Some(tasks) = t.1.take() {
            tasks.stop.cancel();
        }
    }
}

/// Handlers' reads: the checkpointer's pending writes over the store.
struct View(Arc<Checkpointer>);

impl View {
    fn overlay(&self, namespace: &str, key: &str) -> Option<Option<(Vec<u8>, u64)>> {
        let g = self.0.inner.lock();
        let now = now_ms();
        let hit = |o: &Overlay| o.get(namespace).and_then(|m| m.get(key)).cloned();
        hit(&g.dirty)
            .or_else(|| g.flushing.as_deref().and_then(hit))
            .map(|p| {
                let exp = p.expires_at;
                p.live(now).cloned().map(|v| (v, exp))
            })
    }
}

#[async_trait]
impl StateStore for View {
    async fn get(&self, namespace: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        match self.overlay(namespace, key) {
            Some(v) => Ok(v.map(|(v, _)| v)),
            None => self.0.state.get(namespace, key).await,
        }
    }

    async fn get_entry(&self, namespace: &str, key: &str) -> BackendResult<Option<Entry>> {
        match self.overlay(namespace, key) {
            Some(v) => Ok(v.map(|(value, exp)| Entry {
                value,
                expiry: match exp {
                    0 => Expiry::Never,
                    e => Expiry::In(Duration::from_millis(e.saturating_sub(now_ms()))),
                },
            })),
            None => self.0.state.get_entry(namespace, key).await,
        }
    }

    async fn scan_bounded(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
        max_bytes: usize,
    ) -> BackendResult<Vec<(String, Vec<u8>)>> {
        // Pending writes in range, newest first (dirty over flushing).
        let pending: BTreeMap<String, Option<Vec<u8>>> = {
            let g = self.0.inner.lock();
            let now = now_ms();
            let mut out = BTreeMap::new();
            for o in [g.flushing.as_deref(), Some(&g.dirty)]
                .into_iter()
                .flatten()
            {
                if let Some(m) = o.get(namespace) {
                    for (k, p) in m
                        .range(prefix.to_owned()..)
                        .take_while(|(k, _)| k.starts_with(prefix))
                    {
                        out.insert(k.clone(), p.live(now).cloned());
                    }
                }
            }
            out
        };
        let extra = u32::try_from(pending.len()).unwrap_or(u32::MAX);
        let stored = self
            .0
            .state
            .scan_bounded(namespace, prefix, limit.saturating_add(extra), max_bytes)
            .await?;
        let mut merged: BTreeMap<String, Vec<u8>> = stored.into_iter().collect();
        for (k, v) in pending {
            match v {
                Some(v) => merged.insert(k, v),
                None => merged.remove(&k),
            };
        }
        let mut bytes = 0usize;
        let mut out = Vec::new();
        for (k, v) in merged.into_iter().take(limit as usize) {
            bytes = bytes.saturating_add(k.len() + v.len());
            out.push((k, v));
            if bytes > max_bytes {
                break;
            }
        }
        Ok(out)
    }

    async fn apply(
        &self,
        namespace: &str,
        writes: &[StateWrite],
    ) -> BackendResult<spate_core::ApplyOutcome> {
        self.0.state.apply(namespace, writes).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use spate_core::host::PendingEmit;
    use spate_core::types::Header;
    use spate_core::{
        cache::MokaCache,
        events::{EmbeddedLog, LogConfig},
        state::EmbeddedStateStore,
    };

    struct Fixture {
        ckpt: Arc<Checkpointer>,
        store: Arc<EmbeddedStateStore>,
        log: Arc<EmbeddedLog>,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStateStore::open(&dir.path().join("state")).unwrap();
        let log = EmbeddedLog::open(&dir.path().join("log"), LogConfig::default()).unwrap();
        let ckpt = Checkpointer::new(
            "g",
            "ns",
            store.clone(),
            Arc::new(MokaCache::new(1 << 20)),
            log.clone(),
            CheckpointConfig {
                interval: Duration::from_secs(3600),
                ..CheckpointConfig::default()
            },
        );
        Fixture {
            ckpt,
            store,
            log,
            _dir: dir,
        }
    }

    fn put(key: &str, value: &str, condition: Option<Option<&str>>) -> StateWrite {
        StateWrite {
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
            ttl: None,
            condition: condition.map(|c| c.map(|v| v.as_bytes().to_vec())),
        }
    }

    fn effects(writes: Vec<StateWrite>, emit: &str) -> Effects {
        Effects {
            namespace: "ns".into(),
            writes,
            cache: Vec::new(),
            emits: vec![PendingEmit {
                topic: "out".into(),
                event: NewEvent {
                    key: None,
                    payload: emit.as_bytes().to_vec(),
                    headers: vec![Header::text("x", emit)],
                },
            }],
            side: Vec::new(),
            reads: Default::default(),
        }
    }

    #[tokio::test]
    async fn effects_are_read_at_once_and_durable_with_their_positions_at_the_checkpoint() {
        let f = fixture();
        f.ckpt.enter();
        let view = f.ckpt.view();
        assert_eq!(f.ckpt.assign("in", 0, 0).await.unwrap(), 0);
        for o in 0..3 {
            assert_eq!(f.ckpt.track("in", 0, o), Track::New);
        }
        f.ckpt
            .finish("in", 0, 1, effects(vec![put("k", "v1", None)], "e1"))
            .await
            .unwrap();
        // The next event reads it at once; the store does not have it yet.
        assert_eq!(view.get("ns", "k").await.unwrap(), Some(b"v1".to_vec()));
        assert_eq!(f.store.get("ns", "k").await.unwrap(), None);
        f.ckpt.checkpoint().await.unwrap();
        assert_eq!(f.store.get("ns", "k").await.unwrap(), Some(b"v1".to_vec()));
        // Offset 0 is unfinished: the position stays at 0 and records 1 as done.
        let p = f
            .store
            .source_position("ns", "g", "in", 0)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((p.next, p.done), (0, vec![1]));
        assert_eq!(f.ckpt.durable("in", 0), Some(0));
        // Its emit was acknowledged before: it is in the log.
        assert_eq!(
            f.log.end_offsets("out").await.unwrap().iter().sum::<u64>(),
            1
        );
        f.ckpt
            .finish("in", 0, 0, effects(Vec::new(), "e0"))
            .await
            .unwrap();
        f.ckpt.checkpoint().await.unwrap();
        assert_eq!(f.ckpt.durable("in", 0), Some(2));
        f.ckpt.leave().await;

        // A restart resumes at 2 and skips nothing else; one that saw (0, [1]) skips 1.
        let g = fixture();
        g.store
            .commit_checkpoint(
                &[],
                "ns",
                &[SourcePosition {
                    group: "g".into(),
                    topic: "in".into(),
                    partition: 0,
                    next: 0,
                    done: vec![1],
                }],
            )
            .await
            .unwrap();
        assert_eq!(g.ckpt.assign("in", 0, 0).await.unwrap(), 0);
        let tracked: Vec<Track> = (0..3).map(|o| g.ckpt.track("in", 0, o)).collect();
        assert_eq!(tracked, vec![Track::New, Track::Done, Track::New]);
    }

    #[tokio::test]
    async fn a_failed_condition_applies_and_publishes_nothing() {
        let f = fixture();
        f.ckpt.enter();
        f.ckpt.assign("in", 0, 0).await.unwrap();
        for o in 0..2 {
            f.ckpt.track("in", 0, o);
        }
        f.ckpt
            .finish("in", 0, 0, effects(vec![put("k", "a", Some(None))], "won"))
            .await
            .unwrap();
        let lost = f
            .ckpt
            .finish(
                "in",
                0,
                1,
                effects(
                    vec![put("k", "b", Some(None)), put("other", "x", None)],
                    "lost",
                ),
            )
            .await;
        assert!(matches!(lost, Err(FinishError::Conflict(k)) if k == "k"));
        f.ckpt.checkpoint().await.unwrap();
        let view = f.ckpt.view();
        assert_eq!(view.get("ns", "k").await.unwrap(), Some(b"a".to_vec()));
        assert_eq!(view.get("ns", "other").await.unwrap(), None);
        let out = f.log.read("out", 0, 0, 10).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload, b"won");
        // The lost event is not done: the position stops at it.
        assert_eq!(f.ckpt.durable("in", 0), Some(1));
        f.ckpt.leave().await;
    }

    /// A broker's transactions as far as a checkpointer can see them: sends wait in the
    /// open transaction; a commit makes them visible and tags the positions, unless the
    /// test scripted it to fail.
    #[derive(Default)]
    struct Broker {
        open: Mutex<Vec<String>>,
        visible: Mutex<Vec<String>>,
        tags: Mutex<HashMap<(String, u32), (u64, String)>>,
        fail_next_commit: std::sync::atomic::AtomicBool,
    }

    struct Txn(Arc<Broker>);

    struct Opener(Arc<Broker>);

    #[async_trait]
    impl Transactional for Opener {
        async fn transactions(
            &self,
            _id: &str,
            _group: &str,
        ) -> BackendResult<Arc<dyn Transactions>> {
            // A new producer with the same id aborts what the last one left open.
            self.0.open.lock().clear();
            Ok(Arc::new(Txn(Arc::clone(&self.0))))
        }
    }

    #[async_trait]
    impl Transactions for Txn {
        async fn send(
            &self,
            _topic: &str,
            events: Vec<NewEvent>,
        ) -> BackendResult<spate_core::EmitTicket> {
            let mut open = self.0.open.lock();
            open.extend(
                events
                    .iter()
                    .map(|e| String::from_utf8_lossy(&e.payload).into_owned()),
            );
            Ok(Box::pin(std::future::ready(Ok(Vec::new()))))
        }

        async fn commit(
            &self,
            offsets: &[(TopicPartition, u64)],
            checkpoint: &str,
        ) -> BackendResult<()> {
            let sent = std::mem::take(&mut *self.0.open.lock());
            if self
                .0
                .fail_next_commit
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(BackendError::Unavailable("fenced".into()));
            }
            self.0.visible.lock().extend(sent);
            let mut tags = self.0.tags.lock();
            for (tp, next) in offsets {
                tags.insert(
                    (tp.topic.clone(), tp.partition),
                    (*next, checkpoint.to_owned()),
                );
            }
            Ok(())
        }

        async fn committed_checkpoint(&self, tp: &TopicPartition) -> BackendResult<Option<String>> {
            let tags = self.0.tags.lock();
            Ok(tags
                .get(&(tp.topic.clone(), tp.partition))
                .map(|(_, t)| t.clone()))
        }

        async fn abort(&self) -> BackendResult<()> {
            self.0.open.lock().clear();
            Ok(())
        }
    }

    fn exactly_once(f: &Fixture, broker: &Arc<Broker>) -> Arc<Checkpointer> {
        Checkpointer::exactly_once(
            "g",
            "ns",
            f.store.clone(),
            Arc::new(MokaCache::new(1 << 20)),
            f.log.clone(),
            CheckpointConfig {
                interval: Duration::from_secs(3600),
                ..CheckpointConfig::default()
            },
            Arc::new(Opener(Arc::clone(broker))),
            "g.node",
        )
    }

    /// Exactly-once: emits are visible only once their checkpoint's transaction commits;
    /// a transaction that fails fails the checkpointer and takes its state back, and the
    /// next checkpointer resumes from the last committed checkpoint, so state, positions
    /// and visible emits agree and nothing is published twice.
    #[tokio::test]
    async fn a_failed_transaction_takes_its_checkpoint_back() {
        let f = fixture();
        let broker = Arc::new(Broker::default());
        let ckpt = exactly_once(&f, &broker);
        ckpt.enter();
        assert!(ckpt.transactional());
        assert_eq!(ckpt.assign("in", 0, 0).await.unwrap(), 0);
        assert_eq!(ckpt.track("in", 0, 0), Track::New);
        ckpt.finish("in", 0, 0, effects(vec![put("k", "v1", None)], "e1"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            broker.visible.lock().is_empty(),
            "visible before its commit"
        );
        ckpt.checkpoint().await.unwrap();
        assert_eq!(*broker.visible.lock(), ["e1"]);
        assert_eq!(f.store.pending_checkpoint("ns").await.unwrap(), None);

        assert_eq!(ckpt.track("in", 0, 1), Track::New);
        ckpt.finish("in", 0, 1, effects(vec![put("k", "v2", None)], "e2"))
            .await
            .unwrap();
        broker
            .fail_next_commit
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(ckpt.checkpoint().await.is_err());
        assert!(ckpt.failed().is_cancelled());
        assert!(
            ckpt.finish("in", 0, 2, effects(vec![], "e3"))
                .await
                .is_err(),
            "a failed checkpointer applies nothing more"
        );
        ckpt.leave().await;
        assert_eq!(*broker.visible.lock(), ["e1"]);
        assert_eq!(f.store.get("ns", "k").await.unwrap(), Some(b"v1".to_vec()));
        let at = f.store.source_position("ns", "g", "in", 0).await.unwrap();
        assert_eq!(at.map(|p| p.next), Some(1));

        // The plugin restarts over a new checkpointer: it redoes offset 1, once.
        let ckpt = exactly_once(&f, &broker);
        ckpt.enter();
        assert_eq!(ckpt.assign("in", 0, 0).await.unwrap(), 1);
        assert_eq!(ckpt.track("in", 0, 0), Track::Seen);
        assert_eq!(ckpt.track("in", 0, 1), Track::New);
        ckpt.finish("in", 0, 1, effects(vec![put("k", "v2", None)], "e2"))
            .await
            .unwrap();
        ckpt.checkpoint().await.unwrap();
        assert_eq!(*broker.visible.lock(), ["e1", "e2"]);
        assert_eq!(f.store.get("ns", "k").await.unwrap(), Some(b"v2".to_vec()));
        ckpt.leave().await;
    }

    /// A crash between the store's prepared checkpoint and the end of its transaction:
    /// the next checkpointer keeps it if the broker shows its id committed, else undoes it.
    #[tokio::test]
    async fn a_checkpoint_left_pending_is_kept_only_if_its_transaction_committed() {
        for committed in [true, false] {
            let f = fixture();
            let broker = Arc::new(Broker::default());
            let positions = vec![SourcePosition {
                group: "g".into(),
                topic: "in".into(),
                partition: 0,
                next: 5,
                done: vec![7],
            }];
            f.store
                .prepare_checkpoint(
                    &[("ns".into(), vec![put("k", "v", None)])],
                    "ns",
                    &positions,
                )
                .await
                .unwrap();
            let tag = if committed {
                checkpoint_id(&positions)
            } else {
                "an-older-checkpoint".into()
            };
            broker.tags.lock().insert(("in".into(), 0), (5, tag));
            let ckpt = exactly_once(&f, &broker);
            let from = ckpt.assign("in", 0, 0).await.unwrap();
            let k = f.store.get("ns", "k").await.unwrap();
            if committed {
                assert_eq!((from, k), (5, Some(b"v".to_vec())));
                assert_eq!(ckpt.track("in", 0, 7), Track::Done);
            } else {
                assert_eq!((from, k), (0, None));
            }
            assert_eq!(f.store.pending_checkpoint("ns").await.unwrap(), None);
        }
    }
}
