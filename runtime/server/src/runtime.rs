//! Runtime assembly: backends chosen by configuration, the sandbox and registry, and the
//! supervisor that keeps one pipeline per subscription of every active plugin.

use crate::config::RegistryConfig;
use crate::config::{CacheConfig, Config, EventsConfig, StateConfig};
use spate_cache_redis::RedisCache;
use spate_core::backend::{Cache, EventBus, EventSource, StateStore};
use spate_core::cache_guard::GuardedCache;
use spate_core::embedded::{EmbeddedLog, EmbeddedStateStore, LogConfig, MokaCache, StorageHealth};
use spate_core::host::HostServices;
use spate_core::manifest::{Manifest, Ordering};
use spate_core::tiered::StateTier;
use spate_dispatch::PipelineHealth;
use spate_dispatch::{
    ActiveVersion, CheckpointConfig, Checkpointer, IdleInstances, Pipeline, PipelineConfig,
    PluginVersion,
};
use spate_engine::{
    ChangeFeed, LocalStore, Registry, RegistryChange, RegistryStore, Sandbox, SandboxConfig,
    SharedStore,
};
use spate_state_cql::CqlStateStore;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::Duration;
use tokio::sync::{Semaphore, broadcast};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

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
            EventsConfig::Embedded {
                default_partitions,
                auto_create_topics,
                retention,
            } => {
                let log = EmbeddedLog::open(
                    &config.data_dir.join("log"),
                    LogConfig {
                        default_partitions: *default_partitions,
                        auto_create_topics: *auto_create_topics,
                        retention: retention.log_config(),
                        ..LogConfig::default()
                    },
                )
                .context("opening the embedded event log")?;
                storage.push(log.health());
                embedded_log = Some(log.clone());
                (log.clone(), log)
            }
            EventsConfig::Kafka { .. } => {
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
        let (backend, name, retry): (Arc<dyn Cache>, &str, u64) = match &config.cache {
            CacheConfig::Memory { max_bytes } => {
                (Arc::new(MokaCache::new(*max_bytes)), "memory", 1_000)
            }
            CacheConfig::Redis {
                retry_interval_ms, ..
            } => {
                let options = config
                    .cache
                    .redis_options()
                    .context("cache.type = \"redis\" without Redis settings")?;
                let redis = RedisCache::new(options).context("setting up the Redis cache")?;
                (Arc::new(redis), "redis", *retry_interval_ms)
            }
        };
        let cache_health = Arc::new(GuardedCache::new(
            backend,
            name,
            Duration::from_millis(retry),
        ));
        let cache: Arc<dyn Cache> = cache_health.clone();
        let tier = if config.read_through.enabled {
            StateTier::read_through(
                Arc::clone(&store),
                Arc::clone(&cache),
                config.read_through.tier_config(),
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
    ready: Arc<AtomicBool>,
    health: Arc<HealthBoard>,
    shutdown: CancellationToken,
    supervisor: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The pipelines' health, as the supervisor starts and stops them.
#[derive(Default)]
struct HealthBoard {
    pipelines: std::sync::Mutex<HashMap<(String, String), Arc<PipelineHealth>>>,
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
        let health = Arc::new(HealthBoard::default());
        let shutdown = CancellationToken::new();
        let supervisor = Supervisor {
            health: Arc::clone(&health),
            registry: Arc::clone(&registry),
            backends: backends.clone(),
            config: config.clone(),
            runs: HashMap::new(),
            shutdown: shutdown.clone(),
            idle: IdleInstances::new(
                config.sandbox.idle_instances,
                Duration::from_millis(config.sandbox.idle_timeout_ms),
            ),
        };
        let changes = registry.changes();
        let ready_flag = Arc::clone(&ready);
        let handle = tokio::spawn(supervisor.run(changes, ready_flag));
        Ok(Arc::new(Self {
            config,
            backends,
            registry,
            ready,
            health,
            shutdown,
            supervisor: tokio::sync::Mutex::new(Some(handle)),
        }))
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
        for ((plugin, topic), h) in lock(&self.health.pipelines).iter() {
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
        self.shutdown.cancel();
        if let Some(h) = self.supervisor.lock().await.take() {
            let _ = h.await;
        }
    }
}

/// What decides a plugin's pipelines: when it changes, the pipelines restart.
#[derive(Clone, Debug, PartialEq)]
struct Shape {
    subscriptions: Vec<(String, spate_core::StartPosition)>,
    ordering: Ordering,
    concurrency: u32,
}

impl Shape {
    fn of(m: &Manifest) -> Self {
        Self {
            subscriptions: m
                .subscriptions
                .iter()
                .map(|s| (s.topic.clone(), s.start))
                .collect(),
            ordering: m.ordering,
            concurrency: m.limits.concurrency,
        }
    }
}

struct PluginRun {
    active: Arc<ActiveVersion>,
    shape: Shape,
    token: CancellationToken,
    tasks: JoinSet<()>,
}

struct Supervisor {
    health: Arc<HealthBoard>,
    registry: Arc<Registry>,
    backends: Backends,
    config: Config,
    runs: HashMap<String, PluginRun>,
    shutdown: CancellationToken,
    /// Idle warm instances of every pipeline: one budget and one timeout.
    idle: Arc<IdleInstances>,
}

impl Supervisor {
    async fn run(
        mut self,
        mut changes: broadcast::Receiver<RegistryChange>,
        ready: Arc<AtomicBool>,
    ) {
        for name in self.registry.active_names() {
            self.sync(&name).await;
        }
        ready.store(true, AtomicOrdering::Release);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                change = changes.recv() => match change {
                    Ok(RegistryChange::Activated(name) | RegistryChange::Removed(name)) => self.sync(&name).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let mut names: Vec<String> = self.runs.keys().cloned().collect();
                        names.extend(self.registry.active_names());
                        names.sort();
                        names.dedup();
                        for n in names {
                            self.sync(&n).await;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        let runs: Vec<PluginRun> = self.runs.drain().map(|(_, r)| r).collect();
        let mut stopping = JoinSet::new();
        for run in runs {
            stopping.spawn(stop(run));
        }
        while stopping.join_next().await.is_some() {}
        info!("all pipelines drained");
    }

    /// Bring the pipelines of `name` in line with its active version.
    async fn sync(&mut self, name: &str) {
        let Some(version) = self.registry.active(name) else {
            if let Some(run) = self.runs.remove(name) {
                run.active.clear();
                stop(run).await;
                lock(&self.health.pipelines).retain(|(p, _), _| p != name);
                crate::telemetry::forget_plugin(name);
                info!(plugin = name, "plugin removed; pipelines stopped");
            }
            return;
        };
        let shape = Shape::of(&version.info().manifest);
        if let Some(run) = self.runs.get(name)
            && run.shape == shape
        {
            // Same subscriptions: an atomic swap. Events already started finish on the
            // version they loaded; new events start on this one.
            run.active.store(version);
            info!(plugin = name, "hot-swapped active version");
            return;
        }
        if let Some(run) = self.runs.remove(name) {
            stop(run).await;
            // Topics it no longer reads must not keep their last lag.
            crate::telemetry::forget_plugin(name);
        }
        lock(&self.health.pipelines).retain(|(p, _), _| p != name);
        let run = self.start(name, version, shape);
        self.runs.insert(name.to_string(), run);
    }

    fn start(&self, name: &str, version: Arc<dyn PluginVersion>, shape: Shape) -> PluginRun {
        // On Kafka a topic the plugin writes to must exist before it consumes: a missing
        // dead-letter topic would otherwise stall the first poison event's lane.
        let outputs: Vec<String> = match &self.config.events {
            EventsConfig::Kafka { .. } => {
                let m = &version.info().manifest;
                let mut t = vec![version.info().dead_letter_topic.clone()];
                t.extend(m.capabilities.emit_topics.iter().cloned());
                if !m.capabilities.workflows.is_empty() {
                    t.push(self.config.workflow_topic.clone());
                }
                t.sort();
                t.dedup();
                t
            }
            EventsConfig::Embedded { .. } => Vec::new(),
        };
        let namespace = version.info().namespace.clone();
        let active = ActiveVersion::new(version);
        let token = self.shutdown.child_token();
        let permits = Arc::new(Semaphore::new(shape.concurrency as usize));
        let services = HostServices {
            state: self.backends.tier.for_plugin(name),
            cache: Arc::clone(&self.backends.cache),
            workflow_topic: self.config.workflow_topic.clone(),
        };
        // One checkpointer per plugin: its pipelines read each other's writes, and one
        // checkpoint covers all their positions.
        let group = format!("{}.{name}", self.config.events.group_prefix());
        let ckpt = Checkpointer::new(
            &group,
            &namespace,
            Arc::clone(&services.state),
            Arc::clone(&services.cache),
            Arc::clone(&self.backends.bus),
            CheckpointConfig {
                interval: Duration::from_millis(self.config.dispatch.commit_interval_ms),
                max_events: self.config.dispatch.checkpoint_events,
                ..CheckpointConfig::default()
            },
        );
        let mut tasks = JoinSet::new();
        for (topic, start) in &shape.subscriptions {
            let mut cfg = PipelineConfig::new(name, topic);
            cfg.group = group.clone();
            cfg.revoke_timeout = self.config.events.revoke_timeout();
            cfg.max_buffered_per_partition = self.config.dispatch.max_buffered_per_partition;
            cfg.start = *start;
            cfg.ordering = shape.ordering;
            cfg.max_buffered = self.config.dispatch.max_buffered;
            cfg.max_buffered_bytes = self.config.dispatch.max_buffered_bytes;
            cfg.commit_interval = Duration::from_millis(self.config.dispatch.commit_interval_ms);
            cfg.checkpoint_events = self.config.dispatch.checkpoint_events;
            cfg.drain_timeout = Duration::from_millis(self.config.dispatch.drain_timeout_ms);
            let pipeline = Pipeline::new(
                cfg,
                Arc::clone(&active),
                Arc::clone(&self.backends.source),
                Arc::clone(&self.backends.bus),
                services.clone(),
                Arc::clone(&permits),
                token.clone(),
            )
            .with_idle_instances(Arc::clone(&self.idle))
            .with_checkpointer(Arc::clone(&ckpt));
            lock(&self.health.pipelines)
                .insert((name.to_string(), topic.clone()), pipeline.health());
            let plugin = name.to_string();
            let topic = topic.clone();
            let token = token.clone();
            let bus = Arc::clone(&self.backends.bus);
            let outputs = outputs.clone();
            tasks.spawn(async move {
                while let Some(missing) = missing_topics(&*bus, &outputs).await {
                    error!(%plugin, "topics {missing:?} do not exist: create them, or set events.create-topics = true; checking again in 5 s");
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
                // A pipeline that fails to subscribe retries until stopped.
                loop {
                    match pipeline_clone_run(&pipeline).await {
                        Ok(()) => return,
                        Err(spate_core::BackendError::UnknownTopic(t)) => {
                            error!(%plugin, %topic, "topic `{t}` does not exist: create it, or set events.create-topics = true; retrying in 5 s");
                            tokio::select! {
                                _ = token.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                            }
                        }
                        Err(e) => {
                            error!(%plugin, %topic, error = %e, "pipeline failed; restarting");
                            tokio::select! {
                                _ = token.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            });
        }
        info!(
            plugin = name,
            topics = shape.subscriptions.len(),
            "pipelines started"
        );
        PluginRun {
            active,
            shape,
            token,
            tasks,
        }
    }
}

/// The topics of `topics` that do not exist (and could not be created), if any.
async fn missing_topics(bus: &dyn EventBus, topics: &[String]) -> Option<Vec<String>> {
    let mut missing = Vec::new();
    for t in topics {
        // Creates it where configured to; otherwise says it is missing.
        if bus.ensure_topic(t, 0).await.is_err() {
            missing.push(t.clone());
        }
    }
    (!missing.is_empty()).then_some(missing)
}

async fn pipeline_clone_run(p: &Pipeline) -> Result<(), spate_core::BackendError> {
    p.run().await
}

async fn stop(mut run: PluginRun) {
    run.token.cancel();
    while run.tasks.join_next().await.is_some() {}
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This runtime's name among its peers: the static-membership instance id (the pod
/// name), else the host name, else a random one.
fn instance_name(config: &Config) -> String {
    if let EventsConfig::Kafka {
        instance_id: Some(id),
        ..
    } = &config.events
        && !id.is_empty()
    {
        return id.clone();
    }
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("spate-{:016x}", rand::random::<u64>()))
}
