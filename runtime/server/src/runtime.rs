//! Runtime assembly: backends chosen by configuration, the sandbox and registry, and the
//! loop that keeps the dispatcher's supervisor (`spate_dispatch::supervisor`) in line with
//! the registry's active plugins.

use crate::config::RegistryConfig;
use crate::config::{CacheConfig, Config, EventsConfig, StateConfig};
use spate_cache_redis::RedisCache;
use spate_core::cache::GuardedCache;
use spate_core::state::tiered::StateTier;
use spate_core::{Cache, EventBus, EventSource, StateStore};
use spate_core::{
    cache::MokaCache, events::EmbeddedLog, state::EmbeddedStateStore, storage::StorageHealth,
};
use spate_dispatch::{DispatchContext, IdleInstances, PipelineBoard, Supervisor};
use spate_engine::{
    ChangeFeed, LocalStore, Registry, RegistryChange, RegistryStore, Sandbox, SandboxConfig,
    SharedStore,
};
use spate_state_cql::CqlStateStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// The backends a runtime talks to.
#[derive(Clone)]
pub struct Backends {
    /// Where emits and dead letters go; what the HTTP API reads.
    pub bus: Arc<dyn EventBus>,
    /// Where subscriptions come from.
    pub source: Arc<dyn EventSource>,
    /// Durable state, through the state tier.
    pub state: Arc<dyn StateStore>,
    /// The state store itself, without the tier's caching (the shared registry's store).
    pub store: Arc<dyn StateStore>,
    /// The state tier: per-plugin read counters and, if configured, read-through caching.
    /// Plugins get [`StateTier::for_plugin`] views of it.
    pub tier: Arc<StateTier>,
    /// Cache, failing open while its backend is unreachable.
    pub cache: Arc<dyn Cache>,
    /// The same cache, for its health (`is_degraded`, `outages`).
    pub cache_health: Arc<GuardedCache>,
    /// The Kafka client behind `bus` and `source`, when events are on Kafka (the shared
    /// registry's control topic uses it too).
    pub kafka: Option<Arc<spate_kafka::KafkaBus>>,
    /// The embedded log, when events are embedded (its per-topic usage is reported).
    pub log: Option<Arc<EmbeddedLog>>,
    /// The embedded database files in use: whether each takes writes, and its size.
    pub storage: Vec<Arc<StorageHealth>>,
}

impl Backends {
    /// Build the backends the configuration selects (connecting to the CQL store, if
    /// selected; Redis is connected on first use).
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        // The data directory holds events, state, plugins and the API token: the runtime's
        // user only, whatever the umask made the files inside.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting data dir {}", config.data_dir.display()))?;
        }
        let mut kafka = None;
        let mut embedded_log = None;
        let mut storage = Vec::new();
        let (bus, source): (Arc<dyn EventBus>, Arc<dyn EventSource>) = match &config.events {
            EventsConfig::Embedded(settings) => {
                let log = EmbeddedLog::open(&config.data_dir.join("log"), settings.log_config())
                    .context("opening the embedded event log")?;
                storage.push(log.health());
                embedded_log = Some(log.clone());
                (log.clone(), log)
            }
            EventsConfig::Kafka(_) => {
                let options = config
                    .events
                    .kafka_options()
                    .context("events.type = \"kafka\" without Kafka settings")?;
                let bus = spate_kafka::KafkaBus::connect(options)
                    .await
                    .context("connecting to Kafka")?;
                kafka = Some(Arc::clone(&bus));
                (bus.clone(), bus)
            }
        };
        let store: Arc<dyn StateStore> = match &config.state {
            StateConfig::Embedded => {
                let store = EmbeddedStateStore::open(&config.data_dir.join("state"))
                    .context("opening the embedded state store")?;
                storage.push(store.health());
                store
            }
            StateConfig::Cql { .. } => {
                let options = config
                    .state
                    .cql_options()
                    .context("state.type = \"cql\" without CQL settings")?;
                Arc::new(
                    CqlStateStore::connect(options)
                        .await
                        .context("connecting the CQL state store")?,
                )
            }
        };
        let (backend, name, retry): (Arc<dyn Cache>, &str, Duration) = match &config.cache {
            CacheConfig::Memory(settings) => (
                Arc::new(MokaCache::with_settings(settings)),
                "memory",
                Duration::from_secs(1),
            ),
            CacheConfig::Redis(options) => {
                let redis =
                    RedisCache::new(options.clone()).context("setting up the Redis cache")?;
                (Arc::new(redis), "redis", options.retry_interval)
            }
        };
        let cache_health = Arc::new(GuardedCache::new(backend, name, retry));
        let cache: Arc<dyn Cache> = cache_health.clone();
        let tier = if config.read_through.enabled {
            StateTier::read_through(
                Arc::clone(&store),
                Arc::clone(&cache),
                config.read_through.clone(),
            )
        } else {
            StateTier::direct(Arc::clone(&store))
        };
        Ok(Self {
            bus,
            source,
            store,
            state: tier.clone(),
            tier,
            cache,
            cache_health,
            kafka,
            log: embedded_log,
            storage,
        })
    }
}

