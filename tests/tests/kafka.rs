//! Spate on Kafka, against a real Apache Kafka broker (KRaft, started on free loopback
//! ports per test; input produced in batches as users' producers do): keyed events handled
//! once in per-key order with workflows and committed offsets; a backlog of large batches
//! paused and resumed mid-batch by backpressure; the topic view and lag against the
//! broker's end offsets; a poison event dead-lettered after its attempts while the rest
//! flows; three runtime processes in one group with one SIGKILLed and one added; SIGTERM
//! under load; the broker cut off mid-run, and killed and restarted mid-run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use serde_json::json;
use spate::Runtime;
use spate::config::EventsConfig;
use spate_conformance::kafka::{
    KafkaBroker, NewRecord, Record, committed_offsets, consume_all, end_offsets, produce,
    produce_records,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::kafka::*;
use support::node::{Node, handled_ok, metric, spawn_node, upload};
use support::{TOKEN, chaos_manifest, chaos_wasm, test_config};

/// Group of plugin `chaos` under the default deployment group `spate`.
const GROUP: &str = "spate.chaos";

fn kafka_events(bootstrap: &str) -> EventsConfig {
    let mut kafka = spate_kafka::KafkaOptions::new(bootstrap);
    kafka.session_timeout = Duration::from_secs(6);
    kafka.revoke_timeout = Duration::from_secs(5);
    kafka.produce_timeout = Duration::from_secs(5);
    kafka.request_timeout = Duration::from_secs(5);
    EventsConfig::Kafka(kafka)
}

async fn start_in_process(dir: &Path, bootstrap: &str) -> Arc<Runtime> {
    let mut config = test_config(dir);
    config.events = kafka_events(bootstrap);
    let backends = spate::Backends::from_config(&config).await.unwrap();
    Runtime::start(config, backends).await.unwrap()
}

/// A broker with test-chaos's topics: `chaos` and `out` with `partitions` each, its dead
/// letters and the workflow topic.
async fn chaos_broker(partitions: i32) -> KafkaBroker {
    let broker = KafkaBroker::start();
    create_chaos_topics(&broker, partitions).await;
    broker
}

async fn create_chaos_topics(broker: &KafkaBroker, partitions: i32) {
    for (name, n) in [
        ("chaos", partitions),
        ("out", partitions),
        ("chaos.dlq", 1),
        ("workflows", 1),
    ] {
        broker.create_topic(name, n).await;
    }
}

async fn assert_no_dead_letters(bootstrap: &str) {
    let dlq = read(bootstrap, "chaos.dlq", 1, Duration::from_millis(500)).await;
    assert!(dlq.is_empty(), "unexpected dead letters: {dlq:?}");
}

/// Each key's seqs in `out`, in the order they were emitted (records of one key share a
/// partition; sorted by offset), must increase — unless `allow_replays`, where a replay
/// after a crash may repeat a suffix but never reorder what one pass emitted.
fn assert_key_order(out: &[Record]) {
    let mut sorted: Vec<&Record> = out.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in sorted {
        per_key
            .entry(key(r))
            .or_default()
            .push(payload(r)["seq"].as_u64().unwrap());
    }
    for (k, seqs) in per_key {
        let mut s = seqs.clone();
        s.sort_unstable();
        assert_eq!(seqs, s, "per-key order of {k}");
    }
}

/// Wait until the group's committed offsets equal the topic's end offsets.
async fn wait_committed_to_end(bootstrap: &str, topic: &str, timeout: Duration) {
    wait_committed_to_end_of(bootstrap, topic, timeout, None).await
}

/// [`wait_committed_to_end`], with the tail of `node_dir`'s log in the failure message.
async fn wait_committed_to_end_of(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    node_dir: Option<&Path>,
) {
    wait_group_at_end(bootstrap, GROUP, topic, timeout, node_dir).await
}

/// Wait until `node` has handled `n` events of `chaos` (mid-stream, for a fault).
async fn wait_handled(http: &reqwest::Client, node: &Node, n: u64) {
    let started = Instant::now();
    while handled_ok(http, node, "chaos").await < n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "fewer than {n} events handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After a fault: every seq below `n` reached `out` (a replay may repeat some), nothing was
/// dead-lettered, and the group committed to the end of `chaos`.
async fn assert_nothing_lost(bootstrap: &str, node_dir: &Path, n: usize, fault: &str) {
    let out = read_all_seqs(bootstrap, "out", n, Duration::from_secs(120)).await;
    let counts = seq_counts(&out);
    let missing = (0..n)
        .filter(|s| !counts.contains_key(&(*s as u64)))
        .count();
    assert_eq!(
        missing,
        0,
        "events lost across {fault}; node log:\n{}",
        log_tail(node_dir, 60)
    );
    assert_no_dead_letters(bootstrap).await;
    wait_committed_to_end_of(bootstrap, "chaos", Duration::from_secs(30), Some(node_dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_events_are_handled_once_in_key_order_and_committed_to_the_end() {
    let broker = chaos_broker(4).await;
    let b = broker.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = start_in_process(dir.path(), &b).await;
    rt.registry
        .upload(
            &chaos_manifest("chaos", "1.0.0", "chaos", ""),
            chaos_wasm(),
            true,
        )
        .await
        .unwrap();

    // 1,000 keyed events over 20 keys; every tenth starts a workflow instead of emitting.
    const N: usize = 1000;
    let events: Vec<(Option<Vec<u8>>, Vec<u8>)> = (0..N)
        .map(|i| {
            let payload = if i % 10 == 0 {
                json!({"op": "workflow", "id": format!("w-{i}"), "seq": i})
            } else {
                json!({"op": "emit", "seq": i})
            };
            (
                Some(format!("k{}", i % 20).into_bytes()),
                serde_json::to_vec(&payload).unwrap(),
            )
        })
        .collect();
    produce(&b, "chaos", &events).await;
    // One more event carries a W3C trace context: its emit must continue that trace.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    produce_records(
        &b,
        "chaos",
        &[NewRecord {
            key: Some(b"traced".to_vec()),
            payload: Some(serde_json::to_vec(&json!({"op": "emit", "seq": N})).unwrap()),
            headers: vec![(
                "traceparent".into(),
                format!("00-{trace}-00f067aa0ba902b7-01").into_bytes(),
            )],
            partition: None,
        }],
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    let out = read(&b, "out", 901, Duration::from_secs(60)).await;
    let wf = read(&b, "workflows", 100, Duration::from_secs(30)).await;
    assert_eq!(out.len(), 901, "every emit once");
    assert_eq!(wf.len(), 100, "every workflow once");
    let counts = seq_counts(&out);
    assert!(counts.values().all(|&c| c == 1), "an emit was duplicated");
    assert_key_order(&out);
    for r in &out {
        let seq = payload(r)["seq"].as_u64().unwrap();
        let id = header(r, "spate-idempotency-id").unwrap();
        assert!(id.starts_with("chaos/chaos/"), "{id}");
        assert_eq!(header(r, "spate-plugin"), Some("chaos"));
        assert_eq!(header(r, "spate-plugin-version"), Some("1.0.0"));
        assert!(header(r, "spate-plugin-hash").is_some_and(|h| h.len() == 64));
        assert!(header(r, "traceparent").is_some_and(|t| t.starts_with("00-")));
        if seq == N as u64 {
            let tp = header(r, "traceparent").unwrap();
            assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
            assert_eq!(key(r), "traced");
        } else {
            assert_eq!(
                key(r),
                format!("k{}", seq % 20),
                "emits keyed like the input"
            );
        }
    }
    let mut ids: Vec<String> = wf
        .iter()
        .map(|r| header(r, "spate-idempotency-id").unwrap().to_string())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = (0..N)
        .step_by(10)
        .map(|i| format!("workflow/chaos/chaos-workflow/w-{i}"))
        .collect();
    expected.sort();
    assert_eq!(ids, expected, "workflow idempotency ids");

    wait_committed_to_end(&b, "chaos", Duration::from_secs(20)).await;
    rt.shutdown().await;
    assert_no_dead_letters(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_is_dead_lettered_after_its_attempts_while_the_rest_flows() {
    let broker = chaos_broker(2).await;
    let b = broker.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = start_in_process(dir.path(), &b).await;
    let manifest = chaos_manifest(
        "chaos",
        "1.0.0",
        "chaos",
        "[retry]\nmax-attempts = 4\ninitial-backoff-ms = 20\nmax-backoff-ms = 100\n",
    );
    rt.registry
        .upload(&manifest, chaos_wasm(), true)
        .await
        .unwrap();

    let mut events = op_events(0..100, 10);
    let poison = json!({"op": "retry", "reason": "cannot parse order"});
    events.insert(
        50,
        (
            Some(b"poison".to_vec()),
            serde_json::to_vec(&poison).unwrap(),
        ),
    );
    events.extend(op_events(100..200, 10));
    let positions = produce(&b, "chaos", &events).await;
    let (poison_partition, poison_offset) = positions[50];

    let out = read(&b, "out", 200, Duration::from_secs(60)).await;
    assert_eq!(out.len(), 200, "every other event handled");
    assert!(seq_counts(&out).values().all(|&c| c == 1));
    let dlq = read(&b, "chaos.dlq", 1, Duration::from_secs(30)).await;
    assert_eq!(dlq.len(), 1);
    let d = &dlq[0];
    assert_eq!(d.key.as_deref(), Some(&b"poison"[..]), "original key");
    assert_eq!(payload(d), poison, "original payload");
    assert_eq!(header(d, "spate-dlq-attempts"), Some("4"));
    assert_eq!(header(d, "spate-dlq-kind"), Some("retries-exhausted"));
    assert_eq!(header(d, "spate-dlq-reason"), Some("cannot parse order"));
    assert_eq!(
        header(d, "spate-source"),
        Some(format!("chaos/{poison_partition}/{poison_offset}").as_str())
    );
    assert_eq!(header(d, "spate-plugin-version"), Some("1.0.0"));
    // The partition's committed offset moved past the poison event.
    wait_committed_to_end(&b, "chaos", Duration::from_secs(20)).await;
    let committed = committed_offsets(&b, GROUP, "chaos");
    assert!(committed[poison_partition as usize].unwrap() > poison_offset);
    rt.shutdown().await;
}

/// A Kafka-mode runtime process with test-chaos deployed on `chaos`.
async fn kafka_node(dir: &Path, http: &reqwest::Client, bootstrap: &str) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    let env = kafka_env(bootstrap);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = spawn_node(dir, http, &env).await;
    upload(
        http,
        &node,
        chaos_manifest("chaos", "1.0.0", "chaos", "[limits]\nconcurrency = 16\n"),
    )
    .await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_partitions_a_sigkill_loses_nothing_and_a_new_one_takes_over() {
    let broker = chaos_broker(6).await;
    let b = broker.bootstrap();
    let root = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let dirs: Vec<_> = (0..4).map(|i| root.path().join(format!("n{i}"))).collect();
    let mut nodes = Vec::new();
    for d in &dirs[..3] {
        nodes.push(Some(kafka_node(d, &http, &b).await));
    }
    for (n, d) in nodes.iter().zip(&dirs) {
        wait_assigned(&http, n.as_ref().unwrap(), d).await;
    }

    // 6,000 events over ~6 s; one process is SIGKILLed 2 s in.
    const FIRST: usize = 6000;
    let producer = {
        let b = b.clone();
        tokio::spawn(async move { produce_paced(&b, 0..FIRST, Duration::from_secs(6)).await })
    };
    let mut victim = nodes[1].take().unwrap();
    // Mid-stream, and far enough in that "redo everything" (at least 500) cannot pass;
    // a fixed 2 s sleep could come before a slow box had handled anything.
    wait_handled(&http, &victim, 500).await;
    let handled_by_victim = handled_ok(&http, &victim, "chaos").await;
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    drop(victim);
    producer.await.unwrap();

    let out = read_all_seqs(&b, "out", FIRST, Duration::from_secs(120)).await;
    let counts = seq_counts(&out);
    let missing: Vec<usize> = (0..FIRST)
        .filter(|s| !counts.contains_key(&(*s as u64)))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} events after the SIGKILL, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    eprintln!(
        "SIGKILL of a process that had handled {handled_by_victim} events: {duplicates} duplicated emits"
    );
    // Only events the killed process had read and not committed can be redone: its
    // read-ahead plus what it finished before its last commit. That is a latency, not a
    // count: a few bursts of a commit interval each (a slow commit on a loaded box spans
    // two), never everything the victim had handled.
    assert!(
        duplicates <= 4 * MAX_BUFFERED && (duplicates as u64) < handled_by_victim,
        "{duplicates} duplicates exceed the in-flight bound ({handled_by_victim} handled by the killed process)"
    );
    assert!(handled_by_victim > 0, "the killed process had taken part");

    // A new process joins: partitions rebalance onto it and nothing is lost.
    let newcomer = kafka_node(&dirs[3], &http, &b).await;
    wait_assigned(&http, &newcomer, &dirs[3]).await;
    const SECOND: usize = 3000;
    produce_paced(&b, FIRST..FIRST + SECOND, Duration::from_secs(3)).await;
    let out = read_all_seqs(&b, "out", FIRST + SECOND, Duration::from_secs(120)).await;
    let counts = seq_counts(&out);
    let missing = (0..FIRST + SECOND)
        .filter(|s| !counts.contains_key(&(*s as u64)))
        .count();
    assert_eq!(missing, 0, "events lost after the new process joined");
    let rebalance_duplicates: usize = counts.values().map(|c| c - 1).sum::<usize>() - duplicates;
    eprintln!("a process joining: {rebalance_duplicates} duplicated emits");
    let by_newcomer = handled_ok(&http, &newcomer, "chaos").await;
    assert!(by_newcomer > 0, "the new process was given partitions");
    for n in nodes.iter().flatten() {
        assert!(handled_ok(&http, n, "chaos").await > 0);
    }
    assert_no_dead_letters(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_commits_and_a_restart_duplicates_nothing() {
    let broker = chaos_broker(4).await;
    let b = broker.bootstrap();
    let root = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut node = kafka_node(root.path(), &http, &b).await;
    wait_assigned(&http, &node, root.path()).await;

    const N: usize = 4000;
    let positions = produce(&b, "chaos", &op_events(0..N, 40)).await;
    // Stop it mid-stream.
    let started = Instant::now();
    while handled_ok(&http, &node, "chaos").await < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing handled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = node.child.wait().unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
    drop(node);
    let before = read(&b, "out", N, Duration::from_secs(2)).await.len();
    assert!(before < N, "stopped mid-stream ({before} of {N} handled)");

    let node = kafka_node(root.path(), &http, &b).await;
    let out = read(&b, "out", N, Duration::from_secs(120)).await;
    if out.len() != N {
        let counts = seq_counts(&out);
        let missing: Vec<(usize, (i32, i64))> = (0..N)
            .filter(|s| !counts.contains_key(&(*s as u64)))
            .map(|s| (s, positions[s]))
            .collect();
        eprintln!(
            "missing {}: {:?}\ncommitted {:?} ends {:?}",
            missing.len(),
            &missing[..missing.len().min(20)],
            committed_offsets(&b, GROUP, "chaos"),
            end_offsets(&b, "chaos")
        );
        let log = std::fs::read_to_string(root.path().join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| !l.contains("CONFWARN")).collect();
        eprintln!("{}", lines[lines.len().saturating_sub(80)..].join("\n"));
    }
    // Give a duplicate time to show up, then read everything again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Counted by end offsets (no transactions: one offset per record), then read with a
    // long timeout: a 2 s budget for a full re-read could cut it short on a loaded broker.
    assert_eq!(out.len(), N);
    let written: i64 = end_offsets(&b, "out").iter().sum();
    assert_eq!(written, N as i64, "a restart after SIGTERM redid nothing");
    let out_again = read(&b, "out", N, Duration::from_secs(60)).await;
    assert_eq!(out_again.len(), N, "every emit read back");
    assert!(seq_counts(&out_again).values().all(|&c| c == 1));
    assert_key_order(&out_again);
    wait_committed_to_end(&b, "chaos", Duration::from_secs(20)).await;
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_cut_off_mid_run_loses_nothing_and_the_runtime_resumes_by_itself() {
    let (broker, proxy) = KafkaBroker::start_behind_proxy();
    let b = broker.bootstrap();
    create_chaos_topics(&broker, 4).await;
    let root = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = kafka_node(root.path(), &http, &b).await;
    wait_assigned(&http, &node, root.path()).await;

    const N: usize = 3000;
    produce(&b, "chaos", &op_events(0..N, 30)).await;
    wait_handled(&http, &node, 200).await;
    // Cut the broker off for longer than the produce timeout (3 s): emits fail and are
    // retried as infrastructure failures, never dead-lettered.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = http
        .get(format!("{}/healthz", node.base))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "the runtime kept running");
    proxy.restore();

    assert_nothing_lost(&b, root.path(), N, "the outage").await;
    drop(node);
}

/// A Kafka-mode runtime process with `manifest` deployed and extra `SPATE_*` settings.
async fn kafka_node_with(
    dir: &Path,
    http: &reqwest::Client,
    bootstrap: &str,
    extra_env: &[(&str, &str)],
    manifest: String,
) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    let env = kafka_env(bootstrap);
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.extend_from_slice(extra_env);
    let node = spawn_node(dir, http, &env).await;
    upload(http, &node, manifest).await;
    node
}

/// The backlog users' producers leave: thousands of records per batch. With a
/// per-partition buffer far smaller than a batch, every partition is paused and resumed in
/// the middle of batches over and over; every event is still handled exactly once, in key
/// order, and the committed offsets reach the broker's end offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_input_paused_and_resumed_mid_batch_is_handled_once_in_key_order() {
    let broker = chaos_broker(4).await;
    let b = broker.bootstrap();
    const N: usize = 12_000;
    produce(&b, "chaos", &op_events(0..N, 300)).await;
    let batches: Vec<Vec<(i64, i32)>> = (0..4).map(|p| broker.record_batches("chaos", p)).collect();
    let largest = batches.iter().flatten().map(|(_, n)| *n).max().unwrap_or(0);
    assert!(
        largest >= 1_000,
        "the input was not produced in large batches: {batches:?}"
    );

    let root = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = kafka_node_with(
        root.path(),
        &http,
        &b,
        // Read ahead far more than one partition may hold, so partitions fill and pause.
        &[
            ("SPATE_DISPATCH__MAX_BUFFERED", "1024"),
            ("SPATE_DISPATCH__MAX_BUFFERED_PER_PARTITION", "64"),
        ],
        chaos_manifest("chaos", "1.0.0", "chaos", "[limits]\nconcurrency = 16\n"),
    )
    .await;
    let out = read_all_seqs(&b, "out", N, Duration::from_secs(240)).await;
    let counts = seq_counts(&out);
    let missing: Vec<usize> = (0..N)
        .filter(|s| !counts.contains_key(&(*s as u64)))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} events, e.g. {:?}; node log:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        log_tail(root.path(), 40)
    );
    assert!(
        counts.values().all(|&c| c == 1),
        "an event was handled twice"
    );
    assert_eq!(out.len(), N);
    assert_key_order(&out);
    let pauses = metric(
        &http,
        &node,
        "spate_partition_pauses_total",
        &["plugin=\"chaos\""],
    )
    .await;
    eprintln!("{N} events in batches of up to {largest}: {pauses} partition pauses");
    assert!(
        // Each partition's first delivery is far above 64: it pauses at least once, inside a
        // stored batch, and resumes from an offset inside it.
        pauses >= 4.0,
        "backpressure never paused partitions mid-batch ({pauses} pauses)"
    );
    wait_committed_to_end(&b, "chaos", Duration::from_secs(30)).await;
    assert_no_dead_letters(&b).await;
    drop(node);
}

/// `GET /v1/topics/{topic}` and `spate_consumer_lag` report the broker's real end offsets,
/// for input written in large batches. Each partition starts with an event that fails and
/// is retried after 5 s; with per-partition ordering nothing of the topic is committed
/// meanwhile, so the lag must be exactly every record produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topic_view_and_the_lag_metric_are_the_brokers_end_offsets() {
    let broker = chaos_broker(4).await;
    let b = broker.bootstrap();
    const PER_PARTITION: usize = 1_000;
    let hold = serde_json::to_vec(&json!({"op": "retry", "reason": "hold"})).unwrap();
    let mut records: Vec<NewRecord> = (0..4)
        .map(|p| NewRecord {
            key: Some(format!("hold-{p}").into_bytes()),
            payload: Some(hold.clone()),
            headers: vec![],
            partition: Some(p),
        })
        .collect();
    records.extend((0..4 * PER_PARTITION).map(|i| NewRecord {
        key: Some(format!("k{}", i % 40).into_bytes()),
        payload: Some(serde_json::to_vec(&json!({"op": "emit", "seq": i})).unwrap()),
        headers: vec![],
        // k<n> always lands on partition n % 4.
        partition: Some(i32::try_from(i % 4).unwrap()),
    }));
    produce_records(&b, "chaos", &records, Duration::from_secs(30))
        .await
        .unwrap();
    let ends = end_offsets(&b, "chaos");
    let total = i64::try_from(records.len()).unwrap();
    assert_eq!(ends.iter().sum::<i64>(), total);

    let root = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let manifest = r#"name = "chaos"
version = "1.0.0"
subscriptions = [{ topic = "chaos" }]
ordering = "partition"
[capabilities]
emit-topics = ["out"]
workflows = ["*"]
[retry]
max-attempts = 2
initial-backoff-ms = 5000
max-backoff-ms = 5000
"#;
    let node = kafka_node_with(root.path(), &http, &b, &[], manifest.to_string()).await;

    let view: serde_json::Value = http
        .get(format!("{}/v1/topics/chaos", node.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["partitions"], 4, "{view}");
    assert_eq!(view["end_offsets"], json!(ends), "{view}");

    // The lag is published once a second; while the holds wait (5-10 s from their first
    // attempt) it must show every record. Before the group joins it is absent or 0.
    let started = Instant::now();
    let lag_metric = || {
        metric(
            &http,
            &node,
            "spate_consumer_lag",
            &["plugin=\"chaos\"", "topic=\"chaos\""],
        )
    };
    loop {
        let lag = lag_metric().await;
        if lag == total as f64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the lag never showed the {total} records produced (last {lag}); node log:\n{}",
            log_tail(root.path(), 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // After the holds are dead-lettered, everything flows and the lag falls to 0.
    let out = read_all_seqs(&b, "out", 4 * PER_PARTITION, Duration::from_secs(120)).await;
    assert_eq!(out.len(), 4 * PER_PARTITION);
    wait_committed_to_end(&b, "chaos", Duration::from_secs(30)).await;
    let started = Instant::now();
    while lag_metric().await != 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the lag never fell to 0"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dlq = read(&b, "chaos.dlq", 4, Duration::from_secs(10)).await;
    assert_eq!(dlq.len(), 4, "the four holds are dead-lettered");
    drop(node);
}

/// The broker is killed (SIGKILL) mid-run and restarted on its log directory: the runtime
/// reconnects by itself, nothing is lost and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_mid_run_loses_nothing() {
    let mut broker = chaos_broker(4).await;
    let b = broker.bootstrap();
    let root = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = kafka_node(root.path(), &http, &b).await;
    wait_assigned(&http, &node, root.path()).await;

    const N: usize = 4000;
    produce(&b, "chaos", &op_events(0..N / 2, 40)).await;
    wait_handled(&http, &node, 200).await;
    broker.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart();
    produce(&b, "chaos", &op_events(N / 2..N, 40)).await;

    assert_nothing_lost(&b, root.path(), N, "the broker restart").await;
    drop(node);
}

/// The count job on Kafka with embedded state, its runtime SIGKILLed five times at random
/// points: afterwards every key's count in state equals its number of events, every
/// event's emit is there, a replayed emit repeats its first pass's count (state applied
/// twice would change it), and duplicates stay within what a checkpoint covers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_keeps_state_exactly_once() {
    count_job_killed_five_times(false).await;
}

/// The same with `exactly-once = true`: a `read_committed` reader (the default) sees
/// every event's emit exactly once, and the committed positions reach the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_with_exactly_once_duplicates_no_emit() {
    count_job_killed_five_times(true).await;
}

async fn count_job_killed_five_times(exactly_once: bool) {
    use spate_core::StateStore;
    const TOTAL: usize = 8000;
    const KEYS: usize = 40;
    let broker = chaos_broker(4).await;
    let b = broker.bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let records: Vec<(Option<Vec<u8>>, Vec<u8>)> = (0..TOTAL)
        .map(|i| {
            (
                Some(format!("k{}", i % KEYS).into_bytes()),
                serde_json::to_vec(&json!({"op": "count", "seq": i})).unwrap(),
            )
        })
        .collect();
    produce(&b, "chaos", &records).await;
    let mut node = if exactly_once {
        let manifest = "name = \"chaos\"\nversion = \"1.0.0\"\nexactly-once = true\n\
                        subscriptions = [{ topic = \"chaos\" }]\n\
                        [capabilities]\nemit-topics = [\"out\"]\n[limits]\nconcurrency = 16\n";
        kafka_node_with(dir.path(), &http, &b, &[], manifest.to_string()).await
    } else {
        kafka_node(dir.path(), &http, &b).await
    };
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    eprintln!("kill seed {seed}");
    let mut kills = 0;
    while kills < 5 {
        wait_handled(&http, &node, 100).await;
        if end_offsets(&b, "out").iter().sum::<i64>() >= TOTAL as i64 {
            break;
        }
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(10 + (seed >> 33) % 200)).await;
        node.child.kill().unwrap();
        node.child.wait().unwrap();
        kills += 1;
        drop(node);
        let env = kafka_env(&b);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        node = spawn_node(dir.path(), &http, &env).await;
    }
    assert!(
        kills >= 3,
        "killed mid-stream at least 3 times, got {kills}"
    );
    let out = if exactly_once {
        // Transaction markers and aborted emits count in the end offsets but are never
        // read: read until every emit arrived, then look for more.
        let bb = b.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            loop {
                let out = consume_all(&bb, "out", TOTAL + 1, Duration::from_secs(10));
                if out.len() >= TOTAL || started.elapsed() > Duration::from_secs(180) {
                    return out;
                }
            }
        })
        .await
        .unwrap()
    } else {
        read_all_seqs(&b, "out", TOTAL, Duration::from_secs(180)).await
    };
    wait_committed_to_end_of(&b, "chaos", Duration::from_secs(60), Some(dir.path())).await;
    let mut n_of: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &out {
        let p = payload(r);
        let (seq, n) = (p["seq"].as_u64().unwrap(), p["n"].as_u64().unwrap());
        let first = *n_of.entry(seq).or_insert(n);
        assert_eq!(
            first, n,
            "seq {seq} emitted with counts {first} and {n}: state applied twice"
        );
    }
    assert_eq!(n_of.len(), TOTAL, "every event's emit is present");
    let per = (TOTAL / KEYS) as u64;
    let mut per_key: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (seq, n) in &n_of {
        per_key.entry(seq % KEYS as u64).or_default().push(*n);
    }
    for (k, mut ns) in per_key {
        ns.sort_unstable();
        assert_eq!(ns, (1..=per).collect::<Vec<_>>(), "counts emitted for k{k}");
    }
    let duplicates = out.len() - TOTAL;
    eprintln!(
        "{kills} SIGKILLs (exactly-once: {exactly_once}): {duplicates} duplicated emits of {TOTAL}"
    );
    if exactly_once {
        assert_eq!(duplicates, 0, "a read_committed reader saw emits twice");
        // Commit markers (and aborted emits) take offsets of their own: the emits did go
        // out in transactions.
        let ends: i64 = end_offsets(&b, "out").iter().sum();
        assert!(
            ends > TOTAL as i64,
            "no transaction markers in `out` ({ends} offsets)"
        );
    } else {
        assert!(
            duplicates <= kills * 2000,
            "{duplicates} duplicates: more than a checkpoint's worth per kill"
        );
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(node.child.wait().unwrap().success());
    drop(node);
    let state =
        spate_core::state::EmbeddedStateStore::open(&dir.path().join("data/state")).unwrap();
    for k in 0..KEYS {
        let v = state.get("chaos", &format!("count/k{k}")).await.unwrap();
        let n: u64 = String::from_utf8(v.unwrap()).unwrap().parse().unwrap();
        assert_eq!(n, per, "state count of k{k} after {kills} SIGKILLs");
    }
}

/// A park-key test-chaos manifest on `chaos`: `max-writes` decides whether the poison (a
/// `put-many` of three keys) fails (1) or not (8); a `retry` op is tried 3 times, 8 s apart.
fn park_manifest(version: &str, max_writes: u32) -> String {
    chaos_manifest(
        "chaos",
        version,
        "chaos",
        &format!(
            "[limits]\nconcurrency = 16\nmax-writes = {max_writes}\n\
             [retry]\nmax-attempts = 3\ninitial-backoff-ms = 8000\nmax-backoff-ms = 8000\n"
        ),
    )
    .replacen(
        "subscriptions",
        "on-failure = \"park-key\"\nsubscriptions",
        1,
    )
}

async fn api(
    http: &reqwest::Client,
    node: &Node,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = http
        .request(method, format!("{}{path}", node.base))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// The parked keys of `chaos`, by key, as the API lists them.
async fn parked(http: &reqwest::Client, node: &Node) -> BTreeMap<String, serde_json::Value> {
    let (status, body) = api(
        http,
        node,
        reqwest::Method::GET,
        "/v1/plugins/chaos/parked",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["key"].as_str().unwrap().to_owned(), k.clone()))
        .collect()
}

async fn wait_parked<F: Fn(&BTreeMap<String, serde_json::Value>) -> bool>(
    http: &reqwest::Client,
    node: &Node,
    dir: &Path,
    what: &str,
    done: F,
) -> BTreeMap<String, serde_json::Value> {
    let started = Instant::now();
    loop {
        let keys = parked(http, node).await;
        if done(&keys) {
            return keys;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{what}: parked now {keys:?}; log: {}",
            log_tail(dir, 40)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `on-failure = "park-key"` on Kafka with the state in Apache Cassandra, across real
/// processes: a failing key parks while 10,000 events of other keys flow; the process is
/// SIGKILLed mid-park and restarted while a second one joins (a rebalance); the parked
/// key, its queue and a retried event's attempt count survive both; after the fix a redrive
/// handles the key's events once, in order; a second redrive does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_key_survives_sigkill_and_rebalance_and_redrives_once() {
    use support::node::{cql_state_config_with_keyspace, spawn_node_with};
    let broker = chaos_broker(4).await;
    let b = broker.bootstrap();
    let root = tempfile::tempdir().unwrap();
    let (config, keyspace) = cql_state_config_with_keyspace(root.path());
    let env = kafka_env(&b);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let http = reqwest::Client::new();
    let (d1, d2) = (root.path().join("n1"), root.path().join("n2"));
    for d in [&d1, &d2] {
        std::fs::create_dir_all(d).unwrap();
    }
    let n1 = spawn_node_with(&d1, &http, &env, Some(&config)).await;
    upload(&http, &n1, park_manifest("1.0.0", 1)).await;
    wait_assigned(&http, &n1, &d1).await;

    // 10,000 events of 50 other keys (`count`, one emit each, seq 0..10,000); the bad
    // key: two counts, the poison, two counts; a key whose event always asks for a retry.
    const OTHERS: usize = 10_000;
    let count = |seq: usize, key: String| {
        (
            Some(key.into_bytes()),
            serde_json::to_vec(&json!({"op": "count", "seq": seq})).unwrap(),
        )
    };
    let bad =
        |payload: serde_json::Value| (Some(b"bad".to_vec()), serde_json::to_vec(&payload).unwrap());
    let mut first: Vec<_> = (0..OTHERS / 2)
        .map(|i| count(i, format!("k{}", i % 50)))
        .collect();
    first.insert(100, bad(json!({"op": "count", "seq": 20_000})));
    first.insert(200, bad(json!({"op": "count", "seq": 20_001})));
    first.insert(
        300,
        bad(json!({"op": "put-many", "count": 3, "bytes": 4, "seq": 20_002})),
    );
    first.insert(400, bad(json!({"op": "count", "seq": 20_003})));
    first.insert(
        500,
        (
            Some(b"r".to_vec()),
            serde_json::to_vec(&json!({"op": "retry", "seq": 30_000})).unwrap(),
        ),
    );
    produce(&b, "chaos", &first).await;
    let keys = wait_parked(&http, &n1, &d1, "the bad key parked", |k| {
        k.get("bad").is_some_and(|b| b["events"] == json!(2))
    })
    .await;
    assert!(
        keys["bad"]["first_reason"]
            .as_str()
            .unwrap()
            .contains("max-writes")
    );
    // The retried event failed once and waits 8 s for its second attempt: kill now.
    let started = Instant::now();
    while metric(&http, &n1, "spate_retries_total", &["plugin=\"chaos\""]).await < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(60), "no retry");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its attempt record must be durable before the kill: the counter moves before the
    // record is even applied, and the record lands with a checkpoint, which a loaded box
    // can take longer than any fixed wait to write. Only `r` is retried (the poison fails
    // a limit, which is not retried), so any `a/` entry is its record.
    let store = spate_state_cql::CqlStateStore::connect(spate_state_cql::CqlOptions {
        nodes: vec![spate_conformance::cassandra::cql_node()],
        keyspace,
        // The node created it; no DDL from here.
        create_schema: false,
        request_timeout: Duration::from_secs(30),
        ..spate_state_cql::CqlOptions::default()
    })
    .await
    .unwrap();
    let ns = spate_core::state::parked::namespace("chaos");
    let started = Instant::now();
    while spate_core::StateStore::scan(&store, &ns, "a/", 10)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the retried event's attempt record never reached the store; log: {}",
            log_tail(&d1, 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retries_before = metric(&http, &n1, "spate_retries_total", &["plugin=\"chaos\""]).await;
    let mut n1 = n1;
    n1.child.kill().unwrap();
    n1.child.wait().unwrap();
    drop(n1);

    // Restart it, and a second process joins: the partitions are spread over both.
    let n1 = spawn_node_with(&d1, &http, &env, Some(&config)).await;
    let n2 = spawn_node_with(&d2, &http, &env, Some(&config)).await;
    upload(&http, &n2, park_manifest("1.0.0", 1)).await;
    wait_assigned(&http, &n2, &d2).await;
    let mut second: Vec<_> = (OTHERS / 2..OTHERS)
        .map(|i| count(i, format!("k{}", i % 50)))
        .collect();
    second.insert(1_000, bad(json!({"op": "count", "seq": 20_004})));
    produce(&b, "chaos", &second).await;

    let out = read_all_seqs(&b, "out", OTHERS, Duration::from_secs(180)).await;
    let counts = seq_counts(&out);
    let lost = (0..OTHERS as u64)
        .filter(|s| !counts.contains_key(s))
        .count();
    assert_eq!(lost, 0, "events of other keys lost");
    // The retried event went on from its attempt: 2 and 3 after the restart, then parked.
    let keys = wait_parked(
        &http,
        &n2,
        &d2,
        "the retried key parked and the late event queued",
        |k| k.contains_key("r") && k.get("bad").is_some_and(|b| b["events"] == json!(3)),
    )
    .await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    let (_, r) = api(
        &http,
        &n1,
        reqwest::Method::GET,
        "/v1/plugins/chaos/parked/r",
        None,
    )
    .await;
    assert_eq!(r["events"][0]["attempts"], json!(3), "{r}");
    let retries_after = metric(&http, &n1, "spate_retries_total", &["plugin=\"chaos\""]).await
        + metric(&http, &n2, "spate_retries_total", &["plugin=\"chaos\""]).await;
    assert_eq!(
        (retries_before, retries_before + retries_after),
        (1.0, 2.0),
        "3 attempts in all across the SIGKILL (starting over would have retried twice more)"
    );
    let bad_emits = |out: &[Record]| -> Vec<u64> {
        out.iter()
            .filter(|r| key(r) == "bad")
            .filter_map(|r| payload(r)["n"].as_u64())
            .collect()
    };
    assert_eq!(
        bad_emits(&out),
        [1, 2],
        "only the bad key's events before the poison"
    );

    // The fix, on both processes; a redrive through either; the key's events once, in order.
    upload(&http, &n1, park_manifest("2.0.0", 8)).await;
    upload(&http, &n2, park_manifest("2.0.0", 8)).await;
    let (status, filed) = api(
        &http,
        &n2,
        reqwest::Method::POST,
        "/v1/plugins/chaos/parked/redrive",
        Some(json!({"keys": ["bad"]})),
    )
    .await;
    assert_eq!(status, 202, "{filed}");
    let (status, filed) = api(
        &http,
        &n1,
        reqwest::Method::POST,
        "/v1/plugins/chaos/parked/discard",
        Some(json!({"keys": ["r"]})),
    )
    .await;
    assert_eq!(status, 202, "{filed}");
    wait_parked(&http, &n1, &d1, "both keys unparked", BTreeMap::is_empty).await;
    let dlq = read(&b, "chaos.dlq", 1, Duration::from_secs(30)).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(header(&dlq[0], "spate-dlq-kind"), Some("discarded"));
    assert_eq!(key(&dlq[0]), "r");

    // The poison's emit and the two counts after it (n = 3, 4), in order, each once.
    let started = Instant::now();
    let out = loop {
        let out = read_all_seqs(&b, "out", OTHERS, Duration::from_secs(30)).await;
        if bad_emits(&out).len() >= 4 || started.elapsed() > Duration::from_secs(60) {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        bad_emits(&out),
        [1, 2, 3, 4],
        "in order, once, on the state of all earlier ones"
    );
    let poison = out
        .iter()
        .find(|r| key(r) == "bad" && payload(r).get("put").is_some())
        .expect("the poison's emit");
    assert_eq!(header(poison, "spate-plugin-version"), Some("2.0.0"));
    let source = header(poison, "spate-source").unwrap().to_owned();
    assert!(source.starts_with("chaos/"), "{source}");

    // A second redrive finds nothing to do and emits nothing.
    let (status, filed) = api(
        &http,
        &n2,
        reqwest::Method::POST,
        "/v1/plugins/chaos/parked/redrive",
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(status, 202, "{filed}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = read_all_seqs(&b, "out", OTHERS, Duration::from_secs(30)).await;
    assert_eq!(bad_emits(&out), [1, 2, 3, 4], "nothing twice");
    let poison_emits = out
        .iter()
        .filter(|r| key(r) == "bad" && payload(r).get("put").is_some())
        .count();
    assert_eq!(poison_emits, 1, "the poison's emit once");
    for (n, d) in [(&n1, &d1), (&n2, &d2)] {
        assert!(
            handled_ok(&http, n, "chaos").await > 0,
            "{}",
            log_tail(d, 20)
        );
    }
}
