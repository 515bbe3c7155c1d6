//! The writer: appends, topic creation and position commits, batched by the group-commit
//! thread, and the retention passes it runs.

use super::*;

/// An event ready to store: encoded by the caller, so the writer thread only writes.
pub(super) struct Prepared {
    pub(super) key: Option<Vec<u8>>,
    pub(super) idempotency_id: Option<Vec<u8>>,
    pub(super) record: Vec<u8>,
}

pub(super) enum LogOp {
    Append {
        topic: String,
        events: Vec<Prepared>,
    },
    EnsureTopic {
        topic: String,
        partitions: u32,
    },
    Commit {
        group: String,
        offsets: Vec<(TopicPartition, u64)>,
    },
    /// Resolve a group's start positions, persisting the ones it did not have.
    Join {
        group: String,
        topics: Vec<String>,
        start: StartPosition,
    },
    /// Delete what retention allows as of `now_ms`, at most
    /// `retention.max_deletes_per_commit` events.
    Retain {
        now_ms: u64,
    },
}

pub(super) enum LogOut {
    Appended(Vec<Appended>),
    Partitions(u32),
    Committed,
    Joined(Vec<(TopicPartition, u64)>),
    /// Events and bytes deleted; `more` if the cap stopped it.
    Retained {
        events: u64,
        bytes: u64,
        more: bool,
    },
}

/// The writer's own view of a topic; ahead of [`Topic`] while a group is uncommitted.
#[derive(Clone)]
pub(super) struct WriterTopic {
    pub(super) ends: Vec<u64>,
    /// First offset kept, per partition.
    pub(super) starts: Vec<u64>,
    /// Bytes of the records kept, per partition.
    pub(super) bytes: Vec<u64>,
    /// Next partition for a keyless event.
    pub(super) next_rr: u32,
}

impl WriterTopic {
    pub(super) fn empty(partitions: u32) -> Self {
        let n = partitions as usize;
        Self {
            ends: vec![0; n],
            starts: vec![0; n],
            bytes: vec![0; n],
            next_rr: 0,
        }
    }
}

pub(super) struct StagedTopic {
    pub(super) state: WriterTopic,
    pub(super) created: bool,
    pub(super) appended: bool,
    /// Retention deleted events of it: events per partition.
    pub(super) deleted: Vec<u64>,
}

#[derive(Default)]
pub(super) struct Staged {
    pub(super) topics: HashMap<String, StagedTopic>,
}

pub(super) struct LogWriter {
    pub(super) topics: Arc<TopicMap>,
    pub(super) known: HashMap<String, WriterTopic>,
    pub(super) config: LogConfig,
}

