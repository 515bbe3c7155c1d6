//! The plugin manifest (`spate.toml`): what a plugin subscribes to, what it may touch,
//! and the limits it runs under. Parsed strictly: unknown fields are errors, and every
//! problem is reported at once.

use crate::StartPosition;
use crate::filter::Filter;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// State namespaces starting with this are the runtime's own (the shared registry keeps
/// plugins and components there); manifests may not claim them.
pub const RESERVED_NAMESPACE_PREFIX: &str = "_spate";

/// Upper bounds the runtime accepts for manifest limits, whatever a plugin asks for.
#[derive(Clone, Debug)]
pub struct LimitCeilings {
    /// Largest per-event wall-clock deadline.
    pub max_timeout_ms: u64,
    /// Largest per-instance linear memory.
    pub max_memory_mb: u64,
    /// Largest number of concurrent events per plugin.
    pub max_concurrency: u32,
    /// Most emits per event a manifest may ask for.
    pub max_emits: u32,
    /// Most emitted bytes per event a manifest may ask for.
    pub max_emit_bytes: u64,
    /// Most state and cache writes per event a manifest may ask for.
    pub max_writes: u32,
    /// Longest retry backoff a manifest may ask for, in milliseconds.
    pub max_backoff_ms: u64,
    /// The runtime's workflow topic: workflows start only through `start-workflow` (checked
    /// against `capabilities.workflows`), so no plugin may emit or dead-letter into it.
    pub workflow_topic: String,
    /// Why this runtime cannot run a plugin with `exactly-once = true` (its state store
    /// cannot take back a checkpoint whose transaction failed), or `None` if it can.
    pub exactly_once_unsupported: Option<String>,
}

impl Default for LimitCeilings {
    fn default() -> Self {
        Self {
            max_timeout_ms: 60_000,
            max_memory_mb: 256,
            max_concurrency: 256,
            max_emits: 10_000,
            max_emit_bytes: 64 << 20,
            max_writes: 100_000,
            max_backoff_ms: 3_600_000,
            workflow_topic: "workflows".into(),
            exactly_once_unsupported: None,
        }
    }
}

/// A plugin manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// Plugin name: lowercase letters, digits and `-`, 1–64 characters.
    pub name: String,
    /// Semantic version of this upload; a name and version identify one component.
    pub version: semver::Version,
    /// One line on what the plugin does.
    #[serde(default)]
    pub description: String,
    /// Topics the plugin handles.
    pub subscriptions: Vec<Subscription>,
    /// What the plugin may touch.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Resource limits per event.
    #[serde(default)]
    pub limits: Limits,
    /// What happens when the handler fails.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// How events are ordered.
    #[serde(default)]
    pub ordering: Ordering,
    /// Instance reuse.
    #[serde(default)]
    pub execution: Execution,
    /// Topic for events that could not be handled; default `<name>.dlq`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// What happens to an event that exhausts its attempts or is rejected.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Publish emits in Kafka transactions that also commit the consumer positions, so a
    /// `read_committed` reader sees every emit exactly once, even across a crash; emits
    /// then become visible at each checkpoint instead of as events finish. On the
    /// embedded log emits are exactly-once either way (an append whose idempotency id the
    /// log holds is dropped).
    #[serde(default)]
    pub exactly_once: bool,
    /// Which events reach the handler, decided before a sandbox is instantiated; the
    /// rest are committed without effects ([`crate::filter`]).
    #[serde(default, skip_serializing_if = "Filter::is_empty")]
    pub filter: Filter,
    /// The effect record: what each handled event did, kept for replays and shadow
    /// versions to compare with ([`crate::host::record`]).
    #[serde(default)]
    pub record: RecordSettings,
}

/// The manifest's `[record]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct RecordSettings {
    /// Keep a record of every handled event.
    pub enabled: bool,
    /// How long a record is kept.
    pub max_age_hours: u32,
    /// Records kept per source partition (the latest this many offsets).
    pub per_partition: u32,
    /// Largest record kept whole; beyond it, values are kept as digests.
    pub max_bytes: usize,
}

impl Default for RecordSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            max_age_hours: 7 * 24,
            per_partition: 10_000,
            max_bytes: 64 << 10,
        }
    }
}

