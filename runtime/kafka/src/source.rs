//! One consumer-group member: a poll thread that owns the librdkafka consumer, and the
//! [`Subscription`] the dispatcher reads.
//!
//! The poll thread never stops polling (so the member never exceeds
//! `max.poll.interval.ms` and leaves the group): when the dispatcher's channel is full it
//! pauses the assignment and keeps serving callbacks. Rebalance callbacks run on that
//! thread. A revocation is sent to the dispatcher, which finishes (or, after its revoke
//! timeout, abandons) the revoked partitions' in-flight events and hands back their final
//! offsets; the callback commits them synchronously before librdkafka lets the
//! partitions go. Every assignment gets an epoch, and events fetched under an older
//! assignment of a partition are dropped, so a partition that leaves and comes back can
//! never have stale events tracked ahead of its redelivered ones.

use crate::options::KafkaOptions;
use crate::record::to_event;
use async_trait::async_trait;
use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use spate_core::types::{Event, TopicPartition};
use spate_core::{BackendError, BackendResult, SourceMessage, Subscription};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak, mpsc as std_mpsc};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Most events handed to the dispatcher in one message.
const MAX_BATCH: usize = 500;
/// Batches queued between the poll thread and the dispatcher.
const CHANNEL_BATCHES: usize = 4;
/// How long one poll waits for a message (also the pause/resume reaction time).
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long the poll thread waits for room in a full channel before pausing the whole
/// assignment. A pause is cheap to take but expensive to leave (librdkafka restarts
/// fetching only after a fetch backoff), so short waits for a busy dispatcher are spent
/// retrying instead; longer ones pause, and the thread goes back to polling so the member
/// keeps its place in the group.
const HOLD_AFTER: Duration = Duration::from_millis(500);
/// Retry interval of a send into a full channel before [`HOLD_AFTER`].
const RETRY_SEND: Duration = Duration::from_millis(1);

enum Control {
    Assigned(Vec<(TopicPartition, u64, u64)>),
    Revoked(Vec<TopicPartition>),
}

/// Events fetched under a given assignment epoch of their partition.
type Batch = Vec<(u64, Event)>;

/// What the poll thread, the rebalance callbacks and the subscription share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Set at the first assignment (even an empty one): the member has joined.
    joined: AtomicBool,
    /// Set once the dispatcher made its final commit: revocations no longer wait for it.
    closing: AtomicBool,
    /// Partitions the dispatcher paused (its lanes for them are full).
    paused: Mutex<HashSet<i32>>,
    /// Assignment epoch of each assigned partition.
    epochs: Mutex<HashMap<i32, u64>>,
    next_epoch: AtomicU64,
}

pub(crate) struct SubContext {
    shared: Arc<Shared>,
    group: String,
    topic: String,
    control: mpsc::UnboundedSender<Control>,
    release: Mutex<std_mpsc::Receiver<Vec<(TopicPartition, u64)>>>,
    revoke_wait: Duration,
    request_timeout: Duration,
}

impl ClientContext for SubContext {}

