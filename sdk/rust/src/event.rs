//! The input event a handler receives.

use crate::HandlerError;
use crate::wit::types::{Event as RawEvent, Header};
use serde::de::DeserializeOwned;

/// Header in which the runtime passes the 1-based attempt number of this invocation
/// (`"1"` the first time, `"2"` on the first retry, ...). A runtime convention, not part
/// of the WIT record; see [`Event::attempt`].
pub const ATTEMPT_HEADER: &str = "spate-attempt";

/// One input event, as read from its topic.
#[derive(Clone, Debug)]
pub struct Event {
    raw: RawEvent,
}

impl Event {
    /// A new event on `topic` with `payload`, no key, no headers, at partition 0,
    /// offset 0 and time 0. For unit tests of handler logic; the runtime builds the
    /// events a handler really receives.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            raw: RawEvent {
                topic: topic.into(),
                partition: 0,
                offset: 0,
                key: None,
                payload: payload.into(),
                headers: Vec::new(),
                timestamp_ms: 0,
            },
        }
    }

    /// This event with partition key `key` (builder for tests).
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.raw.key = Some(key.into());
        self
    }

    /// This event with one more header (builder for tests).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.raw.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Wrap the generated bindings' event.
    pub fn from_raw(raw: RawEvent) -> Self {
        Self { raw }
    }

    /// The generated bindings' event, for anything the accessors do not cover.
    pub fn into_raw(self) -> RawEvent {
        self.raw
    }

    /// Topic the event was read from; a handler subscribed to several topics
    /// dispatches on it.
    pub fn topic(&self) -> &str {
        &self.raw.topic
    }

    /// Partition of the topic.
    pub fn partition(&self) -> u32 {
        self.raw.partition
    }

    /// Offset of the event within its partition.
    pub fn offset(&self) -> u64 {
        self.raw.offset
    }

    /// Time the event was appended, in milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> i64 {
        self.raw.timestamp_ms
    }

    /// The partition key bytes, if the event has a key.
    pub fn key(&self) -> Option<&[u8]> {
        self.raw.key.as_deref()
    }

    /// The partition key as text; `None` if the event has no key or it is not UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The event body.
    pub fn payload(&self) -> &[u8] {
        &self.raw.payload
    }

    /// The event body as text; rejects the event if it is not UTF-8.
    pub fn payload_str(&self) -> Result<&str, HandlerError> {
        std::str::from_utf8(&self.raw.payload)
            .map_err(|e| HandlerError::reject(format!("event payload is not UTF-8: {e}")))
    }

    /// The event body parsed as JSON into `T`.
    ///
    /// A payload that is not valid JSON, or lacks a field `T` requires, rejects the
    /// event with serde's reason, e.g. ``event payload is not a valid Order: missing
    /// field `amount_cents` at line 1 column 42``.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.raw.payload).map_err(|e| {
            HandlerError::reject(format!(
                "event payload is not a valid {}: {e}",
                short_type_name::<T>()
            ))
        })
    }

    /// The value of the first header called `name` (compared ASCII case-insensitively).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.raw
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// The value of the first header called `name` as text; `None` if absent or not UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// All headers as `(name, value)`, in the order they were written.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.raw
            .headers
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_slice()))
    }

    /// The 1-based attempt number of this invocation, from the [`ATTEMPT_HEADER`]
    /// header the runtime sets; 1 if the header is absent or unreadable.
    pub fn attempt(&self) -> u32 {
        self.header_str(ATTEMPT_HEADER)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1)
    }
}

/// `Order` rather than `my_plugin::model::Order`: reasons end up in dead-letter records.
fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    let base = full.split('<').next().unwrap_or(full);
    match base.rfind("::") {
        Some(i) if base.len() == full.len() => &full[i + 2..],
        _ => full,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code, reason = "fields exist to be required")]
    struct Order {
        order_id: String,
        amount_cents: u64,
    }

    #[test]
    fn json_rejects_missing_fields_with_a_clear_reason() {
        let ev = Event::new("orders", br#"{"order_id":"o-1"}"#.to_vec());
        let err = ev.json::<Order>().unwrap_err();
        assert!(err.is_reject());
        assert!(
            err.reason()
                .starts_with("event payload is not a valid Order: missing field `amount_cents`"),
            "{err}"
        );
        let err = Event::new("orders", "not json")
            .json::<Order>()
            .unwrap_err();
        assert!(err.reason().contains("expected ident"), "{err}");
    }

    #[test]
    fn accessors() {
        let ev = Event::new("orders", "{}")
            .with_key("c-42")
            .with_header("Content-Type", "application/json")
            .with_header(ATTEMPT_HEADER, "3");
        assert_eq!(ev.key_str(), Some("c-42"));
        assert_eq!(ev.header_str("content-type"), Some("application/json"));
        assert_eq!(ev.header("missing"), None);
        assert_eq!(ev.attempt(), 3);
        assert_eq!(ev.headers().count(), 2);
        assert_eq!(Event::new("t", "").attempt(), 1);
        assert_eq!(Event::new("t", "").with_key(vec![0xff]).key_str(), None);
    }
}
