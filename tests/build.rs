//! Builds the `plugins/` workspace for `wasm32-wasip2` (release) so the end-to-end tests
//! run the plugins as they are in the tree, never committed binaries, and exports the
//! component paths to `src/lib.rs` as `SPATE_PLUGIN_*` compile-time variables.
//!
//! The nested cargo uses its own target directory (the outer one is locked by the build
//! that runs this script) and a scrubbed environment, so the outer build's flags,
//! wrappers (clippy's, coverage's) and target never leak into the Wasm build.

use std::env;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const TARGET: &str = "wasm32-wasip2";

/// Plugins the tests use: (env var suffix, output file name in the target dir).
const PLUGINS: &[(&str, &str)] = &[
    ("ORDER_TOTALS", "order_totals.wasm"),
    ("TEST_CHAOS", "test_chaos.wasm"),
    ("TEST_WRONG_WORLD", "test-wrong-world.wasm"),
    ("TRIVIAL", "trivial.wasm"),
];

/// Environment the outer cargo sets or inherits that must not configure the nested build.
const SCRUBBED_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_INCREMENTAL",
    "CARGO_PRIMARY_PACKAGE",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
    "__CARGO_FIX_PLZ",
    // Set for this build script only; a nested build script for wasm32 that is not given
    // a value by the nested cargo (say, a host-only `CARGO_CFG_*` key) must not see ours.
    "OUT_DIR",
    "TARGET",
    "HOST",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
    "RUSTC_LINKER",
    "CARGO_CRATE_NAME",
];

/// Prefixes of the same: `CARGO_TARGET_DIR`, `CARGO_TARGET_<TRIPLE>_RUSTFLAGS`,
/// `CARGO_BUILD_TARGET`, `CARGO_PROFILE_RELEASE_*`, coverage settings, and the
/// per-package variables of this build script.
const SCRUBBED_PREFIXES: &[&str] = &[
    "CARGO_TARGET_",
    "CARGO_BUILD_",
    "CARGO_PROFILE_",
    "CARGO_LLVM_COV",
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_RUSTC_CURRENT_DIR",
    "DEP_",
];

