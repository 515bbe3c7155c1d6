//! Handlers in Python and JavaScript, end to end on the embedded runtime, against the same
//! expectations as the Rust example:
//!
//! * the example plugin in each language (`plugins/order-totals{,-py,-js}`), uploaded over
//!   the HTTP API (12-20 MB components within the default upload limit, compiled while the
//!   API keeps answering), fed `plugins/order-totals/sample-events.jsonl`, gives exactly the
//!   outcome its README lists — the same workflows, rejects and totals — and after a restart
//!   loads from the compiled-artifact cache and keeps serving;
//! * the test ops in each language (`plugins/test-chaos-{py,js}`): retry then success
//!   applies one attempt's effects, retry and reject dead-letter as in Rust, an uncaught
//!   exception traps like a panic, and the deadline and the memory cap are enforced; WASI
//!   imports link but reach nothing.
//!
//! The components are built by `build.rs` with the SDKs' build scripts; if a toolchain is
//! missing, these tests fail saying how to install it (`scripts/guest-toolchains.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use spate_core::types::headers;
use spate_tests::guests::{self, Guest};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

/// Generous: dev builds, two cores, and several 15 MB components compiling at once.
const WAIT: Duration = Duration::from_secs(90);

/// One language's version of the example plugin.
struct Example {
    /// Plugin name in its manifest (its state namespace and `<name>.dlq`).
    name: &'static str,
    manifest: String,
    wasm: Vec<u8>,
}

fn rust_example() -> Example {
    Example {
        name: "order-totals",
        manifest: spate_tests::plugins::manifest("order-totals"),
        wasm: order_totals_wasm(),
    }
}

