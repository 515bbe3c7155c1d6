//! Shared helpers for Spate's end-to-end tests.
//!
//! [`plugins`] locates the plugin components that `build.rs` builds from `plugins/` for
//! `wasm32-wasip2` on every test build (never committed binaries), and their manifests;
//! [`guests`] the Python and JavaScript plugins that `build.rs` builds with their SDKs.

pub mod guests {
    //! The plugins written in Python and JavaScript (`plugins/*-py`, `plugins/*-js`), built
    //! by `build.rs` with their SDK's build script. If a toolchain was missing at build
    //! time, asking for its components panics with how to install it.

    /// A component built from a handler in another language.
    #[derive(Clone, Copy, Debug)]
    pub struct Guest {
        /// Directory under `plugins/` (also the plugin's name in its `spate.toml`).
        pub name: &'static str,
        /// Path of the built component; empty if it could not be built.
        pub path: &'static str,
        /// Why it could not be built (how to install the toolchain); empty if it was.
        pub error: &'static str,
    }

    impl Guest {
        /// The component's bytes.
        ///
        /// # Panics
        ///
        /// If the component was not built (the message says how to install the toolchain),
        /// or cannot be read.
        pub fn component(&self) -> Vec<u8> {
            assert!(
                self.error.is_empty(),
                "{} was not built: {}",
                self.name,
                self.error
            );
            std::fs::read(self.path)
                .unwrap_or_else(|e| panic!("cannot read the component {}: {e}", self.path))
        }

        /// The text of `plugins/<name>/spate.toml`.
        ///
        /// # Panics
        ///
        /// If the file cannot be read.
        pub fn manifest(&self) -> String {
            crate::plugins::manifest(self.name)
        }
    }

    macro_rules! guest {
        ($name:literal, $var:literal) => {
            Guest {
                name: $name,
                path: env!(concat!("SPATE_GUEST_", $var)),
                error: env!(concat!("SPATE_GUEST_", $var, "_ERROR")),
            }
        };
    }

    /// `plugins/order-totals-py`: the example plugin in Python.
    pub const ORDER_TOTALS_PY: Guest = guest!("order-totals-py", "ORDER_TOTALS_PY");
    /// `plugins/order-totals-js`: the example plugin in JavaScript.
    pub const ORDER_TOTALS_JS: Guest = guest!("order-totals-js", "ORDER_TOTALS_JS");
    /// `plugins/test-chaos-py`: test ops (retry, reject, raise, loop, membomb, WASI probes).
    pub const TEST_CHAOS_PY: Guest = guest!("test-chaos-py", "TEST_CHAOS_PY");
    /// `plugins/test-chaos-js`: the same test ops in JavaScript.
    pub const TEST_CHAOS_JS: Guest = guest!("test-chaos-js", "TEST_CHAOS_JS");
}

pub mod plugins {
    //! Paths of the plugin components built from `plugins/` and their `spate.toml`
    //! manifests. Each constant is the absolute path of a `.wasm` component, set by
    //! `build.rs` at compile time.

    use std::path::PathBuf;

    /// `plugins/order-totals`: the example plugin (per-customer totals, cached profile
    /// lookup, `review-order` workflow).
    pub const ORDER_TOTALS: &str = env!("SPATE_PLUGIN_ORDER_TOTALS");

    /// `plugins/test-chaos`: each event's `{"op": ...}` payload picks its behaviour
    /// (emits, state, cache, workflows, retry, reject, panic, infinite loop, memory bomb).
    /// Its README lists the ops.
    pub const TEST_CHAOS: &str = env!("SPATE_PLUGIN_TEST_CHAOS");

    /// `plugins/test-wrong-world`: a valid `wasi:cli/command` component that exports
    /// `wasi:cli/run` instead of `spate:plugin/handler`; uploads must be refused.
    pub const TEST_WRONG_WORLD: &str = env!("SPATE_PLUGIN_TEST_WRONG_WORLD");

    /// `plugins/trivial`: emits one `{}` to `out`, keyed like the input; for benchmarks.
    pub const TRIVIAL: &str = env!("SPATE_PLUGIN_TRIVIAL");

    /// The repository's `plugins/` directory.
    pub const PLUGINS_DIR: &str = env!("SPATE_PLUGINS_DIR");

    /// Every plugin as `(directory name under plugins/, component path)`.
    pub const ALL: &[(&str, &str)] = &[
        ("order-totals", ORDER_TOTALS),
        ("test-chaos", TEST_CHAOS),
        ("test-wrong-world", TEST_WRONG_WORLD),
        ("trivial", TRIVIAL),
    ];

    /// Path of `plugins/<name>/spate.toml`.
    pub fn manifest_path(name: &str) -> PathBuf {
        PathBuf::from(PLUGINS_DIR).join(name).join("spate.toml")
    }

    /// The text of `plugins/<name>/spate.toml`, e.g. `manifest("test-chaos")`.
    ///
    /// # Panics
    ///
    /// If the file cannot be read: the test cannot run without it.
    pub fn manifest(name: &str) -> String {
        let path = manifest_path(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read the manifest {}: {e}", path.display()))
    }

    /// The bytes of a component, e.g. `component(TEST_CHAOS)`.
    ///
    /// # Panics
    ///
    /// If the file cannot be read (a stale build directory; rebuild the tests).
    pub fn component(path: &str) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read the component {path}: {e}"))
    }

    /// Path of `plugins/order-totals/sample-events.jsonl`: one `{"key", "payload"}`
    /// object per line, with `"topic": "customers"` on profile lines (the rest go to
    /// `orders`).
    pub fn order_totals_samples() -> PathBuf {
        PathBuf::from(PLUGINS_DIR).join("order-totals/sample-events.jsonl")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_plugin_is_a_component_with_a_manifest() {
            for (name, path) in ALL {
                let bytes = component(path);
                // Component binaries carry layer 1 (`0d 00 01 00`), core modules version 1.
                assert_eq!(
                    bytes.get(..8),
                    Some(&b"\0asm\x0d\x00\x01\x00"[..]),
                    "{name}"
                );
                assert!(
                    manifest(name).contains(&format!("name = \"{name}\"")),
                    "{name}"
                );
            }
        }
    }
}
