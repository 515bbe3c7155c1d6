//! What pipelines are built from: the runtime's backends, its shared budgets and its
//! dispatch settings, in one [`DispatchContext`]. The supervisor, the benchmarks and the
//! tests all build a plugin's pipelines through [`DispatchContext::pipelines`], so each
//! runs the wiring the server runs.

use crate::ActiveVersion;
use crate::checkpoint::{CheckpointConfig, Checkpointer};
use crate::idle::IdleInstances;
use crate::pipeline::{Pipeline, PipelineConfig, PluginShared};
use spate_core::host::HostServices;
use spate_core::state::tiered::StateTier;
use spate_core::{Cache, EventBus, EventSource, Transactional};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Warm instances of quiet lanes kept when the runtime does not set its own budget.
const IDLE_WARM_INSTANCES: usize = 32;
/// How long an idle warm instance is kept when the runtime does not set its own budget.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How every pipeline reads, buffers, checkpoints and stops. The server fills it from its
/// configuration (`dispatch.*`, `events.*`, `workflow-topic`); the defaults are the
/// server's.
#[derive(Clone, Debug)]
pub struct DispatchSettings {
    /// Consumer groups are `<group_prefix>.<plugin>`.
    pub group_prefix: String,
    /// Topic that `start-workflow` emits to.
    pub workflow_topic: String,
    /// Most events read and not yet finished per subscription; reading pauses above it.
    pub max_buffered: usize,
    /// Most bytes of events read and not yet finished per subscription; reading pauses
    /// above it (a backlog of large events must not fill memory before the count bound
    /// is reached).
    pub max_buffered_bytes: usize,
    /// Most events of one partition read and not yet finished: above it that partition
    /// is paused (the others keep flowing) until half of them are done.
    pub max_buffered_per_partition: usize,
    /// How often finished positions are committed, and longest time between two
    /// checkpoints of a plugin's effects.
    pub commit_interval: Duration,
    /// A checkpoint is taken early once this many events finished since the last one.
    pub checkpoint_events: usize,
    /// How long shutdown keeps handling the events already read (in handlers, in back-off,
    /// or queued in lanes) before abandoning the rest uncommitted.
    pub drain_timeout: Duration,
    /// How long a revoked partition's in-flight events may take to finish before they are
    /// abandoned (uncommitted, so the partition's next owner handles them again).
    pub revoke_timeout: Duration,
    /// Longest delay between retries of an infrastructure failure.
    pub max_infra_backoff: Duration,
    /// Whether the topics a plugin writes to (dead letters, emits, workflow starts) must
    /// exist before its pipelines consume (Kafka: a missing dead-letter topic would
    /// otherwise stall the first poison event's lane).
    pub check_output_topics: bool,
    /// The share of one core a plugin's shadow candidate may take.
    pub shadow_cpu_share: f64,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            group_prefix: "spate".into(),
            workflow_topic: "workflows".into(),
            max_buffered: 32_768,
            max_buffered_bytes: 128 << 20,
            max_buffered_per_partition: 16_384,
            commit_interval: Duration::from_millis(100),
            checkpoint_events: 8192,
            drain_timeout: Duration::from_secs(10),
            revoke_timeout: Duration::from_secs(10),
            max_infra_backoff: Duration::from_secs(5),
            check_output_topics: false,
            shadow_cpu_share: crate::DEFAULT_SHADOW_CPU_SHARE,
        }
    }
}

impl DispatchSettings {
    /// The consumer group of `plugin`'s pipelines.
    pub fn group(&self, plugin: &str) -> String {
        format!("{}.{plugin}", self.group_prefix)
    }
}

