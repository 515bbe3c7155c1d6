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
    /// Dispatcher.
    pub dispatch: DispatchConfig,
    /// Sandbox and plugin limits.
    pub sandbox: SandboxSettings,
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
            dispatch: DispatchConfig::default(),
            sandbox: SandboxSettings::default(),
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
        }
    }
}

/// Where events come from and go to.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", tag = "type")]
pub enum EventsConfig {
    /// The built-in durable log in the data directory.
    Embedded {
        /// Partitions of topics created on first use.
        #[serde(default = "default_partitions")]
        default_partitions: u32,
        /// Create topics on first append or subscription.
        #[serde(default = "default_true")]
        auto_create_topics: bool,
    },
}

fn default_partitions() -> u32 {
    4
}

fn default_true() -> bool {
    true
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self::Embedded {
            default_partitions: default_partitions(),
            auto_create_topics: true,
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
    /// Commit interval in milliseconds.
    pub commit_interval_ms: u64,
    /// How long shutdown waits for in-flight events, in milliseconds.
    pub drain_timeout_ms: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_buffered: 4096,
            commit_interval_ms: 100,
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
    /// Sandboxes alive at once across all plugins (pooling allocator slots).
    pub pool_instances: u32,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            max_memory_mb: 256,
            max_timeout_ms: 60_000,
            max_concurrency: 256,
            pool_instances: 512,
        }
    }
}

/// Top-level keys of [`Config`], as environment variables may name them.
const CONFIG_SECTIONS: &[&str] = &[
    "data-dir",
    "workflow-topic",
    "api",
    "events",
    "state",
    "cache",
    "dispatch",
    "sandbox",
];

/// A configuration problem, with every problem listed.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Load defaults, then `file` (if given, it must exist), then `SPATE_*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
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
        let EventsConfig::Embedded {
            default_partitions, ..
        } = &self.events;
        if *default_partitions == 0 || *default_partitions > 1024 {
            p.push("events.default-partitions must be 1..=1024".into());
        }
        if self.dispatch.max_buffered == 0 {
            p.push("dispatch.max-buffered must be at least 1".into());
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

    /// The ceilings plugin manifests are checked against.
    pub fn ceilings(&self) -> spate_core::manifest::LimitCeilings {
        spate_core::manifest::LimitCeilings {
            max_timeout_ms: self.sandbox.max_timeout_ms,
            max_memory_mb: self.sandbox.max_memory_mb,
            max_concurrency: self.sandbox.max_concurrency,
        }
    }
}
