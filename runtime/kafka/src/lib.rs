//! Kafka as Spate's cluster event source and emit target, on `rdkafka` (bundled librdkafka).
//!
//! [`KafkaBus`] implements both seams the dispatcher uses: [`EventSource`] (one consumer
//! group per plugin, cooperative-sticky assignment, optional static membership, explicit
//! commits of the dispatcher's contiguous watermark, revocations that wait for in-flight
//! events and commit before letting partitions go, per-partition pause for backpressure)
//! and [`EventBus`] (an idempotent `acks=all` producer for emits and dead letters, plus the
//! metadata and reads the HTTP API needs). It owns no dispatch logic: ordering, retries and
//! dead-lettering stay in `spate-dispatch`, the same code as on the embedded log.
//!
//! [`EventSource`]: spate_core::EventSource
//! [`EventBus`]: spate_core::EventBus

mod admin;
mod bus;
mod feed;
mod options;
mod produce;
mod read;
mod record;
mod source;
mod subscribe;
mod txn;

pub use bus::{ConnectError, KafkaBus};
pub use feed::KafkaChangeFeed;
pub use options::{KafkaOptions, OptionsError};
pub use txn::KafkaTransactions;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use spate_core::BackendError;

/// Map a librdkafka error to what the dispatcher needs to know: retry (the broker is
/// away), refuse (the request is wrong), or the topic does not exist.
pub(crate) fn backend_error(e: KafkaError, topic: Option<&str>) -> BackendError {
    let code = e.rdkafka_error_code();
    match code {
        Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
            BackendError::UnknownTopic(topic.unwrap_or("?").to_string())
        }
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidArgument,
        ) => BackendError::Invalid(e.to_string()),
        _ => BackendError::Unavailable(e.to_string()),
    }
}
