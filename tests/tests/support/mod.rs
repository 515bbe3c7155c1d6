//! Shared harness of the end-to-end tests: a runtime on embedded defaults in a temporary
//! data directory, the test plugins built from `plugins/`, and helpers to send events and
//! wait for what the runtime writes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod cluster;
pub mod kafka;
pub mod node;
pub mod replay;

use axum::body::Body;
use axum::http::{Request, StatusCode, header as http};
use serde_json::Value;
use spate::{Backends, Config, Runtime};
use spate_core::types::header_str;
use spate_core::{Event, EventBus, NewEvent};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// The test-chaos component.
pub fn chaos_wasm() -> Vec<u8> {
    std::fs::read(env!("SPATE_PLUGIN_TEST_CHAOS")).expect("test-chaos component")
}

/// The example plugin's component.
pub fn order_totals_wasm() -> Vec<u8> {
    std::fs::read(env!("SPATE_PLUGIN_ORDER_TOTALS")).expect("order-totals component")
}

/// A component of the wrong world (a WASI command).
pub fn wrong_world_wasm() -> Vec<u8> {
    std::fs::read(env!("SPATE_PLUGIN_TEST_WRONG_WORLD")).expect("wrong-world component")
}

/// The repository's `plugins/` directory.
pub fn plugins_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins"))
}

/// A test-chaos manifest: `name`, `version`, subscribed to `topic`, emitting to `out`,
/// with `extra` TOML appended (sections such as `[limits]`).
pub fn chaos_manifest(name: &str, version: &str, topic: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
version = "{version}"
subscriptions = [{{ topic = "{topic}" }}]
[capabilities]
emit-topics = ["out"]
workflows = ["*"]
{extra}
"#
    )
}

pub const TOKEN: &str = "test-token-0123456789";

/// Configuration for a test runtime in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.dispatch.commit_interval_ms = 20;
    c.dispatch.drain_timeout_ms = 5_000;
    c.api.token = Some(TOKEN.into());
    c.sandbox.pool_instances = 128;
    c
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub rt: Arc<Runtime>,
}

impl Harness {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rt = start_runtime(dir.path()).await;
        Self { dir, rt }
    }

    pub fn bus(&self) -> &Arc<dyn EventBus> {
        &self.rt.backends.bus
    }

    pub async fn deploy(&self, manifest: &str, wasm: Vec<u8>) -> spate_engine::UploadOutcome {
        self.rt
            .registry
            .upload(manifest, wasm, true)
            .await
            .unwrap_or_else(|e| panic!("upload failed: {e}"))
    }

    pub async fn send(&self, topic: &str, key: &str, payload: Value) {
        send(self.bus(), topic, key, payload).await;
    }

    pub async fn events(&self, topic: &str) -> Vec<Event> {
        read_all(self.bus(), topic).await
    }

    /// Wait until `topic` holds at least `n` events; panics after `timeout`.
    pub async fn wait_events(&self, topic: &str, n: usize, timeout: Duration) -> Vec<Event> {
        wait_events(self.bus(), topic, n, timeout).await
    }
}

pub async fn start_runtime(dir: &Path) -> Arc<Runtime> {
    let config = test_config(dir);
    let backends = Backends::from_config(&config).await.unwrap();
    Runtime::start(config, backends).await.unwrap()
}

pub async fn send(bus: &Arc<dyn EventBus>, topic: &str, key: &str, payload: Value) {
    bus.append(
        topic,
        vec![NewEvent {
            key: Some(key.as_bytes().to_vec()),
            payload: serde_json::to_vec(&payload).unwrap(),
            headers: vec![],
        }],
    )
    .await
    .unwrap();
}