/// A running runtime: registry, backends and supervisor.
pub struct Runtime {
    /// Configuration it was built from.
    pub config: Config,
    /// Backends.
    pub backends: Backends,
    /// Plugin registry.
    pub registry: Arc<Registry>,
    /// This runtime's instance id (kept in the data directory, or the static-membership
    /// id): its name in the cluster's shadow reports and in its Kafka transactional id.
    pub instance: String,
    /// Held while a shadow report is checked against the registry and published, and while
    /// reports are dropped, so this runtime never publishes one it has just dropped.
    publishing: Arc<tokio::sync::Mutex<()>>,
    ready: Arc<AtomicBool>,
    pipelines: Arc<PipelineBoard>,
    shutdown: CancellationToken,
    supervisor: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// How long a pipeline's event loop may go without a round before the runtime is not live.
const LIVENESS_WINDOW: Duration = Duration::from_secs(60);

/// What the probes report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HealthReport {
    /// Plugins loaded and every pipeline's consumer joined its group.
    pub ready: bool,
    /// Every running pipeline's event loop went round within the liveness window.
    pub live: bool,
    /// Pipelines (`plugin/topic`) whose consumer has not joined (yet).
    pub not_joined: Vec<String>,
    /// Pipelines whose event loop is stuck.
    pub stalled: Vec<String>,
    /// Embedded database files that cannot be written now, with the reason; they are
    /// being reopened.
    pub storage: Vec<String>,
}

