//! The ceiling: a plugin's job as a plain rdkafka program with no Spate in it.
//!
//! One thread polls a [`BaseConsumer`] in a consumer group and, for each input, does the
//! [`Job`]: the trivial plugin's enqueues one `{}`; the count job's adds one to the key's
//! counter in a `HashMap` and, every 10th input of a key, enqueues `{"n":N,"v":<input>}`.
//! Outputs are keyed like the input, carry the same `spate-source` header Spate adds (so
//! the observer matches both alike) and go to an idempotent `acks=all`
//! [`ThreadedProducer`]; the delivery callback retires the input, and every commit
//! interval the thread commits, per partition, the offset below which every input's output
//! is acknowledged (an input without an output retires at once). Client settings copy
//! `spate-kafka`'s (`KafkaOptions::consumer` and `producer`), so the difference to Spate is
//! the dispatcher, the host API, durable state and the sandbox.
//!
//! It does not handle revocations (a run has one member that keeps every partition), never
//! retries a failed delivery (it counts it and commits nothing past it), and its counters
//! live in memory only: it is the ceiling, not a durable implementation.

use super::clients::Common;
use crate::workload::{Job, counted};
use anyhow::{Context, Result, bail};
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use spate_core::types::headers;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the final flush waits for outstanding deliveries.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one consumer poll waits when nothing is fetched.
const POLL: Duration = Duration::from_millis(50);

/// Inputs of one partition consumed and not yet acknowledged.
#[derive(Default)]
struct Partition {
    pending: BTreeSet<i64>,
    /// The offset after the newest consumed input.
    next: i64,
}

impl Partition {
    /// Everything below this offset has its output acknowledged.
    fn committable(&self) -> i64 {
        self.pending.first().copied().unwrap_or(self.next)
    }
}

#[derive(Default)]
struct Tracker {
    partitions: Mutex<HashMap<i32, Partition>>,
    delivered: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

struct Retire(Arc<Tracker>);

impl ClientContext for Retire {}

impl ProducerContext for Retire {
    type DeliveryOpaque = Box<(i32, i64)>;

