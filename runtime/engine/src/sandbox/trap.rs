//! Why a call failed, from the error's type.

use super::MemoryCapExceeded;
use spate_core::host::HostError;
use spate_core::plugin::TrapKind;
use wasmtime::Trap;

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
