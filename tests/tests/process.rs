//! A real runtime process (`spate-node`, which runs exactly what `spate up` runs) driven
//! over HTTP: killed with SIGKILL mid-stream and restarted, and stopped with SIGTERM under
//! load and restarted. Nothing appended may be lost, and nothing emitted duplicated.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::node::{Node, append, handled_ok, spawn_node, spawn_node_with, upload};
use support::{TOKEN, chaos_manifest};

/// Every event of `topic`, read through the API's cursors.
async fn read_topic(http: &reqwest::Client, node: &Node, topic: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/topics/{topic}/events?limit=1000", node.base);
        if let Some(f) = &from {
            url.push_str(&format!("&from={f}"));
        }
        let r = http.get(url).bearer_auth(TOKEN).send().await.unwrap();
        if r.status() == 404 {
            return all;
        }
        assert!(r.status().is_success());
        let body: Value = r.json().await.unwrap();
        let events = body["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            return all;
        }
        all.extend(events);
        from = body["next_from"].as_str().map(str::to_string);
    }
}

async fn topic_size(http: &reqwest::Client, node: &Node, topic: &str) -> u64 {
    let r = http
        .get(format!("{}/v1/topics/{topic}", node.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    if !r.status().is_success() {
        return 0;
    }
    let body: Value = r.json().await.unwrap();
    body["end_offsets"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).sum())
        .unwrap_or(0)
}

async fn wait_size(http: &reqwest::Client, node: &Node, topic: &str, n: u64, timeout: Duration) {
    let started = Instant::now();
    while topic_size(http, node, topic).await < n {
        assert!(
            started.elapsed() < timeout,
            "`{topic}` never reached {n} events"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn inputs(range: std::ops::Range<usize>) -> Vec<Value> {
    range
        .map(|i| json!({"key": format!("k{}", i % 25), "payload": {"op": "emit", "seq": i}}))
        .collect()
}

/// Checks that `out` holds exactly one event per input seq, in per-key order.
fn assert_exactly_once_in_order(out: &[Value], total: usize) {
    let mut seen = HashSet::new();
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut sorted: Vec<&Value> = out.iter().collect();
    sorted.sort_by_key(|e| (e["partition"].as_u64(), e["offset"].as_u64()));
    for e in sorted {
        let seq = e["payload"]["seq"].as_u64().unwrap();
        assert!(seen.insert(seq), "seq {seq} emitted twice: {e}");
        per_key
            .entry(e["key"].as_str().unwrap().to_string())
            .or_default()
            .push(seq);
    }
    assert_eq!(seen.len(), total, "every appended event handled");
    for (key, seqs) in per_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "per-key order of {key}");
    }
}

const TOTAL: usize = 3000;

/// A node running test-chaos on `in` with all `TOTAL` events appended before it was
/// deployed, and at least a tenth of them handled.
async fn node_mid_stream(dir: &Path, http: &reqwest::Client, env: &[(&str, &str)]) -> Node {
    let node = spawn_node(dir, http, env).await;
    // The whole backlog first (its first event creates the topic; the plugin's new group
    // starts at the earliest event): "mid-stream" must not depend on how appends and
    // handling race.
    for chunk in (0..TOTAL).step_by(500) {
        append(http, &node, "in", inputs(chunk..chunk + 500)).await;
    }
    upload(
        http,
        &node,
        chaos_manifest("chaos", "1.0.0", "in", "[limits]\nconcurrency = 8\n"),
    )
    .await;
    wait_size(http, &node, "out", 300, Duration::from_secs(60)).await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut node = node_mid_stream(dir.path(), &http, &[]).await;
    node.child.kill().unwrap(); // SIGKILL: no drain, no final commit
    node.child.wait().unwrap();
    drop(node);

    let node = spawn_node(dir.path(), &http, &[]).await;
    wait_size(&http, &node, "out", TOTAL as u64, Duration::from_secs(120)).await;
    // Let any re-handled event finish, then check exactly-once emits and per-key order.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = read_topic(&http, &node, "out").await;
    assert_eq!(out.len(), TOTAL, "no duplicated emits after the crash");
    assert_exactly_once_in_order(&out, TOTAL);
    assert_eq!(topic_size(&http, &node, "chaos.dlq").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_commits_so_a_restart_redoes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    // A small read-ahead, so the drain has a bounded amount to finish and the stop
    // really is mid-stream.
    let small_buffer = [("SPATE_DISPATCH__MAX_BUFFERED", "200")];
    let mut node = node_mid_stream(dir.path(), &http, &small_buffer).await;
    let term = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = node.child.wait().unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
    drop(node);

    // Count what the first process emitted before the second one starts handling.
    let handled_before: u64 = {
        use spate_core::EventBus;
        let log = spate_core::events::EmbeddedLog::open(
            &dir.path().join("data/log"),
            spate_core::events::LogConfig::default(),
        )
        .unwrap();
        log.end_offsets("out").await.unwrap().iter().sum()
    };
    assert!(handled_before < TOTAL as u64, "stopped mid-stream");
    let node = spawn_node(dir.path(), &http, &small_buffer).await;
    wait_size(&http, &node, "out", TOTAL as u64, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Everything the first process handled was committed by its drain: the second one
    // handles exactly the rest.
    let handled_after = handled_ok(&http, &node, "chaos").await;
    assert_eq!(handled_before + handled_after, TOTAL as u64);
    let out = read_topic(&http, &node, "out").await;
    assert_exactly_once_in_order(&out, TOTAL);
}

/// The count job killed five times at random points: every key's count in durable state
/// equals its number of events, and each key's emitted counts are exactly 1..=n, once
/// each (a state write applied twice would skip a number; a lost one would repeat one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_keeps_state_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    count_job_through_sigkills(dir.path(), None).await;
}

/// The same with the state in Apache Cassandra: a checkpoint's writes and positions are
/// one single-partition batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_keeps_cassandra_state_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::node::cql_state_config(dir.path());
    count_job_through_sigkills(dir.path(), Some(&config)).await;
}

async fn count_job_through_sigkills(dir: &Path, config: Option<&Path>) {
    const KEYS: usize = 25;
    const TOTAL: usize = 10_000;
    let http = reqwest::Client::new();
    let mut node = spawn_node_with(dir, &http, &[], config).await;
    upload(
        &http,
        &node,
        chaos_manifest("chaos", "1.0.0", "in", "[limits]\nconcurrency = 8\n"),
    )
    .await;
    let events: Vec<Value> = (0..TOTAL)
        .map(|i| json!({"key": format!("k{}", i % KEYS), "payload": {"op": "count", "seq": i}}))
        .collect();
    for chunk in events.chunks(500) {
        append(&http, &node, "in", chunk.to_vec()).await;
    }
    let mut kills = 0;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    eprintln!("kill seed {seed}");
    let mut last = 0;
    while kills < 5 {
        // Mid-stream: once this run has handled some events, at a random point after.
        let started = Instant::now();
        let mut done = topic_size(&http, &node, "out").await;
        while done < last + 100 && done < TOTAL as u64 {
            assert!(started.elapsed() < Duration::from_secs(60), "no progress");
            tokio::time::sleep(Duration::from_millis(10)).await;
            done = topic_size(&http, &node, "out").await;
        }
        if done >= TOTAL as u64 {
            break;
        }
        last = done;
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(20 + (seed >> 33) % 150)).await;
        node.child.kill().unwrap();
        node.child.wait().unwrap();
        kills += 1;
        drop(node);
        node = spawn_node_with(dir, &http, &[], config).await;
    }
    assert!(
        kills >= 3,
        "killed mid-stream at least 3 times, got {kills}"
    );
    wait_size(&http, &node, "out", TOTAL as u64, Duration::from_secs(120)).await;
    // Each key's count as the plugin reads it from state, after every event.
    let probes: Vec<Value> = (0..KEYS)
        .map(|k| json!({"key": "probe", "payload": {"op": "get", "key": format!("count/k{k}"), "seq": TOTAL + k}}))
        .collect();
    append(&http, &node, "in", probes).await;
    wait_size(
        &http,
        &node,
        "out",
        (TOTAL + KEYS) as u64,
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = read_topic(&http, &node, "out").await;
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seqs = HashSet::new();
    let per = (TOTAL / KEYS) as u64;
    for e in &out {
        let seq = e["payload"]["seq"].as_u64().unwrap();
        seqs.insert(seq);
        if seq >= TOTAL as u64 {
            let value = e["payload"]["value"].as_str().unwrap_or("none");
            assert_eq!(
                value,
                per.to_string(),
                "state count of {} after {kills} SIGKILLs",
                e["payload"]["key"]
            );
            continue;
        }
        per_key
            .entry(e["key"].as_str().unwrap().to_string())
            .or_default()
            .push(e["payload"]["n"].as_u64().unwrap());
    }
    assert_eq!(seqs.len(), TOTAL + KEYS, "every event's emit is present");
    assert_eq!(out.len(), TOTAL + KEYS, "no emit duplicated");
    for (key, mut ns) in per_key {
        ns.sort_unstable();
        assert_eq!(
            ns,
            (1..=per).collect::<Vec<_>>(),
            "counts emitted for {key}"
        );
    }
    eprintln!("killed {kills} times; {TOTAL} events, {KEYS} keys counted exactly");
}

/// 40 events of different keys race a compare-and-swap on one state key: each handler
/// sees it absent and swaps, but only one swap can hold when the events' effects are
/// applied. The others are retried before anything of theirs is published, so exactly one
/// `swapped: true` is ever emitted (emits published before the conflict showed 17 of 40).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_swap_that_loses_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = spawn_node(dir.path(), &http, &[]).await;
    upload(
        &http,
        &node,
        chaos_manifest(
            "chaos",
            "1.0.0",
            "in",
            "[limits]\nconcurrency = 40\n[retry]\nmax-attempts = 100\ninitial-backoff-ms = 1\nmax-backoff-ms = 5\n",
        ),
    )
    .await;
    let n = 40;
    let events: Vec<Value> = (0..n)
        .map(|i| {
            json!({"key": format!("e{i}"), "payload": {"op": "cas", "key": "shared", "new": format!("v{i}"), "seq": i}})
        })
        .collect();
    append(&http, &node, "in", events).await;
    wait_size(&http, &node, "out", n as u64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = read_topic(&http, &node, "out").await;
    assert_eq!(out.len(), n, "one emit per event");
    let winners: Vec<&Value> = out
        .iter()
        .filter(|e| e["payload"]["swapped"] == json!(true))
        .collect();
    assert_eq!(winners.len(), 1, "exactly one swap held: {winners:?}");
    let value = winners[0]["payload"]["value"].as_str().unwrap();
    for e in &out {
        assert_eq!(
            e["payload"]["value"].as_str(),
            Some(value),
            "every event saw the winner's value"
        );
    }
}
