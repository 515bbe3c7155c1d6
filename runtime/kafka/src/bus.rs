//! The Kafka [`EventBus`] (idempotent producer, metadata, reads) and [`EventSource`].

use crate::options::KafkaOptions;
use crate::record::to_event;
use crate::source::KafkaSubscription;
use crate::{OptionsError, backend_error};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KHeader, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use spate_core::types::{Appended, Event, NewEvent};
use spate_core::{
    BackendError, BackendResult, EmitTicket, EventBus, EventSource, StartPosition, Subscription,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Kafka as event source and emit target. Cheap to share: clone the `Arc`.
pub struct KafkaBus {
    opts: KafkaOptions,
    /// Replaced when librdkafka declares it dead (a fatal idempotence error, such as
    /// being fenced after delivery timeouts): every later send on it would fail.
    producer: ArcSwap<FutureProducer>,
    /// Metadata and watermark lookups (thread-safe, never assigned).
    meta: Arc<BaseConsumer>,
    /// Reads for the HTTP API: assigned per read, so one at a time.
    reader: Arc<Mutex<BaseConsumer>>,
    admin: AdminClient<DefaultClientContext>,
    /// This process's group consumers, for transactions' offset commits.
    members: crate::source::Members,
}

/// Why [`KafkaBus::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The settings are wrong.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// librdkafka refused the configuration.
    #[error("librdkafka refused the configuration: {0}")]
    Config(KafkaError),
    /// No broker answered.
    #[error(
        "cannot reach Kafka at `{servers}` within {timeout:?}: {error} (check events.bootstrap-servers and that the brokers are up and reachable from here)"
    )]
    Unreachable {
        /// `bootstrap.servers`.
        servers: String,
        /// How long it waited.
        timeout: Duration,
        /// What librdkafka said.
        error: String,
    },
}

impl KafkaBus {
    /// Connect to the cluster and check that a broker answers.
    pub async fn connect(opts: KafkaOptions) -> Result<Arc<Self>, ConnectError> {
        opts.validate()?;
        let producer: FutureProducer = opts.producer().create().map_err(ConnectError::Config)?;
        let meta: BaseConsumer = opts.reader(None).create().map_err(ConnectError::Config)?;
        let reader: BaseConsumer = opts.reader(None).create().map_err(ConnectError::Config)?;
        let admin: AdminClient<DefaultClientContext> =
            opts.admin().create().map_err(ConnectError::Config)?;
        let bus = Arc::new(Self {
            opts,
            producer: ArcSwap::from_pointee(producer),
            meta: Arc::new(meta),
            reader: Arc::new(Mutex::new(reader)),
            admin,
            members: Arc::default(),
        });
        let timeout = bus.opts.request_timeout;
        let meta = Arc::clone(&bus.meta);
        let brokers = tokio::task::spawn_blocking(move || {
            meta.fetch_metadata(None, timeout)
                .map(|m| m.brokers().len())
        })
        .await
        .map_err(|e| ConnectError::Unreachable {
            servers: bus.opts.bootstrap_servers.clone(),
            timeout,
            error: e.to_string(),
        })?
        .map_err(|e| ConnectError::Unreachable {
            servers: bus.opts.bootstrap_servers.clone(),
            timeout,
            error: e.to_string(),
        })?;
        info!(servers = %bus.opts.bootstrap_servers, brokers, "connected to Kafka");
        Ok(bus)
    }

    /// The options it was built from.
    pub fn options(&self) -> &KafkaOptions {
        &self.opts
    }