impl Runtime {
    /// Build everything and start consuming for every active plugin.
    pub async fn start(config: Config, backends: Backends) -> anyhow::Result<Arc<Self>> {
        let mut sandbox_config = SandboxConfig::new(config.data_dir.join("compiled"));
        sandbox_config.max_memory_bytes = (config.sandbox.max_memory_mb as usize) << 20;
        sandbox_config.pool_instances = config.sandbox.pool_instances;
        let sandbox = Sandbox::new(sandbox_config)?;
        let (store, feed): (Arc<dyn RegistryStore>, Option<Arc<dyn ChangeFeed>>) = match &config
            .registry
        {
            RegistryConfig::Local => (LocalStore::open(config.data_dir.join("plugins"))?, None),
            RegistryConfig::Shared { control_topic } => {
                use anyhow::Context as _;
                // The events' Kafka client: no second connection for the control topic.
                let bus = backends
                    .kafka
                    .clone()
                    .context("registry.type = \"shared\" needs events.type = \"kafka\"")?;
                let feed = spate_kafka::KafkaChangeFeed::new(bus, control_topic, &instance_name(&config))
                        .await
                        .with_context(|| format!("the registry's control topic `{control_topic}` (create it compacted, or set events.create-topics = true)"))?;
                (
                    SharedStore::new(Arc::clone(&backends.store)),
                    Some(Arc::new(feed)),
                )
            }
        };
        // Active versions are loaded (and compiled, unless cached) before any pipeline
        // starts: a runtime never takes partitions without its plugins.
        let registry = Registry::open(
            sandbox,
            store,
            feed,
            config.ceilings(),
            config.api.max_upload_bytes,
        )
        .await?;
        let ready = Arc::new(AtomicBool::new(false));
        let pipelines = Arc::new(PipelineBoard::default());
        let instance = config.instance_id().map_err(|e| {
            anyhow::anyhow!(
                "cannot keep this runtime's instance id in {}: {e}",
                config.data_dir.display()
            )
        })?;
        let shutdown = CancellationToken::new();
        let cx = DispatchContext {
            // Idle warm instances of every pipeline: one budget and one timeout.
            idle: IdleInstances::new(
                config.sandbox.idle_instances,
                Duration::from_millis(config.sandbox.idle_timeout_ms),
            ),
            shutdown: shutdown.clone(),
            transactions: backends
                .kafka
                .clone()
                .map(|k| k as Arc<dyn spate_core::Transactional>),
            instance: instance.clone(),
            ..DispatchContext::new(
                Arc::clone(&backends.source),
                Arc::clone(&backends.bus),
                Arc::clone(&backends.tier),
                Arc::clone(&backends.cache),
                config.dispatch_settings(),
            )
        };
        let supervisor =
            Supervisor::new(cx, Arc::clone(&pipelines)).on_stopped(crate::telemetry::forget_plugin);
        let changes = registry.changes();
        let handle = tokio::spawn(supervise(
            supervisor,
            Arc::clone(&registry),
            changes,
            Arc::clone(&ready),
            shutdown.clone(),
        ));
        tokio::spawn(parked_gauges(
            Arc::clone(&registry),
            Arc::clone(&backends.store),
            shutdown.clone(),
        ));
        let publishing = Arc::new(tokio::sync::Mutex::new(()));
        tokio::spawn(publish_shadow_reports(
            Arc::clone(&publishing),
            Arc::clone(&registry),
            Arc::clone(&pipelines),
            Arc::clone(&backends.store),
            instance.clone(),
            shutdown.clone(),
        ));
        Ok(Arc::new(Self {
            config,
            backends,
            registry,
            instance,
            publishing,
            ready,
            pipelines,
            shutdown,
            supervisor: tokio::sync::Mutex::new(Some(handle)),
        }))
    }

    /// How `name`'s shadow `candidate` compares with its active version on the events
    /// every runtime of the cluster handled: this runtime's live report (an empty one
    /// while its pipelines have not picked the candidate up) plus the ones the others
    /// published for this run of it (`generation`).
    pub async fn cluster_shadow_report(
        &self,
        name: &str,
        (candidate, generation): (&str, &str),
    ) -> spate_core::BackendResult<spate_dispatch::shadow::ShadowReport> {
        use spate_dispatch::shadow::{ShadowReport, cluster_report};
        let local = self
            .shadow_report(name)
            .filter(|r| r.candidate == candidate)
            .unwrap_or_else(|| ShadowReport {
                plugin: name.to_owned(),
                candidate: candidate.to_owned(),
                cpu_share: self.config.dispatch.shadow_cpu_share,
                ..ShadowReport::default()
            });
        cluster_report(&*self.backends.store, &self.instance, generation, local).await
    }

    /// `name`'s shadow candidate in the registry and the generation its reports are kept
    /// under, if it has one.
    pub async fn shadow_generation(&self, name: &str) -> Option<(String, String)> {
        shadow_generation(&self.registry, name).await
    }

    /// Drop the reports the runtimes published on `name`'s earlier shadow candidates (one
    /// stopped, was promoted or was replaced), keeping the running one's.
    pub async fn forget_shadow_reports(&self, name: &str) -> spate_core::BackendResult<()> {
        let _publishing = self.publishing.lock().await;
        let keep = self.shadow_generation(name).await.map(|(_, g)| g);
        spate_dispatch::shadow::forget(&*self.backends.store, name, keep.as_deref()).await
    }

    /// How `name`'s shadow candidate compares with its active version on the events this
    /// runtime handled, if one runs.
    pub fn shadow_report(&self, name: &str) -> Option<spate_dispatch::shadow::ShadowReport> {
        self.pipelines.shadow_report(name)
    }

