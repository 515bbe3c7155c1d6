//! The seams between the runtime and the services it talks to.
//!
//! Each trait has one embedded implementation in [`crate::embedded`] and one cluster
//! implementation in its own crate (Kafka, ScyllaDB/Cassandra, Redis). Backends know
//! nothing of plugins: namespaces, prefixes and capability checks are applied by the
//! host layer ([`crate::host`]) before a backend is touched.

use crate::types::{Appended, Event, NewEvent, TopicPartition};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// A failure of a backing service. Never shown to a guest: the host aborts the call and
/// the dispatcher retries the event without counting it against the plugin's retry limit.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The service could not be reached or did not answer in time; retrying may help.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The request was refused as invalid (bad topic name, value too large, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A topic that does not exist and will not be created.
    #[error("unknown topic `{0}`")]
    UnknownTopic(String),
    /// Stored data could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

impl BackendError {
    /// An [`BackendError::Unavailable`] from any displayable error.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// Result type of backend calls.
pub type BackendResult<T> = Result<T, BackendError>;

/// Where a new consumer group starts reading a topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartPosition {
    /// From the first retained event.
    #[default]
    Earliest,
    /// Only events appended after the group first subscribed.
    Latest,
}

/// Appends events to topics and reads them back: where emits and dead letters go, and
/// what the HTTP API's `events` routes use.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Append `events` to `topic` (partitioned by key hash). All or none are appended; the
    /// call returns once they are durable.
    async fn append(&self, topic: &str, events: Vec<NewEvent>) -> BackendResult<Vec<Appended>>;

    /// Up to `max` events of one partition starting at `from`, in offset order.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> BackendResult<Vec<Event>>;

    /// Number of partitions of `topic`, or `None` if it does not exist.
    async fn partitions(&self, topic: &str) -> BackendResult<Option<u32>>;

    /// Create `topic` with `partitions` partitions if it does not exist; returns its
    /// partition count either way.
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> BackendResult<u32>;

    /// The next offset to be written in each partition of `topic` (its end).
    async fn end_offsets(&self, topic: &str) -> BackendResult<Vec<u64>>;

    /// Queue `events` for `topic` and return once they are queued (in call order with
    /// earlier sends), without waiting for them to be durable: the ticket resolves when
    /// they are. What the dispatcher uses to publish emits without a round trip per
    /// event. The default appends and hands back the answer.
    async fn send(&self, topic: &str, events: Vec<NewEvent>) -> BackendResult<EmitTicket> {
        let appended = self.append(topic, events).await;
        Ok(Box::pin(std::future::ready(appended)))
    }
}

/// Resolves once events queued by [`EventBus::send`] are durable (or failed).
pub type EmitTicket = futures::future::BoxFuture<'static, BackendResult<Vec<Appended>>>;

/// Opens [`Transactions`] on a bus that has them (Kafka). Kept apart from [`EventBus`] so
/// a bus without transactions says nothing about them.
#[async_trait]
pub trait Transactional: Send + Sync + 'static {
    /// A transactional producer for consumer group `group`, identified by `id` across
    /// restarts: opening it fences a previous producer with the same id and aborts the
    /// transaction that one left open, so what a crashed process sent never becomes
    /// visible.
    async fn transactions(&self, id: &str, group: &str) -> BackendResult<Arc<dyn Transactions>>;
}

/// A producer whose sends become visible all together, with the consumer positions that
/// cover them, or not at all (Kafka transactions, KIP-447 fencing by group generation).
#[async_trait]
pub trait Transactions: Send + Sync + 'static {
    /// Queue `events` for `topic` in the open transaction (begun by the first send after a
    /// commit or an abort), in call order; the ticket resolves when the broker has them.
    async fn send(&self, topic: &str, events: Vec<NewEvent>) -> BackendResult<EmitTicket>;

    /// Commit every event sent since the last commit or abort, together with `offsets`
    /// (next offset to read, per partition) as the group's committed positions, each
    /// tagged with `checkpoint` (see [`Transactions::committed_checkpoint`]). Fails if
    /// this member no longer holds its assignment (fenced), in which case nothing sent is
    /// visible and the transaction has been aborted.
    async fn commit(
        &self,
        offsets: &[(TopicPartition, u64)],
        checkpoint: &str,
    ) -> BackendResult<()>;

    /// The tag the group's committed position of `tp` was committed with, if any: whether
    /// a transaction whose outcome a crash hid did commit.
    async fn committed_checkpoint(&self, tp: &TopicPartition) -> BackendResult<Option<String>>;

    /// Drop everything sent since the last commit.
    async fn abort(&self) -> BackendResult<()>;
}

