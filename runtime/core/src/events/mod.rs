//! The events seam: where events come from ([`EventSource`], [`Subscription`]), where emits
//! and dead letters go ([`EventBus`], [`Transactional`]), how runtimes announce registry
//! changes ([`ChangeFeed`]), and the embedded log that implements them on one machine
//! ([`EmbeddedLog`], configured by [`LogSettings`]). The Kafka implementation is the
//! `spate-kafka` crate.

pub mod log;
mod settings;

pub use log::{
    EmbeddedLog, LogConfig, RetentionConfig, RetentionReport, TopicRetention, TopicUsage,
};
pub use settings::{LogSettings, RetentionSettings, TopicRetentionOverride};

use crate::error::{BackendError, BackendResult};
use crate::types::{Appended, Event, NewEvent, TopicPartition};
use async_trait::async_trait;
use std::sync::Arc;

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
/// written by the events it covers (see [`StateStore::commit_checkpoint`](crate::StateStore::commit_checkpoint)).
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
