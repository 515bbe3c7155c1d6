//! The embedded event log: topics split into partitions, events at offsets, consumer-group
//! positions and emit idempotency ids, all in one `redb` file (`<dir>/log.redb`).
//!
//! It is the event source and the emit target of `spate up` on one machine. It does not
//! balance partitions between consumers (every subscription of a group is assigned every
//! partition of its topics).
//!
//! Retention ([`RetentionConfig`]): a maintenance thread deletes each partition's oldest
//! events by age and by size, never at or past the lowest position any consumer group has
//! committed on it, and compacts the file once enough was deleted. Idempotency ids are
//! kept for good (dedupe does not depend on the event still being there), so a replayed
//! emit of a deleted event still lands once.
//!
//! Writes (appends, topic creation, position commits) go through one group-commit writer,
//! so an `append` returns once durable and concurrent appends share one fsync. End offsets
//! live in memory, published after each commit together with a per-topic `watch` that
//! wakes subscriptions.
//!
//! Here: the log's settings, its tables, opening and retention, and [`EventBus`]. By job:
//! `record.rs` (how an event is stored and read back), `writer.rs` (the group-commit
//! writer's operations), `subscription.rs` (the log as [`EventSource`]).

mod record;
mod subscription;
mod writer;

use crate::storage::group_commit::{Batcher, GroupWriter};
use crate::storage::{DEFAULT_CACHE_BYTES, blocking, now_ms, redb_error};
use crate::storage::{SharedDb, StorageHealth};
use crate::types::{Appended, Event, Header, NewEvent, TopicPartition, headers, partition_for_key};
use crate::{
    BackendError, BackendResult, EmitTicket, EventBus, EventSource, SourceMessage, StartPosition,
    Subscription,
};
use async_trait::async_trait;
use record::FetchRange;
use record::encode_record;
use record::read_ranges;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;
use writer::LogOp;
use writer::LogOut;
use writer::LogWriter;
use writer::Prepared;
use writer::WriterTopic;

/// topic -> partition count.
const TOPICS: TableDefinition<&str, u32> = TableDefinition::new("topics");
/// (topic, partition, offset) -> encoded record (see [`encode_record`]).
const EVENTS: TableDefinition<(&str, u32, u64), &[u8]> = TableDefinition::new("events");
/// (topic, idempotency id) -> (partition, offset) of the event first appended with it.
const IDEMPOTENCY: TableDefinition<(&str, &[u8]), (u32, u64)> = TableDefinition::new("idempotency");
/// (group, topic, partition) -> next offset to handle.
const POSITIONS: TableDefinition<(&str, &str, u32), u64> = TableDefinition::new("positions");
/// (topic, partition) -> (first offset kept, bytes of the records kept).
const STATS: TableDefinition<(&str, u32), (u64, u64)> = TableDefinition::new("partition_stats");

/// Version byte leading every stored record.
const RECORD_V1: u8 = 1;
/// Longest topic name (Kafka's limit, so names stay portable to cluster mode).
const MAX_TOPIC_NAME: usize = 249;

/// Settings of the embedded log.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Partitions given to a topic created implicitly by `append` or `subscribe`.
    /// Default 4.
    pub default_partitions: u32,
    /// Create a missing topic on `append`/`subscribe` (with `default_partitions`) instead
    /// of failing with [`BackendError::UnknownTopic`]. Default true.
    pub auto_create_topics: bool,
    /// Most events in one [`SourceMessage::Events`]. Default 512.
    pub max_fetch_events: usize,
    /// Most bytes (keys, payloads, headers) in one [`SourceMessage::Events`]; a single
    /// larger event is still delivered alone. Default 16 MiB.
    pub max_fetch_bytes: usize,
    /// Most write requests committed in one transaction. Default 1024.
    pub max_group_commit: usize,
    /// Most memory `redb` uses to cache the file's pages. Default 256 MiB.
    pub cache_bytes: usize,
    /// What old events are deleted, and when. Default: none.
    pub retention: RetentionConfig,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            default_partitions: 4,
            auto_create_topics: true,
            max_fetch_events: 512,
            max_fetch_bytes: 16 << 20,
            max_group_commit: 1024,
            cache_bytes: DEFAULT_CACHE_BYTES,
            retention: RetentionConfig::default(),
        }
    }
}

