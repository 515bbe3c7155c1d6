//! The wasmtime sandbox: one engine and linker per process (here), compiling and the
//! compiled-artifact cache (`compile.rs`), the host API bound to the WIT (`host.rs`),
//! per-call stores with a memory cap (`limits.rs`) and a wall-clock deadline
//! (`instance.rs`), and trap classification from typed errors (`trap.rs`).

mod compile;
mod host;
mod instance;
mod limits;
mod trap;

pub use compile::write_atomic;
pub use host::HostState;
pub use instance::WasmPlugin;
pub use limits::MemoryCapExceeded;
pub use trap::classify;

use crate::bindings::EventHandler;
use spate_core::host::PluginInfo;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Extra time a call may take beyond twice its deadline before it is abandoned.
const HOST_CALL_GRACE: Duration = Duration::from_millis(500);

/// Bytes of guest stderr kept per store (for panic messages).
const STDERR_CAPTURE: usize = 4096;

/// How long guest code runs before it yields its worker thread to the scheduler: a
/// spinning handler gets its share of the CPU, never a whole worker for its deadline
/// (the API, probes, commits and other plugins run on the same threads).
const YIELD_EVERY: Duration = Duration::from_millis(10);

/// Settings of the process-wide engine.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Largest linear memory any plugin may have (the pool reserves this per slot).
    pub max_memory_bytes: usize,
    /// Instances the pool holds at once (bounds total concurrency across plugins).
    pub pool_instances: u32,
    /// Resolution of wall-clock deadlines.
    pub epoch_tick: Duration,
    /// Directory of compiled artifacts (`*.cwasm`), so a restart does not recompile.
    pub compiled_dir: PathBuf,
}

/// Instances the pool holds at once by default (`sandbox.pool-instances`).
pub const DEFAULT_POOL_INSTANCES: u32 = 512;

impl SandboxConfig {
    /// Defaults with compiled artifacts under `dir`: the manifests' default memory ceiling
    /// ([`LimitCeilings`](spate_core::manifest::LimitCeilings)) and
    /// [`DEFAULT_POOL_INSTANCES`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            max_memory_bytes: (spate_core::manifest::LimitCeilings::default().max_memory_mb
                as usize)
                << 20,
            pool_instances: DEFAULT_POOL_INSTANCES,
            epoch_tick: Duration::from_millis(2),
            compiled_dir: dir.into(),
        }
    }
}

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not a WebAssembly binary at all.
    #[error("not a WebAssembly binary: expected the `\\0asm` magic header")]
    NotWasm,
    /// A core module instead of a component.
    #[error(
        "this is a core WebAssembly module, not a component; build for `wasm32-wasip2` or wrap it with `wasm-tools component new`"
    )]
    CoreModule,
    /// The binary does not parse or validate.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports something the host does not provide, or does not export the handler.
    #[error("component does not target the `spate:plugin/event-handler` world: {0}")]
    WrongWorld(String),
    /// Engine or file-system failure.
    #[error("engine error: {0}")]
    Engine(String),
}

fn engine_err(e: impl std::fmt::Display) -> LoadError {
    LoadError::Engine(e.to_string())
}

/// The process-wide sandbox.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<HostState>,
    config: SandboxConfig,
    engine_hash: String,
    ticker_stop: Arc<AtomicBool>,
    /// One lock per content hash being loaded: concurrent uploads of one component compile
    /// it once and write its artifact once.
    loading: std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::Mutex<()>>>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.ticker_stop.store(true, AtomicOrdering::Relaxed);
    }
}

impl Sandbox {
    /// Build the engine (pooling allocator, epoch interruption) and the linker with WASI
    /// and the Spate host API, and start the epoch ticker.
    pub fn new(config: SandboxConfig) -> Result<Arc<Self>, LoadError> {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(config.pool_instances)
            .total_core_instances(config.pool_instances.saturating_mul(4))
            .total_memories(config.pool_instances.saturating_mul(2))
            .total_tables(config.pool_instances.saturating_mul(4))
            .total_stacks(config.pool_instances)
            .max_memory_size(config.max_memory_bytes)
            // Keep a little of each slot resident and decommit in batches: measured here
            // to halve the cost of a fresh instance per event (DESIGN.md §6).
            .linear_memory_keep_resident(64 << 10)
            .table_keep_resident(16 << 10)
            .decommit_batch_size(32)
            .pagemap_scan(Enabled::Auto);
        let mut cfg = Config::new();
        cfg.wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(config.max_memory_bytes as u64)
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0);
        let engine = Engine::new(&cfg).map_err(engine_err)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_err)?;
        EventHandler::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(engine_err)?;

        let engine_hash = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut h);
            format!("{:016x}", h.finish())
        };
        std::fs::create_dir_all(&config.compiled_dir).map_err(engine_err)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = Arc::clone(&ticker_stop);
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("spate-epoch".into())
                .spawn(move || {
                    while !stop.load(AtomicOrdering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(engine_err)?;
        }
        Ok(Arc::new(Self {
            engine,
            linker,
            config,
            engine_hash,
            ticker_stop,
            loading: Default::default(),
        }))
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Bind a compiled component to its plugin metadata: pre-instantiated once, ready to
    /// create a sandbox per event.
    pub fn plugin(
        self: &Arc<Self>,
        component: &Component,
        info: Arc<PluginInfo>,
    ) -> Result<Arc<WasmPlugin>, LoadError> {
        let pre = self.check_world(component)?;
        Ok(Arc::new(WasmPlugin {
            info,
            pre,
            sandbox: Arc::clone(self),
        }))
    }

    /// Epoch ticks between a guest's yields to the scheduler.
    pub(super) fn yield_ticks(&self) -> u64 {
        let tick = self.config.epoch_tick.as_nanos().max(1);
        (YIELD_EVERY.as_nanos().div_ceil(tick) as u64).max(1)
    }
}