impl RecordSettings {
    /// `max-age-hours` as a duration.
    pub fn max_age(&self) -> Duration {
        Duration::from_secs(u64::from(self.max_age_hours) * 3600)
    }

    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_age_hours == 0 || self.max_age_hours > 90 * 24 {
            p.push("record.max-age-hours must be 1 to 2160 (90 days)".into());
        }
        if self.per_partition == 0 || self.per_partition > 10_000_000 {
            p.push("record.per-partition must be 1 to 10000000".into());
        }
        if !(1024..=(4 << 20)).contains(&self.max_bytes) {
            p.push("record.max-bytes must be 1024 to 4194304".into());
        }
        p
    }
}

/// What happens to an event that exhausts its attempts or is rejected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// It goes to the dead-letter topic; its key's later events go on.
    #[default]
    DeadLetter,
    /// It is parked with every later event of its key (in order, durable, committed past)
    /// until redriven through a fixed version or discarded; other keys flow.
    ParkKey,
}

/// One subscribed topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Subscription {
    /// Topic name.
    pub topic: String,
    /// Where to start when the plugin has never read this topic.
    #[serde(default)]
    pub start: StartPosition,
}

/// Capabilities granted to the plugin; everything else is denied.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Capabilities {
    /// State namespace; default the plugin name. No two plugins may share one.
    #[serde(default)]
    pub state_namespace: Option<String>,
    /// Cache key prefix; default `<name>:`. No two plugins may share one.
    #[serde(default)]
    pub cache_prefix: Option<String>,
    /// Topics `emit` may write to.
    #[serde(default)]
    pub emit_topics: Vec<String>,
    /// Workflow names `start-workflow` may start; `["*"]` allows any.
    #[serde(default)]
    pub workflows: Vec<String>,
    /// Allow `emit-topics` to include a subscribed topic: the plugin feeds itself, and only
    /// `limits.max-hops` stops a chain. Off by default (one seed event would loop forever).
    #[serde(default)]
    pub allow_self_emit: bool,
}

/// Per-event limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Wall-clock deadline of one call, in milliseconds.
    #[serde(default = "Limits::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Linear memory cap of one instance, in MiB.
    #[serde(default = "Limits::default_memory_mb")]
    pub memory_mb: u64,
    /// Most emits (including workflow starts) per event.
    #[serde(default = "Limits::default_max_emits")]
    pub max_emits: u32,
    /// Most bytes emitted per event: payloads, keys and headers.
    #[serde(default = "Limits::default_max_emit_bytes")]
    pub max_emit_bytes: u64,
    /// Most state and cache writes per event (a key written twice counts once). The bytes
    /// they and the emits hold are bounded by `memory-mb`.
    #[serde(default = "Limits::default_max_writes")]
    pub max_writes: u32,
    /// Most handlers an event may have passed through by emits (its `spate-hops`): an emit
    /// past it traps, so a loop of plugins feeding each other dead-letters instead of
    /// growing the log forever.
    #[serde(default = "Limits::default_max_hops")]
    pub max_hops: u32,
    /// Most events of this plugin handled at once.
    #[serde(default = "Limits::default_concurrency")]
    pub concurrency: u32,
}

impl Limits {
    fn default_timeout_ms() -> u64 {
        1_000
    }
    fn default_memory_mb() -> u64 {
        64
    }
    fn default_max_emits() -> u32 {
        64
    }
    fn default_max_emit_bytes() -> u64 {
        1 << 20
    }
    fn default_max_writes() -> u32 {
        10_000
    }
    fn default_max_hops() -> u32 {
        32
    }
    fn default_concurrency() -> u32 {
        32
    }

    /// The call deadline.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The memory cap in bytes.
    pub fn memory_bytes(&self) -> usize {
        (self.memory_mb as usize).saturating_mul(1 << 20)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: Self::default_timeout_ms(),
            memory_mb: Self::default_memory_mb(),
            max_emits: Self::default_max_emits(),
            max_emit_bytes: Self::default_max_emit_bytes(),
            max_writes: Self::default_max_writes(),
            max_hops: Self::default_max_hops(),
            concurrency: Self::default_concurrency(),
        }
    }
}