    /// Waits up to `limit` until no pipeline of `name` runs here: each one drained and made
    /// its last checkpoint. Whether they all stopped.
    pub async fn stopped_here(&self, name: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if !self
                .pipelines
                .snapshot()
                .iter()
                .any(|((p, _), _)| p == name)
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether active plugins are loaded, their pipelines started and every consumer
    /// joined its group.
    pub fn is_ready(&self) -> bool {
        self.health().ready
    }

    /// Readiness and liveness, with what is holding them back.
    pub fn health(&self) -> HealthReport {
        let mut not_joined = Vec::new();
        let mut stalled = Vec::new();
        for ((plugin, topic), h) in self.pipelines.snapshot() {
            if !h.joined() {
                not_joined.push(format!("{plugin}/{topic}"));
            }
            if h.since_beat().is_some_and(|d| d > LIVENESS_WINDOW) {
                stalled.push(format!("{plugin}/{topic}"));
            }
        }
        not_joined.sort();
        stalled.sort();
        let storage: Vec<String> = self
            .backends
            .storage
            .iter()
            .filter_map(|h| h.degraded().map(|r| format!("{}: {r}", h.name())))
            .collect();
        let started = self.ready.load(AtomicOrdering::Acquire);
        HealthReport {
            ready: started
                && not_joined.is_empty()
                && storage.is_empty()
                && !self.shutdown.is_cancelled(),
            live: stalled.is_empty(),
            not_joined,
            stalled,
            storage,
        }
    }

    /// Stop reading, drain in-flight events, commit, and return when done.
    pub async fn shutdown(&self) {
        // The shadow slots outlive their pipelines: their reports, with the drain's
        // comparisons, are published once it ended.
        let shadows = self.pipelines.shadows();
        self.shutdown.cancel();
        if let Some(h) = self.supervisor.lock().await.take() {
            let _ = h.await;
        }
        let _publishing = self.publishing.lock().await;
        for report in shadows.iter().filter_map(|s| s.report()) {
            let store = &*self.backends.store;
            let publish = publish_shadow_report(&self.registry, store, &self.instance, &report);
            match tokio::time::timeout(SHADOW_PUBLISH_INTERVAL * 2, publish).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(plugin = %report.plugin, error = %e, "cannot publish the shadow report at shutdown");
                }
                Err(_) => {
                    tracing::warn!(plugin = %report.plugin, "the state store did not take the shadow report at shutdown in time");
                }
            }
        }
    }
}

