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
    pub read_through: spate_core::state::tiered::ReadThroughConfig,
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
            read_through: spate_core::state::tiered::ReadThroughConfig::default(),
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
    /// The built-in durable log in the data directory. Its keys and defaults are
    /// [`spate_core::events::LogSettings`]'s.
    Embedded(spate_core::events::LogSettings),
    /// Kafka (`spate-kafka`): each plugin consumes its subscriptions as consumer group
    /// `<group>.<plugin>` (cooperative-sticky), emits and dead letters go through an
    /// idempotent producer (`acks=all`), and an input offset is committed only after
    /// everything below it is handled and its emits are acknowledged. Its keys and
    /// defaults are [`spate_kafka::KafkaOptions`]'s.
    Kafka(spate_kafka::KafkaOptions),
}

impl EventsConfig {
    /// The prefix of every plugin's consumer group: plugin `p` consumes as `<prefix>.p`.
    pub fn group_prefix(&self) -> &str {
        match self {
            Self::Embedded(_) => "spate",
            Self::Kafka(o) => &o.group,
        }
    }

    /// How long revoked partitions' in-flight events may run.
    pub fn revoke_timeout(&self) -> Duration {
        match self {
            Self::Embedded(_) => Duration::from_secs(10),
            Self::Kafka(o) => o.revoke_timeout,
        }
    }

