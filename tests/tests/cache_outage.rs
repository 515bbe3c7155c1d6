//! Redis stopped in the middle of a run: every event is still handled (the plugin's cache
//! reads are misses, the read-through tier reads the store), nothing is dead-lettered,
//! the degraded state shows in `spate_cache_degraded`, and once Redis is back the cache
//! is used again. Its own test binary, so the process-wide metrics are this test's alone.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, metric, send_many};
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const CUSTOMERS: usize = 10;

fn orders(range: std::ops::Range<usize>) -> Vec<(String, serde_json::Value)> {
    range
        .map(|i| {
            let customer = format!("c-{}", i % CUSTOMERS);
            let order = json!({
                "order_id": format!("o-{i}"),
                "customer_id": customer,
                "amount_cents": 100 + i,
                "currency": "EUR",
            });
            (customer, order)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_fails_no_event_then_the_cache_recovers() {
    let metrics = spate::telemetry::metrics();
    let degraded = || metric(&metrics.render(), "spate_cache_degraded", "cache=\"redis\"");
    let mut c = Cluster::start(true).await;
    let manifest = std::fs::read_to_string(plugins_dir().join("order-totals/spate.toml")).unwrap();
    c.deploy(&manifest, order_totals_wasm()).await;
    let profiles = (0..CUSTOMERS)
        .map(|i| {
            let id = format!("c-{i}");
            let p = json!({"customer_id": id, "tier": "gold"});
            (id, p)
        })
        .collect();
    send_many(c.bus(), "customers", profiles).await;

    // Healthy.
    send_many(c.bus(), "orders", orders(0..100)).await;
    wait_events(c.bus(), "customer-totals", 100, WAIT).await;
    assert!(!c.rt.backends.cache_health.is_degraded());
    assert_eq!(degraded(), Some(0.0));
    let healthy = c.rt.backends.tier.stats("order-totals");
    assert!(healthy.cache_hits > 0, "{healthy:?}");

    // Redis gone: every order is still handled, none dead-lettered.
    c.redis.stop();
    send_many(c.bus(), "orders", orders(100..200)).await;
    wait_events(c.bus(), "customer-totals", 200, WAIT).await;
    assert!(c.rt.backends.cache_health.is_degraded());
    assert_eq!(degraded(), Some(1.0), "the metric shows the outage");
    assert!(c.rt.backends.cache_health.outages() >= 1);
    let outage = c.rt.backends.tier.stats("order-totals");
    assert!(
        outage.store_reads > healthy.store_reads,
        "reads went to the store: {outage:?}"
    );

    // Back (empty, as after a crash): the cache reconnects and is used again.
    c.redis.restart();
    let mut next = 200;
    let started = Instant::now();
    while c.rt.backends.cache_health.is_degraded() {
        assert!(started.elapsed() < WAIT, "the cache never recovered");
        send_many(c.bus(), "orders", orders(next..next + 10)).await;
        next += 10;
        wait_events(c.bus(), "customer-totals", next, WAIT).await;
    }
    assert_eq!(degraded(), Some(0.0));
    let recovered = c.rt.backends.tier.stats("order-totals");
    send_many(c.bus(), "orders", orders(next..next + 100)).await;
    next += 100;
    wait_events(c.bus(), "customer-totals", next, WAIT).await;
    let after = c.rt.backends.tier.stats("order-totals");
    assert!(
        after.cache_hits >= recovered.cache_hits + 90,
        "hits resumed: {recovered:?} -> {after:?}"
    );
    assert_eq!(
        c.rt.backends.tier.suspect_keys(),
        0,
        "stale copies repaired"
    );

    // Nothing failed and nothing was lost or counted twice.
    assert!(read_all(c.bus(), "order-totals.dlq").await.is_empty());
    let updates = read_all(c.bus(), "customer-totals").await;
    assert_eq!(updates.len(), next);
    let mut expected: HashMap<String, (u64, u64)> = HashMap::new();
    for (customer, order) in orders(0..next) {
        let e = expected.entry(customer).or_default();
        e.0 += 1;
        e.1 += order["amount_cents"].as_u64().unwrap();
    }
    for (customer, (count, total)) in expected {
        let v =
            c.rt.backends
                .tier
                .store()
                .get("order-totals", &format!("totals/{customer}"))
                .await
                .unwrap()
                .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(v["order_count"], count, "{customer}");
        assert_eq!(v["total_cents"], total, "{customer}");
    }
    c.rt.shutdown().await;
}