impl ConsumerContext for SubContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let parts: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition().max(0) as u32))
            .collect();
        {
            let mut epochs = self.shared.epochs.lock();
            for e in tpl.elements() {
                epochs.remove(&e.partition());
            }
        }
        metrics::counter!(spate_core::metric_names::KAFKA_REBALANCES_TOTAL, "kind" => "revoke")
            .increment(1);
        if parts.is_empty() || self.shared.closing.load(Ordering::Acquire) {
            return;
        }
        let lost = consumer.assignment_lost();
        info!(group = %self.group, topic = %self.topic, partitions = ?parts.iter().map(|p| p.partition).collect::<Vec<_>>(), lost, "partitions revoked; waiting for their in-flight events");
        let release = self.release.lock();
        // A release the dispatcher sent after an earlier revocation timed out is stale.
        while release.try_recv().is_ok() {}
        if self.control.send(Control::Revoked(parts)).is_err() {
            return;
        }
        let started = Instant::now();
        match release.recv_timeout(self.revoke_wait) {
            Ok(offsets) if offsets.is_empty() => {}
            Ok(offsets) if lost => {
                warn!(group = %self.group, ?offsets, "assignment was lost (session expired); not committing: the partitions' new owners redo these events");
            }
            Ok(offsets) => {
                let tpl = offsets_tpl(&offsets);
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => {
                        debug!(group = %self.group, ?offsets, waited = ?started.elapsed(), "committed revoked partitions")
                    }
                    Err(e) => {
                        warn!(group = %self.group, error = %e, "commit of revoked partitions failed; their new owners redo the uncommitted events")
                    }
                }
            }
            Err(_) => warn!(
                group = %self.group,
                waited = ?self.revoke_wait,
                "dispatcher did not release revoked partitions in time; letting them go uncommitted"
            ),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.shared.joined.store(true, Ordering::Release);
        }
        match rebalance {
            Rebalance::Assign(tpl) if tpl.count() > 0 => {
                metrics::counter!(spate_core::metric_names::KAFKA_REBALANCES_TOTAL, "kind" => "assign").increment(1);
                // Where each partition resumes: the group's committed offset. Only the
                // dispatcher's bookkeeping starts there; librdkafka fetches from it (or
                // from auto.offset.reset) by itself. 0 is a safe floor when unknown.
                let committed: HashMap<i32, u64> = consumer
                    .committed_offsets((*tpl).clone(), self.request_timeout)
                    .map(|c| {
                        c.elements()
                            .iter()
                            .filter_map(|e| match e.offset() {
                                Offset::Offset(o) => Some((e.partition(), o.max(0) as u64)),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let mut parts = Vec::new();
                {
                    let mut epochs = self.shared.epochs.lock();
                    for e in tpl.elements() {
                        let epoch = self.shared.next_epoch.fetch_add(1, Ordering::Relaxed);
                        epochs.insert(e.partition(), epoch);
                        parts.push((
                            TopicPartition::new(e.topic(), e.partition().max(0) as u32),
                            committed.get(&e.partition()).copied().unwrap_or(0),
                            epoch,
                        ));
                    }
                }
                // librdkafka keeps a partition's pause flag across a lost and regained
                // assignment: a partition paused before the group lost it would never be
                // fetched again. A new assignment starts unpaused.
                {
                    let mut paused = self.shared.paused.lock();
                    for e in tpl.elements() {
                        paused.remove(&e.partition());
                    }
                }
                if let Err(e) = consumer.resume(tpl) {
                    warn!(group = %self.group, error = %e, "could not resume newly assigned partitions");
                }
                info!(group = %self.group, topic = %self.topic, partitions = ?parts.iter().map(|p| p.0.partition).collect::<Vec<_>>(), "partitions assigned");
                let _ = self.control.send(Control::Assigned(parts));
            }
            Rebalance::Error(e) => warn!(group = %self.group, error = %e, "rebalance error"),
            _ => {}
        }
    }
}

/// The consumers of this process, by (group, topic): what a transaction asks for the
/// group metadata it commits offsets with.
pub(crate) type Members = Arc<Mutex<HashMap<(String, String), Weak<BaseConsumer<SubContext>>>>>;

/// The current group metadata (member id, generation) of the live consumer of `topic`
/// in `group`, if there is one.
pub(crate) fn group_metadata(
    members: &Members,
    group: &str,
    topic: &str,
) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
    let consumer = members
        .lock()
        .get(&(group.to_owned(), topic.to_owned()))?
        .upgrade()?;
    consumer.group_metadata()
}

fn offsets_tpl(offsets: &[(TopicPartition, u64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (tp, next) in offsets {
        // Only fails for an invalid offset, which a u64 below i64::MAX is not.
        let _ =
            tpl.add_partition_offset(&tp.topic, tp.partition as i32, Offset::Offset(*next as i64));
    }
    tpl
}

/// A live consumer-group membership for one topic.
pub(crate) struct KafkaSubscription {
    consumer: Option<Arc<BaseConsumer<SubContext>>>,
    shared: Arc<Shared>,
    topic: String,
    control: mpsc::UnboundedReceiver<Control>,
    events: mpsc::Receiver<Batch>,
    release: std_mpsc::Sender<Vec<(TopicPartition, u64)>>,
    /// Epochs of the assignments the dispatcher has been told about.
    epochs: HashMap<u32, u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KafkaSubscription {
    /// Create the consumer, subscribe, and start its poll thread.
    pub(crate) fn start(
        mut config: ClientConfig,
        group: &str,
        topic: &str,
        opts: &KafkaOptions,
        members: &Members,
    ) -> BackendResult<Self> {
        if !opts.librdkafka.contains_key("queued.max.messages.kbytes") {
            // Bounds what is fetched ahead (and held while the dispatcher is full).
            config.set("queued.max.messages.kbytes", "16384");
        }
        if !opts.librdkafka.contains_key("fetch.queue.backoff.ms") {
            // Once the fetched-ahead queue is over its bounds, librdkafka waits this long
            // before fetching again (default 1 s): a dispatcher catching up would sit idle
            // for most of it.
            config.set("fetch.queue.backoff.ms", "10");
        }
        let shared = Arc::new(Shared::default());
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (release_tx, release_rx) = std_mpsc::channel();
        let context = SubContext {
            shared: Arc::clone(&shared),
            group: group.to_string(),
            topic: topic.to_string(),
            control: control_tx,
            release: Mutex::new(release_rx),
            // The dispatcher's own revoke timeout bounds in-flight events; this margin
            // covers its final commit.
            revoke_wait: opts.revoke_timeout + Duration::from_secs(5),
            request_timeout: opts.request_timeout,
        };
        let consumer: BaseConsumer<SubContext> = config
            .create_with_context(context)
            .map_err(|e| BackendError::Invalid(format!("creating the Kafka consumer: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| crate::backend_error(e, Some(topic)))?;
        let consumer = Arc::new(consumer);
        members.lock().insert(
            (group.to_owned(), topic.to_owned()),
            Arc::downgrade(&consumer),
        );
        let (events_tx, events_rx) = mpsc::channel(CHANNEL_BATCHES);
        let thread = {
            let consumer = Arc::clone(&consumer);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("kafka-{topic}"))
                .spawn(move || poll_loop(consumer, shared, events_tx))
                .map_err(|e| BackendError::Unavailable(format!("spawning the poll thread: {e}")))?
        };
        info!(group, topic, "joined consumer group");
        Ok(Self {
            consumer: Some(consumer),
            shared,
            topic: topic.to_string(),
            control: control_rx,
            events: events_rx,
            release: release_tx,
            epochs: HashMap::new(),
            thread: Some(thread),
        })
    }

    fn on_control(&mut self, c: Control) -> SourceMessage {
        match c {
            Control::Assigned(parts) => {
                let mut out = Vec::with_capacity(parts.len());
                for (tp, start, epoch) in parts {
                    self.epochs.insert(tp.partition, epoch);
                    out.push((tp, start));
                }
                SourceMessage::Assigned(out)
            }
            Control::Revoked(parts) => {
                for tp in &parts {
                    self.epochs.remove(&tp.partition);
                }
                SourceMessage::Revoked(parts)
            }
        }
    }

    fn current(&self, batch: Batch) -> Vec<Event> {
        batch
            .into_iter()
            .filter(|(epoch, e)| self.epochs.get(&e.partition) == Some(epoch))
            .map(|(_, e)| e)
            .collect()
    }

    fn stopped() -> BackendError {
        BackendError::Unavailable("the Kafka consumer's poll thread stopped".into())
    }

    fn partition_tpl(&self, partition: u32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition as i32);
        tpl
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> BackendResult<SourceMessage> {
        loop {
            tokio::select! {
                biased;
                c = self.control.recv() => {
                    return c.map(|c| self.on_control(c)).ok_or_else(Self::stopped);
                }
                b = self.events.recv() => {
                    let Some(batch) = b else { return Err(Self::stopped()) };
                    let events = self.current(batch);
                    if !events.is_empty() {
                        return Ok(SourceMessage::Events(events));
                    }
                }
            }
        }
    }

    async fn next_control(&mut self) -> BackendResult<SourceMessage> {
        let c = self.control.recv().await;
        c.map(|c| self.on_control(c)).ok_or_else(Self::stopped)
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> BackendResult<()> {
        let Some(consumer) = self.consumer.clone() else {
            return Err(Self::stopped());
        };
        let tpl = offsets_tpl(offsets);
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| BackendError::Unavailable(e.to_string()))?
            .map_err(|e| crate::backend_error(e, None))
    }

    async fn release(
        &mut self,
        _revoked: &[TopicPartition],
        offsets: &[(TopicPartition, u64)],
    ) -> BackendResult<()> {
        // The rebalance callback is waiting for these and commits them itself, before
        // librdkafka lets the partitions go.
        self.release
            .send(offsets.to_vec())
            .map_err(|_| Self::stopped())
    }

    async fn close(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
        // The poll thread holds the last reference: dropping it there leaves the group
        // (librdkafka's close) before the thread ends.
        self.consumer = None;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        info!(topic = %self.topic, "left consumer group");
    }

    fn joined(&self) -> bool {
        self.shared.joined.load(Ordering::Acquire)
    }

    fn pause(&mut self, partition: &TopicPartition) {
        self.shared.paused.lock().insert(partition.partition as i32);
        if let Some(c) = &self.consumer {
            let _ = c.pause(&self.partition_tpl(partition.partition));
        }
    }

    fn resume(&mut self, partition: &TopicPartition) {
        self.shared
            .paused
            .lock()
            .remove(&(partition.partition as i32));
        if let Some(c) = &self.consumer {
            let _ = c.resume(&self.partition_tpl(partition.partition));
        }
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// Poll until stopped, handing batches to the dispatcher; hold (pause) the assignment
/// while the dispatcher's channel is full, but keep polling.
fn poll_loop(
    consumer: Arc<BaseConsumer<SubContext>>,
    shared: Arc<Shared>,
    events: mpsc::Sender<Batch>,
) {
    let mut pending: Option<Batch> = None;
    let mut held = false;
    let mut full_since: Option<Instant> = None;
    let mut last_warning: Option<Instant> = None;
    while !shared.stop.load(Ordering::Acquire) {
        if let Some(batch) = pending.take() {
            match events.try_send(batch) {
                Ok(()) => {
                    full_since = None;
                    if held {
                        set_held(&consumer, &shared, false);
                        held = false;
                    }
                }
                Err(mpsc::error::TrySendError::Full(batch)) => {
                    pending = Some(batch);
                    let since = *full_since.get_or_insert_with(Instant::now);
                    if !held && since.elapsed() < HOLD_AFTER {
                        std::thread::sleep(RETRY_SEND);
                        continue;
                    }
                    if !held {
                        set_held(&consumer, &shared, true);
                        held = true;
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
        let mut wait = POLL_INTERVAL;
        loop {
            match consumer.poll(wait) {
                Some(Ok(m)) => {
                    let epoch = shared.epochs.lock().get(&m.partition()).copied();
                    if let Some(epoch) = epoch {
                        pending
                            .get_or_insert_with(Vec::new)
                            .push((epoch, to_event(&m)));
                    }
                    // Take what is already fetched without waiting, up to a batch.
                    wait = Duration::ZERO;
                    if pending.as_ref().is_some_and(|p| p.len() >= MAX_BATCH) {
                        break;
                    }
                }
                Some(Err(e)) => {
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        warn!(error = %e, "Kafka consumer error (librdkafka retries by itself)");
                        last_warning = Some(Instant::now());
                    }
                    break;
                }
                None => break,
            }
        }
    }
    debug!("poll thread stopping; leaving the group");
    // Dropping the last reference closes the consumer: it leaves the group (unless it is
    // a static member, which keeps its partitions for the session timeout).
}

/// Pause (or resume) the whole assignment, leaving the dispatcher's own pauses alone.
fn set_held(consumer: &BaseConsumer<SubContext>, shared: &Shared, hold: bool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let mut tpl = TopicPartitionList::new();
    {
        let paused = shared.paused.lock();
        for e in assignment.elements() {
            if hold || !paused.contains(&e.partition()) {
                tpl.add_partition(e.topic(), e.partition());
            }
        }
    }
    if tpl.count() == 0 {
        return;
    }
    let r = if hold {
        consumer.pause(&tpl)
    } else {
        consumer.resume(&tpl)
    };
    if let Err(e) = r {
        debug!(error = %e, hold, "pause/resume of the assignment failed");
    }
}
