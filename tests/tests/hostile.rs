//! Promises kept under hostile plugins and big events: a backlog of large events, spinning
//! handlers, a call journaling more than its memory, idle warm instances, forged runtime
//! headers, a plugin feeding its own input, oversized emits, reasons and logs, and a guest
//! calling `exit`. Each test failed on the code before the fix it covers.
//!
//! The memory and latency tests run a real runtime process (`spate-node`) and read its
//! peak RSS from `/proc`; the others run the runtime in-process on embedded defaults.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode, header as http_header};
use serde_json::{Value, json};
use spate_core::types::headers;
use std::time::{Duration, Instant};
use support::node::{Node, append, handled_ok, metric, spawn_node, upload};
use support::*;
use tower::ServiceExt as _;

const WAIT: Duration = Duration::from_secs(30);

/// `VmHWM` / `VmRSS` of a process, in bytes.
fn proc_mem(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Waits until `plugin` handled `n` events ok, failing early if `check` says so.
async fn wait_handled(
    http: &reqwest::Client,
    node: &Node,
    plugin: &str,
    n: u64,
    timeout: Duration,
    mut check: impl FnMut(),
) {
    let start = Instant::now();
    while handled_ok(http, node, plugin).await < n {
        check();
        assert!(
            start.elapsed() < timeout,
            "{plugin} handled {} of {n} events in {timeout:?}",
            handled_ok(http, node, plugin).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Item 1: a backlog of large events is read one bounded fetch at a time. Before, every
/// commit tick cancelled the pending read and started another (never cancelled on the
/// blocking pool): 60 events of 8 MiB took the runtime to 4 GB in 3 s and then OOM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_large_events_is_read_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = spawn_node(
        dir.path(),
        &http,
        &[("SPATE_API__MAX_BODY_BYTES", "16777216")],
    )
    .await;
    let pid = node.child.id();
    const EVENTS: usize = 60;
    const SIZE: usize = 6 << 20;
    let pad = "x".repeat(SIZE);
    for i in 0..EVENTS {
        let e = json!({ "key": format!("k{i}"), "payload": { "op": "noop", "pad": pad } });
        append(&http, &node, "big", vec![e]).await;
    }
    let before = proc_mem(pid, "VmRSS:");
    let manifest = chaos_manifest("big", "1.0.0", "big", "[limits]\nmemory-mb = 64\n");
    upload(&http, &node, manifest).await;
    // Fail as soon as memory runs away rather than wait for the OOM killer.
    let bound = before + (1536 << 20);
    wait_handled(
        &http,
        &node,
        "big",
        EVENTS as u64,
        Duration::from_secs(120),
        || {
            let rss = proc_mem(pid, "VmRSS:");
            assert!(
                rss < bound,
                "RSS {} MiB while handling the backlog (started at {} MiB)",
                rss >> 20,
                before >> 20
            );
        },
    )
    .await;
    let peak = proc_mem(pid, "VmHWM:");
    eprintln!(
        "large-event backlog: {EVENTS} x {} MiB handled; RSS before {} MiB, peak {} MiB",
        SIZE >> 20,
        before >> 20,
        peak >> 20
    );
    assert!(peak < bound, "peak RSS {} MiB", peak >> 20);
}

/// Item 2: guest code yields to the scheduler. Two plugins spinning until their deadline
/// on a two-worker runtime froze the API, the probes and every other plugin (`/healthz`
/// took 5-48 s); now `/healthz` answers at once and a third plugin keeps handling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_plugins_leave_the_api_and_other_plugins_running() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = spawn_node(dir.path(), &http, &[("TOKIO_WORKER_THREADS", "2")]).await;
    // The manifest ceiling (60 s): the spinners outlast the bystander's 30 s wait below.
    let spin = "[limits]\ntimeout-ms = 60000\n[retry]\nmax-attempts = 1\n";
    upload(
        &http,
        &node,
        chaos_manifest("spin-a", "1.0.0", "spin-a", spin),
    )
    .await;
    upload(
        &http,
        &node,
        chaos_manifest("spin-b", "1.0.0", "spin-b", spin),
    )
    .await;
    upload(
        &http,
        &node,
        chaos_manifest("bystander", "1.0.0", "calm", ""),
    )
    .await;
    for topic in ["spin-a", "spin-b"] {
        let loops: Vec<Value> = (0..4)
            .map(|i| json!({ "key": format!("s{i}"), "payload": { "op": "loop" } }))
            .collect();
        append(&http, &node, topic, loops).await;
    }
    // Let the spinners take the workers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let r = http
            .get(format!("{}/healthz", node.base))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calm: Vec<Value> = (0..10)
        .map(|i| json!({ "key": format!("c{i}"), "payload": { "op": "emit", "n": i } }))
        .collect();
    let t = Instant::now();
    append(&http, &node, "calm", calm).await;
    wait_handled(
        &http,
        &node,
        "bystander",
        10,
        // Room for a node sharing two cores with a heavier test; still well within the
        // spinners' 60 s, so a frozen runtime fails.
        Duration::from_secs(30),
        || {},
    )
    .await;
    let bystander = t.elapsed();
    eprintln!(
        "two spinning plugins (8 calls): worst /healthz {worst:?}; 10 events of another plugin in {bystander:?}"
    );
    assert!(worst < Duration::from_secs(2), "worst /healthz {worst:?}");
}

/// Item 3: what one call journals is bounded by the plugin's memory and write limits, and
/// a scan by the plugin's memory. Before, 2,000 puts of 1 MiB from a 64 MiB plugin made
/// the host hold 2 GB; a scan returning more than the plugin's memory trapped on memory
/// only after the host had read it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cannot_make_the_host_hold_more_than_its_memory() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = spawn_node(dir.path(), &http, &[]).await;
    let pid = node.child.id();
    let manifest = chaos_manifest(
        "hoard",
        "1.0.0",
        "hoard",
        "[limits]\nmemory-mb = 64\ntimeout-ms = 30000\n[retry]\nmax-attempts = 1\n",
    );
    upload(&http, &node, manifest).await;
    let before = proc_mem(pid, "VmRSS:");
    let bomb =
        json!({ "key": "bomb", "payload": { "op": "put-many", "count": 2000, "bytes": 1 << 20 } });
    // Within budget: 10 x 1 MiB per event, 50 MiB in all under `big/`.
    let fills: Vec<Value> = (0..5)
        .map(|i| {
            json!({ "key": format!("f{i}"), "payload": {
                "op": "put-many", "count": 10, "bytes": 1 << 20, "prefix": format!("big/{i}")
            } })
        })
        .collect();
    append(&http, &node, "hoard", vec![bomb]).await;
    append(&http, &node, "hoard", fills).await;
    wait_handled(&http, &node, "hoard", 5, WAIT, || {}).await;
    // A 16 MiB plugin of the same namespace scanning 50 MiB.
    let scanner = chaos_manifest(
        "hoard",
        "1.0.1",
        "hoard",
        "[limits]\nmemory-mb = 16\n[retry]\nmax-attempts = 1\n",
    );
    upload(&http, &node, scanner).await;
    let scan =
        json!({ "key": "scan", "payload": { "op": "scan", "prefix": "big/", "limit": 1000 } });
    append(&http, &node, "hoard", vec![scan]).await;
    let dead = dead_letters(&http, &node, "hoard.dlq", 2).await;
    let peak = proc_mem(pid, "VmHWM:");
    eprintln!(
        "journal budget: RSS before {} MiB, peak {} MiB after 2,000 x 1 MiB puts and a 50 MiB scan",
        before >> 20,
        peak >> 20
    );
    for (key, what) in [("bomb", "limits.memory-mb"), ("scan", "state.scan")] {
        let d = dead
            .iter()
            .find(|d| d["key"] == key)
            .unwrap_or_else(|| panic!("no dead letter for {key}: {dead:?}"));
        assert_eq!(d["headers"][headers::DLQ_KIND], "limit", "{d}");
        let reason = d["headers"][headers::DLQ_REASON].as_str().unwrap();
        assert!(reason.contains(what), "{reason}");
    }
    assert!(
        peak < before + (768 << 20),
        "peak RSS {} MiB (started at {} MiB)",
        peak >> 20,
        before >> 20
    );
}

