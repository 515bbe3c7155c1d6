//! A real Kafka-protocol broker for tests — a `tansu` child process on a free loopback port
//! with memory storage, killed on drop — and rdkafka-based helpers that produce, read back,
//! and inspect offsets the way a test checks what a consumer did. It does not implement any
//! part of Spate's Kafka consumer; it is what that consumer is tested against.
//!
//! The broker binary is found at `$SPATE_TANSU`, else `$SPATE_CACHE_DIR/tools/bin/tansu`,
//! else `~/.cache/spate/tools/bin/tansu`, else `tansu` on `PATH`; a missing one fails with
//! [`TANSU_INSTALL_HINT`], never a silent skip. The broker runs in a temporary directory (so
//! its `.env` lookup cannot pick up the repository's) with its output in `tansu.log` there;
//! the directory is kept when a test panics, so the path in the panic message stays readable.
//!
//! # What tansu 0.6.0 (memory storage) does differently from Apache Kafka
//!
//! Measured with rdkafka 0.39 (librdkafka 2.12) on two cores by `tests/kafka_broker.rs`
//! (run it with `--nocapture` to see the numbers again) and read in tansu's source. The
//! first two cost data if a test ignores them.
//!
//! - **A fetch from an offset inside a batch skips the rest of that batch.** tansu stores
//!   each produced batch as one object and serves a fetch at offset `o` from the batches
//!   whose *base* offset is `>= o`: a consumer resuming at a committed offset 5 inside a
//!   ten-record batch 0–9 read 10, 11, … — 5–9 never arrive. Its offset arithmetic can also
//!   return a later batch twice in one response. A consumer that restarts, or takes over a
//!   partition in a rebalance, at an offset that is not a batch boundary loses records. Tests
//!   that do that must produce their input with [`produce_unbatched`] (every record its own
//!   batch, so every offset is a boundary); [`produce`] lets librdkafka batch.
//! - **`ListOffsets(latest)` is short by the newest batch**: it answers the newest batch's
//!   base offset plus one — 1 after one ten-record batch, 51 after two 50-record batches. So
//!   `fetch_watermarks`, `Offset::End`, `auto.offset.reset=latest` and lag computed from them
//!   are wrong: a `latest` consumer started at offset 1 of a ten-record topic and then got
//!   the next batch twice. Fetch responses carry the right high watermark, and
//!   [`end_offsets`] relies on them. `ListOffsets(earliest)` and by-timestamp lookups go by
//!   the batches' write times, not record timestamps. Start test consumers with `earliest`.
//! - **No automatic topic creation.** Metadata for a missing topic answers
//!   `UnknownTopicOrPartition` whatever `allow.auto.create.topics` says (a subscribed
//!   consumer's `poll` returns that error); producing to a missing topic fails each record
//!   with `MessageTimedOut` after `message.timeout.ms` (3.1 s for 3 s), librdkafka waiting
//!   for the topic until then. Create every topic first ([`KafkaBroker::create_topic`]).
//! - **Topic configs are stored, not enforced.** `cleanup.policy=compact` is accepted, but the
//!   memory engine has no cleaner: a "compacted" topic keeps every version of every key, and
//!   tombstones stay. `DescribeConfigs` returns only the configs given at creation (no broker
//!   defaults), which is why some clients want `retention.ms` given explicitly;
//!   [`KafkaBroker::create_topic`] sets it to -1. rdkafka itself needs no topic config.
//! - **Created topics are visible at once**: every partition has a leader (node 0, at the
//!   advertised address) in the first metadata answer; `create_topic` takes about 0.2 s.
//! - **Fetches are held at least half of `fetch.wait.max.ms`, even with records waiting**:
//!   produce-to-consume latency was 270–500 ms at librdkafka's default 500, 3–100 ms at 100,
//!   3–13 ms at 10. Set `fetch.wait.max.ms` to 100 or less in tests that measure latency or
//!   wait for a record (the helpers here use 100).
//! - **Group joins**: a first member was assigned every partition 3–53 ms after `subscribe`,
//!   but every later join — a second member, a member rejoining — takes 3.0 s: tansu pauses a
//!   follower's join for 3 s, with `range` and `cooperative-sticky` alike. A member that
//!   closes (LeaveGroup; `close` took 0.1 s) hands its partitions to the others within a few
//!   milliseconds; one that is killed (SIGKILL) loses them after `session.timeout.ms` (6.0 s
//!   with 6000). `cooperative-sticky` is incremental: the first member saw `assign {0,1,2}`,
//!   then `revoke {0}` and empty incremental assigns, the second `assign {0}`. Wait for
//!   assignments with timeouts of tens of seconds, never fixed sleeps.
//! - **Committed offsets** (any offset, not only consumed ones) survive the committing
//!   consumer, and [`committed_offsets`] reads them back with any client; a partition the
//!   group never committed answers `None`, as does every partition for another group.
//! - **Idempotent producers work**: offsets start at 0, contiguous, no duplicates across
//!   producer sessions. A new idempotent producer takes about 0.5 s to its first delivery (a
//!   non-idempotent one about 2 ms), so each [`produce`] call costs about 0.6 s.
//! - **Memory storage**: a restart ([`KafkaBroker::restart`]) loses topics, records and
//!   committed offsets. To cut the network without losing data use
//!   [`KafkaBroker::start_behind_proxy`]: while cut, a produce with a 2 s message timeout
//!   failed with `MessageTimedOut` after 2.1–3.1 s; after restore a new producer delivered
//!   in 0.6 s and every earlier record was still there.
//! - **Process**: it is ready about 10 ms after start, opens only the one listener (no
//!   metrics port; OTLP export only when asked), and reads `.env` from its working directory
//!   upwards. librdkafka (not tansu) refuses `assign` without a `group.id`.

