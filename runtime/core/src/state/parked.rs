//! Parked keys and the failure records every plugin keeps: with `on-failure = "park-key"`,
//! an event that exhausts its attempts (or is rejected) is parked with every later event
//! of its key, in key order, instead of being dead-lettered while the key's later events
//! run on a state missing it; an operator redrives the key (through the version active
//! then) or discards it to the dead-letter topic.
//!
//! Everything here is state in the plugin's reserved namespace
//! (`_spate/parked/<state namespace>`, which no manifest may claim), written by the
//! pipeline through the checkpoint like any state write, so it becomes durable together
//! with the source positions that moved past it, and a replay lands on the same entries.
//! Operators never write parked entries themselves: they file a [`Request`] that the
//! pipeline owning the key's partition carries out in the key's lane, in order with the
//! key's events, on whichever runtime owns the partition. Layout (keys are text; `<k>` is
//! the event key in hex; `<p>` a partition as 10 digits, `<o>` an offset as 20):
//! - `k/<k>`: a [`ParkedKey`], present while the key is parked;
//! - `q/<k>/<topic>/<p>/<o>`: a [`ParkedEvent`], the key's queue in source order (one
//!   key's events share a partition; a redelivered event lands on the same entry, so
//!   parking is idempotent);
//! - `r/<topic>/<p>/<id>`: a [`Request`] for the pipeline owning `<topic>/<p>`, in the
//!   order filed;
//! - `a/<topic>/<p>/<o>`: attempts already made on an event still being retried, so a
//!   restart or a rebalance does not start it again from attempt 1 (any failure policy);
//! - `d/<topic>/<p>/<o>`: a dead letter of this event was redriven and handled, so
//!   redriving it again does nothing (kept [`REDRIVEN_TTL`]).

use crate::manifest::RESERVED_NAMESPACE_PREFIX;
use crate::types::{Event, header_str, headers};
use crate::{BackendError, BackendResult, StateStore, StateWrite};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long the record that a dead letter was redriven is kept.
pub const REDRIVEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Most events one [`Request`] carries (a dead-letter redrive of more files several).
pub const MAX_REQUEST_EVENTS: usize = 256;

/// Where `namespace`'s plugin keeps its parked keys and failure records.
pub fn namespace(state_namespace: &str) -> String {
    format!("{RESERVED_NAMESPACE_PREFIX}/parked/{state_namespace}")
}

/// The hex form of an event key used in parked entries' keys.
pub fn key_id(key: Option<&[u8]>) -> String {
    key.map(hex::encode).unwrap_or_default()
}

/// The entry saying `key_id` is parked.
pub fn key_entry(key_id: &str) -> String {
    format!("k/{key_id}")
}

/// Prefix of every parked key's entry.
pub const KEYS_PREFIX: &str = "k/";

/// Prefix of `key_id`'s queue.
pub fn queue_prefix(key_id: &str) -> String {
    format!("q/{key_id}/")
}

/// The queue entry of `event`.
pub fn queue_entry(event: &Event) -> String {
    format!(
        "q/{}/{}",
        key_id(event.key.as_deref()),
        coordinates(&event.topic, event.partition, event.offset)
    )
}

fn coordinates(topic: &str, partition: u32, offset: u64) -> String {
    format!("{topic}/{partition:010}/{offset:020}")
}

/// Prefix of the requests for `topic`'s partitions (all of them with `None`).
pub fn requests_prefix(topic: &str, partition: Option<u32>) -> String {
    match partition {
        Some(p) => format!("r/{topic}/{p:010}/"),
        None => format!("r/{topic}/"),
    }
}

/// The entry of `request`.
pub fn request_entry(request: &Request) -> String {
    format!(
        "{}{}",
        requests_prefix(&request.topic, Some(request.partition)),
        request.id
    )
}

/// The entry counting attempts made on `event`.
pub fn attempts_entry(event: &Event) -> String {
    format!(
        "a/{}",
        coordinates(&event.topic, event.partition, event.offset)
    )
}

/// Prefix of the attempt records of `topic`/`partition`.
pub fn attempts_prefix(topic: &str, partition: u32) -> String {
    format!("a/{topic}/{partition:010}/")
}