/// The events of `topic` read over a node's API, waiting for at least `n`.
async fn dead_letters(http: &reqwest::Client, node: &Node, topic: &str, n: usize) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let mut all = Vec::new();
        for p in 0..4 {
            let r = http
                .get(format!(
                    "{}/v1/topics/{topic}/events?partition={p}&offset=0&limit=100",
                    node.base
                ))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            if r.status().is_success() {
                let body: Value = r.json().await.unwrap();
                all.extend(body["events"].as_array().cloned().unwrap_or_default());
            }
        }
        if all.len() >= n {
            return all;
        }
        assert!(
            start.elapsed() < WAIT,
            "{} of {n} events on {topic}",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Item 5: idle warm instances share one budget and give their pool slots up when a call
/// needs one. Before, each pipeline kept up to 32 idle instances forever: a warm plugin's
/// quiet lanes held every slot of a small pool and another plugin's events retried "pool
/// exhausted" forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_warm_instances_never_starve_other_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.sandbox.pool_instances = 8;
    let backends = spate::Backends::from_config(&config).await.unwrap();
    let rt = spate::Runtime::start(config, backends).await.unwrap();
    let bus = rt.backends.bus.clone();
    let warm = chaos_manifest(
        "warm",
        "1.0.0",
        "warm-in",
        "[execution]\nmode = \"warm\"\n[limits]\nconcurrency = 8\n",
    );
    rt.registry.upload(&warm, chaos_wasm(), true).await.unwrap();
    // One event on each of 30 keys: every lane goes quiet and leaves a warm instance.
    for i in 0..30 {
        send(
            &bus,
            "warm-in",
            &format!("w{i}"),
            json!({ "op": "emit", "n": i }),
        )
        .await;
    }
    wait_events(&bus, "out", 30, WAIT).await;
    let fresh = chaos_manifest("fresh", "1.0.0", "fresh-in", "");
    rt.registry
        .upload(&fresh, chaos_wasm(), true)
        .await
        .unwrap();
    let t = Instant::now();
    for i in 0..5 {
        send(
            &bus,
            "fresh-in",
            &format!("f{i}"),
            json!({ "op": "emit", "n": i }),
        )
        .await;
    }
    wait_events(&bus, "out", 35, Duration::from_secs(15)).await;
    eprintln!(
        "pool of 8 with 30 quiet warm lanes: another plugin's 5 events handled in {:?}",
        t.elapsed()
    );
    rt.shutdown().await;
}