/// How long, or how much, of a topic the log keeps. Whatever a consumer group has not
/// committed yet is kept regardless.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TopicRetention {
    /// Delete events older than this (by their append time). `None`: no age limit.
    pub max_age: Option<Duration>,
    /// Delete a partition's oldest events while its records take more bytes than this.
    /// `None`: no size limit.
    pub max_partition_bytes: Option<u64>,
}

impl TopicRetention {
    fn is_unlimited(&self) -> bool {
        self.max_age.is_none() && self.max_partition_bytes.is_none()
    }
}

/// Retention of the embedded log.
#[derive(Clone, Debug)]
pub struct RetentionConfig {
    /// Retention of every topic not named in `topics`. Default: keep everything.
    pub default: TopicRetention,
    /// Per-topic retention, replacing `default` for that topic.
    pub topics: HashMap<String, TopicRetention>,
    /// How often the maintenance thread looks for events to delete. Default 60 s.
    pub interval: Duration,
    /// Compact the file (give freed pages back to the filesystem) once retention deleted
    /// at least this many bytes since the last compaction and the file has that much
    /// free. Writers wait while it runs. Default 64 MiB.
    pub compact_min_bytes: u64,
    /// Most events deleted in one write transaction, so writers are never held up long.
    /// Default 20,000.
    pub max_deletes_per_commit: usize,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            default: TopicRetention::default(),
            topics: HashMap::new(),
            interval: Duration::from_secs(60),
            compact_min_bytes: 64 << 20,
            max_deletes_per_commit: 20_000,
        }
    }
}

impl RetentionConfig {
    /// The retention of `topic`.
    pub fn of(&self, topic: &str) -> TopicRetention {
        self.topics.get(topic).copied().unwrap_or(self.default)
    }
}

/// What one retention pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Events deleted.
    pub deleted_events: u64,
    /// Bytes of the records deleted.
    pub deleted_bytes: u64,
    /// Bytes the file shrank by compaction (0 if it did not compact).
    pub compacted_bytes: u64,
}

/// What the log holds of one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicUsage {
    /// Topic name.
    pub topic: String,
    /// Events kept (all partitions).
    pub events: u64,
    /// Bytes of the records kept (all partitions).
    pub bytes: u64,
}

/// The durable embedded event log; see the [module docs](self).
pub struct EmbeddedLog {
    inner: Arc<Inner>,
    maintenance: Option<Maintenance>,
}

struct Inner {
    db: Arc<SharedDb>,
    topics: Arc<TopicMap>,
    config: LogConfig,
    writer: GroupWriter<LogWriter>,
}

type TopicMap = RwLock<HashMap<String, Arc<Topic>>>;

/// Published state of one topic: what readers may see.
struct Topic {
    ends: Vec<AtomicU64>,
    /// First offset kept per partition (retention moves it).
    starts: Vec<AtomicU64>,
    /// Bytes of the records kept per partition.
    bytes: Vec<AtomicU64>,
    /// Bumped after every commit that appended to the topic.
    changed: watch::Sender<u64>,
}

impl Topic {
    fn new(state: &WriterTopic) -> Self {
        let atomics = |v: &[u64]| v.iter().map(|&e| AtomicU64::new(e)).collect();
        Self {
            ends: atomics(&state.ends),
            starts: atomics(&state.starts),
            bytes: atomics(&state.bytes),
            changed: watch::Sender::new(0),
        }
    }

    fn publish(&self, state: &WriterTopic) {
        for (slots, values) in [
            (&self.starts, &state.starts),
            (&self.bytes, &state.bytes),
            (&self.ends, &state.ends),
        ] {
            for (slot, &v) in slots.iter().zip(values) {
                slot.store(v, Ordering::Release);
            }
        }
    }

