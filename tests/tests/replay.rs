//! Replay with an effect diff, on the embedded log through the real HTTP router (the
//! scenario, `support::replay::record_and_replay`, also runs on Cassandra in `cluster.rs`),
//! then the answers to bad replay requests.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use axum::http::StatusCode;
use serde_json::json;
use support::replay::record_and_replay;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_compare_with_the_effect_record_and_change_nothing() {
    let h = Harness::start().await;
    let app = record_and_replay(&h.rt).await;

    // Bad requests say what to send.
    for (body, needle) in [
        (json!({"event": "in/0"}), "topic/partition/offset"),
        (json!({"limit": 0}), "limit"),
        (json!({"topic": "nope"}), "does not subscribe"),
        (json!({"partition": 99}), "does not exist"),
        (json!({"bogus": 1}), "bogus"),
    ] {
        let (status, answer) = api(&app, "POST", "/v1/plugins/rec/replay", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(answer.to_string().contains(needle), "{needle}: {answer}");
    }
    let (status, _) = api(
        &app,
        "POST",
        "/v1/plugins/rec/replay",
        Some(json!({"version": "9.9.9"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api(&app, "POST", "/v1/plugins/none/replay", Some(json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
