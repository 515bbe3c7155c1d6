//! The log as [`EventSource`]: a group's subscription, its cursors and fetches.

use super::record::FetchRange;
use super::record::read_ranges;
use super::writer::LogOp;
use super::writer::LogOut;
use super::*;

#[async_trait]
impl EventSource for EmbeddedLog {
    async fn subscribe(
        &self,
        group: &str,
        topics: &[String],
        start: StartPosition,
    ) -> BackendResult<Box<dyn Subscription>> {
        if group.is_empty() {
            return Err(BackendError::Invalid("consumer group name is empty".into()));
        }
        if topics.is_empty() {
            return Err(BackendError::Invalid(
                "a subscription needs at least one topic".into(),
            ));
        }
        let mut seen = HashSet::new();
        let mut unique = Vec::new();
        for topic in topics {
            validate_topic(topic)?;
            if seen.insert(topic.as_str()) {
                unique.push(topic.clone());
            }
        }
        let op = LogOp::Join {
            group: group.to_owned(),
            topics: unique.clone(),
            start,
        };
        let LogOut::Joined(assigned) = self.inner.writer.call(op).await? else {
            return Err(unexpected_reply());
        };

        let mut watches = Vec::with_capacity(unique.len());
        let mut by_name = HashMap::new();
        for name in &unique {
            let topic = self.inner.known_topic(name)?;
            watches.push(topic.changed.subscribe());
            by_name.insert(name.as_str(), topic);
        }
        let mut parts = Vec::with_capacity(assigned.len());
        let mut index = HashMap::with_capacity(assigned.len());
        for (tp, offset) in &assigned {
            let topic = by_name
                .get(tp.topic.as_str())
                .cloned()
                .ok_or_else(|| BackendError::UnknownTopic(tp.topic.clone()))?;
            index.insert(tp.clone(), parts.len());
            parts.push(PartitionCursor {
                tp: tp.clone(),
                topic,
                fetch: *offset,
                paused: false,
            });
        }
        Ok(Box::new(LogSubscription {
            inner: self.inner.clone(),
            group: group.to_owned(),
            parts,
            index,
            watches,
            assigned: Some(assigned),
            rotate: 0,
            pending: None,
        }))
    }

    async fn committed(&self, group: &str, topic: &str) -> BackendResult<Vec<Option<u64>>> {
        let partitions = self.inner.known_topic(topic)?.partitions();
        let db = self.inner.db.clone();
        let (group, topic) = (group.to_owned(), topic.to_owned());
        blocking(move || {
            let handle = db.get()?;
            let txn = handle.begin_read().map_err(redb_error)?;
            let table = txn.open_table(POSITIONS).map_err(redb_error)?;
            (0..partitions)
                .map(|p| {
                    table
                        .get((group.as_str(), topic.as_str(), p))
                        .map(|g| g.map(|g| g.value()))
                        .map_err(redb_error)
                })
                .collect()
        })
        .await
    }
}

pub(super) struct PartitionCursor {
    pub(super) tp: TopicPartition,
    pub(super) topic: Arc<Topic>,
    /// Next offset to fetch (in memory only; commits are the dispatcher's call).
    pub(super) fetch: u64,
    pub(super) paused: bool,
}

impl PartitionCursor {
    /// Where the next fetch starts: `fetch`, or the first event kept if retention
    /// deleted past it (only possible for a position no group had committed).
    fn from(&self) -> u64 {
        self.fetch.max(self.topic.start(self.tp.partition))
    }
}

/// A group's subscription to the embedded log.
///
/// `next` is cancel-safe: fetch positions advance only when a message is returned.
pub(super) struct LogSubscription {
    pub(super) inner: Arc<Inner>,
    pub(super) group: String,
    pub(super) parts: Vec<PartitionCursor>,
    pub(super) index: HashMap<TopicPartition, usize>,
    pub(super) watches: Vec<watch::Receiver<u64>>,
    /// The `Assigned` message not yet handed out.
    pub(super) assigned: Option<Vec<(TopicPartition, u64)>>,
    /// Where the next fetch starts looking, so no partition is always last in line.
    pub(super) rotate: usize,
    /// The read in flight and what it covers. It outlives a cancelled `next` (the
    /// dispatcher races `next` against its commit tick), so the next call awaits the same
    /// read instead of starting another: one fetch per subscription, bounded in bytes.
    pub(super) pending: Option<PendingFetch>,
}

/// A fetch's plan and its blocking read.
pub(super) type PendingFetch = (
    Vec<(usize, FetchRange)>,
    tokio::task::JoinHandle<BackendResult<(Vec<Event>, bool)>>,
);

