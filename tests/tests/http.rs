//! A real runtime process's HTTP server (`spate-node`, exactly what `spate up` runs),
//! driven over raw TCP where a well-behaved client would not do what a hostile one does:
//! a half-sent request head at SIGTERM, heads that never complete, idle keep-alive
//! connections, answers hyper gives before the router sees a request, and the metrics of
//! a deleted plugin. And the parked-key and dead-letter routes, on the in-process router:
//! their errors, and the requests they file for the partitions' owners.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use spate::api::ErrorBody;
use spate::api::events::EventPage;
use spate_core::state::parked::{self, Action, ParkedEvent, ParkedKey};
use spate_core::types::headers;
use spate_core::{Event, Header, NewEvent};
use std::process::Command;
use std::time::{Duration, Instant};
use support::node::{Node, append, spawn_node, upload};
use support::{Harness, TOKEN, api, call, chaos_manifest, upload_chaos};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn addr(node: &Node) -> String {
    node.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (or `limit` passes); returns what was
/// read and when the close came.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, started.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the server kept the connection open for {limit:?}; read so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

/// One response of a keep-alive connection (a `content-length` body): status and body.
async fn read_response(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if data.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                return (status, data[end + 4..end + 4 + len].to_vec());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..n]);
    }
}

/// Status, lower-cased head and body of a whole answer.
fn parse_answer(raw: &[u8]) -> (u16, String, Value) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let body = serde_json::from_slice(&raw[end + 4..]).unwrap_or_else(|e| {
        panic!(
            "the body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&raw[end + 4..])
        )
    });
    (status, head, body)
}

