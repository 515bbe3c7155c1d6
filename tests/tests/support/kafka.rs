//! Kafka helpers of the end-to-end tests: runtime processes configured for a broker,
//! keyed test-chaos input, and reading back what the runtimes emitted.

use super::node::{Node, metric};
use serde_json::{Value, json};
use spate_conformance::kafka::{Record, committed_offsets, consume_all, end_offsets, produce};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The same settings as `SPATE_*` variables, for runtime processes.
pub fn kafka_env(bootstrap: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SPATE_EVENTS__TYPE", "kafka".into()),
        ("SPATE_EVENTS__BOOTSTRAP_SERVERS", bootstrap.into()),
        ("SPATE_EVENTS__SESSION_TIMEOUT_MS", "6000".into()),
        ("SPATE_EVENTS__REVOKE_TIMEOUT_MS", "5000".into()),
        ("SPATE_EVENTS__PRODUCE_TIMEOUT_MS", "3000".into()),
        ("SPATE_EVENTS__REQUEST_TIMEOUT_MS", "3000".into()),
        ("SPATE_DISPATCH__MAX_BUFFERED", MAX_BUFFERED.to_string()),
        ("SPATE_DISPATCH__DRAIN_TIMEOUT_MS", "10000".into()),
        (
            "RUST_LOG",
            std::env::var("SPATE_TEST_NODE_LOG").unwrap_or("warn,spate_kafka=info".into()),
        ),
    ]
}

/// Events a process reads ahead of what it has finished: what a SIGKILL can redo.
pub const MAX_BUFFERED: usize = 100;

pub fn op_events(range: std::ops::Range<usize>, keys: usize) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    range
        .map(|i| {
            let payload = json!({"op": "emit", "seq": i});
            (
                Some(format!("k{}", i % keys).into_bytes()),
                serde_json::to_vec(&payload).unwrap(),
            )
        })
        .collect()
}

pub fn payload(r: &Record) -> Value {
    r.payload
        .as_deref()
        .and_then(|p| serde_json::from_slice(p).ok())
        .unwrap_or(Value::Null)
}

pub fn header<'a>(r: &'a Record, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

pub fn key(r: &Record) -> String {
    String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned()
}

/// Read `topic` until it holds `n` records (or `timeout`), off the async threads.
pub async fn read(bootstrap: &str, topic: &str, n: usize, timeout: Duration) -> Vec<Record> {
    let (b, t) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || consume_all(&b, &t, n, timeout))
        .await
        .unwrap()
}

/// Read all of `topic` until it holds every seq below `total` (duplicates do not count
/// towards it) or `timeout` passes; returns what it holds then.
pub async fn read_all_seqs(
    bootstrap: &str,
    topic: &str,
    total: usize,
    timeout: Duration,
) -> Vec<Record> {
    let started = Instant::now();
    loop {
        let (b, t) = (bootstrap.to_string(), topic.to_string());
        let records = tokio::task::spawn_blocking(move || {
            let n: i64 = end_offsets(&b, &t).iter().sum();
            consume_all(&b, &t, n as usize, Duration::from_secs(30))
        })
        .await
        .unwrap();
        let counts = seq_counts(&records);
        if (0..total as u64).all(|s| counts.contains_key(&s)) || started.elapsed() > timeout {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The last `n` lines of a runtime process's log, for failure messages.
pub fn log_tail(dir: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(dir.join("node.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Wait until consumer group `group`'s committed offsets on `topic` equal the topic's end
/// offsets, with the tail of `node_dir`'s log (if given) in the failure message.
pub async fn wait_group_at_end(
    bootstrap: &str,
    group: &str,
    topic: &str,
    timeout: Duration,
    node_dir: Option<&Path>,
) {
    let started = Instant::now();
    loop {
        let (b, g, t) = (bootstrap.to_string(), group.to_string(), topic.to_string());
        let (ends, committed) = tokio::task::spawn_blocking(move || {
            (end_offsets(&b, &t), committed_offsets(&b, &g, &t))
        })
        .await
        .unwrap();
        let committed: Vec<i64> = committed.iter().map(|c| c.unwrap_or(0)).collect();
        if committed == ends {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "{group}'s committed offsets {committed:?} never reached the end offsets {ends:?}; node log:\n{}",
            node_dir.map(|d| log_tail(d, 80)).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Seqs of `records`, with how many times each appears.
pub fn seq_counts(records: &[Record]) -> HashMap<u64, usize> {
    let mut counts = HashMap::new();
    for r in records {
        if let Some(seq) = payload(r)["seq"].as_u64() {
            *counts.entry(seq).or_insert(0) += 1;
        }
    }
    counts
}

/// Wait until `node` has been assigned partitions (its consumer joined the group).
pub async fn wait_assigned(http: &reqwest::Client, node: &Node, dir: &Path) {
    let started = Instant::now();
    while metric(
        http,
        node,
        "spate_kafka_rebalances_total",
        &["kind=\"assign\""],
    )
    .await
        < 1.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never assigned partitions; log: {}",
            std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Produce `range` in chunks, paced over roughly `over`.
pub async fn produce_paced(bootstrap: &str, range: std::ops::Range<usize>, over: Duration) {
    let chunks = 20;
    let size = range.len().div_ceil(chunks);
    let pause = over / chunks as u32;
    let mut start = range.start;
    while start < range.end {
        let end = (start + size).min(range.end);
        produce(bootstrap, "chaos", &op_events(start..end, 50)).await;
        start = end;
        tokio::time::sleep(pause).await;
    }
}