/// Keep the supervisor in line with the registry: every active plugin's pipelines at
/// start-up (then the runtime is ready), then each change, until shutdown drains them all.
async fn supervise(
    mut supervisor: Supervisor,
    registry: Arc<Registry>,
    mut changes: broadcast::Receiver<RegistryChange>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    for name in registry.active_names() {
        follow(&mut supervisor, &registry, &name).await;
    }
    ready.store(true, AtomicOrdering::Release);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            change = changes.recv() => match change {
                Ok(
                    RegistryChange::Activated(name)
                    | RegistryChange::Removed(name)
                    | RegistryChange::Shadowed(name),
                ) => follow(&mut supervisor, &registry, &name).await,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let mut names = supervisor.running();
                    names.extend(registry.active_names());
                    names.sort();
                    names.dedup();
                    for n in names {
                        follow(&mut supervisor, &registry, &n).await;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    supervisor.stop_all().await;
}

/// Bring `name`'s pipelines in line with the registry: its active version and its shadow
/// candidate.
async fn follow(supervisor: &mut Supervisor, registry: &Registry, name: &str) {
    let promotion = registry.promotion(name).await;
    supervisor
        .sync_promoted(name, registry.active(name), promotion)
        .await;
    supervisor.set_shadow(name, registry.shadow(name).await);
}

/// This runtime's name among its peers: the static-membership instance id (the pod
/// name), else the host name, else a random one.
fn instance_name(config: &Config) -> String {
    if let Some(id) = config.events.kafka_options().and_then(|k| k.instance_id) {
        return id;
    }
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("spate-{:016x}", rand::random::<u64>()))
}

/// How often each runtime publishes its shadow reports for the others.
const SHADOW_PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Publish the report of every shadow candidate running here whenever it changed (at most
/// once a [`SHADOW_PUBLISH_INTERVAL`]; [`Runtime::shutdown`] publishes the last, after the
/// drain), so any runtime's `GET /v1/plugins/{name}/shadow` sums the cluster's.
async fn publish_shadow_reports(
    publishing: Arc<tokio::sync::Mutex<()>>,
    registry: Arc<Registry>,
    pipelines: Arc<PipelineBoard>,
    store: Arc<dyn spate_core::StateStore>,
    instance: String,
    shutdown: CancellationToken,
) {
    use std::collections::HashMap;
    // What was last published of each run of a candidate here: (plugin, candidate, since).
    let mut published: HashMap<(String, String, u64), (u64, u64)> = HashMap::new();
    let mut tick = tokio::time::interval(SHADOW_PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for report in pipelines.shadow_reports() {
            let id = (
                report.plugin.clone(),
                report.candidate.clone(),
                report.since_ms,
            );
            let seen = (report.compared, report.skipped);
            if published.get(&id) == Some(&seen) {
                continue;
            }
            let outcome = {
                let _publishing = publishing.lock().await;
                publish_shadow_report(&registry, &*store, &instance, &report).await
            };
            match outcome {
                Ok(true) => {
                    published.insert(id, seen);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(plugin = %report.plugin, error = %e, "cannot publish the shadow report; next round");
                }
            }
        }
    }
}

/// Publish `report` under its candidate's generation in the registry; `false` when the
/// registry runs another candidate or none (stopped or promoted, and the pipelines have
/// not caught up): nothing is published.
async fn publish_shadow_report(
    registry: &Registry,
    store: &dyn spate_core::StateStore,
    instance: &str,
    report: &spate_dispatch::shadow::ShadowReport,
) -> spate_core::BackendResult<bool> {
    match shadow_generation(registry, &report.plugin).await {
        Some((candidate, generation)) if candidate == report.candidate => {
            spate_dispatch::shadow::publish(store, instance, &generation, report).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// `name`'s shadow candidate in `registry` and the generation its reports are kept under.
async fn shadow_generation(registry: &Registry, name: &str) -> Option<(String, String)> {
    let record = registry.show(name).await?;
    let candidate = record.shadow?;
    let generation =
        spate_dispatch::shadow::generation(&candidate, record.shadow_since_ms.unwrap_or(0));
    Some((candidate, generation))
}

/// How often the parked-key gauges are recomputed.
const PARKED_GAUGES_INTERVAL: Duration = Duration::from_secs(10);

/// Most parked keys one refresh of the gauges reads per plugin.
const PARKED_GAUGES_MAX_KEYS: u32 = 10_000;

/// Keep `spate_parked_keys`, `spate_parked_events` and `spate_parked_oldest_seconds` of every
/// active `park-key` plugin current, from the store (every runtime of a cluster reports
/// the same cluster-wide figures: alert on their `max`).
async fn parked_gauges(
    registry: Arc<Registry>,
    store: Arc<dyn spate_core::StateStore>,
    shutdown: CancellationToken,
) {
    use spate_core::manifest::OnFailure;
    use spate_core::state::parked;
    let mut tick = tokio::time::interval(PARKED_GAUGES_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for name in registry.active_names() {
            let Some(version) = registry.active(&name) else {
                continue;
            };
            let info = version.info();
            if info.manifest.on_failure != OnFailure::ParkKey {
                continue;
            }
            let ns = parked::namespace(&info.namespace);
            let keys = match parked::keys(&*store, &ns, PARKED_GAUGES_MAX_KEYS).await {
                Ok(k) => k,
                Err(e) => {
                    tracing::debug!(plugin = %name, error = %e, "cannot read the parked keys for the gauges");
                    continue;
                }
            };
            let events: u64 = keys.iter().map(|k| k.events).sum();
            let oldest = keys
                .iter()
                .map(|k| parked::now_ms().saturating_sub(k.since_ms))
                .max()
                .unwrap_or(0);
            metrics::gauge!(spate_core::metric_names::PARKED_KEYS, "plugin" => name.clone())
                .set(keys.len() as f64);
            metrics::gauge!(spate_core::metric_names::PARKED_EVENTS, "plugin" => name.clone())
                .set(events as f64);
            metrics::gauge!(spate_core::metric_names::PARKED_OLDEST_SECONDS, "plugin" => name)
                .set(oldest as f64 / 1000.0);
        }
    }
}
