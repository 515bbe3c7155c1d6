//! Runtime configuration: typed, strict, layered as defaults < file < environment < flags.
//!
//! Every field has a default, so `spate up` with no file runs the whole product on one
//! machine. Environment variables are `SPATE_` plus the field path with `__` between
//! levels, e.g. `SPATE_API__LISTEN=127.0.0.1:9000` or `SPATE_API__TOKEN=...`.

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Config {
    /// Directory for the event log, state, plugins and compiled artifacts.
    pub data_dir: PathBuf,
    /// Topic that `start-workflow` emits to.
    pub workflow_topic: String,
    /// HTTP API.
    pub api: ApiConfig,
    /// Event source and emit target.
    pub events: EventsConfig,
    /// State store backend.
    pub state: StateConfig,
    /// Cache backend.
    pub cache: CacheConfig,
    /// Read-through caching of plugin state in the cache backend.
    pub read_through: ReadThroughSettings,
    /// Dispatcher.
    pub dispatch: DispatchConfig,
    /// Sandbox and plugin limits.
    pub sandbox: SandboxSettings,
    /// Where plugins are kept: this runtime's data directory, or shared by every runtime.
    pub registry: RegistryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".spate"),
            workflow_topic: "workflows".into(),
            api: ApiConfig::default(),
            events: EventsConfig::default(),
            state: StateConfig::default(),
            cache: CacheConfig::default(),
            read_through: ReadThroughSettings::default(),
            dispatch: DispatchConfig::default(),
            sandbox: SandboxSettings::default(),
            registry: RegistryConfig::default(),
        }
    }
}

/// HTTP API settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ApiConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Bearer token required on every mutating route. When unset, one is generated at
    /// start-up and written to `<data-dir>/api-token` (mode 0600) for the CLI to read.
    pub token: Option<String>,
    /// Largest request body for event routes, in bytes.
    pub max_body_bytes: usize,
    /// Largest plugin upload (manifest + component), in bytes.
    pub max_upload_bytes: usize,
    /// Request timeout in milliseconds (uploads get four times this, for compilation).
    pub request_timeout_ms: u64,
    /// Most events one read returns.
    pub max_read_events: usize,
    /// Most bytes of events one read returns (its JSON): a read stops adding events at
    /// this size, says `"truncated": true`, and its `next_from` continues from there. An
    /// event larger than this alone is returned by itself.
    pub max_read_bytes: usize,
    /// Event reads served at once; one more is answered 503 `busy` with `Retry-After`.
    pub max_concurrent_reads: usize,
    /// From a request's first byte to the end of its head (request line and headers), in
    /// milliseconds; a connection that takes longer is closed.
    pub header_read_timeout_ms: u64,
    /// A connection that holds no request is closed after this many milliseconds without
    /// a byte moving (a keep-alive connection between requests, or a client that stopped
    /// reading its response).
    pub idle_timeout_ms: u64,
    /// On shutdown, how long open connections may finish their requests before they are
    /// dropped, in milliseconds (idle ones close at once).
    pub shutdown_grace_ms: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8780)),
            token: None,
            max_body_bytes: 8 << 20,
            max_upload_bytes: 64 << 20,
            request_timeout_ms: 30_000,
            max_read_events: 1000,
            max_read_bytes: 4 << 20,
            max_concurrent_reads: 4,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            shutdown_grace_ms: 5_000,
        }
    }
}

/// Where events come from and go to.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "type")]
pub enum EventsConfig {
    /// The built-in durable log in the data directory.
    #[serde(rename_all = "kebab-case")]
    Embedded {
        /// Partitions of topics created on first use.
        #[serde(default = "default_partitions")]
        default_partitions: u32,
        /// Create topics on first append or subscription.
        #[serde(default = "default_true")]
        auto_create_topics: bool,
        /// What old events the log deletes ([`EmbeddedRetention`]).
        #[serde(default)]
        retention: EmbeddedRetention,
    },
    /// Kafka (`spate-kafka`): each plugin consumes its subscriptions as consumer group
    /// `<group>.<plugin>` (cooperative-sticky), emits and dead letters go through an
    /// idempotent producer (`acks=all`), and an input offset is committed only after
    /// everything below it is handled and its emits are acknowledged.
    #[serde(rename_all = "kebab-case")]
    Kafka {
        /// `bootstrap.servers`: comma-separated `host:port` list.
        #[serde(default = "default_kafka_servers")]
        bootstrap_servers: String,
        /// This deployment's name: plugin `p` consumes as group `<group>.p`.
        #[serde(default = "default_kafka_group")]
        group: String,
        /// Static group membership: a stable name of this runtime instance (the pod name
        /// of a StatefulSet). A restart within `session-timeout-ms` keeps its partitions.
        #[serde(default)]
        instance_id: Option<String>,
        /// Create missing topics (input, emit, workflow and dead-letter topics) with
        /// `partitions` and `replication-factor`; otherwise a missing topic is an error.
        #[serde(default)]
        create_topics: bool,
        /// Partitions of topics Spate creates.
        #[serde(default = "default_kafka_partitions")]
        partitions: i32,
        /// Replication factor of topics Spate creates.
        #[serde(default = "default_kafka_replication")]
        replication_factor: i32,
        /// How long a silent member keeps its partitions, in milliseconds.
        #[serde(default = "default_kafka_session_timeout_ms")]
        session_timeout_ms: u64,
        /// How long a revoked partition's in-flight events may run before they are left
        /// to its next owner, in milliseconds.
        #[serde(default = "default_kafka_revoke_timeout_ms")]
        revoke_timeout_ms: u64,
        /// How long an emit may wait for the brokers' acknowledgement, in milliseconds;
        /// then the event is retried.
        #[serde(default = "default_kafka_produce_timeout_ms")]
        produce_timeout_ms: u64,
        /// Timeout of metadata, commit and offset requests, in milliseconds.
        #[serde(default = "default_kafka_request_timeout_ms")]
        request_timeout_ms: u64,
        /// Extra librdkafka properties for every client: `security.protocol`, `sasl.*`,
        /// `ssl.*`, `linger.ms`, ... Properties Spate's guarantees depend on (group.id,
        /// enable.auto.commit, acks, enable.idempotence, ...) are refused.
        #[serde(default)]
        librdkafka: std::collections::BTreeMap<String, String>,
    },
}

