//! The bus as [`EventSource`]: consumer-group subscriptions (each a
//! [`KafkaSubscription`]) and the groups' committed positions.

use crate::backend_error;
use crate::bus::KafkaBus;
use crate::source::KafkaSubscription;
use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use spate_core::{BackendError, BackendResult, EventSource, StartPosition, Subscription};

#[async_trait]
impl EventSource for KafkaBus {
    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
        start: StartPosition,
    ) -> BackendResult<Box<dyn Subscription>> {
        let [topic] = topics else {
            return Err(BackendError::Invalid(
                "a Kafka subscription consumes exactly one topic".into(),
            ));
        };
        self.require_topic(topic, 0, &[]).await?;
        let config = self
            .opts
            .consumer(group, topic, start == StartPosition::Earliest);
        let sub = KafkaSubscription::start(config, group, topic, &self.opts, &self.members)?;
        Ok(Box::new(sub))
    }

    async fn committed(&self, group: &str, topic: &str) -> BackendResult<Vec<Option<u64>>> {
        let Some(n) = self.topic_partitions(topic).await? else {
            return Err(BackendError::UnknownTopic(topic.to_string()));
        };
        let config = self.opts.reader(Some(group));
        let timeout = self.opts.request_timeout;
        let name = topic.to_string();
        self.blocking(move || {
            let consumer: BaseConsumer = config
                .create()
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..n as i32 {
                tpl.add_partition(&name, p);
            }
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| backend_error(e, Some(&name)))?;
            let mut out = vec![None; n as usize];
            for e in committed.elements() {
                if let (Offset::Offset(o), Some(slot)) =
                    (e.offset(), out.get_mut(e.partition().max(0) as usize))
                {
                    *slot = Some(o.max(0) as u64);
                }
            }
            Ok(out)
        })
        .await
    }
}
