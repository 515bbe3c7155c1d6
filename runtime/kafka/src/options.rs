//! Connection and behaviour settings, and the librdkafka configurations built from them.

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// librdkafka properties Spate sets itself: its delivery guarantees depend on them, so a
/// pass-through value for one of these is refused rather than silently applied.
const MANAGED: &[&str] = &[
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "max.in.flight.requests.per.connection",
    "auto.offset.reset",
    "enable.partition.eof",
    "allow.auto.create.topics",
];

/// How Spate reaches a Kafka cluster and uses it: the `[events]` section with
/// `type = "kafka"` of the runtime's configuration (every key optional, defaults in
/// [`KafkaOptions::default`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct KafkaOptions {
    /// `bootstrap.servers`: comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// This deployment's name: each plugin consumes as group `<group>.<plugin>`.
    pub group: String,
    /// Static membership: a stable name of this runtime instance (e.g. the pod name).
    /// Each consumer's `group.instance.id` is `<instance-id>.<topic>`; a restart within
    /// the session timeout then gets its partitions back without a rebalance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Create missing topics (with `partitions` and `replication_factor`) instead of
    /// refusing them.
    pub create_topics: bool,
    /// Partitions of topics Spate creates.
    pub partitions: i32,
    /// Replication factor of topics Spate creates.
    pub replication_factor: i32,
    /// Consumer session timeout: how long a silent consumer keeps its partitions.
    #[serde(rename = "session-timeout-ms", with = "spate_core::millis")]
    pub session_timeout: Duration,
    /// How long a revocation waits for the dispatcher to finish and commit the revoked
    /// partitions' in-flight events before letting them go anyway.
    #[serde(rename = "revoke-timeout-ms", with = "spate_core::millis")]
    pub revoke_timeout: Duration,
    /// How long a produced event may wait for the broker's acknowledgement before the
    /// emit fails (and the dispatcher retries the event).
    #[serde(rename = "produce-timeout-ms", with = "spate_core::millis")]
    pub produce_timeout: Duration,
    /// Timeout of metadata, watermark and commit requests.
    #[serde(rename = "request-timeout-ms", with = "spate_core::millis")]
    pub request_timeout: Duration,
    /// Extra librdkafka properties for every client (security.protocol, sasl.*, ssl.*,
    /// linger.ms, ...). Properties Spate manages are refused.
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaOptions {
    /// A broker on this machine's default port.
    fn default() -> Self {
        Self::new("127.0.0.1:9092")
    }
}

impl KafkaOptions {
    /// Defaults for a cluster at `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            group: "spate".into(),
            instance_id: None,
            create_topics: false,
            partitions: 4,
            replication_factor: 1,
            session_timeout: Duration::from_secs(10),
            revoke_timeout: Duration::from_secs(10),
            produce_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            librdkafka: BTreeMap::new(),
        }
    }

    /// Every problem with these options, at once.
    pub fn validate(&self) -> Result<(), OptionsError> {
        let mut problems = Vec::new();
        if self.bootstrap_servers.trim().is_empty() {
            problems.push("bootstrap-servers is empty".to_string());
        }
        if self.group.trim().is_empty() {
            problems.push("group is empty".to_string());
        }
        if self
            .instance_id
            .as_deref()
            .is_some_and(|i| i.trim().is_empty())
        {
            problems.push("instance-id is set but empty".to_string());
        }
        if self.partitions < 1 {
            problems.push("partitions must be at least 1".to_string());
        }
        if self.replication_factor < 1 {
            problems.push("replication-factor must be at least 1".to_string());
        }
        if self.produce_timeout.is_zero() {
            problems.push("produce-timeout-ms must be at least 1".to_string());
        }
        for key in self.librdkafka.keys() {
            if MANAGED.contains(&key.as_str()) {
                problems.push(format!(
                    "librdkafka.`{key}` is managed by Spate (its delivery guarantees depend on it) and cannot be overridden"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(OptionsError(problems))
        }
    }

    /// Properties shared by every client: servers, then the pass-through properties.
    fn base(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        let client_id = match &self.instance_id {
            Some(i) => format!("spate-{role}-{i}"),
            None => format!("spate-{role}"),
        };
        c.set("client.id", client_id);
        c.set(
            "socket.connection.setup.timeout.ms",
            self.request_timeout.as_millis().to_string(),
        );
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        c
    }

    /// The idempotent producer for emits and dead letters.
    pub(crate) fn producer(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        // Produce latency over batching: a handful of milliseconds matters to users
        // (pass-through `linger.ms` overrides it).
        c.set("linger.ms", "1");
        c.extend(
            self.base("producer")
                .config_map()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                self.produce_timeout.as_millis().to_string(),
            )
            // Keyed emits land where a Java producer would put them.
            .set("partitioner", "murmur2_random");
        c
    }

    /// A group consumer of `topic` for `group`.
    pub(crate) fn consumer(&self, group: &str, topic: &str, earliest: bool) -> ClientConfig {
        let mut c = self.base("consumer");
        c.set("group.id", group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false")
            .set(
                "auto.offset.reset",
                if earliest { "earliest" } else { "latest" },
            )
            .set(
                "session.timeout.ms",
                self.session_timeout.as_millis().to_string(),
            );
        if let Some(instance) = &self.instance_id {
            c.set("group.instance.id", format!("{instance}.{topic}"));
        }
        c
    }

    /// A consumer without subscriptions: metadata, watermarks, reads, committed offsets.
    pub(crate) fn reader(&self, group: Option<&str>) -> ClientConfig {
        let mut c = self.base("reader");
        c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false");
        // librdkafka wants a group id for committed-offset lookups; reads never join it.
        c.set("group.id", group.unwrap_or("spate.reader"));
        c
    }

    /// An admin client (topic creation).
    pub(crate) fn admin(&self) -> ClientConfig {
        self.base("admin")
    }
}

/// Problems found in [`KafkaOptions`].
#[derive(Debug, thiserror::Error)]
#[error("invalid Kafka settings: {}", .0.join("; "))]
pub struct OptionsError(pub Vec<String>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_and_managed_properties_are_refused() {
        let mut o = KafkaOptions::new("");
        o.partitions = 0;
        o.librdkafka
            .insert("enable.auto.commit".into(), "true".into());
        o.librdkafka
            .insert("security.protocol".into(), "SASL_SSL".into());
        let err = o.validate().err().map(|e| e.0).unwrap_or_default();
        assert_eq!(err.len(), 3, "{err:?}");
        assert!(err.iter().any(|p| p.contains("enable.auto.commit")));
    }

    #[test]
    fn consumers_use_cooperative_sticky_explicit_commits_and_static_ids() {
        let mut o = KafkaOptions::new("127.0.0.1:9092");
        o.instance_id = Some("spate-2".into());
        let c = o.consumer("spate.order-totals", "orders", true);
        assert_eq!(
            c.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.instance.id"), Some("spate-2.orders"));
        let p = o.producer();
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
    }
}