use crate::services::{FaultProxy, free_port, wait_listening};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a started broker gets to answer a metadata request.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one metadata request may take in the helpers' wait loops.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`produce`] waits for every record to be acknowledged.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// `fetch.wait.max.ms` of the helpers' consumers: tansu holds every fetch for at least half
/// of it, even when it has records (see the module docs).
const FETCH_WAIT_MS: &str = "100";

/// How many bytes of the broker's log a panic message quotes.
const LOG_TAIL_BYTES: u64 = 4096;

/// `retention.ms` given to every created topic: keep records forever. tansu stores topic
/// configs without broker defaults, and clients that read the topic's configs back need it.
const RETENTION_MS: &str = "-1";

/// What to run when the `tansu` binary is missing.
pub const TANSU_INSTALL_HINT: &str = "the tansu broker binary was not found; the Kafka tests \
     start their own on a free loopback port. Install it once (about 25 minutes) with \
     `. scripts/env.sh && spate_install_tansu`, or by hand with `cargo install tansu --version \
     0.6.0 --no-default-features --features dynostore --locked --root ~/.cache/spate/tools`, \
     or set SPATE_TANSU to the binary's path";

/// The `tansu` binary: `$SPATE_TANSU`, else the cached install, else the first on `PATH`.
fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SPATE_TANSU") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "SPATE_TANSU={} does not exist. {TANSU_INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    let cache_dirs = [
        std::env::var_os("SPATE_CACHE_DIR").map(PathBuf::from),
        std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/spate")),
    ];
    let cached = cache_dirs
        .into_iter()
        .flatten()
        .map(|dir| dir.join("tools/bin/tansu"))
        .find(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("tansu"))
                .find(|p| p.is_file())
        })
    };
    cached
        .or_else(on_path)
        .unwrap_or_else(|| panic!("{TANSU_INSTALL_HINT}"))
}

/// A client configuration for the broker at `bootstrap`: IPv4 loopback, quick reconnects.
fn client_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "500");
    config
}

