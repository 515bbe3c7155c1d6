//! Plugin uploads through the real HTTP router: every bad upload gets the right 4xx with a
//! JSON error that says what to fix, and the version already serving keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use spate_core::types::headers;
use std::time::Duration;
use support::*;

const WAIT: Duration = Duration::from_secs(20);
fn error_message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// v1 serves; then each bad upload is refused with a clear 4xx, and after each one an
/// event is still handled by v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_and_the_serving_version_keeps_serving() {
    let h = Harness::start().await;
    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    let wasm = chaos_wasm();
    let (status, body) = upload_chaos(&app, &chaos_manifest("chaos", "1.0.0", "in", "")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["version"], "1.0.0");

    let v2 = chaos_manifest("chaos", "2.0.0", "in", "");
    let core_module: &[u8] = b"\0asm\x01\0\0\0";
    let mut oversized = wasm.clone();
    oversized.resize(h.rt.config.api.max_upload_bytes + 1024, 0);
    let unknown_field = format!("{v2}\nretries = 5\n");
    let bad_filter = chaos_manifest(
        "chaos",
        "2.0.0",
        "in",
        "[filter]\nfields = { op = { nested = 1 } }\n",
    );
    let wrong_world = wrong_world_wasm();

    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        (
            "no token",
            upload_request(None, &[("manifest", v2.as_bytes()), ("component", &wasm)]),
            StatusCode::UNAUTHORIZED,
            "Bearer",
        ),
        (
            "wrong token",
            upload_request(
                Some("not-the-token"),
                &[("manifest", v2.as_bytes()), ("component", &wasm)],
            ),
            StatusCode::FORBIDDEN,
            "token",
        ),
        (
            "garbage",
            upload_request(
                Some(TOKEN),
                &[
                    ("manifest", v2.as_bytes()),
                    ("component", b"hello, not wasm"),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "not a WebAssembly binary",
        ),
        (
            "core module",
            upload_request(
                Some(TOKEN),
                &[("manifest", v2.as_bytes()), ("component", core_module)],
            ),
            StatusCode::BAD_REQUEST,
            "core WebAssembly module, not a component",
        ),
        (
            "wrong world",
            upload_request(
                Some(TOKEN),
                &[("manifest", v2.as_bytes()), ("component", &wrong_world)],
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "spate:plugin/event-handler",
        ),
        (
            "unknown manifest field",
            upload_request(
                Some(TOKEN),
                &[("manifest", unknown_field.as_bytes()), ("component", &wasm)],
            ),
            StatusCode::BAD_REQUEST,
            "retries",
        ),
        (
            "filter on a nested object",
            upload_request(
                Some(TOKEN),
                &[("manifest", bad_filter.as_bytes()), ("component", &wasm)],
            ),
            StatusCode::BAD_REQUEST,
            "filter.fields.op: compare with strings, numbers or booleans",
        ),
        (
            "missing component",
            upload_request(Some(TOKEN), &[("manifest", v2.as_bytes())]),
            StatusCode::BAD_REQUEST,
            "component",
        ),
        (
            "oversized body",
            upload_request(
                Some(TOKEN),
                &[("manifest", v2.as_bytes()), ("component", &oversized)],
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
        ),
    ];
    for (i, (what, req, want, needle)) in cases.into_iter().enumerate() {
        let (status, body) = call(&app, req).await;
        assert_eq!(status, want, "{what}: {body}");
        let code = body["error"]["code"].as_str().unwrap_or_default();
        assert!(!code.is_empty(), "{what}: JSON error needs a code: {body}");
        let msg = error_message(&body);
        assert!(
            !msg.is_empty(),
            "{what}: JSON error needs a message: {body}"
        );
        assert!(
            msg.contains(needle),
            "{what}: message {msg:?} should mention {needle:?}"
        );

        // The previous version keeps serving after every refusal.
        h.send("in", "k", json!({"op": "emit", "seq": i})).await;
        let out = h.wait_events("out", i + 1, WAIT).await;
        assert_eq!(
            header(out.last().unwrap(), headers::PLUGIN_VERSION),
            Some("1.0.0"),
            "{what}"
        );
    }
    let (status, body) = call(
        &app,
        Request::get("/v1/plugins/chaos")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["active"], "1.0.0", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_version_with_other_content_is_a_conflict_and_reupload_is_idempotent() {
    let h = Harness::start().await;
    let manifest = chaos_manifest("chaos", "1.0.0", "in", "");
    h.deploy(&manifest, chaos_wasm()).await;
    let again =
        h.rt.registry
            .upload(&manifest, chaos_wasm(), true)
            .await
            .unwrap();
    assert!(again.unchanged);
    let err =
        h.rt.registry
            .upload(&manifest, order_totals_wasm(), true)
            .await
            .unwrap_err();
    assert!(err.to_string().contains("bump the version"), "{err}");
}

/// Compiled artifacts are cached on disk: after a restart the active version serves
/// without recompiling, and state and positions survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_the_active_version_from_the_compiled_cache() {
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = start_runtime(dir.path()).await;
        let up = rt
            .registry
            .upload(
                &chaos_manifest("chaos", "1.0.0", "in", ""),
                chaos_wasm(),
                true,
            )
            .await
            .unwrap();
        assert!(up.compile_ms > 0 || up.unchanged);
        send(
            &rt.backends.bus,
            "in",
            "k",
            json!({"op": "put", "key": "a", "value": "1"}),
        )
        .await;
        wait_events(&rt.backends.bus, "out", 1, WAIT).await;
        rt.shutdown().await;
    }
    let compiled: Vec<_> = std::fs::read_dir(dir.path().join("compiled"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(compiled.len(), 1, "one compiled artifact cached");
    let rt = start_runtime(dir.path()).await;
    // Re-uploading the same component reports it was not recompiled.
    let again = rt
        .registry
        .upload(
            &chaos_manifest("chaos", "1.0.1", "in", ""),
            chaos_wasm(),
            false,
        )
        .await
        .unwrap();
    assert_eq!(again.compile_ms, 0, "served from the compiled cache");
    send(
        &rt.backends.bus,
        "in",
        "k",
        json!({"op": "get", "key": "a"}),
    )
    .await;
    let out = wait_events(&rt.backends.bus, "out", 2, WAIT).await;
    assert_eq!(out.len(), 2, "the first event was not handled twice");
    assert_eq!(json(&out[1])["value"], "1");
    rt.shutdown().await;
}

/// Many uploads of one new component at once (24 plugins sharing it): each is compiled
/// once and stored once, and every upload succeeds — none trips over another's artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_of_one_new_component_all_succeed() {
    let h = Harness::start().await;
    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    let wasm = chaos_wasm();
    let uploads = (0..24).map(|i| {
        let manifest = chaos_manifest(&format!("race-{i}"), "1.0.0", "in", "");
        let request = upload_request(
            Some(TOKEN),
            &[("manifest", manifest.as_bytes()), ("component", &wasm)],
        );
        let app = app.clone();
        async move { call(&app, request).await }
    });
    let answers = futures::future::join_all(uploads).await;
    for (i, (status, body)) in answers.iter().enumerate() {
        assert_eq!(*status, StatusCode::CREATED, "race-{i}: {body}");
    }
    let compiled = std::fs::read_dir(h.dir.path().join("compiled"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert_eq!(
        compiled.iter().filter(|n| n.ends_with(".cwasm")).count(),
        1,
        "one artifact, no temp files left: {compiled:?}"
    );
    assert_eq!(compiled.len(), 1, "no temp files left: {compiled:?}");
}

/// A dead-letter topic is a write no emit capability grants: it may not be another
/// plugin's input (a plugin without emit rights could feed it), nor the plugin's own input
/// or the workflow topic; a plugin may not emit onto the workflow topic either. Each is a
/// 4xx that says what to fix, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_topics_and_the_workflow_topic_are_not_write_capabilities() {
    let h = Harness::start().await;
    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    let wasm = chaos_wasm();
    let upload = |manifest: String| {
        let request = upload_request(
            Some(TOKEN),
            &[("manifest", manifest.as_bytes()), ("component", &wasm)],
        );
        let app = app.clone();
        async move { call(&app, request).await }
    };
    let (status, body) = upload(chaos_manifest("totals", "1.0.0", "orders", "")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let cases = [
        (
            format!(
                "dead-letter-topic = \"orders\"\n{}",
                chaos_manifest("forger", "1.0.0", "in", "")
            ),
            StatusCode::CONFLICT,
            "input topic of plugin `totals`",
        ),
        (
            format!(
                "dead-letter-topic = \"in\"\n{}",
                chaos_manifest("looper", "1.0.0", "in", "")
            ),
            StatusCode::BAD_REQUEST,
            "also subscribed",
        ),
        (
            format!(
                "dead-letter-topic = \"workflows\"\n{}",
                chaos_manifest("starter", "1.0.0", "in", "")
            ),
            StatusCode::BAD_REQUEST,
            "workflow topic",
        ),
        (
            chaos_manifest("starter", "1.0.0", "in", "").replace(
                "emit-topics = [\"out\"]",
                "emit-topics = [\"out\", \"workflows\"]",
            ),
            StatusCode::BAD_REQUEST,
            "start-workflow",
        ),
    ];
    for (manifest, want, problem) in cases {
        let (status, body) = upload(manifest.clone()).await;
        assert_eq!(status, want, "{manifest}: {body}");
        assert!(error_message(&body).contains(problem), "{manifest}: {body}");
    }
    for refused in ["forger", "looper", "starter"] {
        let (status, body) = call(
            &app,
            Request::get(format!("/v1/plugins/{refused}"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{refused} was stored: {body}"
        );
    }
}