/// The offset an attempts entry (see [`attempts_prefix`]) is about.
pub fn attempts_offset(entry: &str) -> Option<u64> {
    entry.rsplit('/').next()?.parse().ok()
}

/// The entry recording that a dead letter of `event` was redriven and handled.
pub fn redriven_entry(event: &Event) -> String {
    format!(
        "d/{}",
        coordinates(&event.topic, event.partition, event.offset)
    )
}

/// A parked key: since when, why, by which version, and how many events wait.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedKey {
    /// The event key, as text when it is UTF-8 (else hex).
    pub key: String,
    /// The key in hex (how entries and requests name it).
    pub key_id: String,
    /// Topic of the first parked event: the pipeline of this topic and partition carries
    /// out the key's requests.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Wall-clock millis when the first event was parked.
    pub since_ms: u64,
    /// Why the first event was parked.
    pub first_reason: String,
    /// The version that failed it.
    pub version: String,
    /// Events parked and not yet redriven or discarded.
    pub events: u64,
    /// Redrives of this key that failed again (and re-parked it).
    #[serde(default)]
    pub redrives: u32,
    /// Why the last redrive failed, if one did.
    #[serde(default)]
    pub last_reason: Option<String>,
}

/// One parked event with what is known of its failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedEvent {
    /// The event, with its original coordinates.
    pub event: Event,
    /// Why it was parked: the failure, or `queued behind a parked event`.
    pub reason: String,
    /// The failure kind (`rejected`, `retries-exhausted`, `trap:…`), or `queued`.
    pub kind: String,
    /// Attempts made (0 for an event queued without a call), redrives included.
    pub attempts: u32,
    /// The version that handled it (or was active when it queued).
    pub version: String,
    /// Wall-clock millis when it was parked.
    pub parked_at_ms: u64,
}

/// What an operator asked of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Handle the key's parked events in order through the active version; the key leaves
    /// the parked state once its queue is empty, or parks again at the first failure.
    Redrive,
    /// Send the key's parked events to the dead-letter topic and unpark it.
    Discard,
    /// Handle the dead letters the request carries, in order, through the active version
    /// (each at most once: see [`redriven_entry`]); one that fails again is dead-lettered
    /// again.
    RedriveDeadLetters,
}

impl Action {
    /// The action as metric labels and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Redrive => "redrive",
            Self::Discard => "discard",
            Self::RedriveDeadLetters => "redrive-dead-letters",
        }
    }
}

/// A request for the pipeline owning `topic`/`partition`, carried out in the lane of `key`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Sorts in the order requests were filed.
    pub id: String,
    /// What to do.
    pub action: Action,
    /// The topic whose pipeline carries it out.
    pub topic: String,
    /// The partition whose owner carries it out.
    pub partition: u32,
    /// The key (hex); empty for keyless dead letters.
    pub key_id: String,
    /// Wall-clock millis when it was filed.
    pub requested_at_ms: u64,
    /// The dead letters to handle ([`Action::RedriveDeadLetters`]), as they were before
    /// failing: original coordinates, key, payload and headers.
    #[serde(default)]
    pub events: Vec<Event>,
}

