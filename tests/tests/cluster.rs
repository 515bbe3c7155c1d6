//! Cluster mode end to end: the runtime with its state in Apache Cassandra (one node shared
//! by this binary's tests, a keyspace each) and its cache in a real `redis-server`, on free
//! loopback ports, running the plugins built from `plugins/`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use serde_json::json;
use spate::config::CacheConfig;
use spate_conformance::zipf_keys;
use spate_core::types::headers;
use std::time::Duration;
use support::cluster::{Cluster, send_many};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_plugin_runs_on_redis_and_the_cql_store() {
    let c = Cluster::start(true).await;
    let manifest = std::fs::read_to_string(plugins_dir().join("order-totals/spate.toml")).unwrap();
    c.deploy(&manifest, order_totals_wasm()).await;
    send(
        c.bus(),
        "customers",
        "c-1",
        json!({"customer_id": "c-1", "tier": "gold"}),
    )
    .await;
    // The profile upsert is on another topic: let it land before the orders read it.
    let tier_key = "profile/c-1";
    let started = std::time::Instant::now();
    while c
        .rt
        .backends
        .tier
        .store()
        .get("order-totals", tier_key)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            started.elapsed() < WAIT,
            "the profile never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (order, amount) in [("o-1", 2000), ("o-2", 250_000)] {
        send(
            c.bus(),
            "orders",
            "c-1",
            json!({"order_id": order, "customer_id": "c-1", "amount_cents": amount, "currency": "EUR"}),
        )
        .await;
    }
    send(c.bus(), "orders", "c-2", json!({"order_id": "o-3"})).await;

    let wf = wait_events(c.bus(), "workflows", 1, WAIT).await;
    assert_eq!(header(&wf[0], headers::WORKFLOW), Some("review-order"));
    assert_eq!(header(&wf[0], headers::WORKFLOW_ID), Some("o-2"));
    assert_eq!(json(&wf[0])["tier"], "gold", "the profile was read");
    let dlq = wait_events(c.bus(), "order-totals.dlq", 1, WAIT).await;
    assert_eq!(header(&dlq[0], headers::DLQ_KIND), Some("rejected"));
    let totals = wait_events(c.bus(), "customer-totals", 2, WAIT).await;
    let last = json(totals.last().unwrap());
    assert_eq!(last["total_cents"], 252_000, "{last}");
    assert_eq!(last["order_count"], 2, "{last}");

    // The state is in the CQL server (emits are appended before the state write, so the
    // last write may land just after its emit)...
    let started = std::time::Instant::now();
    loop {
        let stored =
            c.rt.backends
                .tier
                .store()
                .get("order-totals", "totals/c-1")
                .await
                .unwrap()
                .expect("totals in the CQL store");
        let stored: serde_json::Value = serde_json::from_slice(&stored).unwrap();
        if stored["total_cents"] == 252_000 {
            break;
        }
        assert!(started.elapsed() < WAIT, "stored totals: {stored}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and the plugin's own cache entry, under its prefix, in Redis.
    let redis = redis::Client::open(c.redis.url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    // Cache writes land at the checkpoint, after the state write the loop above saw.
    let started = std::time::Instant::now();
    let cached = loop {
        let cached: Option<Vec<u8>> = redis::cmd("GET")
            .arg("order-totals:profile/c-1")
            .query_async(&mut conn)
            .await
            .unwrap();
        if let Some(cached) = cached {
            break cached;
        }
        assert!(started.elapsed() < WAIT, "profile never cached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cached: serde_json::Value = serde_json::from_slice(&cached).unwrap();
    assert_eq!(cached["tier"], "gold");
    // State reads went through the read-through tier, counted for the plugin.
    let stats = c.rt.backends.tier.stats("order-totals");
    assert!(stats.gets >= 5, "{stats:?}");
    assert_eq!(
        stats.gets,
        stats.cache_hits + stats.cache_misses,
        "{stats:?}"
    );
    assert!(!c.rt.backends.cache_health.is_degraded());
    c.rt.shutdown().await;
}

/// A Zipf-like workload through the runtime: mostly reads of hot keys, some writes. With
/// the read-through tier at most 20% of the plugin's reads reach the CQL store; without it
/// every read the checkpoint's view cannot answer does. Both runs see the same values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_through_tier_cuts_store_reads_on_a_skewed_workload() {
    const EVENTS: usize = 2_000;
    let keys = zipf_keys(300, 1.0, EVENTS, 7);
    let events: Vec<(String, serde_json::Value)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let key = format!("k{k}");
            let op = if i % 10 == 0 {
                json!({"op": "put", "key": key, "value": i.to_string(), "seq": i})
            } else {
                json!({"op": "get", "key": key, "seq": i})
            };
            (key, op)
        })
        .collect();
    let manifest = chaos_manifest("chaos", "1.0.0", "in", "[limits]\nconcurrency = 64\n");

    let mut outcomes = Vec::new();
    for read_through in [false, true] {
        // Outage detection is not under test here: a 300 ms Redis timeout on a loaded CI
        // box sends every read of the next 200 ms to the store and breaks the ratio.
        let c = Cluster::start_with(read_through, |config| {
            if let CacheConfig::Redis(r) = &mut config.cache {
                r.command_timeout = Duration::from_secs(3);
                r.connect_timeout = Duration::from_secs(3);
            }
        })
        .await;
        c.deploy(&manifest, chaos_wasm()).await;
        send_many(c.bus(), "in", events.clone()).await;
        let out = wait_events(c.bus(), "out", EVENTS, WAIT).await;
        assert!(read_all(c.bus(), "chaos.dlq").await.is_empty());
        let mut seen: Vec<(u64, String)> = out
            .iter()
            .map(|e| {
                let p = json(e);
                (p["seq"].as_u64().unwrap(), p["value"].to_string())
            })
            .collect();
        seen.sort();
        let stats = c.rt.backends.tier.stats("chaos");
        let outages = c.rt.backends.cache_health.outages();
        eprintln!("read-through {read_through}: {outages} cache outages");
        c.rt.shutdown().await;
        outcomes.push((stats, seen, outages));
    }
    let (plain, plain_seen, _) = &outcomes[0];
    let (tiered, tiered_seen, tiered_outages) = &outcomes[1];
    eprintln!("store reads without the tier: {plain:?}\nstore reads with the tier: {tiered:?}");
    let gets = (EVENTS - EVENTS / 10) as u64;
    // Without the tier the store takes checkpoints: reads of keys written since the last
    // one are answered by the checkpoint's view, the rest reach the store.
    assert!(plain.gets <= gets, "{plain:?}");
    assert_eq!(plain.store_reads, plain.gets, "{plain:?}");
    // The read-through tier copies every write into the cache, so it takes no
    // checkpoints: every read goes through it.
    assert_eq!(tiered.gets, gets, "{tiered:?}");
    assert!(
        tiered.store_reads * 5 <= gets,
        "store reads with the tier {} of {gets} reads ({tiered_outages} cache outages): {tiered:?}",
        tiered.store_reads,
    );
    assert!(
        tiered.cache_hits * 10 >= gets * 8,
        "{tiered_outages} cache outages: {tiered:?}"
    );
    assert_eq!(
        plain_seen, tiered_seen,
        "the tier changed what handlers read"
    );
}

/// The effect record in Cassandra: written in the checkpoint's batch (no read-through tier,
/// so the store takes the checkpoints) and replayed with a diff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_effect_record_is_kept_in_the_cql_store_and_replays() {
    let c = Cluster::start(false).await;
    assert!(c.rt.backends.tier.for_plugin("rec").checkpoints());
    let _app = support::replay::record_and_replay(&c.rt).await;
}

/// The same with the read-through tier, which takes no checkpoints: the records go to
/// Cassandra beside each event's own writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_effect_record_is_kept_beside_a_read_through_tier_and_replays() {
    let c = Cluster::start(true).await;
    assert!(!c.rt.backends.tier.for_plugin("rec").checkpoints());
    let _app = support::replay::record_and_replay(&c.rt).await;
}
