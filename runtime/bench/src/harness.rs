//! Runs one handler through the real embedded path and measures it: a fresh data
//! directory with an `EmbeddedLog`, `EmbeddedStateStore` and `MokaCache`, the plugin
//! deployed on a dispatcher [`Supervisor`] (one pipeline per subscribed topic, started as
//! `spate up` starts them), a producer appending to
//! the input topic, and an observer subscribed to the output topic in its own consumer
//! group that notes when each output event becomes visible.
//!
//! Outputs are matched to inputs by the `spate-source` header (`topic/partition/offset`)
//! that the host adds to every emitted event, so handlers need not echo anything. A
//! subject's [`Job`] says which inputs make an output (all of them, or every 10th of a key
//! for the count job); the others are waited for through the ones that do.

use crate::workload::{Job, Workload};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use spate_core::state::tiered::StateTier;
use spate_core::types::{header_str, headers};
use spate_core::{EventBus, EventSource, SourceMessage, StartPosition};
use spate_core::{NewEvent, StateStore};
use spate_core::{
    cache::MokaCache,
    events::{EmbeddedLog, LogConfig},
    state::EmbeddedStateStore,
};
use spate_dispatch::{DispatchContext, DispatchSettings, PluginVersion, Supervisor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Topic `start-workflow` emits to (the server's default).
pub const WORKFLOW_TOPIC: &str = "workflows";
/// Cache size of each run (the server's default).
const CACHE_BYTES: u64 = 256 << 20;
/// Consumer group of the observer.
const OBSERVER_GROUP: &str = "bench-observer";
/// Events per `append` call in throughput runs.
pub const THROUGHPUT_BATCH: usize = 500;
/// Longest wait for a run's outputs after its last append.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for seed events to be handled.
const SEED_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the pipelines get to drain at the end of a run.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One handler under test.
pub struct Subject {
    /// Row label.
    pub label: String,
    /// The plugin version the pipelines call.
    pub version: Arc<dyn PluginVersion>,
    /// Topic the measured events are appended to.
    pub input_topic: String,
    /// Topic whose events mark an input as handled.
    pub output_topic: String,
    /// What is appended.
    pub workload: Workload,
    /// Which inputs make an output.
    pub job: Job,
    /// A shadow candidate running beside `version`, if any.
    pub shadow: Option<Arc<dyn PluginVersion>>,
}

/// Dispatcher settings shared by every run.
#[derive(Clone, Debug)]
pub struct RunSettings {
    /// Commit interval of the pipelines.
    pub commit_interval: Duration,
}

/// Result of a throughput run.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Events appended.
    pub events: usize,
    /// Output events the job makes of them.
    pub expected_outputs: usize,
    /// Output events seen.
    pub outputs: usize,
    /// Whether every output arrived before the timeout.
    pub complete: bool,
    /// Seconds the producer took to append everything.
    pub append_seconds: f64,
    /// Seconds from the first append to the last output visible.
    pub seconds: f64,
    /// Inputs per second over `seconds` (inputs whose outputs were seen, counted as
    /// `outputs / expected_outputs` of `events`: all of them in a complete run).
    pub events_per_second: f64,
    /// CPU seconds the whole process used during the run (producer and observer included).
    pub cpu_seconds: Option<f64>,
    /// Workflow starts appended during the run.
    pub workflows: u64,
    /// Events dead-lettered during the run.
    pub dead_letters: u64,
    /// Reason recorded on the first dead letter, if any.
    pub dead_letter_reason: Option<String>,
}

/// Result of a paced latency run.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Events per second asked for.
    pub target_rate: f64,
    /// Events per second actually appended.
    pub achieved_rate: f64,
    /// Events appended.
    pub events: usize,
    /// Events measured (appended after the warm-up, with a visible output).
    pub samples: usize,
    /// Appended events that make an output (every one, or every 10th of a key for the
    /// count job; only those are measured).
    pub expected_outputs: usize,
    /// Appended events whose output never became visible before the timeout.
    pub missing: usize,
    /// Median append-to-visible latency, microseconds.
    pub p50_us: f64,
    /// 90th percentile, microseconds.
    pub p90_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Largest, microseconds.
    pub max_us: f64,
    /// Median time for the input's own append to return (durable), microseconds: the
    /// part of the latency before the dispatcher can see the event.
    pub append_p50_us: f64,
    /// 99th percentile of the same, microseconds.
    pub append_p99_us: f64,
    /// Workflow starts appended during the run.
    pub workflows: u64,
    /// Events dead-lettered during the run.
    pub dead_letters: u64,
    /// Reason recorded on the first dead letter, if any.
    pub dead_letter_reason: Option<String>,
    /// Every measured latency, microseconds, sorted (to pool rounds).
    #[serde(skip)]
    pub samples_us: Vec<f64>,
}

