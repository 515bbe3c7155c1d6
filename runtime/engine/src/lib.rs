//! Spate engine: the wasmtime sandbox that runs plugins and the registry that stores,
//! validates and hot-swaps their versions.
//!
//! It owns everything WebAssembly: one engine and linker per process, the host API bound
//! to `wit/` through `bindgen!`, per-call stores with limits, trap classification, the
//! compiled-artifact cache, and plugin versions. The plugin contract, the backends and
//! the effect journal live in `spate-core`, dispatch in `spate-dispatch`.

pub mod record;
pub mod registry;
pub mod sandbox;
pub mod store;

/// Host bindings generated from the WIT package in `wit/` (the single source of truth).
#[allow(missing_docs)]
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "spate:plugin/event-handler",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

pub use registry::{Registry, RegistryChange, RegistryError, UploadOutcome};
pub use sandbox::{LoadError, Sandbox, SandboxConfig, WasmPlugin};
pub use store::{ChangeFeed, LocalStore, RegistryStore, SharedStore};