/// How far a consumer group got in one source partition, as recorded with the state
/// written by the events it covers (see [`StateStore::commit_checkpoint`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePosition {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Every event below this offset is done.
    pub next: u64,
    /// Offsets at or above `next` that are done too (events of other keys finish
    /// out of order): a replay skips them.
    pub done: Vec<u64>,
}

impl SourcePosition {
    /// As stored: `next`, then each of `done`, as u64 little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * (1 + self.done.len()));
        out.extend_from_slice(&self.next.to_le_bytes());
        for o in &self.done {
            out.extend_from_slice(&o.to_le_bytes());
        }
        out
    }

    /// The position [`SourcePosition::encode`] stored for one partition.
    pub fn decode(group: &str, topic: &str, partition: u32, bytes: &[u8]) -> BackendResult<Self> {
        if bytes.len() < 8 || !bytes.len().is_multiple_of(8) {
            return Err(BackendError::Corrupt("malformed source position".into()));
        }
        let mut words = bytes.chunks_exact(8).map(|c| {
            let mut w = [0; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        });
        Ok(Self {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
            next: words.next().unwrap_or(0),
            done: words.collect(),
        })
    }
}

/// What a subscription yields to the dispatcher.
#[derive(Debug)]
pub enum SourceMessage {
    /// Events of one or more assigned partitions, each partition's in offset order.
    Events(Vec<Event>),
    /// Partitions now assigned to this consumer, with the offset reading resumes at.
    Assigned(Vec<(TopicPartition, u64)>),
    /// Partitions taken away: stop handling them and commit what is done.
    Revoked(Vec<TopicPartition>),
}

/// A consumer group's live subscription to a set of topics.
#[async_trait]
pub trait Subscription: Send + 'static {
    /// The next message; waits until there is one.
    async fn next(&mut self) -> BackendResult<SourceMessage>;

    /// Record that every event below `next_offset` of each partition is done.
    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> BackendResult<()>;

    /// Like [`Subscription::next`] but never yields events: what the dispatcher awaits
    /// while its buffer is full, so it still hears of partitions being revoked. Sources
    /// whose partitions never move wait forever (the default).
    async fn next_control(&mut self) -> BackendResult<SourceMessage> {
        std::future::pending().await
    }

    /// The dispatcher is done with `revoked` partitions (announced by
    /// [`SourceMessage::Revoked`]): `offsets` are their final positions, to be committed
    /// before the partitions are handed to another consumer.
    async fn release(
        &mut self,
        _revoked: &[TopicPartition],
        offsets: &[(TopicPartition, u64)],
    ) -> BackendResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.commit(offsets).await
    }

    /// Leave the group, after the final commit. Dropping without closing leaves it too,
    /// but without waiting.
    async fn close(&mut self) {}

    /// Whether this member has joined its group (been given its partitions, maybe none).
    /// Sources without groups are joined as soon as they are subscribed.
    fn joined(&self) -> bool {
        true
    }

    /// Stop fetching `partition` (its lanes are full) until resumed.
    fn pause(&mut self, _partition: &TopicPartition) {}

    /// Resume fetching a paused partition.
    fn resume(&mut self, _partition: &TopicPartition) {}
}

/// Subscribes consumer groups to topics.
#[async_trait]
pub trait EventSource: Send + Sync + 'static {
    /// Join `group` on `topics`. A group with no committed position starts at `start`.
    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
        start: StartPosition,
    ) -> BackendResult<Box<dyn Subscription>>;

    /// Committed positions (next offset to handle) of `group` on each partition of `topic`.
    async fn committed(&self, group: &str, topic: &str) -> BackendResult<Vec<Option<u64>>>;
}

/// One write of a state journal, applied atomically with the rest of its batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateWrite {
    /// Key within the namespace.
    pub key: String,
    /// New value; `None` deletes the key.
    pub value: Option<Vec<u8>>,
    /// Expiry of the new value.
    pub ttl: Option<Duration>,
    /// `Some(expected)`: apply only if the stored value (`None` = absent) still equals
    /// `expected`, otherwise the whole batch is refused with [`ApplyOutcome::Conflict`].
    pub condition: Option<Option<Vec<u8>>>,
}

/// The result of applying a batch of state writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Every write was applied.
    Applied,
    /// A condition did not hold; nothing was applied.
    Conflict {
        /// The key whose condition failed.
        key: String,
    },
}

/// How long a stored value has left to live, as far as its store can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Written without a TTL.
    Never,
    /// Expires after about this long.
    In(Duration),
    /// The store does not report expiry.
    Unknown,
}

/// A live value with its remaining lifetime; see [`StateStore::get_entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// When it expires.
    pub expiry: Expiry,
}