/// A consumer that never joins a group: for metadata, watermarks and assigned reads.
/// librdkafka refuses `assign` without a `group.id` ("Unknown group"), so it gets a unique
/// one that never subscribes or commits.
fn plain_consumer(bootstrap: &str) -> BaseConsumer {
    client_config(bootstrap)
        .set("group.id", format!("spate-harness-{}", crate::unique_id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", FETCH_WAIT_MS)
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka consumer for {bootstrap}: {e}"))
}

/// The number of partitions of `topic`, once metadata shows it with a leader for each, or
/// `None` if that does not happen within `timeout`.
fn partition_count(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Option<usize> {
    let started = Instant::now();
    loop {
        if let Ok(metadata) = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
            let ready = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .filter(|t| {
                    t.error().is_none()
                        && !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.error().is_none() && p.leader() >= 0)
                });
            if let Some(t) = ready {
                return Some(t.partitions().len());
            }
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `tansu` broker child process on a free loopback port, memory storage. Killed on drop.
///
/// Memory storage means everything — topics, records, committed offsets — lives in the
/// process: [`KafkaBroker::stop`] or [`KafkaBroker::restart`] lose it all. To cut the
/// network without losing data, use [`KafkaBroker::start_behind_proxy`].
pub struct KafkaBroker {
    /// Where tansu listens.
    port: u16,
    /// Where clients connect, and what metadata advertises: `port`, or a proxy's port.
    advertised: u16,
    /// The broker's working directory, holding `tansu.log`.
    dir: Option<tempfile::TempDir>,
    /// The running process; behind a lock so [`KafkaBroker::is_running`] can reap it.
    child: Mutex<Option<Child>>,
}

impl KafkaBroker {
    /// Start one; waits until it answers a metadata request. Panics with
    /// [`TANSU_INSTALL_HINT`] if the binary is missing.
    pub fn start() -> Self {
        let port = free_port();
        Self::start_advertising(port, port)
    }

    /// Start one whose advertised listener is a [`FaultProxy`] in front of it, so tests can
    /// cut the network to the broker ([`FaultProxy::cut`], [`FaultProxy::restore`]) without
    /// losing its in-memory data. [`KafkaBroker::bootstrap`] is the proxy's address, and so
    /// is every broker address clients learn from metadata; drop the broker before the proxy.
    pub fn start_behind_proxy() -> (Self, FaultProxy) {
        let port = free_port();
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)));
        let broker = Self::start_advertising(port, proxy.addr().port());
        (broker, proxy)
    }

    fn start_advertising(port: u16, advertised: u16) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("spate-tansu-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut broker = Self {
            port,
            advertised,
            dir: Some(dir),
            child: Mutex::new(None),
        };
        broker.restart();
        broker
    }

    /// `host:port` clients use (`bootstrap.servers`).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    /// The broker's output (all of its runs), kept when a test panics.
    pub fn log_path(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join("tansu.log"))
            .unwrap_or_default()
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *child = None;
                false
            }
            None => false,
        }
    }

    /// Kill the broker at once (SIGKILL: no goodbye to clients) and wait for it to exit.
    /// Memory storage: its topics, records and committed offsets are gone.
    pub fn stop(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the broker again on the same ports (after [`KafkaBroker::stop`], or killing a
    /// running one first) and wait until it answers. It comes back **empty**: memory storage
    /// loses every topic, record and committed offset, so recreate the topics. Clients that
    /// stayed connected reconnect by themselves.
    pub fn restart(&mut self) {
        self.stop();
        let binary = tansu_binary();
        let dir = self
            .dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_else(std::env::temp_dir);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path().display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path().display()));
        let mut command = Command::new(&binary);
        // Flags override the environment, but a variable the broker reads and we pass no
        // flag for (schema registry, OTLP exporter, data lake) must not leak in from the
        // test's environment.
        for var in [
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
            "SCHEMA_REGISTRY",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "DATA_LAKE",
        ] {
            command.env_remove(var);
        }
        let child = command
            .args([
                "broker",
                "--cluster-id",
                "spate-test",
                "--listener-url",
                &format!("tcp://127.0.0.1:{}", self.port),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{}", self.advertised),
                "--storage-engine",
                "memory://tansu/",
            ])
            .env(
                "RUST_LOG",
                std::env::var("SPATE_TANSU_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {}: {e}. {TANSU_INSTALL_HINT}", binary.display())
            });
        *self.child.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(child);
        self.wait_ready();
    }

    /// Waits until the broker listens and answers a metadata request through the advertised
    /// address; panics with the log tail after [`START_TIMEOUT`] or if the process exits.
    fn wait_ready(&self) {
        let started = Instant::now();
        let what = format!("the tansu broker (log: {})", self.log_path().display());
        wait_listening(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            &what,
            START_TIMEOUT,
        );
        let consumer = plain_consumer(&self.bootstrap());
        loop {
            let answered = consumer
                .fetch_metadata(None, Duration::from_millis(500))
                .is_ok_and(|m| !m.brokers().is_empty());
            if answered {
                return;
            }
            if !self.is_running() {
                panic!(
                    "the tansu broker exited during start-up; {}",
                    self.log_tail()
                );
            }
            if started.elapsed() >= START_TIMEOUT {
                panic!(
                    "the tansu broker did not answer a metadata request on {} within \
                     {START_TIMEOUT:?}; {}",
                    self.bootstrap(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of the broker's log, for panic messages.
    fn log_tail(&self) -> String {
        let path = self.log_path();
        let mut tail = String::new();
        if let Ok(mut file) = File::open(&path) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            tail = String::from_utf8_lossy(&bytes).into_owned();
        }
        format!("log {}:\n{tail}", path.display())
    }

    /// Create a topic (rdkafka `AdminClient`), waiting until its metadata shows all
    /// partitions with a leader. Sets `retention.ms=-1` (see the module docs).
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]).await;
    }

    /// Create a compacted topic (`cleanup.policy=compact`). tansu stores the policy but
    /// never compacts: consumers still see every record.
    pub async fn create_compacted_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[("cleanup.policy", "compact")])
            .await;
    }

    /// Create a topic with extra topic configs, then wait as [`KafkaBroker::create_topic`].
    pub async fn create_topic_with(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.bootstrap())
            .create()
            .unwrap_or_else(|e| panic!("cannot create a Kafka admin client: {e}"));
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1))
            .set("retention.ms", RETENTION_MS);
        for (key, value) in configs {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics([&topic], &options)
            .await
            .unwrap_or_else(|e| panic!("CreateTopics {name}: {e}; {}", self.log_tail()));
        for result in results {
            if let Err((topic, code)) = result {
                panic!("cannot create topic {topic}: {code}; {}", self.log_tail());
            }
        }
        let bootstrap = self.bootstrap();
        let topic_name = name.to_owned();
        let seen = tokio::task::spawn_blocking(move || {
            partition_count(&plain_consumer(&bootstrap), &topic_name, START_TIMEOUT)
        })
        .await
        .unwrap_or_else(|e| panic!("metadata wait for {name}: {e}"));
        let expected = usize::try_from(partitions).unwrap_or(0);
        assert_eq!(
            seen,
            Some(expected),
            "topic {name} did not show {partitions} partitions in metadata within \
             {START_TIMEOUT:?}; {}",
            self.log_tail()
        );
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.stop();
        // A panicking test named the log in its message: keep it readable.
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let _ = dir.keep();
        }
    }
}