    /// The Kafka settings, if this selects Kafka (an empty `instance-id`, as an unset
    /// environment variable gives, means none).
    pub fn kafka_options(&self) -> Option<spate_kafka::KafkaOptions> {
        let Self::Kafka(o) = self else {
            return None;
        };
        let mut o = o.clone();
        o.instance_id = o.instance_id.filter(|i| !i.is_empty());
        Some(o)
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self::Embedded(spate_core::events::LogSettings::default())
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
    /// namespace, compare-and-swap by lightweight transactions. Its keys and defaults are
    /// [`spate_state_cql::CqlOptions`]'s.
    Cql(spate_state_cql::CqlOptions),
}

impl StateConfig {
    /// The CQL store's settings, if this selects it.
    pub fn cql_options(&self) -> Option<spate_state_cql::CqlOptions> {
        match self {
            Self::Cql(o) => Some(o.clone()),
            Self::Embedded => None,
        }
    }
}

/// Cache backend.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "type")]
pub enum CacheConfig {
    /// In-process `moka` cache. Its keys and defaults are
    /// [`spate_core::cache::MemorySettings`]'s.
    Memory(spate_core::cache::MemorySettings),
    /// Redis, or Redis Cluster (`spate-cache-redis`). While it is unreachable, reads are
    /// misses and writes are skipped (metric `spate_cache_degraded`); it reconnects by
    /// itself. Its keys and defaults are [`spate_cache_redis::RedisOptions`]'s.
    Redis(spate_cache_redis::RedisOptions),
}

impl CacheConfig {
    /// The Redis cache's settings, if this selects it.
    pub fn redis_options(&self) -> Option<spate_cache_redis::RedisOptions> {
        match self {
            Self::Redis(o) => Some(o.clone()),
            Self::Memory(_) => None,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self::Memory(spate_core::cache::MemorySettings::default())
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
    /// The share of one core a plugin's shadow candidate may take (0 to 1); events over
    /// it are not compared.
    pub shadow_cpu_share: f64,
}

impl Default for DispatchConfig {
    /// The dispatcher's own defaults ([`spate_dispatch::DispatchSettings`]).
    fn default() -> Self {
        let d = spate_dispatch::DispatchSettings::default();
        let ms = |t: Duration| u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
        Self {
            max_buffered: d.max_buffered,
            max_buffered_bytes: d.max_buffered_bytes,
            max_buffered_per_partition: d.max_buffered_per_partition,
            commit_interval_ms: ms(d.commit_interval),
            checkpoint_events: d.checkpoint_events,
            drain_timeout_ms: ms(d.drain_timeout),
            shadow_cpu_share: d.shadow_cpu_share,
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
    /// The manifests' ceilings are [`LimitCeilings`](spate_core::manifest::LimitCeilings)'
    /// defaults and the pool the sandbox's: one default per setting.
    fn default() -> Self {
        let c = spate_core::manifest::LimitCeilings::default();
        Self {
            max_memory_mb: c.max_memory_mb,
            max_timeout_ms: c.max_timeout_ms,
            max_concurrency: c.max_concurrency,
            max_emits: c.max_emits,
            max_emit_bytes: c.max_emit_bytes,
            max_writes: c.max_writes,
            max_backoff_ms: c.max_backoff_ms,
            pool_instances: spate_engine::sandbox::DEFAULT_POOL_INSTANCES,
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
        if !(0.0..=1.0).contains(&self.dispatch.shadow_cpu_share) {
            p.push("dispatch.shadow-cpu-share must be 0 to 1 (a share of one core)".into());
        }
        if self.api.header_read_timeout_ms == 0 || self.api.idle_timeout_ms == 0 {
            p.push("api.header-read-timeout-ms and api.idle-timeout-ms must be at least 1".into());
        }
        match &self.events {
            EventsConfig::Embedded(log) => {
                let (default_partitions, retention) = (log.default_partitions, &log.retention);
                if default_partitions == 0 || default_partitions > 1024 {
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
            EventsConfig::Kafka(kafka) => {
                if let Some(Err(e)) = self.events.kafka_options().map(|o| o.validate()) {
                    p.extend(e.0.into_iter().map(|e| format!("events: {e}")));
                }
                if kafka.revoke_timeout
                    >= Duration::from_millis(self.dispatch.drain_timeout_ms.max(1) * 10)
                {
                    p.push("events.revoke-timeout-ms is over ten times dispatch.drain-timeout-ms; a rebalance would stall the group that long".into());
                }
            }
        }
        if let RegistryConfig::Shared { control_topic } = &self.registry {
            if !matches!(self.events, EventsConfig::Kafka(_)) {
                p.push("registry.type = \"shared\" needs events.type = \"kafka\" (its change notices go on a Kafka topic)".into());
            }
            if !matches!(self.state, StateConfig::Cql(_)) {
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
        if self.read_through.enabled {
            p.extend(
                self.read_through
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
        if let Some(id) = self.events.kafka_options().and_then(|k| k.instance_id) {
            return Ok(id);
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
                (EventsConfig::Kafka(_), StateConfig::Cql(_)) => Some(
                    "on Kafka it needs the embedded state store (state.type = \"embedded\"): \
                     a CQL store cannot take back a checkpoint whose Kafka transaction failed"
                        .into(),
                ),
                (EventsConfig::Kafka(_), _) if self.read_through.enabled => Some(
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
            check_output_topics: matches!(self.events, EventsConfig::Kafka(_)),
            shadow_cpu_share: d.shadow_cpu_share,
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

    /// Every key of a TOML value with its value, tables flattened (`a.b.c`), empty tables
    /// left out.
    fn flatten(
        prefix: &str,
        v: &toml::Value,
        out: &mut std::collections::BTreeMap<String, toml::Value>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }

    /// The README's configuration block is the code's defaults, key for key: a default
    /// changed in the code (or a setting added) and not in the README fails here.
    #[test]
    fn the_readme_documents_every_default() {
        let readme = include_str!("../../../README.md");
        let block = readme
            .split("The defaults:\n\n```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("README: a ```toml block after \"The defaults:\"");
        if let Err(e) = load(block) {
            panic!("README's configuration block is refused: {e}");
        }
        let documented: toml::Value = toml::from_str(block).unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let (mut want, mut got) = (Default::default(), Default::default());
        flatten("", &defaults, &mut want);
        flatten("", &documented, &mut got);
        let missing: Vec<String> = want
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        let extra: Vec<String> = got
            .iter()
            .filter(|(k, _)| !want.contains_key(*k))
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "README's configuration block differs from Config::default(): \
             defaults missing or different there: {missing:#?}; keys that are no setting: {extra:#?}"
        );
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
                assert!(matches!(c.events, EventsConfig::Kafka(_)));
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
        let rt = c.read_through.clone();
        assert!(c.read_through.enabled);
        assert_eq!(rt.ttl, Duration::from_secs(30));
        assert_eq!(
            rt.on_write,
            spate_core::state::tiered::WritePolicy::Invalidate
        );
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
        let EventsConfig::Embedded(log) = &c.events else {
            panic!("not embedded: {:?}", c.events);
        };
        let (default_partitions, retention) = (log.default_partitions, &log.retention);
        assert_eq!(default_partitions, 2);
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
        assert!(matches!(c.cache, CacheConfig::Memory(_)));
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