/// Durable key-value state, partitioned by namespace.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The live (unexpired) value of `key` in `namespace`.
    async fn get(&self, namespace: &str, key: &str) -> BackendResult<Option<Vec<u8>>>;

    /// [`StateStore::get`] with the value's remaining lifetime, for layers that copy values
    /// (the read-through tier must not serve a copy past the value's expiry). Stores that
    /// cannot tell report [`Expiry::Unknown`], which this default does.
    async fn get_entry(&self, namespace: &str, key: &str) -> BackendResult<Option<Entry>> {
        Ok(self.get(namespace, key).await?.map(|value| Entry {
            value,
            expiry: Expiry::Unknown,
        }))
    }

    /// Up to `limit` live entries of `namespace` whose keys start with `prefix`, in key order.
    async fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
    ) -> BackendResult<Vec<(String, Vec<u8>)>> {
        self.scan_bounded(namespace, prefix, limit, usize::MAX)
            .await
    }

    /// [`StateStore::scan`] that stops reading once the entries' keys and values add up
    /// to more than `max_bytes` (the entry crossing it is the last one returned), so a
    /// caller can bound what one scan makes it hold.
    async fn scan_bounded(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
        max_bytes: usize,
    ) -> BackendResult<Vec<(String, Vec<u8>)>>;

    /// Apply `writes` to `namespace` as one unit, checking their conditions first.
    async fn apply(&self, namespace: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome>;

    /// Whether the store can make a checkpoint durable in one unit with
    /// [`StateStore::commit_checkpoint`], so writes may wait in a view in front of it until
    /// the checkpoint. Stores that cannot (the default) get every event's writes at once.
    fn checkpoints(&self) -> bool {
        false
    }

    /// Whether other runtimes write this store too (a cluster's CQL store): a
    /// compare-and-swap must then be decided by the store, not by a view in front of it.
    fn shared(&self) -> bool {
        false
    }

    /// Make a checkpoint durable in one unit: `writes` (per namespace, unconditional)
    /// and the source `positions` they cover, kept with namespace `home` (the plugin's),
    /// so after a crash state and positions agree.
    async fn commit_checkpoint(
        &self,
        _writes: &[(String, Vec<StateWrite>)],
        _home: &str,
        _positions: &[SourcePosition],
    ) -> BackendResult<()> {
        Err(BackendError::Invalid(
            "this state store does not take checkpoints".into(),
        ))
    }

    /// Whether the store can [`StateStore::prepare_checkpoint`]: keep what a checkpoint
    /// overwrote until it is resolved, for checkpoints whose positions are committed
    /// elsewhere afterwards (a Kafka transaction).
    fn prepares(&self) -> bool {
        false
    }

    /// [`StateStore::commit_checkpoint`] that also keeps, in the same unit, what it
    /// overwrites (values and positions) as `home`'s pending checkpoint, until
    /// [`StateStore::resolve_checkpoint`] keeps or undoes it. At most one is pending per
    /// `home`; preparing another resolves the previous one as kept.
    async fn prepare_checkpoint(
        &self,
        _writes: &[(String, Vec<StateWrite>)],
        _home: &str,
        _positions: &[SourcePosition],
    ) -> BackendResult<()> {
        Err(BackendError::Invalid(
            "this state store cannot undo a checkpoint".into(),
        ))
    }

    /// The positions of `home`'s pending checkpoint, if one is pending.
    async fn pending_checkpoint(&self, _home: &str) -> BackendResult<Option<Vec<SourcePosition>>> {
        Ok(None)
    }

    /// Resolve `home`'s pending checkpoint: `keep` it (its positions were committed), or
    /// put back every value and position it overwrote. Nothing pending: nothing to do.
    async fn resolve_checkpoint(&self, _home: &str, _keep: bool) -> BackendResult<()> {
        Ok(())
    }

    /// The position last recorded by [`StateStore::commit_checkpoint`] with namespace
    /// `home` for `group` in one source partition.
    async fn source_position(
        &self,
        _home: &str,
        _group: &str,
        _topic: &str,
        _partition: u32,
    ) -> BackendResult<Option<SourcePosition>> {
        Ok(None)
    }
}

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
    /// A value that is not an integer is an [`BackendError::Invalid`].
    async fn incr(&self, key: &str, delta: i64) -> BackendResult<i64>;
}

/// How runtimes sharing a plugin registry tell each other about changes: small "plugin X
/// changed" notices (a compacted Kafka topic in a cluster); receivers re-read X's record.
#[async_trait]
pub trait ChangeFeed: Send + Sync + 'static {
    /// Announce that `plugin`'s record changed (uploaded, activated, rolled back, removed).
    async fn publish(&self, plugin: &str) -> BackendResult<()>;

    /// Names of plugins whose records change from now on (own announcements included).
    /// The feed stops when the receiver is dropped.
    async fn subscribe(&self) -> BackendResult<tokio::sync::mpsc::Receiver<String>>;
}