/// A running handler: its data directory, backends and pipelines.
struct Env {
    log: Arc<EmbeddedLog>,
    supervisor: Supervisor,
    group: String,
    dead_letter_topic: String,
    // Last, so the files are closed before the directory is removed.
    _dir: tempfile::TempDir,
}

impl Env {
    /// Open fresh backends under `root` and deploy the subject on a supervisor: one
    /// pipeline per subscription of its manifest, as the server starts them.
    async fn start(subject: &Subject, root: &Path, settings: &RunSettings) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("spate-bench-")
            .tempdir_in(root)
            .with_context(|| format!("creating a data dir under {}", root.display()))?;
        let log = EmbeddedLog::open(&dir.path().join("log"), LogConfig::default())
            .context("opening the embedded log")?;
        let state: Arc<dyn StateStore> = EmbeddedStateStore::open(&dir.path().join("state"))
            .context("opening the embedded state store")?;
        let info = Arc::clone(subject.version.info());
        let manifest = &info.manifest;
        let partitions = LogConfig::default().default_partitions;
        let mut topics: Vec<&str> = manifest
            .subscriptions
            .iter()
            .map(|s| s.topic.as_str())
            .collect();
        topics.extend([
            subject.output_topic.as_str(),
            WORKFLOW_TOPIC,
            info.dead_letter_topic.as_str(),
        ]);
        for topic in topics {
            log.ensure_topic(topic, partitions)
                .await
                .with_context(|| format!("creating topic {topic}"))?;
        }

        let source: Arc<dyn EventSource> = log.clone();
        let bus: Arc<dyn EventBus> = log.clone();
        let cx = DispatchContext::new(
            source,
            bus,
            StateTier::direct(state),
            Arc::new(MokaCache::new(CACHE_BYTES)),
            DispatchSettings {
                workflow_topic: WORKFLOW_TOPIC.to_string(),
                commit_interval: settings.commit_interval,
                drain_timeout: DRAIN_TIMEOUT,
                ..DispatchSettings::default()
            },
        );
        let group = cx.settings.group(&manifest.name);
        let mut supervisor = Supervisor::new(cx, Arc::default());
        supervisor.deploy(Arc::clone(&subject.version)).await;
        if let Some(candidate) = &subject.shadow {
            supervisor.set_shadow(&manifest.name, Some(Arc::clone(candidate)));
        }
        Ok(Self {
            log,
            supervisor,
            group,
            dead_letter_topic: info.dead_letter_topic.clone(),
            _dir: dir,
        })
    }

    /// Append the workload's seed events and wait until their groups committed them.
    async fn seed(&self, events: Vec<(String, NewEvent)>) -> Result<()> {
        let mut by_topic: HashMap<String, Vec<NewEvent>> = HashMap::new();
        for (topic, event) in events {
            by_topic.entry(topic).or_default().push(event);
        }
        for (topic, events) in by_topic {
            self.log
                .append(&topic, events)
                .await
                .with_context(|| format!("appending seed events to {topic}"))?;
            self.wait_committed(&topic, SEED_TIMEOUT).await?;
        }
        Ok(())
    }

    async fn wait_committed(&self, topic: &str, timeout: Duration) -> Result<()> {
        let ends = self.log.end_offsets(topic).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let committed = self.log.committed(&self.group, topic).await?;
            if committed
                .iter()
                .zip(&ends)
                .all(|(c, e)| c.unwrap_or(0) >= *e)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "seed events on {topic} not handled within {timeout:?}: {committed:?} of {ends:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Events in `topic` so far (0 if it does not exist).
    async fn total(&self, topic: &str) -> u64 {
        self.log
            .end_offsets(topic)
            .await
            .map(|ends| ends.iter().sum())
            .unwrap_or(0)
    }

    /// The reason on the first dead letter of the plugin, if there is one.
    async fn dead_letter_reason(&self) -> Option<String> {
        let topic = &self.dead_letter_topic;
        let partitions = self.log.partitions(topic).await.ok().flatten()?;
        for p in 0..partitions {
            let events = self.log.read(topic, p, 0, 1).await.ok()?;
            if let Some(e) = events.first() {
                let kind = header_str(&e.headers, headers::DLQ_KIND).unwrap_or("?");
                let reason = header_str(&e.headers, headers::DLQ_REASON).unwrap_or("?");
                return Some(format!("{kind}: {reason}"));
            }
        }
        None
    }

    /// Wait until `n` inputs are accounted for, as outputs the observer saw or as dead
    /// letters beyond `dead_before`, or until `timeout`. Returns whether they were and when
    /// the last one was noticed.
    async fn wait_done(
        &self,
        observer: &mut Observer,
        n: usize,
        dead_before: u64,
        timeout: Duration,
    ) -> (bool, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = *observer.count.borrow_and_update();
            let dead = self.total(&self.dead_letter_topic).await - dead_before;
            if seen as u64 + dead >= n as u64 {
                return (true, Instant::now());
            }
            if Instant::now() > deadline {
                return (false, Instant::now());
            }
            // Outputs wake us at once; dead letters are polled.
            let _ = tokio::time::timeout(Duration::from_millis(5), observer.count.changed()).await;
        }
    }

    /// Stop the pipelines (draining in-flight events) and close the files. A pipeline
    /// that failed was restarted by the supervisor (and logged why).
    async fn stop(mut self) -> Result<()> {
        self.supervisor.stop_all().await;
        Ok(())
    }
}