/// A build failure, printed as a plain message (cargo shows a build script's stderr).
struct Error(String);

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(message: impl Into<String>) -> Result<T, Error> {
    Err(Error(message.into()))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let Some(repo) = manifest_dir.parent() else {
        return fail("tests/ has no parent directory");
    };
    let plugins = repo.join("plugins");

    for path in [
        plugins.join("Cargo.toml"),
        plugins.join("Cargo.lock"),
        repo.join("sdk/rust/Cargo.toml"),
        repo.join("sdk/rust/src"),
        repo.join("wit"),
        // spate-sdk inherits its dependency versions from the root workspace.
        repo.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // Each plugin crate, but not a `plugins/target` left by a build by hand.
    let entries = std::fs::read_dir(&plugins)
        .map_err(|e| Error(format!("cannot list {}: {e}", plugins.display())))?;
    for entry in entries.flatten() {
        if entry.path().join("Cargo.toml").is_file() {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }
    println!("cargo:rerun-if-env-changed=SPATE_PLUGINS_TARGET_DIR");

    check_target_installed()?;

    let target_dir = match env::var_os("SPATE_PLUGINS_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => default_target_dir()?,
    };

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .args(["--target", TARGET, "--release", "--locked"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&plugins);
    for (key, _) in env::vars_os() {
        let Some(name) = key.to_str() else { continue };
        if SCRUBBED_VARS.contains(&name) || SCRUBBED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    eprintln!("running: {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| Error(format!("cannot run cargo for plugins/: {e}")))?;
    if !status.success() {
        return fail(format!(
            "building plugins/ for {TARGET} failed ({status}); the output above says why. \
             Reproduce with: cargo build --release --target {TARGET} --manifest-path {}",
            plugins.join("Cargo.toml").display()
        ));
    }

    let out = target_dir.join(TARGET).join("release");
    for (name, file) in PLUGINS {
        let wasm = out.join(file);
        if !wasm.is_file() {
            return fail(format!(
                "the plugins build did not produce {}",
                wasm.display()
            ));
        }
        println!("cargo:rustc-env=SPATE_PLUGIN_{name}={}", wasm.display());
    }
    println!("cargo:rustc-env=SPATE_PLUGINS_DIR={}", plugins.display());

    build_guests(repo, &target_dir)
}

/// Plugins in other languages the tests use: (env var suffix, language, directory under
/// `plugins/`, handler file). Built with the SDK's build script into
/// `<target>/wasm-guests` (or `$SPATE_GUESTS_TARGET_DIR`).
const GUESTS: &[(&str, Lang, &str, &str)] = &[
    (
        "ORDER_TOTALS_PY",
        Lang::Python,
        "order-totals-py",
        "handler.py",
    ),
    ("TEST_CHAOS_PY", Lang::Python, "test-chaos-py", "handler.py"),
    ("ORDER_TOTALS_JS", Lang::Js, "order-totals-js", "handler.js"),
    ("TEST_CHAOS_JS", Lang::Js, "test-chaos-js", "handler.js"),
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Lang {
    Python,
    Js,
}

impl Lang {
    /// The SDK directory, the interpreter and the build script in it.
    fn build_command(self, repo: &Path) -> (&'static str, PathBuf) {
        match self {
            Lang::Python => ("python3", repo.join("sdk/python/build.py")),
            Lang::Js => ("node", repo.join("sdk/js/build.mjs")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }
}

/// Build the Python and JavaScript plugins with their SDKs' build scripts, and export
/// `SPATE_GUEST_<NAME>` (the component path) and `SPATE_GUEST_<NAME>_ERROR` for each.
///
/// A component is rebuilt only when a hash of its inputs (handler directory, SDK, WIT,
/// installed toolchain) changes, so every profile and `cargo` command shares one build.
/// A missing toolchain does not fail this script: the error says how to install it, and
/// the tests that need the component fail with it (the rest of the workspace still builds).
/// A handler that does not build fails this script, like a Rust plugin would.
fn build_guests(repo: &Path, plugins_target: &Path) -> Result<(), Error> {
    let guests_dir = guest_toolchains_dir();
    for path in [
        repo.join("sdk/python/spate"),
        repo.join("sdk/python/build.py"),
        repo.join("sdk/python/requirements-build.txt"),
        repo.join("sdk/js/src"),
        repo.join("sdk/js/build.mjs"),
        repo.join("sdk/js/toolchain/package-lock.json"),
        // Installing or updating a toolchain rewrites its stamp.
        guests_dir.join("python/.spate-stamp"),
        guests_dir.join("js/.spate-stamp"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for var in [
        "SPATE_GUESTS_TARGET_DIR",
        "SPATE_GUESTS_DIR",
        "SPATE_CACHE_DIR",
        "SPATE_COMPONENTIZE_PY",
        "SPATE_JS_TOOLCHAIN",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = match env::var_os("SPATE_GUESTS_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => plugins_target.with_file_name("wasm-guests"),
    };
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| Error(format!("cannot create {}: {e}", out_dir.display())))?;

    // Start every stale build at once (they are separate processes), then collect them.
    let mut running = Vec::new();
    for &(name, lang, dir, file) in GUESTS {
        let plugin_dir = repo.join("plugins").join(dir);
        println!("cargo:rerun-if-changed={}", plugin_dir.display());
        let wasm = out_dir.join(format!("{dir}.wasm"));
        let stamp_path = out_dir.join(format!("{dir}.stamp"));
        let (interpreter, script) = lang.build_command(repo);
        let stamp = inputs_hash(&[
            plugin_dir.as_path(),
            script.as_path(),
            &repo.join("sdk").join(lang.name()),
            &repo.join("wit"),
            &guests_dir.join(lang.name()).join(".spate-stamp"),
        ]);
        if wasm.is_file() && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
            running.push((name, lang, wasm, stamp_path, stamp, None));
            continue;
        }
        let _ = std::fs::remove_file(&stamp_path);
        let mut cmd = Command::new(interpreter);
        cmd.arg(&script)
            .arg(plugin_dir.join(file))
            .arg(&wasm)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        eprintln!("running: {cmd:?}");
        let child = cmd.spawn().map_err(|e| e.to_string());
        running.push((name, lang, wasm, stamp_path, stamp, Some(child)));
    }

    let mut failures = Vec::new();
    for (name, lang, wasm, stamp_path, stamp, child) in running {
        let missing = |why: String| {
            let message = format!(
                "the {} toolchain is missing ({why}); install it with `scripts/guest-toolchains.sh {}` \
                 (scripts/test does), then rebuild the tests",
                lang.name(),
                lang.name()
            );
            println!("cargo:warning={message}");
            println!("cargo:rustc-env=SPATE_GUEST_{name}=");
            println!("cargo:rustc-env=SPATE_GUEST_{name}_ERROR={message}");
        };
        let output = match child {
            None => {
                export_guest(name, &wasm);
                continue;
            }
            Some(Err(e)) => {
                let (interpreter, _) = lang.build_command(Path::new(""));
                missing(format!("cannot run {interpreter}: {e}"));
                continue;
            }
            Some(Ok(child)) => child
                .wait_with_output()
                .map_err(|e| Error(format!("waiting for the {name} build: {e}")))?,
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprintln!(
            "{name}: {}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
        match output.status.code() {
            Some(0) if wasm.is_file() => {
                std::fs::write(&stamp_path, &stamp)
                    .map_err(|e| Error(format!("cannot write {}: {e}", stamp_path.display())))?;
                export_guest(name, &wasm);
            }
            // The build scripts exit 127 when the toolchain is not installed.
            Some(127) => missing(
                stderr
                    .lines()
                    .find(|l| l.starts_with("error:"))
                    .unwrap_or("toolchain not found")
                    .trim_start_matches("error: ")
                    .to_string(),
            ),
            _ => failures.push(format!(
                "building {name} failed ({}); its output is above",
                output.status
            )),
        }
    }
    if !failures.is_empty() {
        return fail(failures.join("\n"));
    }
    Ok(())
}

fn export_guest(name: &str, wasm: &Path) {
    println!("cargo:rustc-env=SPATE_GUEST_{name}={}", wasm.display());
    println!("cargo:rustc-env=SPATE_GUEST_{name}_ERROR=");
}

/// `${SPATE_GUESTS_DIR:-${SPATE_CACHE_DIR:-~/.cache/spate}/guests}`, as in
/// `scripts/guest-toolchains.sh`.
fn guest_toolchains_dir() -> PathBuf {
    if let Some(dir) = env::var_os("SPATE_GUESTS_DIR") {
        return PathBuf::from(dir);
    }
    let cache = env::var_os("SPATE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cache/spate")
        });
    cache.join("guests")
}

/// A hash of the contents and relative paths of every file under `paths` (missing ones
/// included as such), skipping `target` and `node_modules` directories.
fn inputs_hash(paths: &[&Path]) -> String {
    use std::hash::{Hash, Hasher};
    let mut files = Vec::new();
    for path in paths {
        collect_files(path, &mut files);
    }
    files.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for file in files {
        file.hash(&mut h);
        std::fs::read(&file).ok().hash(&mut h);
    }
    format!("{:016x}\n", h.finish())
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            let name = entry.file_name();
            if p.is_dir() && (name == "target" || name == "node_modules" || name == "__pycache__") {
                continue;
            }
            collect_files(&p, out);
        }
    } else {
        out.push(path.to_path_buf());
    }
}

fn var(name: &str) -> Result<String, Error> {
    env::var(name).map_err(|e| Error(format!("{name}: {e}")))
}

/// `wasm-plugins` beside the outer build's profile directories, so every profile and
/// every `cargo` command (build, test, clippy) shares one incremental Wasm build.
/// `OUT_DIR` is `<target>/<profile>/build/<pkg>-<hash>/out`.
fn default_target_dir() -> Result<PathBuf, Error> {
    let out_dir = PathBuf::from(var("OUT_DIR")?);
    match out_dir.ancestors().nth(4) {
        Some(target) => Ok(target.join("wasm-plugins")),
        None => Ok(out_dir.join("wasm-plugins")),
    }
}

/// Fail early, with the fix, when the toolchain lacks the Wasm target: cargo's own error
/// ("can't find crate for `core`") does not say what to do.
fn check_target_installed() -> Result<(), Error> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let output = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| Error(format!("cannot run {}: {e}", Path::new(&rustc).display())))?;
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let target_lib = Path::new(&sysroot).join("lib/rustlib").join(TARGET);
    if !output.status.success() || !target_lib.is_dir() {
        return fail(format!(
            "the {TARGET} target is not installed for the toolchain at `{sysroot}`, and the \
             end-to-end tests build their plugins with it. Install it with: \
             rustup target add {TARGET}"
        ));
    }
    Ok(())
}