/// Item 9: guests cannot set `spate-*` headers, producers cannot either, and workflow ids
/// are per plugin. Before, a guest's `spate-workflow` headers on an emit survived, and a
/// second plugin starting the same workflow name and id was dropped as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_headers_cannot_be_forged_and_workflow_ids_are_per_plugin() {
    let h = Harness::start().await;
    h.deploy(
        &chaos_manifest("forger", "1.0.0", "forge", ""),
        chaos_wasm(),
    )
    .await;
    h.send(
        "forge",
        "f",
        json!({ "op": "emit-raw", "headers": {
            "spate-workflow": "pay-out", "spate-workflow-id": "w-1",
            "spate-idempotency-id": "forged", "Spate-Plugin": "someone-else", "own": "kept"
        } }),
    )
    .await;
    let out = h.wait_events("out", 1, WAIT).await;
    let e = &out[0];
    assert_eq!(header(e, "own"), Some("kept"));
    assert_eq!(header(e, headers::WORKFLOW), None, "{}", describe(e));
    assert_eq!(header(e, headers::WORKFLOW_ID), None);
    assert_eq!(header(e, headers::PLUGIN), Some("forger"));
    assert_ne!(header(e, headers::IDEMPOTENCY_ID), Some("forged"));
    assert_eq!(
        e.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("spate-plugin"))
            .count(),
        1
    );

    h.deploy(
        &chaos_manifest("starter-a", "1.0.0", "start-a", ""),
        chaos_wasm(),
    )
    .await;
    h.deploy(
        &chaos_manifest("starter-b", "1.0.0", "start-b", ""),
        chaos_wasm(),
    )
    .await;
    let start = json!({ "op": "workflow", "name": "review", "id": "o-1" });
    h.send("start-a", "o-1", start.clone()).await;
    h.send("start-b", "o-1", start).await;
    let runs = h.wait_events("workflows", 2, WAIT).await;
    let mut by: Vec<&str> = runs
        .iter()
        .filter_map(|e| header(e, headers::PLUGIN))
        .collect();
    by.sort_unstable();
    assert_eq!(by, ["starter-a", "starter-b"]);

    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    let req = Request::post("/v1/topics/orders/events")
        .header(http_header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(http_header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({ "key": "k", "payload": {}, "headers": { "spate-idempotency-id": "x" } })
                .to_string(),
        ))
        .unwrap();
    let (status, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("reserved"), "{body}");
}

/// Item 12: a plugin may feed its own input only by opting in, and every chain of emits
/// stops at `limits.max-hops` with a dead letter. Before, one seed event grew the log by
/// thousands of events a second, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_feeding_its_own_input_is_refused_or_bounded() {
    let h = Harness::start().await;
    let looping = r#"name = "looper"
