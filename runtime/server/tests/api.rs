//! The HTTP API driven in-process (`tower::ServiceExt::oneshot`) against a runtime on a
//! temporary data directory: status codes, JSON error bodies, auth, limits and the event
//! round trip. Real plugin uploads are covered by the end-to-end suite in `tests/`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use spate::api::events::{AppendedEvents, EventPage, TopicInfo};
use spate::api::{self, ApiState, ErrorBody};
use spate::{Backends, Config, Runtime, telemetry};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt as _;

const TOKEN: &str = "api-test-token-0123456789";

struct App {
    _dir: tempfile::TempDir,
    runtime: Arc<Runtime>,
    router: Router,
    /// The router's event-read permits.
    reads: Arc<tokio::sync::Semaphore>,
}

async fn app_with(tweak: impl FnOnce(&mut Config)) -> App {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    config.api.token = Some(TOKEN.into());
    config.sandbox.pool_instances = 8;
    config.sandbox.max_memory_mb = 64;
    tweak(&mut config);
    let backends = Backends::from_config(&config).await.unwrap();
    let runtime = Runtime::start(config, backends).await.unwrap();
    let state = ApiState::new(Arc::clone(&runtime), TOKEN, telemetry::metrics());
    App {
        _dir: dir,
        runtime,
        reads: Arc::clone(&state.reads),
        router: api::router(state),
    }
}

