//! Scale-out: three runtime processes sharing one plugin registry (kept in the CQL store,
//! changes announced on a compacted Kafka control topic), one consumer group, state in the
//! CQL server and the cache in Redis — all real services on loopback. An upload to one
//! runtime reaches the others within 2 s; a runtime restarted with an empty data
//! directory loads the active version before it consumes; a SIGKILLed runtime loses
//! nothing; a rollback switches every runtime. A shadow candidate runs on every runtime and
//! any runtime reports on the whole cluster; promoting it cuts each partition at an offset
//! across the runtimes, also when one is SIGKILLed just after. The two tests take turns
//! (each runs a broker and three nodes).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use serde_json::Value;
use spate_conformance::cassandra::{cql_node, fresh_keyspace};
use spate_conformance::kafka::{KafkaBroker, produce};
use spate_conformance::services::RedisServer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::kafka::*;
use support::node::{Node, handled_ok, spawn_node_with, upload, upload_query};
use support::{TOKEN, chaos_manifest};

/// The cluster configuration every runtime gets (each its own data directory).
fn cluster_toml(broker: &str, cql: &str, keyspace: &str, redis: &str) -> String {
    format!(
        r#"
[events]
type = "kafka"
bootstrap-servers = "{broker}"
session-timeout-ms = 6000
revoke-timeout-ms = 5000
produce-timeout-ms = 3000
request-timeout-ms = 3000

[state]
type = "cql"
nodes = ["{cql}"]
keyspace = "{keyspace}"
request-timeout-ms = 2000

[cache]
type = "redis"
urls = ["{redis}"]

[read-through]
enabled = true

[registry]
type = "shared"
control-topic = "spate.registry"

[dispatch]
max-buffered = {MAX_BUFFERED}
"#
    )
}

struct Cluster {
    root: tempfile::TempDir,
    config: PathBuf,
    broker: KafkaBroker,
    http: reqwest::Client,
    _redis: RedisServer,
}

