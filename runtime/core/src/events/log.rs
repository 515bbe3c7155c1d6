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

use crate::storage::group_commit::{Batcher, GroupWriter};
use crate::storage::{DEFAULT_CACHE_BYTES, blocking, now_ms, redb_error};
use crate::storage::{SharedDb, StorageHealth};
use crate::types::{Appended, Event, Header, NewEvent, TopicPartition, headers, partition_for_key};
use crate::{
    BackendError, BackendResult, EmitTicket, EventBus, EventSource, SourceMessage, StartPosition,
    Subscription,
};
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

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

// ---------------------------------------------------------------------------------------
// Record encoding: version byte, timestamp, key, payload, headers; lengths as u32 LE.
// ---------------------------------------------------------------------------------------

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> BackendResult<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| BackendError::Invalid("an event field is larger than 4 GiB".into()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn encode_record(event: &NewEvent, timestamp_ms: i64) -> BackendResult<Vec<u8>> {
    let size = 1
        + 8
        + 5
        + event.key.as_ref().map_or(0, Vec::len)
        + 4
        + event.payload.len()
        + 4
        + event
            .headers
            .iter()
            .map(|h| 8 + h.name.len() + h.value.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(RECORD_V1);
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    match &event.key {
        None => out.push(0),
        Some(key) => {
            out.push(1);
            put_bytes(&mut out, key)?;
        }
    }
    put_bytes(&mut out, &event.payload)?;
    let count = u32::try_from(event.headers.len())
        .map_err(|_| BackendError::Invalid("too many headers".into()))?;
    out.extend_from_slice(&count.to_le_bytes());
    for h in &event.headers {
        put_bytes(&mut out, h.name.as_bytes())?;
        put_bytes(&mut out, &h.value)?;
    }
    Ok(out)
}

struct RecordReader<'a> {
    buf: &'a [u8],
}

impl<'a> RecordReader<'a> {
    fn take(&mut self, n: usize) -> BackendResult<&'a [u8]> {
        if self.buf.len() < n {
            return Err(BackendError::Corrupt("truncated event record".into()));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> BackendResult<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn bytes(&mut self) -> BackendResult<&'a [u8]> {
        let len = u32::from_le_bytes(self.array()?) as usize;
        self.take(len)
    }
}

fn decode_event(topic: &str, partition: u32, offset: u64, record: &[u8]) -> BackendResult<Event> {
    let mut r = RecordReader { buf: record };
    let [version] = r.array()?;
    if version != RECORD_V1 {
        return Err(BackendError::Corrupt(format!(
            "unknown event record version {version}"
        )));
    }
    let timestamp_ms = i64::from_le_bytes(r.array()?);
    let key = match r.array()? {
        [0] => None,
        [1] => Some(r.bytes()?.to_vec()),
        [flag] => {
            return Err(BackendError::Corrupt(format!(
                "bad key flag {flag} in event record"
            )));
        }
    };
    let payload = r.bytes()?.to_vec();
    let count = u32::from_le_bytes(r.array()?) as usize;
    // The count is untrusted: reserve only what the remaining bytes could hold.
    let mut headers = Vec::with_capacity(count.min(r.buf.len() / 8));
    for _ in 0..count {
        let name = std::str::from_utf8(r.bytes()?)
            .map_err(|_| BackendError::Corrupt("header name is not UTF-8".into()))?
            .to_owned();
        let value = r.bytes()?.to_vec();
        headers.push(Header { name, value });
    }
    if !r.buf.is_empty() {
        return Err(BackendError::Corrupt(
            "trailing bytes after event record".into(),
        ));
    }
    Ok(Event {
        topic: topic.to_owned(),
        partition,
        offset,
        key,
        payload,
        headers,
        timestamp_ms,
    })
}

/// A half-open offset range `[from, to)` of one partition to read.
#[derive(Clone, Debug)]
struct FetchRange {
    topic: String,
    partition: u32,
    from: u64,
    to: u64,
}

/// Reads `ranges` in one snapshot, each in offset order, in the order given, stopping
/// after the event that takes the total past `max_bytes` (so one event is always read).
/// Returns the events and whether the byte bound cut the read short.
fn read_ranges(
    db: &Database,
    ranges: &[FetchRange],
    max_bytes: usize,
) -> BackendResult<(Vec<Event>, bool)> {
    let txn = db.begin_read().map_err(redb_error)?;
    let table = txn.open_table(EVENTS).map_err(redb_error)?;
    let total: u64 = ranges.iter().map(|r| r.to.saturating_sub(r.from)).sum();
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0).min(4096));
    let mut bytes = 0usize;
    for r in ranges {
        let topic = r.topic.as_str();
        let rows = table
            .range((topic, r.partition, r.from)..(topic, r.partition, r.to))
            .map_err(redb_error)?;
        for row in rows {
            if bytes > max_bytes {
                return Ok((out, true));
            }
            let (key, value) = row.map_err(redb_error)?;
            let (_, _, offset) = key.value();
            let record = value.value();
            bytes = bytes.saturating_add(record.len());
            out.push(decode_event(topic, r.partition, offset, record)?);
        }
    }
    Ok((out, false))
}

// ---------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------

/// An event ready to store: encoded by the caller, so the writer thread only writes.
struct Prepared {
    key: Option<Vec<u8>>,
    idempotency_id: Option<Vec<u8>>,
    record: Vec<u8>,
}

enum LogOp {
    Append {
        topic: String,
        events: Vec<Prepared>,
    },
    EnsureTopic {
        topic: String,
        partitions: u32,
    },
    Commit {
        group: String,
        offsets: Vec<(TopicPartition, u64)>,
    },
    /// Resolve a group's start positions, persisting the ones it did not have.
    Join {
        group: String,
        topics: Vec<String>,
        start: StartPosition,
    },
    /// Delete what retention allows as of `now_ms`, at most
    /// `retention.max_deletes_per_commit` events.
    Retain {
        now_ms: u64,
    },
}

enum LogOut {
    Appended(Vec<Appended>),
    Partitions(u32),
    Committed,
    Joined(Vec<(TopicPartition, u64)>),
    /// Events and bytes deleted; `more` if the cap stopped it.
    Retained {
        events: u64,
        bytes: u64,
        more: bool,
    },
}

