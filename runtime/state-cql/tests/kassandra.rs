//! The state conformance suite against the in-process CQL server of `kassandra-tester`,
//! started on a free loopback port for each test.
//!
//! The server runs the `basic` group only. What it cannot run, and why (each checked by a
//! test below, so this list cannot go stale silently):
//!
//! - `ttl`, `ttl_scan`, `ttl_conditions`: it does not parse `USING TTL ?` (nor `TTL(value)`);
//!   values never expire.
//! - `scan`, `ttl_scan`: it ignores range restrictions on clustering keys
//!   (`key >= ? AND key < ?`) and does not take `LIMIT ?`, so a prefix scan would return the
//!   whole partition.
//! - `conditions`, `ttl_conditions`: it has no lightweight transactions: prepared
//!   statements with `IF ...` lose their condition (it would write unconditionally), and
//!   unprepared ones are refused.
//!
//! It also answers a point lookup (`WHERE ns = ? AND key = ?`) with every row from that key
//! on; the store checks the returned key, and `keys_sharing_a_prefix_are_distinct` covers it.
//! The full suite runs against a real ScyllaDB or Cassandra in `tests/scylla.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use spate_conformance::services::CqlServer;
use spate_core::backend::{ApplyOutcome, BackendError, StateStore, StateWrite};
use spate_core::cache_guard::GuardedCache;
use spate_core::embedded::MokaCache;
use spate_core::tiered::{ReadThroughConfig, StateTier};
use spate_state_cql::{ConnectError, CqlOptions, CqlStateStore};
use std::sync::Arc;
use std::time::Duration;

fn options(server: &CqlServer) -> CqlOptions {
    CqlOptions {
        nodes: vec![server.addr().to_string()],
        allow_missing_features: true,
        ..CqlOptions::default()
    }
}

async fn kassandra() -> (Arc<dyn StateStore>, CqlServer) {
    let server = CqlServer::start();
    let store = CqlStateStore::connect(options(&server)).await.unwrap();
    (Arc::new(store), server)
}

async fn kassandra_read_through() -> (Arc<dyn StateStore>, CqlServer) {
    let (store, server) = kassandra().await;
    let cache = GuardedCache::new(
        Arc::new(MokaCache::default()),
        "kassandra-test",
        Duration::from_secs(1),
    );
    let tier = StateTier::read_through(store, Arc::new(cache), ReadThroughConfig::default());
    (tier.for_plugin("conformance"), server)
}

mod cql {
    use super::*;
    spate_conformance::state_suite! {
        fixture: kassandra(),
        groups: [basic],
    }
}

mod cql_read_through {
    use super::*;
    spate_conformance::state_suite! {
        fixture: kassandra_read_through(),
        groups: [basic],
    }
}