/// One output event seen by the observer.
struct Arrival {
    /// Partition and offset of the input that caused it.
    source: Option<(u32, u64)>,
    at: Instant,
}

/// Watches the output topic in its own consumer group.
struct Observer {
    stop: CancellationToken,
    count: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<Result<Vec<Arrival>>>,
}

impl Observer {
    async fn start(log: &Arc<EmbeddedLog>, topic: &str) -> Result<Self> {
        let mut sub = log
            .subscribe(
                OBSERVER_GROUP,
                &[topic.to_string()],
                StartPosition::Earliest,
            )
            .await
            .context("subscribing the observer")?;
        let stop = CancellationToken::new();
        let (tx, count) = watch::channel(0usize);
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut arrivals = Vec::new();
            loop {
                let msg = tokio::select! {
                    _ = token.cancelled() => return Ok(arrivals),
                    msg = sub.next() => msg.context("observer subscription failed")?,
                };
                if let SourceMessage::Events(events) = msg {
                    let at = Instant::now();
                    arrivals.extend(events.iter().map(|e| Arrival {
                        source: header_str(&e.headers, headers::SOURCE).and_then(parse_source),
                        at,
                    }));
                    tx.send_replace(arrivals.len());
                }
            }
        });
        Ok(Self { stop, count, task })
    }

    async fn finish(self) -> Result<Vec<Arrival>> {
        self.stop.cancel();
        self.task.await.context("observer task panicked")?
    }
}

/// `topic/partition/offset` -> (partition, offset).
fn parse_source(s: &str) -> Option<(u32, u64)> {
    let mut parts = s.rsplitn(3, '/');
    let offset = parts.next()?.parse().ok()?;
    let partition = parts.next()?.parse().ok()?;
    Some((partition, offset))
}

/// CPU seconds (user + system) used by this process so far, from `/proc/self/stat`.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name start at field 3 (state); utime and
    // stime are fields 14 and 15, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Append `n` events in batches as fast as the log takes them and time until the last