/// The writer's own view of a topic; ahead of [`Topic`] while a group is uncommitted.
#[derive(Clone)]
struct WriterTopic {
    ends: Vec<u64>,
    /// First offset kept, per partition.
    starts: Vec<u64>,
    /// Bytes of the records kept, per partition.
    bytes: Vec<u64>,
    /// Next partition for a keyless event.
    next_rr: u32,
}

impl WriterTopic {
    fn empty(partitions: u32) -> Self {
        let n = partitions as usize;
        Self {
            ends: vec![0; n],
            starts: vec![0; n],
            bytes: vec![0; n],
            next_rr: 0,
        }
    }
}

struct StagedTopic {
    state: WriterTopic,
    created: bool,
    appended: bool,
    /// Retention deleted events of it: events per partition.
    deleted: Vec<u64>,
}

#[derive(Default)]
struct Staged {
    topics: HashMap<String, StagedTopic>,
}

struct LogWriter {
    topics: Arc<TopicMap>,
    known: HashMap<String, WriterTopic>,
    config: LogConfig,
}

impl LogWriter {
    /// The topic as this group sees it so far, if it exists.
    fn stage<'s>(&self, staged: &'s mut Staged, topic: &str) -> Option<&'s mut StagedTopic> {
        if !staged.topics.contains_key(topic) {
            let state = self.known.get(topic)?.clone();
            staged.topics.insert(
                topic.to_owned(),
                StagedTopic {
                    deleted: vec![0; state.ends.len()],
                    state,
                    created: false,
                    appended: false,
                },
            );
        }
        staged.topics.get_mut(topic)
    }

    fn exists(&self, staged: &Staged, topic: &str) -> bool {
        staged.topics.contains_key(topic) || self.known.contains_key(topic)
    }

    fn create(
        txn: &WriteTransaction,
        staged: &mut Staged,
        topic: &str,
        partitions: u32,
    ) -> Result<(), redb::Error> {
        txn.open_table(TOPICS)?.insert(topic, partitions)?;
        staged.topics.insert(
            topic.to_owned(),
            StagedTopic {
                state: WriterTopic::empty(partitions),
                created: true,
                appended: false,
                deleted: vec![0; partitions as usize],
            },
        );
        Ok(())
    }

    fn append(
        &self,
        txn: &WriteTransaction,
        staged: &mut Staged,
        topic: &str,
        events: &[Prepared],
    ) -> Result<BackendResult<LogOut>, redb::Error> {
        if !self.exists(staged, topic) {
            if !self.config.auto_create_topics {
                return Ok(Err(BackendError::UnknownTopic(topic.to_owned())));
            }
            Self::create(txn, staged, topic, self.config.default_partitions)?;
        }
        let Some(st) = self.stage(staged, topic) else {
            return Ok(Err(BackendError::UnknownTopic(topic.to_owned())));
        };
        let partitions = u32::try_from(st.state.ends.len()).unwrap_or(u32::MAX);
        let mut index = txn.open_table(IDEMPOTENCY)?;
        let mut table = txn.open_table(EVENTS)?;
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            if let Some(id) = &event.idempotency_id
                && let Some(found) = index.get((topic, id.as_slice()))?
            {
                let (partition, offset) = found.value();
                out.push(Appended { partition, offset });
                continue;
            }
            let partition = match &event.key {
                Some(key) => partition_for_key(key, partitions),
                None => {
                    let p = st.state.next_rr % partitions;
                    st.state.next_rr = st.state.next_rr.wrapping_add(1);
                    p
                }
            };
            // In range: both arms above reduce modulo the partition count.
            let end = &mut st.state.ends[partition as usize];
            let offset = *end;
            table.insert((topic, partition, offset), event.record.as_slice())?;
            if let Some(id) = &event.idempotency_id {
                index.insert((topic, id.as_slice()), (partition, offset))?;
            }
            *end += 1;
            st.state.bytes[partition as usize] += event.record.len() as u64;
            st.appended = true;
            out.push(Appended { partition, offset });
        }
        Ok(Ok(LogOut::Appended(out)))
    }

    fn join(
        &self,
        txn: &WriteTransaction,
        staged: &mut Staged,
        group: &str,
        topics: &[String],
        start: StartPosition,
    ) -> Result<BackendResult<LogOut>, redb::Error> {
        let missing: Vec<&String> = topics.iter().filter(|t| !self.exists(staged, t)).collect();
        if let Some(first) = missing.first()
            && !self.config.auto_create_topics
        {
            return Ok(Err(BackendError::UnknownTopic((*first).clone())));
        }
        for topic in missing {
            Self::create(txn, staged, topic, self.config.default_partitions)?;
        }
        let mut positions = txn.open_table(POSITIONS)?;
        let mut out = Vec::new();
        for topic in topics {
            let Some(st) = self.stage(staged, topic) else {
                continue;
            };
            for (p, &end) in st.state.ends.iter().enumerate() {
                let p = u32::try_from(p).unwrap_or(u32::MAX);
                let key = (group, topic.as_str(), p);
                let stored = positions.get(key)?.map(|g| g.value());
                let offset = match stored {
                    Some(offset) => offset,
                    None => {
                        let offset = match start {
                            StartPosition::Earliest => st.state.starts[p as usize],
                            StartPosition::Latest => end,
                        };
                        positions.insert(key, offset)?;
                        offset
                    }
                };
                out.push((TopicPartition::new(topic.clone(), p), offset));
            }
        }
        Ok(Ok(LogOut::Joined(out)))
    }
}