/// Retry policy for `retry` outcomes and traps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetryPolicy {
    /// Attempts in all, the first included; then the event is dead-lettered.
    #[serde(default = "RetryPolicy::default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry, in milliseconds (doubles each time, with jitter).
    #[serde(default = "RetryPolicy::default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest delay between attempts, in milliseconds.
    #[serde(default = "RetryPolicy::default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl RetryPolicy {
    fn default_max_attempts() -> u32 {
        3
    }
    fn default_initial_backoff_ms() -> u64 {
        100
    }
    fn default_max_backoff_ms() -> u64 {
        10_000
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: Self::default_max_attempts(),
            initial_backoff_ms: Self::default_initial_backoff_ms(),
            max_backoff_ms: Self::default_max_backoff_ms(),
        }
    }
}

/// How strictly events are ordered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ordering {
    /// FIFO per key; different keys run concurrently.
    #[default]
    Key,
    /// FIFO per partition: one event of a partition at a time.
    Partition,
}

/// Instance reuse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Execution {
    /// `fresh` (default): a new sandbox per event. `warm`: an instance serves up to
    /// `max-events-per-instance` events of one lane and is dropped on any error.
    #[serde(default)]
    pub mode: ExecutionMode,
    /// Events one warm instance serves before it is replaced.
    #[serde(default = "Execution::default_max_events")]
    pub max_events_per_instance: u32,
}

impl Execution {
    fn default_max_events() -> u32 {
        1_000
    }
}

impl Default for Execution {
    fn default() -> Self {
        Self {
            mode: ExecutionMode::Fresh,
            max_events_per_instance: Self::default_max_events(),
        }
    }
}

/// Instance reuse mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecutionMode {
    /// A fresh instance per event: full isolation.
    #[default]
    Fresh,
    /// Reuse an instance within a lane: faster, less isolated.
    Warm,
}

/// Every problem found in a manifest.
#[derive(Debug, thiserror::Error)]
#[error("invalid manifest: {}", .problems.join("; "))]
pub struct ManifestError {
    /// One line per problem.
    pub problems: Vec<String>,
}

