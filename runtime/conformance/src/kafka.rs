//! A real Apache Kafka broker for tests — the `org.apache.kafka` release named in
//! `jvm-services.env`, run from its Maven Central jars in KRaft mode as one combined
//! broker and controller on free loopback ports — and rdkafka-based helpers that produce,
//! read back and inspect offsets the way a test checks what a consumer did. It does not
//! implement any part of Spate's Kafka consumer; it is what that consumer is tested against.
//!
//! Each [`KafkaBroker`] has a directory of its own (its log directory, `server.properties`,
//! and its output in `broker.log`, kept when a test panics so the path in the message stays
//! readable). [`KafkaBroker::stop`] kills it (SIGKILL, a crash), [`KafkaBroker::restart`]
//! starts it again on the same ports and the same log directory: topics, records and
//! committed offsets survive, as on a real node. [`KafkaBroker::start_behind_proxy`] puts a
//! [`FaultProxy`] in front of it to cut the network without stopping it.
//!
//! The broker runs with Kafka's defaults except what one node and a small test machine
//! need: replication factors of 1, a small heap, C1-compiled code (quicker to start, and the
//! tests are not throughput-bound; [`BrokerOptions::full_jit`] for benchmarks), no initial
//! rebalance delay, a 2 s broker session (a broker restarted after a SIGKILL waits for its
//! previous registration to expire: 9 s by default), and **no automatic topic creation** — as on most managed clusters, so a
//! missing topic is an error a test can see. The test clients batch as users' clients do:
//! [`produce`] lets librdkafka linger and fill batches, and the readers use librdkafka's
//! default fetch settings.

use crate::jvm::{self, JvmProcess};
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
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a started broker gets to answer a metadata request with itself in it.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// How long one metadata request may take in the helpers' wait loops.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`produce`] waits for every record to be acknowledged.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// How many bytes of the broker's log a panic message quotes.
const LOG_TAIL_BYTES: u64 = 4096;

/// The KRaft cluster id every test broker formats its storage with (22 base64url characters
/// of a UUID); brokers never meet, so they may share it.
const CLUSTER_ID: &str = "c3BhdGUtdGVzdC1icm9rZQ";

/// The Kafka release the tests run.
pub fn kafka_version() -> &'static str {
    jvm::version("KAFKA_VERSION")
}

