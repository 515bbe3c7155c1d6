//! The dispatcher: from a subscription to handled, committed events.
//!
//! One [`Pipeline`] runs per plugin. It reads its consumer group's subscription, splits
//! each partition into key lanes (FIFO per key, different keys concurrently, bounded by
//! the plugin's concurrency), calls the plugin version that is active when an event
//! starts, applies the call's journal on success, retries failures with backoff, dead-
//! letters what cannot be handled, and commits each partition's contiguous watermark.
//!
//! The dispatcher does not know what a plugin is made of: the sandbox implements
//! [`PluginVersion`] (and the benchmark's native handler does too).

pub mod checkpoint;
mod idle;
mod pipeline;
pub mod watermark;

pub use checkpoint::{CheckpointConfig, Checkpointer};
pub use idle::IdleInstances;
pub use pipeline::{Pipeline, PipelineConfig};

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

/// What a running pipeline reports for the runtime's probes: whether its consumer has
/// joined its group (readiness), and when its event loop last went round (liveness).
#[derive(Debug, Default)]
pub struct PipelineHealth {
    joined: AtomicBool,
    /// Milliseconds since [`clock`]'s origin at the last beat; 0 before the first.
    beat_ms: AtomicU64,
}

fn clock() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl PipelineHealth {
    /// Whether the consumer has joined its group (been given its partitions, maybe none).
    pub fn joined(&self) -> bool {
        self.joined.load(AtomicOrdering::Acquire)
    }

    /// How long ago the event loop last went round; `None` before it started.
    pub fn since_beat(&self) -> Option<Duration> {
        match self.beat_ms.load(AtomicOrdering::Acquire) {
            0 => None,
            ms => Some(clock().elapsed().saturating_sub(Duration::from_millis(ms))),
        }
    }

    pub(crate) fn beat(&self) {
        let ms = clock().elapsed().as_millis().max(1) as u64;
        self.beat_ms.store(ms, AtomicOrdering::Release);
    }

    pub(crate) fn set_joined(&self, joined: bool) {
        self.joined.store(joined, AtomicOrdering::Release);
    }
}

use crate::host::{Invocation, Journal, PluginInfo};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use std::sync::Arc;

/// Why an event went to the dead-letter topic: its `spate-dlq-kind` header and the
/// `kind` label of `spate_dead_letters_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// The handler asked for retries until its attempts ran out.
    RetriesExhausted,
    /// The handler rejected the event.
    Rejected,
    /// Its compare-and-swap kept losing to concurrent writes until its attempts ran out.
    StateConflict,
    /// A backend refused its effects as invalid (not an outage).
    BackendRefused,
    /// The last attempt trapped.
    Trap(TrapKind),
}

impl DeadLetterKind {
    /// The kind as written in headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetriesExhausted => "retries-exhausted",
            Self::Rejected => "rejected",
            Self::StateConflict => "state-conflict",
            Self::BackendRefused => "backend-refused",
            Self::Trap(k) => k.as_str(),
        }
    }
}

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

/// How one call of a handler ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// The handler accepted the event; its journal is to be applied.
    Ok,
    /// The handler asked for a retry.
    Retry(String),
    /// The handler rejected the event.
    Reject(String),
    /// The call trapped.
    Trap(TrapKind, String),
}

/// The result of one call: how it ended and what it wants changed.
#[derive(Debug)]
pub struct CallResult {
    /// How the call ended.
    pub outcome: CallOutcome,
    /// Its journal; applied only for [`CallOutcome::Ok`].
    pub journal: Journal,
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
    async fn call(&mut self, invocation: Invocation) -> CallResult;

    /// Give back what a warm instance holds (its sandbox and pool slot) while the lane
    /// waits for a concurrency permit; the next call starts a fresh one.
    fn release(&mut self) {}
}

/// The version of a plugin that new events start on. Swapped atomically on upload,
/// activation and rollback; events already started keep the version they loaded.
pub struct ActiveVersion {
    slot: ArcSwapOption<Arc<dyn PluginVersion>>,
}

impl ActiveVersion {
    /// A slot holding `version`.
    pub fn new(version: Arc<dyn PluginVersion>) -> Arc<Self> {
        Arc::new(Self {
            slot: ArcSwapOption::from_pointee(version),
        })
    }

    /// The version new events start on, or `None` once the plugin is removed.
    pub fn load(&self) -> Option<Arc<dyn PluginVersion>> {
        self.slot.load_full().map(|v| Arc::clone(&*v))
    }

    /// Make `version` the active one.
    pub fn store(&self, version: Arc<dyn PluginVersion>) {
        self.slot.store(Some(Arc::new(version)));
    }

    /// Remove the plugin: new events find no version and the pipeline stops.
    pub fn clear(&self) {
        self.slot.store(None);
    }
}