/// Everything a plugin's pipelines are built from; see the [module docs](self).
#[derive(Clone)]
pub struct DispatchContext {
    /// Where subscriptions come from.
    pub source: Arc<dyn EventSource>,
    /// Where emits and dead letters go.
    pub bus: Arc<dyn EventBus>,
    /// Durable state; each plugin reads and writes it through its own view.
    pub state: Arc<StateTier>,
    /// Cache.
    pub cache: Arc<dyn Cache>,
    /// Idle warm instances of every pipeline: one budget and one timeout.
    pub idle: Arc<IdleInstances>,
    /// Cancelled when the runtime stops: every pipeline built from this context drains.
    pub shutdown: CancellationToken,
    /// How pipelines read, buffer, checkpoint and stop.
    pub settings: DispatchSettings,
    /// Transactions on the bus (Kafka), for plugins asking for `exactly-once`; `None` where
    /// emits are exactly-once without them (the embedded log) or unavailable.
    pub transactions: Option<Arc<dyn Transactional>>,
    /// This runtime's lasting identity among its peers: its transactional producers are
    /// `<group>.<instance>`, so a restarted runtime fences the one that died.
    pub instance: String,
}

impl DispatchContext {
    /// A context over these backends, with its own idle-instance budget and shutdown
    /// token (replace the fields to share the runtime's).
    pub fn new(
        source: Arc<dyn EventSource>,
        bus: Arc<dyn EventBus>,
        state: Arc<StateTier>,
        cache: Arc<dyn Cache>,
        settings: DispatchSettings,
    ) -> Self {
        Self {
            source,
            bus,
            state,
            cache,
            idle: IdleInstances::new(IDLE_WARM_INSTANCES, IDLE_TIMEOUT),
            shutdown: CancellationToken::new(),
            settings,
            transactions: None,
            instance: "local".into(),
        }
    }

    /// The pipelines of plugin `name` feeding `active`: one per subscription of the
    /// active version's manifest, sharing the plugin's concurrency permits (its
    /// `limits.concurrency`) and one checkpointer (so they read each other's writes and
    /// one checkpoint covers all their positions). Cancelling `stop` drains them. None if
    /// `active` holds no version.
    pub fn pipelines(
        &self,
        name: &str,
        active: &Arc<ActiveVersion>,
        stop: &CancellationToken,
    ) -> Vec<Pipeline> {
        let Some(version) = active.load() else {
            return Vec::new();
        };
        let info = version.info();
        let manifest = &info.manifest;
        let s = &self.settings;
        let group = s.group(name);
        let state = self.state.for_plugin(name);
        let config = CheckpointConfig {
            interval: s.commit_interval,
            max_events: s.checkpoint_events,
            max_backoff: s.max_infra_backoff,
            ..CheckpointConfig::default()
        };
        let ckpt = match &self.transactions {
            Some(opener) if manifest.exactly_once => Checkpointer::exactly_once(
                &group,
                &info.namespace,
                Arc::clone(&state),
                Arc::clone(&self.cache),
                Arc::clone(&self.bus),
                config,
                Arc::clone(opener),
                &format!("{group}.{}", self.instance),
            ),
            _ => Checkpointer::new(
                &group,
                &info.namespace,
                Arc::clone(&state),
                Arc::clone(&self.cache),
                Arc::clone(&self.bus),
                config,
            ),
        };
        let shared = PluginShared {
            active: Arc::clone(active),
            bus: Arc::clone(&self.bus),
            services: HostServices {
                // Handlers read the checkpoint's pending writes over the store.
                state: ckpt.view(),
                cache: Arc::clone(&self.cache),
                workflow_topic: s.workflow_topic.clone(),
            },
            ckpt,
            permits: Arc::new(Semaphore::new(manifest.limits.concurrency as usize)),
            idle: Arc::clone(&self.idle),
            store: Arc::clone(&state),
        };
        manifest
            .subscriptions
            .iter()
            .map(|sub| {
                let config = PipelineConfig {
                    plugin: name.to_owned(),
                    group: group.clone(),
                    topic: sub.topic.clone(),
                    start: sub.start,
                    ordering: manifest.ordering,
                    max_buffered: s.max_buffered,
                    max_buffered_bytes: s.max_buffered_bytes,
                    max_buffered_per_partition: s.max_buffered_per_partition,
                    commit_interval: s.commit_interval,
                    drain_timeout: s.drain_timeout,
                    max_infra_backoff: s.max_infra_backoff,
                    revoke_timeout: s.revoke_timeout,
                };
                Pipeline::new(config, &shared, Arc::clone(&self.source), stop.clone())
            })
            .collect()
    }
}