/// How a [`KafkaBroker`] runs.
#[derive(Clone, Debug, Default)]
pub struct BrokerOptions {
    /// Run the JIT's optimizing tier (slower to start, faster once warm): for benchmarks.
    pub full_jit: bool,
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

/// A consumer that never joins a group: for metadata, watermarks and assigned reads, with
/// librdkafka's default fetch settings. librdkafka refuses `assign` without a `group.id`
/// ("Unknown group"), so it gets a unique one that never subscribes or commits.
fn plain_consumer(bootstrap: &str) -> BaseConsumer {
    client_config(bootstrap)
        .set("group.id", format!("spate-harness-{}", crate::unique_id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
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

/// A formatted, empty KRaft storage directory (`meta.properties`, `bootstrap.checkpoint`)
/// that every broker of this release copies: formatting runs a JVM (about 3 s), so it
/// happens once per cache, not once per broker. It does not depend on ports: the brokers
/// name their controller in `controller.quorum.voters`, which is not stored.
fn storage_template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let version = kafka_version();
        let release = jvm::release_dir("kafka", version);
        let template = release.join("storage-template");
        if template.join("meta.properties").is_file() {
            return template;
        }
        let classpath = jvm::classpath("kafka", version);
        let work = tempfile::Builder::new()
            .prefix("storage-format-")
            .tempdir_in(&release)
            .unwrap_or_else(|e| panic!("tempdir in {}: {e}", release.display()));
        let logs = work.path().join("logs");
        let config = work.path().join("format.properties");
        std::fs::write(
            &config,
            format!(
                "process.roles=broker,controller\nnode.id=1\n\
                 controller.quorum.voters=1@127.0.0.1:9093\n\
                 listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093\n\
                 controller.listener.names=CONTROLLER\nlog.dirs={}\n",
                logs.display()
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let out = std::process::Command::new(jvm::java())
            .args(["-Xmx256m", "-XX:TieredStopAtLevel=1", "-cp", &classpath])
            .args(["kafka.tools.StorageTool", "format", "--ignore-formatted"])
            .args(["--cluster-id", CLUSTER_ID, "--config"])
            .arg(&config)
            .output()
            .unwrap_or_else(|e| panic!("cannot run java: {e}. {}", jvm::JVM_INSTALL_HINT));
        assert!(
            out.status.success() && logs.join("meta.properties").is_file(),
            "formatting Kafka storage failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Another process may have won the race; either copy is as good.
        if std::fs::rename(&logs, &template).is_err() {
            assert!(
                template.join("meta.properties").is_file(),
                "cannot move the Kafka storage template into {}",
                template.display()
            );
        }
        template
    })
}

/// An Apache Kafka broker (KRaft, one node) on free loopback ports: see the
/// [module docs](self). Killed on drop.
pub struct KafkaBroker {
    /// Where the broker's PLAINTEXT listener is.
    port: u16,
    /// Where its controller listens (never advertised to clients).
    controller_port: u16,
    /// Where clients connect, and what metadata advertises: `port`, or a proxy's port.
    advertised: u16,
    options: BrokerOptions,
    /// The broker's directory: `logs/` (its log directory), `server.properties`,
    /// `log4j2.properties`, `broker.log`.
    dir: Option<tempfile::TempDir>,
    /// The running JVM; behind a lock so [`KafkaBroker::is_running`] can take `&self`.
    process: Mutex<Option<JvmProcess>>,
}

impl KafkaBroker {
    /// Start one; waits until it answers a metadata request. Fetches the jars first if
    /// they are missing (see [`crate::jvm`]).
    pub fn start() -> Self {
        Self::start_with(BrokerOptions::default())
    }

    /// Start one with `options`.
    pub fn start_with(options: BrokerOptions) -> Self {
        let port = free_port();
        Self::start_advertising(port, port, options)
    }

    /// Start one whose advertised listener is a [`FaultProxy`] in front of it, so tests can
    /// cut the network to the broker ([`FaultProxy::cut`], [`FaultProxy::restore`]) without
    /// stopping it. [`KafkaBroker::bootstrap`] is the proxy's address, and so is every
    /// broker address clients learn from metadata; drop the broker before the proxy.
    pub fn start_behind_proxy() -> (Self, FaultProxy) {
        let port = free_port();
        let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)));
        let broker = Self::start_advertising(port, proxy.addr().port(), BrokerOptions::default());
        (broker, proxy)
    }

    fn start_advertising(port: u16, advertised: u16, options: BrokerOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("spate-kafka-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut broker = Self {
            port,
            controller_port: free_port(),
            advertised,
            options,
            dir: Some(dir),
            process: Mutex::new(None),
        };
        broker.write_config();
        broker.restart();
        broker
    }

    /// `host:port` clients use (`bootstrap.servers`).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised)
    }

    fn dir(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default()
    }