#[tokio::test]
async fn the_store_refuses_a_server_that_lacks_features_unless_allowed() {
    let server = CqlServer::start();
    let strict = CqlOptions {
        allow_missing_features: false,
        ..options(&server)
    };
    match CqlStateStore::connect(strict).await {
        Err(ConnectError::MissingFeatures(missing)) => {
            for feature in [
                "USING TTL",
                "TTL(value)",
                "range restrictions",
                "lightweight transactions",
            ] {
                assert!(missing.contains(feature), "{feature} not in: {missing}");
            }
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("a server without TTL, scans or LWT was accepted"),
    }
    let store = CqlStateStore::connect(options(&server)).await.unwrap();
    let f = store.features();
    assert!(!f.ttl && !f.ttl_read && !f.scan && !f.conditions, "{f:?}");
}

/// Why the `conditions` groups cannot run: kassandra drops the `IF` of a prepared statement
/// (the store detects this and refuses compare-and-swap rather than write blindly) and
/// refuses an unprepared one.
#[tokio::test]
async fn conditional_cases_cannot_run_because_kassandra_has_no_lightweight_transactions() {
    let server = CqlServer::start();
    let store = CqlStateStore::connect(options(&server)).await.unwrap();
    let session = store.session();
    let prepared = session
        .prepare("UPDATE spate.state SET value = ? WHERE ns = ? AND key = ? IF value = ?")
        .await
        .unwrap();
    assert_eq!(
        prepared.get_variable_col_specs().len(),
        3,
        "kassandra read the statement without its condition"
    );
    let unprepared = session
        .query_unpaged(
            "UPDATE spate.state SET value = 0x01 WHERE ns = 'n' AND key = 0x01 IF value = 0x02",
            (),
        )
        .await;
    assert!(unprepared.is_err(), "an LWT was accepted: {unprepared:?}");

    let cas = StateWrite {
        key: "k".into(),
        value: Some(b"v".to_vec()),
        ttl: None,
        condition: Some(None),
    };
    match store.apply("ns", &[cas]).await {
        Err(BackendError::Invalid(m)) => assert!(m.contains("lightweight transactions"), "{m}"),
        other => panic!("compare-and-swap without LWT must be refused: {other:?}"),
    }
    assert_eq!(store.get("ns", "k").await.unwrap(), None, "nothing written");
}

/// Why the `ttl` groups cannot run: kassandra refuses `USING TTL ?`; the store then keeps
/// values without their TTL.
#[tokio::test]
async fn ttl_cases_cannot_run_because_kassandra_cannot_bind_a_ttl() {
    let server = CqlServer::start();
    let store = CqlStateStore::connect(options(&server)).await.unwrap();
    let refused = store
        .session()
        .prepare("UPDATE spate.state USING TTL ? SET value = ? WHERE ns = ? AND key = ?")
        .await;
    assert!(
        refused.is_err(),
        "kassandra now parses USING TTL: run the ttl group"
    );
    let w = StateWrite {
        key: "k".into(),
        value: Some(b"v".to_vec()),
        ttl: Some(Duration::from_secs(1)),
        condition: None,
    };
    assert_eq!(
        store.apply("ns", &[w]).await.unwrap(),
        ApplyOutcome::Applied
    );
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(
        store.get("ns", "k").await.unwrap(),
        Some(b"v".to_vec()),
        "kept without expiry"
    );
}

/// Why the `scan` groups cannot run: kassandra ignores the range restriction (it reports one
/// bind marker for three), so the store refuses to scan rather than return the partition.
#[tokio::test]
async fn scan_cases_cannot_run_because_kassandra_ignores_key_ranges() {
    let server = CqlServer::start();
    let store = CqlStateStore::connect(options(&server)).await.unwrap();
    let prepared = store
        .session()
        .prepare("SELECT key, value FROM spate.state WHERE ns = ? AND key >= ? AND key < ?")
        .await
        .unwrap();
    assert_eq!(prepared.get_variable_col_specs().len(), 1);
    match store.scan("ns", "p/", 10).await {
        Err(BackendError::Invalid(m)) => assert!(m.contains("scan"), "{m}"),
        other => panic!("a scan without range support must be refused: {other:?}"),
    }
}

/// A stopped server is an outage (`Unavailable`, retried by the dispatcher), never a
/// refusal; the driver reconnects once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_and_the_store_recovers() {
    let server = CqlServer::start();
    let proxy = spate_conformance::services::FaultProxy::start(server.addr());
    let store = CqlStateStore::connect(CqlOptions {
        nodes: vec![proxy.addr().to_string()],
        request_timeout: Duration::from_secs(1),
        ..options(&server)
    })
    .await
    .unwrap();
    let put = |v: &str| StateWrite {
        key: "k".into(),
        value: Some(v.as_bytes().to_vec()),
        ttl: None,
        condition: None,
    };
    store.apply("ns", &[put("1")]).await.unwrap();
    proxy.cut();
    for _ in 0..3 {
        match store.get("ns", "k").await {
            Err(BackendError::Unavailable(_)) => {}
            other => panic!("expected Unavailable while cut off: {other:?}"),
        }
        match store.apply("ns", &[put("2")]).await {
            Err(BackendError::Unavailable(_)) => {}
            other => panic!("expected Unavailable while cut off: {other:?}"),
        }
    }
    proxy.restore();
    let started = std::time::Instant::now();
    loop {
        match store.get("ns", "k").await {
            Ok(v) => {
                assert_eq!(v, Some(b"1".to_vec()));
                break;
            }
            Err(BackendError::Unavailable(_)) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("not back after {:?}: {e}", started.elapsed()),
        }
    }
    store.apply("ns", &[put("3")]).await.unwrap();
    assert_eq!(store.get("ns", "k").await.unwrap(), Some(b"3".to_vec()));
}