async fn app() -> App {
    app_with(|_| {}).await
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the API's error shape and returns (code, message).
    fn error(&self) -> (String, String) {
        let ct = self.headers.get(header::CONTENT_TYPE).unwrap();
        assert!(
            ct.to_str().unwrap().starts_with("application/json"),
            "content-type {ct:?}"
        );
        let ErrorBody { error } = self.typed();
        assert!(!error.message.is_empty());
        (error.code, error.message)
    }

    /// The body as the API's typed answer `T`.
    fn typed<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not the expected answer ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl App {
    async fn send(&self, req: Request<Body>) -> Answer {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `GET uri` with the token.
    async fn get(&self, uri: &str) -> Answer {
        self.send(
            Request::get(uri)
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
    }

    /// `GET uri` without a token.
    async fn get_anon(&self, uri: &str) -> Answer {
        self.send(Request::get(uri).body(Body::empty()).unwrap())
            .await
    }

    async fn post_json(&self, uri: &str, body: &Value) -> Answer {
        self.send(
            Request::post(uri)
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    async fn upload(&self, parts: &[(&str, &[u8])]) -> Answer {
        let boundary = "spate-test-boundary-7f3a";
        let mut body = Vec::new();
        for (name, bytes) in parts {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        self.send(
            Request::post("/v1/plugins")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .header(
                    header::CONTENT_TYPE,
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }
}

const MANIFEST: &str = r#"
name = "api-test"
version = "0.1.0"
subscriptions = [{ topic = "orders" }]
"#;

#[tokio::test]
async fn health_ready_and_metrics() {
    let app = app().await;
    let r = app.get("/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({ "status": "ok" }));

    // Generous: other tests of this binary start runtimes beside this one on two cores.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.get("/readyz").await;
        if r.status == StatusCode::OK {
            assert_eq!(r.json()["status"], "ready");
            break;
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.error().0, "not_ready");
        assert!(Instant::now() < deadline, "runtime never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    metrics::counter!("spate_events_total", "plugin" => "api-test", "outcome" => "ok").increment(1);
    let r = app.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.body).unwrap();
    assert!(
        text.contains("spate_events_total{plugin=\"api-test\",outcome=\"ok\"}"),
        "{text}"
    );

    let r = app.get("/livez").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "live");

    app.runtime.shutdown().await;
    let r = app.get("/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error().0, "not_ready");
}

#[tokio::test]
async fn mutating_routes_need_the_token() {
    let app = app().await;
    let body = json!({ "payload": 1 }).to_string();

    let r = app
        .send(
            Request::post("/v1/topics/orders/events")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let (code, message) = r.error();
    assert_eq!(code, "unauthorized");
    assert!(message.contains("Authorization: Bearer"), "{message}");
    assert_eq!(r.headers.get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");

    let r = app
        .send(
            Request::post("/v1/topics/orders/events")
                .header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let r = app
        .send(
            Request::post("/v1/topics/orders/events")
                .header(header::AUTHORIZATION, "Bearer not-the-token")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error().0, "forbidden");

    for (method, uri) in [
        (Method::DELETE, "/v1/plugins/x"),
        (Method::POST, "/v1/plugins/x/rollback"),
        (Method::POST, "/v1/plugins"),
    ] {
        let r = app
            .send(
                Request::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
    }

    // Nothing was appended by the refused requests.
    assert_eq!(
        app.get("/v1/topics/orders").await.status,
        StatusCode::NOT_FOUND
    );

    // The scheme is case-insensitive.
    let r = app
        .send(
            Request::post("/v1/topics/orders/events")
                .header(header::AUTHORIZATION, format!("bearer {TOKEN}"))
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(app.get("/v1/plugins").await.status, StatusCode::OK);
}

#[tokio::test]
async fn reads_need_the_token_but_health_and_metrics_do_not() {
    let app = app().await;
    let r = app
        .post_json("/v1/topics/orders/events", &json!({ "payload": 1 }))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    for uri in [
        "/v1/topics/orders/events",
        "/v1/topics/orders",
        "/v1/plugins",
        "/v1/plugins/x",
    ] {
        let r = app.get_anon(uri).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{uri}");
        assert_eq!(r.error().0, "unauthorized", "{uri}");
        let r = app
            .send(
                Request::get(uri)
                    .header(header::AUTHORIZATION, "Bearer not-the-token")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{uri}");
    }
    assert_eq!(
        app.get("/v1/topics/orders/events").await.status,
        StatusCode::OK
    );
    for uri in ["/healthz", "/livez", "/metrics"] {
        assert_eq!(app.get_anon(uri).await.status, StatusCode::OK, "{uri}");
    }
    // An unknown route is still a 404, token or not.
    assert_eq!(app.get_anon("/v1/nope").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_read_stops_at_the_byte_cap_and_its_cursor_continues() {
    const CAP: usize = 64 << 10;
    let app = app_with(|c| {
        c.api.max_read_bytes = CAP;
        c.events = spate::config::EventsConfig::Embedded(spate_core::events::LogSettings {
            default_partitions: 2,
            ..Default::default()
        });
    })
    .await;
    // 60 events of ~4 KiB (240 KiB) over two partitions, and one of 100 KiB.
    let pad = "p".repeat(4000);
    let events: Vec<Value> = (0..60)
        .map(|i| json!({ "key": format!("k{}", i % 7), "payload": { "i": i, "pad": pad } }))
        .collect();
    let r = app
        .post_json("/v1/topics/orders/events", &json!({ "events": events }))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = app
        .post_json(
            "/v1/topics/orders/events",
            &json!({ "key": "huge", "payload": { "i": 60, "pad": "h".repeat(100_000) } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    let mut seen = Vec::new();
    let mut from = String::new();
    let mut pages = 0;
    let mut flags = Vec::new();
    loop {
        let r = app
            .get(&format!("/v1/topics/orders/events?from={from}"))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let page: EventPage = r.typed();
        let events = &page.events;
        if events.is_empty() {
            assert!(!page.truncated);
            break;
        }
        pages += 1;
        let largest = events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap().len())
            .max()
            .unwrap();
        // At most the cap, or one event on its own when that event is larger.
        assert!(
            r.body.len() <= CAP + 512 || events.len() == 1,
            "{} bytes in {} events (largest {largest})",
            r.body.len(),
            events.len()
        );
        assert!(page.bytes <= CAP.max(largest));
        flags.push(page.truncated);
        seen.extend(
            events
                .iter()
                .map(|e| e.payload.as_ref().unwrap()["i"].as_u64().unwrap()),
        );
        from = page.next_from;
        assert!(pages < 40, "the cursor does not advance");
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..61).collect::<Vec<_>>(), "every event once");
    assert!(pages >= 4, "{pages} pages");
    // Every page the cap cut short says so; the last one, which reached the end, does not.
    assert_eq!(flags.pop(), Some(false));
    assert!(flags.iter().all(|t| *t), "{flags:?}");
}

#[tokio::test]
async fn reads_over_the_concurrency_limit_are_told_to_retry() {
    let app = app_with(|c| c.api.max_concurrent_reads = 2).await;
    let r = app
        .post_json("/v1/topics/orders/events", &json!({ "payload": 1 }))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    // Two reads in flight: the test holds their permits.
    let held = Arc::clone(&app.reads).acquire_many_owned(2).await.unwrap();
    let r = app.get("/v1/topics/orders/events").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers.get(header::RETRY_AFTER).unwrap(), "1");
    let (code, message) = r.error();
    assert_eq!(code, "busy");
    assert!(message.contains("api.max-concurrent-reads"), "{message}");
    // Other reads and health are not limited.
    assert_eq!(app.get("/v1/topics/orders").await.status, StatusCode::OK);
    assert_eq!(app.get_anon("/healthz").await.status, StatusCode::OK);
    drop(held);
    let r = app.get("/v1/topics/orders/events").await;
    assert_eq!(r.status, StatusCode::OK);
    // The permit is back once the answer was taken.
    assert_eq!(app.reads.available_permits(), 2);
}

#[tokio::test]
async fn garbage_component_is_a_400_with_a_json_error() {
    let app = app().await;
    let r = app
        .upload(&[
            ("manifest", MANIFEST.as_bytes()),
            ("component", b"definitely not wasm"),
        ])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let (code, message) = r.error();
    assert_eq!(code, "invalid_component");
    assert!(message.contains("WebAssembly"), "{message}");

    // A core module (not a component) is refused the same way, with advice.
    let core_module = b"\0asm\x01\0\0\0";
    let r = app
        .upload(&[
            ("manifest", MANIFEST.as_bytes()),
            ("component", core_module),
        ])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().0, "invalid_component");

    // Nothing was stored.
    assert_eq!(
        app.get("/v1/plugins").await.json(),
        json!({ "plugins": [] })
    );
}

#[tokio::test]
async fn manifest_problems_are_named() {
    let app = app().await;
    let manifest = format!("{MANIFEST}colour = \"blue\"\n");
    let r = app
        .upload(&[("manifest", manifest.as_bytes()), ("component", b"\0asm")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let (code, message) = r.error();
    assert_eq!(code, "invalid_manifest");
    assert!(message.contains("colour"), "{message}");

    // Every rule violation is listed at once.
    let manifest = "name = \"Bad Name\"\nversion = \"1.0.0\"\nsubscriptions = []\n";
    let r = app
        .upload(&[("manifest", manifest.as_bytes()), ("component", b"\0asm")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let (_, message) = r.error();
    assert!(message.contains("name `Bad Name`"), "{message}");
    assert!(message.contains("subscriptions"), "{message}");
}

#[tokio::test]
async fn upload_without_a_part_says_how_to_send_it() {
    let app = app().await;
    let r = app.upload(&[("manifest", MANIFEST.as_bytes())]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let (code, message) = r.error();
    assert_eq!(code, "missing_part");
    assert!(message.contains("`component`"), "{message}");
    assert!(
        message.contains("-F manifest=@spate.toml -F component=@plugin.wasm"),
        "{message}"
    );

    let r = app.upload(&[("component", b"\0asm")]).await;
    assert!(r.error().1.contains("`manifest`"));

    let r = app
        .upload(&[("manifest", MANIFEST.as_bytes()), ("wasm", b"\0asm")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().1.contains("unexpected part `wasm`"));

    // Not multipart at all.
    let r = app
        .post_json("/v1/plugins", &json!({ "manifest": "x" }))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().0, "invalid_multipart");
}

#[tokio::test]
async fn oversized_bodies_are_413_json() {
    let app = app_with(|c| {
        c.api.max_body_bytes = 1024;
        c.api.max_upload_bytes = 4096;
    })
    .await;
    let big = json!({ "payload": "x".repeat(2000) });
    let r = app.post_json("/v1/topics/orders/events", &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let (code, message) = r.error();
    assert_eq!(code, "too_large");
    assert!(message.contains("1024"), "{message}");

    let component = vec![0u8; 8192];
    let r = app
        .upload(&[("manifest", MANIFEST.as_bytes()), ("component", &component)])
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error().0, "too_large");

    // Under the limit is fine.
    let r = app
        .post_json("/v1/topics/orders/events", &json!({ "payload": "small" }))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

#[tokio::test]
async fn unknown_routes_methods_and_bad_json_are_json_errors() {
    let app = app().await;
    let r = app.get("/v2/nothing").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let (code, message) = r.error();
    assert_eq!(code, "not_found");
    assert!(message.contains("/v2/nothing"), "{message}");
    // Every answer carries a request id.
    assert!(r.headers.contains_key("x-request-id"));

    let r = app
        .send(
            Request::builder()
                .method(Method::PUT)
                .uri("/healthz")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.error().0, "method_not_allowed");

    let r = app
        .send(
            Request::post("/v1/topics/orders/events")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::from("{\"payload\": "))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().0, "invalid_json");

    let r = app
        .post_json(
            "/v1/topics/orders/events",
            &json!({ "payload": 1, "colour": "red" }),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let (code, message) = r.error();
    assert_eq!(code, "invalid_event");
    assert!(message.contains("colour"), "{message}");

    let r = app
        .post_json("/v1/topics/orders/events", &json!({ "key": "k" }))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().1.contains("payload"));

    let r = app
        .post_json(
            "/v1/topics/orders/events",
            &json!({ "events": [{ "payload": 1 }, { "payload_base64": "!!" }] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().1.starts_with("events[1]"));

    let r = app
        .post_json("/v1/topics/bad%20topic/events", &json!({ "payload": 1 }))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().0, "invalid_topic");
    // `.` and `..` would name directories, not topics.
    for dots in ["%2E", "%2E%2E"] {
        let r = app
            .post_json(
                &format!("/v1/topics/{dots}/events"),
                &json!({ "payload": 1 }),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{dots}");
        assert_eq!(r.error().0, "invalid_topic", "{dots}");
    }

    let r = app.get("/v1/topics/orders/events?limit=abc").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().0, "invalid_query");

    let r = app
        .post_json("/v1/plugins/nope/activate", &json!({ "ver": "1.0.0" }))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().0, "invalid_json");
}

#[tokio::test]
async fn plugin_routes_answer_404_for_unknown_plugins() {
    let app = app().await;
    assert_eq!(
        app.get("/v1/plugins").await.json(),
        json!({ "plugins": [] })
    );
    let r = app.get("/v1/plugins/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error().0, "not_found");
    let r = app
        .post_json("/v1/plugins/nope/activate", &json!({ "version": "1.0.0" }))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .post_json("/v1/plugins/nope/rollback", &json!(null))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .send(
            Request::delete("/v1/plugins/nope")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn events_round_trip_single_and_batch() {
    let app = app().await;
    assert_eq!(
        app.get("/v1/topics/orders").await.error().0,
        "unknown_topic"
    );
    assert_eq!(
        app.get("/v1/topics/orders/events").await.status,
        StatusCode::NOT_FOUND
    );

    let r = app
        .post_json(
            "/v1/topics/orders/events",
            &json!({ "key": "c-1", "payload": { "amount": 3 }, "headers": { "source": "test" } }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let AppendedEvents { appended } = r.typed();
    assert_eq!(appended.len(), 1);
    assert_eq!(appended[0].offset, 0);
    let key_partition = appended[0].partition;

    let binary = [0xffu8, 0x00, 0x01];
    let r = app
        .post_json(
            "/v1/topics/orders/events",
            &json!({ "events": [
                { "key": "c-1", "payload": { "amount": 4 } },
                { "key": "c-1", "payload_base64": base64::engine::general_purpose::STANDARD.encode(binary) },
                { "key": "c-1", "payload_base64": base64::engine::general_purpose::STANDARD.encode("plain text") },
                { "payload": null },
            ] }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let AppendedEvents { appended } = r.typed();
    assert_eq!(appended.len(), 4);
    // One key, one partition, consecutive offsets.
    for (i, a) in appended[..3].iter().enumerate() {
        assert_eq!(a.partition, key_partition);
        assert_eq!(a.offset, i as u64 + 1);
    }

    let info: TopicInfo = app.get("/v1/topics/orders").await.typed();
    let partitions = info.partitions;
    assert_eq!(partitions, 4);
    let total: u64 = info.end_offsets.iter().sum();
    assert_eq!(total, 5);

    // Every partition from the start.
    let all = app.get("/v1/topics/orders/events").await.json();
    let events = all["events"].as_array().unwrap();
    assert_eq!(events.len(), 5);
    let keyed: Vec<&Value> = events.iter().filter(|e| e["key"] == "c-1").collect();
    assert_eq!(keyed.len(), 4);
    assert_eq!(keyed[0]["payload"], json!({ "amount": 3 }));
    assert_eq!(keyed[0]["headers"], json!({ "source": "test" }));
    assert_eq!(keyed[0]["topic"], "orders");
    assert!(keyed[0]["timestamp_ms"].as_i64().unwrap() > 0);
    assert_eq!(keyed[1]["payload"], json!({ "amount": 4 }));
    assert_eq!(
        keyed[2]["payload_base64"],
        base64::engine::general_purpose::STANDARD.encode(binary)
    );
    assert_eq!(keyed[3]["payload_text"], "plain text");
    let unkeyed = events.iter().find(|e| e["key"].is_null()).unwrap();
    assert_eq!(unkeyed["payload"], Value::Null);
    assert!(unkeyed.as_object().unwrap().contains_key("payload"));

    // Cursors: reading from `next_from` finds nothing new, then exactly the new event.
    let next_from = all["next_from"].as_str().unwrap().to_string();
    assert_eq!(next_from.split(',').count(), partitions as usize);
    let uri = format!("/v1/topics/orders/events?from={next_from}");
    assert!(
        app.get(&uri).await.json()["events"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    app.post_json(
        "/v1/topics/orders/events",
        &json!({ "key": "c-1", "payload": 5 }),
    )
    .await;
    let page = app.get(&uri).await.json();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["payload"], 5);
    // The unkeyed event may have landed in the key's partition too.
    assert_eq!(
        events[0]["offset"],
        info.end_offsets[key_partition as usize]
    );

    // One partition, from an offset, with a limit.
    let page = app
        .get(&format!(
            "/v1/topics/orders/events?partition={key_partition}&offset=1&limit=2"
        ))
        .await
        .json();
    let offsets: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![1, 2]);
    assert_eq!(page["next"][key_partition.to_string()], 3);

    let r = app.get("/v1/topics/orders/events?partition=9").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get("/v1/topics/orders/events?from=0-1").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_token_is_generated_once_and_kept_private() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().join("data"),
        ..Config::default()
    };
    let first = api::resolve_token(&config).unwrap();
    assert_eq!(first.len(), 64);
    let path = api::token_path(&config);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(api::resolve_token(&config).unwrap(), first);

    config.api.token = Some("configured-token".into());
    assert_eq!(api::resolve_token(&config).unwrap(), "configured-token");
}