    fn start(&self, partition: u32) -> u64 {
        self.starts
            .get(partition as usize)
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    fn partitions(&self) -> u32 {
        u32::try_from(self.ends.len()).unwrap_or(u32::MAX)
    }

    fn end(&self, partition: u32) -> u64 {
        self.ends
            .get(partition as usize)
            .map_or(0, |e| e.load(Ordering::Acquire))
    }
}

impl EmbeddedLog {
    /// Opens the log in `dir` (creating `dir/log.redb` if needed) and starts its writer
    /// thread. Blocks while the file is opened and end offsets are loaded.
    pub fn open(dir: &Path, config: LogConfig) -> BackendResult<Arc<Self>> {
        if config.default_partitions == 0 {
            return Err(BackendError::Invalid(
                "default_partitions must be at least 1".into(),
            ));
        }
        if config.max_fetch_events == 0 || config.max_group_commit == 0 {
            return Err(BackendError::Invalid(
                "max_fetch_events and max_group_commit must be at least 1".into(),
            ));
        }
        let db = SharedDb::open("log", &dir.join("log.redb"), config.cache_bytes)?;
        let known = load(&*db.get()?)?;
        let topics: Arc<TopicMap> = Arc::new(RwLock::new(
            known
                .iter()
                .map(|(name, t)| (name.clone(), Arc::new(Topic::new(t))))
                .collect(),
        ));
        let batcher = LogWriter {
            topics: topics.clone(),
            known,
            config: config.clone(),
        };
        let writer = GroupWriter::spawn(
            "spate-log-writer",
            db.clone(),
            batcher,
            config.max_group_commit,
        )?;
        let inner = Arc::new(Inner {
            db,
            topics,
            config,
            writer,
        });
        let maintenance = Maintenance::start(&inner)?;
        Ok(Arc::new(Self { inner, maintenance }))
    }

    /// Whether the file takes writes, and its size on disk.
    pub fn health(&self) -> Arc<StorageHealth> {
        self.inner.db.health().clone()
    }

    /// Every topic with its partition count, sorted by name.
    pub fn topics(&self) -> Vec<(String, u32)> {
        let map = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = map
            .iter()
            .map(|(name, t)| (name.clone(), t.partitions()))
            .collect();
        out.sort();
        out
    }

    /// Events and bytes kept per topic, sorted by name.
    pub fn usage(&self) -> Vec<TopicUsage> {
        let map = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = map
            .iter()
            .map(|(name, t)| TopicUsage {
                topic: name.clone(),
                events: (0..t.partitions())
                    .map(|p| t.end(p).saturating_sub(t.start(p)))
                    .sum(),
                bytes: t.bytes.iter().map(|b| b.load(Ordering::Acquire)).sum(),
            })
            .collect();
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// First offset kept of each partition of `topic`.
    pub fn start_offsets(&self, topic: &str) -> BackendResult<Vec<u64>> {
        let t = self.inner.known_topic(topic)?;
        Ok((0..t.partitions()).map(|p| t.start(p)).collect())
    }

    /// Runs one retention pass now, as of `now_ms` (wall-clock milliseconds): deletes
    /// what the retention settings allow, then compacts the file if that freed enough.
    /// The maintenance thread does this every `retention.interval`.
    pub async fn enforce_retention(&self, now_ms: u64) -> BackendResult<RetentionReport> {
        let inner = self.inner.clone();
        blocking(move || inner.enforce_retention(now_ms, &mut 0)).await
    }

    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.inner.writer.commits()
    }
}

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        if let Some(m) = self.maintenance.take() {
            m.stop();
        }
    }
}

