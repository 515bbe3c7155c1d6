//! A real Apache Cassandra node for tests — the `org.apache.cassandra:cassandra-all`
//! release named in `jvm-services.env`, run from its Maven Central jars on free loopback
//! ports with a small heap — and the CQL contact point the tests use.
//!
//! A Cassandra node takes 10–20 s to start on two cores, so the tests of one test binary
//! share one ([`Cassandra::shared`]), each in a keyspace of its own ([`fresh_keyspace`]);
//! it is stopped, and its data removed, when the test process exits (see [`crate::jvm`]).
//! `SPATE_TEST_CQL=host:port` points every test at an external ScyllaDB or Cassandra
//! instead ([`cql_node`]).
//!
//! The node is configured for a test machine, not for durability: one token, periodic
//! commit-log sync, no snapshots, small caches and memtables, `cassandra.unsafesystem`
//! (schema changes — a keyspace per test — are not fsynced). Everything the state store
//! relies on is Cassandra's own: lightweight transactions (Paxos), TTLs, range scans.

use crate::jvm::{self, JvmProcess};
use crate::services::{free_port, wait_listening};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How long a started node gets to open its CQL port.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// How many bytes of the node's log a panic message quotes.
const LOG_TAIL_BYTES: u64 = 6144;

/// The Cassandra release the tests run.
pub fn cassandra_version() -> &'static str {
    jvm::version("CASSANDRA_VERSION")
}

/// The options of Cassandra's `conf/jvm17-server.options` that Java 17 needs (module
/// exports and opens for its off-heap and reflection tricks), and the Netty settings
/// from the same file.
const JVM17_OPTIONS: &[&str] = &[
    "-Djdk.attach.allowAttachSelf=true",
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.server=ALL-UNNAMED",
    "--add-exports=java.sql/java.sql=ALL-UNNAMED",
    "--add-exports=java.base/java.lang.ref=ALL-UNNAMED",
    "--add-exports=jdk.unsupported/sun.misc=ALL-UNNAMED",
    "--add-exports=jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
    "--add-exports=jdk.attach/sun.tools.attach=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.loader=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.reflect=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.math=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.module=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.util.jar=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dio.netty.allocator.useCacheForAllThreads=true",
    "-Dio.netty.allocator.maxOrder=11",
];

/// An Apache Cassandra node on free loopback ports. Killed on drop; a
/// [`Cassandra::shared`] one when the test process exits.
pub struct Cassandra {
    addr: SocketAddr,
    dir: PathBuf,
    /// Owns the directory of a node started with [`Cassandra::start`]; `None` for the
    /// shared node, whose directory the watchdog removes.
    _owned: Option<tempfile::TempDir>,
    process: Mutex<Option<JvmProcess>>,
}

impl Cassandra {
    /// The node every test of this process shares, started by the first test that asks
    /// (blocking it for the start-up). Give each test its own keyspace ([`fresh_keyspace`]).
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<Cassandra> = OnceLock::new();
        SHARED.get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("spate-cassandra-")
                .tempdir()
                .unwrap_or_else(|e| panic!("tempdir: {e}"))
                .keep();
            Self::launch(dir, None, true)
        })
    }

    /// A node of its own (a test that stops or cuts its store must not take the shared one
    /// down for the others).
    pub fn start() -> Self {
        let owned = tempfile::Builder::new()
            .prefix("spate-cassandra-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let dir = owned.path().to_path_buf();
        Self::launch(dir, Some(owned), false)
    }

    fn launch(dir: PathBuf, owned: Option<tempfile::TempDir>, shared: bool) -> Self {
        let native_port = free_port();
        let storage_port = free_port();
        write_config(&dir, native_port, storage_port);
        let classpath = jvm::classpath("cassandra", cassandra_version());
        let mut args: Vec<OsString> = [
            "-Xms256m",
            "-Xmx768m",
            "-Xss512k",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            "-Dcassandra-foreground=yes",
            "-Dcassandra.unsafesystem=true",
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
            "-Dcassandra.ring_delay_ms=100",
            "-Dcassandra.superuser_setup_delay_ms=0",
            "-Dcassandra.skip_default_role_setup=true",
        ]
        .iter()
        .map(OsString::from)
        .chain(JVM17_OPTIONS.iter().map(OsString::from))
        .collect();
        let mut config = OsString::from("-Dcassandra.config=file://");
        config.push(dir.join("cassandra.yaml"));
        let mut logback = OsString::from("-Dlogback.configurationFile=");
        logback.push(dir.join("logback.xml"));
        let mut storage = OsString::from("-Dcassandra.storagedir=");
        storage.push(dir.join("data"));
        args.extend([
            config,
            logback,
            storage,
            "-cp".into(),
            classpath.into(),
            "org.apache.cassandra.service.CassandraDaemon".into(),
        ]);
        let log = dir.join("cassandra.log");
        let out = dir.join("jvm.out");
        let cleanup = shared.then_some(dir.as_path());
        let mut process = JvmProcess::spawn(&args, &dir, &out, cleanup);
        let addr = SocketAddr::from(([127, 0, 0, 1], native_port));
        let what = format!("Cassandra (log: {})", log.display());
        // The CQL port opens last, once the node serves requests; a node that dies on the
        // way fails at once with its log rather than after the timeout.
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                process.is_running(),
                "Cassandra exited during start-up; output {}\nlog {}",
                jvm::tail(&out, LOG_TAIL_BYTES),
                jvm::tail(&log, LOG_TAIL_BYTES)
            );
            assert!(
                started.elapsed() < START_TIMEOUT,
                "{what} did not open {addr} within {START_TIMEOUT:?}; log {}",
                jvm::tail(&log, LOG_TAIL_BYTES)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        wait_listening(addr, &what, START_TIMEOUT);
        eprintln!(
            "Apache Cassandra {} ready on {addr} in {:.1?}",
            cassandra_version(),
            started.elapsed()
        );
        Self {
            addr,
            dir,
            _owned: owned,
            process: Mutex::new(Some(process)),
        }
    }

    /// Its CQL (native protocol) address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("cassandra.log")
    }

    /// The end of the node's log, for panic messages.
    pub fn log_tail(&self) -> String {
        format!("log {}", jvm::tail(&self.log_path(), LOG_TAIL_BYTES))
    }
}