/// Whether `s` is an acceptable plugin name: 1–64 of `[a-z0-9-]`, not starting with `-`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// Whether `s` is an acceptable topic name: 1–249 of `[A-Za-z0-9._-]`, and neither `.`
/// nor `..`, as in Kafka (those two would name directories of the log).
pub fn valid_topic(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 249
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Manifest {
    /// Parse and validate a manifest against the runtime's ceilings.
    pub fn parse(text: &str, ceilings: &LimitCeilings) -> Result<Self, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| ManifestError {
            problems: vec![e.message().to_string()],
        })?;
        manifest.validate(ceilings)?;
        Ok(manifest)
    }

    /// Check every rule and report all violations together.
    pub fn validate(&self, ceilings: &LimitCeilings) -> Result<(), ManifestError> {
        let mut p = Vec::new();
        if !valid_name(&self.name) {
            p.push(format!(
                "name `{}` must be 1-64 characters of a-z, 0-9 and `-`",
                self.name
            ));
        }
        if self.subscriptions.is_empty() {
            p.push("subscriptions must name at least one topic".into());
        }
        p.extend(self.filter.problems());
        p.extend(self.record.problems());
        if self.exactly_once
            && let Some(why) = &ceilings.exactly_once_unsupported
        {
            p.push(format!("exactly-once = true is not available here: {why}"));
        }
        let mut subscribed = std::collections::HashSet::new();
        for s in &self.subscriptions {
            if !valid_topic(&s.topic) {
                p.push(format!(
                    "subscription topic `{}` is not a valid topic name",
                    s.topic
                ));
            }
            // Two pipelines in one consumer group would each handle every event, and the
            // key's order would be lost between them.
            if !subscribed.insert(s.topic.as_str()) {
                p.push(format!(
                    "topic `{}` is subscribed twice; list each topic once",
                    s.topic
                ));
            }
        }
        for t in &self.capabilities.emit_topics {
            if !valid_topic(t) {
                p.push(format!("emit topic `{t}` is not a valid topic name"));
            }
            if subscribed.contains(t.as_str()) && !self.capabilities.allow_self_emit {
                p.push(format!(
                    "emit topic `{t}` is also subscribed: the plugin would feed its own input \
                     (one event could loop forever); set capabilities.allow-self-emit = true \
                     if that is intended (limits.max-hops bounds each chain)"
                ));
            }
            if *t == ceilings.workflow_topic {
                p.push(format!(
                    "emit topic `{t}` is the workflow topic: start workflows with \
                     start-workflow and list them in capabilities.workflows"
                ));
            }
        }
        if let Some(t) = &self.dead_letter_topic
            && !valid_topic(t)
        {
            p.push(format!("dead-letter-topic `{t}` is not a valid topic name"));
        }
        // A dead-letter topic is a write the plugin gets without asking for it: it must be
        // the plugin's own, never a topic it reads (its dead letters would loop), emits to,
        // or the workflow topic. Other plugins' topics are checked at upload.
        let dlq = self.dead_letter_topic();
        if self.subscriptions.iter().any(|s| s.topic == dlq) {
            p.push(format!(
                "dead-letter-topic `{dlq}` is also subscribed: its dead letters would come back forever"
            ));
        }
        if self.capabilities.emit_topics.contains(&dlq) {
            p.push(format!(
                "dead-letter-topic `{dlq}` is also an emit topic; give dead letters a topic of their own"
            ));
        }
        if dlq == ceilings.workflow_topic {
            p.push(format!(
                "dead-letter-topic `{dlq}` is the workflow topic; give dead letters a topic of their own"
            ));
        }
        if let Some(ns) = &self.capabilities.state_namespace
            && (ns.is_empty() || ns.len() > 128)
        {
            p.push("capabilities.state-namespace must be 1-128 characters".into());
        }
        if let Some(ns) = &self.capabilities.state_namespace
            && ns.starts_with(RESERVED_NAMESPACE_PREFIX)
        {
            p.push(format!(
                "capabilities.state-namespace `{ns}` starts with `{RESERVED_NAMESPACE_PREFIX}`, which is reserved for the runtime (the shared plugin registry)"
            ));
        }
        if let Some(prefix) = &self.capabilities.cache_prefix
            && (prefix.is_empty() || prefix.len() > 128)
        {
            p.push("capabilities.cache-prefix must be 1-128 characters".into());
        }
        if let Some(prefix) = &self.capabilities.cache_prefix
            && (prefix.starts_with(crate::state::tiered::RESERVED_CACHE_PREFIX)
                || crate::state::tiered::RESERVED_CACHE_PREFIX.starts_with(prefix.as_str()))
        {
            p.push(format!(
                "capabilities.cache-prefix `{prefix}` overlaps `{}`, which is reserved for the runtime's state cache",
                crate::state::tiered::RESERVED_CACHE_PREFIX
            ));
        }
        let l = &self.limits;
        if l.timeout_ms == 0 || l.timeout_ms > ceilings.max_timeout_ms {
            p.push(format!(
                "limits.timeout-ms must be 1..={} (got {})",
                ceilings.max_timeout_ms, l.timeout_ms
            ));
        }
        if l.memory_mb == 0 || l.memory_mb > ceilings.max_memory_mb {
            p.push(format!(
                "limits.memory-mb must be 1..={} (got {})",
                ceilings.max_memory_mb, l.memory_mb
            ));
        }
        if l.concurrency == 0 || l.concurrency > ceilings.max_concurrency {
            p.push(format!(
                "limits.concurrency must be 1..={} (got {})",
                ceilings.max_concurrency, l.concurrency
            ));
        }
        if l.max_emits > ceilings.max_emits {
            p.push(format!(
                "limits.max-emits must be 0..={} (got {})",
                ceilings.max_emits, l.max_emits
            ));
        }
        if l.max_emit_bytes > ceilings.max_emit_bytes {
            p.push(format!(
                "limits.max-emit-bytes must be 0..={} (got {})",
                ceilings.max_emit_bytes, l.max_emit_bytes
            ));
        }
        if l.max_writes > ceilings.max_writes {
            p.push(format!(
                "limits.max-writes must be 0..={} (got {})",
                ceilings.max_writes, l.max_writes
            ));
        }
        if l.max_hops == 0 || l.max_hops > 1_000 {
            p.push(format!(
                "limits.max-hops must be 1..=1000 (got {})",
                l.max_hops
            ));
        }
        if self.retry.max_backoff_ms > ceilings.max_backoff_ms {
            p.push(format!(
                "retry.max-backoff-ms must be at most {} (got {})",
                ceilings.max_backoff_ms, self.retry.max_backoff_ms
            ));
        }
        if self.retry.max_attempts == 0 || self.retry.max_attempts > 100 {
            p.push(format!(
                "retry.max-attempts must be 1..=100 (got {})",
                self.retry.max_attempts
            ));
        }
        if self.retry.initial_backoff_ms > self.retry.max_backoff_ms {
            p.push("retry.initial-backoff-ms must not exceed retry.max-backoff-ms".into());
        }
        if self.execution.max_events_per_instance == 0 {
            p.push("execution.max-events-per-instance must be at least 1".into());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ManifestError { problems: p })
        }
    }

    /// The plugin's state namespace (never one starting with
    /// [`RESERVED_NAMESPACE_PREFIX`]).
    pub fn state_namespace(&self) -> &str {
        self.capabilities
            .state_namespace
            .as_deref()
            .unwrap_or(&self.name)
    }

    /// The plugin's cache key prefix.
    pub fn cache_prefix(&self) -> String {
        self.capabilities
            .cache_prefix
            .clone()
            .unwrap_or_else(|| format!("{}:", self.name))
    }

    /// The plugin's dead-letter topic.
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.name))
    }

    /// Whether the plugin may start workflow `name`.
    pub fn may_start_workflow(&self, name: &str) -> bool {
        self.capabilities
            .workflows
            .iter()
            .any(|w| w == "*" || w == name)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
name = "order-totals"
version = "1.2.0"
subscriptions = [{ topic = "orders" }]
[capabilities]
emit-topics = ["alerts"]
workflows = ["review-order"]
[limits]
timeout-ms = 500
"#;

    #[test]
    fn parses_with_defaults() {
        let m = Manifest::parse(GOOD, &LimitCeilings::default()).unwrap();
        assert_eq!(m.name, "order-totals");
        assert_eq!(m.limits.timeout_ms, 500);
        assert_eq!(m.limits.memory_mb, 64);
        assert_eq!(m.state_namespace(), "order-totals");
        assert_eq!(m.cache_prefix(), "order-totals:");
        assert_eq!(m.dead_letter_topic(), "order-totals.dlq");
        assert!(m.may_start_workflow("review-order"));
        assert!(!m.may_start_workflow("other"));
    }

    #[test]
    fn cache_prefixes_may_not_reach_the_runtimes_reserved_keys() {
        for prefix in ["_spate/rt/", "_spatex", "_", "_sp"] {
            let text = GOOD.replace(
                "[capabilities]",
                &format!("[capabilities]\ncache-prefix = \"{prefix}\""),
            );
            let err = Manifest::parse(&text, &LimitCeilings::default()).unwrap_err();
            assert!(err.to_string().contains("reserved"), "{prefix}: {err}");
        }
        let text = GOOD.replace(
            "[capabilities]",
            "[capabilities]\ncache-prefix = \"spate_\"",
        );
        assert!(Manifest::parse(&text, &LimitCeilings::default()).is_ok());
    }

    #[test]
    fn exactly_once_is_refused_where_the_runtime_cannot_keep_it() {
        let text = GOOD.replace("[capabilities]", "exactly-once = true\n[capabilities]");
        let m = Manifest::parse(&text, &LimitCeilings::default()).unwrap();
        assert!(m.exactly_once);
        assert!(
            !Manifest::parse(GOOD, &LimitCeilings::default())
                .unwrap()
                .exactly_once
        );
        let ceilings = LimitCeilings {
            exactly_once_unsupported: Some("it needs the embedded state store".into()),
            ..LimitCeilings::default()
        };
        let err = Manifest::parse(&text, &ceilings).unwrap_err().to_string();
        assert!(
            err.contains("exactly-once") && err.contains("embedded state store"),
            "{err}"
        );
        assert!(Manifest::parse(GOOD, &ceilings).is_ok());
    }

    #[test]
    fn unknown_field_is_an_error_naming_it() {
        let text = format!("{GOOD}\nbogus = 1\n");
        let err = Manifest::parse(&text, &LimitCeilings::default()).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn reports_every_problem() {
        let text = r#"
name = "Bad Name"
version = "1.0.0"
subscriptions = []
[limits]
timeout-ms = 0
memory-mb = 100000
"#;
        let err = Manifest::parse(text, &LimitCeilings::default()).unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
    }

    #[test]
    fn the_dead_letter_topic_is_the_plugins_own() {
        for (extra, problem) in [
            ("dead-letter-topic = \"orders\"\n", "also subscribed"),
            ("dead-letter-topic = \"alerts\"\n", "also an emit topic"),
            ("dead-letter-topic = \"workflows\"\n", "the workflow topic"),
        ] {
            let text = format!("{extra}{GOOD}");
            let err = Manifest::parse(&text, &LimitCeilings::default()).unwrap_err();
            assert!(err.to_string().contains(problem), "{extra}: {err}");
        }
        let text = GOOD.replace("\"alerts\"", "\"workflows\"");
        let err = Manifest::parse(&text, &LimitCeilings::default()).unwrap_err();
        assert!(err.to_string().contains("start-workflow"), "{err}");
    }

    #[test]
    fn a_topic_subscribed_twice_is_refused() {
        let text = GOOD.replace(
            r#"subscriptions = [{ topic = "orders" }]"#,
            r#"subscriptions = [{ topic = "orders" }, { topic = "orders", start = "latest" }]"#,
        );
        let err = Manifest::parse(&text, &LimitCeilings::default()).unwrap_err();
        assert!(
            err.to_string().contains("`orders` is subscribed twice"),
            "{err}"
        );
    }

    #[test]
    fn dot_and_dot_dot_are_not_topic_names() {
        for bad in [".", ".."] {
            assert!(!valid_topic(bad), "{bad}");
            let text = GOOD.replace("\"alerts\"", &format!("\"{bad}\""));
            let err = Manifest::parse(&text, &LimitCeilings::default()).unwrap_err();
            assert!(err.to_string().contains("not a valid topic name"), "{err}");
        }
        assert!(valid_topic(".hidden") && valid_topic("a..b"));
    }

    #[test]
    fn emitting_to_a_subscribed_topic_needs_the_opt_in() {
        let text = GOOD.replace("\"alerts\"", "\"orders\"");
        let err = Manifest::parse(&text, &LimitCeilings::default()).unwrap_err();
        assert!(err.to_string().contains("allow-self-emit"), "{err}");
        let opted = text.replace(
            "workflows = [\"review-order\"]",
            "workflows = [\"review-order\"]\nallow-self-emit = true",
        );
        let m = Manifest::parse(&opted, &LimitCeilings::default()).unwrap();
        assert!(m.capabilities.allow_self_emit);
        assert_eq!(m.limits.max_hops, 32);
    }

    #[test]
    fn limits_and_backoffs_have_ceilings() {
        let ceilings = LimitCeilings::default();
        for (line, field) in [
            ("max-emits = 10001", "limits.max-emits"),
            ("max-emit-bytes = 67108865", "limits.max-emit-bytes"),
            ("max-writes = 100001", "limits.max-writes"),
            ("max-hops = 0", "limits.max-hops"),
        ] {
            let text = GOOD.replace("timeout-ms = 500", &format!("timeout-ms = 500\n{line}"));
            let err = Manifest::parse(&text, &ceilings).unwrap_err();
            assert!(err.to_string().contains(field), "{line}: {err}");
        }
        let text = format!("{GOOD}[retry]\nmax-backoff-ms = 3600001\n");
        let err = Manifest::parse(&text, &ceilings).unwrap_err();
        assert!(err.to_string().contains("retry.max-backoff-ms"), "{err}");
    }
}

#[cfg(test)]
mod readme {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The README's annotated manifest is a valid one, every section included.
    #[test]
    fn the_readme_manifest_parses() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\nname = \"order-totals\"")
            .expect("the README's manifest block")
            + "```toml\n".len();
        let end = start + readme[start..].find("```").unwrap();
        let m = Manifest::parse(&readme[start..end], &LimitCeilings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!m.filter.is_empty());
        assert_eq!(m.on_failure, OnFailure::DeadLetter);
    }
}
