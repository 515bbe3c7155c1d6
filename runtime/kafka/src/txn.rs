//! Kafka transactions for exactly-once emits: one transactional producer per plugin and
//! runtime, whose emits become visible together with the consumer positions that cover
//! them (`send_offsets_to_transaction`, fenced by the group generation as in KIP-447).

use crate::bus::KafkaBus;
use crate::source::Members;
use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use spate_core::types::{NewEvent, TopicPartition};
use spate_core::{BackendError, BackendResult, EmitTicket, Transactional, Transactions};
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::{info, warn};

/// Least default `transaction.timeout.ms` (it is at least the produce timeout): how long
/// a transaction left open by a process that died (and never came back with its id) holds
/// back `read_committed` readers.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A transactional producer for one consumer group; see the [module docs](self).
pub struct KafkaTransactions {
    producer: FutureProducer,
    group: String,
    id: String,
    members: Members,
    /// A consumer configuration of the group that never joins it: committed lookups.
    reader: ClientConfig,
    produce_timeout: Duration,
    request_timeout: Duration,
    /// Whether a transaction is open; held across a commit so no send slips between the
    /// offsets and the commit.
    open: tokio::sync::Mutex<bool>,
}

#[async_trait]
impl Transactional for KafkaBus {
    async fn transactions(
        &self,
        id: &str,
        group: &str,
    ) -> BackendResult<std::sync::Arc<dyn Transactions>> {
        let opts = self.options();
        let mut config = opts.producer();
        if !opts.librdkafka.contains_key("transaction.timeout.ms") {
            let timeout = TRANSACTION_TIMEOUT.max(opts.produce_timeout);
            config.set("transaction.timeout.ms", timeout.as_millis().to_string());
        }
        config.set("transactional.id", id);
        let producer: FutureProducer = config.create().map_err(|e| {
            BackendError::Invalid(format!("creating the transactional producer: {e}"))
        })?;
        let timeout = opts.request_timeout.max(Duration::from_secs(10));
        let init = producer.clone();
        // Fences a previous producer with this id and aborts what it left open.
        tokio::task::spawn_blocking(move || init.init_transactions(timeout))
            .await
            .map_err(BackendError::unavailable)?
            .map_err(|e| txn_error("init_transactions", e))?;
        info!(%group, transactional_id = %id, "transactional producer ready");
        Ok(std::sync::Arc::new(KafkaTransactions {
            producer,
            group: group.to_owned(),
            id: id.to_owned(),
            members: self.members(),
            reader: opts.reader(Some(group)),
            produce_timeout: opts.produce_timeout,
            request_timeout: timeout,
            open: tokio::sync::Mutex::new(false),
        }))
    }
}

fn txn_error(what: &str, e: KafkaError) -> BackendError {
    BackendError::Unavailable(format!("Kafka transaction ({what}): {e}"))
}

impl KafkaTransactions {
    /// The group metadata of this process's member consuming `topic`, as of now.
    fn metadata(&self, topic: &str) -> BackendResult<ConsumerGroupMetadata> {
        crate::source::group_metadata(&self.members, &self.group, topic).ok_or_else(|| {
            BackendError::Unavailable(format!(
                "no live member of group `{}` consumes `{topic}`: cannot commit its positions",
                self.group
            ))
        })
    }

    /// Send the offsets and commit, in the open transaction.
    fn commit_blocking(
        producer: &FutureProducer,
        offsets: Vec<(TopicPartitionList, ConsumerGroupMetadata)>,
        timeout: Duration,
    ) -> Result<(), KafkaError> {
        for (tpl, cgm) in &offsets {
            producer.send_offsets_to_transaction(tpl, cgm, timeout)?;
        }
        producer.commit_transaction(timeout)
    }
}

#[async_trait]
impl Transactions for KafkaTransactions {
    async fn send(&self, topic: &str, events: Vec<NewEvent>) -> BackendResult<EmitTicket> {
        let mut open = self.open.lock().await;
        if !*open {
            self.producer
                .begin_transaction()
                .map_err(|e| txn_error("begin_transaction", e))?;
            *open = true;
        }
        let pending = KafkaBus::enqueue(&self.producer, self.produce_timeout, topic, &events)
            .await
            .map_err(|e| crate::backend_error(e, Some(topic)))?;
        drop(open);
        let topic = topic.to_owned();
        Ok(Box::pin(async move {
            KafkaBus::acknowledged(pending)
                .await
                .map_err(|e| crate::backend_error(e, Some(&topic)))
        }))
    }

    async fn commit(
        &self,
        offsets: &[(TopicPartition, u64)],
        checkpoint: &str,
    ) -> BackendResult<()> {
        let mut open = self.open.lock().await;
        if !*open && offsets.is_empty() {
            return Ok(());
        }
        let mut by_topic: BTreeMap<&str, TopicPartitionList> = BTreeMap::new();
        for (tp, next) in offsets {
            let mut e = by_topic
                .entry(tp.topic.as_str())
                .or_default()
                .add_partition(&tp.topic, tp.partition as i32);
            e.set_offset(Offset::Offset(*next as i64))
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
            e.set_metadata(checkpoint);
        }
        let mut batches = Vec::with_capacity(by_topic.len());
        for (topic, tpl) in by_topic {
            batches.push((tpl, self.metadata(topic)?));
        }
        if !*open {
            self.producer
                .begin_transaction()
                .map_err(|e| txn_error("begin_transaction", e))?;
            *open = true;
        }
        let producer = self.producer.clone();
        let timeout = self.request_timeout;
        let result = tokio::task::spawn_blocking(move || {
            match Self::commit_blocking(&producer, batches, timeout) {
                Ok(()) => Ok(()),
                Err(e) => {
                    // Whatever failed, nothing of this transaction may become visible.
                    if let Err(abort) = producer.abort_transaction(timeout) {
                        warn!(error = %abort, "aborting the failed transaction failed too");
                    }
                    Err(e)
                }
            }
        })
        .await
        .map_err(BackendError::unavailable)?;
        *open = false;
        result.map_err(|e| {
            warn!(group = %self.group, transactional_id = %self.id, error = %e, "transaction failed and was aborted");
            txn_error("commit", e)
        })
    }

    async fn committed_checkpoint(&self, tp: &TopicPartition) -> BackendResult<Option<String>> {
        let config = self.reader.clone();
        let timeout = self.request_timeout;
        let tp = tp.clone();
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = config
                .create()
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&tp.topic, tp.partition as i32);
            let committed = consumer
                .committed_offsets(tpl, timeout)
                .map_err(|e| crate::backend_error(e, Some(&tp.topic)))?;
            Ok(committed
                .elements()
                .first()
                .filter(|e| matches!(e.offset(), Offset::Offset(_)))
                .map(|e| e.metadata().to_owned())
                .filter(|m| !m.is_empty()))
        })
        .await
        .map_err(BackendError::unavailable)?
    }

    async fn abort(&self) -> BackendResult<()> {
        let mut open = self.open.lock().await;
        if !*open {
            return Ok(());
        }
        let producer = self.producer.clone();
        let timeout = self.request_timeout;
        let r = tokio::task::spawn_blocking(move || producer.abort_transaction(timeout))
            .await
            .map_err(BackendError::unavailable)?;
        *open = false;
        r.map_err(|e| txn_error("abort", e))
    }
}
