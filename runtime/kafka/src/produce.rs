//! Emits and appends: the idempotent producer, events handed to it in order, their
//! acknowledgements, and replacing a producer librdkafka declared dead.

use crate::bus::KafkaBus;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KHeader, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use spate_core::types::{Appended, NewEvent};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

impl KafkaBus {
    pub(crate) fn record(event: &NewEvent) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(event.headers.len());
        for header in &event.headers {
            h = h.insert(KHeader {
                key: &header.name,
                value: Some(&header.value),
            });
        }
        h
    }

    /// A producer librdkafka declared dead (a fatal idempotence error), or one the broker
    /// fenced (after delivery timeouts its epoch can be refused for good), fails every send
    /// from then on: replace it, so the retried events go out on a new one.
    pub(crate) fn replace_if_dead(&self, dead: &Arc<FutureProducer>, error: &KafkaError) {
        let fenced = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
            )
        );
        let (code, reason) = match dead.client().fatal_error() {
            Some(fatal) => fatal,
            None if fenced => (
                error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail),
                error.to_string(),
            ),
            None => return,
        };
        match self.opts.producer().create::<FutureProducer>() {
            Ok(fresh) => {
                let previous = self.producer.compare_and_swap(dead, Arc::new(fresh));
                if Arc::ptr_eq(&previous, dead) {
                    warn!(%code, %reason, "the idempotent producer hit a fatal error; replaced it (events in flight are retried, downstream dedupes by spate-idempotency-id)");
                    metrics::counter!(spate_core::metric_names::KAFKA_PRODUCER_RESETS_TOTAL)
                        .increment(1);
                }
            }
            Err(e) => warn!(error = %e, "could not replace a dead producer; retrying later"),
        }
    }

    /// Enqueue `events` in order, then wait for every acknowledgement.
    pub(crate) async fn send_all(
        producer: &FutureProducer,
        produce_timeout: Duration,
        topic: &str,
        events: &[NewEvent],
    ) -> Result<Vec<Appended>, KafkaError> {
        let pending = Self::enqueue(producer, produce_timeout, topic, events).await?;
        Self::acknowledged(pending).await
    }

    /// Hand every event to the producer's queue, in order (waiting while it is full).
    pub(crate) async fn enqueue(
        producer: &FutureProducer,
        produce_timeout: Duration,
        topic: &str,
        events: &[NewEvent],
    ) -> Result<Vec<DeliveryFuture>, KafkaError> {
        let mut pending: Vec<DeliveryFuture> = Vec::with_capacity(events.len());
        for event in events {
            let headers = Self::record(event);
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
                .payload(&event.payload[..])
                .headers(headers);
            if let Some(k) = &event.key {
                record = record.key(&k[..]);
            }
            let mut record = record;
            let deadline = Instant::now() + produce_timeout;
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        Ok(pending)
    }

    /// Wait for the broker to acknowledge every enqueued event.
    pub(crate) async fn acknowledged(
        pending: Vec<DeliveryFuture>,
    ) -> Result<Vec<Appended>, KafkaError> {
        let mut out = Vec::with_capacity(pending.len());
        for f in pending {
            match f.await {
                Ok(Ok(d)) => out.push(Appended {
                    partition: d.partition.max(0) as u32,
                    offset: d.offset.max(0) as u64,
                }),
                Ok(Err((e, _))) => return Err(e),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        Ok(out)
    }
}