impl Drop for Cassandra {
    fn drop(&mut self) {
        let process = self
            .process
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut process) = process {
            process.stop("KILL");
        }
    }
}

/// The CQL contact point tests use: `SPATE_TEST_CQL` (`host:port` of an external ScyllaDB
/// or Cassandra) if set, else the [shared](Cassandra::shared) node of this process.
pub fn cql_node() -> String {
    match std::env::var("SPATE_TEST_CQL") {
        Ok(node) if !node.trim().is_empty() => node.trim().to_owned(),
        _ => Cassandra::shared().addr().to_string(),
    }
}

/// A keyspace name no other test of any run uses (`spate_t…`), so tests sharing a node
/// never see each other's state.
pub fn fresh_keyspace() -> String {
    format!("spate_{}", crate::unique_id())
}

fn write_config(dir: &Path, native_port: u16, storage_port: u16) {
    let data = dir.join("data");
    let yaml = format!(
        "cluster_name: spate-test\n\
         num_tokens: 1\n\
         initial_token: 0\n\
         partitioner: org.apache.cassandra.dht.Murmur3Partitioner\n\
         data_file_directories: [{data}/data]\n\
         commitlog_directory: {data}/commitlog\n\
         saved_caches_directory: {data}/saved_caches\n\
         hints_directory: {data}/hints\n\
         cdc_raw_directory: {data}/cdc_raw\n\
         commitlog_sync: periodic\n\
         commitlog_sync_period: 10000ms\n\
         seed_provider:\n  \
           - class_name: org.apache.cassandra.locator.SimpleSeedProvider\n    \
             parameters:\n      \
               - seeds: \"127.0.0.1:{storage_port}\"\n\
         listen_address: 127.0.0.1\n\
         rpc_address: 127.0.0.1\n\
         storage_port: {storage_port}\n\
         native_transport_port: {native_port}\n\
         start_native_transport: true\n\
         endpoint_snitch: SimpleSnitch\n\
         dynamic_snitch: false\n\
         auto_snapshot: false\n\
         snapshot_on_duplicate_row_detection: false\n\
         hinted_handoff_enabled: false\n\
         concurrent_reads: 8\n\
         concurrent_writes: 8\n\
         concurrent_counter_writes: 4\n\
         concurrent_compactors: 1\n\
         memtable_heap_space: 64MiB\n\
         memtable_offheap_space: 64MiB\n\
         key_cache_size: 8MiB\n\
         counter_cache_size: 0MiB\n\
         prepared_statements_cache_size: 8MiB\n\
         read_request_timeout: 10000ms\n\
         write_request_timeout: 10000ms\n\
         cas_contention_timeout: 5000ms\n",
        data = data.display(),
    );
    let logback = format!(
        "<configuration>\n\
         <appender name=\"FILE\" class=\"ch.qos.logback.core.FileAppender\">\n\
         <file>{log}</file>\n\
         <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>\n\
         </appender>\n\
         <root level=\"{level}\"><appender-ref ref=\"FILE\"/></root>\n\
         </configuration>\n",
        log = dir.join("cassandra.log").display(),
        level = std::env::var("SPATE_TEST_CASSANDRA_LOG").unwrap_or_else(|_| "INFO".into()),
    );
    for (name, text) in [("cassandra.yaml", yaml), ("logback.xml", logback)] {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}
