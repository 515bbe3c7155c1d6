//! Shadow versions on the embedded log, through the real HTTP router: a candidate runs on
//! the active version's events in capture mode (its state namespace stays empty, it emits
//! nothing) and its report counts what it compared; a candidate that differs is reported
//! event by event; promoting makes it active.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use axum::http::StatusCode;
use serde_json::json;
use spate::api::plugins::ShadowReport;
use spate_core::NewEvent;
use spate_core::host::record::{Outcome, Verdict};
use spate_core::types::headers;
use std::time::{Duration, Instant};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

async fn report(app: &axum::Router, plugin: &str) -> ShadowReport {
    let (status, body) = api(app, "GET", &format!("/v1/plugins/{plugin}/shadow"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_value(body).unwrap()
}

/// Waits until this runtime's pipelines run `candidate` (the registry names it at once;
/// the pipelines follow a moment later), so every event sent after it reaches it.
async fn running(h: &Harness, plugin: &str, candidate: &str) {
    let deadline = Instant::now() + WAIT;
    while h.rt.shadow_report(plugin).map(|r| r.candidate).as_deref() != Some(candidate) {
        assert!(Instant::now() < deadline, "{candidate} never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the candidate has compared or skipped `n` events.
async fn settled(app: &axum::Router, plugin: &str, n: u64) -> ShadowReport {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = report(app, plugin).await;
        if r.compared + r.skipped >= n {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} seen: {r:?}",
            r.compared + r.skipped
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn send(h: &Harness, range: std::ops::Range<u64>) {
    let events: Vec<NewEvent> = range
        .map(|i| {
            // Every event emits; nine in ten write state too.
            let payload = if i % 10 == 0 {
                json!({"op": "emit", "n": i})
            } else {
                json!({"op": "put-many", "count": 1, "bytes": 3, "prefix": format!("p{i}")})
            };
            NewEvent {
                key: Some(format!("k{}", i % 50).into_bytes()),
                payload: serde_json::to_vec(&payload).unwrap(),
                headers: Vec::new(),
            }
        })
        .collect();
    for chunk in events.chunks(1000) {
        h.bus().append("in", chunk.to_vec()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_candidate_changes_nothing_and_reports_how_it_differs() {
    let h = Harness::start().await;
    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    h.deploy(&chaos_manifest("sh", "1.0.0", "in", ""), chaos_wasm())
        .await;
    let (status, body) = api(&app, "GET", "/v1/plugins/sh/shadow", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.to_string().contains("--shadow"), "{body}");

    // The same code writing to a namespace of its own: any write that leaked would land
    // there, any emit that leaked would double `out`.
    let same = chaos_manifest("sh", "1.1.0", "in", "state-namespace = \"sh-shadow\"\n");
    h.rt.registry
        .upload(&same, chaos_wasm(), false)
        .await
        .unwrap();
    h.rt.registry.set_shadow("sh", Some("1.1.0")).await.unwrap();
    let r = report(&app, "sh").await;
    assert_eq!(r.candidate, "1.1.0");
    running(&h, "sh", "1.1.0").await;
    send(&h, 0..10_000).await;
    let out = h.wait_events("out", 10_000, WAIT).await;
    let r = settled(&app, "sh", 10_000).await;
    assert_eq!(r.compared + r.skipped, 10_000, "{r:?}");
    assert_eq!(r.runtimes, std::slice::from_ref(&h.rt.instance), "{r:?}");
    assert!(r.compared > 0, "{r:?}");
    assert_eq!(
        (r.identical, r.differing, r.traps),
        (r.compared, 0, 0),
        "{r:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.events("out").await.len(),
        10_000,
        "the candidate emitted nothing"
    );
    assert!(
        out.iter()
            .all(|e| header(e, headers::PLUGIN_VERSION) == Some("1.0.0")),
        "only the active version emitted"
    );
    // The state is checkpointed after the emits are published: wait for it, not a sleep.
    let deadline = Instant::now() + WAIT;
    loop {
        let stored = h.rt.backends.state.scan("sh", "", 100_000).await.unwrap();
        if stored.len() >= 9_000 {
            assert_eq!(stored.len(), 9_000);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 9000 keys stored",
            stored.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leaked = h.rt.backends.state.scan("sh-shadow", "", 10).await.unwrap();
    assert!(leaked.is_empty(), "the candidate wrote state: {leaked:?}");

    // Events retried before they succeed are compared or skipped once each, whatever the
    // attempts: 20 that succeed on their third.
    let flaky: Vec<NewEvent> = (0..20)
        .map(|i| NewEvent {
            key: Some(format!("f{i}").into_bytes()),
            payload: serde_json::to_vec(&json!({"op": "flaky", "succeed-on": 3})).unwrap(),
            headers: Vec::new(),
        })
        .collect();
    h.bus().append("in", flaky).await.unwrap();
    h.wait_events("out", 10_020, WAIT).await;
    settled(&app, "sh", 10_020).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = report(&app, "sh").await;
    assert_eq!(r.compared + r.skipped, 10_020, "{r:?}");
    assert_eq!(r.identical, r.compared, "{r:?}");

    // A candidate that may not emit: every event it sees differs, as a trap.
    let mute = chaos_manifest("sh", "2.0.0", "in", "[limits]\nmax-emits = 0\n");
    let (status, body) = upload_chaos_query(&app, &mute, "shadow=true").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["shadow"], true, "{body}");
    let r = report(&app, "sh").await;
    assert_eq!(
        (r.candidate.as_str(), r.compared),
        ("2.0.0", 0),
        "a new report: {r:?}"
    );
    running(&h, "sh", "2.0.0").await;
    // One stalled shadow call can leave the budget in debt for a whole batch: send batches
    // until the candidate compared some (at most ten).
    let mut sent = 0u64;
    let r = loop {
        send(&h, 10_000 + sent..11_000 + sent).await;
        sent += 1_000;
        let r = settled(&app, "sh", sent).await;
        if r.compared > 0 || sent == 10_000 {
            break r;
        }
    };
    h.wait_events("out", 1_100, WAIT).await;
    assert!(r.compared > 0, "{r:?}");
    assert_eq!(r.identical + r.differing, r.compared, "{r:?}");
    assert_eq!(r.traps, r.differing, "{r:?}");
    for d in &r.divergences {
        assert_eq!(
            d.active.emits.len(),
            1,
            "only emitting events differ: {d:?}"
        );
        assert!(
            matches!(&d.candidate.outcome, Outcome::Failed { kind, .. } if kind == "limit"),
            "{d:?}"
        );
        assert!(d.diff.verdicts.contains(&Verdict::OutcomeDiffers), "{d:?}");
    }

    // Promote: the candidate becomes active and is no shadow any more.
    let (status, body) = api(&app, "POST", "/v1/plugins/sh/promote", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], "2.0.0");
    let (status, _) = api(&app, "GET", "/v1/plugins/sh/shadow", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api(&app, "POST", "/v1/plugins/sh/promote", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let published = state_of(&h.rt, "_spate/shadow/sh").await;
    assert!(published.is_empty(), "reports dropped: {published:?}");
}

/// Promote while events flow: each partition is cut at an offset, every event below it is
/// handled by the old version and every one at or above it by the promoted one, each
/// exactly once; the cuts are in the plugin's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_splits_each_partition_at_a_recorded_offset_cut() {
    let h = Harness::start().await;
    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    h.deploy(&chaos_manifest("cut", "1.0.0", "in", ""), chaos_wasm())
        .await;
    let (status, body) = upload_chaos_query(
        &app,
        &chaos_manifest("cut", "2.0.0", "in", ""),
        "shadow=true",
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bus = h.bus().clone();
    // The second half is held until the promotion's cuts are stored, so events arrive
    // above the cuts however slowly this machine handles the first half.
    let (go_on, held) = tokio::sync::oneshot::channel::<()>();
    let producer = tokio::spawn(async move {
        let mut held = Some(held);
        for batch in 0..40u64 {
            if batch == 20 {
                let _ = held.take().unwrap().await;
            }
            let events: Vec<NewEvent> = (0..100)
                .map(|i| NewEvent {
                    key: Some(format!("k{}", i % 37).into_bytes()),
                    payload: serde_json::to_vec(&json!({"op": "emit", "n": batch * 100 + i}))
                        .unwrap(),
                    headers: Vec::new(),
                })
                .collect();
            bus.append("in", events).await.unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    // Promote mid-stream.
    h.wait_events("out", 1_000, WAIT).await;
    let (status, body) = api(&app, "POST", "/v1/plugins/cut/promote", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["active"].as_str(), body["from"].as_str()),
        (Some("2.0.0"), Some("1.0.0"))
    );
    let partitions = h.bus().partitions("in").await.unwrap().unwrap() as usize;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, show) = api(&app, "GET", "/v1/plugins/cut", None).await;
        let cuts = show["promotions"][0]["cuts"].as_object();
        if cuts.is_some_and(|c| c.len() == partitions) {
            break;
        }
        assert!(Instant::now() < deadline, "cuts never taken: {show}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    go_on.send(()).unwrap();
    producer.await.unwrap();
    let out = h.wait_events("out", 4_000, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out_all = h.events("out").await;
    assert_eq!(
        out_all.len(),
        4_000,
        "every event emitted once: {}",
        out.len()
    );

    let (status, show) = api(&app, "GET", "/v1/plugins/cut", None).await;
    assert_eq!(status, StatusCode::OK, "{show}");
    let cuts = &show["promotions"][0]["cuts"];
    assert_eq!(show["promotions"][0]["from"], "1.0.0", "{show}");
    let mut seen = std::collections::HashSet::new();
    let (mut old, mut new) = (0, 0);
    for e in &out_all {
        let source = header(e, headers::SOURCE).unwrap();
        assert!(seen.insert(source.to_owned()), "{source} handled twice");
        let (tp, offset) = source.rsplit_once('/').unwrap();
        let offset: u64 = offset.parse().unwrap();
        let cut = cuts[tp]
            .as_u64()
            .unwrap_or_else(|| panic!("no cut for {tp}: {show}"));
        let version = header(e, headers::PLUGIN_VERSION).unwrap();
        let want = if offset < cut { "1.0.0" } else { "2.0.0" };
        assert_eq!(version, want, "{source} (cut {cut})");
        if offset < cut {
            old += 1;
        } else {
            new += 1;
        }
    }
    // The second half (2,000 events) was sent only after every cut was stored.
    assert!(old >= 1_000 && new >= 2_000, "old {old}, new {new}");
    eprintln!("cuts {cuts}: {old} events on 1.0.0, {new} on 2.0.0");
}
