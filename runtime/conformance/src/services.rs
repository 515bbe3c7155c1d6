//! Real services for backend tests, each on a free loopback port and stopped when dropped:
//! Debian's `redis-server` as a child process and a TCP proxy that can cut a backend off
//! mid-run (Apache Kafka and Apache Cassandra are in [`crate::kafka`] and
//! [`crate::cassandra`]). The proxy runs on a thread of its own, so it outlives the test's
//! runtime and never competes with it for a scheduler.
//!
//! A missing `redis-server` binary is a test failure that says how to install it, never a
//! silent skip.

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

/// How long a started service gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a new Redis Cluster gets until every node reports every slot served: its nodes
/// learn of each other by gossip, which a loaded machine slows down.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What to run when `redis-server` is missing.
pub const REDIS_INSTALL_HINT: &str = "redis-server is not installed (or not on PATH); the Redis \
     backend tests start their own on a free loopback port. Install Debian's package with \
     `apt-get update && apt-get install -y redis-server` (scripts/test does this when run as \
     root), or set SPATE_REDIS_SERVER to the binary's path";

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"))
        .port()
}

/// Waits until `addr` accepts TCP connections; panics after `timeout` naming `what`.
pub(crate) fn wait_listening(addr: SocketAddr, what: &str, timeout: Duration) {
    let started = Instant::now();
    while StdStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            started.elapsed() < timeout,
            "{what} did not start listening on {addr} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `redis-server` binary: `$SPATE_REDIS_SERVER`, else the first on `PATH`.
fn redis_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SPATE_REDIS_SERVER") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| panic!("{REDIS_INSTALL_HINT}"))
}

/// A `redis-server` child process on a loopback port, without persistence. Killed on drop.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Start one on a free port; panics with [`REDIS_INSTALL_HINT`] when it is missing.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Start one with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let mut server = Self {
            port: free_port(),
            dir,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
        };
        server.restart();
        server
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kill the server at once (SIGKILL: no goodbye to clients) and wait for it to exit.
    /// Its data is gone, as after a crash of a cache without persistence.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same port (after [`RedisServer::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        let binary = redis_binary();
        let child = Command::new(&binary)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {}: {e}. {REDIS_INSTALL_HINT}", binary.display())
            });
        self.child = Some(child);
        wait_listening(self.addr(), "redis-server", START_TIMEOUT);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of three masters (no replicas), each a `redis-server` child process on
/// a free loopback port, with the slots assigned by `redis-cli --cluster create`. Killed on
/// drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Start three nodes and form the cluster; panics with [`REDIS_INSTALL_HINT`] when
    /// `redis-server` is missing.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(&["--cluster-enabled", "yes"]))
            .collect();
        let cli = redis_binary().with_file_name("redis-cli");
        let mut create = Command::new(&cli);
        create.args(["--cluster", "create"]);
        for n in &nodes {
            create.arg(n.addr().to_string());
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}. {REDIS_INSTALL_HINT}", cli.display()));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every node must see every slot served before clients may rely on it.
        let started = Instant::now();
        for n in &nodes {
            loop {
                let info = Command::new(&cli)
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    started.elapsed() < CLUSTER_READY_TIMEOUT,
                    "the Redis cluster did not become ready: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// `redis://127.0.0.1:<port>/` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A TCP proxy on a free loopback port in front of a backend. [`FaultProxy::cut`] drops
/// every open connection and refuses new ones (connections are accepted and closed at
/// once, as a dead node's load balancer would), until [`FaultProxy::restore`].
pub struct FaultProxy {
    addr: SocketAddr,
    up: watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    connections: Arc<std::sync::atomic::AtomicU64>,
}

impl FaultProxy {
    /// Start a proxy to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = StdListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind the proxy: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("no proxy address: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("proxy listener: {e}"));
        let (up, up_rx) = watch::channel(true);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&connections);
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => panic!("proxy runtime: {e}"),
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => panic!("proxy listener: {e}"),
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener, target, up_rx, counter) => {}
                    }
                });
            })
            .unwrap_or_else(|e| panic!("cannot start the proxy thread: {e}"));
        Self {
            addr,
            up,
            stop: Some(stop_tx),
            thread: Some(thread),
            connections,
        }
    }

    /// The address clients should use.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drop every connection and refuse new ones.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Forward connections again.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    up: watch::Receiver<bool>,
    connections: Arc<std::sync::atomic::AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if !*up.borrow() {
            drop(client);
            continue;
        }
        connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut up = up.clone();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = up.wait_for(|up| !*up) => {}
            }
        });
    }
}
