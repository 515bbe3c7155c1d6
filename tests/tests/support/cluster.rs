//! The cluster-mode harness: a runtime whose state lives in Apache Cassandra and whose
//! cache is a real `redis-server`, on free loopback ports. The Cassandra node is shared by
//! the tests of this binary (each test in a keyspace of its own) and stopped when it exits;
//! Redis is started per test (see `spate_conformance::{cassandra, services}`). The node is
//! reached through a fault proxy, so a test can cut the store off mid-run and bring it back.

use super::{TOKEN, test_config};
use serde_json::Value;
use spate::config::{CacheConfig, StateConfig};
use spate::{Backends, Config, Runtime};
use spate_conformance::cassandra::{cql_node, fresh_keyspace};
use spate_conformance::services::{FaultProxy, RedisServer};
use spate_core::{EventBus, NewEvent};
use std::sync::Arc;
use std::time::Duration;

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub rt: Arc<Runtime>,
    pub redis: RedisServer,
    /// In front of the shared Cassandra node.
    pub cql_proxy: FaultProxy,
}

/// `test_config` with state in a fresh keyspace of the CQL node behind `proxy` and the
/// cache in `redis`, with short timeouts so outages are noticed quickly.
pub fn cluster_config(
    dir: &std::path::Path,
    redis: &RedisServer,
    proxy: &FaultProxy,
    read_through: bool,
) -> Config {
    let mut c = test_config(dir);
    c.state = StateConfig::Cql(spate_state_cql::CqlOptions {
        nodes: vec![proxy.addr().to_string()],
        keyspace: fresh_keyspace(),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..spate_state_cql::CqlOptions::default()
    });
    c.cache = CacheConfig::Redis(spate_cache_redis::RedisOptions {
        urls: vec![redis.url()],
        command_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        retry_interval: Duration::from_millis(200),
        ..spate_cache_redis::RedisOptions::default()
    });
    c.read_through = spate_core::state::tiered::ReadThroughConfig {
        enabled: read_through,
        ..spate_core::state::tiered::ReadThroughConfig::default()
    };
    assert_eq!(c.api.token.as_deref(), Some(TOKEN));
    c
}

impl Cluster {
    pub async fn start(read_through: bool) -> Self {
        Self::start_with(read_through, |_| {}).await
    }

    /// [`Cluster::start`] with `tweak` applied to the configuration first.
    pub async fn start_with(read_through: bool, tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisServer::start();
        let node = cql_node()
            .parse()
            .expect("SPATE_TEST_CQL must be host:port");
        let cql_proxy = FaultProxy::start(node);
        let mut config = cluster_config(dir.path(), &redis, &cql_proxy, read_through);
        tweak(&mut config);
        config.validate().unwrap();
        // DDL on a loaded single Cassandra node can take seconds; the runtime's 2 s request
        // timeout is for noticing outages, not for schema changes. (The runtime's own
        // `CREATE ... IF NOT EXISTS` is then a no-op.)
        if let StateConfig::Cql(o) = &config.state {
            spate_state_cql::CqlStateStore::connect(spate_state_cql::CqlOptions {
                request_timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(10),
                ..o.clone()
            })
            .await
            .unwrap();
        }
        let backends = Backends::from_config(&config).await.unwrap();
        let rt = Runtime::start(config, backends).await.unwrap();
        Self {
            dir,
            rt,
            redis,
            cql_proxy,
        }
    }

    pub fn bus(&self) -> &Arc<dyn EventBus> {
        &self.rt.backends.bus
    }

    pub async fn deploy(&self, manifest: &str, wasm: Vec<u8>) {
        self.rt
            .registry
            .upload(manifest, wasm, true)
            .await
            .unwrap_or_else(|e| panic!("upload failed: {e}"));
    }
}

/// Append `(key, payload)` events to `topic` in batches of 500.
pub async fn send_many(bus: &Arc<dyn EventBus>, topic: &str, events: Vec<(String, Value)>) {
    for chunk in events.chunks(500) {
        let batch = chunk
            .iter()
            .map(|(k, p)| NewEvent {
                key: Some(k.as_bytes().to_vec()),
                payload: serde_json::to_vec(p).unwrap(),
                headers: vec![],
            })
            .collect();
        bus.append(topic, batch).await.unwrap();
    }
}

/// Committed positions of `group` on `topic`, one per partition (0 when none).
pub async fn committed(rt: &Runtime, group: &str, topic: &str) -> Vec<u64> {
    rt.backends
        .source
        .committed(group, topic)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.unwrap_or(0))
        .collect()
}

/// The value of metric line `name{labels}` in a Prometheus rendering, if present.
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}
