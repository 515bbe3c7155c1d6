//! The supervisor: one pipeline per subscription of every deployed plugin. It starts a
//! plugin's pipelines, hot-swaps the version they call when only the code changed,
//! restarts them when the subscriptions, ordering or concurrency changed, and stops them.
//!
//! It does not know where plugin versions come from (the server's registry calls
//! [`Supervisor::sync`] on every change; a benchmark calls [`Supervisor::deploy`]) nor how
//! the runtime is configured (it is given a [`DispatchContext`]). The probes read the
//! pipelines' health from its [`PipelineBoard`].

use crate::{ActiveVersion, DispatchContext, Pipeline, PipelineHealth, PluginVersion};
use parking_lot::Mutex;
use spate_core::StartPosition;
use spate_core::manifest::{Manifest, Ordering};
use spate_core::{BackendError, EventBus};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// The running pipelines' health by plugin and topic, as the supervisor starts and stops
/// them.
#[derive(Debug, Default)]
pub struct PipelineBoard {
    pipelines: Mutex<HashMap<(String, String), Arc<PipelineHealth>>>,
    /// Every running plugin's shadow slot, for its report.
    shadows: Mutex<HashMap<String, Arc<crate::shadow::Shadow>>>,
}

impl PipelineBoard {
    /// Every running pipeline: `(plugin, topic)` and its health.
    pub fn snapshot(&self) -> Vec<((String, String), Arc<PipelineHealth>)> {
        self.pipelines
            .lock()
            .iter()
            .map(|(k, h)| (k.clone(), Arc::clone(h)))
            .collect()
    }

    fn insert(&self, plugin: &str, topic: &str, health: Arc<PipelineHealth>) {
        self.pipelines
            .lock()
            .insert((plugin.to_owned(), topic.to_owned()), health);
    }

    fn forget(&self, plugin: &str) {
        self.pipelines.lock().retain(|(p, _), _| p != plugin);
        self.shadows.lock().remove(plugin);
    }

    /// The report of `plugin`'s shadow candidate, if one runs here.
    pub fn shadow_report(&self, plugin: &str) -> Option<crate::shadow::ShadowReport> {
        self.shadows.lock().get(plugin)?.report()
    }

    /// The reports of every shadow candidate running here.
    pub fn shadow_reports(&self) -> Vec<crate::shadow::ShadowReport> {
        self.shadows().iter().filter_map(|s| s.report()).collect()
    }

    /// Every running plugin's shadow slot (kept by the caller, its report outlives the
    /// pipelines: what a shutdown publishes after the drain).
    pub fn shadows(&self) -> Vec<Arc<crate::shadow::Shadow>> {
        self.shadows.lock().values().map(Arc::clone).collect()
    }
}

/// What decides a plugin's pipelines: when it changes, the pipelines restart.
#[derive(Clone, Debug, PartialEq)]
struct Shape {
    subscriptions: Vec<(String, StartPosition)>,
    ordering: Ordering,
    concurrency: u32,
    exactly_once: bool,
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
            exactly_once: m.exactly_once,
        }
    }
}

/// One plugin's running pipelines.
struct PluginRun {
    active: Arc<ActiveVersion>,
    shape: Shape,
    token: CancellationToken,
    tasks: JoinSet<()>,
}

/// Called with a plugin's name when its pipelines stop (removed, or restarted with a new
/// shape): the server drops the plugin's per-topic metric series there.
type OnStopped = Box<dyn Fn(&str) + Send + Sync>;

/// Keeps every deployed plugin's pipelines in line with its version; see the
/// [module docs](self).
pub struct Supervisor {
    cx: DispatchContext,
    board: Arc<PipelineBoard>,
    on_stopped: Option<OnStopped>,
    runs: HashMap<String, PluginRun>,
    /// Shadow candidates by plugin, carried over when its pipelines restart.
    shadows: HashMap<String, Arc<dyn PluginVersion>>,
}

impl Supervisor {
    /// A supervisor building pipelines from `cx` and reporting them on `board`.
    pub fn new(cx: DispatchContext, board: Arc<PipelineBoard>) -> Self {
        Self {
            cx,
            board,
            on_stopped: None,
            runs: HashMap::new(),
            shadows: HashMap::new(),
        }
    }

    /// Call `f` with a plugin's name whenever its pipelines stop.
    pub fn on_stopped(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_stopped = Some(Box::new(f));
        self
    }

    /// The context pipelines are built from.
    pub fn context(&self) -> &DispatchContext {
        &self.cx
    }

    /// Plugins with running pipelines.
    pub fn running(&self) -> Vec<String> {
        self.runs.keys().cloned().collect()
    }

    /// Start `version`'s pipelines, or hot-swap it into the running ones of its plugin.
    pub async fn deploy(&mut self, version: Arc<dyn PluginVersion>) {
        let name = version.info().name().to_owned();
        self.sync(&name, Some(version)).await;
    }

    fn stopped(&self, name: &str) {
        if let Some(f) = &self.on_stopped {
            f(name);
        }
    }

    /// Bring the pipelines of `name` in line with `version`, its active version (`None`:
    /// the plugin was removed).
    pub async fn sync(&mut self, name: &str, version: Option<Arc<dyn PluginVersion>>) {
        self.sync_promoted(name, version, None).await;
    }