fn default_kafka_servers() -> String {
    "127.0.0.1:9092".into()
}

fn default_kafka_group() -> String {
    "spate".into()
}

fn default_kafka_partitions() -> i32 {
    4
}

fn default_kafka_replication() -> i32 {
    1
}

fn default_kafka_session_timeout_ms() -> u64 {
    10_000
}

fn default_kafka_revoke_timeout_ms() -> u64 {
    10_000
}

fn default_kafka_produce_timeout_ms() -> u64 {
    30_000
}

fn default_kafka_request_timeout_ms() -> u64 {
    10_000
}

impl EventsConfig {
    /// The prefix of every plugin's consumer group: plugin `p` consumes as `<prefix>.p`.
    pub fn group_prefix(&self) -> &str {
        match self {
            Self::Embedded { .. } => "spate",
            Self::Kafka { group, .. } => group,
        }
    }

    /// How long revoked partitions' in-flight events may run.
    pub fn revoke_timeout(&self) -> Duration {
        match self {
            Self::Embedded { .. } => Duration::from_secs(10),
            Self::Kafka {
                revoke_timeout_ms, ..
            } => Duration::from_millis(*revoke_timeout_ms),
        }
    }

    /// The Kafka settings, if this selects Kafka.
    pub fn kafka_options(&self) -> Option<spate_kafka::KafkaOptions> {
        let Self::Kafka {
            bootstrap_servers,
            group,
            instance_id,
            create_topics,
            partitions,
            replication_factor,
            session_timeout_ms,
            revoke_timeout_ms,
            produce_timeout_ms,
            request_timeout_ms,
            librdkafka,
        } = self
        else {
            return None;
        };
        let mut o = spate_kafka::KafkaOptions::new(bootstrap_servers.clone());
        o.group = group.clone();
        o.instance_id = instance_id.clone().filter(|i| !i.is_empty());
        o.create_topics = *create_topics;
        o.partitions = *partitions;
        o.replication_factor = *replication_factor;
        o.session_timeout = Duration::from_millis(*session_timeout_ms);
        o.revoke_timeout = Duration::from_millis(*revoke_timeout_ms);
        o.produce_timeout = Duration::from_millis(*produce_timeout_ms);
        o.request_timeout = Duration::from_millis(*request_timeout_ms);
        o.librdkafka = librdkafka.clone();
        Some(o)
    }
}

fn default_partitions() -> u32 {
    4
}

/// Retention of the embedded log: a partition's oldest events are deleted once older than
/// `max-age-ms` or while the partition holds more than `max-partition-bytes`, but never an
/// event some consumer group (a plugin) has not committed yet. 0 means no limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct EmbeddedRetention {
    /// Delete events older than this, in milliseconds (default 7 days; 0: keep).
    pub max_age_ms: u64,
    /// Delete a partition's oldest events while it holds more bytes than this (default 0:
    /// no size limit).
    pub max_partition_bytes: u64,
    /// How often retention runs, in milliseconds.
    pub check_interval_ms: u64,
    /// Compact the log file once retention freed at least this many bytes (writers wait
    /// while it runs).
    pub compact_min_bytes: u64,
    /// Per-topic settings, replacing the ones above for that topic.
    pub topics: std::collections::BTreeMap<String, TopicRetentionOverride>,
}

impl Default for EmbeddedRetention {
    fn default() -> Self {
        Self {
            max_age_ms: 7 * 24 * 3600 * 1000,
            max_partition_bytes: 0,
            check_interval_ms: 60_000,
            compact_min_bytes: 64 << 20,
            topics: std::collections::BTreeMap::new(),
        }
    }
}

/// One topic's retention; an absent field takes the `[events.retention]` value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TopicRetentionOverride {
    /// As `events.retention.max-age-ms`, for this topic (0: keep).
    #[serde(default)]
    pub max_age_ms: Option<u64>,
    /// As `events.retention.max-partition-bytes`, for this topic (0: no size limit).
    #[serde(default)]
    pub max_partition_bytes: Option<u64>,
}