    /// The broker's log (all of its runs), kept when a test panics.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("broker.log")
    }

    /// The broker's Kafka log directory (its topics' data and metadata).
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("logs")
    }

    fn write_config(&self) {
        let dir = self.dir();
        let properties = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{advertised}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={logs}\n\
             num.partitions=1\n\
             default.replication.factor=1\n\
             min.insync.replicas=1\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=4\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             broker.heartbeat.interval.ms=500\n\
             broker.session.timeout.ms=2000\n\
             num.network.threads=2\n\
             num.io.threads=4\n\
             background.threads=2\n\
             num.recovery.threads.per.data.dir=1\n\
             log.cleaner.threads=1\n\
             log.cleaner.dedupe.buffer.size=8388608\n\
             log.cleaner.backoff.ms=1000\n",
            controller = self.controller_port,
            port = self.port,
            advertised = self.advertised,
            logs = self.data_dir().display(),
        );
        let log4j = format!(
            "rootLogger.level={level}\n\
             rootLogger.appenderRef.file.ref=FILE\n\
             appender.file.type=File\n\
             appender.file.name=FILE\n\
             appender.file.fileName={log}\n\
             appender.file.layout.type=PatternLayout\n\
             appender.file.layout.pattern=[%d] %p %m (%c)%n\n",
            level = std::env::var("SPATE_TEST_KAFKA_LOG").unwrap_or_else(|_| "INFO".into()),
            log = self.log_path().display(),
        );
        for (name, text) in [
            ("server.properties", properties),
            ("log4j2.properties", log4j),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
    }

    /// Whether the broker process is running.
    pub fn is_running(&self) -> bool {
        let mut process = self.process.lock().unwrap_or_else(|p| p.into_inner());
        match process.as_mut().map(JvmProcess::is_running) {
            Some(true) => true,
            Some(false) => {
                *process = None;
                false
            }
            None => false,
        }
    }

    /// The pid of the broker's JVM while it runs (for reading its CPU time from `/proc`),
    /// or `None` if it is not running or `/proc` does not show it (not Linux).
    pub fn pid(&self) -> Option<u32> {
        let process = self.process.lock().unwrap_or_else(|p| p.into_inner());
        process.as_ref().and_then(JvmProcess::jvm_pid)
    }

    /// Kill the broker at once (SIGKILL: no goodbye to clients, unflushed pages as after a
    /// crash) and wait for it to exit. Its log directory stays for [`KafkaBroker::restart`].
    pub fn stop(&mut self) {
        let process = self
            .process
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut process) = process {
            process.stop("KILL");
        }
    }

    /// Start the broker again on the same ports and log directory (after
    /// [`KafkaBroker::stop`], or killing a running one first) and wait until it answers.
    /// Topics, records and committed offsets are kept; clients that stayed connected
    /// reconnect by themselves.
    pub fn restart(&mut self) {
        self.stop();
        let dir = self.dir();
        let logs = self.data_dir();
        if !logs.join("meta.properties").is_file() {
            copy_dir(storage_template(), &logs);
        }
        let classpath = jvm::classpath("kafka", kafka_version());
        let mut args: Vec<OsString> = ["-Xms64m", "-Xmx512m", "-XX:+UseSerialGC"]
            .iter()
            .map(OsString::from)
            .collect();
        if !self.options.full_jit {
            args.push("-XX:TieredStopAtLevel=1".into());
        }
        let mut log4j = OsString::from("-Dlog4j2.configurationFile=");
        log4j.push(dir.join("log4j2.properties"));
        args.extend([
            "-Djava.awt.headless=true".into(),
            log4j,
            "-cp".into(),
            classpath.into(),
            "kafka.Kafka".into(),
            dir.join("server.properties").into(),
        ]);
        let started = Instant::now();
        let process = JvmProcess::spawn(&args, &dir, &dir.join("jvm.out"), None);
        *self.process.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(process);
        self.wait_ready();
        eprintln!(
            "Apache Kafka {} ready on {} in {:.1?}",
            kafka_version(),
            self.bootstrap(),
            started.elapsed()
        );
    }

    /// Waits until the broker listens and answers a metadata request through the advertised
    /// address with itself in it; panics with the log tail after [`START_TIMEOUT`] or if
    /// the process exits.
    fn wait_ready(&self) {
        let started = Instant::now();
        let what = format!("the Kafka broker (log: {})", self.log_path().display());
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
            assert!(
                self.is_running(),
                "the Kafka broker exited during start-up; output {}\n{}",
                jvm::tail(&self.dir().join("jvm.out"), LOG_TAIL_BYTES),
                self.log_tail()
            );
            assert!(
                started.elapsed() < START_TIMEOUT,
                "the Kafka broker did not answer a metadata request on {} within \
                 {START_TIMEOUT:?}; {}",
                self.bootstrap(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The end of the broker's log, for panic messages.
    pub fn log_tail(&self) -> String {
        format!("log {}", jvm::tail(&self.log_path(), LOG_TAIL_BYTES))
    }

    /// The record batches stored for `topic`/`partition`, as (base offset, record count)
    /// in offset order, read from the broker's log segments: what a test checks to know
    /// its producer really batched. Reads what the broker has written to its files (it
    /// writes before it acknowledges, though it does not fsync).
    pub fn record_batches(&self, topic: &str, partition: i32) -> Vec<(i64, i32)> {
        let dir = self.data_dir().join(format!("{topic}-{partition}"));
        let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("no log directory {}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        segments.sort();
        let mut batches = Vec::new();
        for segment in segments {
            let bytes = std::fs::read(&segment)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", segment.display()));
            // Record batch v2: baseOffset i64, batchLength i32 (of what follows it), then
            // 45 bytes of header up to recordsCount i32 at byte 57 (big-endian).
            let mut at = 0;
            while at + 61 <= bytes.len() {
                let field = |from: usize, len: usize| &bytes[at + from..at + from + len];
                let base = i64::from_be_bytes(field(0, 8).try_into().unwrap_or([0; 8]));
                let length = i32::from_be_bytes(field(8, 4).try_into().unwrap_or([0; 4]));
                let count = i32::from_be_bytes(field(57, 4).try_into().unwrap_or([0; 4]));
                let Ok(length) = usize::try_from(length) else {
                    break;
                };
                if length == 0 {
                    break; // preallocated space after the last batch
                }
                batches.push((base, count));
                at += 12 + length;
            }
        }
        batches
    }

    /// Create a topic (rdkafka `AdminClient`), waiting until its metadata shows all
    /// partitions with a leader.
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]).await;
    }

    /// Create a compacted topic (`cleanup.policy=compact`).
    pub async fn create_compacted_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[("cleanup.policy", "compact")])
            .await;
    }

    /// Create a topic with extra topic configs, then wait as [`KafkaBroker::create_topic`].
    pub async fn create_topic_with(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = client_config(&self.bootstrap())
            .create()
            .unwrap_or_else(|e| panic!("cannot create a Kafka admin client: {e}"));
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (key, value) in configs {
            topic = topic.set(key, value);
        }
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
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

/// Copy the files of `from` (one level of subdirectories) into `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("mkdir {}: {e}", to.display()));
    let entries =
        std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    for entry in entries.flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("copy to {}: {e}", target.display()));
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
/// `MessageTimedOut`, also when the topic does not exist). librdkafka batches them as it
/// does for users (`linger.ms=5`): thousands of records share a batch.
pub async fn produce_records(
    bootstrap: &str,
    topic: &str,
    records: &[NewRecord],
    timeout: Duration,
) -> Result<Vec<(i32, i64)>, KafkaError> {
    send_records(bootstrap, topic, records, timeout).await
}

