//! Parked keys: with `on-failure = "park-key"`, an event that exhausts its attempts (or is
//! rejected) is parked with every later event of its key, in key order, instead of being
//! dead-lettered while the key's later events run on a state missing it.
//!
//! Parked events are state: they live in the plugin's parked namespace
//! (`_spate/parked/<state namespace>`, which no manifest may claim) and are written
//! through the checkpoint like any state write, so they become durable together with the
//! source positions that moved past them. Layout (keys are text; `<k>` is the event key in
//! hex, empty for keyless events):
//! - `k/<k>`: a [`ParkedKey`], present while the key is parked;
//! - `q/<k>/<topic>/<partition:010>/<offset:020>`: a [`ParkedEvent`], the key's queue in
//!   source order (one key's events share a partition; a redelivered event lands on the
//!   same entry, so parking is idempotent).

use crate::manifest::RESERVED_NAMESPACE_PREFIX;
use crate::types::Event;
use serde::{Deserialize, Serialize};

/// Where `namespace`'s plugin keeps its parked keys and events.
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
        "q/{}/{}/{:010}/{:020}",
        key_id(event.key.as_deref()),
        event.topic,
        event.partition,
        event.offset
    )
}

/// A parked key: since when, why, by which version, and how many events wait.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedKey {
    /// The event key, as text when it is UTF-8 (else hex).
    pub key: String,
    /// Wall-clock millis when the first event was parked.
    pub since_ms: u64,
    /// Why the first event was parked.
    pub first_reason: String,
    /// The version that failed it.
    pub version: String,
    /// Events parked so far (the failed one and those queued behind it).
    pub events: u64,
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
    /// Attempts made (0 for an event queued without a call).
    pub attempts: u32,
    /// The version that handled it (or was active when it queued).
    pub version: String,
    /// Wall-clock millis when it was parked.
    pub parked_at_ms: u64,
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
