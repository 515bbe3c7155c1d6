//! End-to-end behaviour of the dispatcher and sandbox on embedded defaults, with real
//! plugins built from `plugins/`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use serde_json::json;
use spate_core::types::headers;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_emits_with_idempotency_id_and_provenance() {
    let h = Harness::start().await;
    let up = h
        .deploy(&chaos_manifest("chaos", "1.0.0", "in", ""), chaos_wasm())
        .await;
    h.send("in", "k1", json!({"op": "emit", "n": 7, "seq": 1}))
        .await;
    let out = h.wait_events("out", 1, WAIT).await;
    assert_eq!(out.len(), 1);
    let e = &out[0];
    assert_eq!(json(e)["n"], 7);
    assert_eq!(e.key.as_deref(), Some(&b"k1"[..]));
    let id = header(e, headers::IDEMPOTENCY_ID).unwrap();
    assert!(id.starts_with("chaos/in/"), "{id}");
    assert!(id.ends_with("/0/0") || id.ends_with("/0"), "{id}");
    assert_eq!(header(e, headers::PLUGIN), Some("chaos"));
    assert_eq!(header(e, headers::PLUGIN_VERSION), Some("1.0.0"));
    assert_eq!(header(e, headers::PLUGIN_HASH), Some(up.hash.as_str()));
    assert!(header(e, headers::SOURCE).unwrap().starts_with("in/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_are_emitted_to_the_workflow_topic_once_per_id() {
    let h = Harness::start().await;
    h.deploy(&chaos_manifest("chaos", "1.0.0", "in", ""), chaos_wasm())
        .await;
    // Two events asking for the same workflow run id: one run.
    for _ in 0..2 {
        h.send(
            "in",
            "k1",
            json!({"op": "workflow", "name": "review-order", "id": "order-9", "input": {"x": 1}}),
        )
        .await;
    }
    h.send("in", "k2", json!({"op": "emit", "seq": "barrier"}))
        .await;
    h.wait_events("out", 1, WAIT).await;
    // The first two events are on one key lane, before the barrier only by partition;
    // wait until both were handled by waiting for the committed watermark via a third.
    h.send("in", "k1", json!({"op": "emit", "seq": "after"}))
        .await;
    h.wait_events("out", 2, WAIT).await;
    let wf = h.events("workflows").await;
    assert_eq!(
        wf.len(),
        1,
        "{:#?}",
        wf.iter().map(describe).collect::<Vec<_>>()
    );
    assert_eq!(header(&wf[0], headers::WORKFLOW), Some("review-order"));
    assert_eq!(header(&wf[0], headers::WORKFLOW_ID), Some("order-9"));
    assert_eq!(json(&wf[0]), json!({"x": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_reads_its_own_writes_and_failed_calls_apply_nothing() {
    let h = Harness::start().await;
    h.deploy(
        &chaos_manifest(
            "chaos",
            "1.0.0",
            "in",
            "[retry]\nmax-attempts = 2\ninitial-backoff-ms = 5\n",
        ),
        chaos_wasm(),
    )
    .await;
    h.send(
        "in",
        "a",
        json!({"op": "put", "key": "colour", "value": "blue"}),
    )
    .await;
    let out = h.wait_events("out", 1, WAIT).await;
    assert_eq!(
        json(&out[0])["value"],
        "blue",
        "read-your-writes inside the call"
    );

    // Writes state and cache and emits, then fails: none of it may be applied.
    h.send(
        "in",
        "a",
        json!({"op": "put-then-fail", "key": "colour", "value": "red"}),
    )
    .await;
    let dlq = h.wait_events("chaos.dlq", 1, WAIT).await;
    assert_eq!(header(&dlq[0], headers::DLQ_ATTEMPTS), Some("2"));
    h.send("in", "a", json!({"op": "get", "key": "colour"}))
        .await;
    h.send("in", "a", json!({"op": "cache-get", "key": "colour"}))
        .await;
    let out = h.wait_events("out", 3, WAIT).await;
    assert_eq!(out.len(), 3, "the failed call's emit must not appear");
    assert_eq!(
        json(&out[1])["value"],
        "blue",
        "state untouched by the failed call"
    );
    assert_eq!(
        json(&out[2])["value"],
        serde_json::Value::Null,
        "cache untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_then_success_emits_exactly_once() {
    let h = Harness::start().await;
    h.deploy(
        &chaos_manifest(
            "chaos",
            "1.0.0",
            "in",
            "[retry]\nmax-attempts = 5\ninitial-backoff-ms = 5\nmax-backoff-ms = 20\n",
        ),
        chaos_wasm(),
    )
    .await;
    h.send(
        "in",
        "f",
        json!({"op": "flaky", "succeed-on": 3, "id": "f1"}),
    )
    .await;
    h.send("in", "f", json!({"op": "get", "key": "flaky/f1"}))
        .await;
    let out = h.wait_events("out", 2, WAIT).await;
    assert_eq!(out.len(), 2);
    assert_eq!(
        json(&out[0])["attempt"],
        3,
        "only the successful attempt's emit"
    );
    assert_eq!(
        json(&out[1])["value"],
        "3",
        "only the successful attempt's state write"
    );
    assert!(h.events("chaos.dlq").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_is_dead_lettered_at_once_with_reason_and_coordinates() {
    let h = Harness::start().await;
    let up = h
        .deploy(
            &chaos_manifest(
                "chaos",
                "1.0.0",
                "in",
                "[retry]\nmax-attempts = 5\ninitial-backoff-ms = 60000\nmax-backoff-ms = 60000\n",
            ),
            chaos_wasm(),
        )
        .await;
    h.send("in", "r", json!({"op": "reject", "reason": "bad order"}))
        .await;
    let dlq = h.wait_events("chaos.dlq", 1, WAIT).await;
    let d = &dlq[0];
    // Not retried: one attempt (a retry would also have waited out a 60 s backoff).
    assert_eq!(header(d, headers::DLQ_KIND), Some("rejected"));
    assert_eq!(header(d, headers::DLQ_REASON), Some("bad order"));
    assert_eq!(header(d, headers::DLQ_ATTEMPTS), Some("1"));
    assert_eq!(header(d, headers::PLUGIN_VERSION), Some("1.0.0"));
    assert_eq!(header(d, headers::PLUGIN_HASH), Some(up.hash.as_str()));
    assert!(header(d, headers::SOURCE).unwrap().starts_with("in/"));
    assert_eq!(d.key.as_deref(), Some(&b"r"[..]));
    assert_eq!(json(d)["op"], "reject", "original payload kept");
}

/// A bad event of each trap kind is retried up to the limit and dead-lettered with its
/// kind, while events of other keys keep flowing meanwhile. Each limit has the room it
/// needs for only itself to trip, however slow the machine: the memory bomb runs in a copy
/// of the plugin with a 60 s deadline, so only the memory cap can stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_are_classified_retried_and_dead_lettered_without_stalling_other_keys() {
    let h = Harness::start().await;
    let limits = |timeout_ms: u64| {
        format!(
            "[limits]\ntimeout-ms = {timeout_ms}\nmemory-mb = 16\n[retry]\nmax-attempts = 2\ninitial-backoff-ms = 10\n"
        )
    };
    h.deploy(
        &chaos_manifest("chaos", "1.0.0", "in", &limits(1_000)),
        chaos_wasm(),
    )
    .await;
    h.deploy(
        &chaos_manifest("chaos-mem", "1.0.0", "in-mem", &limits(60_000)),
        chaos_wasm(),
    )
    .await;
    h.send("in-mem", "bad-mem", json!({"op": "membomb"})).await;
    // One append (one fsync), bad events first: the good events are there as the loop
    // starts, however slow the disk, so only handling can order them after it.
    let mut batch: Vec<(String, serde_json::Value)> = vec![
        ("bad-loop".into(), json!({"op": "loop"})),
        ("bad-panic".into(), json!({"op": "panic"})),
    ];
    batch.extend((0..50).map(|i| (format!("good-{i}"), json!({"op": "emit", "seq": i}))));
    send_all(&h, "in", &batch).await;
    let out = h.wait_events("out", 50, WAIT).await;
    let mut dlq = h.wait_events("chaos.dlq", 2, WAIT).await;
    dlq.extend(h.wait_events("chaos-mem.dlq", 1, WAIT).await);
    let kinds: HashMap<String, String> = dlq
        .iter()
        .map(|d| {
            (
                String::from_utf8(d.key.clone().unwrap()).unwrap(),
                header(d, headers::DLQ_KIND).unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(kinds["bad-loop"], "deadline");
    assert_eq!(kinds["bad-mem"], "memory");
    assert_eq!(kinds["bad-panic"], "panic");
    for d in &dlq {
        assert_eq!(
            header(d, headers::DLQ_ATTEMPTS),
            Some("2"),
            "{}",
            describe(d)
        );
    }
    assert_eq!(out.len(), 50);
    // The looping event held its lane for two 1 s attempts; the good keys of the same
    // plugin were not behind it: all of them were done before it was dead-lettered.
    let last_good = out.iter().map(|e| e.timestamp_ms).max().unwrap();
    let looped = dlq
        .iter()
        .find(|d| d.key.as_deref() == Some(&b"bad-loop"[..]))
        .unwrap();
    assert!(
        last_good <= looped.timestamp_ms,
        "good events finished at {last_good}, after the looping event was dead-lettered at {}",
        looped.timestamp_ms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_under_concurrency() {
    let h = Harness::start().await;
    h.deploy(
        &chaos_manifest("chaos", "1.0.0", "in", "[limits]\nconcurrency = 16\n"),
        chaos_wasm(),
    )
    .await;
    let keys = 10;
    let per_key = 30;
    for i in 0..per_key {
        for k in 0..keys {
            // Uneven work so that lanes finish out of order.
            let op = if (i + k) % 7 == 0 {
                json!({"op": "sleep-ms", "ms": 3, "seq": i})
            } else {
                json!({"op": "emit", "seq": i})
            };
            h.send("in", &format!("key-{k}"), op).await;
        }
    }
    let out = h.wait_events("out", keys * per_key, WAIT).await;
    let mut by_key: HashMap<Vec<u8>, Vec<i64>> = HashMap::new();
    let mut by_partition_offset: Vec<(u32, u64, Vec<u8>, i64)> = out
        .iter()
        .map(|e| {
            (
                e.partition,
                e.offset,
                e.key.clone().unwrap(),
                json(e)["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    by_partition_offset.sort();
    for (_, _, k, seq) in by_partition_offset {
        by_key.entry(k).or_default().push(seq);
    }
    assert_eq!(by_key.len(), keys);
    for (k, seqs) in by_key {
        let expected: Vec<i64> = (0..per_key as i64).collect();
        assert_eq!(
            seqs,
            expected,
            "order of key {}",
            String::from_utf8_lossy(&k)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_read_another_plugins_state_or_emit_to_undeclared_topics() {
    let h = Harness::start().await;
    h.deploy(&chaos_manifest("alpha", "1.0.0", "in-a", ""), chaos_wasm())
        .await;
    h.deploy(&chaos_manifest("beta", "1.0.0", "in-b", ""), chaos_wasm())
        .await;
    h.send(
        "in-a",
        "k",
        json!({"op": "put", "key": "secret", "value": "s3cret"}),
    )
    .await;
    h.wait_events("out", 1, WAIT).await;
    h.send("in-b", "k", json!({"op": "get", "key": "secret"}))
        .await;
    let out = h.wait_events("out", 2, WAIT).await;
    let beta = out
        .iter()
        .find(|e| header(e, headers::PLUGIN) == Some("beta"))
        .unwrap();
    assert_eq!(json(beta)["value"], serde_json::Value::Null);

    h.send("in-b", "k", json!({"op": "emit", "topic": "not-declared"}))
        .await;
    let dlq = h.wait_events("beta.dlq", 1, WAIT).await;
    assert_eq!(header(&dlq[0], headers::DLQ_KIND), Some("capability"));
    assert_eq!(header(&dlq[0], headers::DLQ_ATTEMPTS), Some("1"));
    assert!(
        header(&dlq[0], headers::DLQ_REASON)
            .unwrap()
            .contains("not-declared")
    );
    assert!(h.events("not-declared").await.is_empty());

    // Claiming another plugin's namespace is refused at upload.
    let stealer = chaos_manifest("gamma", "1.0.0", "in-c", "").replace(
        "[capabilities]",
        "[capabilities]\nstate-namespace = \"alpha\"",
    );
    let err =
        h.rt.registry
            .upload(&stealer, chaos_wasm(), true)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("alpha"), "{err}");
}

/// Hot swap under load: no failed event, each event handled by exactly one version, and
/// both versions served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_loses_nothing_and_each_event_has_one_version() {
    let h = Harness::start().await;
    h.deploy(&chaos_manifest("chaos", "1.0.0", "in", ""), chaos_wasm())
        .await;
    let total = 1500;
    let bus = h.bus().clone();
    let sender = tokio::spawn(async move {
        for i in 0..total {
            send(
                &bus,
                "in",
                &format!("k{}", i % 40),
                json!({"op": "emit", "seq": i}),
            )
            .await;
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    h.wait_events("out", 300, WAIT).await;
    h.deploy(&chaos_manifest("chaos", "2.0.0", "in", ""), chaos_wasm())
        .await;
    sender.await.unwrap();
    let out = h.wait_events("out", total, WAIT).await;
    let mut seen = HashSet::new();
    let mut versions: HashMap<String, usize> = HashMap::new();
    for e in &out {
        assert!(
            seen.insert(json(e)["seq"].as_i64().unwrap()),
            "duplicate {}",
            describe(e)
        );
        *versions
            .entry(header(e, headers::PLUGIN_VERSION).unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), total);
    assert!(
        versions.get("1.0.0").copied().unwrap_or(0) > 0,
        "{versions:?}"
    );
    assert!(
        versions.get("2.0.0").copied().unwrap_or(0) > 0,
        "{versions:?}"
    );
    assert!(h.events("chaos.dlq").await.is_empty());

    // Rollback is one call and the old version serves again.
    let back = h.rt.registry.rollback("chaos").await.unwrap();
    assert_eq!(back, "1.0.0");
    h.send("in", "z", json!({"op": "emit", "seq": "after-rollback"}))
        .await;
    let out = h.wait_events("out", total + 1, WAIT).await;
    let last = out
        .iter()
        .find(|e| json(e)["seq"] == "after-rollback")
        .unwrap();
    assert_eq!(header(last, headers::PLUGIN_VERSION), Some("1.0.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_plugin_updates_totals_and_starts_review_workflows() {
    let h = Harness::start().await;
    let manifest = std::fs::read_to_string(plugins_dir().join("order-totals/spate.toml")).unwrap();
    h.deploy(&manifest, order_totals_wasm()).await;
    h.send(
        "orders",
        "c-1",
        json!({"order_id": "o-1", "customer_id": "c-1", "amount_cents": 2000, "currency": "EUR"}),
    )
    .await;
    h.send(
        "orders",
        "c-1",
        json!({"order_id": "o-2", "customer_id": "c-1", "amount_cents": 250000, "currency": "EUR"}),
    )
    .await;
    h.send("orders", "c-2", json!({"order_id": "o-3"})).await;
    let wf = h.wait_events("workflows", 1, WAIT).await;
    assert_eq!(header(&wf[0], headers::WORKFLOW), Some("review-order"));
    assert_eq!(header(&wf[0], headers::WORKFLOW_ID), Some("o-2"));
    let dlq = h.wait_events("order-totals.dlq", 1, WAIT).await;
    assert_eq!(header(&dlq[0], headers::DLQ_KIND), Some("rejected"));
    let totals = h.wait_events("customer-totals", 2, WAIT).await;
    let last = json(totals.last().unwrap());
    assert_eq!(last["total_cents"], 252000, "{last}");
    assert_eq!(last["order_count"], 2, "{last}");
}

/// Warm mode reuses one instance per lane for up to N events and drops it after a trap;
/// fresh mode (the default) gives every event a new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_mode_reuses_instances_and_drops_them_after_a_trap() {
    let h = Harness::start().await;
    h.deploy(
        &chaos_manifest("fresh", "1.0.0", "in-fresh", ""),
        chaos_wasm(),
    )
    .await;
    h.deploy(
        &chaos_manifest(
            "warm",
            "1.0.0",
            "in-warm",
            "[execution]\nmode = \"warm\"\nmax-events-per-instance = 3\n[retry]\nmax-attempts = 1\n",
        ),
        chaos_wasm(),
    )
    .await;
    for _ in 0..3 {
        h.send("in-fresh", "k", json!({"op": "instance-count"}))
            .await;
    }
    // 3 events fill one warm instance; the 4th gets a new one; a panic drops the
    // instance, so the event after it starts from 1 again.
    let mut emitted = h.wait_events("out", 3, WAIT).await.len();
    for op in [
        "instance-count",
        "instance-count",
        "instance-count",
        "instance-count",
        "panic",
        "instance-count",
    ] {
        h.send("in-warm", "k", json!({"op": op})).await;
        // One at a time, so the lane goes quiet between events and the instance must be
        // kept across that.
        if op == "panic" {
            h.wait_events("warm.dlq", 1, WAIT).await;
        } else {
            emitted = h.wait_events("out", emitted + 1, WAIT).await.len();
        }
    }
    let out = h.wait_events("out", 8, WAIT).await;
    let counts = |plugin: &str| -> Vec<i64> {
        out.iter()
            .filter(|e| header(e, headers::PLUGIN) == Some(plugin))
            .map(|e| json(e)["instance_events"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(counts("fresh"), vec![1, 1, 1]);
    assert_eq!(counts("warm"), vec![1, 2, 3, 1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_emit_limit_dead_letters_the_event_with_nothing_emitted() {
    let h = Harness::start().await;
    h.deploy(
        &chaos_manifest("chaos", "1.0.0", "in", "[limits]\nmax-emits = 3\n"),
        chaos_wasm(),
    )
    .await;
    h.send("in", "k", json!({"op": "emit-many", "count": 4}))
        .await;
    h.send("in", "k", json!({"op": "emit-many", "count": 3}))
        .await;
    let dlq = h.wait_events("chaos.dlq", 1, WAIT).await;
    assert_eq!(header(&dlq[0], headers::DLQ_KIND), Some("limit"));
    assert!(
        header(&dlq[0], headers::DLQ_REASON)
            .unwrap()
            .contains("max-emits")
    );
    let out = h.wait_events("out", 3, WAIT).await;
    assert_eq!(out.len(), 3, "only the event within the limit emitted");
}

/// `on-failure = "park-key"`: a rejected event parks its key; the key's later events queue
/// behind it (never handled out of order), durable in the parked namespace in source order
/// with the reason, attempts and version; every other key keeps flowing; nothing is
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_parks_with_its_later_events_while_other_keys_flow() {
    let h = Harness::start().await;
    let manifest = "name = \"chaos\"\nversion = \"1.0.0\"\non-failure = \"park-key\"\n\
                    subscriptions = [{ topic = \"in\" }]\n\
                    [capabilities]\nemit-topics = [\"out\"]\n";
    h.deploy(manifest, chaos_wasm()).await;
    h.send("in", "bad", json!({"op": "reject", "reason": "bad order"}))
        .await;
    for n in 0..3 {
        h.send("in", "bad", json!({"op": "emit", "n": n})).await;
    }
    for n in 0..200 {
        h.send(
            "in",
            &format!("good-{}", n % 10),
            json!({"op": "emit", "n": n}),
        )
        .await;
    }
    let out = h.wait_events("out", 200, WAIT).await;
    assert_eq!(out.len(), 200, "only the other keys' emits");
    assert!(out.iter().all(|e| e.key.as_deref() != Some(&b"bad"[..])));

    // Durable (through the checkpoint) in the parked namespace, in source order.
    let ns = spate_core::state::parked::namespace("chaos");
    let state = &h.rt.backends.state;
    let started = std::time::Instant::now();
    let queue = loop {
        let q = state.scan(&ns, "q/", 100).await.unwrap();
        if q.len() >= 4 || started.elapsed() > WAIT {
            break q;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let parked: Vec<spate_core::state::parked::ParkedEvent> = queue
        .iter()
        .map(|(_, v)| serde_json::from_slice(v).unwrap())
        .collect();
    let kinds: Vec<&str> = parked.iter().map(|p| p.kind.as_str()).collect();
    assert_eq!(kinds, ["rejected", "queued", "queued", "queued"]);
    assert_eq!(parked[0].reason, "bad order");
    assert_eq!(parked[0].attempts, 1);
    assert_eq!(parked[0].version, "1.0.0");
    let offsets: Vec<u64> = parked.iter().map(|p| p.event.offset).collect();
    let mut sorted = offsets.clone();
    sorted.sort_unstable();
    assert_eq!(offsets, sorted, "the key's events in source order");
    let key: spate_core::state::parked::ParkedKey = serde_json::from_slice(
        &state
            .get(
                &ns,
                &spate_core::state::parked::key_entry(&spate_core::state::parked::key_id(Some(
                    b"bad",
                ))),
            )
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!((key.key.as_str(), key.events), ("bad", 4));
    assert_eq!(key.first_reason, "bad order");
    assert!(
        h.events("chaos.dlq").await.is_empty(),
        "nothing dead-lettered"
    );

    // A later event of the parked key queues too.
    h.send("in", "bad", json!({"op": "emit", "n": 99})).await;
    let started = std::time::Instant::now();
    while state.scan(&ns, "q/", 100).await.unwrap().len() < 5 {
        assert!(started.elapsed() < WAIT, "the fifth event never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.events("out").await.len(), 200);
}

/// A park-key test-chaos manifest whose `limits.max-writes` decides whether a `put-many`
/// of three keys fails (1: "the bug") or not (8: "the fix").
fn park_manifest(name: &str, version: &str, max_writes: u32, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"{version}\"\non-failure = \"park-key\"\n\
         subscriptions = [{{ topic = \"in\" }}]\n{extra}\n\
         [capabilities]\nemit-topics = [\"out\"]\n[limits]\nmax-writes = {max_writes}\n"
    )
}

/// The poison event: three state writes, more than the buggy version allows.
fn poison(seq: u64) -> serde_json::Value {
    json!({"op": "put-many", "count": 3, "bytes": 4, "prefix": "many", "seq": seq})
}

/// Events of `keys` other keys (`count` ops) with `bad`'s events at the given places.
fn park_inputs(
    others: usize,
    bad: &[(usize, serde_json::Value)],
) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut seq = 0u64;
    for i in 0..others {
        for (at, payload) in bad {
            if *at == i {
                let mut p = payload.clone();
                p["seq"] = json!(seq);
                out.push(("bad".to_owned(), p));
                seq += 1;
            }
        }
        out.push((
            format!("good-{}", i % 20),
            json!({"op": "count", "seq": seq}),
        ));
        seq += 1;
    }
    out
}

async fn send_all(h: &Harness, topic: &str, inputs: &[(String, serde_json::Value)]) {
    for chunk in inputs.chunks(500) {
        let events = chunk
            .iter()
            .map(|(k, v)| spate_core::NewEvent {
                key: Some(k.as_bytes().to_vec()),
                payload: serde_json::to_vec(v).unwrap(),
                headers: vec![],
            })
            .collect();
        h.bus().append(topic, events).await.unwrap();
    }
}

/// Poll `f` until it returns `Some`; panics after [`WAIT`] with `what`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(started.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn parked_key(
    h: &Harness,
    plugin: &str,
    key: &str,
) -> Option<spate_core::state::parked::ParkedKey> {
    let ns = spate_core::state::parked::namespace(plugin);
    spate_core::state::parked::key(
        &*h.rt.backends.state,
        &ns,
        &spate_core::state::parked::key_id(Some(key.as_bytes())),
    )
    .await
    .unwrap()
}

async fn file(
    h: &Harness,
    plugin: &str,
    action: spate_core::state::parked::Action,
    key: &spate_core::state::parked::ParkedKey,
) -> String {
    let ns = spate_core::state::parked::namespace(plugin);
    let request = spate_core::state::parked::Request::new(
        action,
        &key.topic,
        key.partition,
        &key.key_id,
        vec![],
    );
    spate_core::state::parked::file(&*h.rt.backends.store, &ns, &request)
        .await
        .unwrap();
    spate_core::state::parked::request_entry(&request)
}

/// Wait until the request at `entry` was carried out (its entry is gone).
async fn carried_out(h: &Harness, plugin: &str, entry: &str) {
    let ns = spate_core::state::parked::namespace(plugin);
    eventually(&format!("request {entry} carried out"), || async {
        h.rt.backends
            .state
            .get(&ns, entry)
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
}

/// Every emit per key, in order, as `(payload, version)`.
fn emits_by_key(out: &[spate_core::Event]) -> HashMap<String, Vec<serde_json::Value>> {
    let mut by_key: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for e in out {
        let key = String::from_utf8(e.key.clone().unwrap_or_default()).unwrap();
        by_key.entry(key).or_default().push(json(e));
    }
    by_key
}

/// The plugin's state, every key.
/// Park, fail a redrive, fix, redrive: the key's events are handled in order through the
/// fixed version, ahead of its new events, and state and emits equal an uninterrupted
/// run's; a redrive of a key no longer parked does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_key_redriven_after_the_fix_ends_as_an_uninterrupted_run() {
    use spate_core::state::parked::Action;
    let inputs = park_inputs(
        2_000,
        &[
            (10, json!({"op": "count"})),
            (500, json!({"op": "count"})),
            (900, poison(0)),
            (1_200, json!({"op": "count"})),
            (1_900, json!({"op": "count"})),
        ],
    );
    let late = vec![("bad".to_owned(), json!({"op": "count", "seq": 100_000}))];
    let total = inputs.len() + late.len();

    // What an uninterrupted run with the fixed version produces.
    let reference = Harness::start().await;
    reference
        .deploy(&park_manifest("chaos", "2.0.0", 8, ""), chaos_wasm())
        .await;
    send_all(&reference, "in", &inputs).await;
    send_all(&reference, "in", &late).await;
    let expected_out = emits_by_key(&reference.wait_events("out", total, WAIT).await);
    assert!(parked_key(&reference, "chaos", "bad").await.is_none());

    let h = Harness::start().await;
    h.deploy(&park_manifest("chaos", "1.0.0", 1, ""), chaos_wasm())
        .await;
    send_all(&h, "in", &inputs).await;
    // Every other key flows; the bad key's poison and both later events park.
    h.wait_events("out", inputs.len() - 3, WAIT).await;
    let key = eventually("the key parked with 3 events", || async {
        parked_key(&h, "chaos", "bad")
            .await
            .filter(|k| k.events == 3)
    })
    .await;
    assert!(
        key.first_reason.contains("max-writes"),
        "{}",
        key.first_reason
    );
    assert_eq!(key.version, "1.0.0");

    // A redrive through the same (buggy) version fails again: still parked, counted.
    let entry = file(&h, "chaos", Action::Redrive, &key).await;
    carried_out(&h, "chaos", &entry).await;
    let key = parked_key(&h, "chaos", "bad").await.expect("still parked");
    assert_eq!((key.events, key.redrives), (3, 1));
    assert!(key.last_reason.as_deref().unwrap().contains("max-writes"));
    let ns = spate_core::state::parked::namespace("chaos");
    let head = spate_core::state::parked::queue(&*h.rt.backends.state, &ns, &key.key_id, 10)
        .await
        .unwrap();
    assert_eq!(head.len(), 3);
    assert_eq!(head[0].1.attempts, 2, "the parked call and the redrive's");

    // A new event of the parked key queues behind; then the fix, and a redrive.
    send_all(&h, "in", &late).await;
    eventually("the late event queued", || async {
        parked_key(&h, "chaos", "bad")
            .await
            .filter(|k| k.events == 4)
    })
    .await;
    h.deploy(&park_manifest("chaos", "2.0.0", 8, ""), chaos_wasm())
        .await;
    let entry = file(&h, "chaos", Action::Redrive, &key).await;
    carried_out(&h, "chaos", &entry).await;
    assert!(
        parked_key(&h, "chaos", "bad").await.is_none(),
        "unparked once drained"
    );
    let out = h.wait_events("out", total, WAIT).await;
    assert_eq!(out.len(), total);
    assert_eq!(
        emits_by_key(&out),
        expected_out,
        "emits per key as an uninterrupted run's"
    );
    let poisoned = &head[0].1.event;
    let redriven = out
        .iter()
        .find(|e| json(e).get("put").is_some())
        .expect("the poison's emit");
    assert_eq!(
        header(redriven, headers::SOURCE),
        Some(format!("in/{}/{}", poisoned.partition, poisoned.offset).as_str()),
        "original coordinates"
    );
    assert_eq!(header(redriven, headers::PLUGIN_VERSION), Some("2.0.0"));
    let want = state_of(&reference.rt, "chaos").await;
    eventually("state equal to the uninterrupted run's", || async {
        (state_of(&h.rt, "chaos").await == want).then_some(())
    })
    .await;

    // The key's next events are handled at once; a second redrive does nothing.
    let entry = file(&h, "chaos", Action::Redrive, &key).await;
    carried_out(&h, "chaos", &entry).await;
    send_all(
        &h,
        "in",
        &[("bad".to_owned(), json!({"op": "count", "seq": 100_001}))],
    )
    .await;
    let out = h.wait_events("out", total + 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.events("out").await.len(),
        total + 1,
        "nothing emitted twice"
    );
    let last = out
        .iter()
        .filter(|e| e.key.as_deref() == Some(&b"bad"[..]))
        .max_by_key(|e| e.offset)
        .unwrap();
    assert_eq!(
        json(last)["n"],
        json!(6),
        "the count goes on from the redriven state"
    );
}

/// Discarding a parked key sends its events to the dead-letter topic in order, with the
/// reason, and unparks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_a_parked_key_dead_letters_its_events_and_unparks_it() {
    use spate_core::state::parked::Action;
    let h = Harness::start().await;
    h.deploy(&park_manifest("chaos", "1.0.0", 1, ""), chaos_wasm())
        .await;
    send_all(
        &h,
        "in",
        &[
            ("bad".to_owned(), poison(0)),
            ("bad".to_owned(), json!({"op": "count", "seq": 1})),
        ],
    )
    .await;
    let key = eventually("the key parked", || async {
        parked_key(&h, "chaos", "bad")
            .await
            .filter(|k| k.events == 2)
    })
    .await;
    let entry = file(&h, "chaos", Action::Discard, &key).await;
    carried_out(&h, "chaos", &entry).await;
    let dlq = h.wait_events("chaos.dlq", 2, WAIT).await;
    let kinds: Vec<_> = dlq.iter().map(|e| header(e, headers::DLQ_KIND)).collect();
    assert_eq!(kinds, [Some("discarded"), Some("discarded")]);
    let seqs: Vec<_> = dlq.iter().map(|e| json(e)["seq"].clone()).collect();
    assert_eq!(seqs, [json!(0), json!(1)], "in order");
    assert!(
        header(&dlq[0], headers::DLQ_REASON)
            .unwrap()
            .contains("max-writes")
    );
    assert!(parked_key(&h, "chaos", "bad").await.is_none());
    send_all(
        &h,
        "in",
        &[("bad".to_owned(), json!({"op": "count", "seq": 2}))],
    )
    .await;
    let out = h.wait_events("out", 1, WAIT).await;
    assert_eq!(
        json(&out[0])["n"],
        json!(1),
        "handled at once after the discard"
    );
}

/// A dead-letter redrive handles the dead letters through the active version with their
/// original coordinates; run twice, it handles nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_redrive_handles_each_dead_letter_once() {
    use spate_core::state::parked::{Action, Request};
    let h = Harness::start().await;
    let manifest = |version: &str, max_writes: u32| {
        chaos_manifest(
            "dlqr",
            version,
            "in",
            &format!("[limits]\nmax-writes = {max_writes}"),
        )
    };
    h.deploy(&manifest("1.0.0", 1), chaos_wasm()).await;
    send_all(
        &h,
        "in",
        &[
            ("d".to_owned(), json!({"op": "count", "seq": 0})),
            ("d".to_owned(), poison(1)),
            ("d".to_owned(), json!({"op": "count", "seq": 2})),
        ],
    )
    .await;
    let dlq = h.wait_events("dlqr.dlq", 1, WAIT).await;
    h.wait_events("out", 2, WAIT).await;
    h.deploy(&manifest("2.0.0", 8), chaos_wasm()).await;
    let original = spate_core::state::parked::dead_letter_source(&dlq[0]).expect("a dead letter");
    assert_eq!(original.topic, "in");
    let ns = spate_core::state::parked::namespace("dlqr");
    let redrive = || {
        Request::new(
            Action::RedriveDeadLetters,
            &original.topic,
            original.partition,
            &spate_core::state::parked::key_id(original.key.as_deref()),
            vec![original.clone()],
        )
    };
    let first = redrive();
    spate_core::state::parked::file(&*h.rt.backends.store, &ns, &first)
        .await
        .unwrap();
    carried_out(
        &h,
        "dlqr",
        &spate_core::state::parked::request_entry(&first),
    )
    .await;
    let out = h.wait_events("out", 3, WAIT).await;
    let redriven = out.iter().find(|e| json(e).get("put").is_some()).unwrap();
    assert_eq!(
        header(redriven, headers::SOURCE),
        Some(format!("in/{}/{}", original.partition, original.offset).as_str())
    );
    assert_eq!(header(redriven, headers::PLUGIN_VERSION), Some("2.0.0"));
    // The state the redriven event wrote, then changed by hand: a second redrive that ran
    // the event again would write it back.
    let probe = "many/000000";
    assert!(
        h.rt.backends
            .state
            .get("dlqr", probe)
            .await
            .unwrap()
            .is_some()
    );
    h.rt.backends
        .store
        .apply(
            "dlqr",
            &[spate_core::StateWrite {
                key: probe.into(),
                value: Some(b"changed".to_vec()),
                ttl: None,
                condition: None,
            }],
        )
        .await
        .unwrap();
    let second = redrive();
    spate_core::state::parked::file(&*h.rt.backends.store, &ns, &second)
        .await
        .unwrap();
    carried_out(
        &h,
        "dlqr",
        &spate_core::state::parked::request_entry(&second),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.events("out").await.len(), 3, "nothing emitted twice");
    assert_eq!(
        h.rt.backends
            .state
            .get("dlqr", probe)
            .await
            .unwrap()
            .as_deref(),
        Some(&b"changed"[..]),
        "the second redrive did not handle the event again"
    );
}

/// Attempts already made survive a restart: the event goes on from the attempt it was
/// at, not from 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_keeps_its_attempt_count_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Installs the process's recorder before anything is counted.
    spate::telemetry::metrics();
    let retries = || {
        spate::telemetry::metrics()
            .render()
            .lines()
            .find(|l| l.starts_with("spate_retries_total{") && l.contains("plugin=\"retrier\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // A backoff longer than the drain timeout (5 s): the shutdown abandons the event in
    // back-off after its first attempt.
    let manifest = park_manifest(
        "retrier",
        "1.0.0",
        8,
        "[retry]\nmax-attempts = 3\ninitial-backoff-ms = 6000\nmax-backoff-ms = 6000",
    );
    let ns = spate_core::state::parked::namespace("retrier");
    {
        let rt = start_runtime(dir.path()).await;
        rt.registry
            .upload(&manifest, chaos_wasm(), true)
            .await
            .unwrap();
        send(&rt.backends.bus, "in", "r", json!({"op": "retry"})).await;
        let started = std::time::Instant::now();
        while rt
            .backends
            .state
            .scan(&ns, "a/", 10)
            .await
            .unwrap()
            .is_empty()
        {
            assert!(started.elapsed() < WAIT, "no attempt record");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        rt.shutdown().await;
    }
    assert_eq!(retries(), 1, "one failed attempt before the restart");
    let rt = start_runtime(dir.path()).await;
    let id = spate_core::state::parked::key_id(Some(b"r"));
    let started = std::time::Instant::now();
    let parked = loop {
        let q = spate_core::state::parked::queue(&*rt.backends.state, &ns, &id, 10)
            .await
            .unwrap();
        if let Some((_, e)) = q.into_iter().next() {
            break e;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(parked.attempts, 3);
    assert_eq!(
        retries(),
        2,
        "after the restart, attempts 2 and 3 only (starting over would retry twice more)"
    );
    assert!(
        rt.backends
            .state
            .scan(&ns, "a/", 10)
            .await
            .unwrap()
            .is_empty(),
        "the attempt record goes with the parked event"
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_events_never_reach_the_handler_and_are_committed() {
    let h = Harness::start().await;
    // Installs the process's recorder before anything is counted.
    spate::telemetry::metrics();
    let filter = "[filter]\nkey-prefix = [\"eu-\", \"uk-\"]\nhas-headers = [\"trace\"]\n\
                  headers = { kind = [\"order\", \"refund\"] }\nfields = { op = \"emit\" }\n";
    h.deploy(
        &chaos_manifest("sieve", "1.0.0", "in", filter),
        chaos_wasm(),
    )
    .await;
    let headers = |kind: &str| {
        vec![
            spate_core::Header::text("trace", "t"),
            spate_core::Header::text("kind", kind),
        ]
    };
    // (key, kind, payload, reaches the handler)
    let mut inputs = Vec::new();
    for i in 0..200u64 {
        let (key, kind, op, admitted) = match i % 5 {
            0 => ("eu-1", "order", "emit", true),
            1 => ("uk-2", "refund", "emit", true),
            2 => ("us-1", "order", "emit", false), // key prefix
            3 => ("eu-1", "other", "emit", false), // header value
            _ => ("eu-1", "order", "panic", false), // field: would trap if it ran
        };
        inputs.push((key, kind, json!({"op": op, "n": i}), admitted));
    }
    let mut batch: Vec<spate_core::NewEvent> = inputs
        .iter()
        .map(|(key, kind, payload, _)| spate_core::NewEvent {
            key: Some(key.as_bytes().to_vec()),
            payload: serde_json::to_vec(payload).unwrap(),
            headers: headers(kind),
        })
        .collect();
    // No `trace` header: passed over too.
    batch.push(spate_core::NewEvent {
        key: Some(b"eu-1".to_vec()),
        payload: serde_json::to_vec(&json!({"op": "emit", "n": 999})).unwrap(),
        headers: vec![spate_core::Header::text("kind", "order")],
    });
    h.bus().append("in", batch).await.unwrap();
    let admitted: Vec<u64> = inputs
        .iter()
        .filter(|i| i.3)
        .map(|i| i.2["n"].as_u64().unwrap())
        .collect();
    let out = h.wait_events("out", admitted.len(), WAIT).await;
    // Every input is committed, the passed-over ones included (201 events, one partition
    // per key hash: the sum of the committed positions).
    let group = format!("{}.sieve", h.rt.config.events.group_prefix());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let committed: u64 = support::cluster::committed(&h.rt, &group, "in")
            .await
            .iter()
            .sum();
        if committed == 201 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "committed {committed} of 201"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut seen: Vec<u64> = h
        .events("out")
        .await
        .iter()
        .map(|e| json(e)["n"].as_u64().unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(out.len(), admitted.len());
    assert_eq!(seen, admitted, "exactly the matching events were handled");
    assert!(
        h.events("sieve.dlq").await.is_empty(),
        "the passed-over `panic` events never ran"
    );
    let filtered = spate::telemetry::metrics()
        .render()
        .lines()
        .find(|l| {
            l.starts_with("spate_events_total{")
                && l.contains("plugin=\"sieve\"")
                && l.contains("outcome=\"filtered\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert_eq!(filtered, Some(201 - admitted.len() as u64));
}
