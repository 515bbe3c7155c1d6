//! The bench's own Kafka clients, outside the thing measured: the producer of input events
//! (a backlog before a throughput run, a paced stream in a latency run) and the observer,
//! a consumer of the output topic that notes when each input's output became visible.
//!
//! Both are plain rdkafka with a [`ThreadedProducer`] or [`BaseConsumer`] on their own
//! threads, so they cost the same whichever subject runs.

use anyhow::{Context, Result, bail};
use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use spate_core::NewEvent;
use spate_core::types::headers;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long the input producer waits for its acknowledgements.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one observer poll waits (also its reaction time to `stop`).
const OBSERVER_POLL: Duration = Duration::from_millis(20);

/// librdkafka settings every client of a run shares (`--fetch-wait-ms`, `--librdkafka`).
#[derive(Clone, Debug, Default)]
pub struct Common {
    /// Applied to every client, in order.
    pub properties: Vec<(String, String)>,
}

impl Common {
    /// A client configuration for `bootstrap` with the shared properties applied.
    pub fn config(&self, bootstrap: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

/// One acknowledged (or failed) input.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    /// Where it landed.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// When the acknowledgement arrived.
    pub at: Instant,
}

#[derive(Default)]
struct AckLog {
    acks: Mutex<Vec<(usize, Ack)>>,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

struct AckContext(Arc<AckLog>);

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<usize>;

    fn delivery(&self, result: &DeliveryResult<'_>, index: Box<usize>) {
        let at = Instant::now();
        match result {
            Ok(m) => self.0.acks.lock().push((
                *index,
                Ack {
                    partition: m.partition(),
                    offset: m.offset(),
                    at,
                },
            )),
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

/// The producer of input events: idempotent, `acks=all`, batching as a user's producer
/// does (the backlog goes in large batches, so the subjects consume what real topics hold).
pub struct InputProducer {
    producer: ThreadedProducer<AckContext>,
    log: Arc<AckLog>,
    topic: String,
    sent: Vec<Instant>,
}

impl InputProducer {
    /// A producer of `topic` at `bootstrap`.
    pub fn new(common: &Common, bootstrap: &str, topic: &str) -> Result<Self> {
        let log = Arc::new(AckLog::default());
        let producer = common
            .config(bootstrap)
            .set("client.id", "bench-input")
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // spate-kafka's and the ceiling's linger: a paced input waits at most 1 ms
            // for company, which the latency it is part of can afford.
            .set("linger.ms", "1")
            .set("partitioner", "murmur2_random")
            .set(
                "message.timeout.ms",
                PRODUCE_TIMEOUT.as_millis().to_string(),
            )
            .create_with_context(AckContext(Arc::clone(&log)))
            .context("creating the input producer")?;
        Ok(Self {
            producer,
            log,
            topic: topic.to_string(),
            sent: Vec::new(),
        })
    }

    /// Enqueue `event`, waiting while librdkafka's queue is full; returns its index.
    pub fn send(&mut self, event: &NewEvent) -> Result<usize> {
        let index = self.sent.len();
        let mut record =
            BaseRecord::<[u8], [u8], Box<usize>>::with_opaque_to(&self.topic, Box::new(index))
                .payload(&event.payload[..]);
        if let Some(k) = &event.key {
            record = record.key(&k[..]);
        }
        let at = Instant::now();
        loop {
            match self.producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e).context("producing an input event"),
            }
        }
        self.sent.push(at);
        Ok(index)
    }

    /// Wait for every acknowledgement; fails if any input was not acknowledged. Returns,
    /// per index, when it was sent and its acknowledgement.
    pub fn finish(self) -> Result<Vec<(Instant, Ack)>> {
        self.producer
            .flush(PRODUCE_TIMEOUT)
            .context("flushing the input producer")?;
        let failed = self.log.failed.load(Ordering::Relaxed);
        if failed > 0 {
            bail!(
                "{failed} input events were not acknowledged, first because {}",
                self.log.first_error.lock().as_deref().unwrap_or("?")
            );
        }
        let mut acks = std::mem::take(&mut *self.log.acks.lock());
        if acks.len() != self.sent.len() {
            bail!(
                "{} of {} input events acknowledged",
                acks.len(),
                self.sent.len()
            );
        }
        acks.sort_unstable_by_key(|(i, _)| *i);
        Ok(self
            .sent
            .iter()
            .zip(acks)
            .map(|(sent, (_, ack))| (*sent, ack))
            .collect())
    }
}

/// What the observer saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// First arrival of an output for each input (partition, offset).
    pub arrivals: HashMap<(i32, i64), Instant>,
    /// Outputs for an input that already had one (a redelivered or replayed input).
    pub duplicates: usize,
    /// Output records without a readable `spate-source` header.
    pub unmatched: usize,
    /// Records on the dead-letter topic.
    pub dead_letters: usize,
}

/// Reads the output (and dead-letter) topic from the beginning of every partition,
/// without a group, on its own thread.
pub struct Observer {
    stop: Arc<AtomicBool>,
    progress: Progress,
    thread: Option<std::thread::JoinHandle<Result<Seen>>>,
}

/// The observer's counts so far, readable from any thread.
#[derive(Clone, Default)]
pub struct Progress {
    distinct: Arc<AtomicUsize>,
    dead: Arc<AtomicUsize>,
}

impl Progress {
    /// Inputs with a visible output, plus dead letters, so far.
    pub fn done(&self) -> usize {
        self.distinct.load(Ordering::Acquire) + self.dead.load(Ordering::Acquire)
    }
}

impl Observer {
    /// Start reading `output` and `dead_letters` (each with `partitions` partitions);
    /// outputs are matched to inputs of `input` by their `spate-source` header.
    pub fn start(
        common: &Common,
        bootstrap: &str,
        input: &str,
        output: &str,
        dead_letters: &str,
        partitions: i32,
    ) -> Result<Self> {
        let consumer: BaseConsumer = common
            .config(bootstrap)
            .set("client.id", "bench-observer")
            // librdkafka wants a group id to assign; this one never joins or commits.
            .set("group.id", "bench-observer")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("creating the observer")?;
        let mut tpl = TopicPartitionList::new();
        for topic in [output, dead_letters] {
            for p in 0..partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)
                    .context("assigning the observer")?;
            }
        }
        consumer.assign(&tpl).context("assigning the observer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Progress::default();
        let thread = {
            let (stop, progress) = (stop.clone(), progress.clone());
            let prefix = format!("{input}/");
            let dead_letters = dead_letters.to_string();
            std::thread::Builder::new()
                .name("bench-observer".into())
                .spawn(move || observe(consumer, &prefix, &dead_letters, &stop, &progress))
                .context("spawning the observer thread")?
        };
        Ok(Self {
            stop,
            progress,
            thread: Some(thread),
        })
    }

