//! The cache conformance suite against a real `redis-server` started on a free loopback
//! port for each test (Debian's package; a missing binary fails with how to install it),
//! plus the Redis-specific behaviour: outages are `Unavailable`, the connection comes back
//! by itself, and the state tier runs read-through over Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use spate_cache_redis::{RedisCache, RedisOptions};
use spate_conformance::services::{RedisCluster, RedisServer};
use spate_core::cache::GuardedCache;
use spate_core::state::EmbeddedStateStore;
use spate_core::state::tiered::{ReadThroughConfig, StateTier};
use spate_core::{BackendError, Cache, StateStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A cache with the default (production) timeouts: for the outage tests.
fn cache_on(server: &RedisServer) -> RedisCache {
    RedisCache::new(RedisOptions {
        urls: vec![server.url()],
        ..RedisOptions::default()
    })
    .unwrap()
}

/// Timeouts for the conformance suites, which test no outage: with the default 500 ms, one
/// command stalled on a loaded machine (the first connect, a 1 MiB value, 800 concurrent
/// increments) is an error that fails the case, or through the guard a miss and a second
/// of skipped calls.
const PATIENT: Duration = Duration::from_secs(10);

/// A cache for the conformance suites: see [`PATIENT`].
fn patient_cache_on(server: &RedisServer) -> RedisCache {
    RedisCache::new(RedisOptions {
        urls: vec![server.url()],
        command_timeout: PATIENT,
        connect_timeout: PATIENT,
        ..RedisOptions::default()
    })
    .unwrap()
}

async fn redis() -> (Arc<dyn Cache>, RedisServer) {
    let server = RedisServer::start();
    (Arc::new(patient_cache_on(&server)), server)
}

async fn guarded_redis() -> (Arc<dyn Cache>, RedisServer) {
    let server = RedisServer::start();
    let guard = GuardedCache::new(
        Arc::new(patient_cache_on(&server)),
        "redis-test",
        Duration::from_secs(1),
    );
    (Arc::new(guard), server)
}

async fn read_through() -> (Arc<dyn StateStore>, (RedisServer, tempfile::TempDir)) {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tier = StateTier::read_through(
        EmbeddedStateStore::open(dir.path()).unwrap(),
        Arc::new(patient_cache_on(&server)),
        ReadThroughConfig::default(),
    );
    (tier.for_plugin("conformance"), (server, dir))
}

async fn redis_cluster() -> (Arc<dyn Cache>, RedisCluster) {
    let cluster = RedisCluster::start();
    let cache = RedisCache::new(RedisOptions {
        urls: cluster.urls(),
        cluster: true,
        command_timeout: PATIENT,
        connect_timeout: PATIENT,
        ..RedisOptions::default()
    })
    .unwrap();
    (Arc::new(cache), cluster)
}

/// Redis Cluster: three masters; a test's keys spread over their slots.
mod redis_cluster_cache {
    use super::*;
    spate_conformance::cache_suite! {
        fixture: redis_cluster(),
        groups: [basic, ttl],
    }
}

mod redis_cache {
    use super::*;
    spate_conformance::cache_suite! {
        fixture: redis(),
        groups: [basic, ttl],
    }
}

mod guarded_redis_cache {
    use super::*;
    spate_conformance::cache_suite! {
        fixture: guarded_redis(),
        groups: [basic, ttl],
    }
}

/// The state contract holds through the read-through tier with Redis as its cache.
mod read_through_over_redis {
    use super::*;
    spate_conformance::state_suite! {
        fixture: read_through(),
        groups: [basic, ttl, scan, ttl_scan, conditions, ttl_conditions],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_unavailable_within_the_timeout_and_the_cache_reconnects() {
    let mut server = RedisServer::start();
    let cache = cache_on(&server);
    cache
        .set("k", b"v".to_vec(), Duration::from_secs(60))
        .await
        .unwrap();
    server.stop();
    for _ in 0..3 {
        let started = Instant::now();
        match cache.get("k").await {
            Err(BackendError::Unavailable(_)) => {}
            other => panic!("expected Unavailable with Redis down: {other:?}"),
        }
        // The 500 ms timeout bounds it, not a TCP timeout of minutes; 5 s leaves room for
        // a stalled scheduler on a loaded machine.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
    server.restart();
    let started = Instant::now();
    loop {
        match cache
            .set("k", b"again".to_vec(), Duration::from_secs(60))
            .await
        {
            Ok(()) => break,
            Err(BackendError::Unavailable(_)) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no reconnect after {:?}: {e}", started.elapsed()),
        }
    }
    assert_eq!(cache.get("k").await.unwrap(), Some(b"again".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_starts_while_redis_is_down_and_joins_when_it_is_up() {
    let mut server = RedisServer::start();
    server.stop();
    let cache = cache_on(&server);
    assert!(matches!(
        cache.get("k").await,
        Err(BackendError::Unavailable(_))
    ));
    server.restart();
    let started = Instant::now();
    while cache.incr("n", 1).await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "never joined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cache.get("n").await.unwrap(), Some(b"1".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_invalid_not_an_outage() {
    let (cache, server) = redis().await;
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("LPUSH")
        .arg("list")
        .arg("x")
        .query_async::<i64>(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        cache.get("list").await,
        Err(BackendError::Invalid(_))
    ));
    assert!(matches!(
        cache.incr("list", 1).await,
        Err(BackendError::Invalid(_))
    ));
}
