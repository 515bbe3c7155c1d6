//! A real runtime process (`spate-node`, which runs exactly what `spate up` runs) for the
//! tests that kill, stop and restart runtimes: started on a free loopback port with its
//! data directory and log under a test directory, configured through `SPATE_*`
//! variables, and driven over its HTTP API.

use super::{TOKEN, chaos_wasm};
use spate_conformance::services::free_port;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Node {
    pub child: Child,
    pub base: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn spawn_node(dir: &Path, http: &reqwest::Client, env: &[(&str, &str)]) -> Node {
    spawn_node_with(dir, http, env, None).await
}

/// [`spawn_node`] with a configuration file under the variables.
pub async fn spawn_node_with(
    dir: &Path,
    http: &reqwest::Client,
    env: &[(&str, &str)],
    config: Option<&Path>,
) -> Node {
    let port = free_port();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_spate-node"))
        .arg(dir.join("data"))
        .arg(format!("127.0.0.1:{port}"))
        .args(config)
        .env("SPATE_API_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let node = Node {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{}/readyz", node.base)).send().await
            && r.status().is_success()
        {
            return node;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node never became ready; log: {}",
            std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `method path` on `node` with the token: the status and the JSON body (null if none).
pub async fn request(
    http: &reqwest::Client,
    method: reqwest::Method,
    node: &Node,
    path: &str,
) -> (u16, serde_json::Value) {
    let r = http
        .request(method, format!("{}{path}", node.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// `GET path` on `node`: the status and the JSON body.
pub async fn get(http: &reqwest::Client, node: &Node, path: &str) -> (u16, serde_json::Value) {
    request(http, reqwest::Method::GET, node, path).await
}

pub async fn upload(http: &reqwest::Client, node: &Node, manifest: String) {
    upload_query(http, node, manifest, "").await;
}

/// Uploads a test-chaos version through `POST /v1/plugins?{query}`; its JSON answer.
pub async fn upload_query(
    http: &reqwest::Client,
    node: &Node,
    manifest: String,
    query: &str,
) -> serde_json::Value {
    let form = reqwest::multipart::Form::new()
        .part("manifest", reqwest::multipart::Part::text(manifest))
        .part(
            "component",
            reqwest::multipart::Part::bytes(chaos_wasm()).file_name("chaos.wasm"),
        );
    let r = http
        .post(format!("{}/v1/plugins?{query}", node.base))
        .bearer_auth(TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// POSTs `events` to `topic` over a node's API; the status and the JSON body.
pub async fn post_events(
    http: &reqwest::Client,
    node: &Node,
    topic: &str,
    events: impl AsRef<[serde_json::Value]>,
) -> (u16, serde_json::Value) {
    let r = http
        .post(format!("{}/v1/topics/{topic}/events", node.base))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "events": events.as_ref() }))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// POSTs `events` to `topic`, which must take them all.
pub async fn append(
    http: &reqwest::Client,
    node: &Node,
    topic: &str,
    events: impl AsRef<[serde_json::Value]>,
) {
    let (status, body) = post_events(http, node, topic, events).await;
    assert_eq!(status, 201, "{body}");
}

/// `spate_events_total{plugin, outcome="ok"}` of a node.
pub async fn handled_ok(http: &reqwest::Client, node: &Node, plugin: &str) -> u64 {
    let plugin = format!("plugin=\"{plugin}\"");
    metric(
        http,
        node,
        "spate_events_total",
        &[&plugin, "outcome=\"ok\""],
    )
    .await as u64
}

/// The sum of a node's samples of metric `name` whose labels contain every `label`
/// (`key="value"` text); 0 if it has none or does not answer.
pub async fn metric(http: &reqwest::Client, node: &Node, name: &str, labels: &[&str]) -> f64 {
    let Ok(r) = http.get(format!("{}/metrics", node.base)).send().await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && labels.iter().all(|label| l.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A configuration file in `dir` putting the state in a fresh keyspace of the test binary's
/// Cassandra node (`spate_conformance::cassandra`); for [`spawn_node_with`].
pub fn cql_state_config(dir: &Path) -> std::path::PathBuf {
    cql_state_config_with_keyspace(dir).0
}

/// [`cql_state_config`], and the keyspace it names (for a test reading the store itself).
pub fn cql_state_config_with_keyspace(dir: &Path) -> (std::path::PathBuf, String) {
    use spate_conformance::cassandra::{cql_node, fresh_keyspace};
    let config = dir.join("spate.toml");
    let keyspace = fresh_keyspace();
    std::fs::write(
        &config,
        format!(
            "[state]\ntype = \"cql\"\nnodes = [\"{}\"]\nkeyspace = \"{}\"\n\
             replication = \"{{'class': 'SimpleStrategy', 'replication_factor': 1}}\"\n",
            cql_node(),
            keyspace
        ),
    )
    .unwrap();
    (config, keyspace)
}
