//! The whole state conformance suite — TTLs, scans, compare-and-swap (lightweight
//! transactions), and the read-through tier over the store — against a real Apache
//! Cassandra node that the harness starts on free loopback ports and every test of this
//! binary shares, each test in a keyspace of its own (`spate_conformance::cassandra`).
//!
//! `SPATE_TEST_CQL=host:port` runs it against an external ScyllaDB or Cassandra instead:
//!
//! ```sh
//! docker compose -f deploy/compose/compose.yaml up -d scylla
//! SPATE_TEST_CQL=127.0.0.1:9042 cargo test -p spate-state-cql --test cassandra
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use spate_conformance::cassandra::{cql_node, fresh_keyspace};
use spate_conformance::services::FaultProxy;
use spate_core::cache::GuardedCache;
use spate_core::cache::MokaCache;
use spate_core::state::tiered::{ReadThroughConfig, StateTier};
use spate_core::{ApplyOutcome, BackendError, StateStore, StateWrite};
use spate_state_cql::{ConnectError, CqlOptions, CqlStateStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options for a store in a keyspace of its own on the test node. The client waits longer
/// than the node itself does (10 s, `spate_conformance::cassandra`): every case creates a
/// keyspace and a table (schema changes, two tests at a time on one node) and writes 1 MiB
/// values on a loaded machine, and any error fails the case. The default 5 s is for
/// noticing outages, which no suite case is about.
fn options() -> CqlOptions {
    CqlOptions {
        nodes: vec![cql_node()],
        keyspace: fresh_keyspace(),
        request_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(30),
        ..CqlOptions::default()
    }
}

async fn cassandra() -> (Arc<dyn StateStore>, ()) {
    let store = CqlStateStore::connect(options())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (Arc::new(store), ())
}

async fn cassandra_read_through() -> (Arc<dyn StateStore>, ()) {
    let (store, ()) = cassandra().await;
    let cache = GuardedCache::new(
        Arc::new(MokaCache::default()),
        "cassandra-test",
        Duration::from_secs(1),
    );
    let tier = StateTier::read_through(store, Arc::new(cache), ReadThroughConfig::default());
    (tier.for_plugin("conformance"), ())
}

mod cql {
    use super::*;
    spate_conformance::state_suite! {
        fixture: cassandra(),
        groups: [basic, ttl, scan, ttl_scan, conditions, ttl_conditions, checkpoints],
    }
}

mod cql_read_through {
    use super::*;
    spate_conformance::state_suite! {
        fixture: cassandra_read_through(),
        groups: [basic, ttl, scan, ttl_scan, conditions, ttl_conditions],
    }
}

fn put(key: &str, value: &str) -> StateWrite {
    StateWrite {
        key: key.into(),
        value: Some(value.as_bytes().to_vec()),
        ttl: None,
        condition: None,
    }
}

/// A node cut off is an outage (`Unavailable`, retried by the dispatcher), never a
/// refusal; the driver reconnects once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_node_is_unavailable_and_the_store_recovers() {
    let node: std::net::SocketAddr = cql_node().parse().unwrap();
    let proxy = FaultProxy::start(node);
    // Cut off, requests fail at once (the proxy drops and refuses connections), so this
    // timeout is not what makes them `Unavailable`; it bounds the schema DDL at connect and
    // the writes before the cut and after the restore, which a loaded node can take over 1 s.
    let store = CqlStateStore::connect(CqlOptions {
        nodes: vec![proxy.addr().to_string()],
        request_timeout: Duration::from_secs(10),
        ..options()
    })
    .await
    .unwrap();
    store.apply("ns", &[put("k", "1")]).await.unwrap();
    proxy.cut();
    for _ in 0..3 {
        match store.get("ns", "k").await {
            Err(BackendError::Unavailable(_)) => {}
            other => panic!("expected Unavailable while cut off: {other:?}"),
        }
        match store.apply("ns", &[put("k", "2")]).await {
            Err(BackendError::Unavailable(_)) => {}
            other => panic!("expected Unavailable while cut off: {other:?}"),
        }
    }
    proxy.restore();
    let started = Instant::now();
    loop {
        match store.get("ns", "k").await {
            Ok(v) => {
                assert_eq!(
                    v,
                    Some(b"1".to_vec()),
                    "the cut-off write must not have landed"
                );
                break;
            }
            Err(BackendError::Unavailable(_)) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("not back after {:?}: {e}", started.elapsed()),
        }
    }
    store.apply("ns", &[put("k", "3")]).await.unwrap();
    assert_eq!(store.get("ns", "k").await.unwrap(), Some(b"3".to_vec()));
}

/// Two stores (two runtimes) on one keyspace: a compare-and-swap decided by one is seen by
/// the other's condition — Paxos on the server, not a check in one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_is_decided_by_the_server_across_clients() {
    let options = options();
    let a = CqlStateStore::connect(options.clone()).await.unwrap();
    let b = CqlStateStore::connect(options).await.unwrap();
    let create = |value: &str| StateWrite {
        condition: Some(None),
        ..put("k", value)
    };
    assert_eq!(
        a.apply("ns", &[create("a")]).await.unwrap(),
        ApplyOutcome::Applied
    );
    match b.apply("ns", &[create("b")]).await.unwrap() {
        ApplyOutcome::Conflict { key } => assert_eq!(key, "k"),
        other => panic!("the second create must conflict: {other:?}"),
    }
    assert_eq!(b.get("ns", "k").await.unwrap(), Some(b"a".to_vec()));
}

/// Nothing listening is a connection error naming the node, not a hang.
#[tokio::test]
async fn no_node_is_a_connection_error() {
    let port = spate_conformance::services::free_port();
    let started = Instant::now();
    match CqlStateStore::connect(CqlOptions {
        nodes: vec![format!("127.0.0.1:{port}")],
        connect_timeout: Duration::from_secs(1),
        ..CqlOptions::default()
    })
    .await
    {
        Err(ConnectError::Connect { nodes, .. }) => {
            assert_eq!(nodes, vec![format!("127.0.0.1:{port}")]);
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
}