    /// [`Supervisor::sync`] for an active version that was promoted over `old` by
    /// promotion `id` (`promotion`): each partition is split at an offset cut
    /// ([`crate::promotion`]) instead of hot-swapped.
    pub async fn sync_promoted(
        &mut self,
        name: &str,
        version: Option<Arc<dyn PluginVersion>>,
        promotion: Option<(u64, Arc<dyn PluginVersion>)>,
    ) {
        let Some(version) = version else {
            if let Some(run) = self.runs.remove(name) {
                run.active.clear();
                stop(run).await;
                self.board.forget(name);
                self.stopped(name);
                info!(plugin = name, "plugin removed; pipelines stopped");
            }
            return;
        };
        let shape = Shape::of(&version.info().manifest);
        if let Some(run) = self.runs.get(name)
            && run.shape == shape
        {
            match promotion {
                Some((id, old)) => {
                    run.active.promote(id, old, version);
                    info!(plugin = name, promotion = id, "promoted at an offset cut");
                }
                // Same subscriptions: an atomic swap. Events already started finish on
                // the version they loaded; new events start on this one.
                None => {
                    run.active.store(version);
                    info!(plugin = name, "hot-swapped active version");
                }
            }
            return;
        }
        if let Some(run) = self.runs.remove(name) {
            stop(run).await;
            // Topics it no longer reads must not keep their last lag.
            self.stopped(name);
        }
        self.board.forget(name);
        let run = self.start(name, version, shape, promotion);
        self.runs.insert(name.to_string(), run);
    }

    /// Run `candidate` beside `name`'s active version as its shadow (`None`: stop it).
    pub fn set_shadow(&mut self, name: &str, candidate: Option<Arc<dyn PluginVersion>>) {
        match &candidate {
            Some(c) => {
                self.shadows.insert(name.to_owned(), Arc::clone(c));
            }
            None => {
                self.shadows.remove(name);
            }
        }
        if let Some(run) = self.runs.get(name) {
            run.active.shadow().set(name, candidate);
        }
    }

    /// Stop every plugin's pipelines (each drains and commits), all at once.
    pub async fn stop_all(&mut self) {
        let mut stopping = JoinSet::new();
        for (_, run) in self.runs.drain() {
            stopping.spawn(stop(run));
        }
        while stopping.join_next().await.is_some() {}
        info!("all pipelines drained");
    }

    fn start(
        &self,
        name: &str,
        version: Arc<dyn PluginVersion>,
        shape: Shape,
        promotion: Option<(u64, Arc<dyn PluginVersion>)>,
    ) -> PluginRun {
        // A topic the plugin writes to must exist before it consumes: a missing
        // dead-letter topic would otherwise stall the first poison event's lane.
        let outputs: Vec<String> = if self.cx.settings.check_output_topics {
            let m = &version.info().manifest;
            let mut t = vec![version.info().dead_letter_topic.clone()];
            t.extend(m.capabilities.emit_topics.iter().cloned());
            if !m.capabilities.workflows.is_empty() {
                t.push(self.cx.settings.workflow_topic.clone());
            }
            t.sort();
            t.dedup();
            t
        } else {
            Vec::new()
        };
        let active = ActiveVersion::with_shadow_share(
            Arc::clone(&version),
            self.cx.settings.shadow_cpu_share,
        );
        if let Some((id, old)) = promotion {
            active.promote(id, old, version);
        }
        active
            .shadow()
            .set(name, self.shadows.get(name).map(Arc::clone));
        self.board
            .shadows
            .lock()
            .insert(name.to_owned(), Arc::clone(active.shadow()));
        let token = self.cx.shutdown.child_token();
        let mut tasks = JoinSet::new();
        let (cx, board, plugin) = (self.cx.clone(), Arc::clone(&self.board), name.to_owned());
        let (run_active, run_token) = (Arc::clone(&active), token.clone());
        tasks.spawn(async move {
            while let Some(missing) = missing_topics(&*cx.bus, &outputs).await {
                error!(%plugin, "topics {missing:?} do not exist: create them, or set events.create-topics = true; checking again in 5 s");
                tokio::select! {
                    _ = run_token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
            // Each attempt: the plugin's pipelines over one checkpointer. An exactly-once
            // transaction that fails voids what the checkpointer applied since its last
            // checkpoint: all the pipelines stop and start again over a new one.
            loop {
                let attempt = run_token.child_token();
                let pipelines = cx.pipelines(&plugin, &run_active, &attempt);
                let Some(failed) = pipelines.first().map(Pipeline::failed) else {
                    return;
                };
                let mut running = JoinSet::new();
                for pipeline in pipelines {
                    board.insert(&plugin, pipeline.topic(), pipeline.health());
                    running.spawn(run_pipeline(pipeline, plugin.clone(), attempt.clone()));
                }
                tokio::select! {
                    _ = async { while running.join_next().await.is_some() {} } => return,
                    _ = failed.cancelled() => {}
                }
                attempt.cancel();
                while running.join_next().await.is_some() {}
                error!(%plugin, "exactly-once transaction failed; restarting the plugin's pipelines from its last committed checkpoint");
                tokio::select! {
                    _ = run_token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
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

/// Run `pipeline` until it stops or `token` is cancelled; a pipeline that fails (to
/// subscribe, or its source) starts again.
async fn run_pipeline(pipeline: Pipeline, plugin: String, token: CancellationToken) {
    let topic = pipeline.topic().to_owned();
    loop {
        let wait = match pipeline.run().await {
            Ok(()) => return,
            Err(BackendError::UnknownTopic(t)) => {
                error!(%plugin, %topic, "topic `{t}` does not exist: create it, or set events.create-topics = true; retrying in 5 s");
                Duration::from_secs(5)
            }
            Err(e) => {
                error!(%plugin, %topic, error = %e, "pipeline failed; restarting");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
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

async fn stop(mut run: PluginRun) {
    run.token.cancel();
    while run.tasks.join_next().await.is_some() {}
}
