//! One plugin's consumption of one topic: key lanes, retries, dead letters and commits.

use super::checkpoint::{Checkpointer, Effects, FinishError, Track};
use super::idle::IdleInstances;
use super::parking;
use super::{
    ActiveVersion, CallOutcome, DeadLetterKind, Instance, PipelineHealth, PluginVersion, TrapKind,
};
use crate::promotion;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use spate_core::host::record::{self, EffectRecord, Outcome};
use spate_core::host::{HostServices, Invocation, MAX_REASON_LEN, PluginInfo, truncate_reason};
use spate_core::manifest::{ExecutionMode, OnFailure, Ordering};
use spate_core::state::parked;
use spate_core::types::{Event, TopicPartition};
use spate_core::{
    ApplyOutcome, BackendError, EventBus, EventSource, SourceMessage, StartPosition, StateStore,
    StateWrite, Subscription,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// How long calls already running may take after the drain timeout.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How often the consumer-lag gauge is refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(1);

/// How often the operators' requests (redrives, discards) are looked for.
const REQUESTS_INTERVAL: Duration = Duration::from_millis(500);

/// Settings of one pipeline, from the [`DispatchSettings`](crate::DispatchSettings) and
/// the plugin's manifest.
#[derive(Clone, Debug)]
pub(crate) struct PipelineConfig {
    /// Plugin name (metrics label).
    pub plugin: String,
    /// Consumer group whose positions this pipeline commits.
    pub group: String,
    /// Topic consumed.
    pub topic: String,
    /// Where a new group starts.
    pub start: StartPosition,
    /// FIFO per key or per partition.
    pub ordering: Ordering,
    /// Most events read and not yet finished; reading pauses above it.
    pub max_buffered: usize,
    /// Most bytes of events read and not yet finished; reading pauses above it (a backlog
    /// of large events must not fill memory before the count bound is reached).
    pub max_buffered_bytes: usize,
    /// Most events of one partition read and not yet finished: above it that partition
    /// is paused (the others keep flowing) until half of them are done.
    pub max_buffered_per_partition: usize,
    /// How often finished positions are committed, and longest time between two
    /// checkpoints of the plugin's effects.
    pub commit_interval: Duration,
    /// How long shutdown keeps handling the events already read (in handlers, in back-off,
    /// or queued in lanes) before abandoning the rest uncommitted.
    pub drain_timeout: Duration,
    /// Longest delay between retries of an infrastructure failure.
    pub max_infra_backoff: Duration,
    /// How long a revoked partition's in-flight events may take to finish before they are
    /// abandoned (uncommitted, so the partition's next owner handles them again).
    pub revoke_timeout: Duration,
}

/// A running consumer of one topic for one plugin.
pub struct Pipeline {
    config: PipelineConfig,
    source: Arc<dyn EventSource>,
    /// Cancelled from outside: stop reading and drain.
    stop: CancellationToken,
    ctx: Arc<WorkerCtx>,
    health: Arc<PipelineHealth>,
}

/// The metrics every event touches, resolved once per pipeline (a lookup by name and
/// labels per event costs more than the update).
struct Meters {
    handler_duration: metrics::Histogram,
    handled: metrics::Counter,
    filtered: metrics::Counter,
}

impl Meters {
    fn new(plugin: &str) -> Self {
        Self {
            handler_duration: metrics::histogram!(spate_core::metric_names::HANDLER_DURATION_SECONDS, "plugin" => plugin.to_owned()),
            handled: metrics::counter!(spate_core::metric_names::EVENTS_TOTAL, "plugin" => plugin.to_owned(), "outcome" => "ok"),
            filtered: metrics::counter!(spate_core::metric_names::EVENTS_TOTAL, "plugin" => plugin.to_owned(), "outcome" => "filtered"),
        }
    }
}

pub(super) struct WorkerCtx {
    pub(super) plugin: String,
    /// Attempts earlier runs made on events of this pipeline's partitions that were still
    /// being retried (loaded when a partition is assigned), by partition and offset.
    attempts: parking_lot::Mutex<HashMap<(u32, u64), u32>>,
    /// Whether `attempts` holds anything (the check every event makes).
    any_attempts: std::sync::atomic::AtomicBool,
    /// Keys of this pipeline's partitions that may be parked (by partition): every parked
    /// one is here (loaded when a partition is assigned, added when one parks), so an event
    /// whose key is not needs no read of the store.
    parked: parking_lot::Mutex<HashSet<(u32, Vec<u8>)>>,
    /// Whether `parked` holds anything (the check every event makes).
    any_parked: std::sync::atomic::AtomicBool,
    /// Idle warm instances of every pipeline, evicted when the sandbox pool is full.
    pub(super) idle: Arc<IdleInstances>,
    pub(super) active: Arc<ActiveVersion>,
    bus: Arc<dyn EventBus>,
    pub(super) services: HostServices,
    /// Where finished events' effects and positions go.
    pub(super) ckpt: Arc<Checkpointer>,
    permits: Arc<Semaphore>,
    /// Metric handles of every event, resolved once.
    meters: Meters,
    /// Cancelled when the drain gives up: workers in back-off abandon their event.
    abandon: CancellationToken,
    /// The pipeline's stop: requests (redrives) stop between events, to go on after the
    /// restart.
    pub(super) stop: CancellationToken,
    pub(super) max_infra_backoff: Duration,
    /// The plugin's state store itself (not the checkpoint's view): promotion cuts are
    /// durable before they take effect.
    store: Arc<dyn StateStore>,
    /// The cuts of the promotion in effect taken for this pipeline's partitions: its id
    /// and the first offset of each partition the promoted version handles.
    cuts: parking_lot::Mutex<(u64, HashMap<u32, u64>)>,
}

impl WorkerCtx {
    /// The version `event` is handled by: the active one, unless a promotion is in effect
    /// and the event is below its partition's cut (or the cut is not taken yet: it was
    /// read before the promotion), which stays on the version promoted over.
    fn version_for(&self, event: &Event) -> Option<Arc<dyn PluginVersion>> {
        let active = self.active.load()?;
        let Some(promotion) = self.active.promotion() else {
            return Some(active);
        };
        let cuts = self.cuts.lock();
        let cut = (cuts.0 == promotion.id)
            .then(|| cuts.1.get(&event.partition).copied())
            .flatten();
        match cut {
            Some(cut) if event.offset >= cut => Some(active),
            _ => Some(Arc::clone(&promotion.old)),
        }
    }

    /// Take (or load) the cut of `partition` for the promotion in effect, durably, with
    /// `next` as the proposal; retried until the store answers or the pipeline stops.
    async fn take_cut(&self, topic: &str, partition: u32, next: u64) {
        let Some(promotion) = self.active.promotion() else {
            return;
        };
        let mut delay = Duration::from_millis(50);
        loop {
            match promotion::cut(
                &*self.store,
                &self.plugin,
                promotion.id,
                (topic, partition),
                next,
            )
            .await
            {
                Ok(cut) => {
                    let mut cuts = self.cuts.lock();
                    if cuts.0 != promotion.id {
                        *cuts = (promotion.id, HashMap::new());
                    }
                    cuts.1.insert(partition, cut);
                    info!(plugin = %self.plugin, topic, partition, cut, promotion = promotion.id, "promotion cut taken");
                    return;
                }
                Err(e) => {
                    warn!(plugin = %self.plugin, topic, partition, error = %e, "cannot record the promotion cut; events stay on the previous version until it is");
                    if !sleep_or_shutdown(self, delay).await {
                        return;
                    }
                    delay = (delay * 2).min(self.max_infra_backoff);
                }
            }
        }
    }

    fn attempts(&self) -> parking_lot::MutexGuard<'_, HashMap<(u32, u64), u32>> {
        self.attempts.lock()
    }

    /// Attempts an earlier run made on the event at `partition`/`offset` (0 if none).
    fn prior_attempts(&self, partition: u32, offset: u64) -> u32 {
        if !self.any_attempts.load(std::sync::atomic::Ordering::Acquire) {
            return 0;
        }
        let mut known = self.attempts();
        let prior = known.remove(&(partition, offset)).unwrap_or(0);
        self.any_attempts
            .store(!known.is_empty(), std::sync::atomic::Ordering::Release);
        prior
    }

    /// Forget the attempt records and parked keys of a revoked partition.
    fn forget_partition(&self, partition: u32) {
        let mut attempts = self.attempts();
        attempts.retain(|(p, _), _| *p != partition);
        self.any_attempts
            .store(!attempts.is_empty(), std::sync::atomic::Ordering::Release);
        drop(attempts);
        let mut parked = self.parked();
        parked.retain(|(p, _)| *p != partition);
        self.any_parked
            .store(!parked.is_empty(), std::sync::atomic::Ordering::Release);
    }

    fn parked(&self) -> parking_lot::MutexGuard<'_, HashSet<(u32, Vec<u8>)>> {
        self.parked.lock()
    }

    /// Whether `key` of `partition` may be parked (then the store says whether it is).
    pub(super) fn may_be_parked(&self, partition: u32, key: &[u8]) -> bool {
        self.any_parked.load(std::sync::atomic::Ordering::Acquire)
            && self.parked().contains(&(partition, key.to_vec()))
    }

    /// `key` of `partition` parked (`true`) or left the parked state.
    pub(super) fn set_parked(&self, partition: u32, key: &[u8], parked: bool) {
        let mut keys = self.parked();
        if parked {
            keys.insert((partition, key.to_vec()));
        } else {
            keys.remove(&(partition, key.to_vec()));
        }
        self.any_parked
            .store(!keys.is_empty(), std::sync::atomic::Ordering::Release);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum LaneKey {
    Key(u32, Vec<u8>),
    Partition(u32),
    /// Keyless events have no order to keep: each is a lane of its own.
    Single(u32, u64),
}

pub(crate) type WarmInstance = (Arc<dyn PluginVersion>, Box<dyn Instance>);

/// What a lane runs, in order: the partition's events of its key, and the operators'
/// requests about the key (which must not overtake, nor be overtaken by, its events).
enum Item {
    Event(Event),
    /// A [`parked::Request`] and its entry.
    Request(String, parked::Request),
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Item>,
    busy: bool,
    instance: Option<WarmInstance>,
    /// The running worker, while `busy`.
    task: Option<AbortHandle>,
    /// Bytes of the event in the worker, while `busy`.
    busy_bytes: usize,
    /// Whether the worker runs an event (counted in the buffers) rather than a request.
    busy_event: bool,
}

/// The pipeline's key lanes, the events they hold, and the warm instances of lanes that
/// went quiet (so a warm-mode lane keeps its instance between bursts).
struct Lanes {
    map: HashMap<LaneKey, Lane>,
    idle: Arc<IdleInstances>,
    /// This pipeline's id in `idle`.
    owner: u64,
    /// Events read and not yet finished (queued or in a worker).
    buffered: usize,
    /// Their bytes.
    bytes: usize,
    /// The same, per partition.
    per_partition: HashMap<u32, usize>,
}

impl Lanes {
    fn new(idle: Arc<IdleInstances>) -> Self {
        Self {
            map: HashMap::new(),
            owner: idle.owner(),
            idle,
            buffered: 0,
            bytes: 0,
            per_partition: HashMap::new(),
        }
    }

    fn count(&mut self, partition: u32, added: usize, removed: usize) {
        self.buffered = (self.buffered + added).saturating_sub(removed);
        let n = self.per_partition.entry(partition).or_default();
        *n = (*n + added).saturating_sub(removed);
        if *n == 0 {
            self.per_partition.remove(&partition);
        }
    }

    /// Events of `partition` read and not yet finished.
    fn buffered_in(&self, partition: u32) -> usize {
        self.per_partition.get(&partition).copied().unwrap_or(0)
    }

    /// Lanes of `partitions` with an event in a worker.
    fn in_flight(&self, partitions: &HashSet<u32>) -> usize {
        self.map
            .iter()
            .filter(|(k, l)| l.busy && partitions.contains(&lane_partition(k)))
            .count()
    }

    /// Queue `event`; returns the lane if it is idle and must be started.
    fn push(&mut self, key: &LaneKey, event: Event) -> Option<&mut Lane> {
        self.count(event.partition, 1, 0);
        self.bytes += event_bytes(&event);
        let (idle, owner) = (&self.idle, self.owner);
        let lane = self.map.entry(key.clone()).or_insert_with(|| Lane {
            instance: idle.take(owner, key),
            ..Lane::default()
        });
        lane.queue.push_back(Item::Event(event));
        (!lane.busy).then_some(lane)
    }

    /// Queue an operator's request behind the lane's events (it holds no buffer room);
    /// returns the lane if it is idle and must be started.
    fn push_request(
        &mut self,
        key: &LaneKey,
        entry: String,
        request: parked::Request,
    ) -> Option<&mut Lane> {
        let (idle, owner) = (&self.idle, self.owner);
        let lane = self.map.entry(key.clone()).or_insert_with(|| Lane {
            instance: idle.take(owner, key),
            ..Lane::default()
        });
        lane.queue.push_back(Item::Request(entry, request));
        (!lane.busy).then_some(lane)
    }

    /// Drop a lane's queued events (they stay uncommitted and are read again later).
    fn clear(&mut self, key: &LaneKey) {
        let queued = self.map.get_mut(key).map(|lane| {
            let events = lane.queue.iter().filter_map(|i| match i {
                Item::Event(e) => Some(e),
                Item::Request(..) => None,
            });
            let (n, bytes) = events.fold((0, 0), |(n, b), e| (n + 1, b + event_bytes(e)));
            lane.queue.clear();
            (n, bytes)
        });
        if let Some((n, bytes)) = queued {
            self.count(lane_partition(key), 0, n);
            self.bytes = self.bytes.saturating_sub(bytes);
        }
    }

    /// Drop the queued (not started) events of `partitions`; running ones go on.
    fn clear_partitions(&mut self, partitions: &HashSet<u32>) {
        let keys: Vec<LaneKey> = self
            .map
            .keys()
            .filter(|k| partitions.contains(&lane_partition(k)))
            .cloned()
            .collect();
        for k in keys {
            self.clear(&k);
        }
    }

    /// Abort the running workers of `partitions`: their events stay uncommitted.
    fn abort_partitions(&mut self, partitions: &HashSet<u32>) -> usize {
        let mut aborted = 0;
        for (k, lane) in &mut self.map {
            if partitions.contains(&lane_partition(k))
                && let Some(task) = lane.task.take()
            {
                task.abort();
                aborted += 1;
            }
        }
        aborted
    }

    /// Abort the running requests of `partitions`.
    fn abort_requests(&mut self, partitions: &HashSet<u32>) {
        for (k, lane) in &mut self.map {
            if partitions.contains(&lane_partition(k))
                && lane.busy
                && !lane.busy_event
                && let Some(task) = lane.task.take()
            {
                task.abort();
                lane.busy = false;
            }
        }
    }

    /// Forget every lane of `partition` (revoked).
    fn revoke(&mut self, partition: u32) {
        let keys: Vec<LaneKey> = self
            .map
            .keys()
            .filter(|k| lane_partition(k) == partition)
            .cloned()
            .collect();
        for k in keys {
            self.clear(&k);
            // An in-flight event of the lane no longer counts either: its report will
            // find no lane and is dropped.
            if let Some(lane) = self.map.remove(&k)
                && lane.busy
                && lane.busy_event
            {
                self.count(partition, 0, 1);
                self.bytes = self.bytes.saturating_sub(lane.busy_bytes);
            }
        }
        self.idle
            .forget(self.owner, |k| lane_partition(k) == partition);
        self.per_partition.remove(&partition);
    }

    /// Retire an empty lane, keeping its warm instance if there is room.
    fn retire(&mut self, key: &LaneKey) {
        if let Some(lane) = self.map.remove(key)
            && let Some(instance) = lane.instance
        {
            self.idle.put(self.owner, key.clone(), instance);
        }
    }
}

/// How a worker left an event.
pub(super) enum Finish {
    /// Handled or dead-lettered: the offset may be committed.
    Done,
    /// Given up at shutdown or because the plugin was removed: not committed.
    Abandoned,
}

struct WorkerReport {
    lane: LaneKey,
    partition: u32,
    finish: Finish,
    instance: Option<WarmInstance>,
    /// The request's entry, if the worker carried out a request rather than an event.
    request: Option<String>,
}

/// What every pipeline of one plugin shares; built once per plugin by
/// [`DispatchContext::pipelines`](crate::DispatchContext::pipelines).
pub(crate) struct PluginShared {
    /// The version new events start on.
    pub(crate) active: Arc<ActiveVersion>,
    /// The bus emits go to (through the checkpointer); asked for the consumer lag.
    pub(crate) bus: Arc<dyn EventBus>,
    /// What handlers reach; its state is the checkpointer's view.
    pub(crate) services: HostServices,
    /// The plugin's checkpoints: every pipeline reads the others' writes, and one
    /// checkpoint covers all their positions.
    pub(crate) ckpt: Arc<Checkpointer>,
    /// Bounds the plugin's concurrent calls across all its pipelines.
    pub(crate) permits: Arc<Semaphore>,
    /// Idle warm instances of every pipeline of the runtime.
    pub(crate) idle: Arc<IdleInstances>,
    /// The plugin's state store, without the checkpoint's view.
    pub(crate) store: Arc<dyn StateStore>,
}

impl Pipeline {
    /// A pipeline of the plugin `shared` describes, reading `source`; cancelling `stop`
    /// drains and stops it.
    pub(crate) fn new(
        config: PipelineConfig,
        shared: &PluginShared,
        source: Arc<dyn EventSource>,
        stop: CancellationToken,
    ) -> Self {
        let ctx = Arc::new(WorkerCtx {
            plugin: config.plugin.clone(),
            attempts: parking_lot::Mutex::default(),
            any_attempts: std::sync::atomic::AtomicBool::new(false),
            parked: parking_lot::Mutex::default(),
            any_parked: std::sync::atomic::AtomicBool::new(false),
            idle: Arc::clone(&shared.idle),
            active: Arc::clone(&shared.active),
            bus: Arc::clone(&shared.bus),
            services: shared.services.clone(),
            ckpt: Arc::clone(&shared.ckpt),
            meters: Meters::new(&config.plugin),
            permits: Arc::clone(&shared.permits),
            abandon: CancellationToken::new(),
            stop: stop.clone(),
            max_infra_backoff: config.max_infra_backoff,
            store: Arc::clone(&shared.store),
            cuts: parking_lot::Mutex::default(),
        });
        Self {
            config,
            source,
            stop,
            ctx,
            health: Arc::default(),
        }
    }

    /// The topic it consumes.
    pub fn topic(&self) -> &str {
        &self.config.topic
    }

    /// Cancelled when the plugin's exactly-once transaction failed: every pipeline of the
    /// plugin stops, and the plugin restarts from its last committed checkpoint.
    pub fn failed(&self) -> CancellationToken {
        self.ctx.ckpt.failed().clone()
    }

    /// Its consumer's membership and its event loop's heartbeat, for the probes.
    pub fn health(&self) -> Arc<PipelineHealth> {
        Arc::clone(&self.health)
    }

    /// Consume until shutdown, then drain: every event already read is still handled (so
    /// the final commit leaves nothing to redo on restart), within the drain timeout.
    pub async fn run(&self) -> Result<(), BackendError> {
        let cfg = &self.config;
        let mut sub = self
            .source
            .subscribe(&cfg.group, std::slice::from_ref(&cfg.topic), cfg.start)
            .await?;
        self.health.beat();
        self.health.set_joined(sub.joined());
        self.ctx.ckpt.enter();
        let mut st = RunState {
            committed: HashMap::new(),
            // Idle warm instances hold pool slots: they live in the runtime's shared budget.
            lanes: Lanes::new(Arc::clone(&self.ctx.idle)),
            tasks: JoinSet::new(),
            paused: HashSet::new(),
            last_lag: None,
            requests: HashSet::new(),
            last_requests: Instant::now(),
            read_next: HashMap::new(),
        };
        let mut ticker = tokio::time::interval(cfg.commit_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.stop.clone();
        let failed = self.ctx.ckpt.failed().clone();

        loop {
            // A full buffer reads only partition changes: a revocation must still be
            // heard while every lane is busy.
            let full =
                st.lanes.buffered >= cfg.max_buffered || st.lanes.bytes >= cfg.max_buffered_bytes;
            let next = if full { sub.next_control() } else { sub.next() };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // An exactly-once transaction failed: everything since the last checkpoint
                // is void. Stop without committing; the plugin restarts from it.
                _ = failed.cancelled() => {
                    st.tasks.abort_all();
                    self.close(&mut *sub, &mut st).await;
                    return Err(BackendError::Unavailable(
                        "an exactly-once transaction failed; restarting from the last checkpoint".into(),
                    ));
                }
                Some(joined) = st.tasks.join_next(), if !st.tasks.is_empty() => {
                    let Ok(report) = joined else { continue };
                    self.finish(report, &mut st, true);
                    self.resume_drained(&mut *sub, &mut st);
                }
                msg = next => match msg {
                    Ok(SourceMessage::Assigned(parts)) => {
                        for (tp, start) in parts {
                            // Reading resumes at the checkpoint's position when it is ahead
                            // of the source's (a crash, or a lost assignment, between a
                            // checkpoint and its commit); the source's stays what is
                            // committed, so the next tick commits the checkpoint's.
                            self.assign(&tp, start).await;
                            st.committed.insert(tp.partition, start);
                            st.read_next.insert(tp.partition, start);
                        }
                    }
                    Ok(SourceMessage::Revoked(parts)) => {
                        self.revoke(&mut *sub, &mut st, parts).await;
                    }
                    Ok(SourceMessage::Events(events)) => {
                        self.follow_promotion(&mut st).await;
                        self.dispatch(&mut *sub, &mut st, events);
                    }
                    Err(e) => {
                        warn!(plugin = %cfg.plugin, topic = %cfg.topic, error = %e, "subscription failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                },
                _ = ticker.tick() => self.tick(&mut *sub, &mut st).await,
            }
        }
        self.drain(&mut *sub, &mut st, &mut ticker).await;
        self.checkpoint_now().await;
        self.commit(&mut *sub, &mut st.committed).await;
        self.close(&mut *sub, &mut st).await;
        Ok(())
    }

    /// Put events just read in their key lanes (starting the lanes that were idle), but
    /// those already handled and those the filter passes over; pause a partition whose
    /// share of the buffer is full.
    fn dispatch(&self, sub: &mut dyn Subscription, st: &mut RunState, events: Vec<Event>) {
        let cfg = &self.config;
        for event in events {
            let next = st.read_next.entry(event.partition).or_default();
            *next = (*next).max(event.offset + 1);
            // A re-delivery, a revoked partition, or an event a checkpoint recorded as done
            // before a restart: not handled again.
            if self
                .ctx
                .ckpt
                .track(&cfg.topic, event.partition, event.offset)
                != Track::New
            {
                continue;
            }
            // The active version's filter: a passed-over event is done, with no sandbox
            // and no effects.
            if !self.ctx.active.admits(&event) {
                self.ctx
                    .ckpt
                    .skip(&cfg.topic, event.partition, event.offset);
                self.ctx.meters.filtered.increment(1);
                continue;
            }
            let partition = event.partition;
            let key = lane_key(cfg.ordering, &event);
            if let Some(lane) = st.lanes.push(&key, event) {
                self.start_next(key, lane, &mut st.tasks);
            }
            if st.lanes.buffered_in(partition) >= cfg.max_buffered_per_partition
                && st.paused.insert(partition)
            {
                debug!(plugin = %cfg.plugin, partition, "partition full; pausing it");
                sub.pause(&TopicPartition::new(cfg.topic.clone(), partition));
                metrics::counter!(spate_core::metric_names::PARTITION_PAUSES_TOTAL, "plugin" => cfg.plugin.clone()).increment(1);
            }
        }
    }

    /// A commit interval went by: promotions, probes, idle instances, the commit, the lag,
    /// and (less often) the operators' requests.
    async fn tick(&self, sub: &mut dyn Subscription, st: &mut RunState) {
        self.follow_promotion(st).await;
        self.health.beat();
        self.health.set_joined(sub.joined());
        self.ctx.idle.expire();
        self.commit(sub, &mut st.committed).await;
        self.report_lag(st).await;
        if st.last_requests.elapsed() >= REQUESTS_INTERVAL {
            st.last_requests = Instant::now();
            self.take_requests(st).await;
        }
    }

    /// Keep handling what was read, lanes included, so the final commit covers it all. At
    /// the deadline, back-offs are abandoned and calls already running get a short grace
    /// (each is bounded by its own deadline); the rest is redelivered.
    async fn drain(
        &self,
        sub: &mut dyn Subscription,
        st: &mut RunState,
        ticker: &mut tokio::time::Interval,
    ) {
        let cfg = &self.config;
        let drain = tokio::time::sleep(cfg.drain_timeout);
        tokio::pin!(drain);
        let mut abandoning = false;
        while !st.tasks.is_empty() {
            tokio::select! {
                Some(joined) = st.tasks.join_next() => {
                    if let Ok(report) = joined {
                        self.finish(report, st, !abandoning);
                    }
                }
                _ = &mut drain => {
                    if abandoning {
                        warn!(plugin = %cfg.plugin, in_flight = st.tasks.len(), "drain grace over; aborting in-flight calls uncommitted");
                        st.tasks.abort_all();
                        break;
                    }
                    warn!(plugin = %cfg.plugin, in_flight = st.tasks.len(), "drain timeout; abandoning queued events uncommitted");
                    abandoning = true;
                    self.ctx.abandon.cancel();
                    drain.as_mut().reset(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                _ = ticker.tick() => {
                    self.health.beat();
                    self.commit(sub, &mut st.committed).await;
                }
            }
        }
    }

    /// Leave the checkpoints and the group; a stopped pipeline (plugin removed, runtime
    /// stopping, a failed transaction) keeps no instance.
    async fn close(&self, sub: &mut dyn Subscription, st: &mut RunState) {
        self.ctx.ckpt.leave().await;
        sub.close().await;
        st.lanes.idle.forget(st.lanes.owner, |_| true);
        self.health.set_joined(false);
    }

    /// Partitions taken away: their queued events are dropped (the next owner reads them
    /// again), their running events get the revoke timeout to finish, and what is done is
    /// committed before the source may hand the partitions over.
    async fn revoke(
        &self,
        sub: &mut dyn Subscription,
        st: &mut RunState,
        parts: Vec<TopicPartition>,
    ) {
        let cfg = &self.config;
        let revoked: HashSet<u32> = parts
            .iter()
            .filter(|tp| tp.topic == cfg.topic)
            .map(|tp| tp.partition)
            .collect();
        st.lanes.clear_partitions(&revoked);
        // Requests (redrives) stop at once: each step is durable on its own, and the
        // partition's next owner carries out the rest.
        st.lanes.abort_requests(&revoked);
        let deadline = tokio::time::sleep(cfg.revoke_timeout);
        tokio::pin!(deadline);
        while st.lanes.in_flight(&revoked) > 0 {
            tokio::select! {
                Some(joined) = st.tasks.join_next() => {
                    if let Ok(report) = joined {
                        self.finish(report, st, true);
                    }
                }
                _ = &mut deadline => {
                    let aborted = st.lanes.abort_partitions(&revoked);
                    warn!(plugin = %cfg.plugin, aborted, "revoke timeout; abandoning in-flight events of revoked partitions uncommitted");
                    break;
                }
            }
        }
        // What the revoked partitions finished is made durable before they are handed over.
        self.checkpoint_now().await;
        let mut offsets = Vec::new();
        for p in &revoked {
            // Its next owner takes (or loads) its cut.
            st.read_next.remove(p);
            let committed = st.committed.remove(p).unwrap_or(0);
            if let Some(next) = self.ctx.ckpt.durable(&cfg.topic, *p)
                && next > committed
                && !self.ctx.ckpt.transactional()
            {
                offsets.push((TopicPartition::new(cfg.topic.clone(), *p), next));
            }
            st.lanes.revoke(*p);
            st.paused.remove(p);
            let prefix = parked::requests_prefix(&cfg.topic, Some(*p));
            st.requests.retain(|e| !e.starts_with(&prefix));
            self.ctx.forget_partition(*p);
        }
        self.ctx.ckpt.release(&cfg.topic, revoked.iter().copied());
        debug!(plugin = %cfg.plugin, partitions = ?revoked, ?offsets, "releasing revoked partitions");
        if let Err(e) = sub.release(&parts, &offsets).await {
            warn!(plugin = %cfg.plugin, error = %e, "final commit of revoked partitions failed; their next owner redoes the uncommitted events");
        }
    }

    /// Resume paused partitions once half their buffered events are done.
    fn resume_drained(&self, sub: &mut dyn Subscription, st: &mut RunState) {
        if st.paused.is_empty() {
            return;
        }
        let low = self.config.max_buffered_per_partition / 2;
        let lanes = &st.lanes;
        let ready: Vec<u32> = st
            .paused
            .iter()
            .copied()
            .filter(|p| lanes.buffered_in(*p) <= low)
            .collect();
        for p in ready {
            st.paused.remove(&p);
            sub.resume(&TopicPartition::new(self.config.topic.clone(), p));
        }
    }

    fn finish(&self, report: WorkerReport, st: &mut RunState, continue_lane: bool) {
        if let Some(entry) = &report.request {
            st.requests.remove(entry);
        }
        let (lanes, tasks) = (&mut st.lanes, &mut st.tasks);
        let Some(lane) = lanes.map.get_mut(&report.lane) else {
            return; // its partition was revoked
        };
        lane.busy = false;
        lane.task = None;
        lane.instance = report.instance;
        lanes.bytes = lanes
            .bytes
            .saturating_sub(std::mem::take(&mut lane.busy_bytes));
        if report.request.is_none() {
            lanes.count(report.partition, 0, 1);
        }
        if matches!(report.finish, Finish::Abandoned) {
            // The plugin is gone or we are stopping: later events of this lane must not
            // overtake the abandoned one, so the lane stops here.
            lanes.clear(&report.lane);
        }
        let Some(lane) = lanes.map.get_mut(&report.lane) else {
            return;
        };
        if lane.queue.is_empty() {
            lanes.retire(&report.lane);
        } else if continue_lane {
            self.start_next(report.lane, lane, tasks);
        }
    }

    fn start_next(&self, key: LaneKey, lane: &mut Lane, tasks: &mut JoinSet<WorkerReport>) {
        let Some(item) = lane.queue.pop_front() else {
            return;
        };
        lane.busy = true;
        let instance = lane.instance.take();
        let ctx = Arc::clone(&self.ctx);
        let handle = match item {
            Item::Event(event) => {
                lane.busy_bytes = event_bytes(&event);
                lane.busy_event = true;
                let span = info_span!("event", plugin = %self.config.plugin, topic = %event.topic, partition = event.partition, offset = event.offset);
                tasks.spawn(
                    async move {
                        let partition = event.partition;
                        let (finish, instance) = handle_event(&ctx, event, instance).await;
                        WorkerReport {
                            lane: key,
                            partition,
                            finish,
                            instance,
                            request: None,
                        }
                    }
                    .instrument(span),
                )
            }
            Item::Request(entry, request) => {
                lane.busy_bytes = 0;
                lane.busy_event = false;
                let span = info_span!("request", plugin = %self.config.plugin, action = request.action.as_str(), key = %request.key_id, id = %request.id);
                tasks.spawn(
                    async move {
                        let partition = request.partition;
                        let (finish, instance) =
                            parking::carry_out(&ctx, &entry, request, instance).await;
                        WorkerReport {
                            lane: key,
                            partition,
                            finish,
                            instance,
                            request: Some(entry),
                        }
                    }
                    .instrument(span),
                )
            }
        };
        lane.task = Some(handle);
    }

    /// Queue the operators' pending requests for the partitions this pipeline owns, each in
    /// its key's lane (at most once while it runs).
    async fn take_requests(&self, st: &mut RunState) {
        let cfg = &self.config;
        if st.committed.is_empty() {
            return;
        }
        let Some(version) = self.ctx.active.load() else {
            return;
        };
        let ns = parked::namespace(&version.info().namespace);
        let pending = match parked::requests(&*self.ctx.services.state, &ns, &cfg.topic, 256).await
        {
            Ok(p) => p,
            Err(e) => {
                warn!(plugin = %cfg.plugin, error = %e, "cannot read the operators' requests; will retry");
                return;
            }
        };
        for (entry, request) in pending {
            if !st.committed.contains_key(&request.partition) || st.requests.contains(&entry) {
                continue;
            }
            let key = request_lane(cfg.ordering, &request);
            st.requests.insert(entry.clone());
            if let Some(lane) = st.lanes.push_request(&key, entry, request) {
                self.start_next(key, lane, &mut st.tasks);
            }
        }
    }

    /// Where `tp` resumes: the later of the source's committed position and the last
    /// checkpoint's (whose done offsets above it are skipped). A store that cannot be read
    /// is asked again: resuming without it could apply an event's state twice.
    /// A promotion that this pipeline has not cut yet: each assigned partition is cut at
    /// the next offset it had not read, so what was read stays on the previous version.
    async fn follow_promotion(&self, st: &mut RunState) {
        let Some(promotion) = self.ctx.active.promotion() else {
            return;
        };
        if self.ctx.cuts.lock().0 == promotion.id {
            return;
        }
        let mut partitions: Vec<(u32, u64)> = st.read_next.iter().map(|(p, n)| (*p, *n)).collect();
        partitions.sort_unstable();
        {
            // Cuts taken from here on belong to this promotion, even with no partition.
            let mut cuts = self.ctx.cuts.lock();
            *cuts = (promotion.id, HashMap::new());
        }
        for (partition, next) in partitions {
            self.ctx.take_cut(&self.config.topic, partition, next).await;
        }
    }

    async fn assign(&self, tp: &TopicPartition, start: u64) {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.ctx.ckpt.assign(&tp.topic, tp.partition, start).await {
                Ok(_) => break,
                Err(e) => {
                    warn!(plugin = %self.config.plugin, topic = %tp.topic, partition = tp.partition, error = %e, "cannot read the partition's checkpoint; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.max_infra_backoff);
                }
            }
        }
        // A promotion in effect splits the partition at its cut (taken by an earlier
        // owner, or here at the start: everything read from now on is new).
        self.ctx.take_cut(&tp.topic, tp.partition, start).await;
        // Events of the partition an earlier run was retrying go on from the attempts it
        // made (a restart, or a rebalance onto this runtime, does not start them over).
        let Some(version) = self.ctx.active.load() else {
            return;
        };
        let ns = parked::namespace(&version.info().namespace);
        if version.info().manifest.on_failure == OnFailure::ParkKey {
            // Keys an earlier owner parked: their events keep queuing behind them (asked
            // until the store answers: without the list, they would not).
            let mut delay = Duration::from_millis(50);
            loop {
                match parked::keys(&*self.ctx.services.state, &ns, u32::MAX).await {
                    Ok(keys) => {
                        for k in keys {
                            if k.topic == tp.topic
                                && k.partition == tp.partition
                                && let Ok(key) = hex::decode(&k.key_id)
                            {
                                self.ctx.set_parked(tp.partition, &key, true);
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        warn!(plugin = %self.config.plugin, partition = tp.partition, error = %e, "cannot list the parked keys; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(self.config.max_infra_backoff);
                    }
                }
            }
        }
        let prefix = parked::attempts_prefix(&tp.topic, tp.partition);
        match self.ctx.services.state.scan(&ns, &prefix, 10_000).await {
            Ok(records) => {
                let mut known = self.ctx.attempts();
                for (entry, raw) in records {
                    if let (Some(offset), Ok(n)) = (
                        parked::attempts_offset(&entry),
                        serde_json::from_slice::<u32>(&raw),
                    ) && offset >= start
                    {
                        known.insert((tp.partition, offset), n);
                    }
                }
                self.ctx
                    .any_attempts
                    .store(!known.is_empty(), std::sync::atomic::Ordering::Release);
            }
            Err(e) => {
                warn!(plugin = %self.config.plugin, partition = tp.partition, error = %e, "cannot read the attempts already made; retried events of the partition count from 1");
            }
        }
    }

    /// Take a checkpoint covering every event finished so far, within the drain timeout.
    async fn checkpoint_now(&self) {
        let ckpt = &self.ctx.ckpt;
        match tokio::time::timeout(self.config.drain_timeout, ckpt.checkpoint()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(plugin = %self.config.plugin, error = %e, "checkpoint failed; the events it would cover are handled again after a restart");
            }
            Err(_) => {
                warn!(plugin = %self.config.plugin, "checkpoint timed out; the events it would cover are handled again after a restart");
            }
        }
    }

    /// Commit to the source what the last durable checkpoint covers.
    async fn commit(&self, sub: &mut dyn Subscription, committed: &mut HashMap<u32, u64>) {
        let cfg = &self.config;
        if self.ctx.ckpt.transactional() {
            // The checkpoint's transaction committed them; keep the lag current.
            for (p, c) in committed.iter_mut() {
                if let Some(next) = self.ctx.ckpt.durable(&cfg.topic, *p) {
                    *c = (*c).max(next);
                }
            }
            return;
        }
        let offsets: Vec<(TopicPartition, u64)> = committed
            .iter()
            .filter_map(|(p, c)| {
                let next = self.ctx.ckpt.durable(&cfg.topic, *p)?;
                (next > *c).then(|| (TopicPartition::new(cfg.topic.clone(), *p), next))
            })
            .collect();
        if offsets.is_empty() {
            return;
        }
        match sub.commit(&offsets).await {
            Ok(()) => {
                for (tp, next) in offsets {
                    committed.insert(tp.partition, next);
                }
            }
            // The next tick tries again.
            Err(e) => warn!(plugin = %cfg.plugin, error = %e, "commit failed; will retry"),
        }
    }

    /// Publish the consumer lag, at most once a second (asking a broker for end offsets
    /// on every commit tick would cost a round trip per partition).
    async fn report_lag(&self, st: &mut RunState) {
        if st.last_lag.is_some_and(|t| t.elapsed() < LAG_INTERVAL) {
            return;
        }
        st.last_lag = Some(Instant::now());
        let cfg = &self.config;
        if let Ok(ends) = self.ctx.bus.end_offsets(&cfg.topic).await {
            let lag: u64 = st
                .committed
                .iter()
                .map(|(p, c)| {
                    ends.get(*p as usize)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(*c)
                })
                .sum();
            metrics::gauge!(spate_core::metric_names::CONSUMER_LAG, "plugin" => cfg.plugin.clone(), "topic" => cfg.topic.clone())
                .set(lag as f64);
        }
    }
}

/// What [`Pipeline::run`] keeps between messages.
struct RunState {
    /// Assigned partitions and the position last committed to the source.
    committed: HashMap<u32, u64>,
    lanes: Lanes,
    tasks: JoinSet<WorkerReport>,
    /// Partitions paused because they hold too many unfinished events.
    paused: HashSet<u32>,
    last_lag: Option<Instant>,
    /// Entries of the operators' requests queued or running in a lane.
    requests: HashSet<String>,
    /// When the requests were last looked for.
    last_requests: Instant,
    /// The next offset to read of each assigned partition (a promotion's cut).
    read_next: HashMap<u32, u64>,
}

fn lane_key(ordering: Ordering, event: &Event) -> LaneKey {
    match (ordering, &event.key) {
        (Ordering::Partition, _) => LaneKey::Partition(event.partition),
        (Ordering::Key, Some(k)) => LaneKey::Key(event.partition, k.clone()),
        (Ordering::Key, None) => LaneKey::Single(event.partition, event.offset),
    }
}

/// What an event holds in memory: key, payload and headers.
fn event_bytes(e: &Event) -> usize {
    e.held_bytes()
}

/// The lane a request runs in: its key's (or, for a keyless dead letter, one of its own).
fn request_lane(ordering: Ordering, request: &parked::Request) -> LaneKey {
    match (ordering, request.key()) {
        (Ordering::Partition, _) => LaneKey::Partition(request.partition),
        (Ordering::Key, Some(k)) => LaneKey::Key(request.partition, k),
        (Ordering::Key, None) => LaneKey::Single(
            request.partition,
            xxhash_rust::xxh3::xxh3_64(request.id.as_bytes()),
        ),
    }
}

fn lane_partition(k: &LaneKey) -> u32 {
    match k {
        LaneKey::Key(p, _) | LaneKey::Partition(p) | LaneKey::Single(p, _) => *p,
    }
}

/// What went wrong with one attempt.
#[derive(Debug)]
pub(super) enum Failure {
    /// Worth another attempt (counts against the plugin's limit).
    Retryable(DeadLetterKind, String),
    /// Never worth another attempt: dead-letter now.
    Fatal(DeadLetterKind, String),
    /// A backing service failed: retry without counting, never dead-letter.
    Infrastructure(String),
}

async fn handle_event(
    ctx: &WorkerCtx,
    event: Event,
    warm: Option<WarmInstance>,
) -> (Finish, Option<WarmInstance>) {
    let Some(version) = ctx.version_for(&event) else {
        return (Finish::Abandoned, None);
    };
    let info = Arc::clone(version.info());
    let mut instance = instance_of(&version, warm);
    let event = Arc::new(event);
    // A keyless event has no order to keep: it is dead-lettered like any other plugin's.
    let park = info.manifest.on_failure == OnFailure::ParkKey && event.key.is_some();
    if park {
        // A parked key's later events queue behind its parked ones, never handled out of
        // order.
        match parking::queue_if_parked(ctx, &info, &event).await {
            Some(true) => return (Finish::Done, Some((version, instance))),
            Some(false) => {}
            None => return (Finish::Abandoned, None),
        }
    }
    let prior = ctx.prior_attempts(event.partition, event.offset);
    let call = Call {
        version: &version,
        info: &info,
        event: &event,
        prior,
        at: At::Event(&event),
        side: Vec::new(),
    };
    let done = match call.run(ctx, &mut instance).await {
        Called::Done => true,
        Called::Abandoned => return (Finish::Abandoned, None),
        Called::Failed {
            kind,
            reason,
            attempts,
        } if park => {
            shadow_failed(ctx, &info, &event, (kind, &reason, attempts), "parked");
            parking::park_failed(ctx, &info, &event, kind, &reason, attempts).await
        }
        Called::Failed {
            kind,
            reason,
            attempts,
        } => {
            shadow_failed(
                ctx,
                &info,
                &event,
                (kind, &reason, attempts),
                "dead-lettered",
            );
            let side = vec![attempts_cleared(&info, &event)];
            dead_letter(
                ctx,
                &info,
                &event,
                (kind, &reason, attempts),
                side,
                At::Event(&event),
            )
            .await
        }
    };
    match done {
        true => (Finish::Done, Some((version, instance))),
        false => (Finish::Abandoned, None),
    }
}

/// Compare a shadow candidate, if one runs, with the active version's failure on `event`.
fn shadow_failed(
    ctx: &WorkerCtx,
    info: &PluginInfo,
    event: &Event,
    (kind, reason, attempts): (DeadLetterKind, &str, u32),
    then: &str,
) {
    match ctx.active.shadow().admit() {
        Some(ticket) => {
            let label = info.manifest.version.to_string();
            let outcome = Outcome::failed(kind, reason, then);
            let mine = EffectRecord::new(event, &label, outcome, attempts, None);
            ticket.compare(&ctx.services, event, mine);
        }
        None => ctx.active.shadow().passed_over(),
    }
}

/// The lane's warm instance if it is of `version`, else a new one.
pub(super) fn instance_of(
    version: &Arc<dyn PluginVersion>,
    warm: Option<WarmInstance>,
) -> Box<dyn Instance> {
    match warm {
        Some((v, i)) if Arc::ptr_eq(&v, version) => i,
        _ => version.instance(),
    }
}

/// How the calls of one event ended.
pub(super) enum Called {
    /// A call returned ok and its effects were applied.
    Done,
    /// The event cannot be handled: `attempts` made, the last failing for `kind`/`reason`.
    Failed {
        kind: DeadLetterKind,
        reason: String,
        attempts: u32,
    },
    /// Given up at shutdown, or because the plugin was removed.
    Abandoned,
}

/// How one attempt ended.
enum Step {
    /// Handled: its effects are applied.
    Done,
    /// The pipeline is stopping, or the plugin is gone.
    Abandoned,
    /// Try again at once without counting (idle instances were evicted for a pool slot).
    Again,
    /// It failed.
    Failed(Failure),
}

/// One event to call the plugin with until it is handled or cannot be.
pub(super) struct Call<'a> {
    pub(super) version: &'a Arc<dyn PluginVersion>,
    pub(super) info: &'a Arc<PluginInfo>,
    pub(super) event: &'a Arc<Event>,
    /// Attempts an earlier run (before a restart or a rebalance) already made.
    pub(super) prior: u32,
    /// Where its effects belong: the event's own position, or (a redriven event, whose
    /// position was passed long ago) the partition carrying out the request.
    pub(super) at: At<'a>,
    /// Writes to the runtime's namespaces applied in one unit with its effects.
    pub(super) side: Vec<(String, StateWrite)>,
}

impl Call<'_> {
    /// Call until a call returns ok and its effects are applied, retrying what the
    /// manifest's retry policy allows (attempts counted durably, see
    /// [`parked::attempts_entry`]) and infrastructure failures without counting.
    pub(super) async fn run(self, ctx: &WorkerCtx, instance: &mut Box<dyn Instance>) -> Called {
        let policy = &self.info.manifest.retry;
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(policy.initial_backoff_ms))
            .with_max_delay(Duration::from_millis(policy.max_backoff_ms))
            .with_jitter()
            .without_max_times()
            .build();
        let mut infra_backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(ctx.max_infra_backoff)
            .with_jitter()
            .without_max_times()
            .build();
        // An event an earlier run already tried goes on from where it was.
        let mut attempt: u32 = (self.prior + 1).min(policy.max_attempts.max(1));
        loop {
            let failure = match self.attempt(ctx, instance, attempt).await {
                Step::Done => return Called::Done,
                Step::Abandoned => return Called::Abandoned,
                Step::Again => continue,
                Step::Failed(f) => f,
            };
            match failure {
                Failure::Infrastructure(message) => {
                    metrics::counter!(spate_core::metric_names::INFRASTRUCTURE_ERRORS_TOTAL, "plugin" => ctx.plugin.clone())
                        .increment(1);
                    let delay = infra_backoff.next().unwrap_or(ctx.max_infra_backoff);
                    warn!(error = %message, ?delay, "infrastructure failure; event will be retried");
                    if !sleep_or_shutdown(ctx, delay).await {
                        return Called::Abandoned;
                    }
                }
                Failure::Retryable(kind, reason) if attempt < policy.max_attempts => {
                    metrics::counter!(spate_core::metric_names::RETRIES_TOTAL, "plugin" => ctx.plugin.clone())
                        .increment(1);
                    // Counted durably, so the event's next owner goes on from here.
                    record_attempts(ctx, self.info, self.event, self.at, attempt).await;
                    let delay = backoff
                        .next()
                        .unwrap_or(Duration::from_millis(policy.max_backoff_ms));
                    debug!(attempt, kind = kind.as_str(), %reason, ?delay, "retrying");
                    if !sleep_or_shutdown(ctx, delay).await {
                        return Called::Abandoned;
                    }
                    attempt += 1;
                }
                Failure::Retryable(kind, reason) | Failure::Fatal(kind, reason) => {
                    return Called::Failed {
                        kind,
                        reason,
                        attempts: attempt,
                    };
                }
            }
        }
    }

    /// One call of the handler (attempt number `attempt`) and, if it returns ok, its
    /// effects applied.
    async fn attempt(
        &self,
        ctx: &WorkerCtx,
        instance: &mut Box<dyn Instance>,
        attempt: u32,
    ) -> Step {
        let info = self.info;
        // A warm instance waiting for a permit would hold a pool slot it cannot use:
        // lanes waiting outnumber the permits, and could exhaust the pool.
        let permit = match ctx.permits.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                instance.release();
                let Ok(p) = ctx.permits.acquire().await else {
                    return Step::Abandoned;
                };
                p
            }
        };
        let mut invocation = Invocation::new(
            Arc::clone(info),
            ctx.services.clone(),
            Arc::new(self.event.with_attempt(attempt)),
        );
        // A shadow candidate compared on this event is served what this call reads.
        let ticket = match self.at {
            At::Event(_) => ctx.active.shadow().admit(),
            At::Partition(..) => None,
        };
        if ticket.is_some() {
            invocation.keep_reads();
        }
        let started = Instant::now();
        // A panic in the host (ours or wasmtime's) must not take the lane down with it: it
        // becomes a trap of this attempt, retried and dead-lettered as usual.
        let result = match AssertUnwindSafe(instance.call(invocation))
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(panic = %what, "host panicked while handling an event");
                CallOutcome::Trap(TrapKind::Other, format!("host panic: {what}"))
            }
        };
        ctx.meters
            .handler_duration
            .record(started.elapsed().as_secs_f64());
        // The permit bounds concurrent calls (sandboxes, CPU), not effects in flight:
        // waiting for the broker to acknowledge emits must not hold another lane's call
        // back. The lane itself still waits, so per-key order is kept. A warm instance
        // keeps its pool slot until the lane finishes, so warm plugins keep the permit
        // (and the pool stays bounded by their concurrency).
        let _held_through_apply = match info.manifest.execution.mode {
            ExecutionMode::Fresh => {
                drop(permit);
                None
            }
            ExecutionMode::Warm => Some(permit),
        };
        let journal = match result {
            CallOutcome::Ok(journal) => journal,
            CallOutcome::Retry(reason) => {
                return Step::Failed(Failure::Retryable(DeadLetterKind::RetriesExhausted, reason));
            }
            CallOutcome::Reject(reason) => {
                return Step::Failed(Failure::Fatal(DeadLetterKind::Rejected, reason));
            }
            CallOutcome::Trap(kind, message) => return self.trapped(ctx, instance, kind, message),
        };
        let effects = self.effects_of(ctx, journal, attempt, ticket);
        match apply_effects(ctx, self.at, effects).await {
            Ok(()) => {
                ctx.meters.handled.increment(1);
                Step::Done
            }
            Err(f) => Step::Failed(f),
        }
    }

    /// A successful call's effects, with the runtime's own writes of the same unit (the
    /// call's `side`, its effect record, the end of its attempt count), compared with the
    /// shadow candidate if `ticket` says so.
    fn effects_of(
        &self,
        ctx: &WorkerCtx,
        journal: spate_core::host::Journal,
        attempt: u32,
        ticket: Option<crate::shadow::Ticket>,
    ) -> Effects {
        let (info, event) = (self.info, self.event);
        let mut effects = journal.into_effects(&info.namespace);
        effects.side.clone_from(&self.side);
        effects.side.extend(record::write_for(
            info,
            event,
            Outcome::Ok,
            attempt,
            Some(&effects),
        ));
        match ticket {
            Some(ticket) => {
                let label = info.manifest.version.to_string();
                let mine = EffectRecord::new(event, &label, Outcome::Ok, attempt, Some(&effects));
                ticket.compare(&ctx.services, event, mine);
            }
            None if matches!(self.at, At::Event(_)) => ctx.active.shadow().passed_over(),
            None => {}
        }
        // Kept for the record only; the checkpoint applies no reads.
        effects.reads = Default::default();
        if attempt > 1 {
            effects.side.push(attempts_cleared(info, event));
        }
        effects
    }

    /// What a trap of kind `kind` means for the event; a trapped instance is never reused.
    fn trapped(
        &self,
        ctx: &WorkerCtx,
        instance: &mut Box<dyn Instance>,
        kind: TrapKind,
        message: String,
    ) -> Step {
        metrics::counter!(spate_core::metric_names::TRAPS_TOTAL, "plugin" => ctx.plugin.clone(), "kind" => kind.as_str()).increment(1);
        *instance = self.version.instance();
        Step::Failed(match kind {
            TrapKind::Infrastructure => Failure::Infrastructure(message),
            TrapKind::PoolExhausted => {
                // Idle warm instances hold slots nobody is using: free them before this
                // event waits for one.
                let evicted = ctx.idle.evict_all();
                if evicted > 0 {
                    debug!(evicted, "sandbox pool full; evicted idle warm instances");
                    return Step::Again;
                }
                Failure::Infrastructure(message)
            }
            k if k.retryable() => Failure::Retryable(DeadLetterKind::Trap(k), message),
            k => Failure::Fatal(DeadLetterKind::Trap(k), message),
        })
    }
}

/// Record that `attempts` attempts of `event` failed (with the next checkpoint: a backoff
/// is far longer than a commit interval).
async fn record_attempts(
    ctx: &WorkerCtx,
    info: &PluginInfo,
    event: &Event,
    at: At<'_>,
    attempts: u32,
) {
    let effects = Effects {
        side: vec![(
            parked::namespace(&info.namespace),
            parked::put(parked::attempts_entry(event), &attempts, None),
        )],
        ..Effects::default()
    };
    let (topic, partition) = match at {
        At::Event(e) => (e.topic.as_str(), e.partition),
        At::Partition(t, p) => (t, p),
    };
    if let Err(e) = ctx.ckpt.apply(topic, partition, effects).await {
        warn!(error = ?e, attempts, "cannot record the attempts made; a restart would count them again");
    }
}

/// The removal of `event`'s attempt record, with the event's last effects.
pub(super) fn attempts_cleared(info: &PluginInfo, event: &Event) -> (String, StateWrite) {
    (
        parked::namespace(&info.namespace),
        parked::delete(parked::attempts_entry(event)),
    )
}

pub(super) async fn sleep_or_shutdown(ctx: &WorkerCtx, delay: Duration) -> bool {
    tokio::select! {
        _ = ctx.abandon.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// Which position effects belong to.
#[derive(Clone, Copy, Debug)]
pub(super) enum At<'a> {
    /// A source event's: applying them completes its position.
    Event(&'a Event),
    /// No position (a redriven event's, a request's), applied while this partition is
    /// assigned to the pipeline.
    Partition(&'a str, u32),
}

/// Apply a call's effects, all of them or nothing: state first (to the checkpoint's view,
/// where a compare-and-swap that no longer holds fails the whole event before anything is
/// published; or, for a store shared with other runtimes, to the store itself), then,
/// together with the event's position if it `marks` one, its emits and cache writes.
pub(super) async fn apply_effects(
    ctx: &WorkerCtx,
    at: At<'_>,
    mut effects: Effects,
) -> Result<(), Failure> {
    let conflict = |key: String| {
        Failure::Retryable(
            DeadLetterKind::StateConflict,
            format!("compare-and-swap on `{key}` lost to a concurrent write"),
        )
    };
    // A compare-and-swap on a store other runtimes write is decided by the store, after
    // the view's older writes reached it.
    let by_store = !ctx.ckpt.write_back()
        || (ctx.ckpt.shared() && effects.writes.iter().any(|w| w.condition.is_some()));
    if by_store && !effects.writes.is_empty() {
        if ctx.ckpt.write_back() {
            ctx.ckpt
                .checkpoint()
                .await
                .map_err(|e| backend_failure("state", e))?;
        }
        match ctx
            .services
            .state
            .apply(&effects.namespace, &effects.writes)
            .await
        {
            Ok(ApplyOutcome::Applied) => {}
            Ok(ApplyOutcome::Conflict { key }) => return Err(conflict(key)),
            Err(e) => return Err(backend_failure("state", e)),
        }
    }
    if by_store {
        effects.writes.clear();
    }
    if !ctx.ckpt.write_back() {
        // No view in front of the store: the runtime's own writes go to it directly.
        for (ns, w) in std::mem::take(&mut effects.side) {
            ctx.services
                .state
                .apply(&ns, std::slice::from_ref(&w))
                .await
                .map_err(|e| backend_failure("state", e))?;
        }
    }
    let done = match at {
        At::Event(event) => {
            ctx.ckpt
                .finish(&event.topic, event.partition, event.offset, effects)
                .await
        }
        At::Partition(topic, partition) => ctx.ckpt.apply(topic, partition, effects).await,
    };
    match done {
        Ok(()) => Ok(()),
        Err(FinishError::Conflict(key)) => Err(conflict(key)),
        Err(FinishError::Backend(e)) => Err(backend_failure("state", e)),
    }
}

/// Apply effects that cannot conflict (the runtime's own writes, dead letters), retrying
/// until they are taken or the pipeline gives up; returns whether they were.
pub(super) async fn apply_until_taken(ctx: &WorkerCtx, at: At<'_>, effects: &Effects) -> bool {
    let mut delay = Duration::from_millis(50);
    loop {
        if ctx.stop.is_cancelled() && matches!(at, At::Partition(..)) {
            return false;
        }
        match apply_effects(ctx, at, effects.clone()).await {
            Ok(()) => return true,
            Err(e) => {
                warn!(error = ?e, ?delay, "cannot apply the runtime's writes yet; retrying");
                if !sleep_or_shutdown(ctx, delay).await {
                    return false;
                }
                delay = (delay * 2).min(ctx.max_infra_backoff);
            }
        }
    }
}

fn backend_failure(what: &'static str, e: BackendError) -> Failure {
    match e {
        BackendError::Unavailable(m) => Failure::Infrastructure(format!("{what}: {m}")),
        other => Failure::Fatal(DeadLetterKind::BackendRefused, format!("{what}: {other}")),
    }
}

/// Write the event to the plugin's dead-letter topic (with `side`, and completing its
/// position if it `marks` one). Retries the write until it is taken or the pipeline gives
/// up; returns whether it was taken.
pub(super) async fn dead_letter(
    ctx: &WorkerCtx,
    info: &PluginInfo,
    event: &Event,
    (kind, reason, attempts): (DeadLetterKind, &str, u32),
    side: Vec<(String, StateWrite)>,
    at: At<'_>,
) -> bool {
    // Published by the checkpoint's sender like an emit (retried until taken), and
    // acknowledged before the event's position is committed.
    let mut effects = Effects::dead_letter(info, event, kind, reason, attempts);
    effects.side = side;
    let outcome = Outcome::failed(kind, reason, "dead-lettered");
    effects
        .side
        .extend(record::write_for(info, event, outcome, attempts, None));
    // The log shows the reason as the record carries it.
    let reason = truncate_reason(reason.to_string(), 2 * MAX_REASON_LEN);
    if !apply_until_taken(ctx, at, &effects).await {
        warn!("dead letter not queued; the event stays uncommitted");
        return false;
    }
    metrics::counter!(spate_core::metric_names::DEAD_LETTERS_TOTAL, "plugin" => ctx.plugin.clone(), "kind" => kind.as_str()).increment(1);
    metrics::counter!(spate_core::metric_names::EVENTS_TOTAL, "plugin" => ctx.plugin.clone(), "outcome" => "dead-lettered").increment(1);
    warn!(kind = kind.as_str(), %reason, attempts, "event dead-lettered");
    true
}