fn sigterm(node: &Node) {
    let term = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_half_sent_request_exits_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    // The header timeout is far away, so only the shutdown grace period can end it.
    let mut node = spawn_node(
        dir.path(),
        &http,
        &[
            ("SPATE_API__HEADER_READ_TIMEOUT_MS", "120000"),
            ("SPATE_API__SHUTDOWN_GRACE_MS", "1000"),
        ],
    )
    .await;
    let mut half = TcpStream::connect(addr(&node)).await.unwrap();
    half.write_all(b"GET /v1/plugins HTTP/1.1\r\nHost: spate\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    sigterm(&node);
    let exited = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still running 30 s after SIGTERM with a half-sent request open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = started.elapsed();
    println!("SIGTERM to exit with a half-sent request open: {took:?} (grace 1 s)");
    assert!(exited.success(), "clean exit: {exited:?}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    // The half-sent request's connection was dropped, not left open.
    let (_, _) = read_until_closed(&mut half, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_that_never_complete_and_idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = spawn_node(
        dir.path(),
        &http,
        &[
            ("SPATE_API__HEADER_READ_TIMEOUT_MS", "1000"),
            // Far above the 2 s keep-alive pause below, so a late client still gets its answer.
            ("SPATE_API__IDLE_TIMEOUT_MS", "5000"),
        ],
    )
    .await;

    // A head that never completes: closed after the header timeout, with nothing sent.
    let mut slow = TcpStream::connect(addr(&node)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: spate\r\nX-Slow: 1")
        .await
        .unwrap();
    let (answer, took) = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    println!("half-sent head closed after {took:?} (header timeout 1 s)");
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    // Wide: the server's clock starts before ours, and a loaded machine delays either side.
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(4000),
        "{took:?}"
    );

    // Trickling a head byte by byte does not extend it.
    let mut trickle = TcpStream::connect(addr(&node)).await.unwrap();
    let started = Instant::now();
    let closed = loop {
        if trickle.write_all(b"X").await.is_err() {
            break started.elapsed();
        }
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(200), trickle.read(&mut b)).await
        {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
    };
    println!("trickled head closed after {closed:?}");
    // Below the 5 s idle timeout, with room for a loaded machine.
    assert!(closed < Duration::from_millis(4000), "{closed:?}");

    // A keep-alive connection idle for longer than the header timeout but less than the
    // idle timeout still serves its next request; then it is closed after the idle timeout.
    let mut keep = TcpStream::connect(addr(&node)).await.unwrap();
    let req = b"GET /healthz HTTP/1.1\r\nHost: spate\r\n\r\n";
    keep.write_all(req).await.unwrap();
    assert_eq!(read_response(&mut keep).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    keep.write_all(req).await.unwrap();
    assert_eq!(read_response(&mut keep).await.0, 200);
    let (rest, idle) = read_until_closed(&mut keep, Duration::from_secs(15)).await;
    println!("idle keep-alive connection closed after {idle:?} (idle timeout 5 s)");
    assert!(rest.is_empty());
    // 1 s below the idle timeout: the server's clock starts before ours.
    assert!(
        idle >= Duration::from_millis(4000) && idle < Duration::from_millis(9000),
        "{idle:?}"
    );

    // A connection that never sends a byte: the idle timeout.
    let mut silent = TcpStream::connect(addr(&node)).await.unwrap();
    let (_, took) = read_until_closed(&mut silent, Duration::from_secs(15)).await;
    // 1 s below the idle timeout: the server's clock starts (at the accept) before ours.
    assert!(
        took >= Duration::from_millis(4000) && took < Duration::from_millis(9000),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_hyper_and_the_framework_are_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = spawn_node(dir.path(), &http, &[("SPATE_API__MAX_BODY_BYTES", "1024")]).await;

    // 414: hyper refuses a URI over 65534 bytes before any router sees it.
    let mut s = TcpStream::connect(addr(&node)).await.unwrap();
    let uri = format!("/v1/topics/t/events?from={}", "0:1,".repeat(20_000));
    s.write_all(format!("GET {uri} HTTP/1.1\r\nHost: spate\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (raw, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let (status, head, body) = parse_answer(&raw);
    assert_eq!(status, 414);
    assert!(head.contains("content-type: application/json"), "{head}");
    assert_eq!(body["error"]["code"], "uri_too_long", "{body}");

    // 431: a head larger than hyper's buffer.
    let mut s = TcpStream::connect(addr(&node)).await.unwrap();
    let big = "a".repeat(500 << 10);
    let _ = s
        .write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: spate\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        )
        .await;
    let (raw, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let (status, _, body) = parse_answer(&raw);
    assert_eq!(status, 431);
    assert_eq!(body["error"]["code"], "headers_too_large", "{body}");

    // 400: not HTTP at all.
    let mut s = TcpStream::connect(addr(&node)).await.unwrap();
    s.write_all(b"HELLO WORLD\r\n\r\n").await.unwrap();
    let (raw, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let (status, _, body) = parse_answer(&raw);
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request", "{body}");

    // The router's own: unknown route, wrong method, body too large.
    let r = http
        .get(format!("{}/nope", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
    let r = http
        .put(format!("{}/v1/plugins", node.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let r = http
        .post(format!("{}/v1/topics/t/events", node.base))
        .bearer_auth(TOKEN)
        .json(&json!({ "payload": "x".repeat(4096) }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "too_large"
    );
}

/// The `spate_consumer_lag` lines of a node's `/metrics` naming `plugin`.
async fn lag_lines(http: &reqwest::Client, node: &Node, plugin: &str) -> Vec<String> {
    let text = http
        .get(format!("{}/metrics", node.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("spate_consumer_lag{") && l.contains(&format!("plugin=\"{plugin}\""))
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_plugins_lag_leaves_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let node = spawn_node(dir.path(), &http, &[]).await;
    upload(
        &http,
        &node,
        chaos_manifest("lagger", "1.0.0", "lag-in", ""),
    )
    .await;
    upload(&http, &node, chaos_manifest("stays", "1.0.0", "lag-in", "")).await;
    let r = http
        .post(format!("{}/v1/topics/lag-in/events", node.base))
        .bearer_auth(TOKEN)
        .json(&json!({ "events": [{ "key": "k", "payload": { "op": "noop" } }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let started = Instant::now();
    while lag_lines(&http, &node, "lagger").await.is_empty()
        || lag_lines(&http, &node, "stays").await.is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no lag reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let r = http
        .delete(format!("{}/v1/plugins/lagger", node.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let deleted = Instant::now();
    while !lag_lines(&http, &node, "lagger").await.is_empty() {
        assert!(
            deleted.elapsed() < Duration::from_secs(10),
            "the deleted plugin's lag is still exported: {:?}",
            lag_lines(&http, &node, "lagger").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "deleted plugin's lag series gone {:?} after the delete",
        deleted.elapsed()
    );
    // Two more lag reports later, still gone; the other plugin's is still there.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(lag_lines(&http, &node, "lagger").await.is_empty());
    assert!(!lag_lines(&http, &node, "stays").await.is_empty());
}

async fn get_json(
    http: &reqwest::Client,
    node: &Node,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut req = http.get(format!("{}{path}", node.base));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_need_the_token_and_are_bounded_in_bytes_and_in_number() {
    const CAP: usize = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let cap = CAP.to_string();
    let node = spawn_node(
        dir.path(),
        &http,
        &[
            ("SPATE_API__MAX_READ_BYTES", cap.as_str()),
            ("SPATE_API__MAX_CONCURRENT_READS", "2"),
        ],
    )
    .await;

    // A dead letter and a workflow start, written by a plugin.
    upload(
        &http,
        &node,
        chaos_manifest("reader", "1.0.0", "orders", ""),
    )
    .await;
    append(
        &http,
        &node,
        "orders",
        [
            json!({ "key": "a", "payload": { "op": "reject" } }),
            json!({ "key": "b", "payload": { "op": "workflow", "name": "review", "input": { "secret": 1 } } }),
        ],
    )
    .await;
    let started = Instant::now();
    loop {
        let (dlq, _) = get_json(&http, &node, "/v1/topics/reader.dlq", Some(TOKEN)).await;
        let (wf, _) = get_json(&http, &node, "/v1/topics/workflows", Some(TOKEN)).await;
        if dlq == 200 && wf == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no dead letter or workflow"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for path in [
        "/v1/topics/orders/events",
        "/v1/topics/reader.dlq/events",
        "/v1/topics/workflows/events",
        "/v1/topics/orders",
        "/v1/plugins",
        "/v1/plugins/reader",
    ] {
        let (status, body) = get_json(&http, &node, path, None).await;
        assert_eq!(status, 401, "{path} without a token: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{path}: {body}");
        let (status, body) = get_json(&http, &node, path, Some("wrong-token-123")).await;
        assert_eq!(status, 403, "{path} with a wrong token: {body}");
        let (status, body) = get_json(&http, &node, path, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path} with the token: {body}");
    }
    let (_, dlq) = get_json(&http, &node, "/v1/topics/reader.dlq/events", Some(TOKEN)).await;
    assert_eq!(dlq["events"].as_array().unwrap().len(), 1, "{dlq}");
    for path in ["/healthz", "/readyz", "/livez"] {
        assert_eq!(get_json(&http, &node, path, None).await.0, 200, "{path}");
    }
    let metrics = http
        .get(format!("{}/metrics", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);

    // 12 events of 1 MB in one partition (one key): more than the 8 MiB cap.
    let payload = "x".repeat(1_000_000);
    for _ in 0..12 {
        append(
            &http,
            &node,
            "big",
            [json!({ "key": "k", "payload": payload })],
        )
        .await;
    }
    let r = http
        .get(format!("{}/v1/topics/big/events", node.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let raw = r.bytes().await.unwrap();
    let page: EventPage = serde_json::from_slice(&raw).unwrap();
    let first = page.events.len();
    println!(
        "capped read: {} bytes of answer, {first} events of 1 MB, truncated = {} (cap {CAP})",
        raw.len(),
        page.truncated
    );
    assert!(raw.len() <= CAP + 1024, "{} bytes", raw.len());
    assert!(page.bytes <= CAP);
    assert_eq!(first, 8);
    assert!(page.truncated);
    // The cursor continues where the cap stopped it.
    let (_, rest) = get_json(
        &http,
        &node,
        &format!("/v1/topics/big/events?from={}", page.next_from),
        Some(TOKEN),
    )
    .await;
    let rest: EventPage = serde_json::from_value(rest).unwrap();
    let offsets: Vec<u64> = rest.events.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, vec![8, 9, 10, 11]);
    assert!(!rest.truncated);

    // Two readers that never read their 8 MB answers hold both read slots; a third read
    // is told to come back, while health and other routes still answer.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8192).unwrap();
        let mut s = socket.connect(addr(&node).parse().unwrap()).await.unwrap();
        s.write_all(
            format!(
                "GET /v1/topics/big/events HTTP/1.1\r\nHost: spate\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = http
        .get(format!("{}/v1/topics/big/events", node.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "busy", "{body}");
    assert_eq!(get_json(&http, &node, "/healthz", None).await.0, 200);
    assert_eq!(
        get_json(&http, &node, "/v1/plugins", Some(TOKEN)).await.0,
        200
    );

    let status = std::fs::read_to_string(format!("/proc/{}/status", node.child.id())).unwrap();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("");
    println!("node peak RSS after the capped reads and two stalled 8 MB readers: {peak}");

    drop(stalled);
    let started = Instant::now();
    loop {
        let (status, _) =
            get_json(&http, &node, "/v1/topics/big/events?limit=1", Some(TOKEN)).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "read slots never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Parked keys and dead letters (in-process router)

/// A test-chaos manifest with `on-failure = "park-key"`, subscribed to `topic`.
fn park_manifest(name: &str, topic: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"1.0.0\"\non-failure = \"park-key\"\n\
         subscriptions = [{{ topic = \"{topic}\" }}]\n[capabilities]\nemit-topics = [\"out\"]\n"
    )
}

/// A runtime with plugin `name` (park-key, on `topic`) uploaded through the router.
async fn park_api(name: &str, topic: &str) -> (Harness, axum::Router) {
    let h = Harness::start().await;
    let app = spate::api::router(spate::api::ApiState::new(
        h.rt.clone(),
        TOKEN,
        spate::telemetry::metrics(),
    ));
    let (status, body) = upload_chaos(&app, &park_manifest(name, topic)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    (h, app)
}

/// `method path` with the token and `body` as JSON; the status and the JSON answer.
/// The error code of an answer, asserting it is the API's error shape.
fn code(body: &Value) -> String {
    let ErrorBody { error } = serde_json::from_value(body.clone())
        .unwrap_or_else(|e| panic!("not the API's error shape ({e}): {body}"));
    assert!(!error.message.is_empty(), "no error message: {body}");
    error.code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_routes_refuse_unknown_plugins_and_bad_bodies_saying_what_to_send() {
    let (_h, app) = park_api("parker", "park-in").await;

    // Unknown plugin: 404 on every route, pointing at the plugin list.
    for (method, path, body) in [
        ("GET", "/v1/plugins/nope/parked", None),
        ("GET", "/v1/plugins/nope/parked/c-1", None),
        (
            "POST",
            "/v1/plugins/nope/parked/redrive",
            Some(json!({"all": true})),
        ),
        (
            "POST",
            "/v1/plugins/nope/parked/discard",
            Some(json!({"keys": ["c-1"]})),
        ),
        (
            "POST",
            "/v1/plugins/nope/dead-letters/redrive",
            Some(json!({})),
        ),
    ] {
        let (status, answer) = api(&app, method, path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        assert_eq!(code(&answer), "not_found", "{method} {path}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("GET /v1/plugins"),
            "{answer}"
        );
    }

    // The token is needed, reads included.
    let req = Request::get("/v1/plugins/parker/parked")
        .body(Body::empty())
        .unwrap();
    let (status, answer) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");

    // Nothing parked yet.
    let (status, list) = api(&app, "GET", "/v1/plugins/parker/parked", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(
        list,
        json!({"plugin": "parker", "keys": [], "truncated": false})
    );
    let (status, answer) = api(&app, "GET", "/v1/plugins/parker/parked?limit=0", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(code(&answer), "invalid_query");

    // Redrive and discard bodies: exactly one of `keys` and `all`.
    for action in ["redrive", "discard"] {
        let path = format!("/v1/plugins/parker/parked/{action}");
        for (body, want) in [
            (json!({"keys": ["c-1"], "all": true}), "invalid_body"),
            (json!({}), "invalid_body"),
            (json!({"all": false}), "invalid_body"),
            (json!({"keys": []}), "invalid_body"),
            (json!({"keys": ["zz"], "hex": true}), "invalid_body"),
            (json!({"key": "c-1"}), "invalid_json"),
        ] {
            let (status, answer) = api(&app, "POST", &path, Some(body.clone())).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
            assert_eq!(code(&answer), want, "{body}: {answer}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(message.contains(r#"{"all":true}"#), "{body}: {message}");
        }
    }

    // A key that is not parked.
    let (status, answer) = api(&app, "GET", "/v1/plugins/parker/parked/c-404", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert_eq!(code(&answer), "not_parked", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("c-404"),
        "{answer}"
    );
    let (status, answer) = api(&app, "GET", "/v1/plugins/parker/parked/zz?hex=true", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(code(&answer), "invalid_key", "{answer}");

    // Dead-letter redrive: the range must not be empty; no dead-letter topic yet is zero.
    let path = "/v1/plugins/parker/dead-letters/redrive";
    for body in [
        json!({"from_ms": 10, "to_ms": 10}),
        json!({"from_ms": 20, "to_ms": 10}),
    ] {
        let (status, answer) = api(&app, "POST", path, Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(code(&answer), "invalid_body", "{body}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("to_ms"),
            "{answer}"
        );
    }
    let (status, answer) = api(&app, "POST", path, Some(json!({"since": 1}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(code(&answer), "invalid_json", "{answer}");
    let (status, answer) = api(&app, "POST", path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["topic"], "parker.dlq");
    assert_eq!(answer["scanned"], 0);
    assert_eq!(answer["requests"], 0);
}

/// An event of `topic`/`partition` at `offset` with `key` and `payload`.
fn event_at(topic: &str, partition: u32, offset: u64, key: &[u8], payload: &[u8]) -> Event {
    Event {
        topic: topic.into(),
        partition,
        offset,
        key: Some(key.to_vec()),
        payload: payload.to_vec(),
        headers: vec![Header::text("source", "test")],
        timestamp_ms: 1_700_000_000_000,
    }
}

/// Park `key` of `topic`/`partition` directly in the store (as the pipeline would) with
/// one queued event per payload.
async fn park(
    h: &Harness,
    plugin: &str,
    topic: &str,
    partition: u32,
    key: &[u8],
    payloads: &[&[u8]],
) {
    let info = h.rt.registry.active(plugin).unwrap().info().clone();
    let ns = parked::namespace(&info.namespace);
    let key_id = parked::key_id(Some(key));
    let mut writes = vec![parked::put(
        parked::key_entry(&key_id),
        &ParkedKey {
            key: parked::display_key(Some(key)),
            key_id: key_id.clone(),
            topic: topic.into(),
            partition,
            since_ms: parked::now_ms() - 60_000,
            first_reason: "rejected: bad amount".into(),
            version: "1.0.0".into(),
            events: payloads.len() as u64,
            redrives: 0,
            last_reason: None,
        },
        None,
    )];
    for (i, payload) in payloads.iter().enumerate() {
        let event = event_at(topic, partition, 40 + i as u64, key, payload);
        writes.push(parked::put(
            parked::queue_entry(&event),
            &ParkedEvent {
                event,
                reason: if i == 0 {
                    "rejected: bad amount".into()
                } else {
                    "queued behind a parked event".into()
                },
                kind: if i == 0 {
                    "rejected".into()
                } else {
                    "queued".into()
                },
                attempts: if i == 0 { 3 } else { 0 },
                version: "1.0.0".into(),
                parked_at_ms: parked::now_ms(),
            },
            None,
        ));
    }
    h.rt.backends.store.apply(&ns, &writes).await.unwrap();
}

/// The requests filed for `topic`/`partition` in `plugin`'s parked namespace, in id order.
async fn filed(h: &Harness, plugin: &str, topic: &str, partition: u32) -> Vec<parked::Request> {
    let info = h.rt.registry.active(plugin).unwrap().info().clone();
    let ns = parked::namespace(&info.namespace);
    h.rt.backends
        .store
        .scan(&ns, &parked::requests_prefix(topic, Some(partition)), 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, v)| serde_json::from_slice(&v).unwrap())
        .collect()
}

/// Keys parked on a topic no pipeline of the plugin reads, so the requests filed for them
/// stay in the store to be looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keys_are_shown_and_their_redrive_and_discard_filed_for_the_partitions_owner() {
    let (h, app) = park_api("parker", "park-in").await;
    park(
        &h,
        "parker",
        "unowned",
        2,
        b"c-1",
        &[b"{\"amount\":-1}", &[0xff, 0x00]],
    )
    .await;
    park(&h, "parker", "unowned", 2, b"a/b", &[b"x"]).await;
    park(&h, "parker", "unowned", 1, b"redrive", &[b"y"]).await;
    park(&h, "parker", "unowned", 0, &[0xfe, 0x01], &[b"z"]).await;

    let (status, list) = api(&app, "GET", "/v1/plugins/parker/parked", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let keys: Vec<&str> = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    // In key order (by hex): a/b, c-1, redrive, then the binary key shown in hex.
    assert_eq!(keys, vec!["a/b", "c-1", "redrive", "fe01"], "{list}");
    assert_eq!(list["truncated"], false);
    let (_, first) = api(&app, "GET", "/v1/plugins/parker/parked?limit=2", None).await;
    assert_eq!(first["keys"].as_array().unwrap().len(), 2, "{first}");
    assert_eq!(first["truncated"], true, "{first}");

    // One key and its queue: text payloads as they are, binary ones in base64.
    let (status, shown) = api(&app, "GET", "/v1/plugins/parker/parked/c-1", None).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["key"]["key"], "c-1");
    assert_eq!(shown["key"]["events"], 2);
    let events = shown["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{shown}");
    assert_eq!(events[0]["topic"], "unowned");
    assert_eq!(events[0]["partition"], 2);
    assert_eq!(events[0]["offset"], 40);
    assert_eq!(events[0]["key"], "c-1");
    assert_eq!(events[0]["payload"], "{\"amount\":-1}");
    assert_eq!(events[0]["payload_encoding"], "utf-8");
    assert_eq!(events[0]["kind"], "rejected");
    assert_eq!(events[0]["attempts"], 3);
    assert_eq!(events[0]["reason"], "rejected: bad amount");
    assert_eq!(events[0]["version"], "1.0.0");
    assert_eq!(events[0]["headers"]["source"], "test");
    assert_eq!(events[1]["payload"], "/wA=");
    assert_eq!(events[1]["payload_encoding"], "base64");
    assert_eq!(shown["truncated"], false);
    let (_, one) = api(&app, "GET", "/v1/plugins/parker/parked/c-1?limit=1", None).await;
    assert_eq!(one["events"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["truncated"], true, "{one}");
    // The same key in hex; a key with `/` percent-encoded; a key named like an action;
    // a binary key in hex.
    let (status, hexed) = api(
        &app,
        "GET",
        "/v1/plugins/parker/parked/632d31?hex=true",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{hexed}");
    assert_eq!(hexed, shown);
    let (status, slash) = api(&app, "GET", "/v1/plugins/parker/parked/a%2Fb", None).await;
    assert_eq!(status, StatusCode::OK, "{slash}");
    assert_eq!(slash["key"]["key"], "a/b");
    let (status, named) = api(&app, "GET", "/v1/plugins/parker/parked/redrive", None).await;
    assert_eq!(status, StatusCode::OK, "{named}");
    assert_eq!(named["key"]["key"], "redrive");
    let (status, binary) = api(&app, "GET", "/v1/plugins/parker/parked/fe01?hex=true", None).await;
    assert_eq!(status, StatusCode::OK, "{binary}");
    assert_eq!(binary["key"]["key_id"], "fe01");

    // A redrive of a parked key and one that is not: 202, one request filed, for the
    // key's topic and partition, in the plugin's parked namespace.
    let (status, answer) = api(
        &app,
        "POST",
        "/v1/plugins/parker/parked/redrive",
        Some(json!({"keys": ["c-1", "c-9", "c-1"]})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["plugin"], "parker");
    assert_eq!(answer["action"], "redrive");
    assert_eq!(answer["not_parked"], json!(["c-9"]));
    let requested = answer["requested"].as_array().unwrap();
    assert_eq!(requested.len(), 1, "{answer}");
    assert_eq!(requested[0]["key"], "c-1");
    assert_eq!(requested[0]["topic"], "unowned");
    assert_eq!(requested[0]["partition"], 2);
    let redrive_id = requested[0]["id"].as_str().unwrap().to_string();
    let on_2 = filed(&h, "parker", "unowned", 2).await;
    assert_eq!(on_2.len(), 1, "{on_2:?}");
    assert_eq!(on_2[0].id, redrive_id);
    assert_eq!(on_2[0].action, Action::Redrive);
    assert_eq!(on_2[0].key_id, parked::key_id(Some(b"c-1")));
    assert_eq!((on_2[0].topic.as_str(), on_2[0].partition), ("unowned", 2));
    assert!(on_2[0].events.is_empty());
    assert!(filed(&h, "parker", "unowned", 1).await.is_empty());

    // Discard every parked key: a request per key, on each key's partition, filed after
    // the redrive.
    let (status, answer) = api(
        &app,
        "POST",
        "/v1/plugins/parker/parked/discard",
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["action"], "discard");
    assert_eq!(answer["requested"].as_array().unwrap().len(), 4, "{answer}");
    assert_eq!(answer["not_parked"], json!([]));
    let on_2 = filed(&h, "parker", "unowned", 2).await;
    let actions: Vec<(Action, String)> =
        on_2.iter().map(|r| (r.action, r.key_id.clone())).collect();
    assert_eq!(
        actions,
        vec![
            (Action::Redrive, parked::key_id(Some(b"c-1"))),
            (Action::Discard, parked::key_id(Some(b"a/b"))),
            (Action::Discard, parked::key_id(Some(b"c-1"))),
        ],
        "{on_2:?}"
    );
    let on_0 = filed(&h, "parker", "unowned", 0).await;
    assert_eq!(on_0.len(), 1);
    assert_eq!(
        (on_0[0].action, on_0[0].key_id.as_str()),
        (Action::Discard, "fe01")
    );
    // Binary keys by hex.
    let (status, answer) = api(
        &app,
        "POST",
        "/v1/plugins/parker/parked/redrive",
        Some(json!({"keys": ["FE01"], "hex": true})),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["requested"][0]["key"], "fe01", "{answer}");
    assert_eq!(filed(&h, "parker", "unowned", 0).await.len(), 2);
}

/// A dead letter of `source` (`topic/partition/offset`) as the runtime writes one, made
/// by `plugin`.
fn dead_letter(key: &str, source: &str, plugin: &str) -> NewEvent {
    NewEvent {
        key: Some(key.as_bytes().to_vec()),
        payload: serde_json::to_vec(&json!({"op": "noop"})).unwrap(),
        headers: vec![
            Header::text("source", "test"),
            Header::text(headers::DLQ_REASON, "rejected"),
            Header::text(headers::DLQ_KIND, "rejected"),
            Header::text(headers::DLQ_ATTEMPTS, "1"),
            Header::text(headers::PLUGIN, plugin),
            Header::text(headers::SOURCE, source),
        ],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_redrive_counts_what_it_takes_and_what_it_skips() {
    let (h, app) = park_api("redriver", "dl-in").await;
    let before = parked::now_ms() as i64;
    h.bus()
        .append(
            "redriver.dlq",
            vec![
                dead_letter("c-1", "dl-in/0/5", "redriver"),
                dead_letter("c-1", "dl-in/0/3", "redriver"),
                // Dead-lettered again after a redrive: the same source event.
                dead_letter("c-1", "dl-in/0/5", "redriver"),
                // A topic the plugin no longer subscribes to.
                dead_letter("c-2", "gone/0/1", "redriver"),
                // Not a dead letter at all.
                NewEvent {
                    key: Some(b"c-2".to_vec()),
                    payload: b"{}".to_vec(),
                    headers: vec![],
                },
                // Another plugin's, on a shared dead-letter topic.
                dead_letter("c-3", "dl-in/1/1", "someone-else"),
            ],
        )
        .await
        .unwrap();
    let path = "/v1/plugins/redriver/dead-letters/redrive";
    let counts = |v: &Value| {
        [
            "scanned",
            "matched",
            "events",
            "keys",
            "requests",
            "not_dead_letters",
            "other_plugin",
            "not_subscribed",
            "duplicates",
        ]
        .map(|f| v[f].as_u64().unwrap_or_else(|| panic!("no `{f}` in {v}")))
    };

    let (status, all) = api(&app, "POST", path, Some(json!({}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{all}");
    assert_eq!(all["topic"], "redriver.dlq");
    assert_eq!(all["truncated"], false);
    assert_eq!(counts(&all), [6, 6, 2, 1, 1, 1, 1, 1, 1], "{all}");

    let (_, c2) = api(&app, "POST", path, Some(json!({"key": "c-2"}))).await;
    assert_eq!(counts(&c2), [6, 2, 0, 0, 0, 1, 0, 1, 0], "{c2}");

    // Written after `before`: a range ending before it matches nothing, one after takes all.
    let (_, early) = api(&app, "POST", path, Some(json!({"to_ms": before - 60_000}))).await;
    assert_eq!(counts(&early), [6, 0, 0, 0, 0, 0, 0, 0, 0], "{early}");
    let (_, late) = api(
        &app,
        "POST",
        path,
        Some(json!({"from_ms": before - 60_000, "to_ms": before + 3_600_000, "key": "c-1"})),
    )
    .await;
    assert_eq!(counts(&late), [6, 3, 2, 1, 1, 0, 0, 0, 1], "{late}");

    // What is still filed (the pipeline of dl-in may have carried some out already) carries
    // the key's dead letters in source order.
    for request in filed(&h, "redriver", "dl-in", 0).await {
        assert_eq!(request.action, Action::RedriveDeadLetters);
        assert_eq!(request.key_id, parked::key_id(Some(b"c-1")));
        let offsets: Vec<u64> = request.events.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, vec![3, 5], "{request:?}");
    }
}