    pub(crate) fn members(&self) -> crate::source::Members {
        Arc::clone(&self.members)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> BackendResult<T> + Send + 'static,
    ) -> BackendResult<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| BackendError::Unavailable(format!("Kafka client task failed: {e}")))?
    }

    /// Partition count of `topic` from fresh metadata, `None` if it does not exist.
    async fn topic_partitions(&self, topic: &str) -> BackendResult<Option<u32>> {
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

    async fn create_topic_with(
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

    fn record(event: &NewEvent) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(event.headers.len());
        for header in &event.headers {
            h = h.insert(KHeader {
                key: &header.name,
                value: Some(&header.value),
            });
        }
        h
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn append(&self, topic: &str, events: Vec<NewEvent>) -> BackendResult<Vec<Appended>> {
        // Enqueue all, in order, then wait for every acknowledgement: the caller commits
        // its input only after this returns, so emits are on the broker (acks=all) first.
        let producer = self.producer.load_full();
        Self::send_all(&producer, self.opts.produce_timeout, topic, &events)
            .await
            .map_err(|e| {
                self.replace_if_dead(&producer, &e);
                backend_error(e, Some(topic))
            })
    }

    async fn send(&self, topic: &str, events: Vec<NewEvent>) -> BackendResult<EmitTicket> {
        // Enqueued in order now; acknowledged (acks=all) when the ticket resolves.
        let producer = self.producer.load_full();
        let pending = Self::enqueue(&producer, self.opts.produce_timeout, topic, &events)
            .await
            .map_err(|e| {
                self.replace_if_dead(&producer, &e);
                backend_error(e, Some(topic))
            })?;
        // A producer that died meanwhile fails the ticket; the caller sends again, and that
        // send finds it dead and replaces it.
        let topic = topic.to_owned();
        Ok(Box::pin(async move {
            Self::acknowledged(pending)
                .await
                .map_err(|e| backend_error(e, Some(&topic)))
        }))
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> BackendResult<Vec<Event>> {
        self.read_partition(topic, partition, from, max).await
    }

    async fn partitions(&self, topic: &str) -> BackendResult<Option<u32>> {
        self.topic_partitions(topic).await
    }

    async fn ensure_topic(&self, topic: &str, partitions: u32) -> BackendResult<u32> {
        self.require_topic(topic, partitions, &[]).await
    }

    async fn end_offsets(&self, topic: &str) -> BackendResult<Vec<u64>> {
        self.ends(topic).await
    }
}

impl KafkaBus {
    /// A producer librdkafka declared dead (a fatal idempotence error), or one the broker
    /// fenced (after delivery timeouts its epoch can be refused for good), fails every send
    /// from then on: replace it, so the retried events go out on a new one.
    fn replace_if_dead(&self, dead: &Arc<FutureProducer>, error: &KafkaError) {
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
    async fn send_all(
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

    async fn read_partition(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> BackendResult<Vec<Event>> {
        let reader = Arc::clone(&self.reader);
        let timeout = self.opts.request_timeout;
        let name = topic.to_string();
        self.blocking(move || {
            let reader = reader
                .lock()
                .map_err(|_| BackendError::Unavailable("reader lock poisoned".into()))?;
            let (_, high) = reader
                .fetch_watermarks(&name, partition as i32, timeout)
                .map_err(|e| backend_error(e, Some(&name)))?;
            let high = high.max(0) as u64;
            if from >= high || max == 0 {
                return Ok(Vec::new());
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&name, partition as i32, Offset::Offset(from as i64))
                .map_err(|e| backend_error(e, Some(&name)))?;
            reader
                .assign(&tpl)
                .map_err(|e| backend_error(e, Some(&name)))?;
            let mut out = Vec::new();
            let deadline = Instant::now() + timeout;
            while out.len() < max && Instant::now() < deadline {
                match reader.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        let e = to_event(&m);
                        let done = e.offset + 1 >= high;
                        if e.offset >= from {
                            out.push(e);
                        }
                        if done {
                            break;
                        }
                    }
                    Some(Err(e)) => warn!(error = %e, "read failed; retrying"),
                    None => {}
                }
            }
            let _ = reader.unassign();
            Ok(out)
        })
        .await
    }

    async fn ends(&self, topic: &str) -> BackendResult<Vec<u64>> {
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
