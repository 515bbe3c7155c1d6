//! Event types shared by every backend, the dispatcher and the host API.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One header of an event: a name and an opaque value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value bytes.
    pub value: Vec<u8>,
}

impl Header {
    /// A header with a UTF-8 value.
    pub fn text(name: impl Into<String>, value: impl AsRef<str>) -> Self {
        Self {
            name: name.into(),
            value: value.as_ref().as_bytes().to_vec(),
        }
    }
}

/// The first header called `name`, as text if it is UTF-8.
pub fn header_str<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name == name)
        .and_then(|h| std::str::from_utf8(&h.value).ok())
}

/// A topic and one of its partitions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number, from 0.
    pub partition: u32,
}

impl TopicPartition {
    /// A topic partition.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// An event as stored in a topic: its coordinates plus what was appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Topic the event belongs to.
    pub topic: String,
    /// Partition within the topic.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
    /// Partition key.
    pub key: Option<Vec<u8>>,
    /// Body.
    pub payload: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<Header>,
    /// Append time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

impl Event {
    /// Bytes the event holds in memory: key, payload and headers.
    pub fn held_bytes(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>()
    }

    /// The event's topic partition.
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition::new(self.topic.clone(), self.partition)
    }

    /// The event as the handler's call number `attempt` (1-based) sees it: with the
    /// [`headers::ATTEMPT`] header.
    pub fn with_attempt(&self, attempt: u32) -> Event {
        let mut e = self.clone();
        e.headers.retain(|h| h.name != headers::ATTEMPT);
        e.headers
            .push(Header::text(headers::ATTEMPT, attempt.to_string()));
        e
    }
}

/// An event to append: the topic assigns partition (by key hash) and offset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEvent {
    /// Partition key; `None` spreads events over partitions.
    pub key: Option<Vec<u8>>,
    /// Body.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<Header>,
}

/// Where an appended event landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    // In name order: the order the HTTP API's append answer has always had.
    /// Its offset in that partition.
    pub offset: u64,
    /// The partition it went to.
    pub partition: u32,
}

/// The partition a key maps to: a stable hash, the same in every process and release.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let p = partitions.max(1) as u64;
    (xxhash_rust::xxh3::xxh3_64(key) % p) as u32
}

/// Well-known header names that the runtime writes.
pub mod headers {
    /// Idempotency id of an emitted event (derived from the input coordinates and emit index).
    pub const IDEMPOTENCY_ID: &str = "spate-idempotency-id";
    /// Name of the plugin that produced an emitted or dead-lettered event.
    pub const PLUGIN: &str = "spate-plugin";
    /// Version of the plugin that produced the event.
    pub const PLUGIN_VERSION: &str = "spate-plugin-version";
    /// Content hash (sha256) of the plugin component that produced the event.
    pub const PLUGIN_HASH: &str = "spate-plugin-hash";
    /// Input coordinates (`topic/partition/offset`) of the event that caused this one.
    pub const SOURCE: &str = "spate-source";
    /// Workflow name, on workflow-start events.
    pub const WORKFLOW: &str = "spate-workflow";
    /// Workflow run id, on workflow-start events.
    pub const WORKFLOW_ID: &str = "spate-workflow-id";
    /// W3C trace context of an emitted event: a child of the input's `traceparent`.
    pub const TRACEPARENT: &str = "traceparent";
    /// Dead-letter reason.
    pub const DLQ_REASON: &str = "spate-dlq-reason";
    /// Dead-letter failure kind (`rejected`, `retries-exhausted`, `deadline`, ...).
    pub const DLQ_KIND: &str = "spate-dlq-kind";
    /// Number of attempts made before dead-lettering.
    pub const DLQ_ATTEMPTS: &str = "spate-dlq-attempts";
    /// The 1-based attempt number of the call, visible to the guest.
    pub const ATTEMPT: &str = "spate-attempt";
    /// Emits a chain of handlers has made to reach this event (see `limits.max-hops`).
    pub const HOPS: &str = "spate-hops";

    /// Whether `name` is one of the runtime's own headers (`spate-*`, any case), which
    /// guests and producers may not set.
    pub fn is_reserved(name: &str) -> bool {
        name.get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("spate-"))
    }
}