/// The retention thread: wakes every `retention.interval` until stopped.
struct Maintenance {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl Maintenance {
    fn start(inner: &Arc<Inner>) -> BackendResult<Option<Self>> {
        let retention = &inner.config.retention;
        if retention.default.is_unlimited()
            && retention.topics.values().all(TopicRetention::is_unlimited)
        {
            return Ok(None);
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let weak: Weak<Inner> = Arc::downgrade(inner);
        let interval = retention.interval.max(Duration::from_millis(10));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("spate-log-retention".into())
            .spawn(move || {
                // Bytes deleted since the last compaction.
                let mut freed = 0u64;
                loop {
                    let (lock, wake) = &*signal;
                    let stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                    let (stopped, _) = wake
                        .wait_timeout_while(stopped, interval, |s| !*s)
                        .unwrap_or_else(|e| e.into_inner());
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = inner.enforce_retention(now_ms(), &mut freed) {
                        tracing::warn!(error = %e, "log retention failed; trying again later");
                    }
                }
            })
            .map_err(|e| BackendError::Unavailable(format!("cannot start log retention: {e}")))?;
        Ok(Some(Self { stop, thread }))
    }

    fn stop(self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
        if self.thread.join().is_err() {
            tracing::error!("log retention thread panicked");
        }
    }
}

impl Inner {
    /// One retention pass; `freed` carries bytes deleted since the last compaction.
    fn enforce_retention(&self, now: u64, freed: &mut u64) -> BackendResult<RetentionReport> {
        let mut report = RetentionReport::default();
        loop {
            let op = LogOp::Retain { now_ms: now };
            let LogOut::Retained {
                events,
                bytes,
                more,
            } = self.writer.call_blocking(op)?
            else {
                return Err(unexpected_reply());
            };
            report.deleted_events += events;
            report.deleted_bytes += bytes;
            *freed += bytes;
            if !more {
                break;
            }
        }
        let min = self.config.retention.compact_min_bytes;
        if *freed >= min.max(1) {
            let health = self.db.health().clone();
            let compacted = self
                .writer
                .exclusive_blocking(move |db| compact_if_worth_it(db, &health, min))?;
            *freed = 0;
            report.compacted_bytes = compacted;
        }
        Ok(report)
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn known_topic(&self, name: &str) -> BackendResult<Arc<Topic>> {
        self.topic(name)
            .ok_or_else(|| BackendError::UnknownTopic(name.to_owned()))
    }
}

/// Compacts the file if at least `min` bytes of it are free pages; the bytes it shrank.
fn compact_if_worth_it(db: &mut Database, health: &StorageHealth, min: u64) -> BackendResult<u64> {
    let allocated = {
        let txn = db.begin_write().map_err(redb_error)?;
        let stats = txn.stats().map_err(redb_error)?;
        txn.abort().map_err(redb_error)?;
        stats.allocated_pages() * stats.page_size() as u64
    };
    let before = health.file_bytes();
    if before.saturating_sub(allocated) < min {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    db.compact().map_err(|e| redb_error(redb::Error::from(e)))?;
    let after = health.file_bytes();
    metrics::counter!(crate::metric_names::STORAGE_COMPACTIONS_TOTAL, "file" => health.name())
        .increment(1);
    tracing::info!(file = %health.path().display(), before, after,
        ms = started.elapsed().as_millis() as u64, "compacted the event log");
    Ok(before.saturating_sub(after))
}

/// Creates the tables of a new file and reads each topic's partitions: end offsets, and
/// first offsets and bytes kept (computed once for a file written before they were kept).
fn load(db: &Database) -> BackendResult<HashMap<String, WriterTopic>> {
    let txn = db.begin_write().map_err(redb_error)?;
    for result in [
        txn.open_table(TOPICS).map(drop),
        txn.open_table(EVENTS).map(drop),
        txn.open_table(IDEMPOTENCY).map(drop),
        txn.open_table(POSITIONS).map(drop),
        txn.open_table(STATS).map(drop),
    ] {
        result.map_err(redb_error)?;
    }
    txn.commit().map_err(redb_error)?;

    let txn = db.begin_read().map_err(redb_error)?;
    let topics = txn.open_table(TOPICS).map_err(redb_error)?;
    let events = txn.open_table(EVENTS).map_err(redb_error)?;
    let stats = txn.open_table(STATS).map_err(redb_error)?;
    let mut known = HashMap::new();
    let mut missing = Vec::new();
    for entry in topics.iter().map_err(redb_error)? {
        let (name, partitions) = entry.map_err(redb_error)?;
        let name = name.value().to_owned();
        let mut state = WriterTopic::empty(0);
        for p in 0..partitions.value() {
            let range = (name.as_str(), p, 0)..=(name.as_str(), p, u64::MAX);
            let last = events
                .range(range.clone())
                .map_err(redb_error)?
                .next_back()
                .transpose()
                .map_err(redb_error)?;
            let end = last.map_or(0, |(k, _)| k.value().2 + 1);
            let (start, bytes) = match stats.get((name.as_str(), p)).map_err(redb_error)? {
                Some(g) => g.value(),
                None => {
                    let mut start = end;
                    let mut bytes = 0u64;
                    for row in events.range(range).map_err(redb_error)? {
                        let (k, v) = row.map_err(redb_error)?;
                        start = start.min(k.value().2);
                        bytes += v.value().len() as u64;
                    }
                    missing.push((name.clone(), p, (start, bytes)));
                    (start, bytes)
                }
            };
            state.ends.push(end);
            state.starts.push(start);
            state.bytes.push(bytes);
        }
        known.insert(name, state);
    }
    drop((topics, events, stats, txn));
    if !missing.is_empty() {
        let txn = db.begin_write().map_err(redb_error)?;
        {
            let mut stats = txn.open_table(STATS).map_err(redb_error)?;
            for (name, p, value) in &missing {
                stats
                    .insert((name.as_str(), *p), value)
                    .map_err(redb_error)?;
            }
        }
        txn.commit().map_err(redb_error)?;
    }
    Ok(known)
}

/// The lowest committed position of any group on each (topic, partition).
fn lowest_positions(txn: &WriteTransaction) -> Result<HashMap<(String, u32), u64>, redb::Error> {
    let positions = txn.open_table(POSITIONS)?;
    let mut out: HashMap<(String, u32), u64> = HashMap::new();
    for row in positions.iter()? {
        let (k, v) = row?;
        let (_, topic, p) = k.value();
        let slot = out.entry((topic.to_owned(), p)).or_insert(u64::MAX);
        *slot = (*slot).min(v.value());
    }
    Ok(out)
}

/// Timestamp of an encoded record (0 if it is too short to have one).
fn record_timestamp(record: &[u8]) -> i64 {
    record
        .get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, i64::from_le_bytes)
}

fn validate_topic(name: &str) -> BackendResult<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BackendError::Invalid(format!(
            "topic name `{name}` must be 1 to {MAX_TOPIC_NAME} characters of A-Z, a-z, 0-9, `.`, `_` and `-`"
        )))
    }
}