impl EmbeddedRetention {
    /// The embedded log's retention settings.
    pub fn log_config(&self) -> spate_core::embedded::RetentionConfig {
        use spate_core::embedded::{RetentionConfig, TopicRetention};
        let policy = |age: u64, bytes: u64| TopicRetention {
            max_age: (age > 0).then(|| Duration::from_millis(age)),
            max_partition_bytes: (bytes > 0).then_some(bytes),
        };
        RetentionConfig {
            default: policy(self.max_age_ms, self.max_partition_bytes),
            topics: self
                .topics
                .iter()
                .map(|(name, o)| {
                    let p = policy(
                        o.max_age_ms.unwrap_or(self.max_age_ms),
                        o.max_partition_bytes.unwrap_or(self.max_partition_bytes),
                    );
                    (name.clone(), p)
                })
                .collect(),
            interval: Duration::from_millis(self.check_interval_ms.max(1)),
            compact_min_bytes: self.compact_min_bytes,
            ..RetentionConfig::default()
        }
    }
}

fn default_true() -> bool {
    true
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self::Embedded {
            default_partitions: default_partitions(),
            auto_create_topics: true,
            retention: EmbeddedRetention::default(),
        }
    }
}

/// State store backend.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "type")]
pub enum StateConfig {
    /// `redb` in the data directory.
    #[default]
    Embedded,
    /// ScyllaDB or Cassandra (`spate-state-cql`): one table, one partition per plugin
    /// namespace, compare-and-swap by lightweight transactions.
    #[serde(rename_all = "kebab-case")]
    Cql {
        /// Contact points, `host:port`.
        #[serde(default = "default_cql_nodes")]
        nodes: Vec<String>,
        /// Keyspace of the state table.
        #[serde(default = "default_cql_keyspace")]
        keyspace: String,
        /// The state table.
        #[serde(default = "default_cql_table")]
        table: String,
        /// Replication of the keyspace when it is created (a CQL map literal).
        #[serde(default = "default_cql_replication")]
        replication: String,
        /// ScyllaDB only: `false` creates the keyspace without tablets (needed for
        /// lightweight transactions on ScyllaDB releases whose tablets lack them); unset
        /// leaves the server's default.
        #[serde(default)]
        tablets: Option<bool>,
        /// Create the keyspace and table at start-up if absent.
        #[serde(default = "default_true")]
        create_schema: bool,
        /// Consistency of reads and writes.
        #[serde(default)]
        consistency: CqlConsistency,
        /// Consistency of compare-and-swap (Paxos) rounds.
        #[serde(default)]
        serial_consistency: CqlSerialConsistency,
        /// Client-side timeout of one request, in milliseconds.
        #[serde(default = "default_cql_request_timeout_ms")]
        request_timeout_ms: u64,
        /// Timeout of opening one connection, in milliseconds.
        #[serde(default = "default_cql_connect_timeout_ms")]
        connect_timeout_ms: u64,
        /// Rows per page of a state scan.
        #[serde(default = "default_cql_scan_page_size")]
        scan_page_size: u32,
        /// User name, if the cluster requires authentication.
        #[serde(default)]
        username: Option<String>,
        /// Password for `username`.
        #[serde(default)]
        password: Option<String>,
    },
}

fn default_cql_nodes() -> Vec<String> {
    vec!["127.0.0.1:9042".into()]
}

fn default_cql_keyspace() -> String {
    "spate".into()
}

fn default_cql_table() -> String {
    "state".into()
}

fn default_cql_replication() -> String {
    "{'class': 'SimpleStrategy', 'replication_factor': 1}".into()
}

fn default_cql_request_timeout_ms() -> u64 {
    5_000
}

fn default_cql_connect_timeout_ms() -> u64 {
    5_000
}

fn default_cql_scan_page_size() -> u32 {
    1_000
}

/// CQL consistency level of reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CqlConsistency {
    /// One replica.
    One,
    /// One replica in the local datacenter.
    LocalOne,
    /// A majority of all replicas.
    Quorum,
    /// A majority of the local datacenter's replicas.
    #[default]
    LocalQuorum,
    /// A majority in each datacenter (writes).
    EachQuorum,
    /// Every replica.
    All,
}

/// CQL serial consistency of lightweight transactions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CqlSerialConsistency {
    /// Paxos across all datacenters.
    Serial,
    /// Paxos within the local datacenter.
    #[default]
    LocalSerial,
}

