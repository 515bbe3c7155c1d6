//! Running Apache Kafka and Apache Cassandra from their Maven Central jars: where the jars
//! are (fetched once into `$SPATE_CACHE_DIR/jvm` by `scripts/jvm-services`, which the
//! harness runs itself when they are missing), which `java` runs them, and a child process
//! that cannot outlive the test process.
//!
//! A JVM is started under a small `sh` watchdog whose standard input is a pipe from this
//! process. When this process exits — normally, by a panic, or by SIGKILL — the pipe
//! closes, and the watchdog kills the JVM (and, for a service that lives as long as the test
//! process, removes its data directory). So a shared server needs no destructor, and a
//! crashed test run leaves no broker behind.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

/// The versions of the services, shared with `scripts/jvm-services`.
const VERSIONS: &str = include_str!("../jvm-services.env");

/// What to do when `java` or the jars are missing.
pub const JVM_INSTALL_HINT: &str = "the Kafka and Cassandra tests run the real servers from \
     their Maven Central jars on a JDK 17+: install one and Maven (Debian: `apt-get install -y \
     openjdk-17-jdk-headless maven`), then `scripts/jvm-services` fetches the jars once into \
     ~/.cache/spate/jvm (scripts/test does both)";

/// The version of a service named in `jvm-services.env` (`KAFKA_VERSION`, ...).
pub fn version(key: &str) -> &'static str {
    VERSIONS
        .lines()
        .filter_map(|line| line.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
        .unwrap_or_else(|| panic!("{key} is not set in runtime/conformance/jvm-services.env"))
}

/// `$SPATE_CACHE_DIR`, else `~/.cache/spate`.
pub(crate) fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SPATE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".cache/spate")
}

/// The directory of one service's release in the cache: `<cache>/jvm/<name>-<version>`.
pub(crate) fn release_dir(name: &str, version: &str) -> PathBuf {
    cache_dir().join("jvm").join(format!("{name}-{version}"))
}

/// The classpath of a service (`kafka` or `cassandra`) at `version`. Runs
/// `scripts/jvm-services <name>` first if the jars were never fetched (it takes a lock, so
/// concurrent test binaries fetch once).
pub(crate) fn classpath(name: &str, version: &str) -> String {
    static FETCH: Mutex<()> = Mutex::new(());
    let file = release_dir(name, version).join("classpath.txt");
    let read = || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|c| !c.trim().is_empty())
    };
    if let Some(classpath) = read() {
        return classpath.trim().to_owned();
    }
    let _one = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    if read().is_none() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/jvm-services");
        let status = Command::new(&script)
            .arg(name)
            .env("SPATE_CACHE_DIR", cache_dir())
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}. {JVM_INSTALL_HINT}", script.display()));
        assert!(
            status.success(),
            "{} {name} failed ({status}). {JVM_INSTALL_HINT}",
            script.display()
        );
    }
    read()
        .unwrap_or_else(|| {
            panic!(
                "{} is missing after fetching. {JVM_INSTALL_HINT}",
                file.display()
            )
        })
        .trim()
        .to_owned()
}

/// `$JAVA_HOME/bin/java`, else `java` on `PATH`.
pub(crate) fn java() -> PathBuf {
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let java = Path::new(&home).join("bin/java");
        if java.is_file() {
            return java;
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("java"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("java was not found. {JVM_INSTALL_HINT}"))
}

/// The watchdog: runs `"$@"` (the JVM) in the background and waits for it. A line on its
/// standard input names a signal to send the JVM (`TERM`, `KILL`); end of input (this
/// process is gone) kills the JVM and removes `$SPATE_CLEANUP`, if set, once it is dead.
/// Background jobs of a non-interactive shell get /dev/null as input, so the pipe is kept
/// on fd 3 for the watcher alone.
const WATCHDOG: &str = r#"
exec 3<&0 </dev/null
"$@" &
pid=$!
{
    if read -r sig <&3; then
        kill -"$sig" "$pid" 2>/dev/null
    else
        kill -9 "$pid" 2>/dev/null
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        [ -n "${SPATE_CLEANUP:-}" ] && rm -rf "$SPATE_CLEANUP"
    fi
} &
exec 3<&-
wait "$pid"
"#;

/// A JVM child process under the watchdog: see the [module docs](self).
pub(crate) struct JvmProcess {
    child: Child,
    control: Option<ChildStdin>,
}

impl JvmProcess {
    /// Run `java <args>` in `dir` with its output appended to `log`. `cleanup` is removed
    /// once this process has exited and the JVM is dead (for services that live as long as
    /// the process; never for ones that restart on the same data).
    pub(crate) fn spawn(args: &[OsString], dir: &Path, log: &Path, cleanup: Option<&Path>) -> Self {
        let java = java();
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(WATCHDOG)
            .arg("spate-jvm")
            .arg(&java)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // The test's own JVM settings must not leak into the servers.
            .env_remove("JAVA_TOOL_OPTIONS")
            .env_remove("JDK_JAVA_OPTIONS")
            .env_remove("_JAVA_OPTIONS");
        if let Some(path) = cleanup {
            command.env("SPATE_CLEANUP", path);
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {} under sh: {e}. {JVM_INSTALL_HINT}",
                java.display()
            )
        });
        let control = child.stdin.take();
        Self { child, control }
    }

    /// Whether the JVM is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The pid of the JVM itself, for reading its resource use from `/proc`: the child
    /// process is the `sh` watchdog, whose children are the JVM and the watcher (another
    /// `sh`). `None` if the JVM is gone or `/proc` does not say (not Linux).
    pub(crate) fn jvm_pid(&self) -> Option<u32> {
        let sh = self.child.id();
        // `children` lists the children of one thread; the watchdog has just the one.
        let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).ok()?;
        children
            .split_whitespace()
            .filter_map(|pid| pid.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim_end() == "java")
            })
    }

    /// Send the JVM `signal` (`"KILL"`, `"TERM"`) and wait for it to exit.
    pub(crate) fn stop(&mut self, signal: &str) {
        if let Some(mut control) = self.control.take() {
            let _ = writeln!(control, "{signal}");
        }
        let _ = self.child.wait();
    }
}

impl Drop for JvmProcess {
    fn drop(&mut self) {
        self.stop("KILL");
    }
}

/// The last `bytes` bytes of `path`, for panic messages.
pub(crate) fn tail(path: &Path, bytes: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(bytes)));
        let mut buf = Vec::new();
        let _ = file.read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    format!("{}:\n{text}", path.display())
}
