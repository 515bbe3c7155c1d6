//! The Kafka [`EventBus`]: the clients one process shares (producer, metadata, reader,
//! admin) and the trait, whose parts live by job: `produce.rs` (emits and appends),
//! `admin.rs` (topics), `read.rs` (reads for the API) and `subscribe.rs` (the bus as
//! [`EventSource`](spate_core::EventSource)).

use crate::options::KafkaOptions;
use crate::{OptionsError, backend_error};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use spate_core::types::{Appended, Event, NewEvent};
use spate_core::{BackendError, BackendResult, EmitTicket, EventBus};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::info;

/// Kafka as event source and emit target. Cheap to share: clone the `Arc`.
pub struct KafkaBus {
    pub(crate) opts: KafkaOptions,
    /// Replaced when librdkafka declares it dead (a fatal idempotence error, such as
    /// being fenced after delivery timeouts): every later send on it would fail.
    pub(crate) producer: ArcSwap<FutureProducer>,
    /// Metadata and watermark lookups (thread-safe, never assigned).
    pub(crate) meta: Arc<BaseConsumer>,
    /// Reads for the HTTP API: assigned per read, so one at a time.
    pub(crate) reader: Arc<Mutex<BaseConsumer>>,
    pub(crate) admin: AdminClient<DefaultClientContext>,
    /// This process's group consumers, for transactions' offset commits.
    pub(crate) members: crate::source::Members,
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

    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> BackendResult<T> + Send + 'static,
    ) -> BackendResult<T> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| BackendError::Unavailable(format!("Kafka client task failed: {e}")))?
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