fn guest_example(guest: Guest) -> Example {
    Example {
        name: guest.name,
        manifest: guest.manifest(),
        wasm: guest.component(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_example_gives_the_outcome_in_its_readme() {
    example_scenario(rust_example()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_behaves_like_the_rust_example() {
    example_scenario(guest_example(guests::ORDER_TOTALS_PY)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_example_behaves_like_the_rust_example() {
    example_scenario(guest_example(guests::ORDER_TOTALS_JS)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_handlers_retry_reject_trap_and_meet_the_deadline_and_memory_cap() {
    chaos_scenario(guests::TEST_CHAOS_PY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_handlers_retry_reject_trap_and_meet_the_deadline_and_memory_cap() {
    chaos_scenario(guests::TEST_CHAOS_JS).await;
}

/// Upload over the HTTP API, probing `/healthz` while the component compiles. Returns the
/// response body and the slowest probe.
async fn upload_over_http(app: &axum::Router, ex: &Example) -> (Value, Duration) {
    let req = upload_request(
        Some(TOKEN),
        &[
            ("manifest", ex.manifest.as_bytes()),
            ("component", &ex.wasm),
        ],
    );
    let upload = tokio::spawn({
        let app = app.clone();
        async move { call(&app, req).await }
    });
    let mut slowest = Duration::ZERO;
    while !upload.is_finished() {
        let started = Instant::now();
        let (status, _) = call(app, Request::get("/healthz").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, body) = upload.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{}: {body}", ex.name);
    (body, slowest)
}

/// Wait until `key` exists in `namespace`.
async fn wait_state(rt: &spate::Runtime, namespace: &str, key: &str) {
    let start = Instant::now();
    while rt
        .backends
        .state
        .get(namespace, key)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            start.elapsed() < WAIT,
            "`{key}` never appeared in state namespace `{namespace}`"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn state_json(rt: &spate::Runtime, namespace: &str, key: &str) -> Value {
    let bytes = rt
        .backends
        .state
        .get(namespace, key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no `{key}` in `{namespace}`"));
    serde_json::from_slice(&bytes).unwrap()
}

/// The sample events as (topic, key, payload), in file order.
fn samples() -> Vec<(String, String, Value)> {
    let text = std::fs::read_to_string(spate_tests::plugins::order_totals_samples()).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let topic = v["topic"].as_str().unwrap_or("orders").to_string();
            (
                topic,
                v["key"].as_str().unwrap().to_string(),
                v["payload"].clone(),
            )
        })
        .collect()
}

/// `plugins/order-totals/README.md`, "Sample events": what feeding them in order gives.
/// A `review-order` run: order, customer, tier, amount, total after it, reasons.
type Review<S, R> = (S, S, S, u64, u64, R);
const EXPECTED_REVIEWS: &[Review<&str, &[&str]>] = &[
    ("o-9", "c-42", "gold", 150_000, 162_500, &["large-order"]),
    (
        "o-11",
        "c-1",
        "standard",
        100_000,
        104_999,
        &["large-order"],
    ),
    (
        "o-19",
        "c-99",
        "standard",
        120_000,
        165_000,
        &["large-order"],
    ),
    (
        "o-24",
        "c-3",
        "standard",
        90_000,
        540_000,
        &["standard-tier-total-crossed"],
    ),
    ("o-32", "c-42", "gold", 110_000, 447_500, &["large-order"]),
];
const EXPECTED_TOTALS: &[(&str, u64, u64, &str)] = &[
    ("c-42", 7, 583_500, "o-43"),
    ("c-7", 6, 345_999, "o-45"),
    ("c-99", 5, 443_000, "o-40"),
    ("c-1", 5, 132_199, "o-39"),
    ("c-2", 4, 14_900, "o-46"),
    ("c-3", 8, 569_000, "o-42"),
    ("c-4", 4, 35_300, "o-34"),
    ("c-5", 5, 11_400, "o-44"),
];

async fn example_scenario(ex: Example) {
    let dir = tempfile::tempdir().unwrap();
    let ns = ex.name;
    let dlq = format!("{}.dlq", ex.name);
    let compile_ms;
    {
        let rt = start_runtime(dir.path()).await;
        let app = spate::api::router(spate::api::ApiState::new(
            rt.clone(),
            TOKEN,
            spate::telemetry::metrics(),
        ));
        let (body, slowest_probe) = upload_over_http(&app, &ex).await;
        compile_ms = body["compile_ms"].as_u64().unwrap();
        assert!(compile_ms > 0, "{}: compiled at upload: {body}", ex.name);
        assert!(
            slowest_probe < Duration::from_secs(2),
            "{}: the API stalled for {slowest_probe:?} while the component compiled",
            ex.name
        );

        // Profiles first, committed before any order (they are another topic).
        let samples = samples();
        for (topic, key, payload) in samples.iter().filter(|s| s.0 == "customers") {
            send(&rt.backends.bus, topic, key, payload.clone()).await;
        }
        for (_, key, _) in samples.iter().filter(|s| s.0 == "customers") {
            wait_state(&rt, ns, &format!("profile/{key}")).await;
        }
        assert_eq!(
            state_json(&rt, ns, "profile/c-99").await,
            json!({"tier": "standard"})
        );
        for (topic, key, payload) in samples.iter().filter(|s| s.0 != "customers") {
            send(&rt.backends.bus, topic, key, payload.clone()).await;
        }

        let updates = wait_events(&rt.backends.bus, "customer-totals", 44, WAIT).await;
        let rejects = wait_events(&rt.backends.bus, &dlq, 2, WAIT).await;
        let workflows = wait_events(&rt.backends.bus, "workflows", 5, WAIT).await;
        // Let anything extra arrive before counting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            read_all(&rt.backends.bus, "customer-totals").await.len(),
            44
        );
        assert_eq!(read_all(&rt.backends.bus, &dlq).await.len(), 2);
        assert_eq!(read_all(&rt.backends.bus, "workflows").await.len(), 5);

        for u in &updates {
            assert_eq!(header(u, headers::PLUGIN), Some(ex.name), "{}", describe(u));
            let p = json(u);
            assert_eq!(p["type"], "order-totals.updated", "{p}");
            assert_eq!(
                u.key.as_deref(),
                p["customer_id"].as_str().map(str::as_bytes)
            );
        }

        let rejected: BTreeSet<String> = rejects
            .iter()
            .map(|d| {
                assert_eq!(
                    header(d, headers::DLQ_KIND),
                    Some("rejected"),
                    "{}",
                    describe(d)
                );
                assert_eq!(
                    header(d, headers::DLQ_ATTEMPTS),
                    Some("1"),
                    "{}",
                    describe(d)
                );
                json(d)["order_id"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(rejected, BTreeSet::from(["o-23".into(), "o-41".into()]));
        let reasons: Vec<&str> = rejects
            .iter()
            .map(|d| header(d, headers::DLQ_REASON).unwrap())
            .collect();
        assert!(
            reasons.iter().any(|r| r.contains("amount_cents")),
            "{}: the reason names the bad field: {reasons:?}",
            ex.name
        );

        let mut reviews: Vec<Review<String, Vec<String>>> = workflows
            .iter()
            .map(|w| {
                assert_eq!(header(w, headers::WORKFLOW), Some("review-order"));
                let input = json(w);
                assert_eq!(
                    header(w, headers::WORKFLOW_ID),
                    input["order_id"].as_str(),
                    "run id = order id"
                );
                assert_eq!(input["currency"], "EUR");
                (
                    input["order_id"].as_str().unwrap().to_string(),
                    input["customer_id"].as_str().unwrap().to_string(),
                    input["tier"].as_str().unwrap().to_string(),
                    input["amount_cents"].as_u64().unwrap(),
                    input["total_cents"].as_u64().unwrap(),
                    input["reasons"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_string())
                        .collect(),
                )
            })
            .collect();
        reviews.sort_by_key(|r| r.0[2..].parse::<u32>().unwrap());
        let expected: Vec<_> = EXPECTED_REVIEWS
            .iter()
            .map(|(o, c, t, a, total, r)| {
                (
                    o.to_string(),
                    c.to_string(),
                    t.to_string(),
                    *a,
                    *total,
                    r.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                )
            })
            .collect();
        assert_eq!(reviews, expected, "{}: review-order runs", ex.name);

        for (customer, count, total, last) in EXPECTED_TOTALS {
            let key = format!("totals/{customer}");
            let want = json!({"order_count": count, "total_cents": total, "last_order_id": last});
            // The state is checkpointed after the emits are published: wait for it, not a
            // sleep.
            let deadline = Instant::now() + WAIT;
            loop {
                let got = rt.backends.state.get(ns, &key).await.unwrap();
                let got = got.map(|b| serde_json::from_slice::<Value>(&b).unwrap());
                if got.as_ref() == Some(&want) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: {key} is {got:?}, not {want}",
                    ex.name
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let last_update: BTreeMap<String, Value> = updates
            .iter()
            .map(|u| {
                (
                    json(u)["customer_id"].as_str().unwrap().to_string(),
                    json(u),
                )
            })
            .collect();
        assert_eq!(last_update["c-42"]["total_cents"], 583_500);
        rt.shutdown().await;
    }

    // A restart loads the active version from the compiled-artifact cache, and serves.
    let cached = cwasm_files(dir.path());
    assert_eq!(cached, 1, "{}: one compiled artifact", ex.name);
    let started = Instant::now();
    let rt = start_runtime(dir.path()).await;
    let reload = started.elapsed();
    assert!(
        rt.registry.active(ex.name).is_some(),
        "{} active after restart",
        ex.name
    );
    assert_eq!(
        cwasm_files(dir.path()),
        1,
        "{}: nothing recompiled",
        ex.name
    );
    if compile_ms > 2_000 {
        assert!(
            reload < Duration::from_millis(compile_ms / 2),
            "{}: restart took {reload:?}, compiling took {compile_ms} ms",
            ex.name
        );
    }
    // A redelivered order is skipped; a new one counts.
    let redelivered = json!({"order_id": "o-9", "customer_id": "c-42", "amount_cents": 150000, "currency": "EUR"});
    send(&rt.backends.bus, "orders", "c-42", redelivered).await;
    let new =
        json!({"order_id": "o-47", "customer_id": "c-5", "amount_cents": 100, "currency": "EUR"});
    send(&rt.backends.bus, "orders", "c-5", new).await;
    let updates = wait_events(&rt.backends.bus, "customer-totals", 45, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read_all(&rt.backends.bus, "customer-totals").await.len(),
        45
    );
    let last = updates
        .iter()
        .map(json)
        .find(|p| p["last_order_id"] == "o-47")
        .expect("o-47 counted after the restart");
    assert_eq!(last["order_count"], 6);
    assert_eq!(last["total_cents"], 11_500);
    assert_eq!(read_all(&rt.backends.bus, "workflows").await.len(), 5);
    rt.shutdown().await;
}

fn cwasm_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("compiled"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .count()
}

/// The test-chaos ops of `guest`, with the limits of the Rust trap test: every outcome a
/// Rust handler can have, and the same dead-letter kinds. Each limit gets the room it needs
/// for only itself to trip, however slow the machine: the looping handler runs in a copy
/// of the plugin with a 300 ms deadline, everything else (the memory bomb included) under
/// a 30 s one, so a slow machine cannot turn a memory-cap trap into a deadline.
async fn chaos_scenario(guest: Guest) {
    let h = Harness::start().await;
    let name = guest.name;
    let dlq = format!("{name}.dlq");
    let looping = format!("{name}-deadline");
    let manifest = |plugin: &str, topic: &str, timeout_ms: u64| {
        format!(
            r#"name = "{plugin}"
version = "1.0.0"
subscriptions = [{{ topic = "{topic}" }}]
[capabilities]
emit-topics = ["out"]
[limits]
timeout-ms = {timeout_ms}
memory-mb = 48
[retry]
max-attempts = 3
initial-backoff-ms = 10
max-backoff-ms = 50
"#
        )
    };
    h.deploy(&manifest(name, "chaos", 30_000), guest.component())
        .await;
    h.deploy(&manifest(&looping, "chaos-loop", 300), guest.component())
        .await;
    h.send("chaos-loop", "bad-loop", json!({"op": "loop"}))
        .await;
    for (key, payload) in [
        ("flaky", json!({"op": "flaky", "succeed-on": 3, "id": "f1"})),
        ("flaky", json!({"op": "get", "key": "flaky/f1"})),
        ("bad-reject", json!({"op": "reject", "reason": "bad order"})),
        (
            "bad-retry",
            json!({"op": "retry", "reason": "backend busy"}),
        ),
        ("bad-raise", json!({"op": "raise"})),
        ("bad-mem", json!({"op": "membomb"})),
        ("alloc", json!({"op": "membomb", "alloc-mb": 8})),
        ("wasi", json!({"op": "wasi"})),
        ("bad-fetch", json!({"op": "fetch"})),
    ] {
        h.send("chaos", key, payload).await;
    }
    for i in 0..20 {
        h.send(
            "chaos",
            &format!("good-{i}"),
            json!({"op": "emit", "seq": i}),
        )
        .await;
    }
    let mut dlq_events = h.wait_events(&dlq, 5, WAIT).await;
    dlq_events.extend(h.wait_events(&format!("{looping}.dlq"), 1, WAIT).await);
    let out = h.wait_events("out", 24, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.events("out").await.len(), 24, "{name}");
    assert_eq!(h.events(&dlq).await.len(), 5, "{name}");

    let by_key = |events: &[spate_core::Event], key: &str| -> Vec<spate_core::Event> {
        events
            .iter()
            .filter(|e| e.key.as_deref() == Some(key.as_bytes()))
            .cloned()
            .collect()
    };
    // Retry then success: only the successful attempt's emit and state write survive.
    let flaky = by_key(&out, "flaky");
    assert_eq!(
        flaky.len(),
        2,
        "{name}: {:?}",
        flaky.iter().map(describe).collect::<Vec<_>>()
    );
    assert_eq!(json(&flaky[0])["attempt"], 3, "{name}");
    assert_eq!(json(&flaky[1])["value"], "3", "{name}");
    // Memory below the cap is usable.
    assert_eq!(json(&by_key(&out, "alloc")[0])["allocated_mb"], 8, "{name}");
    assert_eq!(
        out.iter().filter(|e| json(e)["n"] == 0).count(),
        20,
        "{name}: good keys all handled"
    );

    let dead: BTreeMap<String, (String, String, String)> = dlq_events
        .iter()
        .map(|d| {
            (
                String::from_utf8(d.key.clone().unwrap()).unwrap(),
                (
                    header(d, headers::DLQ_KIND).unwrap().to_string(),
                    header(d, headers::DLQ_ATTEMPTS).unwrap().to_string(),
                    header(d, headers::DLQ_REASON).unwrap().to_string(),
                ),
            )
        })
        .collect();
    let expect = |key: &str, kind: &str, attempts: &str, reason: &str| {
        let (k, a, r) = &dead[key];
        assert_eq!(
            (k.as_str(), a.as_str()),
            (kind, attempts),
            "{name} {key}: {r}"
        );
        assert!(
            r.contains(reason),
            "{name} {key}: reason `{r}` lacks `{reason}`"
        );
    };
    expect("bad-reject", "rejected", "1", "bad order");
    expect("bad-retry", "retries-exhausted", "3", "backend busy");
    expect("bad-raise", "panic", "3", "exception requested");
    expect("bad-loop", "deadline", "3", "deadline");
    expect("bad-mem", "memory", "3", "memory cap");
    expect("bad-fetch", "panic", "3", "");

    // WASI is linked but reaches nothing: no files, no environment, no network.
    let wasi = json(&by_key(&out, "wasi")[0]);
    if name.ends_with("-py") {
        assert!(
            wasi["file"]["error"]
                .as_str()
                .unwrap()
                .contains("No such file"),
            "{wasi}"
        );
        assert!(wasi["listdir"]["error"].is_string(), "{wasi}");
        assert_eq!(wasi["env"], json!({}), "{wasi}");
        assert!(wasi["socket"]["error"].is_string(), "{wasi}");
    } else {
        assert_eq!(wasi["process"], "undefined", "{wasi}");
        assert_eq!(wasi["require"], "undefined", "{wasi}");
    }
}