impl LogWriter {
    /// Deletes each partition's oldest events that retention allows, below every group's
    /// committed position, up to the per-commit cap.
    fn retain(
        &self,
        txn: &WriteTransaction,
        staged: &mut Staged,
        now: u64,
    ) -> Result<BackendResult<LogOut>, redb::Error> {
        let retention = &self.config.retention;
        let lowest = lowest_positions(txn)?;
        let mut events = txn.open_table(EVENTS)?;
        let mut budget = retention.max_deletes_per_commit.max(1) as u64;
        let (mut deleted, mut freed, mut more) = (0u64, 0u64, false);
        let mut names: Vec<String> = self.known.keys().cloned().collect();
        names.sort();
        for name in names {
            let policy = retention.of(&name);
            if policy.is_unlimited() {
                continue;
            }
            let oldest_kept = policy.max_age.map(|age| {
                let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                i64::try_from(now.saturating_sub(age)).unwrap_or(i64::MAX)
            });
            let Some(st) = self.stage(staged, &name) else {
                continue;
            };
            for p in 0..st.state.ends.len() {
                if budget == 0 {
                    more = true;
                    break;
                }
                let pi = u32::try_from(p).unwrap_or(u32::MAX);
                let start = st.state.starts[p];
                // Never what a group has yet to handle: its committed position and on.
                let limit = lowest
                    .get(&(name.clone(), pi))
                    .copied()
                    .unwrap_or(u64::MAX)
                    .min(st.state.ends[p]);
                if limit <= start {
                    continue;
                }
                let mut bytes = st.state.bytes[p];
                let (mut cut, mut cut_bytes) = (start, 0u64);
                for row in events.range((name.as_str(), pi, start)..(name.as_str(), pi, limit))? {
                    if cut - start >= budget {
                        more = true;
                        break;
                    }
                    let (_, v) = row?;
                    let record = v.value();
                    let too_old = oldest_kept.is_some_and(|t| record_timestamp(record) < t);
                    let too_big = policy.max_partition_bytes.is_some_and(|max| bytes > max);
                    if !too_old && !too_big {
                        break;
                    }
                    let len = record.len() as u64;
                    bytes = bytes.saturating_sub(len);
                    cut_bytes += len;
                    cut += 1;
                }
                if cut == start {
                    continue;
                }
                events.retain_in(
                    (name.as_str(), pi, start)..(name.as_str(), pi, cut),
                    |_, _| false,
                )?;
                st.state.starts[p] = cut;
                st.state.bytes[p] = bytes;
                st.deleted[p] += cut - start;
                budget -= cut - start;
                deleted += cut - start;
                freed += cut_bytes;
            }
        }
        Ok(Ok(LogOut::Retained {
            events: deleted,
            bytes: freed,
            more,
        }))
    }
}

impl Batcher for LogWriter {
    type Op = LogOp;
    type Out = LogOut;
    type Staged = Staged;

    fn apply(
        &mut self,
        txn: &WriteTransaction,
        op: &LogOp,
        staged: &mut Staged,
    ) -> Result<BackendResult<LogOut>, redb::Error> {
        match op {
            LogOp::Append { topic, events } => self.append(txn, staged, topic, events),
            LogOp::EnsureTopic { topic, partitions } => {
                if let Some(st) = self.stage(staged, topic) {
                    let n = u32::try_from(st.state.ends.len()).unwrap_or(u32::MAX);
                    return Ok(Ok(LogOut::Partitions(n)));
                }
                Self::create(txn, staged, topic, *partitions)?;
                Ok(Ok(LogOut::Partitions(*partitions)))
            }
            LogOp::Commit { group, offsets } => {
                let mut positions = txn.open_table(POSITIONS)?;
                for (tp, offset) in offsets {
                    positions.insert((group.as_str(), tp.topic.as_str(), tp.partition), offset)?;
                }
                Ok(Ok(LogOut::Committed))
            }
            LogOp::Join {
                group,
                topics,
                start,
            } => self.join(txn, staged, group, topics, *start),
            LogOp::Retain { now_ms } => self.retain(txn, staged, *now_ms),
        }
    }

    fn before_commit(
        &mut self,
        txn: &WriteTransaction,
        staged: &mut Staged,
    ) -> Result<(), redb::Error> {
        let mut stats = txn.open_table(STATS)?;
        for (name, st) in &staged.topics {
            let changed = st.created || st.appended || st.deleted.iter().any(|&d| d > 0);
            if !changed {
                continue;
            }
            for (p, (&start, &bytes)) in st.state.starts.iter().zip(&st.state.bytes).enumerate() {
                let p = u32::try_from(p).unwrap_or(u32::MAX);
                stats.insert((name.as_str(), p), (start, bytes))?;
            }
        }
        Ok(())
    }

    fn reopened(&mut self, db: &Database) -> BackendResult<()> {
        let known = load(db)?;
        let mut map = self.topics.write().unwrap_or_else(|e| e.into_inner());
        for (name, mut state) in known {
            if let Some(old) = self.known.get(&name) {
                state.next_rr = old.next_rr;
            }
            match map.get(&name) {
                Some(topic) if topic.ends.len() == state.ends.len() => {
                    topic.publish(&state);
                    topic.changed.send_modify(|v| *v = v.wrapping_add(1));
                }
                _ => {
                    map.insert(name.clone(), Arc::new(Topic::new(&state)));
                }
            }
            self.known.insert(name, state);
        }
        Ok(())
    }