impl Cluster {
    async fn start() -> Self {
        let broker = KafkaBroker::start();
        for (topic, partitions) in [("chaos", 6), ("out", 6), ("workflows", 1), ("chaos.dlq", 1)] {
            broker.create_topic(topic, partitions).await;
        }
        broker.create_compacted_topic("spate.registry", 1).await;
        let redis = RedisServer::start();
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join("spate.toml");
        std::fs::write(
            &config,
            cluster_toml(
                &broker.bootstrap(),
                &cql_node(),
                &fresh_keyspace(),
                &redis.url(),
            ),
        )
        .unwrap();
        Self {
            root,
            config,
            broker,
            http: reqwest::Client::new(),
            _redis: redis,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    async fn node(&self, name: &str) -> Node {
        let dir = self.dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = format!(
            "warn,spate::runtime=info,spate_engine=info,{}",
            std::env::var("SPATE_TEST_NODE_LOG").unwrap_or_default()
        );
        spawn_node_with(&dir, &self.http, &[("RUST_LOG", &log)], Some(&self.config)).await
    }

    fn bootstrap(&self) -> String {
        self.broker.bootstrap()
    }

    /// The active version of `plugin` on `node`, if any.
    async fn active(&self, node: &Node, plugin: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/v1/plugins/{plugin}", node.base))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        let v: Value = r.json().await.ok()?;
        v["active"].as_str().map(str::to_string)
    }

    /// Wait until every node serves `version` of `plugin`; returns how long it took.
    async fn wait_active(&self, nodes: &[&Node], plugin: &str, version: &str) -> Duration {
        let started = Instant::now();
        for n in nodes {
            while self.active(n, plugin).await.as_deref() != Some(version) {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "{} never switched to {plugin}@{version} (serves {:?})",
                    n.base,
                    self.active(n, plugin).await
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        started.elapsed()
    }

    async fn get(&self, node: &Node, path: &str) -> (u16, Value) {
        support::node::get(&self.http, node, path).await
    }

    /// `POST path` on `node`, which must succeed: the JSON body.
    async fn post(&self, node: &Node, path: &str) -> Value {
        let (status, body) =
            support::node::request(&self.http, reqwest::Method::POST, node, path).await;
        assert!((200..300).contains(&status), "{path}: {status} {body}");
        body
    }
}

fn manifest(version: &str) -> String {
    chaos_manifest("chaos", version, "chaos", "[limits]\nconcurrency = 16\n")
}

/// Versions (header `spate-plugin-version`) of the emits of seqs in `range`.
fn versions_of(
    out: &[spate_conformance::kafka::Record],
    range: std::ops::Range<usize>,
) -> HashMap<String, usize> {
    let mut versions = HashMap::new();
    for r in out {
        let Some(seq) = payload(r)["seq"].as_u64() else {
            continue;
        };
        if range.contains(&(seq as usize)) {
            *versions
                .entry(header(r, "spate-plugin-version").unwrap_or("?").to_string())
                .or_insert(0) += 1;
        }
    }
    versions
}

async fn wait_ready(http: &reqwest::Client, node: &Node, dir: &Path) {
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{}/readyz", node.base)).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never ready; log: {}",
            std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tests of this binary take turns: each runs a broker and three runtimes, and two at
/// once on two cores would make the timed switches flaky.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtimes_share_the_registry_scale_out_and_lose_nothing() {
    let _turn = TURN.lock().await;
    let c = Cluster::start().await;
    let b = c.bootstrap();
    let mut nodes = vec![c.node("n0").await, c.node("n1").await, c.node("n2").await];

    // Upload to one runtime: the others load, compile and switch to it.
    upload(&c.http, &nodes[0], manifest("1.0.0")).await;
    let took = c
        .wait_active(&[&nodes[1], &nodes[2]], "chaos", "1.0.0")
        .await;
    eprintln!("1.0.0 uploaded to n0 served by n1 and n2 after {took:?}");
    for (i, n) in nodes.iter().enumerate() {
        wait_ready(&c.http, n, &c.dir(&format!("n{i}"))).await;
    }
    produce(&b, "chaos", &op_events(0..600, 30)).await;
    let out = read_all_seqs(&b, "out", 600, Duration::from_secs(60)).await;
    assert_eq!(
        versions_of(&out, 0..600),
        HashMap::from([("1.0.0".into(), 600)])
    );

    // A new version uploaded to n1 serves everywhere within 2 s.
    upload(&c.http, &nodes[1], manifest("2.0.0")).await;
    let took = c
        .wait_active(&[&nodes[0], &nodes[2]], "chaos", "2.0.0")
        .await;
    eprintln!("2.0.0 uploaded to n1 served by n0 and n2 after {took:?}");
    // Notices, not the 30 s re-read (RESYNC_INTERVAL): well under it even on a loaded box.
    assert!(took <= Duration::from_secs(10), "switch took {took:?}");
    // Every consumer is in the group again before the next events (a node that is still
    // rejoining would leave its share to the others).
    for (i, n) in nodes.iter().enumerate() {
        wait_ready(&c.http, n, &c.dir(&format!("n{i}"))).await;
    }
    let before: Vec<u64> =
        futures::future::join_all(nodes.iter().map(|n| handled_ok(&c.http, n, "chaos"))).await;
    produce(&b, "chaos", &op_events(600..1200, 30)).await;
    let out = read_all_seqs(&b, "out", 1200, Duration::from_secs(60)).await;
    assert_eq!(
        versions_of(&out, 600..1200),
        HashMap::from([("2.0.0".into(), 600)]),
        "every event after the switch handled by the new version"
    );
    for (i, n) in nodes.iter().enumerate() {
        assert!(
            handled_ok(&c.http, n, "chaos").await > before[i],
            "n{i} took part after the switch; its log: {}",
            std::fs::read_to_string(c.dir(&format!("n{i}")).join("node.log")).unwrap_or_default()
        );
    }

    // Restart a runtime with an empty data directory: nothing local is needed; it loads
    // the active version before it takes partitions.
    let old = nodes.remove(2);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &old.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    drop(old);
    std::fs::remove_dir_all(c.dir("n2")).unwrap();
    let fresh = c.node("n2").await;
    assert_eq!(
        c.active(&fresh, "chaos").await.as_deref(),
        Some("2.0.0"),
        "the restarted runtime serves the active version as soon as it answers"
    );
    wait_ready(&c.http, &fresh, &c.dir("n2")).await;
    nodes.push(fresh);

    // SIGKILL one runtime mid-stream: nothing is lost.
    let producer = {
        let b = b.clone();
        tokio::spawn(async move { produce_paced(&b, 1200..4200, Duration::from_secs(4)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut victim = nodes.remove(1);
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    drop(victim);
    producer.await.unwrap();
    let out = read_all_seqs(&b, "out", 4200, Duration::from_secs(120)).await;
    let counts = seq_counts(&out);
    let missing = (0..4200u64).filter(|s| !counts.contains_key(s)).count();
    assert_eq!(missing, 0, "events lost after a runtime was killed");
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    eprintln!("SIGKILL of a runtime: {duplicates} duplicated emits");

    // Roll back on one runtime: every runtime switches.
    let body = c.post(&nodes[0], "/v1/plugins/chaos/rollback").await;
    eprintln!("rollback: {body}");
    let refs: Vec<&Node> = nodes.iter().collect();
    let took = c.wait_active(&refs, "chaos", "1.0.0").await;
    eprintln!("rollback on n0 served by all after {took:?}");
    // Notices, not the 30 s re-read (RESYNC_INTERVAL): well under it even on a loaded box.
    assert!(took <= Duration::from_secs(10), "rollback took {took:?}");
    produce(&b, "chaos", &op_events(4200..4800, 30)).await;
    let out = read_all_seqs(&b, "out", 4800, Duration::from_secs(60)).await;
    assert_eq!(
        versions_of(&out, 4200..4800),
        HashMap::from([("1.0.0".into(), 600)]),
        "every event after the rollback handled by the old version"
    );
}

/// Waits until `f` of the shadow report `node` answers holds; returns that report.
async fn shadow_until(c: &Cluster, node: &Node, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (status, r) = c.get(node, "/v1/plugins/chaos/shadow").await;
        if status == 200 && f(&r) {
            return r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: {status} {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn seen(r: &Value) -> u64 {
    r["compared"].as_u64().unwrap_or(0) + r["skipped"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_candidate_is_reported_and_promoted_across_the_cluster() {
    let _turn = TURN.lock().await;
    let c = Cluster::start().await;
    let b = c.bootstrap();
    let nodes = [c.node("n0").await, c.node("n1").await, c.node("n2").await];
    upload(&c.http, &nodes[0], manifest("1.0.0")).await;
    c.wait_active(&[&nodes[1], &nodes[2]], "chaos", "1.0.0")
        .await;
    for (i, n) in nodes.iter().enumerate() {
        wait_ready(&c.http, n, &c.dir(&format!("n{i}"))).await;
    }

    // The candidate, uploaded to n1, runs on every runtime: n2's report names all three.
    let body = upload_query(&c.http, &nodes[1], manifest("2.0.0"), "shadow=true").await;
    assert_eq!(body["shadow"], true, "{body}");
    shadow_until(&c, &nodes[2], "every runtime runs the candidate", |r| {
        r["candidate"] == "2.0.0" && r["runtimes"].as_array().map_or(0, Vec::len) == 3
    })
    .await;
    produce(&b, "chaos", &op_events(0..1500, 30)).await;
    let out = read_all_seqs(&b, "out", 1500, Duration::from_secs(60)).await;
    assert_eq!(
        versions_of(&out, 0..1500),
        HashMap::from([("1.0.0".into(), 1500)]),
        "the candidate emitted nothing"
    );
    // Each runtime saw its own partitions' events; any runtime sums them.
    let r = shadow_until(&c, &nodes[0], "every event compared or skipped", |r| {
        seen(r) >= 1500
    })
    .await;
    eprintln!("cluster shadow report from n0: {r}");
    assert_eq!(seen(&r), 1500, "{r}");
    let compared = r["compared"].as_u64().unwrap();
    assert!(compared > 0, "{r}");
    assert_eq!(r["identical"].as_u64(), Some(compared), "{r}");
    // n1 sums its own live count and the others' as they published them (a second old).
    let other = shadow_until(&c, &nodes[1], "n1 answers for the cluster too", |r| {
        seen(r) >= 1500
    })
    .await;
    assert_eq!(seen(&other), 1500, "{other}");

    // Promote on n2 while events flow: each partition is cut at an offset, whichever
    // runtime owns it, and every event is handled once, by the version its cut says.
    let producer = {
        let b = b.clone();
        tokio::spawn(async move { produce_paced(&b, 1500..4500, Duration::from_secs(4)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = c.post(&nodes[2], "/v1/plugins/chaos/promote").await;
    assert_eq!(
        (body["active"].as_str(), body["from"].as_str()),
        (Some("2.0.0"), Some("1.0.0")),
        "{body}"
    );
    producer.await.unwrap();
    let refs: Vec<&Node> = nodes.iter().collect();
    c.wait_active(&refs, "chaos", "2.0.0").await;
    let out = read_all_seqs(&b, "out", 4500, Duration::from_secs(60)).await;
    let counts = seq_counts(&out);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled twice: {twice:?}");
    assert_eq!(counts.len(), 4500, "every event handled");
    let (status, show) = c.get(&nodes[0], "/v1/plugins/chaos").await;
    assert_eq!(status, 200, "{show}");
    let cuts = &show["promotions"][0]["cuts"];
    let (mut old, mut new) = (0, 0);
    for r in &out {
        let source = header(r, "spate-source").unwrap();
        let (tp, offset) = source.rsplit_once('/').unwrap();
        let offset: u64 = offset.parse().unwrap();
        let cut = cuts[tp]
            .as_u64()
            .unwrap_or_else(|| panic!("no cut for {tp}: {show}"));
        let want = if offset < cut { "1.0.0" } else { "2.0.0" };
        assert_eq!(
            header(r, "spate-plugin-version"),
            Some(want),
            "{source} (cut {cut})"
        );
        if offset < cut { old += 1 } else { new += 1 }
    }
    eprintln!("cuts {cuts}: {old} events on 1.0.0, {new} on 2.0.0");
    assert!(old >= 1500 && new > 0, "old {old}, new {new}");
    for n in &nodes {
        let (status, r) = c.get(n, "/v1/plugins/chaos/shadow").await;
        assert_eq!(status, 404, "no shadow after the promotion: {r}");
    }

    // Again, and SIGKILL a runtime just after the promotion: the partitions it held go to
    // the others, which load the cuts from the store (or, where it died before storing
    // one, cut at the position they start from). Nothing is lost; no event below its cut
    // is handled by the new version; every event has an emit of the version its cut says.
    // A copy from the old version at or above a cut can only be the killed runtime's
    // (handled, emitted, not yet checkpointed: at-least-once emits), so it is a duplicate.
    upload_query(&c.http, &nodes[0], manifest("3.0.0"), "shadow=true").await;
    shadow_until(&c, &nodes[1], "every runtime runs 3.0.0", |r| {
        r["candidate"] == "3.0.0" && r["runtimes"].as_array().map_or(0, Vec::len) == 3
    })
    .await;
    // A backlog, promoted while the runtimes are in the middle of it.
    produce(&b, "chaos", &op_events(4500..7500, 30)).await;
    let body = c.post(&nodes[1], "/v1/plugins/chaos/promote").await;
    assert_eq!(body["active"], "3.0.0", "{body}");
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_millis()
        % 100;
    tokio::time::sleep(Duration::from_millis(u64::from(jitter))).await;
    let [n0, n1, mut n2] = nodes;
    n2.child.kill().unwrap();
    n2.child.wait().unwrap();
    eprintln!("n2 killed {jitter} ms after the promotion");
    // n2's partitions are cut (and re-handled above the cut) only by their next owners,
    // once n2's session expires; if n2 had emitted all of its events before it died, every
    // seq is in `out` before that. Wait for every cut and every commit first.
    let started = Instant::now();
    let show = loop {
        let (_, show) = c.get(&n0, "/v1/plugins/chaos").await;
        let cuts = show["promotions"][1]["cuts"]
            .as_object()
            .map_or(0, |m| m.len());
        if cuts == 6 {
            break show;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the cuts never completed: {show}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    wait_group_at_end(&b, "spate.chaos", "chaos", Duration::from_secs(90), None).await;
    let out = read_all_seqs(&b, "out", 7500, Duration::from_secs(90)).await;
    let counts = seq_counts(&out);
    assert_eq!(
        (4500..7500u64).filter(|s| !counts.contains_key(s)).count(),
        0,
        "events lost"
    );
    let cuts = &show["promotions"][1]["cuts"];
    assert_eq!(show["promotions"][1]["to"], "3.0.0", "{show}");
    let mut right: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let (mut old, mut new, mut stale) = (0, 0, 0);
    for r in &out {
        let seq = payload(r)["seq"].as_u64().unwrap();
        if seq < 4500 {
            continue;
        }
        let source = header(r, "spate-source").unwrap();
        let (tp, offset) = source.rsplit_once('/').unwrap();
        let offset: u64 = offset.parse().unwrap();
        let cut = cuts[tp]
            .as_u64()
            .unwrap_or_else(|| panic!("no cut for {tp}: {show}"));
        let version = header(r, "spate-plugin-version");
        match (offset < cut, version) {
            (true, Some("2.0.0")) => {
                old += 1;
                right.insert(seq);
            }
            (false, Some("3.0.0")) => {
                new += 1;
                right.insert(seq);
            }
            (false, Some("2.0.0")) => stale += 1,
            _ => panic!("{source} (cut {cut}) handled by {version:?}"),
        }
    }
    let wrong: Vec<u64> = (4500..7500).filter(|s| !right.contains(s)).collect();
    assert!(
        wrong.is_empty(),
        "no emit of the version their cut says: {wrong:?}"
    );
    eprintln!(
        "cuts {cuts}: {old} emits on 2.0.0, {new} on 3.0.0, {stale} stale copies from the killed runtime"
    );
    c.wait_active(&[&n0, &n1], "chaos", "3.0.0").await;
}
