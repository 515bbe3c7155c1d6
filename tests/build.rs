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
    Ok(())
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
