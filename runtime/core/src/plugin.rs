//! The plugin contract: what the dispatcher calls and the sandbox (or a native handler)
//! implements — a loaded [`PluginVersion`], the [`Instance`] that handles one lane's
//! calls, and how a call ended ([`CallOutcome`], [`TrapKind`]).
//!
//! It lives in the core, apart from the dispatcher, so the engine implements it without
//! depending on the dispatcher.

use crate::host::{Invocation, Journal, PluginInfo};
use async_trait::async_trait;
use std::sync::Arc;

/// Why a call trapped, classified by the host from typed errors (never by message text).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrapKind {
    /// The wall-clock deadline passed.
    Deadline,
    /// The memory cap was hit.
    Memory,
    /// The guest panicked or hit `unreachable`.
    Panic,
    /// A capability violation (emit to an undeclared topic, ...).
    Capability,
    /// A manifest limit was exceeded (emits per event, ...).
    Limit,
    /// The guest passed an argument the host refuses.
    InvalidArgument,
    /// A backing service failed; not the plugin's fault.
    Infrastructure,
    /// Every sandbox pool slot is taken: the runtime is saturated, not the event at
    /// fault. Retried without counting, after idle warm instances are evicted.
    PoolExhausted,
    /// The guest called `exit` (WASI `proc_exit`) instead of returning from `handle`.
    Exit,
    /// Any other trap (stack overflow, out-of-bounds access, instantiation failure, ...).
    Other,
}

impl TrapKind {
    /// Label used in metrics and dead-letter records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deadline => "deadline",
            Self::Memory => "memory",
            Self::Panic => "panic",
            Self::Capability => "capability",
            Self::Limit => "limit",
            Self::InvalidArgument => "invalid-argument",
            Self::Infrastructure => "infrastructure",
            Self::PoolExhausted => "pool-exhausted",
            Self::Exit => "exit",
            Self::Other => "other",
        }
    }

    /// Whether retrying may help. Capability, limit and argument violations are
    /// deterministic: they go to the dead-letter topic at once.
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            Self::Capability | Self::Limit | Self::InvalidArgument | Self::Exit
        )
    }
}

/// How one call of a handler ended. Only a successful call carries effects: a retried,
/// rejected or trapped call changes nothing, so it has no journal to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// The handler accepted the event; its journal is to be applied.
    Ok(Journal),
    /// The handler asked for a retry.
    Retry(String),
    /// The handler rejected the event.
    Reject(String),
    /// The call trapped.
    Trap(TrapKind, String),
}

/// A loaded plugin version that the dispatcher can call.
pub trait PluginVersion: Send + Sync + 'static {
    /// What the host knows of this version.
    fn info(&self) -> &Arc<PluginInfo>;

    /// A new instance for one lane. A fresh-mode instance sets up a new sandbox on every
    /// call; a warm-mode instance keeps one for up to the manifest's number of events.
    fn instance(&self) -> Box<dyn Instance>;
}

/// Something that can handle calls for one lane.
#[async_trait]
pub trait Instance: Send + 'static {
    /// Handle one event.
    async fn call(&mut self, invocation: Invocation) -> CallOutcome;

    /// Give back what a warm instance holds (its sandbox and pool slot) while the lane
    /// waits for a concurrency permit; the next call starts a fresh one.
    fn release(&mut self) {}
}
