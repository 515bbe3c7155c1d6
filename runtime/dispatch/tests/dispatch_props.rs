//! Property tests of the dispatcher against the embedded log with a native handler: per-key
//! FIFO under concurrency, and a commit watermark that ends at the end of every partition.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use proptest::prelude::*;
use spate_core::host::Invocation;
use spate_core::manifest::{LimitCeilings, Manifest};
use spate_core::state::tiered::StateTier;
use spate_core::test_kit::{FnPlugin, echo};
use spate_core::{EventBus, EventSource};
use spate_core::{NewEvent, StateStore};
use spate_core::{
    cache::MokaCache,
    events::{EmbeddedLog, LogConfig},
    state::EmbeddedStateStore,
};
use spate_dispatch::{
    ActiveVersion, CallOutcome, DispatchContext, DispatchSettings, Pipeline, PluginVersion,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// `version`'s one pipeline (its manifest subscribes to one topic), built from `cx` as
/// the supervisor builds it; it stops when `cx.shutdown` is cancelled.
fn pipeline(cx: &DispatchContext, version: Arc<dyn PluginVersion>) -> Pipeline {
    let name = version.info().name().to_owned();
    let mut pipelines = cx.pipelines(&name, &ActiveVersion::new(version), &cx.shutdown);
    assert_eq!(pipelines.len(), 1);
    pipelines.remove(0)
}

/// Emits its input payload to `out`, after a delay the payload's first byte chooses, so
/// lanes finish out of order.
async fn delayed_echo(inv: Invocation) -> CallOutcome {
    let delay = inv.event().payload.first().copied().unwrap_or(0) % 4;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
    }
    echo(inv, "out")
}

fn manifest() -> Manifest {
    Manifest::parse(
        r#"
name = "echo"
version = "1.0.0"
subscriptions = [{ topic = "in" }]
[capabilities]
emit-topics = ["out"]
[limits]
concurrency = 8
"#,
        &LimitCeilings::default(),
    )
    .unwrap()
}

async fn run_case(events: Vec<(u8, u8)>) {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
    let state: Arc<dyn StateStore> = EmbeddedStateStore::open(&dir.path().join("state")).unwrap();
    let bus: Arc<dyn EventBus> = log.clone();
    let source: Arc<dyn EventSource> = log.clone();
    // payload = [delay, key, seq-hi, seq-lo]
    let mut per_key_sent: HashMap<u8, Vec<u16>> = HashMap::new();
    let batch: Vec<NewEvent> = events
        .iter()
        .enumerate()
        .map(|(i, (key, delay))| {
            let seq = i as u16;
            per_key_sent.entry(*key).or_default().push(seq);
            NewEvent {
                key: Some(vec![*key]),
                payload: vec![*delay, *key, (seq >> 8) as u8, seq as u8],
                headers: vec![],
            }
        })
        .collect();
    bus.append("in", batch).await.unwrap();

    let version: Arc<dyn PluginVersion> = FnPlugin::with_manifest(manifest(), delayed_echo);
    let cx = DispatchContext::new(
        source.clone(),
        bus.clone(),
        StateTier::direct(state),
        Arc::new(MokaCache::new(1 << 20)),
        DispatchSettings {
            commit_interval: Duration::from_millis(5),
            max_buffered: 16, // small, so backpressure is exercised too
            ..DispatchSettings::default()
        },
    );
    let shutdown = cx.shutdown.clone();
    let pipeline = pipeline(&cx, version);
    let task = tokio::spawn(async move { pipeline.run().await });

    let ends = bus.end_offsets("in").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let committed = source.committed("spate.echo", "in").await.unwrap();
        let done = committed
            .iter()
            .zip(&ends)
            .all(|(c, e)| c.unwrap_or(0) == *e);
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "commits never reached the end: {committed:?} vs {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let mut got: HashMap<u8, Vec<u16>> = HashMap::new();
    let parts = bus.partitions("out").await.unwrap().unwrap_or(0);
    for p in 0..parts {
        for e in bus.read("out", p, 0, 100_000).await.unwrap() {
            let seq = (u16::from(e.payload[2]) << 8) | u16::from(e.payload[3]);
            got.entry(e.payload[1]).or_default().push(seq);
        }
    }
    assert_eq!(got, per_key_sent, "every event once, in per-key order");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn per_key_fifo_and_watermark_reach_the_end(
        events in proptest::collection::vec((0u8..6, 0u8..8), 1..120)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_case(events));
    }
}

/// Panics in the host on payload `b"boom"`; emits otherwise.
async fn panicky(inv: Invocation) -> CallOutcome {
    assert!(inv.event().payload != b"boom", "host bug on this event");
    echo(inv, "out")
}

/// A panic while handling one event is that event's failure (retried, then dead-lettered);
/// its lane and every other lane keep going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_panic_dead_letters_the_event_and_the_lane_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
    let state: Arc<dyn StateStore> = EmbeddedStateStore::open(&dir.path().join("state")).unwrap();
    let bus: Arc<dyn EventBus> = log.clone();
    let mut m = manifest();
    m.retry.max_attempts = 2;
    m.retry.initial_backoff_ms = 1;
    let version: Arc<dyn PluginVersion> = FnPlugin::with_manifest(m, panicky);
    let events = ["a", "boom", "b"]
        .iter()
        .map(|p| NewEvent {
            key: Some(b"k".to_vec()),
            payload: p.as_bytes().to_vec(),
            headers: vec![],
        })
        .collect();
    bus.append("in", events).await.unwrap();
    let cx = DispatchContext::new(
        log.clone(),
        bus.clone(),
        StateTier::direct(state),
        Arc::new(MokaCache::new(1 << 20)),
        DispatchSettings::default(),
    );
    let shutdown = cx.shutdown.clone();
    let pipeline = pipeline(&cx, version);
    let task = tokio::spawn(async move { pipeline.run().await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out: u64 = bus
            .end_offsets("out")
            .await
            .unwrap_or_default()
            .iter()
            .sum();
        let dlq: u64 = bus
            .end_offsets("echo.dlq")
            .await
            .unwrap_or_default()
            .iter()
            .sum();
        if out == 2 && dlq == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "out={out} dlq={dlq}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let parts = bus.partitions("echo.dlq").await.unwrap().unwrap();
    let mut dead = Vec::new();
    for p in 0..parts {
        dead.extend(bus.read("echo.dlq", p, 0, 10).await.unwrap());
    }
    let reason = spate_core::types::header_str(&dead[0].headers, "spate-dlq-reason").unwrap();
    assert!(reason.contains("host bug on this event"), "{reason}");
}
