//! The state store cut off in the middle of a run (its connections dropped and new ones
//! refused by a proxy on loopback): the affected events are retried with backoff, never
//! dead-lettered, their offsets are not committed, and once the store is reachable again
//! processing resumes by itself with nothing lost. Its own test binary, so the process-wide
//! metrics are this test's alone.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, committed, metric, send_many};
use support::*;

const WAIT: Duration = Duration::from_secs(60);
const GROUP: &str = "spate.order-totals";

fn orders(range: std::ops::Range<usize>) -> Vec<(String, serde_json::Value)> {
    range
        .map(|i| {
            let customer = format!("c-{}", i % 5);
            let order = json!({
                "order_id": format!("o-{i}"),
                "customer_id": customer,
                "amount_cents": 1000 + i,
                "currency": "EUR",
            });
            (customer, order)
        })
        .collect()
}

async fn wait_committed(c: &Cluster, want: &[u64]) {
    let started = Instant::now();
    loop {
        let now = committed(&c.rt, GROUP, "orders").await;
        if now == want {
            return;
        }
        assert!(started.elapsed() < WAIT, "committed {now:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_holds_offsets_and_nothing_is_lost() {
    let metrics = spate::telemetry::metrics();
    let infra_errors = || {
        metric(
            &metrics.render(),
            "spate_infrastructure_errors_total",
            "plugin=\"order-totals\"",
        )
        .unwrap_or(0.0)
    };
    let c = Cluster::start(true).await;
    let manifest = std::fs::read_to_string(plugins_dir().join("order-totals/spate.toml")).unwrap();
    c.deploy(&manifest, order_totals_wasm()).await;

    send_many(c.bus(), "orders", orders(0..50)).await;
    wait_events(c.bus(), "customer-totals", 50, WAIT).await;
    let ends = c.bus().end_offsets("orders").await.unwrap();
    wait_committed(&c, &ends).await;

    // Store unreachable: events are read and retried, but none completes or commits.
    c.cql_proxy.cut();
    send_many(c.bus(), "orders", orders(50..100)).await;
    let started = Instant::now();
    while infra_errors() < 10.0 {
        assert!(started.elapsed() < WAIT, "no retries seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        committed(&c.rt, GROUP, "orders").await,
        ends,
        "offsets must be held while the store is down"
    );
    assert_eq!(read_all(c.bus(), "customer-totals").await.len(), 50);
    assert!(read_all(c.bus(), "order-totals.dlq").await.is_empty());

    // Back: everything is handled once, by itself, and committed.
    c.cql_proxy.restore();
    let out = wait_events(c.bus(), "customer-totals", 100, WAIT).await;
    let ends = c.bus().end_offsets("orders").await.unwrap();
    wait_committed(&c, &ends).await;
    assert_eq!(out.len(), 100, "each order counted once");
    assert!(read_all(c.bus(), "order-totals.dlq").await.is_empty());
    for customer in 0..5 {
        let v =
            c.rt.backends
                .tier
                .store()
                .get("order-totals", &format!("totals/c-{customer}"))
                .await
                .unwrap()
                .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
        let total: usize = (0..100)
            .filter(|i| i % 5 == customer)
            .map(|i| 1000 + i)
            .sum();
        assert_eq!(v["order_count"], 20, "c-{customer}");
        assert_eq!(v["total_cents"], total, "c-{customer}");
    }
    c.rt.shutdown().await;
}