/// output is visible.
pub async fn throughput(
    subject: &Subject,
    root: &Path,
    settings: &RunSettings,
    n: usize,
) -> Result<Throughput> {
    let env = Env::start(subject, root, settings).await?;
    env.seed(subject.workload.seed_events()).await?;
    let mut observer = Observer::start(&env.log, &subject.output_topic).await?;
    let events = subject.workload.events(n, "tp", 1);
    let expected = subject.job.outputs(&events);
    let workflows_before = env.total(WORKFLOW_TOPIC).await;
    let dead_before = env.total(&env.dead_letter_topic).await;

    let cpu_start = process_cpu_seconds();
    let start = Instant::now();
    for batch in events.chunks(THROUGHPUT_BATCH) {
        env.log
            .append(&subject.input_topic, batch.to_vec())
            .await
            .context("appending input events")?;
    }
    let append_seconds = start.elapsed().as_secs_f64();
    let (complete, done_at) = env
        .wait_done(&mut observer, expected, dead_before, OUTPUT_TIMEOUT)
        .await;
    let cpu_end = process_cpu_seconds();
    let arrivals = observer.finish().await?;
    let outputs = arrivals.len();
    let workflows = env.total(WORKFLOW_TOPIC).await - workflows_before;
    let dead_letters = env.total(&env.dead_letter_topic).await - dead_before;
    let dead_letter_reason = env.dead_letter_reason().await;
    env.stop().await?;
    // Without dead letters the run ends at the last output; dead letters are polled, so
    // with them it ends when the poll noticed the last one.
    let last_output = arrivals.iter().map(|a| a.at).max().unwrap_or(start);
    let end = if dead_letters > 0 && complete {
        last_output.max(done_at)
    } else {
        last_output
    };
    let seconds = end.saturating_duration_since(start).as_secs_f64();
    Ok(Throughput {
        events: n,
        expected_outputs: expected,
        outputs,
        complete,
        append_seconds,
        seconds,
        events_per_second: inputs_per_second(n, expected, outputs, seconds),
        cpu_seconds: cpu_start.zip(cpu_end).map(|(a, b)| b - a),
        workflows,
        dead_letters,
        dead_letter_reason,
    })
}

/// Inputs per second of a run of `n` inputs that should make `expected` outputs and made
/// `outputs` in `seconds`: the inputs those outputs account for (`n` if every expected
/// output came), over `seconds`.
pub fn inputs_per_second(n: usize, expected: usize, outputs: usize, seconds: f64) -> f64 {
    if seconds <= 0.0 || expected == 0 {
        return 0.0;
    }
    let share = (outputs as f64 / expected as f64).min(1.0);
    n as f64 * share / seconds
}