/// A record read back from a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The key, if it has one.
    pub key: Option<Vec<u8>>,
    /// The value; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers in order; a header with a null value reads as an empty one.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Its partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// Its timestamp in milliseconds since the epoch, if it has one.
    pub timestamp: Option<i64>,
}

/// A record to produce: [`produce_records`] gives the full control [`produce`] does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewRecord {
    /// The key, if any: records with the same key land in the same partition.
    pub key: Option<Vec<u8>>,
    /// The value; `None` produces a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// An explicit partition; `None` lets the partitioner choose (by key hash).
    pub partition: Option<i32>,
}

/// Produce `records` (key, payload) to `topic` with an idempotent producer (`acks=all`),
/// returning the (partition, offset) of each, in order. Panics if any is not acknowledged
/// within 30 s.
pub async fn produce(
    bootstrap: &str,
    topic: &str,
    records: &[(Option<Vec<u8>>, Vec<u8>)],
) -> Vec<(i32, i64)> {
    let records: Vec<NewRecord> = records
        .iter()
        .map(|(key, payload)| NewRecord {
            key: key.clone(),
            payload: Some(payload.clone()),
            ..NewRecord::default()
        })
        .collect();
    produce_records(bootstrap, topic, &records, PRODUCE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("producing to {topic} at {bootstrap} failed: {e}"))
}