impl StateConfig {
    /// The CQL store's settings, if this selects it.
    pub fn cql_options(&self) -> Option<spate_state_cql::CqlOptions> {
        use spate_state_cql::{Consistency, CqlOptions, SerialConsistency};
        let Self::Cql {
            nodes,
            keyspace,
            table,
            replication,
            tablets,
            create_schema,
            consistency,
            serial_consistency,
            request_timeout_ms,
            connect_timeout_ms,
            scan_page_size,
            username,
            password,
        } = self
        else {
            return None;
        };
        Some(CqlOptions {
            nodes: nodes.clone(),
            keyspace: keyspace.clone(),
            table: table.clone(),
            replication: replication.clone(),
            tablets: *tablets,
            create_schema: *create_schema,
            consistency: match consistency {
                CqlConsistency::One => Consistency::One,
                CqlConsistency::LocalOne => Consistency::LocalOne,
                CqlConsistency::Quorum => Consistency::Quorum,
                CqlConsistency::LocalQuorum => Consistency::LocalQuorum,
                CqlConsistency::EachQuorum => Consistency::EachQuorum,
                CqlConsistency::All => Consistency::All,
            },
            serial_consistency: match serial_consistency {
                CqlSerialConsistency::Serial => SerialConsistency::Serial,
                CqlSerialConsistency::LocalSerial => SerialConsistency::LocalSerial,
            },
            request_timeout: Duration::from_millis(*request_timeout_ms),
            connect_timeout: Duration::from_millis(*connect_timeout_ms),
            scan_page_size: *scan_page_size,
            credentials: username
                .clone()
                .map(|u| (u, password.clone().unwrap_or_default())),
        })
    }
}

/// Cache backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "type")]
pub enum CacheConfig {
    /// In-process `moka` cache.
    Memory {
        /// Most bytes of keys and values kept; least recently used entries go first.
        #[serde(default = "default_cache_bytes")]
        max_bytes: u64,
    },
    /// Redis, or Redis Cluster (`spate-cache-redis`). While it is unreachable, reads are
    /// misses and writes are skipped (metric `spate_cache_degraded`); it reconnects by
    /// itself.
    #[serde(rename_all = "kebab-case")]
    Redis {
        /// `redis://[user:password@]host:port/db` of the server, or seed nodes of a cluster.
        #[serde(default = "default_redis_urls")]
        urls: Vec<String>,
        /// Talk Redis Cluster protocol to `urls`.
        #[serde(default)]
        cluster: bool,
        /// Longest wait for one command, connecting included, in milliseconds.
        #[serde(default = "default_redis_timeout_ms")]
        command_timeout_ms: u64,
        /// Longest wait for one connection attempt, in milliseconds.
        #[serde(default = "default_redis_timeout_ms")]
        connect_timeout_ms: u64,
        /// While Redis is unreachable, how often to try it again, in milliseconds.
        #[serde(default = "default_redis_retry_interval_ms")]
        retry_interval_ms: u64,
    },
}

fn default_redis_urls() -> Vec<String> {
    vec!["redis://127.0.0.1:6379/".into()]
}

fn default_redis_timeout_ms() -> u64 {
    500
}

fn default_redis_retry_interval_ms() -> u64 {
    1_000
}

impl CacheConfig {
    /// The Redis cache's settings, if this selects it.
    pub fn redis_options(&self) -> Option<spate_cache_redis::RedisOptions> {
        let Self::Redis {
            urls,
            cluster,
            command_timeout_ms,
            connect_timeout_ms,
            ..
        } = self
        else {
            return None;
        };
        Some(spate_cache_redis::RedisOptions {
            urls: urls.clone(),
            cluster: *cluster,
            command_timeout: Duration::from_millis(*command_timeout_ms),
            connect_timeout: Duration::from_millis(*connect_timeout_ms),
        })
    }
}

/// Read-through caching of plugin state: `state.get` asks the cache first, falls back to
/// the store and fills the cache; writes update (or invalidate) the cached copy after the
/// store write succeeded.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ReadThroughSettings {
    /// Serve state reads through the cache backend.
    pub enabled: bool,
    /// Longest a cached copy lives, in milliseconds; also the bound on how stale a copy can
    /// be when another runtime process wrote the key.
    pub ttl_ms: u64,
    /// What a committed write does to the cached copy.
    pub on_write: OnWrite,
    /// Prefix of the cached copies' keys; must start with `_spate` (reserved).
    pub key_prefix: String,
    /// Values larger than this many bytes are not cached.
    pub max_value_bytes: usize,
    /// Most keys remembered as possibly stale after failed cache updates; beyond it state
    /// reads bypass the cache for one `ttl-ms`.
    pub max_suspect_keys: usize,
}

impl Default for ReadThroughSettings {
    fn default() -> Self {
        let d = spate_core::tiered::ReadThroughConfig::default();
        Self {
            enabled: false,
            ttl_ms: u64::try_from(d.ttl.as_millis()).unwrap_or(u64::MAX),
            on_write: OnWrite::Update,
            key_prefix: d.key_prefix,
            max_value_bytes: d.max_value_bytes,
            max_suspect_keys: d.max_suspect_keys,
        }
    }
}

/// What a committed state write does to its cached copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnWrite {
    /// Cache the new value: read-modify-write workloads keep hitting.
    #[default]
    Update,
    /// Delete the cached copy; the next read fills it.
    Invalidate,
}

impl ReadThroughSettings {
    /// The tier's settings.
    pub fn tier_config(&self) -> spate_core::tiered::ReadThroughConfig {
        spate_core::tiered::ReadThroughConfig {
            ttl: Duration::from_millis(self.ttl_ms),
            on_write: match self.on_write {
                OnWrite::Update => spate_core::tiered::WritePolicy::Update,
                OnWrite::Invalidate => spate_core::tiered::WritePolicy::Invalidate,
            },
            key_prefix: self.key_prefix.clone(),
            max_value_bytes: self.max_value_bytes,
            max_suspect_keys: self.max_suspect_keys,
        }
    }
}

