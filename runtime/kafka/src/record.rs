//! Kafka records as Spate's events: what the bus's reads and the subscriptions' fetches
//! both turn a consumed message into.

use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};
use spate_core::types::{Event, Header};

/// An [`Event`] from a consumed Kafka message.
pub(crate) fn to_event(m: &BorrowedMessage<'_>) -> Event {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    name: h.key.to_string(),
                    value: h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    Event {
        topic: m.topic().to_string(),
        partition: m.partition().max(0) as u32,
        offset: m.offset().max(0) as u64,
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
    }
}