    fn delivery(&self, result: &DeliveryResult<'_>, source: Box<(i32, i64)>) {
        match result {
            Ok(_) => {
                if let Some(p) = self.0.partitions.lock().get_mut(&source.0) {
                    p.pending.remove(&source.1);
                }
                self.0.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                self.0
                    .first_error
                    .lock()
                    .get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// What the ceiling did.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Inputs consumed.
    pub consumed: u64,
    /// Outputs acknowledged.
    pub delivered: u64,
    /// Outputs that failed.
    pub failed: u64,
    /// Commits made.
    pub commits: u64,
}

/// Settings of one ceiling run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// Consumer group.
    pub group: String,
    /// Topic consumed.
    pub input: String,
    /// Topic produced to.
    pub output: String,
    /// What each input becomes.
    pub job: Job,
    /// Topic of the one record that initialises the producer before consuming starts.
    pub warm_topic: String,
    /// How often acknowledged positions are committed.
    pub commit_interval: Duration,
    /// Shared client properties.
    pub common: Common,
}

/// A running ceiling consumer.
pub struct Ceiling {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Stats>>>,
}

impl Ceiling {
    /// Create the producer and wait until it delivered one record to the warm-up topic
    /// (so an idempotent producer's initialisation is not on the clock, as it is not for
    /// Spate), then subscribe and start consuming. Returns it and when consuming started.
    pub fn start(settings: Settings) -> Result<(Self, Instant)> {
        let tracker = Arc::new(Tracker::default());
        let producer: ThreadedProducer<Retire> = settings
            .common
            .config(&settings.bootstrap)
            .set("client.id", "bench-ceiling-producer")
            .set("linger.ms", "1")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("partitioner", "murmur2_random")
            .create_with_context(Retire(Arc::clone(&tracker)))
            .context("creating the ceiling's producer")?;
        producer
            .send(
                BaseRecord::<[u8], [u8], Box<(i32, i64)>>::with_opaque_to(
                    &settings.warm_topic,
                    Box::new((-1, -1)),
                )
                .payload(&b"{}"[..]),
            )
            .map_err(|(e, _)| e)
            .context("producing the warm-up record")?;
        producer
            .flush(FLUSH_TIMEOUT)
            .context("flushing the warm-up record")?;
        if tracker.failed.load(Ordering::Relaxed) > 0 {
            bail!(
                "the ceiling's warm-up record failed: {}",
                tracker.first_error.lock().as_deref().unwrap_or("?")
            );
        }
        tracker.delivered.store(0, Ordering::Relaxed);

        let started = Instant::now();
        let consumer: BaseConsumer = settings
            .common
            .config(&settings.bootstrap)
            .set("client.id", "bench-ceiling-consumer")
            .set("group.id", &settings.group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("allow.auto.create.topics", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("queued.max.messages.kbytes", "16384")
            .create()
            .context("creating the ceiling's consumer")?;
        consumer
            .subscribe(&[&settings.input])
            .context("subscribing the ceiling's consumer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("bench-ceiling".into())
                .spawn(move || run(&settings, &consumer, &producer, &tracker, &stop))
                .context("spawning the ceiling thread")?
        };
        Ok((
            Self {
                stop,
                thread: Some(thread),
            },
            started,
        ))
    }

    /// Stop consuming, wait for outstanding deliveries, commit, and leave the group.
    pub async fn stop(mut self) -> Result<Stats> {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().context("ceiling already stopped")?;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("joining the ceiling")?
            .map_err(|_| anyhow::anyhow!("the ceiling thread panicked"))?
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn run(
    settings: &Settings,
    consumer: &BaseConsumer,
    producer: &ThreadedProducer<Retire>,
    tracker: &Tracker,
    stop: &AtomicBool,
) -> Result<Stats> {
    let mut stats = Stats::default();
    let mut committed: HashMap<i32, i64> = HashMap::new();
    let mut counts: HashMap<Vec<u8>, u64> = HashMap::new();
    let mut last_commit = Instant::now();
    while !stop.load(Ordering::Acquire) {
        if let Some(Ok(m)) = consumer.poll(POLL) {
            let (partition, offset) = (m.partition(), m.offset());
            let payload = output(settings.job, &mut counts, m.key(), m.payload())?;
            {
                let mut parts = tracker.partitions.lock();
                let p = parts.entry(partition).or_default();
                if payload.is_some() {
                    p.pending.insert(offset);
                }
                p.next = offset + 1;
            }
            stats.consumed += 1;
            let Some(payload) = payload else {
                continue;
            };
            let source = format!("{}/{partition}/{offset}", m.topic());
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                key: headers::SOURCE,
                value: Some(source.as_bytes()),
            });
            let mut record = BaseRecord::<[u8], [u8], Box<(i32, i64)>>::with_opaque_to(
                &settings.output,
                Box::new((partition, offset)),
            )
            .payload(&payload[..])
            .headers(headers);
            if let Some(k) = m.key() {
                record = record.key(k);
            }
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => return Err(e).context("producing an output"),
                }
            }
        }
        // Consumer errors (a broker reconnecting) are retried by librdkafka itself.
        if last_commit.elapsed() >= settings.commit_interval {
            commit(
                consumer,
                settings,
                tracker,
                &mut committed,
                CommitMode::Async,
            )?;
            stats.commits += 1;
            last_commit = Instant::now();
        }
    }
    producer
        .flush(FLUSH_TIMEOUT)
        .context("flushing the ceiling's producer")?;
    commit(
        consumer,
        settings,
        tracker,
        &mut committed,
        CommitMode::Sync,
    )?;
    stats.commits += 1;
    stats.delivered = tracker.delivered.load(Ordering::Relaxed);
    stats.failed = tracker.failed.load(Ordering::Relaxed);
    if stats.failed > 0 {
        bail!(
            "{} of the ceiling's outputs failed, first because {}",
            stats.failed,
            tracker.first_error.lock().as_deref().unwrap_or("?")
        );
    }
    Ok(stats)
}

/// What `job` makes of an input with `key` and `payload`: the output's payload, if any.
fn output(
    job: Job,
    counts: &mut HashMap<Vec<u8>, u64>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) -> Result<Option<Cow<'static, [u8]>>> {
    match job {
        Job::OnePerInput => Ok(Some(Cow::Borrowed(b"{}"))),
        Job::Count { every } => {
            // The plugin rejects unkeyed inputs; the bench produces none.
            let Some(key) = key else {
                return Ok(None);
            };
            let n = match counts.get_mut(key) {
                Some(n) => {
                    *n += 1;
                    *n
                }
                None => {
                    counts.insert(key.to_vec(), 1);
                    1
                }
            };
            if !n.is_multiple_of(every.max(1)) {
                return Ok(None);
            }
            counted(n, payload.unwrap_or_default())
                .map(|o| Some(Cow::Owned(o)))
                .context("an input of the count job is not JSON")
        }
    }
}

/// Commit every partition whose acknowledged position moved.
fn commit(
    consumer: &BaseConsumer,
    settings: &Settings,
    tracker: &Tracker,
    committed: &mut HashMap<i32, i64>,
    mode: CommitMode,
) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (partition, p) in tracker.partitions.lock().iter() {
        let at = p.committable();
        if committed.get(partition).is_none_or(|c| *c < at) {
            tpl.add_partition_offset(&settings.input, *partition, Offset::Offset(at))
                .context("building a commit")?;
            committed.insert(*partition, at);
        }
    }
    if tpl.count() > 0 {
        consumer.commit(&tpl, mode).context("committing offsets")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_job_emits_every_tenth_input_of_a_key() {
        let job = Job::Count { every: 10 };
        let mut counts = HashMap::new();
        let mut outputs = Vec::new();
        for i in 0..40 {
            let key: &[u8] = if i % 2 == 0 { b"a" } else { b"b" };
            let payload = format!("{{\"i\":{i}}}");
            if let Ok(Some(o)) = output(job, &mut counts, Some(key), Some(payload.as_bytes())) {
                outputs.push(String::from_utf8_lossy(&o).into_owned());
            }
        }
        assert_eq!(
            outputs,
            [
                r#"{"n":10,"v":{"i":18}}"#,
                r#"{"n":10,"v":{"i":19}}"#,
                r#"{"n":20,"v":{"i":38}}"#,
                r#"{"n":20,"v":{"i":39}}"#
            ]
        );
    }

    #[test]
    fn commits_stop_below_the_oldest_unacknowledged_input() {
        let mut p = Partition::default();
        for o in 0..5 {
            p.pending.insert(o);
            p.next = o + 1;
        }
        p.pending.remove(&0);
        p.pending.remove(&1);
        p.pending.remove(&3);
        assert_eq!(p.committable(), 2);
        p.pending.remove(&2);
        assert_eq!(p.committable(), 4);
        p.pending.remove(&4);
        assert_eq!(p.committable(), 5);
    }
}
