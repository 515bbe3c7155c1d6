//! Topics: metadata lookups, creation (when allowed) and end offsets.

use crate::backend_error;
use crate::bus::KafkaBus;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::Consumer;
use rdkafka::error::RDKafkaErrorCode;
use spate_core::{BackendError, BackendResult};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::info;

impl KafkaBus {
    /// Partition count of `topic` from fresh metadata, `None` if it does not exist.
    pub(crate) async fn topic_partitions(&self, topic: &str) -> BackendResult<Option<u32>> {
        let meta = Arc::clone(&self.meta);
        let timeout = self.opts.request_timeout;
        let name = topic.to_string();
        self.blocking(move || {
            let md = meta
                .fetch_metadata(Some(&name), timeout)
                .map_err(|e| backend_error(e, Some(&name)))?;
            let Some(t) = md.topics().iter().find(|t| t.name() == name) else {
                return Ok(None);
            };
            match t.error() {
                None if !t.partitions().is_empty() => Ok(Some(t.partitions().len() as u32)),
                None => Ok(None),
                Some(code) => {
                    let code: RDKafkaErrorCode = code.into();
                    match code {
                        RDKafkaErrorCode::UnknownTopicOrPartition
                        | RDKafkaErrorCode::UnknownTopic => Ok(None),
                        other => Err(BackendError::Unavailable(format!(
                            "metadata of `{name}`: {other}"
                        ))),
                    }
                }
            }
        })
        .await
    }

    /// A missing topic is an error unless topics may be created.
    /// With `partitions` 0, topics are created with `partitions` from the options; the
    /// `configs` apply to a created topic.
    pub(crate) async fn require_topic(
        &self,
        topic: &str,
        partitions: u32,
        configs: &[(&str, &str)],
    ) -> BackendResult<u32> {
        match self.topic_partitions(topic).await? {
            Some(n) => Ok(n),
            None if self.opts.create_topics => {
                let partitions = match partitions {
                    0 => self.opts.partitions as u32,
                    n => n,
                };
                self.create_topic_with(topic, partitions, configs).await
            }
            None => Err(BackendError::UnknownTopic(topic.to_string())),
        }
    }

    /// A compacted topic (the registry's control topic): must exist, or is created
    /// compacted with one partition if topics may be created.
    pub(crate) async fn ensure_compacted(&self, topic: &str) -> BackendResult<()> {
        self.require_topic(topic, 1, &[("cleanup.policy", "compact")])
            .await
            .map(|_| ())
    }

    pub(crate) async fn create_topic_with(
        &self,
        topic: &str,
        partitions: u32,
        configs: &[(&str, &str)],
    ) -> BackendResult<u32> {
        let partitions = partitions.max(1) as i32;
        let mut new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.opts.replication_factor),
        );
        for (k, v) in configs {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(self.opts.request_timeout));
        let results = self
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| backend_error(e, Some(topic)))?;
        for r in results {
            match r {
                Ok(_) => info!(topic, partitions, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(BackendError::Invalid(format!(
                        "creating topic `{topic}`: {code}"
                    )));
                }
            }
        }
        // Metadata lags creation a little; wait until the partitions are visible.
        let deadline = Instant::now() + self.opts.request_timeout;
        loop {
            if let Some(n) = self.topic_partitions(topic).await? {
                return Ok(n);
            }
            if Instant::now() > deadline {
                return Err(BackendError::Unavailable(format!(
                    "topic `{topic}` was created but its metadata did not appear"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn ends(&self, topic: &str) -> BackendResult<Vec<u64>> {
        let Some(n) = self.topic_partitions(topic).await? else {
            return Err(BackendError::UnknownTopic(topic.to_string()));
        };
        let meta = Arc::clone(&self.meta);
        let timeout = self.opts.request_timeout;
        let name = topic.to_string();
        self.blocking(move || {
            (0..n as i32)
                .map(|p| {
                    meta.fetch_watermarks(&name, p, timeout)
                        .map(|(_, high)| high.max(0) as u64)
                        .map_err(|e| backend_error(e, Some(&name)))
                })
                .collect()
        })
        .await
    }
}