    fn committed(&mut self, staged: Staged) {
        let mut wake = Vec::new();
        {
            let mut map = self.topics.write().unwrap_or_else(|e| e.into_inner());
            for (name, st) in staged.topics {
                let deleted: u64 = st.deleted.iter().sum();
                if deleted > 0 {
                    metrics::counter!(crate::metric_names::LOG_RETENTION_DELETED_EVENTS_TOTAL, "topic" => name.clone())
                        .increment(deleted);
                }
                if st.created {
                    let topic = Arc::new(Topic::new(&st.state));
                    map.insert(name.clone(), topic);
                } else if let Some(topic) = map.get(&name) {
                    // Starts move before anyone could read below them: retention only
                    // deletes below every committed position.
                    topic.publish(&st.state);
                    if st.appended {
                        wake.push(topic.clone());
                    }
                }
                self.known.insert(name, st.state);
            }
        }
        // Ends are stored before the wake-up, so a woken subscription sees the new data.
        for topic in wake {
            topic.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Trait implementations
// ---------------------------------------------------------------------------------------

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

#[async_trait]
impl EventSource for EmbeddedLog {
    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
        start: StartPosition,
    ) -> BackendResult<Box<dyn Subscription>> {
        if group.is_empty() {
            return Err(BackendError::Invalid("consumer group name is empty".into()));
        }
        if topics.is_empty() {
            return Err(BackendError::Invalid(
                "a subscription needs at least one topic".into(),
            ));
        }
        let mut seen = HashSet::new();
        let mut unique = Vec::new();
        for topic in topics {
            validate_topic(topic)?;
            if seen.insert(topic.as_str()) {
                unique.push(topic.clone());
            }
        }
        let op = LogOp::Join {
            group: group.to_owned(),
            topics: unique.clone(),
            start,
        };
        let LogOut::Joined(assigned) = self.inner.writer.call(op).await? else {
            return Err(unexpected_reply());
        };

        let mut watches = Vec::with_capacity(unique.len());
        let mut by_name = HashMap::new();
        for name in &unique {
            let topic = self.inner.known_topic(name)?;
            watches.push(topic.changed.subscribe());
            by_name.insert(name.as_str(), topic);
        }
        let mut parts = Vec::with_capacity(assigned.len());
        let mut index = HashMap::with_capacity(assigned.len());
        for (tp, offset) in &assigned {
            let topic = by_name
                .get(tp.topic.as_str())
                .cloned()
                .ok_or_else(|| BackendError::UnknownTopic(tp.topic.clone()))?;
            index.insert(tp.clone(), parts.len());
            parts.push(PartitionCursor {
                tp: tp.clone(),
                topic,
                fetch: *offset,
                paused: false,
            });
        }
        Ok(Box::new(LogSubscription {
            inner: self.inner.clone(),
            group: group.to_owned(),
            parts,
            index,
            watches,
            assigned: Some(assigned),
            rotate: 0,
            pending: None,
        }))
    }

    async fn committed(&self, group: &str, topic: &str) -> BackendResult<Vec<Option<u64>>> {
        let partitions = self.inner.known_topic(topic)?.partitions();
        let db = self.inner.db.clone();
        let (group, topic) = (group.to_owned(), topic.to_owned());
        blocking(move || {
            let handle = db.get()?;
            let txn = handle.begin_read().map_err(redb_error)?;
            let table = txn.open_table(POSITIONS).map_err(redb_error)?;
            (0..partitions)
                .map(|p| {
                    table
                        .get((group.as_str(), topic.as_str(), p))
                        .map(|g| g.map(|g| g.value()))
                        .map_err(redb_error)
                })
                .collect()
        })
        .await
    }
}

struct PartitionCursor {
    tp: TopicPartition,
    topic: Arc<Topic>,
    /// Next offset to fetch (in memory only; commits are the dispatcher's call).
    fetch: u64,
    paused: bool,
}

impl PartitionCursor {
    /// Where the next fetch starts: `fetch`, or the first event kept if retention
    /// deleted past it (only possible for a position no group had committed).
    fn from(&self) -> u64 {
        self.fetch.max(self.topic.start(self.tp.partition))
    }
}

/// A group's subscription to the embedded log.
///
/// `next` is cancel-safe: fetch positions advance only when a message is returned.
struct LogSubscription {
    inner: Arc<Inner>,
    group: String,
    parts: Vec<PartitionCursor>,
    index: HashMap<TopicPartition, usize>,
    watches: Vec<watch::Receiver<u64>>,
    /// The `Assigned` message not yet handed out.
    assigned: Option<Vec<(TopicPartition, u64)>>,
    /// Where the next fetch starts looking, so no partition is always last in line.
    rotate: usize,
    /// The read in flight and what it covers. It outlives a cancelled `next` (the
    /// dispatcher races `next` against its commit tick), so the next call awaits the same
    /// read instead of starting another: one fetch per subscription, bounded in bytes.
    pending: Option<PendingFetch>,
}

/// A fetch's plan and its blocking read.
type PendingFetch = (
    Vec<(usize, FetchRange)>,
    tokio::task::JoinHandle<BackendResult<(Vec<Event>, bool)>>,
);

impl LogSubscription {
    /// Chooses what to read next: up to `max_fetch_events` spread evenly over the
    /// unpaused partitions that have data, leftovers going round in rotating order.
    fn plan(&self) -> Vec<(usize, FetchRange)> {
        let n = self.parts.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.rotate % n;
        let ready: Vec<(usize, u64)> = (0..n)
            .map(|i| (start + i) % n)
            .filter_map(|i| {
                let part = &self.parts[i];
                let available = part
                    .topic
                    .end(part.tp.partition)
                    .saturating_sub(part.from());
                (!part.paused && available > 0).then_some((i, available))
            })
            .collect();
        if ready.is_empty() {
            return Vec::new();
        }
        let mut budget = self.inner.config.max_fetch_events as u64;
        let share = budget.div_ceil(ready.len() as u64).max(1);
        let mut take = vec![0u64; ready.len()];
        for (slot, &(_, available)) in take.iter_mut().zip(&ready) {
            let n = share.min(available).min(budget);
            *slot = n;
            budget -= n;
        }
        for (slot, &(_, available)) in take.iter_mut().zip(&ready) {
            let n = (available - *slot).min(budget);
            *slot += n;
            budget -= n;
        }
        ready
            .iter()
            .zip(take)
            .filter(|(_, n)| *n > 0)
            .map(|(&(i, _), n)| {
                let part = &self.parts[i];
                let range = FetchRange {
                    topic: part.tp.topic.clone(),
                    partition: part.tp.partition,
                    from: part.from(),
                    to: part.from() + n,
                };
                (i, range)
            })
            .collect()
    }

    /// Waits until any subscribed topic has had an append since the last mark.
    async fn wait_for_data(&mut self) -> BackendResult<()> {
        let changes = self.watches.iter_mut().map(|w| Box::pin(w.changed()));
        let (result, _, _) = futures::future::select_all(changes).await;
        result.map_err(|_| BackendError::Unavailable("event log closed".into()))
    }
}

#[async_trait]
impl Subscription for LogSubscription {
    async fn next(&mut self) -> BackendResult<SourceMessage> {
        if let Some(assigned) = self.assigned.take() {
            return Ok(SourceMessage::Assigned(assigned));
        }
        loop {
            let handle = match &mut self.pending {
                Some((_, handle)) => handle,
                None => {
                    // Mark before looking, so an append landing after the look still
                    // wakes us.
                    for w in &mut self.watches {
                        w.mark_unchanged();
                    }
                    let plan = self.plan();
                    if plan.is_empty() {
                        self.wait_for_data().await?;
                        continue;
                    }
                    let ranges: Vec<FetchRange> = plan.iter().map(|(_, r)| r.clone()).collect();
                    let db = self.inner.db.clone();
                    let max_bytes = self.inner.config.max_fetch_bytes;
                    let read = tokio::task::spawn_blocking(move || {
                        read_ranges(&*db.get()?, &ranges, max_bytes)
                    });
                    &mut self.pending.insert((plan, read)).1
                }
            };
            let joined = handle.await;
            let Some((plan, _)) = self.pending.take() else {
                continue;
            };
            let (events, cut) = joined
                .map_err(|e| BackendError::Unavailable(format!("storage task failed: {e}")))??;
            // Each range's events are contiguous from its start; a read the byte bound
            // did not cut short holds every offset it asked for.
            for (i, range) in &plan {
                let read = events
                    .iter()
                    .filter(|e| e.partition == range.partition && e.topic == range.topic)
                    .count() as u64;
                if !cut && read != range.to - range.from {
                    return Err(BackendError::Corrupt(format!(
                        "expected offsets {}..{} of {}/{} but found {read} events: the log has holes",
                        range.from, range.to, range.topic, range.partition
                    )));
                }
                self.parts[*i].fetch = range.from + read;
            }
            self.rotate = self.rotate.wrapping_add(1);
            if events.is_empty() {
                continue;
            }
            return Ok(SourceMessage::Events(events));
        }
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> BackendResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let op = LogOp::Commit {
            group: self.group.clone(),
            offsets: offsets.to_vec(),
        };
        match self.inner.writer.call(op).await? {
            LogOut::Committed => Ok(()),
            _ => Err(unexpected_reply()),
        }
    }

    fn pause(&mut self, partition: &TopicPartition) {
        if let Some(&i) = self.index.get(partition) {
            self.parts[i].paused = true;
        }
    }

    fn resume(&mut self, partition: &TopicPartition) {
        if let Some(&i) = self.index.get(partition) {
            self.parts[i].paused = false;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::types::Header;
    use std::time::Duration;

    fn event(key: Option<&str>, payload: &str) -> NewEvent {
        NewEvent {
            key: key.map(|k| k.as_bytes().to_vec()),
            payload: payload.as_bytes().to_vec(),
            headers: vec![Header::text("h", payload)],
        }
    }

    fn with_id(mut e: NewEvent, id: &str) -> NewEvent {
        e.headers.push(Header::text(headers::IDEMPOTENCY_ID, id));
        e
    }

    fn open(dir: &Path) -> Arc<EmbeddedLog> {
        EmbeddedLog::open(dir, LogConfig::default()).unwrap()
    }

    async fn next_events(sub: &mut Box<dyn Subscription>) -> Vec<Event> {
        match tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("no message within 10 s")
            .unwrap()
        {
            SourceMessage::Events(events) => events,
            other => panic!("expected events, got {other:?}"),
        }
    }

    async fn assigned(sub: &mut Box<dyn Subscription>) -> Vec<(TopicPartition, u64)> {
        match sub.next().await.unwrap() {
            SourceMessage::Assigned(a) => a,
            other => panic!("expected assignment, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn append_partitions_by_key_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        assert_eq!(log.ensure_topic("orders", 3).await.unwrap(), 3);
        assert_eq!(log.ensure_topic("orders", 9).await.unwrap(), 3);

        let keys = ["alice", "bob", "carol", "dave", "erin", "alice", "bob"];
        let events: Vec<_> = keys.iter().map(|k| event(Some(k), k)).collect();
        let appended = log.append("orders", events).await.unwrap();
        assert_eq!(appended.len(), keys.len());

        let mut expected_next = [0u64; 3];
        for (key, a) in keys.iter().zip(&appended) {
            assert_eq!(a.partition, partition_for_key(key.as_bytes(), 3));
            assert_eq!(a.offset, expected_next[a.partition as usize]);
            expected_next[a.partition as usize] += 1;
        }
        assert_eq!(log.end_offsets("orders").await.unwrap(), expected_next);

        let alice = partition_for_key(b"alice", 3);
        let read = log.read("orders", alice, 0, 100).await.unwrap();
        let alice_events: Vec<_> = read
            .iter()
            .filter(|e| e.key.as_deref() == Some(b"alice"))
            .collect();
        assert_eq!(alice_events.len(), 2);
        let first = alice_events[0];
        assert_eq!(first.topic, "orders");
        assert_eq!(first.payload, b"alice");
        assert_eq!(first.headers, vec![Header::text("h", "alice")]);
        assert!(first.timestamp_ms > 0);
        assert!(read.windows(2).all(|w| w[0].offset + 1 == w[1].offset));

        // `from` and `max` bound the read.
        let tail = log.read("orders", alice, 1, 1).await.unwrap();
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].offset, 1);
        assert!(log.read("orders", alice, 99, 10).await.unwrap().is_empty());
        assert!(matches!(
            log.read("orders", 3, 0, 10).await,
            Err(BackendError::Invalid(_))
        ));
        assert!(matches!(
            log.read("nope", 0, 0, 10).await,
            Err(BackendError::UnknownTopic(_))
        ));
        assert_eq!(log.partitions("orders").await.unwrap(), Some(3));
        assert_eq!(log.partitions("nope").await.unwrap(), None);
    }

    #[tokio::test]
    async fn keyless_events_spread_round_robin() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.ensure_topic("t", 4).await.unwrap();
        let events = (0..8).map(|i| event(None, &i.to_string())).collect();
        log.append("t", events).await.unwrap();
        assert_eq!(log.end_offsets("t").await.unwrap(), vec![2, 2, 2, 2]);
    }

    #[tokio::test]
    async fn auto_create_uses_default_partitions_and_can_be_off() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.append("auto", vec![event(Some("k"), "v")])
            .await
            .unwrap();
        assert_eq!(log.partitions("auto").await.unwrap(), Some(4));
        drop(log);

        let strict = LogConfig {
            auto_create_topics: false,
            ..LogConfig::default()
        };
        let log = EmbeddedLog::open(dir.path(), strict).unwrap();
        assert!(matches!(
            log.append("missing", vec![event(None, "x")]).await,
            Err(BackendError::UnknownTopic(t)) if t == "missing"
        ));
        assert!(matches!(
            log.subscribe("g", &["missing".into()], StartPosition::Earliest)
                .await,
            Err(BackendError::UnknownTopic(_))
        ));
        assert_eq!(log.partitions("missing").await.unwrap(), None);
        log.append("auto", vec![event(None, "x")]).await.unwrap();
        assert!(matches!(
            log.append("bad topic!", vec![event(None, "x")]).await,
            Err(BackendError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn topics_events_and_positions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            log.ensure_topic("a", 2).await.unwrap();
            let events = (0..10)
                .map(|i| event(Some(&format!("k{i}")), "x"))
                .collect();
            log.append("a", events).await.unwrap();
            let mut sub = log
                .subscribe("g", &["a".into()], StartPosition::Earliest)
                .await
                .unwrap();
            assert_eq!(
                assigned(&mut sub).await,
                vec![
                    (TopicPartition::new("a", 0), 0),
                    (TopicPartition::new("a", 1), 0)
                ]
            );
            let got = next_events(&mut sub).await;
            assert_eq!(got.len(), 10);
            sub.commit(&[(TopicPartition::new("a", 0), 2)])
                .await
                .unwrap();
        }
        let log = open(dir.path());
        assert_eq!(log.topics(), vec![("a".to_owned(), 2)]);
        let ends = log.end_offsets("a").await.unwrap();
        assert_eq!(ends.iter().sum::<u64>(), 10);
        assert_eq!(
            log.read("a", 0, 0, 100).await.unwrap().len() as u64,
            ends[0]
        );
        assert_eq!(
            log.committed("g", "a").await.unwrap(),
            vec![Some(2), Some(0)]
        );
        assert_eq!(log.committed("other", "a").await.unwrap(), vec![None, None]);
        let mut sub = log
            .subscribe("g", &["a".into()], StartPosition::Latest)
            .await
            .unwrap();
        assert_eq!(
            assigned(&mut sub).await,
            vec![
                (TopicPartition::new("a", 0), 2),
                (TopicPartition::new("a", 1), 0)
            ]
        );
        let got = next_events(&mut sub).await;
        assert_eq!(got.len() as u64, 10 - 2);
        assert!(got.iter().all(|e| e.partition == 1 || e.offset >= 2));
    }

    #[tokio::test]
    async fn latest_start_is_persisted_at_subscribe() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(dir.path());
            log.ensure_topic("t", 1).await.unwrap();
            log.append("t", vec![event(None, "old1"), event(None, "old2")])
                .await
                .unwrap();
            let mut sub = log
                .subscribe("g", &["t".into()], StartPosition::Latest)
                .await
                .unwrap();
            assert_eq!(
                assigned(&mut sub).await,
                vec![(TopicPartition::new("t", 0), 2)]
            );
            // Nothing committed before the "crash"; the start position must still hold.
            log.append("t", vec![event(None, "new1")]).await.unwrap();
        }
        let log = open(dir.path());
        log.append("t", vec![event(None, "new2")]).await.unwrap();
        assert_eq!(log.committed("g", "t").await.unwrap(), vec![Some(2)]);
        let mut sub = log
            .subscribe("g", &["t".into()], StartPosition::Latest)
            .await
            .unwrap();
        assert_eq!(
            assigned(&mut sub).await,
            vec![(TopicPartition::new("t", 0), 2)]
        );
        let payloads: Vec<_> = next_events(&mut sub)
            .await
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(payloads, vec![b"new1".to_vec(), b"new2".to_vec()]);
    }

    #[tokio::test]
    async fn fetching_does_not_commit() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.ensure_topic("t", 1).await.unwrap();
        log.append("t", vec![event(None, "a"), event(None, "b")])
            .await
            .unwrap();
        let mut sub = log
            .subscribe("g", &["t".into()], StartPosition::Earliest)
            .await
            .unwrap();
        assigned(&mut sub).await;
        assert_eq!(next_events(&mut sub).await.len(), 2);
        assert_eq!(log.committed("g", "t").await.unwrap(), vec![Some(0)]);
        sub.commit(&[(TopicPartition::new("t", 0), 2)])
            .await
            .unwrap();
        assert_eq!(log.committed("g", "t").await.unwrap(), vec![Some(2)]);
    }

    #[tokio::test]
    async fn subscription_wakes_on_new_data() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let mut sub = log
            .subscribe("g", &["a".into(), "b".into()], StartPosition::Earliest)
            .await
            .unwrap();
        assert_eq!(assigned(&mut sub).await.len(), 8);
        let waiter = tokio::spawn(async move { next_events(&mut sub).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "next() returned without data");
        log.append("b", vec![event(Some("k"), "hello")])
            .await
            .unwrap();
        let got = waiter.await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].topic, "b");
        assert_eq!(got[0].payload, b"hello");
    }

    #[tokio::test]
    async fn paused_partitions_are_not_fetched_until_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.ensure_topic("t", 2).await.unwrap();
        let mut sub = log
            .subscribe("g", &["t".into()], StartPosition::Earliest)
            .await
            .unwrap();
        assigned(&mut sub).await;
        let p0 = TopicPartition::new("t", 0);
        sub.pause(&p0);
        // Keyless events alternate partitions: two land in each.
        log.append("t", (0..4).map(|i| event(None, &i.to_string())).collect())
            .await
            .unwrap();
        let got = next_events(&mut sub).await;
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|e| e.partition == 1));
        let idle = tokio::time::timeout(Duration::from_millis(100), sub.next()).await;
        assert!(idle.is_err(), "a paused partition was fetched");
        sub.resume(&p0);
        let got = next_events(&mut sub).await;
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|e| e.partition == 0));
    }

    #[tokio::test]
    async fn busy_partitions_do_not_starve_others() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.ensure_topic("busy", 1).await.unwrap();
        log.ensure_topic("quiet", 1).await.unwrap();
        let flood: Vec<_> = (0..2000).map(|i| event(None, &i.to_string())).collect();
        log.append("busy", flood).await.unwrap();
        log.append("quiet", vec![event(None, "q1"), event(None, "q2")])
            .await
            .unwrap();
        let mut sub = log
            .subscribe(
                "g",
                &["busy".into(), "quiet".into()],
                StartPosition::Earliest,
            )
            .await
            .unwrap();
        assigned(&mut sub).await;
        let first = next_events(&mut sub).await;
        assert_eq!(first.len(), 512);
        assert_eq!(first.iter().filter(|e| e.topic == "quiet").count(), 2);
        let busy: Vec<u64> = first
            .iter()
            .filter(|e| e.topic == "busy")
            .map(|e| e.offset)
            .collect();
        assert_eq!(busy, (0..510).collect::<Vec<_>>());
        let mut total = first.len();
        while total < 2002 {
            total += next_events(&mut sub).await.len();
        }
        assert_eq!(total, 2002);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_appends_share_commits_and_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.ensure_topic("t", 4).await.unwrap();
        let before = log.commits();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    log.append("t", vec![event(Some(&format!("k{i}")), &i.to_string())])
                        .await
                })
            })
            .collect();
        let mut coords = HashSet::new();
        for task in tasks {
            let appended = task.await.unwrap().unwrap();
            assert!(coords.insert((appended[0].partition, appended[0].offset)));
        }
        let commits = log.commits() - before;
        assert!(
            commits <= 50,
            "{commits} transactions for 200 concurrent appends: not group-committed"
        );
        drop(log);

        let log = open(dir.path());
        assert_eq!(log.end_offsets("t").await.unwrap().iter().sum::<u64>(), 200);
        let mut payloads = HashSet::new();
        for p in 0..4 {
            for e in log.read("t", p, 0, 1000).await.unwrap() {
                assert!(coords.contains(&(e.partition, e.offset)));
                payloads.insert(e.payload);
            }
        }
        assert_eq!(payloads.len(), 200);
    }

    #[tokio::test]
    async fn idempotency_ids_dedupe_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let log = open(dir.path());
            log.ensure_topic("out", 4).await.unwrap();
            let a = log
                .append(
                    "out",
                    vec![
                        with_id(event(None, "one"), "id-1"),
                        with_id(event(None, "two"), "id-2"),
                        // A repeat inside one call lands once too.
                        with_id(event(None, "one again"), "id-1"),
                    ],
                )
                .await
                .unwrap();
            assert_eq!(a[0], a[2]);
            assert_ne!(a[0], a[1]);
            assert_eq!(log.end_offsets("out").await.unwrap().iter().sum::<u64>(), 2);
            let again = log
                .append("out", vec![with_id(event(None, "one"), "id-1")])
                .await
                .unwrap();
            assert_eq!(again[0], a[0]);
            a
        };
        let log = open(dir.path());
        let replay = log
            .append(
                "out",
                vec![
                    with_id(event(None, "two"), "id-2"),
                    with_id(event(None, "three"), "id-3"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(replay[0], first[1]);
        assert_eq!(log.end_offsets("out").await.unwrap().iter().sum::<u64>(), 3);
        // The id is per topic: the same id on another topic is a new event.
        log.append("other", vec![with_id(event(None, "one"), "id-1")])
            .await
            .unwrap();
        assert_eq!(
            log.end_offsets("other").await.unwrap().iter().sum::<u64>(),
            1
        );
        let stored = log
            .read("out", first[0].partition, first[0].offset, 1)
            .await
            .unwrap();
        assert_eq!(stored[0].payload, b"one");
    }

    fn retained(retention: TopicRetention, compact_min_bytes: u64) -> LogConfig {
        LogConfig {
            retention: RetentionConfig {
                default: retention,
                // The tests run passes themselves.
                interval: Duration::from_secs(3600),
                compact_min_bytes,
                max_deletes_per_commit: 7,
                ..RetentionConfig::default()
            },
            ..LogConfig::default()
        }
    }

    fn sized(i: usize, len: usize) -> NewEvent {
        NewEvent {
            key: None,
            payload: format!("{i:0len$}").into_bytes(),
            headers: Vec::new(),
        }
    }

    async fn offsets(log: &EmbeddedLog, topic: &str) -> Vec<u64> {
        log.read(topic, 0, 0, 10_000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.offset)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_by_size_never_passes_committed_positions() {
        let dir = tempfile::tempdir().unwrap();
        let policy = TopicRetention {
            max_age: None,
            max_partition_bytes: Some(10 * 118),
        };
        let log = EmbeddedLog::open(dir.path(), retained(policy, u64::MAX)).unwrap();
        log.ensure_topic("t", 1).await.unwrap();
        log.ensure_topic("free", 1).await.unwrap();
        let record = encode_record(&sized(0, 100), 0).unwrap().len() as u64;
        assert_eq!(record, 118);
        log.append("t", (0..100).map(|i| sized(i, 100)).collect())
            .await
            .unwrap();
        log.append("free", (0..100).map(|i| sized(i, 100)).collect())
            .await
            .unwrap();
        // Two groups on `t`: the slower one's position bounds what is deleted.
        for group in ["fast", "slow"] {
            let mut sub = log
                .subscribe(group, &["t".into()], StartPosition::Earliest)
                .await
                .unwrap();
            assigned(&mut sub).await;
            let committed = if group == "fast" { 90 } else { 60 };
            sub.commit(&[(TopicPartition::new("t", 0), committed)])
                .await
                .unwrap();
        }

        let report = log.enforce_retention(now_ms()).await.unwrap();
        // `t` stops at the slow group's position; `free` (no group) keeps its last 10.
        assert_eq!(log.start_offsets("t").unwrap(), vec![60]);
        assert_eq!(log.start_offsets("free").unwrap(), vec![90]);
        assert_eq!(report.deleted_events, 60 + 90);
        assert_eq!(report.deleted_bytes, 150 * record);
        assert_eq!(offsets(&log, "t").await, (60..100).collect::<Vec<_>>());
        assert_eq!(offsets(&log, "free").await, (90..100).collect::<Vec<_>>());
        let usage = log.usage();
        assert_eq!(usage[0].topic, "free");
        assert_eq!((usage[0].events, usage[0].bytes), (10, 10 * record));
        assert_eq!((usage[1].events, usage[1].bytes), (40, 40 * record));

        // The slow group catches up: `t` shrinks to its limit too.
        let mut sub = log
            .subscribe("slow", &["t".into()], StartPosition::Earliest)
            .await
            .unwrap();
        assert_eq!(
            assigned(&mut sub).await,
            vec![(TopicPartition::new("t", 0), 60)]
        );
        sub.commit(&[(TopicPartition::new("t", 0), 100)])
            .await
            .unwrap();
        log.enforce_retention(now_ms()).await.unwrap();
        assert_eq!(log.start_offsets("t").unwrap(), vec![90]);
        // A new group starting from the earliest begins at the first event kept.
        let mut late = log
            .subscribe("late", &["t".into()], StartPosition::Earliest)
            .await
            .unwrap();
        assert_eq!(
            assigned(&mut late).await,
            vec![(TopicPartition::new("t", 0), 90)]
        );
        assert_eq!(next_events(&mut late).await.len(), 10);
        drop((sub, late));
        drop(log);

        // Starts and sizes survive a reopen; offsets keep counting from the end.
        let log = EmbeddedLog::open(dir.path(), retained(policy, u64::MAX)).unwrap();
        assert_eq!(log.start_offsets("t").unwrap(), vec![90]);
        assert_eq!(log.usage()[1].bytes, 10 * record);
        let a = log.append("t", vec![sized(100, 100)]).await.unwrap();
        assert_eq!(a[0].offset, 100);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_by_time_keeps_recent_and_uncommitted_events_and_ids() {
        let dir = tempfile::tempdir().unwrap();
        let policy = TopicRetention {
            max_age: Some(Duration::from_secs(3600)),
            max_partition_bytes: None,
        };
        let log = EmbeddedLog::open(dir.path(), retained(policy, u64::MAX)).unwrap();
        log.ensure_topic("t", 1).await.unwrap();
        log.ensure_topic("out", 1).await.unwrap();
        log.append("t", (0..20).map(|i| sized(i, 10)).collect())
            .await
            .unwrap();
        let first = log
            .append("out", vec![with_id(event(None, "once"), "id-1")])
            .await
            .unwrap();
        let mut sub = log
            .subscribe("g", &["t".into()], StartPosition::Earliest)
            .await
            .unwrap();
        assigned(&mut sub).await;
        sub.commit(&[(TopicPartition::new("t", 0), 12)])
            .await
            .unwrap();

        // Nothing is an hour old yet.
        let now = now_ms();
        assert_eq!(log.enforce_retention(now).await.unwrap().deleted_events, 0);
        // Two hours later: everything is old, but `g` has not handled 12.. yet.
        let later = now + 2 * 3600 * 1000;
        assert_eq!(
            log.enforce_retention(later).await.unwrap().deleted_events,
            12 + 1
        );
        assert_eq!(offsets(&log, "t").await, (12..20).collect::<Vec<_>>());
        assert_eq!(log.start_offsets("out").unwrap(), vec![1]);
        // A fetch still sees every event the group has not committed.
        let got = next_events(&mut sub).await;
        assert_eq!(
            got.iter().map(|e| e.offset).collect::<Vec<_>>(),
            (12..20).collect::<Vec<_>>()
        );
        // The idempotency id outlives its event: a replayed emit still lands once.
        let again = log
            .append("out", vec![with_id(event(None, "once"), "id-1")])
            .await
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(log.end_offsets("out").await.unwrap(), vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_compacts_the_file_once_enough_is_freed() {
        let dir = tempfile::tempdir().unwrap();
        let policy = TopicRetention {
            max_age: None,
            max_partition_bytes: Some(64 << 10),
        };
        let mut config = retained(policy, 4 << 20);
        config.retention.max_deletes_per_commit = 1000;
        let log = EmbeddedLog::open(dir.path(), config).unwrap();
        log.ensure_topic("t", 1).await.unwrap();
        for batch in 0..40 {
            let events = (0..64).map(|i| sized(batch * 64 + i, 4096)).collect();
            log.append("t", events).await.unwrap();
        }
        let before = log.health().file_bytes();
        assert!(before > 10 << 20, "file is {before} bytes");
        let started = std::time::Instant::now();
        let report = log.enforce_retention(now_ms()).await.unwrap();
        let took = started.elapsed();
        let after = log.health().file_bytes();
        assert!(report.deleted_bytes > 9 << 20, "{report:?}");
        assert!(report.compacted_bytes > 0, "{report:?}");
        eprintln!("file {before} -> {after} bytes in {took:?}; {report:?}");
        assert!(after < before / 4, "file {before} -> {after} bytes");
        assert_eq!(before - after, report.compacted_bytes);
        // Still a working log.
        let kept = log.start_offsets("t").unwrap()[0];
        assert_eq!(
            log.read("t", 0, 0, 100).await.unwrap()[0].offset,
            kept,
            "reads start at the first event kept"
        );
        log.append("t", vec![sized(0, 10)]).await.unwrap();
    }

    #[test]
    fn corrupt_records_are_reported_not_panicked() {
        let record = encode_record(&event(Some("k"), "payload"), 7).unwrap();
        let back = decode_event("t", 1, 2, &record).unwrap();
        assert_eq!(back.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(back.timestamp_ms, 7);
        for cut in 0..record.len() {
            assert!(matches!(
                decode_event("t", 1, 2, &record[..cut]),
                Err(BackendError::Corrupt(_))
            ));
        }
        let mut bad = record.clone();
        bad[0] = 9;
        assert!(matches!(
            decode_event("t", 1, 2, &bad),
            Err(BackendError::Corrupt(_))
        ));
    }
}