/// Append `workload` at `rate` events per second for `seconds` (each tick's due events in
/// one append, appends running concurrently like independent producers) and measure the
/// time from the start of an event's append to its output being visible, for each event
/// that makes one. Events appended during the first `warmup` are not counted.
pub async fn latency(
    subject: &Subject,
    workload: &Workload,
    root: &Path,
    settings: &RunSettings,
    rate: f64,
    seconds: f64,
    warmup: Duration,
) -> Result<Latency> {
    let env = Env::start(subject, root, settings).await?;
    env.seed(subject.workload.seed_events()).await?;
    let mut observer = Observer::start(&env.log, &subject.output_topic).await?;
    let total = (rate * seconds).round().max(1.0) as usize;
    let events = workload.events(total, "lat", 2);
    let emits = subject.job.emits(events.iter().map(|e| e.key.as_deref()));
    let expected = emits.iter().filter(|e| **e).count();
    let workflows_before = env.total(WORKFLOW_TOPIC).await;
    let dead_before = env.total(&env.dead_letter_topic).await;

    // (partition, offset) -> (append started, append took, makes an output).
    type Started = HashMap<(u32, u64), (Instant, Duration, bool)>;
    let started: Arc<Mutex<Started>> = Arc::new(Mutex::new(HashMap::with_capacity(total)));
    let mut appends: JoinSet<Result<()>> = JoinSet::new();
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(total);
        if due > sent {
            let batch = events[sent..due].to_vec();
            let batch_emits = emits[sent..due].to_vec();
            sent = due;
            let log = Arc::clone(&env.log);
            let topic = subject.input_topic.clone();
            let started = Arc::clone(&started);
            appends.spawn(async move {
                let at = Instant::now();
                let coords = log.append(&topic, batch).await?;
                let took = at.elapsed();
                let mut map = started.lock().unwrap_or_else(|e| e.into_inner());
                for (c, emits) in coords.into_iter().zip(batch_emits) {
                    map.insert((c.partition, c.offset), (at, took, emits));
                }
                Ok(())
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let append_seconds = start.elapsed().as_secs_f64();
    while let Some(joined) = appends.join_next().await {
        joined
            .context("append task panicked")?
            .context("appending input events")?;
    }
    env.wait_done(&mut observer, expected, dead_before, OUTPUT_TIMEOUT)
        .await;
    let arrivals = observer.finish().await?;
    let workflows = env.total(WORKFLOW_TOPIC).await - workflows_before;
    let dead_letters = env.total(&env.dead_letter_topic).await - dead_before;
    let dead_letter_reason = env.dead_letter_reason().await;
    env.stop().await?;

    let started = std::mem::take(&mut *started.lock().unwrap_or_else(|e| e.into_inner()));
    let arrived: HashMap<(u32, u64), Instant> = arrivals
        .iter()
        .filter_map(|a| a.source.map(|s| (s, a.at)))
        .collect();
    let cutoff = start + warmup;
    let measured = || started.iter().filter(|(_, (at, _, _))| *at >= cutoff);
    let mut samples: Vec<Duration> = measured()
        .filter_map(|(coords, (at, _, _))| {
            arrived
                .get(coords)
                .map(|done| done.saturating_duration_since(*at))
        })
        .collect();
    samples.sort_unstable();
    let mut append_times: Vec<Duration> = measured().map(|(_, (_, took, _))| *took).collect();
    append_times.sort_unstable();
    let missing = started
        .iter()
        .filter(|(c, (_, _, emits))| *emits && !arrived.contains_key(c))
        .count();
    let us = |q: f64| percentile(&samples, q).as_secs_f64() * 1e6;
    Ok(Latency {
        target_rate: rate,
        achieved_rate: if append_seconds > 0.0 {
            total as f64 / append_seconds
        } else {
            0.0
        },
        events: total,
        samples: samples.len(),
        expected_outputs: expected,
        missing,
        p50_us: us(0.50),
        p90_us: us(0.90),
        p99_us: us(0.99),
        max_us: us(1.0),
        append_p50_us: percentile(&append_times, 0.5).as_secs_f64() * 1e6,
        append_p99_us: percentile(&append_times, 0.99).as_secs_f64() * 1e6,
        workflows,
        dead_letters,
        dead_letter_reason,
        samples_us: samples.iter().map(|d| d.as_secs_f64() * 1e6).collect(),
    })
}

/// Percentiles of latency samples pooled from several runs.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Pooled {
    /// Samples pooled.
    pub samples: usize,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 90th percentile, microseconds.
    pub p90_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Largest, microseconds.
    pub max_us: f64,
}

/// Pool the latency samples (microseconds) of several runs.
pub fn pool<'a>(runs: impl IntoIterator<Item = &'a [f64]>) -> Pooled {
    let mut pooled: Vec<Duration> = runs
        .into_iter()
        .flatten()
        .map(|us| Duration::from_secs_f64(us / 1e6))
        .collect();
    pooled.sort_unstable();
    let us = |q: f64| percentile(&pooled, q).as_secs_f64() * 1e6;
    Pooled {
        samples: pooled.len(),
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        max_us: us(1.0),
    }
}

/// The `q` quantile (0..=1) of sorted `samples`, nearest rank; zero if empty.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Median and 90th percentile time of a durable one-event append to an idle log: the
/// floor under every append-to-visible latency (the input append and the emit append
/// each pay one).
pub async fn append_floor(root: &Path, appends: usize) -> Result<(Duration, Duration)> {
    let dir = tempfile::Builder::new()
        .prefix("spate-bench-")
        .tempdir_in(root)
        .with_context(|| format!("creating a data dir under {}", root.display()))?;
    let log = EmbeddedLog::open(&dir.path().join("log"), LogConfig::default())
        .context("opening the embedded log")?;
    let mut samples = Vec::with_capacity(appends);
    for i in 0..appends {
        let event = NewEvent {
            key: Some(format!("k-{i}").into_bytes()),
            payload: b"{}".to_vec(),
            headers: Vec::new(),
        };
        let start = Instant::now();
        log.append("floor", vec![event]).await?;
        samples.push(start.elapsed());
    }
    drop(log);
    samples.sort_unstable();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.9)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_header_parses() {
        assert_eq!(parse_source("bench-in/3/1234"), Some((3, 1234)));
        assert_eq!(parse_source("a.b-c_d/0/0"), Some((0, 0)));
        assert_eq!(parse_source("nope"), None);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&s, 0.5), Duration::from_micros(51));
        assert_eq!(percentile(&s, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&s, 1.0), Duration::from_micros(100));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
