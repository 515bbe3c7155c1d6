//! The wasmtime sandbox: one engine and linker per process, the host API bound to the
//! WIT, per-call stores with a memory cap and a wall-clock deadline, and trap
//! classification from typed errors.

use crate::bindings::spate::plugin::{cache, emit, log, state, types};
use crate::bindings::{EventHandler, EventHandlerPre};
use spate_core::host::{
    HostError, Invocation, MAX_LOG_BYTES_PER_CALL, MAX_LOG_LINES_PER_CALL, MAX_REASON_LEN,
    PluginInfo, truncate_reason,
};
use spate_core::plugin::{CallOutcome, Instance, PluginVersion, TrapKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
    Store, Trap, UpdateDeadline,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

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

    /// Check the header, compile, and check the component against the host's world.
    /// CPU-heavy: call it off the async runtime (e.g. in `spawn_blocking`).
    pub fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        if wasmparser::Parser::is_core_wasm(bytes) {
            return Err(LoadError::CoreModule);
        }
        if !wasmparser::Parser::is_component(bytes) {
            return Err(LoadError::Invalid(
                "unknown WebAssembly layer or version".into(),
            ));
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        self.check_world(&component)?;
        Ok(component)
    }

    fn check_world(&self, component: &Component) -> Result<EventHandlerPre<HostState>, LoadError> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        EventHandlerPre::new(pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))
    }

    fn compiled_path(&self, hash: &str) -> PathBuf {
        self.config
            .compiled_dir
            .join(format!("{hash}-{}.cwasm", self.engine_hash))
    }

    /// Load the component with content hash `hash`: from the compiled-artifact cache if
    /// present, else compile `bytes` and write the cache. Blocking.
    pub fn load_cached(&self, hash: &str, bytes: &[u8]) -> Result<Component, LoadError> {
        let path = self.compiled_path(hash);
        let lock = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(loading.entry(hash.to_owned()).or_default())
        };
        let _one_at_a_time = lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.load_locked(&path, bytes);
        drop(_one_at_a_time);
        let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the lock once nobody else holds or waits for it.
        if loading.get(hash).is_some_and(|l| Arc::strong_count(l) <= 2) {
            loading.remove(hash);
        }
        result
    }

    fn load_locked(&self, path: &Path, bytes: &[u8]) -> Result<Component, LoadError> {
        if path.exists() {
            match deserialize(&self.engine, path) {
                Ok(c) => {
                    self.check_world(&c)?;
                    return Ok(c);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "compiled artifact unusable; recompiling")
                }
            }
        }
        let component = self.compile(bytes)?;
        let serialized = component.serialize().map_err(engine_err)?;
        write_atomic(path, &serialized).map_err(engine_err)?;
        Ok(component)
    }

    /// Whether a compiled artifact for `hash` is cached.
    pub fn is_cached(&self, hash: &str) -> bool {
        self.compiled_path(hash).exists()
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
    fn yield_ticks(&self) -> u64 {
        let tick = self.config.epoch_tick.as_nanos().max(1);
        (YIELD_EVERY.as_nanos().div_ceil(tick) as u64).max(1)
    }
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> Result<Component, LoadError> {
    // SAFETY: the file was written by `Component::serialize` of this engine configuration
    // (the name carries the engine's compatibility hash) into the runtime's own data
    // directory, which only the runtime writes; wasmtime also checks the header.
    unsafe { Component::deserialize_file(engine, path) }.map_err(engine_err)
}

/// Write `bytes` to `path` through a temporary file of its own (unique, so concurrent
/// writers never share one) and a rename, so a crash never leaves a half-written file
/// under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map(|_| ()).map_err(|e| e.error)
}

/// The memory cap of one store. Growing past it traps with [`MemoryCapExceeded`] instead
/// of returning -1 to the guest, so the cause is known exactly.
struct MemoryCap {
    cap: usize,
}

