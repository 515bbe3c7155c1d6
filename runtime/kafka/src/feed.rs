//! The shared registry's change notices on a compacted Kafka control topic.
//!
//! A notice is keyed by plugin name (so compaction keeps the newest per plugin) and holds
//! a small JSON body (`{"plugin", "origin", "at_ms"}`); the records themselves live in the
//! cluster store. Each runtime reads the topic from its end at subscription time, without
//! a consumer group (every runtime must see every notice), in a thread of its own.

use crate::options::KafkaOptions;
use crate::{KafkaBus, backend_error};
use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use spate_core::{BackendError, BackendResult, ChangeFeed, EventBus};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Change notices of the shared plugin registry on a Kafka topic.
pub struct KafkaChangeFeed {
    bus: Arc<KafkaBus>,
    topic: String,
    origin: String,
    producer: FutureProducer,
}

impl KafkaChangeFeed {
    /// A feed on `topic` (which must exist, or be creatable: then it is created compacted)
    /// for a runtime called `origin`.
    pub async fn new(bus: Arc<KafkaBus>, topic: &str, origin: &str) -> BackendResult<Self> {
        let opts = bus.options().clone();
        bus.ensure_compacted(topic).await?;
        let mut config = opts.producer();
        // One notice per batch, and no waiting for more: notices are rare and small.
        config.set("linger.ms", "0").set("batch.num.messages", "1");
        let producer: FutureProducer = config
            .create()
            .map_err(|e| BackendError::Invalid(format!("control-topic producer: {e}")))?;
        Ok(Self {
            bus,
            topic: topic.to_string(),
            origin: origin.to_string(),
            producer,
        })
    }

    fn reader(opts: &KafkaOptions, origin: &str) -> BackendResult<BaseConsumer> {
        let group = format!("spate.registry-feed.{origin}");
        let mut config = opts.reader(Some(&group));
        // Notices should arrive within the registry's switch budget.
        config.set("fetch.wait.max.ms", "100");
        config
            .create()
            .map_err(|e| BackendError::Invalid(format!("control-topic consumer: {e}")))
    }
}

#[async_trait]
impl ChangeFeed for KafkaChangeFeed {
    async fn publish(&self, plugin: &str) -> BackendResult<()> {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let body = serde_json::json!({"plugin": plugin, "origin": self.origin, "at_ms": at_ms})
            .to_string();
        let record = FutureRecord::to(&self.topic)
            .key(plugin.as_bytes())
            .payload(body.as_bytes());
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map(|_| ())
            .map_err(|(e, _)| backend_error(e, Some(&self.topic)))
    }

    async fn subscribe(&self) -> BackendResult<mpsc::Receiver<String>> {
        let opts = self.bus.options().clone();
        let partitions = self
            .bus
            .partitions(&self.topic)
            .await?
            .ok_or_else(|| BackendError::UnknownTopic(self.topic.clone()))?;
        let consumer = Self::reader(&opts, &self.origin)?;
        let topic = self.topic.clone();
        let timeout = opts.request_timeout;
        // Start at the current end, resolved now: a notice appended after this call
        // returns is never missed (the caller reads the records after subscribing).
        let consumer = tokio::task::spawn_blocking(move || -> BackendResult<BaseConsumer> {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions as i32 {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(|e| backend_error(e, Some(&topic)))?;
                tpl.add_partition_offset(&topic, p, Offset::Offset(high))
                    .map_err(|e| backend_error(e, Some(&topic)))?;
            }
            consumer
                .assign(&tpl)
                .map_err(|e| backend_error(e, Some(&topic)))?;
            Ok(consumer)
        })
        .await
        .map_err(|e| BackendError::Unavailable(e.to_string()))??;
        let (tx, rx) = mpsc::channel(256);
        let topic = self.topic.clone();
        std::thread::Builder::new()
            .name("registry-feed".into())
            .spawn(move || {
                info!(%topic, "following registry changes");
                while !tx.is_closed() {
                    match consumer.poll(Duration::from_millis(100)) {
                        Some(Ok(m)) => {
                            let Some(name) = m.key().and_then(|k| std::str::from_utf8(k).ok())
                            else {
                                continue;
                            };
                            if tx.blocking_send(name.to_string()).is_err() {
                                break;
                            }
                        }
                        Some(Err(e)) => warn!(%topic, error = %e, "control topic read failed"),
                        None => {}
                    }
                }
            })
            .map_err(|e| BackendError::Unavailable(format!("spawning the feed thread: {e}")))?;
        Ok(rx)
    }
}