impl LogWriter {
    /// The topic as this group sees it so far, if it exists.
    fn stage<'s>(&self, staged: &'s mut Staged, topic: &str) -> Option<&'s mut StagedTopic> {
        if !staged.topics.contains_key(topic) {
            let state = self.known.get(topic)?.clone();
            staged.topics.insert(
                topic.to_owned(),
                StagedTopic {
                    deleted: vec![0; state.ends.len()],
                    state,
                    created: false,
                    appended: false,
                },
            );
        }
        staged.topics.get_mut(topic)
    }

    fn exists(&self, staged: &Staged, topic: &str) -> bool {
        staged.topics.contains_key(topic) || self.known.contains_key(topic)
    }

    fn create(
        txn: &WriteTransaction,
        staged: &mut Staged,
        topic: &str,
        partitions: u32,
    ) -> Result<(), redb::Error> {
        txn.open_table(TOPICS)?.insert(topic, partitions)?;
        staged.topics.insert(
            topic.to_owned(),
            StagedTopic {
                state: WriterTopic::empty(partitions),
                created: true,
                appended: false,
                deleted: vec![0; partitions as usize],
            },
        );
        Ok(())
    }

    fn append(
        &self,
        txn: &WriteTransaction,
        staged: &mut Staged,
        topic: &str,
        events: &[Prepared],
    ) -> Result<BackendResult<LogOut>, redb::Error> {
        if !self.exists(staged, topic) {
            if !self.config.auto_create_topics {
                return Ok(Err(BackendError::UnknownTopic(topic.to_owned())));
            }
            Self::create(txn, staged, topic, self.config.default_partitions)?;
        }
        let Some(st) = self.stage(staged, topic) else {
            return Ok(Err(BackendError::UnknownTopic(topic.to_owned())));
        };
        let partitions = u32::try_from(st.state.ends.len()).unwrap_or(u32::MAX);
        let mut index = txn.open_table(IDEMPOTENCY)?;
        let mut table = txn.open_table(EVENTS)?;
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            if let Some(id) = &event.idempotency_id
                && let Some(found) = index.get((topic, id.as_slice()))?
            {
                let (partition, offset) = found.value();
                out.push(Appended { partition, offset });
                continue;
            }
            let partition = match &event.key {
                Some(key) => partition_for_key(key, partitions),
                None => {
                    let p = st.state.next_rr % partitions;
                    st.state.next_rr = st.state.next_rr.wrapping_add(1);
                    p
                }
            };
            // In range: both arms above reduce modulo the partition count.
            let end = &mut st.state.ends[partition as usize];
            let offset = *end;
            table.insert((topic, partition, offset), event.record.as_slice())?;
            if let Some(id) = &event.idempotency_id {
                index.insert((topic, id.as_slice()), (partition, offset))?;
            }
            *end += 1;
            st.state.bytes[partition as usize] += event.record.len() as u64;
            st.appended = true;
            out.push(Appended { partition, offset });
        }
        Ok(Ok(LogOut::Appended(out)))
    }

    fn join(
        &self,
        txn: &WriteTransaction,
        staged: &mut Staged,
        group: &str,
        topics: &[String],
        start: StartPosition,
    ) -> Result<BackendResult<LogOut>, redb::Error> {
        let missing: Vec<&String> = topics.iter().filter(|t| !self.exists(staged, t)).collect();
        if let Some(first) = missing.first()
            && !self.config.auto_create_topics
        {
            return Ok(Err(BackendError::UnknownTopic((*first).clone())));
        }
        for topic in missing {
            Self::create(txn, staged, topic, self.config.default_partitions)?;
        }
        let mut positions = txn.open_table(POSITIONS)?;
        let mut out = Vec::new();
        for topic in topics {
            let Some(st) = self.stage(staged, topic) else {
                continue;
            };
            for (p, &end) in st.state.ends.iter().enumerate() {
                let p = u32::try_from(p).unwrap_or(u32::MAX);
                let key = (group, topic.as_str(), p);
                let stored = positions.get(key)?.map(|g| g.value());
                let offset = match stored {
                    Some(offset) => offset,
                    None => {
                        let offset = match start {
                            StartPosition::Earliest => st.state.starts[p as usize],
                            StartPosition::Latest => end,
                        };
                        positions.insert(key, offset)?;
                        offset
                    }
                };
                out.push((TopicPartition::new(topic.clone(), p), offset));
            }
        }
        Ok(Ok(LogOut::Joined(out)))
    }
}

impl LogWriter {
    /// Deletes each partition's oldest events that retention allows, below every group's
    /// committed position, up to the per-commit cap.
    fn retain(
        &self,
        txn: &WriteTransaction,
        staged: &mut Staged,
        now: u64,
    ) -> Result<BackendResult<LogOut>, redb::Error> {
        let retention = &self.config.retention;
        let lowest = lowest_positions(txn)?;
        let mut events = txn.open_table(EVENTS)?;
        let mut budget = retention.max_deletes_per_commit.max(1) as u64;
        let (mut deleted, mut freed, mut more) = (0u64, 0u64, false);
        let mut names: Vec<String> = self.known.keys().cloned().collect();
        names.sort();
        for name in names {
            let policy = retention.of(&name);
            if policy.is_unlimited() {
                continue;
            }
            let oldest_kept = policy.max_age.map(|age| {
                let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
                i64::try_from(now.saturating_sub(age)).unwrap_or(i64::MAX)
            });
            let Some(st) = self.stage(staged, &name) else {
                continue;
            };
            for p in 0..st.state.ends.len() {
                if budget == 0 {
                    more = true;
                    break;
                }
                let pi = u32::try_from(p).unwrap_or(u32::MAX);
                let start = st.state.starts[p];
                // Never what a group has yet to handle: its committed position and on.
                let limit = lowest
                    .get(&(name.clone(), pi))
                    .copied()
                    .unwrap_or(u64::MAX)
                    .min(st.state.ends[p]);
                if limit <= start {
                    continue;
                }
                let mut bytes = st.state.bytes[p];
                let (mut cut, mut cut_bytes) = (start, 0u64);
                for row in events.range((name.as_str(), pi, start)..(name.as_str(), pi, limit))? {
                    if cut - start >= budget {
                        more = true;
                        break;
                    }
                    let (_, v) = row?;
                    let record = v.value();
                    let too_old = oldest_kept.is_some_and(|t| record_timestamp(record) < t);
                    let too_big = policy.max_partition_bytes.is_some_and(|max| bytes > max);
                    if !too_old && !too_big {
                        break;
                    }
                    let len = record.len() as u64;
                    bytes = bytes.saturating_sub(len);
                    cut_bytes += len;
                    cut += 1;
                }
                if cut == start {
                    continue;
                }
                events.retain_in(
                    (name.as_str(), pi, start)..(name.as_str(), pi, cut),
                    |_, _| false,
                )?;
                st.state.starts[p] = cut;
                st.state.bytes[p] = bytes;
                st.deleted[p] += cut - start;
                budget -= cut - start;
                deleted += cut - start;
                freed += cut_bytes;
            }
        }
        Ok(Ok(LogOut::Retained {
            events: deleted,
            bytes: freed,
            more,
        }))
    }
}