    /// A handle on its counts.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Inputs with a visible output, plus dead letters, so far.
    pub fn done(&self) -> usize {
        self.progress.done()
    }

    /// Wait until `n` inputs are done, or until nothing new arrived for `stall`. Returns
    /// whether they were.
    pub async fn wait(&self, n: usize, stall: Duration) -> bool {
        let mut last = self.done();
        let mut progress = Instant::now();
        loop {
            let now = self.done();
            if now >= n {
                return true;
            }
            if now != last {
                last = now;
                progress = Instant::now();
            } else if progress.elapsed() > stall {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stop and return what it saw.
    pub async fn finish(mut self) -> Result<Seen> {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.take().context("observer already finished")?;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("joining the observer")?
            .map_err(|_| anyhow::anyhow!("the observer thread panicked"))?
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn observe(
    consumer: BaseConsumer,
    prefix: &str,
    dead_topic: &str,
    stop: &AtomicBool,
    progress: &Progress,
) -> Result<Seen> {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Acquire) {
        let Some(result) = consumer.poll(OBSERVER_POLL) else {
            continue;
        };
        let Ok(m) = result else {
            continue;
        };
        let at = Instant::now();
        if m.topic() == dead_topic {
            seen.dead_letters += 1;
            progress.dead.fetch_add(1, Ordering::Release);
            continue;
        }
        let source = m.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == headers::SOURCE)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|s| parse_source(s, prefix))
        });
        match source {
            Some(coords) => match seen.arrivals.entry(coords) {
                std::collections::hash_map::Entry::Occupied(_) => seen.duplicates += 1,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(at);
                    progress.distinct.fetch_add(1, Ordering::Release);
                }
            },
            None => seen.unmatched += 1,
        }
    }
    Ok(seen)
}

/// `<input>/partition/offset` -> (partition, offset), for this run's input topic only.
pub fn parse_source(s: &str, prefix: &str) -> Option<(i32, i64)> {
    let rest = s.strip_prefix(prefix)?;
    let (p, o) = rest.split_once('/')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

/// CPU seconds (user + system) used so far by process `pid` (`self` for this one).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name, utime and stime are fields 14 and 15, in
    // clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_header_parses_for_this_input_only() {
        assert_eq!(
            parse_source("bench-in/3/1234", "bench-in/"),
            Some((3, 1234))
        );
        assert_eq!(parse_source("other/3/1234", "bench-in/"), None);
        assert_eq!(parse_source("bench-in/x/1", "bench-in/"), None);
    }
}