/// Produce `records` to `topic` with an idempotent producer (`acks=all`) whose
/// `message.timeout.ms` is `timeout`, returning the (partition, offset) of each in order,
/// or the first delivery error (a record not acknowledged within `timeout` fails with
/// `MessageTimedOut`, also when the topic does not exist). librdkafka batches them: several
/// records share a batch.
pub async fn produce_records(
    bootstrap: &str,
    topic: &str,
    records: &[NewRecord],
    timeout: Duration,
) -> Result<Vec<(i32, i64)>, KafkaError> {
    send_records(bootstrap, topic, records, timeout, false).await
}

/// Produce `records` like [`produce_records`] (panicking after 30 s), but each in a batch of
/// its own, waiting for one to be acknowledged before sending the next, so that every
/// offset is a batch boundary. Tests that restart or hand over a consumer mid-topic need
/// this on tansu: a fetch from an offset inside a batch skips the rest of that batch (see
/// the module docs).
pub async fn produce_unbatched(
    bootstrap: &str,
    topic: &str,
    records: &[NewRecord],
) -> Vec<(i32, i64)> {
    send_records(bootstrap, topic, records, PRODUCE_TIMEOUT, true)
        .await
        .unwrap_or_else(|e| panic!("producing to {topic} at {bootstrap} failed: {e}"))
}

async fn send_records(
    bootstrap: &str,
    topic: &str,
    records: &[NewRecord],
    timeout: Duration,
    one_per_batch: bool,
) -> Result<Vec<(i32, i64)>, KafkaError> {
    let timeout_ms = timeout.as_millis().max(1).to_string();
    let producer: FutureProducer = client_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        // One record per batch: tansu 0.6 answers a fetch from an offset inside a batch
        // with the *next* batch (the rest of the batch is skipped, or the consumer waits
        // for a batch that never comes), so a consumer resuming from a committed offset
        // must always land on a batch boundary. Real Kafka returns the containing batch.
        .set("batch.num.messages", "1")
        .set("message.timeout.ms", &timeout_ms)
        .create()?;
    let mut positions = Vec::with_capacity(records.len());
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let headers = record
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v),
                })
            });
        let mut future = FutureRecord::<Vec<u8>, Vec<u8>>::to(topic).headers(headers);
        if let Some(key) = &record.key {
            future = future.key(key);
        }
        if let Some(payload) = &record.payload {
            future = future.payload(payload);
        }
        if let Some(partition) = record.partition {
            future = future.partition(partition);
        }
        let delivery = producer.send_result(future).map_err(|(e, _)| e)?;
        if one_per_batch {
            positions.push(delivered(delivery.await)?);
        } else {
            // Enqueue everything before awaiting anything: batches, not a round trip each.
            deliveries.push(delivery);
        }
    }
    for delivery in deliveries {
        positions.push(delivered(delivery.await)?);
    }
    Ok(positions)
}