fn validate_partitions(partitions: u32) -> BackendResult<()> {
    if partitions == 0 {
        return Err(BackendError::Invalid(
            "a topic needs at least 1 partition".into(),
        ));
    }
    Ok(())
}

fn unexpected_reply() -> BackendError {
    BackendError::Unavailable("event log writer gave an unexpected reply".into())
}

#[async_trait]
impl EventBus for EmbeddedLog {
    async fn append(&self, topic: &str, events: Vec<NewEvent>) -> BackendResult<Vec<Appended>> {
        self.send(topic, events).await?.await
    }

    async fn send(&self, topic: &str, events: Vec<NewEvent>) -> BackendResult<EmitTicket> {
        validate_topic(topic)?;
        if !self.inner.config.auto_create_topics {
            self.inner.known_topic(topic)?;
        }
        if events.is_empty() {
            return Ok(Box::pin(std::future::ready(Ok(Vec::new()))));
        }
        let timestamp_ms = i64::try_from(now_ms()).unwrap_or(i64::MAX);
        let mut prepared = Vec::with_capacity(events.len());
        for event in events {
            let record = encode_record(&event, timestamp_ms)?;
            let idempotency_id = event
                .headers
                .iter()
                .find(|h| h.name == headers::IDEMPOTENCY_ID)
                .map(|h| h.value.clone());
            prepared.push(Prepared {
                key: event.key,
                idempotency_id,
                record,
            });
        }
        let op = LogOp::Append {
            topic: topic.to_owned(),
            events: prepared,
        };
        let answer = self.inner.writer.submit(op).await?;
        Ok(Box::pin(async move {
            match answer.await? {
                LogOut::Appended(appended) => Ok(appended),
                _ => Err(unexpected_reply()),
            }
        }))
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> BackendResult<Vec<Event>> {
        let t = self.inner.known_topic(topic)?;
        if partition >= t.partitions() {
            return Err(BackendError::Invalid(format!(
                "topic `{topic}` has no partition {partition} (it has {})",
                t.partitions()
            )));
        }
        // Retention may have deleted the beginning: read from the first event kept.
        let from = from.max(t.start(partition));
        let to = t
            .end(partition)
            .min(from.saturating_add(u64::try_from(max).unwrap_or(u64::MAX)));
        if from >= to {
            return Ok(Vec::new());
        }
        let range = FetchRange {
            topic: topic.to_owned(),
            partition,
            from,
            to,
        };
        let db = self.inner.db.clone();
        blocking(move || read_ranges(&*db.get()?, &[range], usize::MAX).map(|(events, _)| events))
            .await
    }

    async fn partitions(&self, topic: &str) -> BackendResult<Option<u32>> {
        Ok(self.inner.topic(topic).map(|t| t.partitions()))
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> BackendResult<u32> {
        if let Some(t) = self.inner.topic(topic) {
            return Ok(t.partitions());
        }
        validate_topic(topic)?;
        validate_partitions(partitions)?;
        let op = LogOp::EnsureTopic {
            topic: topic.to_owned(),
            partitions,
        };
        match self.inner.writer.call(op).await? {
            LogOut::Partitions(n) => Ok(n),
            _ => Err(unexpected_reply()),
        }
    }

    async fn end_offsets(&self, topic: &str) -> BackendResult<Vec<u64>> {
        let t = self.inner.known_topic(topic)?;
        Ok((0..t.partitions()).map(|p| t.end(p)).collect())
    }
}

#[cfg(test)]
mod tests;
