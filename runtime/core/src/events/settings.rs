//! The embedded log's settings as the runtime's configuration spells them: the `[events]`
//! section with `type = "embedded"` (every key optional), turned into a [`LogConfig`].

use super::log::{LogConfig, RetentionConfig, TopicRetention};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The embedded log's `[events]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LogSettings {
    /// Partitions of topics created on first use.
    pub default_partitions: u32,
    /// Create topics on first append or subscription.
    pub auto_create_topics: bool,
    /// What old events the log deletes ([`RetentionSettings`]).
    pub retention: RetentionSettings,
}

impl Default for LogSettings {
    fn default() -> Self {
        let log = LogConfig::default();
        Self {
            default_partitions: log.default_partitions,
            auto_create_topics: log.auto_create_topics,
            retention: RetentionSettings::default(),
        }
    }
}

impl LogSettings {
    /// The log's configuration.
    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            default_partitions: self.default_partitions,
            auto_create_topics: self.auto_create_topics,
            retention: self.retention.log_config(),
            ..LogConfig::default()
        }
    }
}

/// Retention of the embedded log: a partition's oldest events are deleted once older than
/// `max-age-ms` or while the partition holds more than `max-partition-bytes`, but never an
/// event some consumer group (a plugin) has not committed yet. 0 means no limit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct RetentionSettings {
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

impl Default for RetentionSettings {
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

impl RetentionSettings {
    /// The embedded log's retention settings.
    pub fn log_config(&self) -> RetentionConfig {
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