/// The (partition, offset) of a delivered record, or why it was not.
fn delivered<E>(result: Result<OwnedDeliveryResult, E>) -> Result<(i32, i64), KafkaError> {
    match result {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

/// Read `topic` from the beginning of every partition, without joining a group, until
/// `expect` records arrived or `timeout` passed; returns what arrived, sorted by (partition,
/// offset). A topic that does not exist within `timeout` reads as empty.
///
/// Blocks the calling thread: from async code on a current-thread runtime, run it in
/// `spawn_blocking` if something on that runtime must make progress meanwhile.
pub fn consume_all(bootstrap: &str, topic: &str, expect: usize, timeout: Duration) -> Vec<Record> {
    let started = Instant::now();
    let consumer = plain_consumer(bootstrap);
    let Some(partitions) = partition_count(&consumer, topic, timeout) else {
        return Vec::new();
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        let partition = i32::try_from(partition).unwrap_or(i32::MAX);
        let _ = assignment.add_partition_offset(topic, partition, Offset::Beginning);
    }
    consumer
        .assign(&assignment)
        .unwrap_or_else(|e| panic!("cannot assign {topic}: {e}"));
    let mut records = Vec::new();
    while records.len() < expect {
        let Some(left) = timeout.checked_sub(started.elapsed()) else {
            break;
        };
        // Errors (a broker reconnecting) and empty polls are retried until the deadline.
        if let Some(Ok(message)) = consumer.poll(left.min(Duration::from_millis(100))) {
            records.push(Record {
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
                headers: message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default(),
                partition: message.partition(),
                offset: message.offset(),
                timestamp: message.timestamp().to_millis(),
            });
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    records
}

/// The high watermark (the next offset to be written) of every partition of `topic`,
/// indexed by partition. Panics if the topic does not exist or a partition's end is not
/// reached within 30 s.
///
/// It reads every partition to its end rather than asking with `ListOffsets`
/// (`fetch_watermarks`): tansu answers `ListOffsets(latest)` with the base offset of the
/// newest batch plus one, which is short by the batch's size (see the module docs); its
/// fetch responses carry the right high watermark, and end-of-partition is judged by them.
/// The end is the offset after the last record delivered, so transaction control records
/// after it are not counted.
pub fn end_offsets(bootstrap: &str, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", format!("spate-harness-{}", crate::unique_id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", FETCH_WAIT_MS)
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka consumer for {bootstrap}: {e}"));
    let partitions = partition_count(&consumer, topic, START_TIMEOUT)
        .unwrap_or_else(|| panic!("topic {topic} not found at {bootstrap}"));
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        let partition = i32::try_from(partition).unwrap_or(i32::MAX);
        let _ = assignment.add_partition_offset(topic, partition, Offset::Beginning);
    }
    consumer
        .assign(&assignment)
        .unwrap_or_else(|e| panic!("cannot assign {topic}: {e}"));
    let mut next = vec![0_i64; partitions];
    let mut at_end = vec![false; partitions];
    let started = Instant::now();
    while at_end.iter().any(|done| !done) {
        assert!(
            started.elapsed() < START_TIMEOUT,
            "{topic} at {bootstrap}: partitions {:?} did not reach their end within \
             {START_TIMEOUT:?}",
            at_end
                .iter()
                .enumerate()
                .filter(|(_, done)| !**done)
                .map(|(p, _)| p)
                .collect::<Vec<_>>()
        );
        let index = |p: i32| usize::try_from(p).ok().filter(|i| *i < partitions);
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                if let Some(i) = index(message.partition()) {
                    next[i] = next[i].max(message.offset() + 1);
                    // A record after an end-of-partition means more arrived meanwhile.
                    at_end[i] = false;
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                if let Some(i) = index(partition) {
                    at_end[i] = true;
                }
            }
            Some(Err(_)) | None => {}
        }
    }
    next
}

/// The offset `group` committed for every partition of `topic`, indexed by partition;
/// `None` where it has committed none. Panics if the topic does not exist.
pub fn committed_offsets(bootstrap: &str, group: &str, topic: &str) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = client_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka consumer for {bootstrap}: {e}"));
    let partitions = partition_count(&consumer, topic, START_TIMEOUT)
        .unwrap_or_else(|| panic!("topic {topic} not found at {bootstrap}"));
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, i32::try_from(partition).unwrap_or(i32::MAX));
    }
    // The group coordinator may still be loading right after start-up; retry briefly.
    let started = Instant::now();
    let committed = loop {
        match consumer.committed_offsets(list.clone(), Duration::from_secs(10)) {
            Ok(committed) => break committed,
            Err(e) if started.elapsed() < START_TIMEOUT && is_retriable(&e) => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("committed offsets of {group} on {topic}: {e}"),
        }
    };
    (0..partitions)
        .map(|partition| {
            let partition = i32::try_from(partition).unwrap_or(i32::MAX);
            match committed
                .find_partition(topic, partition)
                .map(|e| e.offset())
            {
                Some(Offset::Offset(offset)) => Some(offset),
                _ => None,
            }
        })
        .collect()
}

/// Whether a client error is the broker (or its coordinator) not being ready yet.
fn is_retriable(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
        )
    )
}