impl Request {
    /// A new request, with an id sorting after every earlier one of this process.
    pub fn new(
        action: Action,
        topic: &str,
        partition: u32,
        key_id: &str,
        events: Vec<Event>,
    ) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let now = now_ms();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        Self {
            id: format!("{now:013}-{seq:06}-{:08x}", rand::random::<u32>()),
            action,
            topic: topic.to_owned(),
            partition,
            key_id: key_id.to_owned(),
            requested_at_ms: now,
            events,
        }
    }

    /// The key's bytes (`None` for keyless dead letters).
    pub fn key(&self) -> Option<Vec<u8>> {
        if self.key_id.is_empty() {
            return None;
        }
        hex::decode(&self.key_id).ok()
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The readable form of an event key.
pub fn display_key(key: Option<&[u8]>) -> String {
    match key {
        None => String::new(),
        Some(k) => match std::str::from_utf8(k) {
            Ok(s) => s.to_owned(),
            Err(_) => hex::encode(k),
        },
    }
}

/// A write of `value` as JSON at `key`.
pub fn put<T: Serialize>(key: String, value: &T, ttl: Option<Duration>) -> StateWrite {
    StateWrite {
        key,
        // Serializing these plain structs cannot fail.
        value: Some(serde_json::to_vec(value).unwrap_or_default()),
        ttl,
        condition: None,
    }
}

/// A delete of `key`.
pub fn delete(key: String) -> StateWrite {
    StateWrite {
        key,
        value: None,
        ttl: None,
        condition: None,
    }
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, raw: &[u8]) -> BackendResult<T> {
    serde_json::from_slice(raw)
        .map_err(|e| BackendError::Corrupt(format!("parked entry `{what}`: {e}")))
}

/// The parked key `key_id`, if it is parked.
pub async fn key(
    store: &dyn StateStore,
    ns: &str,
    key_id: &str,
) -> BackendResult<Option<ParkedKey>> {
    let entry = key_entry(key_id);
    match store.get(ns, &entry).await? {
        Some(raw) => decode(&entry, &raw).map(Some),
        None => Ok(None),
    }
}

/// Up to `limit` parked keys of the plugin whose parked namespace is `ns`, in key order.
pub async fn keys(store: &dyn StateStore, ns: &str, limit: u32) -> BackendResult<Vec<ParkedKey>> {
    store
        .scan(ns, KEYS_PREFIX, limit)
        .await?
        .iter()
        .map(|(k, v)| decode(k, v))
        .collect()
}

/// The first `limit` events of `key_id`'s queue, in source order.
pub async fn queue(
    store: &dyn StateStore,
    ns: &str,
    key_id: &str,
    limit: u32,
) -> BackendResult<Vec<(String, ParkedEvent)>> {
    store
        .scan(ns, &queue_prefix(key_id), limit)
        .await?
        .into_iter()
        .map(|(k, v)| decode(&k, &v).map(|e| (k, e)))
        .collect()
}

/// Pending requests of `topic` (every partition), oldest first within a partition.
pub async fn requests(
    store: &dyn StateStore,
    ns: &str,
    topic: &str,
    limit: u32,
) -> BackendResult<Vec<(String, Request)>> {
    store
        .scan(ns, &requests_prefix(topic, None), limit)
        .await?
        .into_iter()
        .map(|(k, v)| decode(&k, &v).map(|r| (k, r)))
        .collect()
}

/// File `request` for its pipeline to carry out.
pub async fn file(store: &dyn StateStore, ns: &str, request: &Request) -> BackendResult<()> {
    store
        .apply(ns, &[put(request_entry(request), request, None)])
        .await
        .map(|_| ())
}

/// The event a dead letter was made from: the original coordinates (its
/// `spate-source` header), key, payload and the headers the input carried; `None` for a
/// record that is not a dead letter of this runtime.
pub fn dead_letter_source(record: &Event) -> Option<Event> {
    let source = header_str(&record.headers, headers::SOURCE)?;
    let mut parts = source.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    let topic = parts.next()?.to_owned();
    header_str(&record.headers, headers::DLQ_KIND)?;
    Some(Event {
        topic,
        partition,
        offset,
        key: record.key.clone(),
        payload: record.payload.clone(),
        headers: record
            .headers
            .iter()
            .filter(|h| !headers::is_reserved(&h.name))
            .cloned()
            .collect(),
        timestamp_ms: record.timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_keys_queue_sorts_in_source_order_under_its_prefix() {
        let at = |offset| Event {
            topic: "orders".into(),
            partition: 3,
            offset,
            key: Some(b"c-1".to_vec()),
            payload: vec![],
            headers: vec![],
            timestamp_ms: 0,
        };
        let (a, b) = (queue_entry(&at(9)), queue_entry(&at(10)));
        assert!(a < b, "{a} < {b}");
        assert!(a.starts_with(&queue_prefix(&key_id(Some(b"c-1")))));
        let mut other = at(9);
        other.key = Some(b"c-10".to_vec());
        assert!(!queue_entry(&other).starts_with(&queue_prefix(&key_id(Some(b"c-1")))));
        assert_eq!(namespace("totals"), "_spate/parked/totals");
        assert_eq!(display_key(Some(&[0xff, 0])), "ff00");
    }
}