fn default_cache_bytes() -> u64 {
    256 << 20
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self::Memory {
            max_bytes: default_cache_bytes(),
        }
    }
}

/// Dispatcher settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct DispatchConfig {
    /// Events read and unfinished per subscription before reading pauses.
    pub max_buffered: usize,
    /// Bytes of events read and unfinished per subscription before reading pauses.
    pub max_buffered_bytes: usize,
    /// Events read and unfinished per partition before that partition is paused (the
    /// subscription's other partitions keep flowing). Half of `max-buffered` by default:
    /// only a partition that hogs the buffer is paused, since librdkafka takes ~0.5 s to
    /// fetch again after a resume.
    pub max_buffered_per_partition: usize,
    /// Longest time between two checkpoints of a plugin's effects (state, cache, the
    /// acknowledgement of its emits) and commits of its positions, in milliseconds.
    pub commit_interval_ms: u64,
    /// A checkpoint is taken early once this many events finished since the last one.
    pub checkpoint_events: usize,
    /// How long shutdown waits for in-flight events, in milliseconds.
    pub drain_timeout_ms: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_buffered: 32_768,
            max_buffered_bytes: 128 << 20,
            max_buffered_per_partition: 16_384,
            commit_interval_ms: 100,
            checkpoint_events: 8192,
            drain_timeout_ms: 10_000,
        }
    }
}

/// Sandbox limits that bound every plugin's manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SandboxSettings {
    /// Largest memory cap a manifest may ask for, in MiB.
    pub max_memory_mb: u64,
    /// Longest deadline a manifest may ask for, in milliseconds.
    pub max_timeout_ms: u64,
    /// Largest concurrency a manifest may ask for.
    pub max_concurrency: u32,
    /// Largest `limits.max-emits` a manifest may ask for.
    pub max_emits: u32,
    /// Largest `limits.max-emit-bytes` a manifest may ask for.
    pub max_emit_bytes: u64,
    /// Largest `limits.max-writes` a manifest may ask for.
    pub max_writes: u32,
    /// Longest `retry.max-backoff-ms` a manifest may ask for.
    pub max_backoff_ms: u64,
    /// Sandboxes alive at once across all plugins (pooling allocator slots).
    pub pool_instances: u32,
    /// Warm-mode instances kept between a lane's bursts, across all plugins (each holds
    /// a pool slot; the oldest makes room, and all are evicted when the pool is full).
    pub idle_instances: usize,
    /// How long an idle warm instance is kept, in milliseconds.
    pub idle_timeout_ms: u64,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            max_memory_mb: 256,
            max_timeout_ms: 60_000,
            max_concurrency: 256,
            max_emits: 10_000,
            max_emit_bytes: 64 << 20,
            max_writes: 100_000,
            max_backoff_ms: 3_600_000,
            pool_instances: 512,
            idle_instances: 64,
            idle_timeout_ms: 30_000,
        }
    }
}

/// Where plugins (manifests, components, active versions) are kept.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "type")]
pub enum RegistryConfig {
    /// In the data directory: this runtime only.
    #[default]
    Local,
    /// In the cluster's CQL state store, with change notices on a compacted Kafka topic:
    /// an upload, activation, rollback or removal on any runtime reaches every runtime,
    /// and a runtime needs no local state to recover (its compiled-artifact cache only
    /// saves compile time). Needs `events.type = "kafka"` and `state.type = "cql"`.
    #[serde(rename_all = "kebab-case")]
    Shared {
        /// The compacted control topic carrying change notices.
        #[serde(default = "default_control_topic")]
        control_topic: String,
    },
}

fn default_control_topic() -> String {
    "spate.registry".into()
}

/// Top-level keys of [`Config`], as environment variables may name them.
const CONFIG_SECTIONS: &[&str] = &[
    "data-dir",
    "workflow-topic",
    "api",
    "events",
    "state",
    "cache",
    "read-through",
    "dispatch",
    "sandbox",
    "registry",
];

/// The defaults every layer is merged onto, without the backend sections chosen by a
/// `type` tag: layers merge key by key, so a default `[cache] max-bytes` would otherwise
/// stay behind when a file switches to `type = "redis"` and be refused as unknown there.
/// Missing sections take their defaults when the result is extracted.
fn seeded_defaults() -> serde_json::Value {
    let mut defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    if let Some(map) = defaults.as_object_mut() {
        for tagged in ["events", "state", "cache", "registry"] {
            map.remove(tagged);
        }
    }
    defaults
}