impl LogSubscription {
    /// Chooses what to read next: up to `max_fetch_events` spread evenly over the
    /// unpaused partitions that have data, leftovers going round in rotating order.
    fn plan(&self) -> Vec<(usize, FetchRange)> {
        let n = self.parts.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.rotate % n;
        let ready: Vec<(usize, u64)> = (0..n)
            .map(|i| (start + i) % n)
            .filter_map(|i| {
                let part = &self.parts[i];
                let available = part
                    .topic
                    .end(part.tp.partition)
                    .saturating_sub(part.from());
                (!part.paused && available > 0).then_some((i, available))
            })
            .collect();
        if ready.is_empty() {
            return Vec::new();
        }
        let mut budget = self.inner.config.max_fetch_events as u64;
        let share = budget.div_ceil(ready.len() as u64).max(1);
        let mut take = vec![0u64; ready.len()];
        for (slot, &(_, available)) in take.iter_mut().zip(&ready) {
            let n = share.min(available).min(budget);
            *slot = n;
            budget -= n;
        }
        for (slot, &(_, available)) in take.iter_mut().zip(&ready) {
            let n = (available - *slot).min(budget);
            *slot += n;
            budget -= n;
        }
        ready
            .iter()
            .zip(take)
            .filter(|(_, n)| *n > 0)
            .map(|(&(i, _), n)| {
                let part = &self.parts[i];
                let range = FetchRange {
                    topic: part.tp.topic.clone(),
                    partition: part.tp.partition,
                    from: part.from(),
                    to: part.from() + n,
                };
                (i, range)
            })
            .collect()
    }

    /// Waits until any subscribed topic has had an append since the last mark.
    async fn wait_for_data(&mut self) -> BackendResult<()> {
        let changes = self.watches.iter_mut().map(|w| Box::pin(w.changed()));
        let (result, _, _) = futures::future::select_all(changes).await;
        result.map_err(|_| BackendError::Unavailable("event log closed".into()))
    }
}

#[async_trait]
impl Subscription for LogSubscription {
    async fn next(&mut self) -> BackendResult<SourceMessage> {
        if let Some(assigned) = self.assigned.take() {
            return Ok(SourceMessage::Assigned(assigned));
        }
        loop {
            let handle = match &mut self.pending {
                Some((_, handle)) => handle,
                None => {
                    // Mark before looking, so an append landing after the look still
                    // wakes us.
                    for w in &mut self.watches {
                        w.mark_unchanged();
                    }
                    let plan = self.plan();
                    if plan.is_empty() {
                        self.wait_for_data().await?;
                        continue;
                    }
                    let ranges: Vec<FetchRange> = plan.iter().map(|(_, r)| r.clone()).collect();
                    let db = self.inner.db.clone();
                    let max_bytes = self.inner.config.max_fetch_bytes;
                    let read = tokio::task::spawn_blocking(move || {
                        read_ranges(&*db.get()?, &ranges, max_bytes)
                    });
                    &mut self.pending.insert((plan, read)).1
                }
            };
            let joined = handle.await;
            let Some((plan, _)) = self.pending.take() else {
                continue;
            };
            let (events, cut) = joined
                .map_err(|e| BackendError::Unavailable(format!("storage task failed: {e}")))??;
            // Each range's events are contiguous from its start; a read the byte bound
            // did not cut short holds every offset it asked for.
            for (i, range) in &plan {
                let read = events
                    .iter()
                    .filter(|e| e.partition == range.partition && e.topic == range.topic)
                    .count() as u64;
                if !cut && read != range.to - range.from {
                    return Err(BackendError::Corrupt(format!(
                        "expected offsets {}..{} of {}/{} but found {read} events: the log has holes",
                        range.from, range.to, range.topic, range.partition
                    )));
                }
                self.parts[*i].fetch = range.from + read;
            }
            self.rotate = self.rotate.wrapping_add(1);
            if events.is_empty() {
                continue;
            }
            return Ok(SourceMessage::Events(events));
        }
    }

    async fn commit(&mut self, offsets: &[(TopicPartition, u64)]) -> BackendResult<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let op = LogOp::Commit {
            group: self.group.clone(),
            offsets: offsets.to_vec(),
        };
        match self.inner.writer.call(op).await? {
            LogOut::Committed => Ok(()),
            _ => Err(unexpected_reply()),
        }
    }

    fn pause(&mut self, partition: &TopicPartition) {
        if let Some(&i) = self.index.get(partition) {
            self.parts[i].paused = true;
        }
    }

    fn resume(&mut self, partition: &TopicPartition) {
        if let Some(&i) = self.index.get(partition) {
            self.parts[i].paused = false;
        }
    }
}
