//! The effect-record scenario shared by the embedded (`replay.rs`) and the Cassandra
//! (`cluster.rs`) runs: a plugin keeping an effect record replays through the same version
//! with no differences (the recorded reads are served again, so a read of a key changed
//! since still sees what it saw), and through a changed version shows exactly the events
//! whose effects change, and how; a replay applies, emits and commits nothing.

use super::*;
use axum::http::StatusCode;
use serde_json::{Value, json};
use spate::api::replay::ReplayReport;
use spate_core::host::record::{Bytes, Outcome, Verdict};

pub const WAIT: Duration = Duration::from_secs(30);
pub const RECORD: &str = "[record]\nenabled = true\n";

/// `POST /v1/plugins/{plugin}/replay` with `body`; asserts a 200.
pub async fn replay(app: &axum::Router, plugin: &str, body: Value) -> ReplayReport {
    let (status, answer) = api(
        app,
        "POST",
        &format!("/v1/plugins/{plugin}/replay"),
        Some(body),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    serde_json::from_value(answer).unwrap()
}

/// Deploys plugin `rec` keeping an effect record on `rt`, sends it eight events of every
/// kind, and replays them through the same version and a changed one. Returns the router
/// it used.
pub async fn record_and_replay(rt: &Arc<Runtime>) -> axum::Router {
    let app = spate::api::router(spate::api::ApiState::new(
        rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    let bus = &rt.backends.bus;
    rt.registry
        .upload(
            &chaos_manifest("rec", "1.0.0", "in", RECORD),
            chaos_wasm(),
            true,
        )
        .await
        .unwrap();
    // One key, so one partition in order: offsets 0..8.
    let inputs = [
        json!({"op": "put", "key": "a", "value": "1"}),
        json!({"op": "get", "key": "a"}),
        json!({"op": "put-many", "count": 3, "bytes": 4}),
        json!({"op": "cache", "key": "c", "value": "v"}),
        json!({"op": "emit", "n": 7}),
        json!({"op": "put", "key": "a", "value": "2"}),
        json!({"op": "reject", "reason": "no thanks"}),
        // Its own counter: what event 3 counted may or may not be in the cache yet when
        // it runs (cache writes land at the checkpoint).
        json!({"op": "cache", "key": "c", "value": "w", "counter": "d"}),
    ];
    for input in &inputs {
        send(bus, "in", "k", input.clone()).await;
    }
    // put, get, cache, emit, put, cache emit one each; the reject is dead-lettered.
    wait_events(bus, "out", 6, WAIT).await;
    wait_events(bus, "rec.dlq", 1, WAIT).await;
    let ns = spate_core::host::record::namespace("rec");
    let deadline = std::time::Instant::now() + WAIT;
    while state_of(rt, &ns).await.len() < inputs.len() {
        assert!(std::time::Instant::now() < deadline, "records not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // On Cassandra a checkpoint writes the record namespace before the plugin's own, and
    // commits the position after both: wait for the position to cover every input (one
    // key, so one partition), or `state_before` could miss the last checkpoint's writes.
    let group = format!("{}.rec", rt.config.events.group_prefix());
    while super::cluster::committed(rt, &group, "in")
        .await
        .iter()
        .sum::<u64>()
        < inputs.len() as u64
    {
        assert!(
            std::time::Instant::now() < deadline,
            "inputs never committed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state_before = state_of(rt, "rec").await;
    let out_before = read_all(bus, "out").await.len();

    // The same version: no differences, every event recorded.
    let same = replay(&app, "rec", json!({})).await;
    assert_eq!(same.version, "1.0.0");
    assert_eq!(same.events.len(), inputs.len());
    assert_eq!(
        (same.same, same.differing, same.unrecorded),
        (8, 0, 0),
        "{same:#?}"
    );
    let rejected = &same.events[6];
    assert!(
        matches!(&rejected.recorded.as_ref().unwrap().outcome, Outcome::Failed { kind, then, .. } if kind == "rejected" && then == "dead-lettered"),
        "{rejected:#?}"
    );
    // The get alone, after `a` changed to 2: it still reads what it read then.
    let p = same.events[1].replayed.partition;
    let get = replay(&app, "rec", json!({ "event": format!("in/{p}/1") })).await;
    assert_eq!(get.events.len(), 1);
    assert!(get.events[0].diff.as_ref().unwrap().is_same(), "{get:#?}");
    assert_eq!(
        get.events[0].replayed.emits[0].payload,
        Bytes::Text(r#"{"key":"a","value":"1"}"#.into())
    );

    // A changed version (not active): at most 2 writes an event, another cache prefix.
    let v2 = chaos_manifest(
        "rec",
        "2.0.0",
        "in",
        &format!("cache-prefix = \"v2:\"\n[limits]\nmax-writes = 2\n{RECORD}"),
    );
    rt.registry.upload(&v2, chaos_wasm(), false).await.unwrap();
    let changed = replay(&app, "rec", json!({"version": "2.0.0", "from_offset": 0})).await;
    assert_eq!(changed.version, "2.0.0");
    let verdicts: Vec<(u64, Vec<Verdict>)> = changed
        .events
        .iter()
        .map(|e| (e.replayed.offset, e.diff.clone().unwrap().verdicts))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (0, vec![Verdict::Same]),
            (1, vec![Verdict::Same]),
            // The limit fails it: nothing written, nothing emitted.
            (
                2,
                vec![
                    Verdict::OutcomeDiffers,
                    Verdict::StateDiffers,
                    Verdict::EmitsDiffer,
                ],
            ),
            (3, vec![Verdict::CacheDiffers]),
            (4, vec![Verdict::Same]),
            (5, vec![Verdict::Same]),
            (6, vec![Verdict::Same]),
            (7, vec![Verdict::CacheDiffers]),
        ],
        "{changed:#?}"
    );
    assert_eq!((changed.same, changed.differing), (5, 3));
    let limit = &changed.events[2];
    assert!(
        matches!(&limit.replayed.outcome, Outcome::Failed { kind, .. } if kind == "limit"),
        "{limit:#?}"
    );
    let cache = &changed.events[3].diff.as_ref().unwrap().differences[0];
    assert!(cache.recorded.to_string().contains("rec:c"), "{cache:?}");
    assert!(cache.replayed.to_string().contains("v2:c"), "{cache:?}");

    // Nothing applied, emitted or committed.
    assert_eq!(state_of(rt, "rec").await, state_before);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(read_all(bus, "out").await.len(), out_before);
    assert_eq!(
        rt.registry
            .active("rec")
            .unwrap()
            .info()
            .manifest
            .version
            .to_string(),
        "1.0.0"
    );

    app
}