/// A configuration problem, with every problem listed.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Load defaults, then `file` (if given, it must exist), then `SPATE_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(seeded_defaults()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    f.display()
                )));
            }
            fig = fig.merge(Toml::file(f));
        }
        // `SPATE_API` is the CLI's API URL, not this section; the token is merged below.
        // Fields are kebab-case, so `_` inside a name means `-` (`SPATE_DATA_DIR`).
        fig = fig.merge(
            Env::prefixed("SPATE_")
                .ignore(&["API", "API_TOKEN"])
                .map(|k| k.as_str().replace("__", ".").replace('_', "-").into())
                // Other `SPATE_*` variables (the scripts' `SPATE_CACHE`, ...) are not config.
                .filter(|k| {
                    let top = k.as_str().split('.').next().unwrap_or_default();
                    CONFIG_SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(top))
                }),
        );
        if let Ok(t) = std::env::var("SPATE_API_TOKEN") {
            fig = fig.merge(Serialized::default("api.token", t));
        }
        let config: Config = fig.extract().map_err(|e| {
            ConfigError(
                e.into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Check cross-field rules, reporting every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if !spate_core::manifest::valid_topic(&self.workflow_topic) {
            p.push(format!(
                "workflow-topic `{}` is not a valid topic name",
                self.workflow_topic
            ));
        }
        if let Some(t) = &self.api.token
            && t.len() < 8
        {
            p.push("api.token must be at least 8 characters".into());
        }
        if self.api.max_read_bytes < 1024 {
            p.push("api.max-read-bytes must be at least 1024".into());
        }
        if self.api.max_concurrent_reads == 0 {
            p.push("api.max-concurrent-reads must be at least 1".into());
        }
        if self.api.header_read_timeout_ms == 0 || self.api.idle_timeout_ms == 0 {
            p.push("api.header-read-timeout-ms and api.idle-timeout-ms must be at least 1".into());
        }
        match &self.events {
            EventsConfig::Embedded {
                default_partitions,
                retention,
                ..
            } => {
                if *default_partitions == 0 || *default_partitions > 1024 {
                    p.push("events.default-partitions must be 1..=1024".into());
                }
                if retention.check_interval_ms == 0 {
                    p.push("events.retention.check-interval-ms must be at least 1".into());
                }
                for name in retention.topics.keys() {
                    if !spate_core::manifest::valid_topic(name) {
                        p.push(format!(
                            "events.retention.topics: `{name}` is not a valid topic name"
                        ));
                    }
                }
            }
            EventsConfig::Kafka {
                revoke_timeout_ms,
                produce_timeout_ms,
                ..
            } => {
                if let Some(Err(e)) = self.events.kafka_options().map(|o| o.validate()) {
                    p.extend(e.0.into_iter().map(|e| format!("events: {e}")));
                }
                if *revoke_timeout_ms >= self.dispatch.drain_timeout_ms.max(1) * 10 {
                    p.push("events.revoke-timeout-ms is over ten times dispatch.drain-timeout-ms; a rebalance would stall the group that long".into());
                }
                if *produce_timeout_ms == 0 {
                    p.push("events.produce-timeout-ms must be at least 1".into());
                }
            }
        }
        if let RegistryConfig::Shared { control_topic } = &self.registry {
            if !matches!(self.events, EventsConfig::Kafka { .. }) {
                p.push("registry.type = \"shared\" needs events.type = \"kafka\" (its change notices go on a Kafka topic)".into());
            }
            if !matches!(self.state, StateConfig::Cql { .. }) {
                p.push("registry.type = \"shared\" needs state.type = \"cql\" (plugins are kept in the cluster store)".into());
            }
            if !spate_core::manifest::valid_topic(control_topic) {
                p.push(format!(
                    "registry.control-topic `{control_topic}` is not a valid topic name"
                ));
            }
        }
        if self.dispatch.max_buffered_per_partition == 0 {
            p.push("dispatch.max-buffered-per-partition must be at least 1".into());
        }
        if let Some(cql) = self.state.cql_options() {
            p.extend(cql.problems().into_iter().map(|e| format!("state: {e}")));
        }
        if let Some(redis) = self.cache.redis_options() {
            p.extend(redis.problems().into_iter().map(|e| format!("cache: {e}")));
        }
        if let CacheConfig::Redis {
            retry_interval_ms: 0,
            ..
        } = &self.cache
        {
            p.push("cache.retry-interval-ms must be at least 1".into());
        }
        if self.read_through.enabled {
            p.extend(
                self.read_through
                    .tier_config()
                    .problems()
                    .into_iter()
                    .map(|e| format!("read-through: {e}")),
            );
        }
        if self.dispatch.max_buffered == 0 {
            p.push("dispatch.max-buffered must be at least 1".into());
        }
        if self.dispatch.max_buffered_bytes == 0 {
            p.push("dispatch.max-buffered-bytes must be at least 1".into());
        }
        if self.sandbox.pool_instances == 0 {
            p.push("sandbox.pool-instances must be at least 1".into());
        }
        if self.sandbox.max_memory_mb == 0 || self.sandbox.max_memory_mb > 4096 {
            p.push("sandbox.max-memory-mb must be 1..=4096".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(p.join("; ")))
        }
    }

    /// This runtime's lasting identity among its peers: the configured
    /// `events.instance-id` (the pod name in a StatefulSet), else an id created once and
    /// kept in the data directory. What a restarted runtime uses to fence and abort the
    /// transactions the previous process left open.
    pub fn instance_id(&self) -> std::io::Result<String> {
        if let EventsConfig::Kafka {
            instance_id: Some(id),
            ..
        } = &self.events
            && !id.is_empty()
        {
            return Ok(id.clone());
        }
        let path = self.data_dir.join("instance-id");
        match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
            Ok(_) => Self::new_instance_id(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::new_instance_id(&path),
            Err(e) => Err(e),
        }
    }

    fn new_instance_id(path: &std::path::Path) -> std::io::Result<String> {
        let id = format!("spate-{:016x}", rand::random::<u64>());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &id)?;
        std::fs::rename(&tmp, path)?;
        Ok(id)
    }

    /// The ceilings plugin manifests are checked against.
    pub fn ceilings(&self) -> spate_core::manifest::LimitCeilings {
        spate_core::manifest::LimitCeilings {
            max_timeout_ms: self.sandbox.max_timeout_ms,
            max_memory_mb: self.sandbox.max_memory_mb,
            max_concurrency: self.sandbox.max_concurrency,
            max_emits: self.sandbox.max_emits,
            max_emit_bytes: self.sandbox.max_emit_bytes,
            max_writes: self.sandbox.max_writes,
            max_backoff_ms: self.sandbox.max_backoff_ms,
            workflow_topic: self.workflow_topic.clone(),
            exactly_once_unsupported: match (&self.events, &self.state) {
                (EventsConfig::Kafka { .. }, StateConfig::Cql { .. }) => Some(
                    "on Kafka it needs the embedded state store (state.type = \"embedded\"): \
                     a CQL store cannot take back a checkpoint whose Kafka transaction failed"
                        .into(),
                ),
                (EventsConfig::Kafka { .. }, _) if self.read_through.enabled => Some(
                    "on Kafka it needs state writes to wait for the checkpoint, which the \
                     read-through tier does not do (set read-through.enabled = false)"
                        .into(),
                ),
                _ => None,
            },
        }
    }

    /// What the dispatcher's pipelines run with: `dispatch.*`, the events backend's group
    /// prefix and revoke timeout, and `workflow-topic`. On Kafka the topics a plugin
    /// writes to must exist before it consumes.
    pub fn dispatch_settings(&self) -> spate_dispatch::DispatchSettings {
        let d = &self.dispatch;
        spate_dispatch::DispatchSettings {
            group_prefix: self.events.group_prefix().to_owned(),
            workflow_topic: self.workflow_topic.clone(),
            max_buffered: d.max_buffered,
            max_buffered_bytes: d.max_buffered_bytes,
            max_buffered_per_partition: d.max_buffered_per_partition,
            commit_interval: Duration::from_millis(d.commit_interval_ms),
            checkpoint_events: d.checkpoint_events,
            drain_timeout: Duration::from_millis(d.drain_timeout_ms),
            revoke_timeout: self.events.revoke_timeout(),
            check_output_topics: matches!(self.events, EventsConfig::Kafka { .. }),
            ..spate_dispatch::DispatchSettings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spate.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path))
    }

    #[test]
    fn the_instance_id_is_configured_or_kept_in_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config {
            data_dir: dir.path().join("data"),
            ..Config::default()
        };
        let first = c.instance_id().unwrap();
        assert!(first.starts_with("spate-"), "{first}");
        assert_eq!(c.instance_id().unwrap(), first, "kept across restarts");
        c.events = load(
            "[events]\ntype = \"kafka\"\nbootstrap-servers = \"b:9092\"\ninstance-id = \"pod-0\"\n",
        )
        .unwrap()
        .events;
        assert_eq!(c.instance_id().unwrap(), "pod-0");
    }

    #[test]
    fn exactly_once_is_offered_where_a_checkpoint_can_be_taken_back() {
        let kafka = "[events]\ntype = \"kafka\"\nbootstrap-servers = \"127.0.0.1:9092\"\n";
        assert_eq!(load("").unwrap().ceilings().exactly_once_unsupported, None);
        assert_eq!(
            load(kafka).unwrap().ceilings().exactly_once_unsupported,
            None
        );
        let cql = format!("{kafka}[state]\ntype = \"cql\"\n");
        let why = load(&cql)
            .unwrap()
            .ceilings()
            .exactly_once_unsupported
            .unwrap();
        assert!(why.contains("embedded state store"), "{why}");
        let tier = format!("{kafka}[read-through]\nenabled = true\n");
        let why = load(&tier)
            .unwrap()
            .ceilings()
            .exactly_once_unsupported
            .unwrap();
        assert!(why.contains("read-through"), "{why}");
    }

    /// The configurations shipped in `deploy/` must load: a renamed key breaks them.
    #[test]
    fn the_shipped_deploy_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
        for file in [
            "compose/spate-cluster.toml",
            "compose/spate-kafka.toml",
            "image/spate.toml",
        ] {
            let path = root.join(file);
            let c = Config::load(Some(&path)).unwrap_or_else(|e| panic!("{file}: {e}"));
            if file.starts_with("compose/") {
                assert!(c.state.cql_options().is_some(), "{file}");
                assert!(c.cache.redis_options().is_some(), "{file}");
                assert!(c.read_through.enabled, "{file}");
            }
            if file.ends_with("spate-kafka.toml") {
                assert!(matches!(c.events, EventsConfig::Kafka { .. }));
                assert!(matches!(c.registry, RegistryConfig::Shared { .. }));
            }
        }
    }

    #[test]
    fn kafka_and_the_shared_registry_are_checked_together() {
        let err = load(
            r#"
[events]
type = "kafka"
bootstrap-servers = ""
[events.librdkafka]
"enable.auto.commit" = "true"
[registry]
type = "shared"
"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bootstrap-servers is empty"), "{err}");
        assert!(err.contains("enable.auto.commit"), "{err}");
        assert!(err.contains("needs state.type = \"cql\""), "{err}");
        let err = load("[registry]\ntype = \"shared\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs events.type = \"kafka\""), "{err}");
    }

    #[test]
    fn cluster_backends_and_read_through_are_chosen_by_type() {
        let c = load(
            r#"
[state]
type = "cql"
nodes = ["10.0.0.1:9042", "10.0.0.2:9042"]
keyspace = "spate_prod"
replication = "{'class': 'NetworkTopologyStrategy', 'dc1': 3}"
tablets = false
consistency = "quorum"
serial-consistency = "serial"
request-timeout-ms = 2000
[cache]
type = "redis"
urls = ["redis://10.0.0.9:6379/0"]
command-timeout-ms = 250
[read-through]
enabled = true
ttl-ms = 30000
on-write = "invalidate"
"#,
        )
        .unwrap();
        let cql = c.state.cql_options().unwrap();
        assert_eq!(cql.nodes.len(), 2);
        assert_eq!(cql.keyspace, "spate_prod");
        assert_eq!(cql.table, "state");
        assert_eq!(cql.tablets, Some(false));
        assert_eq!(cql.consistency, spate_state_cql::Consistency::Quorum);
        assert_eq!(cql.request_timeout, Duration::from_secs(2));
        let redis = c.cache.redis_options().unwrap();
        assert_eq!(redis.urls, vec!["redis://10.0.0.9:6379/0"]);
        assert!(!redis.cluster);
        assert_eq!(redis.command_timeout, Duration::from_millis(250));
        let rt = c.read_through.tier_config();
        assert!(c.read_through.enabled);
        assert_eq!(rt.ttl, Duration::from_secs(30));
        assert_eq!(rt.on_write, spate_core::tiered::WritePolicy::Invalidate);
    }

    #[test]
    fn embedded_retention_has_defaults_and_per_topic_overrides() {
        let c = load(
            r#"
[events]
type = "embedded"
default-partitions = 2
[events.retention]
max-partition-bytes = 1048576
[events.retention.topics.audit]
max-age-ms = 0
[events.retention.topics.orders]
max-age-ms = 3600000
"#,
        )
        .unwrap();
        let EventsConfig::Embedded {
            default_partitions,
            retention,
            ..
        } = &c.events
        else {
            panic!("not embedded: {:?}", c.events);
        };
        assert_eq!(*default_partitions, 2);
        let r = retention.log_config();
        let week = Some(Duration::from_secs(7 * 24 * 3600));
        assert_eq!(r.default.max_age, week);
        assert_eq!(r.default.max_partition_bytes, Some(1 << 20));
        // An override replaces only what it names; 0 means no limit.
        assert_eq!(r.of("audit").max_age, None);
        assert_eq!(r.of("audit").max_partition_bytes, Some(1 << 20));
        assert_eq!(r.of("orders").max_age, Some(Duration::from_secs(3600)));
        assert_eq!(r.of("other"), r.default);
        let err =
            load("[events]\ntype = \"embedded\"\n[events.retention]\nmax-age = 1\n").unwrap_err();
        assert!(err.to_string().contains("max-age"), "{err}");
        let err = load("[events]\ntype = \"embedded\"\n[events.retention]\ncheck-interval-ms = 0\n[events.retention.topics.\"bad topic\"]\n")
            .unwrap_err();
        assert!(err.to_string().contains("check-interval-ms"), "{err}");
        assert!(err.to_string().contains("bad topic"), "{err}");
    }

    #[test]
    fn defaults_stay_embedded_and_a_bare_type_takes_every_default() {
        let c = load("").unwrap();
        assert!(matches!(c.state, StateConfig::Embedded));
        assert!(matches!(c.cache, CacheConfig::Memory { .. }));
        assert!(!c.read_through.enabled);
        let c = load("[cache]\ntype = \"redis\"\n[state]\ntype = \"cql\"\n").unwrap();
        assert_eq!(
            c.cache.redis_options().unwrap().urls,
            vec!["redis://127.0.0.1:6379/"]
        );
        assert_eq!(c.state.cql_options().unwrap().nodes, vec!["127.0.0.1:9042"]);
    }

    #[test]
    fn every_backend_problem_is_reported_at_once() {
        let err = load(
            r#"
[state]
type = "cql"
keyspace = "bad-name"
[cache]
type = "redis"
urls = ["http://not-redis"]
retry-interval-ms = 0
[read-through]
enabled = true
key-prefix = "plugin:"
"#,
        )
        .unwrap_err()
        .to_string();
        for needle in ["keyspace", "Redis URL", "retry-interval-ms", "key-prefix"] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
        let err = load("[cache]\ntype = \"redis\"\nmax-bytes = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max-bytes"), "{err}");
    }
}