version = "1.0.0"
subscriptions = [{ topic = "loop" }]
[capabilities]
emit-topics = ["loop"]
"#;
    let err =
        h.rt.registry
            .upload(looping, chaos_wasm(), true)
            .await
            .expect_err("a self-feeding manifest without the opt-in is refused");
    assert!(err.to_string().contains("allow-self-emit"), "{err}");

    let opted = looping.replace(
        "emit-topics = [\"loop\"]",
        "emit-topics = [\"loop\"]\nallow-self-emit = true\n[limits]\nmax-hops = 5",
    );
    h.deploy(&opted, chaos_wasm()).await;
    h.send("loop", "seed", json!({ "op": "forward", "topic": "loop" }))
        .await;
    let dlq = h.wait_events("looper.dlq", 1, WAIT).await;
    assert_eq!(header(&dlq[0], headers::DLQ_KIND), Some("limit"));
    assert!(
        header(&dlq[0], headers::DLQ_REASON)
            .unwrap()
            .contains("max-hops")
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let chain = h.events("loop").await;
    assert_eq!(chain.len(), 6, "the seed and 5 hops");
    let hops: Vec<Option<&str>> = chain.iter().map(|e| header(e, headers::HOPS)).collect();
    assert!(hops.contains(&Some("5")), "{hops:?}");
}

/// Item 13: emitted keys and headers count against `max-emit-bytes`, limits have runtime
/// ceilings, reasons are cut, and a call's log lines are rate-limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emits_reasons_and_limits_are_bounded() {
    let h = Harness::start().await;
    let small = chaos_manifest(
        "tight",
        "1.0.0",
        "tight",
        "[limits]\nmax-emit-bytes = 1000\n",
    );
    h.deploy(&small, chaos_wasm()).await;
    h.send(
        "tight",
        "big-key",
        json!({ "op": "emit-raw", "key-pad": 4000 }),
    )
    .await;
    h.send(
        "tight",
        "big-header",
        json!({ "op": "emit-raw", "header-pad": 4000 }),
    )
    .await;
    h.send(
        "tight",
        "long-reason",
        json!({ "op": "reject", "reason-pad": 1_000_000 }),
    )
    .await;
    let dlq = h.wait_events("tight.dlq", 3, WAIT).await;
    for e in &dlq {
        let key = String::from_utf8_lossy(e.key.as_deref().unwrap_or_default()).into_owned();
        let reason = header(e, headers::DLQ_REASON).unwrap();
        match key.as_str() {
            "big-key" | "big-header" => {
                assert_eq!(
                    header(e, headers::DLQ_KIND),
                    Some("limit"),
                    "{key}: {reason}"
                );
                assert!(reason.contains("max-emit-bytes"), "{reason}");
            }
            _ => {
                assert!(reason.len() < 10_000, "a reason of {} bytes", reason.len());
                assert!(reason.contains("cut"), "{}", &reason[reason.len() - 60..]);
            }
        }
    }
    assert!(h.events("out").await.is_empty());

    for (limit, value) in [
        ("limits", "max-emits = 1000000"),
        ("limits", "max-emit-bytes = 1000000000000"),
        ("limits", "max-writes = 100000000"),
        ("retry", "max-backoff-ms = 100000000000"),
    ] {
        let m = chaos_manifest("ceiling", "1.0.0", "c", &format!("[{limit}]\n{value}\n"));
        let err = h.rt.registry.upload(&m, chaos_wasm(), true).await.err();
        let err = err.unwrap_or_else(|| panic!("`{value}` was accepted"));
        let name = value.split(' ').next().unwrap();
        assert!(err.to_string().contains(name), "{err}");
    }
}

/// Item 13 (logs): a call may write at most 100 lines; the rest are counted, not written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_logs_are_rate_limited_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = spawn_node(dir.path(), &http, &[("RUST_LOG", "warn,spate::guest=info")]).await;
    upload(
        &http,
        &node,
        chaos_manifest("chatty", "1.0.0", "chatty", ""),
    )
    .await;
    let e = json!({ "key": "c", "payload": { "op": "log-many", "count": 20000, "bytes": 200 } });
    append(&http, &node, "chatty", vec![e]).await;
    wait_handled(&http, &node, "chatty", 1, WAIT, || {}).await;
    let dropped = metric(
        &http,
        &node,
        "spate_guest_log_lines_dropped_total",
        &["plugin=\"chatty\""],
    )
    .await;
    let log = std::fs::read_to_string(dir.path().join("node.log")).unwrap();
    let written = log.lines().filter(|l| l.contains("llllllllll")).count();
    eprintln!("20,000 log lines of one call: {written} written, {dropped} dropped");
    assert_eq!(written, 100);
    assert_eq!(dropped, 19_900.0);
}

