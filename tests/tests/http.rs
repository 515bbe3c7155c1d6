//! A real runtime process's HTTP server (`spate-node`, exactly what `spate up` runs),
//! driven over raw TCP where a well-behaved client would not do what a hostile one does:
//! a half-sent request head at SIGTERM, heads that never complete, idle keep-alive
//! connections, answers hyper gives before the router sees a request, and the metrics of
//! a deleted plugin.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use support::node::{Node, append, spawn_node, upload};
use support::{TOKEN, chaos_manifest};
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
            ("SPATE_API__IDLE_TIMEOUT_MS", "3000"),
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
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
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
    assert!(closed < Duration::from_millis(2500), "{closed:?}");

    // A keep-alive connection idle for longer than the header timeout but less than the
    // idle timeout still serves its next request; then it is closed after the idle timeout.
    let mut keep = TcpStream::connect(addr(&node)).await.unwrap();
    let req = b"GET /healthz HTTP/1.1\r\nHost: spate\r\n\r\n";
    keep.write_all(req).await.unwrap();
    assert_eq!(read_response(&mut keep).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    keep.write_all(req).await.unwrap();
    assert_eq!(read_response(&mut keep).await.0, 200);
    let (rest, idle) = read_until_closed(&mut keep, Duration::from_secs(10)).await;
    println!("idle keep-alive connection closed after {idle:?} (idle timeout 3 s)");
    assert!(rest.is_empty());
    assert!(
        idle >= Duration::from_millis(2800) && idle < Duration::from_millis(5000),
        "{idle:?}"
    );

    // A connection that never sends a byte: the idle timeout.
    let mut silent = TcpStream::connect(addr(&node)).await.unwrap();
    let (_, took) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(2800) && took < Duration::from_millis(5000),
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
    let page: Value = serde_json::from_slice(&raw).unwrap();
    let first = page["events"].as_array().unwrap().len();
    println!(
        "capped read: {} bytes of answer, {first} events of 1 MB, truncated = {} (cap {CAP})",
        raw.len(),
        page["truncated"]
    );
    assert!(raw.len() <= CAP + 1024, "{} bytes", raw.len());
    assert!(page["bytes"].as_u64().unwrap() <= CAP as u64);
    assert_eq!(first, 8);
    assert_eq!(page["truncated"], true);
    // The cursor continues where the cap stopped it.
    let from = page["next_from"].as_str().unwrap();
    let (_, rest) = get_json(
        &http,
        &node,
        &format!("/v1/topics/big/events?from={from}"),
        Some(TOKEN),
    )
    .await;
    let offsets: Vec<u64> = rest["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![8, 9, 10, 11]);
    assert_eq!(rest["truncated"], false);

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
