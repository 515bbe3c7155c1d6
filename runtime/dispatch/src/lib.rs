//! Spate dispatch: from a subscription to handled, committed events, and the
//! [`Supervisor`] that starts, hot-swaps and stops each plugin's pipelines.
//!
//! One [`Pipeline`] runs per subscription of a plugin, built from a [`DispatchContext`].
//! It reads its consumer group's subscription, splits each partition into key lanes (FIFO
//! per key, different keys concurrently, bounded by the plugin's concurrency), calls the
//! plugin version that is active when an event starts, applies the call's journal on
//! success, retries failures with backoff, dead-letters what cannot be handled, and
//! commits each partition's contiguous watermark once a checkpoint covers it.
//!
//! The dispatcher does not know what a plugin is made of: the sandbox implements
//! [`PluginVersion`] (and the benchmark's native handler does too). Both that contract and
//! the effect journal a call returns live in `spate-core` (`spate_core::plugin`,
//! `spate_core::host::journal`), so the engine does not depend on this crate.

pub mod checkpoint;
mod context;
mod idle;
mod parking;
mod pipeline;
pub mod promotion;
pub mod shadow;
pub mod supervisor;
pub mod watermark;

pub use checkpoint::{CheckpointConfig, Checkpointer};
pub use context::{DispatchContext, DispatchSettings};
pub use idle::IdleInstances;
pub use pipeline::Pipeline;
pub use supervisor::{PipelineBoard, Supervisor};

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

use arc_swap::ArcSwapOption;
pub use spate_core::host::DeadLetterKind;
pub use spate_core::plugin::{CallOutcome, Instance, PluginVersion, TrapKind};
use std::sync::Arc;

/// The share of one core a shadow candidate's calls may take by default
/// (`dispatch.shadow-cpu-share`).
pub const DEFAULT_SHADOW_CPU_SHARE: f64 = 0.05;

/// The version of a plugin that new events start on. Swapped atomically on upload,
/// activation and rollback; events already started keep the version they loaded.
pub struct ActiveVersion {
    slot: ArcSwapOption<Arc<dyn PluginVersion>>,
    /// A candidate running beside it, if any.
    shadow: Arc<shadow::Shadow>,
    /// The promotion that made it active, if it was promoted at an offset cut.
    promotion: ArcSwapOption<promotion::Promotion>,
}

impl ActiveVersion {
    /// A slot holding `version`.
    pub fn new(version: Arc<dyn PluginVersion>) -> Arc<Self> {
        Self::with_shadow_share(version, DEFAULT_SHADOW_CPU_SHARE)
    }

    /// A slot holding `version`, whose shadow candidates may take `share` of one core.
    pub fn with_shadow_share(version: Arc<dyn PluginVersion>, share: f64) -> Arc<Self> {
        Arc::new(Self {
            slot: ArcSwapOption::from_pointee(version),
            shadow: Arc::new(shadow::Shadow::new(share)),
            promotion: ArcSwapOption::empty(),
        })
    }

    /// Make `version` active at an offset cut: events below each partition's cut (taken
    /// by its pipeline) stay on the version active until now, `old`.
    pub fn promote(&self, id: u64, old: Arc<dyn PluginVersion>, version: Arc<dyn PluginVersion>) {
        if self.promotion.load().as_ref().is_some_and(|p| p.id == id) {
            return;
        }
        // The promotion first: an event that loads the new version finds its cut rule.
        self.promotion
            .store(Some(Arc::new(promotion::Promotion { id, old })));
        self.slot.store(Some(Arc::new(version)));
    }

    /// The promotion in effect, if any.
    pub fn promotion(&self) -> Option<Arc<promotion::Promotion>> {
        self.promotion.load_full()
    }

    /// The plugin's shadow candidate and its report.
    pub fn shadow(&self) -> &Arc<shadow::Shadow> {
        &self.shadow
    }

    /// The version new events start on, or `None` once the plugin is removed.
    pub fn load(&self) -> Option<Arc<dyn PluginVersion>> {
        self.slot.load_full().map(|v| Arc::clone(&*v))
    }

    /// Whether the active version's manifest filter lets `event` reach the handler (yes
    /// while there is no version: the event is then abandoned like any other).
    pub fn admits(&self, event: &spate_core::Event) -> bool {
        self.slot
            .load()
            .as_ref()
            .is_none_or(|v| v.info().manifest.filter.matches(event))
    }

    /// Make `version` the active one (a hot swap: no cut, events already started finish
    /// on the version they loaded).
    pub fn store(&self, version: Arc<dyn PluginVersion>) {
        self.promotion.store(None);
        self.slot.store(Some(Arc::new(version)));
    }

    /// Remove the plugin: new events find no version and the pipeline stops.
    pub fn clear(&self) {
        self.slot.store(None);
    }
}