/// The typed trap raised when a guest grows memory past its cap.
#[derive(Debug, thiserror::Error)]
#[error("memory cap of {cap} bytes exceeded (wanted {desired})")]
pub struct MemoryCapExceeded {
    cap: usize,
    desired: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            return Err(wasmtime::Error::new(MemoryCapExceeded {
                cap: self.cap,
                desired,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Per-store state: the call's invocation, a deny-by-default WASI context, and limits.
pub struct HostState {
    invocation: Option<Invocation>,
    /// The guest's stderr, bounded: a panic message lands here and goes into the
    /// dead-letter reason.
    stderr: MemoryOutputPipe,
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryCap,
    /// When the current call (or instantiation) must end.
    deadline: Instant,
    /// Log lines and bytes the current call wrote, and lines dropped past the limits.
    log_lines: u32,
    log_bytes: usize,
    log_dropped: u32,
}

impl HostState {
    fn new(memory_cap: usize) -> Self {
        // No preopened directories, no environment, no arguments, no network, stdout
        // discarded: WASI imports link but can reach nothing.
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .build();
        Self {
            invocation: None,
            stderr,
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryCap { cap: memory_cap },
            deadline: Instant::now(),
            log_lines: 0,
            log_bytes: 0,
            log_dropped: 0,
        }
    }

    /// Start a call (or an instantiation) that must end within `timeout`.
    fn begin(&mut self, timeout: Duration) {
        self.deadline = Instant::now() + timeout;
        self.log_lines = 0;
        self.log_bytes = 0;
        self.log_dropped = 0;
    }

    /// Say once how many log lines the call lost to the per-call limits.
    fn report_dropped_logs(&mut self) {
        if self.log_dropped > 0 {
            let plugin = self
                .invocation
                .as_ref()
                .map(|i| i.plugin().name().to_string())
                .unwrap_or_default();
            tracing::warn!(target: "spate::guest", %plugin, dropped = self.log_dropped,
                "log lines dropped: a call may log {MAX_LOG_LINES_PER_CALL} lines and {MAX_LOG_BYTES_PER_CALL} bytes");
            metrics::counter!(spate_core::metric_names::GUEST_LOG_LINES_DROPPED_TOTAL, "plugin" => plugin)
                .increment(u64::from(self.log_dropped));
            self.log_dropped = 0;
        }
    }

    fn inv(&mut self) -> wasmtime::Result<&mut Invocation> {
        self.invocation
            .as_mut()
            .ok_or_else(|| wasmtime::Error::msg("host API called outside of a handler call"))
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn trap(e: HostError) -> wasmtime::Error {
    wasmtime::Error::new(e)
}

fn ttl(ms: Option<u64>) -> Option<Duration> {
    ms.map(Duration::from_millis)
}

impl types::Host for HostState {}

impl state::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.inv()?.state_get(&key).await.map_err(trap)
    }

    async fn put(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<()> {
        self.inv()?
            .state_put(&key, value, ttl(ttl_ms))
            .map_err(trap)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.inv()?.state_delete(&key).map_err(trap)
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<bool> {
        self.inv()?
            .state_cas(&key, expected, new, ttl(ttl_ms))
            .await
            .map_err(trap)
    }

    async fn scan(&mut self, prefix: String, limit: u32) -> wasmtime::Result<Vec<state::Entry>> {
        let entries = self.inv()?.state_scan(&prefix, limit).await.map_err(trap)?;
        Ok(entries
            .into_iter()
            .map(|(key, value)| state::Entry { key, value })
            .collect())
    }
}

impl cache::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.inv()?.cache_get(&key).await.map_err(trap)
    }

    async fn set(&mut self, key: String, value: Vec<u8>, ttl_ms: u64) -> wasmtime::Result<()> {
        self.inv()?
            .cache_set(&key, value, Duration::from_millis(ttl_ms))
            .map_err(trap)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.inv()?.cache_delete(&key).map_err(trap)
    }

    async fn incr(&mut self, key: String, delta: i64) -> wasmtime::Result<i64> {
        self.inv()?.cache_incr(&key, delta).await.map_err(trap)
    }
}

impl emit::Host for HostState {
    async fn emit(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<types::Header>,
    ) -> wasmtime::Result<()> {
        let headers = headers
            .into_iter()
            .map(|h| spate_core::Header {
                name: h.name,
                value: h.value,
            })
            .collect();
        self.inv()?
            .emit(&topic, key, payload, headers)
            .map_err(trap)
    }

    async fn start_workflow(
        &mut self,
        name: String,
        id: String,
        input: Vec<u8>,
    ) -> wasmtime::Result<()> {
        self.inv()?.start_workflow(&name, &id, input).map_err(trap)
    }
}

/// Longest log line kept from a guest.
const MAX_LOG_LINE: usize = 4096;

impl log::Host for HostState {
    async fn log(&mut self, level: types::Level, message: String) -> wasmtime::Result<()> {
        // A guest logging in a loop must not fill the runtime's log (and disk): each call
        // gets a line and byte budget; the rest is counted and reported once.
        let len = message.len().min(MAX_LOG_LINE);
        if self.log_lines >= MAX_LOG_LINES_PER_CALL
            || self.log_bytes.saturating_add(len) > MAX_LOG_BYTES_PER_CALL
        {
            self.log_dropped = self.log_dropped.saturating_add(1);
            return Ok(());
        }
        self.log_lines += 1;
        self.log_bytes += len;
        let inv = self.inv()?;
        let plugin = inv.plugin().name().to_string();
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        match level {
            types::Level::Trace => tracing::trace!(target: "spate::guest", %plugin, "{message}"),
            types::Level::Debug => tracing::debug!(target: "spate::guest", %plugin, "{message}"),
            types::Level::Info => tracing::info!(target: "spate::guest", %plugin, "{message}"),
            types::Level::Warn => tracing::warn!(target: "spate::guest", %plugin, "{message}"),
            types::Level::Error => tracing::error!(target: "spate::guest", %plugin, "{message}"),
        }
        Ok(())
    }
}

/// A loaded plugin version: its compiled component pre-instantiated against the host.
pub struct WasmPlugin {
    info: Arc<PluginInfo>,
    pre: EventHandlerPre<HostState>,
    sandbox: Arc<Sandbox>,
}

impl PluginVersion for WasmPlugin {
    fn info(&self) -> &Arc<PluginInfo> {
        &self.info
    }

    fn instance(&self) -> Box<dyn Instance> {
        let warm = matches!(
            self.info.manifest.execution.mode,
            spate_core::manifest::ExecutionMode::Warm
        );
        Box::new(WasmInstance {
            pre: self.pre.clone(),
            sandbox: Arc::clone(&self.sandbox),
            memory_cap: self.info.manifest.limits.memory_bytes(),
            timeout: self.info.manifest.limits.timeout(),
            max_uses: if warm {
                self.info.manifest.execution.max_events_per_instance
            } else {
                1
            },
            live: None,
        })
    }
}

struct Live {
    store: Store<HostState>,
    bindings: EventHandler,
    uses: u32,
}

/// Calls for one lane: a fresh store per call, or (warm mode) one store reused for up to
/// `max_uses` calls and dropped after any failure.
struct WasmInstance {
    pre: EventHandlerPre<HostState>,
    sandbox: Arc<Sandbox>,
    memory_cap: usize,
    timeout: Duration,
    max_uses: u32,
    live: Option<Live>,
}

fn to_wit(e: &spate_core::Event) -> types::Event {
    types::Event {
        topic: e.topic.clone(),
        partition: e.partition,
        offset: e.offset,
        key: e.key.clone(),
        payload: e.payload.clone(),
        headers: e
            .headers
            .iter()
            .map(|h| types::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        timestamp_ms: e.timestamp_ms,
    }
}

/// Classify a call's error from its type: host errors, the memory cap, wasm traps.
pub fn classify(err: &wasmtime::Error) -> (TrapKind, String) {
    if let Some(h) = err.downcast_ref::<HostError>() {
        let kind = match h {
            HostError::Capability(_) => TrapKind::Capability,
            HostError::Limit(_) => TrapKind::Limit,
            HostError::Invalid(_) => TrapKind::InvalidArgument,
            HostError::Backend(_) => TrapKind::Infrastructure,
        };
        return (kind, h.to_string());
    }
    if let Some(m) = err.downcast_ref::<MemoryCapExceeded>() {
        return (TrapKind::Memory, m.to_string());
    }
    // Every pool slot is taken (plugins' concurrency adds up past `pool-instances`): the
    // runtime is saturated, the event is not at fault. Retried without counting.
    if let Some(p) = err.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
        return (
            TrapKind::PoolExhausted,
            format!("sandbox pool exhausted ({p}); raise sandbox.pool-instances"),
        );
    }
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return (
            TrapKind::Exit,
            format!(
                "the guest called exit({}) instead of returning from `handle`; a handler ends \
                 by returning ok, retry or reject (its effects are dropped)",
                exit.0
            ),
        );
    }
    if let Some(trap) = err.downcast_ref::<Trap>() {
        let kind = match trap {
            Trap::Interrupt => TrapKind::Deadline,
            Trap::UnreachableCodeReached => TrapKind::Panic,
            _ => TrapKind::Other,
        };
        let message = match kind {
            TrapKind::Deadline => "wall-clock deadline exceeded (limits.timeout-ms)".to_string(),
            TrapKind::Panic => "guest panicked (wasm `unreachable` executed)".to_string(),
            _ => trap.to_string(),
        };
        return (kind, message);
    }
    (TrapKind::Other, format!("{err:#}"))
}

/// A new store with the plugin's limits and an instance in it. Takes its parts rather
/// than `&WasmInstance` so the future stays `Send` (a store is not `Sync`).
async fn fresh_live(
    pre: EventHandlerPre<HostState>,
    sandbox: Arc<Sandbox>,
    memory_cap: usize,
    timeout: Duration,
) -> wasmtime::Result<Live> {
    let mut store = Store::new(sandbox.engine(), HostState::new(memory_cap));
    store.limiter(|s| &mut s.limiter);
    // Guest code yields to the scheduler every few ticks and traps past the call's
    // deadline. Instantiation runs guest start code too: it is under the same deadline.
    let ticks = sandbox.yield_ticks();
    store.data_mut().begin(timeout);
    store.set_epoch_deadline(ticks);
    store.epoch_deadline_callback(move |ctx| {
        if Instant::now() >= ctx.data().deadline {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::YieldCustom(
            ticks,
            Box::pin(tokio::task::yield_now()),
        ))
    });
    let bindings = pre.instantiate_async(&mut store).await?;
    Ok(Live {
        store,
        bindings,
        uses: 0,
    })
}

#[async_trait::async_trait]
impl Instance for WasmInstance {
    fn release(&mut self) {
        self.live = None;
    }

    async fn call(&mut self, invocation: Invocation) -> CallOutcome {
        let event = to_wit(invocation.event());
        let mut live = match self.live.take() {
            Some(l) => l,
            None => match fresh_live(
                self.pre.clone(),
                Arc::clone(&self.sandbox),
                self.memory_cap,
                self.timeout,
            )
            .await
            {
                Ok(l) => l,
                Err(e) => {
                    let (kind, message) = classify(&e);
                    return CallOutcome::Trap(kind, message);
                }
            },
        };
        live.store.data_mut().invocation = Some(invocation);
        live.store.data_mut().begin(self.timeout);
        live.store.set_epoch_deadline(self.sandbox.yield_ticks());
        // Epoch interruption only fires while guest code runs; a host call stuck on a
        // backend would outlive the deadline. This bound covers that case: dropping the
        // future abandons the call and the store with it.
        let bound = self.timeout.saturating_mul(2) + HOST_CALL_GRACE;
        let call = live
            .bindings
            .spate_plugin_handler()
            .call_handle(&mut live.store, &event);
        let result = match tokio::time::timeout(bound, call).await {
            Ok(r) => r,
            Err(_) => {
                return CallOutcome::Trap(
                    TrapKind::Deadline,
                    format!("call exceeded {bound:?} (deadline while blocked in a host call)"),
                );
            }
        };
        live.store.data_mut().report_dropped_logs();
        let journal = live
            .store
            .data_mut()
            .invocation
            .take()
            .map(|mut i| i.take_journal())
            .unwrap_or_default();
        let outcome = match result {
            Ok(Ok(())) => CallOutcome::Ok(journal),
            Ok(Err(types::HandleError::Retry(r))) => {
                CallOutcome::Retry(truncate_reason(r, MAX_REASON_LEN))
            }
            Ok(Err(types::HandleError::Reject(r))) => {
                CallOutcome::Reject(truncate_reason(r, MAX_REASON_LEN))
            }
            Err(e) => {
                let (kind, mut message) = classify(&e);
                let stderr = live.store.data().stderr.contents();
                if matches!(kind, TrapKind::Panic | TrapKind::Other) && !stderr.is_empty() {
                    let text = String::from_utf8_lossy(&stderr);
                    message = format!("{message}; guest stderr: {}", text.trim_end());
                }
                CallOutcome::Trap(kind, message)
            }
        };
        live.uses += 1;
        if matches!(outcome, CallOutcome::Ok(_)) && live.uses < self.max_uses {
            self.live = Some(live);
        }
        outcome
    }
}