async fn send_records(
    bootstrap: &str,
    topic: &str,
    records: &[NewRecord],
    timeout: Duration,
) -> Result<Vec<(i32, i64)>, KafkaError> {
    let timeout_ms = timeout.as_millis().max(1).to_string();
    // What a user's producer does: linger a few milliseconds and fill batches (librdkafka
    // allows 10,000 records per batch by default), so one request carries many records.
    let producer: FutureProducer = client_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", &timeout_ms)
        .create()?;
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
        // Enqueue everything before awaiting anything: batches, not a round trip each. A
        // full local queue (QueueFull) is waited out, as a user's producer loop does.
        let mut pending = future;
        let delivery = loop {
            match producer.send_result(pending) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    pending = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(e),
            }
        };
        deliveries.push(delivery);
    }
    let mut positions = Vec::with_capacity(records.len());
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
/// indexed by partition, as the broker answers `ListOffsets(latest)`. Panics if the topic
/// does not exist or the broker does not answer within 90 s.
pub fn end_offsets(bootstrap: &str, topic: &str) -> Vec<i64> {
    let consumer = plain_consumer(bootstrap);
    let partitions = partition_count(&consumer, topic, START_TIMEOUT)
        .unwrap_or_else(|| panic!("topic {topic} not found at {bootstrap}"));
    let started = Instant::now();
    (0..partitions)
        .map(|partition| {
            let partition = i32::try_from(partition).unwrap_or(i32::MAX);
            loop {
                match consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)) {
                    Ok((_, high)) => break high,
                    Err(e) if started.elapsed() < START_TIMEOUT && is_retriable(&e) => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("end offset of {topic}/{partition} at {bootstrap}: {e}"),
                }
            }
        })
        .collect()
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
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
        )
    )
}