pub async fn read_all(bus: &Arc<dyn EventBus>, topic: &str) -> Vec<Event> {
    let Some(parts) = bus.partitions(topic).await.unwrap() else {
        return Vec::new();
    };
    let mut all = Vec::new();
    for p in 0..parts {
        let mut from = 0;
        loop {
            let batch = bus.read(topic, p, from, 1000).await.unwrap();
            let Some(last) = batch.last() else { break };
            from = last.offset + 1;
            all.extend(batch);
        }
    }
    all
}

pub async fn wait_events(
    bus: &Arc<dyn EventBus>,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<Event> {
    let start = Instant::now();
    loop {
        let events = read_all(bus, topic).await;
        if events.len() >= n {
            return events;
        }
        if start.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {n} events on `{topic}`; have {}: {:#?}",
                events.len(),
                events.iter().map(describe).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn json(e: &Event) -> Value {
    serde_json::from_slice(&e.payload).unwrap_or(Value::Null)
}

pub fn header<'a>(e: &'a Event, name: &str) -> Option<&'a str> {
    header_str(&e.headers, name)
}

pub fn describe(e: &Event) -> String {
    let headers: Vec<String> = e
        .headers
        .iter()
        .map(|h| format!("{}={}", h.name, String::from_utf8_lossy(&h.value)))
        .collect();
    format!(
        "{}/{}/{} key={:?} payload={} headers=[{}]",
        e.topic,
        e.partition,
        e.offset,
        e.key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        String::from_utf8_lossy(&e.payload),
        headers.join(", ")
    )
}

/// Multipart boundary of the upload helpers.
pub const BOUNDARY: &str = "spate-test-boundary-7d1f";

/// A multipart/form-data body with one file part per `(name, bytes)`.
pub fn multipart(parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// `POST /v1/plugins` with `parts`, bearing `token` if given.
pub fn upload_request(token: Option<&str>, parts: &[(&str, &[u8])]) -> Request<Body> {
    upload_request_to("/v1/plugins", token, parts)
}

/// [`upload_request`] to `uri` (the upload route with a query).
pub fn upload_request_to(uri: &str, token: Option<&str>, parts: &[(&str, &[u8])]) -> Request<Body> {
    let mut req = Request::post(uri).header(
        http::CONTENT_TYPE,
        format!("multipart/form-data; boundary={BOUNDARY}"),
    );
    if let Some(t) = token {
        req = req.header(http::AUTHORIZATION, format!("Bearer {t}"));
    }
    req.body(Body::from(multipart(parts))).unwrap()
}

/// Upload `manifest` with the test-chaos component to `app` with the test token; the
/// status and the JSON answer.
pub async fn upload_chaos(app: &axum::Router, manifest: &str) -> (StatusCode, Value) {
    upload_chaos_query(app, manifest, "").await
}

/// [`upload_chaos`] with a query string (`activate=false`, `shadow=true`).
pub async fn upload_chaos_query(
    app: &axum::Router,
    manifest: &str,
    query: &str,
) -> (StatusCode, Value) {
    let wasm = chaos_wasm();
    let uri = match query {
        "" => "/v1/plugins".to_owned(),
        q => format!("/v1/plugins?{q}"),
    };
    call(
        app,
        upload_request_to(
            &uri,
            Some(TOKEN),
            &[("manifest", manifest.as_bytes()), ("component", &wasm)],
        ),
    )
    .await
}

/// Send `req` to `app`; the status and the JSON body (a non-JSON body fails the test).
pub async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
        panic!(
            "status {status}: body is not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, body)
}

/// Calls `method path` on the API with the test token and an optional JSON body.
pub async fn api(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::AUTHORIZATION, format!("Bearer {TOKEN}"));
    let req = match body {
        Some(b) => req
            .header(http::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    };
    call(app, req.unwrap()).await
}

/// Every live entry of state namespace `ns` (at most 100,000), by key.
pub async fn state_of(rt: &Runtime, ns: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    rt.backends
        .state
        .scan(ns, "", 100_000)
        .await
        .unwrap()
        .into_iter()
        .collect()
}
