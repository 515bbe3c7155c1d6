//! The host side of a call: per-store state and the host API's functions bound to the WIT
//! (`state`, `cache`, `emit`, `log`), each a thin adapter onto [`Invocation`], which holds
//! the capability checks and records the effect journal.

use super::STDERR_CAPTURE;
use super::limits::MemoryCap;
use crate::bindings::spate::plugin::{cache, emit, log, state, types};
use spate_core::host::{HostError, Invocation, MAX_LOG_BYTES_PER_CALL, MAX_LOG_LINES_PER_CALL};
use std::time::{Duration, Instant};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Per-store state: the call's invocation, a deny-by-default WASI context, and limits.
pub struct HostState {
    pub(super) invocation: Option<Invocation>,
    /// The guest's stderr, bounded: a panic message lands here and goes into the
    /// dead-letter reason.
    pub(super) stderr: MemoryOutputPipe,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limiter: MemoryCap,
    /// When the current call (or instantiation) must end.
    pub(super) deadline: Instant,
    /// Log lines and bytes the current call wrote, and lines dropped past the limits.
    log_lines: u32,
    log_bytes: usize,
    log_dropped: u32,
}

impl HostState {
    pub(super) fn new(memory_cap: usize) -> Self {
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
    pub(super) fn begin(&mut self, timeout: Duration) {
        self.deadline = Instant::now() + timeout;
        self.log_lines = 0;
        self.log_bytes = 0;
        self.log_dropped = 0;
    }

    /// Say once how many log lines the call lost to the per-call limits.
    pub(super) fn report_dropped_logs(&mut self) {
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