impl Batcher for LogWriter {
    type Op = LogOp;
    type Out = LogOut;
    type Staged = Staged;

    fn apply(
        &mut self,
        txn: &WriteTransaction,
        op: &LogOp,
        staged: &mut Staged,
    ) -> Result<BackendResult<LogOut>, redb::Error> {
        match op {
            LogOp::Append { topic, events } => self.append(txn, staged, topic, events),
            LogOp::EnsureTopic { topic, partitions } => {
                if let Some(st) = self.stage(staged, topic) {
                    let n = u32::try_from(st.state.ends.len()).unwrap_or(u32::MAX);
                    return Ok(Ok(LogOut::Partitions(n)));
                }
                Self::create(txn, staged, topic, *partitions)?;
                Ok(Ok(LogOut::Partitions(*partitions)))
            }
            LogOp::Commit { group, offsets } => {
                let mut positions = txn.open_table(POSITIONS)?;
                for (tp, offset) in offsets {
                    positions.insert((group.as_str(), tp.topic.as_str(), tp.partition), offset)?;
                }
                Ok(Ok(LogOut::Committed))
            }
            LogOp::Join {
                group,
                topics,
                start,
            } => self.join(txn, staged, group, topics, *start),
            LogOp::Retain { now_ms } => self.retain(txn, staged, *now_ms),
        }
    }

    fn before_commit(
        &mut self,
        txn: &WriteTransaction,
        staged: &mut Staged,
    ) -> Result<(), redb::Error> {
        let mut stats = txn.open_table(STATS)?;
        for (name, st) in &staged.topics {
            let changed = st.created || st.appended || st.deleted.iter().any(|&d| d > 0);
            if !changed {
                continue;
            }
            for (p, (&start, &bytes)) in st.state.starts.iter().zip(&st.state.bytes).enumerate() {
                let p = u32::try_from(p).unwrap_or(u32::MAX);
                stats.insert((name.as_str(), p), (start, bytes))?;
            }
        }
        Ok(())
    }

    fn reopened(&mut self, db: &Database) -> BackendResult<()> {
        let known = load(db)?;
        let mut map = self.topics.write().unwrap_or_else(|e| e.into_inner());
        for (name, mut state) in known {
            if let Some(old) = self.known.get(&name) {
                state.next_rr = old.next_rr;
            }
            match map.get(&name) {
                Some(topic) if topic.ends.len() == state.ends.len() => {
                    topic.publish(&state);
                    topic.changed.send_modify(|v| *v = v.wrapping_add(1));
                }
                _ => {
                    map.insert(name.clone(), Arc::new(Topic::new(&state)));
                }
            }
            self.known.insert(name, state);
        }
        Ok(())
    }

    fn committed(&mut self, staged: Staged) {
        let mut wake = Vec::new();
        {
            let mut map = self.topics.write().unwrap_or_else(|e| e.into_inner());
            for (name, st) in staged.topics {
                let deleted: u64 = st.deleted.iter().sum();
                if deleted > 0 {
                    metrics::counter!(crate::metric_names::LOG_RETENTION_DELETED_EVENTS_TOTAL, "topic" => name.clone())
                        .increment(deleted);
                }
                if st.created {
                    let topic = Arc::new(Topic::new(&st.state));
                    map.insert(name.clone(), topic);
                } else if let Some(topic) = map.get(&name) {
                    // Starts move before anyone could read below them: retention only
                    // deletes below every committed position.
                    topic.publish(&st.state);
                    if st.appended {
                        wake.push(topic.clone());
                    }
                }
                self.known.insert(name, st.state);
            }
        }
        // Ends are stored before the wake-up, so a woken subscription sees the new data.
        for topic in wake {
            topic.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}