/// Item 16: a guest calling `exit(0)` is dead-lettered saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_calling_exit_is_reported_as_such() {
    let h = Harness::start().await;
    h.deploy(
        &chaos_manifest("quitter", "1.0.0", "quit", ""),
        chaos_wasm(),
    )
    .await;
    h.send("quit", "q", json!({ "op": "exit" })).await;
    let dlq = h.wait_events("quitter.dlq", 1, WAIT).await;
    assert_eq!(header(&dlq[0], headers::DLQ_KIND), Some("exit"));
    assert_eq!(header(&dlq[0], headers::DLQ_ATTEMPTS), Some("1"));
    assert!(
        header(&dlq[0], headers::DLQ_REASON)
            .unwrap()
            .contains("exit(0)")
    );
}

/// Item 10: a deleted plugin's namespace stays reserved until it is purged (and purging
/// deletes its state); the data directory is the runtime user's only. Before, a new plugin
/// could claim a deleted plugin's namespace and read its state, and files were 0644 in a
/// 0755 directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_plugins_state_is_reserved_until_purged() {
    use std::os::unix::fs::PermissionsExt as _;
    let h = Harness::start().await;
    let mode = std::fs::metadata(h.dir.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "data dir mode {mode:o}");
    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    h.deploy(&chaos_manifest("keeper", "1.0.0", "keep", ""), chaos_wasm())
        .await;
    h.send(
        "keep",
        "k",
        json!({ "op": "put", "key": "secret", "value": "s3cr3t" }),
    )
    .await;
    h.wait_events("out", 1, WAIT).await;
    let delete = |path: &str| {
        Request::delete(path)
            .header(http_header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap()
    };
    let resp = app
        .clone()
        .oneshot(delete("/v1/plugins/keeper"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let thief = r#"name = "thief"
version = "1.0.0"
subscriptions = [{ topic = "steal" }]
[capabilities]
state-namespace = "keeper"
emit-topics = ["out"]
"#;
    let err =
        h.rt.registry
            .upload(thief, chaos_wasm(), true)
            .await
            .expect_err("a deleted plugin's namespace is reserved");
    assert!(err.to_string().contains("deleted plugin `keeper`"), "{err}");
    assert!(h.rt.registry.show("keeper").await.is_none());
    assert!(
        !h.rt
            .registry
            .list()
            .await
            .keys()
            .any(|k| k.contains("keeper"))
    );

    let resp = app
        .clone()
        .oneshot(delete("/v1/plugins/keeper?purge=true"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    h.deploy(thief, chaos_wasm()).await;
    h.send("steal", "t", json!({ "op": "get", "key": "secret" }))
        .await;
    let out = h.wait_events("out", 2, WAIT).await;
    let got = out
        .iter()
        .map(json)
        .find(|v| v["key"] == "secret" && v.get("value").is_some_and(Value::is_null));
    assert!(
        got.is_some(),
        "purged state is gone: {:?}",
        out.iter().map(json).collect::<Vec<_>>()
    );
}

/// A purge in the same request as the delete waits for the plugin's pipelines to drain:
/// the last checkpoint of a stopping pipeline writes state, and before, a purge that ran
/// beside it left that state behind for the namespace's next owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_waits_for_the_plugins_last_checkpoint() {
    let h = Harness::start().await;
    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    h.deploy(
        &chaos_manifest("busy", "1.0.0", "busy-in", ""),
        chaos_wasm(),
    )
    .await;
    let puts = (0..2_000)
        .map(|i| spate_core::NewEvent {
            key: Some(format!("k{i}").into_bytes()),
            payload: serde_json::to_vec(
                &json!({ "op": "put", "key": format!("s{i}"), "value": "x" }),
            )
            .unwrap(),
            headers: vec![],
        })
        .collect();
    h.bus().append("busy-in", puts).await.unwrap();
    // Mid-stream: handled events are still being checkpointed when the purge arrives.
    h.wait_events("out", 1, WAIT).await;
    let resp = app
        .oneshot(
            Request::delete("/v1/plugins/busy?purge=true")
                .header(http_header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let handled = read_all(h.bus(), "out").await.len();
    let left = h.rt.backends.state.scan("busy", "", 10_000).await.unwrap();
    assert!(
        left.is_empty(),
        "{} keys outlived the purge ({handled} events handled)",
        left.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = h.rt.backends.state.scan("busy", "", 10_000).await.unwrap();
    assert!(
        late.is_empty(),
        "{} keys written after the purge",
        late.len()
    );
    eprintln!("purged while {handled} of 2000 events had been handled");
}
