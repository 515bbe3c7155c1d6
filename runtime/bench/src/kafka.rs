//! `spate-bench kafka`: Spate against a real Kafka broker, next to the same work done by a
//! plain rdkafka program (the ceiling).
//!
//! Each run starts a fresh Apache Kafka broker (spate-conformance's `KafkaBroker`: KRaft,
//! one node, its log on disk under the system temp dir, a free loopback port, the JVM's
//! optimizing JIT on) and creates the topics. The subjects are the `trivial`
//! component (fresh instance per event, its manifest from the tree) and its native twin,
//! each deployed on the real dispatcher's [`Supervisor`] over a [`KafkaBus`], wired as
//! `spate up` wires it with `events.type = "kafka"` (one runtime: one group member per
//! topic), and
//! the [`ceiling`]: consume in a group, produce one `{}` keyed like the input with an
//! idempotent `acks=all` producer, commit after the acknowledgement. Rounds interleave the
//! subjects; each round has, per subject, a throughput run (a backlog produced first,
//! then the subject drains it) and a paced latency run (send-to-visible per event).
//! Outputs are matched to inputs by the `spate-source` header, read by an observer that
//! consumes the output topic without a group. It measures only; everything Spate does in
//! it is `spate-core`, `spate-dispatch`, `spate-engine` and `spate-kafka` code.
//!
//! ```sh
//! scripts/bench kafka                         # builds the plugins, runs this in release
//! scripts/bench kafka --events 50000 --rounds 5 --json
//! scripts/bench kafka --librdkafka fetch.wait.max.ms=100
//! ```
//!
//! The machinery (stage, subjects, rounds, ceiling) is shared with `spate-bench count`
//! (the `count` module), which runs the count job on it: [`Shared`] says which job the
//! subjects do, so which inputs make an output and what the ceiling produces.

mod ceiling;
mod clients;
pub mod report;

use crate::harness::{inputs_per_second, percentile, pool};
use crate::native::NativeTrivial;
use crate::workload::{Job, Workload};
use anyhow::{Context, Result, bail};
use clients::{Common, InputProducer, Observer};
use report::{
    KafkaReport, KafkaSettings, LatencyRun, LatencySummary, Ratio, SubjectResult, ThroughputRun,
};
use spate_conformance::kafka::{BrokerOptions, KafkaBroker, kafka_version};
use spate_core::host::PluginInfo;
use spate_core::manifest::Manifest;
use spate_core::state::tiered::StateTier;
use spate_core::{EventBus, EventSource};
use spate_core::{NewEvent, StateStore};
use spate_core::{cache::MokaCache, state::EmbeddedStateStore};
use spate_dispatch::{DispatchContext, DispatchSettings, PluginVersion, Supervisor};
use spate_engine::Sandbox;
use spate_kafka::{KafkaBus, KafkaOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `events.group` of the Spate runtime: plugin groups are `bench.<plugin>`.
const GROUP_PREFIX: &str = "bench";
/// Consumer group of the ceiling.
const CEILING_GROUP: &str = "bench.rdkafka";
/// Topic of the record each subject's producer delivers before it starts consuming.
const WARM_TOPIC: &str = "bench-warm";
/// A run ends when no new output arrived for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Probe events are sent this far apart until the first output shows the group joined.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Key of the probe events (no workload key looks like it).
const PROBE_KEY: &[u8] = b"probe";
/// How long the group may take to join before a paced run gives up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long Spate's pipelines get to drain when a run stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Cache size of each Spate run (the server's default).
const CACHE_BYTES: u64 = 256 << 20;

/// Options of `spate-bench kafka`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events in each throughput run's backlog.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Distinct keys of the inputs.
    #[arg(long, default_value_t = 1024)]
    keys: u32,
    #[command(flatten)]
    run: RunArgs,
}

/// Options every bench on Kafka shares (`spate-bench kafka` and `count`).
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Interleaved rounds; each runs every subject once for throughput and once paced.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Events per second sent in the paced latency runs.
    #[arg(long, default_value_t = 1_000.0)]
    pub rate: f64,
    /// Seconds of each paced run that are measured.
    #[arg(long, default_value_t = 5.0)]
    pub paced_secs: f64,
    /// Seconds of each paced run before the measured part (after the group joined).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Commit interval of Spate's pipelines and the ceiling, milliseconds (the server's
    /// default `dispatch.commit-interval-ms`).
    #[arg(long, default_value_t = 100)]
    pub commit_interval_ms: u64,
    /// `fetch.wait.max.ms` of every client (Spate's consumer through `events.librdkafka`,
    /// as an operator would set it). Default: librdkafka's own (500 ms), which costs no
    /// latency: the broker answers a fetch as soon as records are there.
    #[arg(long)]
    pub fetch_wait_ms: Option<u64>,
    /// Extra librdkafka property `KEY=VALUE` for every client (Spate's and the ceiling's
    /// alike); repeatable.
    #[arg(long = "librdkafka", value_name = "KEY=VALUE")]
    pub librdkafka: Vec<String>,
    /// Override `limits.concurrency` in the Spate subjects' manifests.
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Directory holding the plugins' components (`trivial.wasm`, `count.wasm`;
    /// wasm32-wasip2, release).
    /// Default: `${SPATE_CACHE_DIR:-$HOME/.cache/spate}/plugins-target/wasm32-wasip2/release`.
    #[arg(long)]
    pub plugins_dir: Option<PathBuf>,
    /// Directory for temporary files (default: the system temp dir).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Run only the subjects whose label contains this text (e.g. `wasm`); the ceiling
    /// always runs.
    #[arg(long)]
    pub only: Option<String>,
    /// Print the results as JSON instead of the tables.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// Every problem with these options.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.rounds == 0 {
            problems.push("--rounds must be at least 1".to_string());
        }
        if !(self.rate > 0.0 && self.rate <= 100_000.0) {
            problems.push("--rate must be in (0, 100000]".into());
        }
        if !(self.paced_secs > 0.0 && self.paced_secs <= 600.0) {
            problems.push("--paced-secs must be in (0, 600]".into());
        }
        if !(self.warmup_secs >= 0.0 && self.warmup_secs <= 600.0) {
            problems.push("--warmup-secs must be in [0, 600]".into());
        }
        if !(1..=256).contains(&self.partitions) {
            problems.push("--partitions must be in 1..=256".into());
        }
        if self.commit_interval_ms == 0 {
            problems.push("--commit-interval-ms must be at least 1".into());
        }
        for p in &self.librdkafka {
            if p.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                problems.push(format!("--librdkafka `{p}` is not KEY=VALUE"));
            }
        }
        problems
    }

    /// The librdkafka properties every client gets (`--fetch-wait-ms`, `--librdkafka`).
    pub fn properties(&self) -> Vec<(String, String)> {
        let mut properties = Vec::new();
        if let Some(wait) = self.fetch_wait_ms {
            properties.push(("fetch.wait.max.ms".to_string(), wait.to_string()));
        }
        for p in &self.librdkafka {
            if let Some((k, v)) = p.split_once('=') {
                properties.push((k.to_string(), v.to_string()));
            }
        }
        properties
    }

    /// Whether `--only` selects the subject labelled `label`.
    pub fn selects(&self, label: &str) -> bool {
        self.only.as_deref().is_none_or(|o| label.contains(o))
    }
}

impl super::Summary for ThroughputRun {
    fn summary(&self) -> String {
        format!(
            "backlog produced in {:.1} s; drained at {:.0} events/s{}",
            self.produce_seconds,
            self.rate,
            if self.complete { "" } else { " (INCOMPLETE)" }
        )
    }
}

impl super::Summary for LatencyRun {
    fn summary(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms",
            self.p50_us / 1e3,
            self.p99_us / 1e3
        )
    }
}

/// Check the options, run the bench, print the report.
pub fn main(args: &Args) -> Result<()> {
    check(args)?;
    let report = super::block_on(run(args))?;
    if args.run.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        );
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn check(args: &Args) -> Result<()> {
    let mut problems = args.run.problems();
    if args.events == 0 || args.keys == 0 {
        problems.push("--events and --keys must be at least 1".to_string());
    }
    super::no_problems(problems)
}

/// What a run measures.
pub enum Kind {
    /// A plugin version through Spate's dispatcher.
    Spate(Arc<dyn PluginVersion>),
    /// The plain rdkafka program doing the job.
    Ceiling,
}

/// One row of a bench on Kafka.
pub struct Subject {
    /// Row label.
    pub label: String,
    /// What runs.
    pub kind: Kind,
}

impl Subject {
    fn group(&self) -> String {
        match &self.kind {
            Kind::Spate(v) => format!("{GROUP_PREFIX}.{}", v.info().manifest.name),
            Kind::Ceiling => CEILING_GROUP.to_string(),
        }
    }

    fn dead_letter_topic(&self) -> String {
        match &self.kind {
            Kind::Spate(v) => v.info().dead_letter_topic.clone(),
            // Never written; the observer reads it like the others'.
            Kind::Ceiling => "bench-rdkafka.dlq".to_string(),
        }
    }
}

/// Settings every run of the bench shares.
pub struct Shared {
    common: Common,
    input_topic: String,
    output_topic: String,
    job: Job,
    partitions: i32,
    commit_interval: Duration,
    root: PathBuf,
}

impl Shared {
    /// Subjects doing `job`, reading `input_topic` and emitting to `output_topic`, with
    /// `args`' client settings; temporary files under `root`.
    pub fn new(
        args: &RunArgs,
        input_topic: String,
        output_topic: String,
        job: Job,
        root: PathBuf,
    ) -> Self {
        Self {
            common: Common {
                properties: args.properties(),
            },
            input_topic,
            output_topic,
            job,
            partitions: args.partitions,
            commit_interval: Duration::from_millis(args.commit_interval_ms),
            root,
        }
    }
}

/// A fresh broker with the run's topics.
struct Stage {
    broker: KafkaBroker,
    bootstrap: String,
    broker_pid: Option<String>,
    dead_letter_topic: String,
}

impl Stage {
    async fn new(subject: &Subject, shared: &Shared) -> Result<Self> {
        // Benchmarks want the broker's optimizing JIT, which the tests leave off.
        let broker = tokio::task::spawn_blocking(|| {
            KafkaBroker::start_with(BrokerOptions { full_jit: true })
        })
        .await
        .context("starting the Kafka broker failed (see the message above)")?;
        let bootstrap = broker.bootstrap();
        let broker_pid = broker.pid().map(|pid| pid.to_string());
        let dead_letter_topic = subject.dead_letter_topic();
        for topic in [
            shared.input_topic.as_str(),
            shared.output_topic.as_str(),
            dead_letter_topic.as_str(),
            WARM_TOPIC,
        ] {
            broker.create_topic(topic, shared.partitions).await;
        }
        Ok(Self {
            broker,
            bootstrap,
            broker_pid,
            dead_letter_topic,
        })
    }

    fn observer(&self, shared: &Shared) -> Result<Observer> {
        Observer::start(
            &shared.common,
            &self.bootstrap,
            &shared.input_topic,
            &shared.output_topic,
            &self.dead_letter_topic,
            shared.partitions,
        )
    }

    fn broker_cpu(&self) -> Option<f64> {
        self.broker_pid.as_deref().and_then(clients::cpu_seconds)
    }

    /// Sum of `group`'s committed offsets on the input topic.
    async fn committed(&self, group: String, topic: String) -> Option<i64> {
        let bootstrap = self.bootstrap.clone();
        tokio::task::spawn_blocking(move || {
            spate_conformance::kafka::committed_offsets(&bootstrap, &group, &topic)
                .into_iter()
                .map(|c| c.unwrap_or(0))
                .sum()
        })
        .await
        .ok()
    }

    async fn close(self) {
        let broker = self.broker;
        let _ = tokio::task::spawn_blocking(move || drop(broker)).await;
    }
}

/// A subject consuming.
enum Running {
    Spate {
        // Boxed: the supervisor is large next to the ceiling's handle.
        supervisor: Box<Supervisor>,
        _bus: Arc<KafkaBus>,
        // Last, so the state store is closed before its directory goes.
        _dir: tempfile::TempDir,
    },
    Ceiling(ceiling::Ceiling),
}

impl Running {
    /// Connect, warm the subject's producer up (one record delivered to the warm-up
    /// topic), then start consuming. Returns it and when consuming started: the clock
    /// of a throughput run, which so leaves out the producer's initialisation (an
    /// idempotent producer's InitProducerId, and the first connection) but not the group
    /// join.
    async fn start(subject: &Subject, stage: &Stage, shared: &Shared) -> Result<(Self, Instant)> {
        match &subject.kind {
            Kind::Spate(version) => start_spate(version, stage, shared).await,
            Kind::Ceiling => {
                let settings = ceiling::Settings {
                    bootstrap: stage.bootstrap.clone(),
                    group: CEILING_GROUP.into(),
                    input: shared.input_topic.clone(),
                    output: shared.output_topic.clone(),
                    job: shared.job,
                    warm_topic: WARM_TOPIC.into(),
                    commit_interval: shared.commit_interval,
                    common: shared.common.clone(),
                };
                let (c, started) =
                    tokio::task::spawn_blocking(move || ceiling::Ceiling::start(settings))
                        .await
                        .context("ceiling start-up panicked")??;
                Ok((Self::Ceiling(c), started))
            }
        }
    }

    /// Stop consuming (Spate drains and commits; the ceiling flushes and commits).
    async fn stop(self) -> Result<()> {
        match self {
            Self::Spate { mut supervisor, .. } => {
                supervisor.stop_all().await;
                Ok(())
            }
            Self::Ceiling(c) => c.stop().await.map(|_| ()),
        }
    }
}

/// Spate with `events.type = "kafka"`, as the server wires one plugin: a [`KafkaBus`] as
/// source and emit target, the plugin deployed on a [`Supervisor`] (one pipeline per
/// subscription, its output topics checked first), the embedded state store and the
/// memory cache.
async fn start_spate(
    version: &Arc<dyn PluginVersion>,
    stage: &Stage,
    shared: &Shared,
) -> Result<(Running, Instant)> {
    let mut opts = KafkaOptions::new(stage.bootstrap.clone());
    opts.group = GROUP_PREFIX.into();
    opts.librdkafka = shared.common.properties.iter().cloned().collect();
    let bus = KafkaBus::connect(opts)
        .await
        .context("connecting Spate to the broker")?;
    bus.append(
        WARM_TOPIC,
        vec![NewEvent {
            key: None,
            payload: b"{}".to_vec(),
            headers: Vec::new(),
        }],
    )
    .await
    .context("Spate's warm-up record")?;
    let dir = tempfile::Builder::new()
        .prefix("spate-bench-kafka-")
        .tempdir_in(&shared.root)
        .with_context(|| format!("creating a data dir under {}", shared.root.display()))?;
    let state: Arc<dyn StateStore> = EmbeddedStateStore::open(&dir.path().join("state"))
        .context("opening the embedded state store")?;
    let source: Arc<dyn EventSource> = bus.clone();
    let emit: Arc<dyn EventBus> = bus.clone();
    let cx = DispatchContext::new(
        source,
        emit,
        StateTier::direct(state),
        Arc::new(MokaCache::new(CACHE_BYTES)),
        DispatchSettings {
            group_prefix: GROUP_PREFIX.into(),
            workflow_topic: crate::harness::WORKFLOW_TOPIC.to_string(),
            commit_interval: shared.commit_interval,
            drain_timeout: DRAIN_TIMEOUT,
            // As the server on Kafka: the plugin's output topics are checked first.
            check_output_topics: true,
            ..DispatchSettings::default()
        },
    );
    // As the server on Kafka: plugins asking for exactly-once get transactions.
    let cx = DispatchContext {
        transactions: Some(bus.clone()),
        ..cx
    };
    let mut supervisor = Supervisor::new(cx, Arc::default());
    let started = Instant::now();
    supervisor.deploy(Arc::clone(version)).await;
    Ok((
        Running::Spate {
            supervisor: Box::new(supervisor),
            _bus: bus,
            _dir: dir,
        },
        started,
    ))
}

/// Produce `n` inputs, then start the subject and time until every output is visible.
async fn throughput(
    subject: &Subject,
    shared: &Shared,
    workload: &Workload,
    n: usize,
) -> Result<ThroughputRun> {
    let stage = Stage::new(subject, shared).await?;
    let events = workload.events(n, "tp", 1);
    let expected = shared.job.outputs(&events);
    let produce_start = Instant::now();
    let acks = {
        let (common, bootstrap, topic) = (
            shared.common.clone(),
            stage.bootstrap.clone(),
            shared.input_topic.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<_> {
            let mut producer = InputProducer::new(&common, &bootstrap, &topic)?;
            for e in &events {
                producer.send(e)?;
            }
            producer.finish()
        })
        .await
        .context("backlog producer panicked")??
    };
    let produce_seconds = produce_start.elapsed().as_secs_f64();
    check_backlog(&acks, shared.partitions)?;

    let observer = stage.observer(shared)?;
    let (running, start) = Running::start(subject, &stage, shared).await?;
    let cpu_start = clients::cpu_seconds("self");
    let broker_start = stage.broker_cpu();
    let complete = observer.wait(expected, STALL_TIMEOUT).await;
    let cpu_end = clients::cpu_seconds("self");
    let broker_end = stage.broker_cpu();
    running.stop().await?;
    let seen = observer.finish().await?;
    let committed = stage
        .committed(subject.group(), shared.input_topic.clone())
        .await;
    stage.close().await;

    let mut arrivals: Vec<Instant> = seen.arrivals.values().copied().collect();
    arrivals.sort_unstable();
    let outputs = arrivals.len();
    let first = arrivals.first().copied().unwrap_or(start);
    let last = arrivals.last().copied().unwrap_or(start);
    let seconds = last.saturating_duration_since(start).as_secs_f64();
    let drain_seconds = last.saturating_duration_since(first).as_secs_f64();
    let longest_gap = arrivals
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    let rate = |secs: f64| inputs_per_second(n, expected, outputs, secs);
    Ok(ThroughputRun {
        events: n,
        produce_seconds,
        expected_outputs: expected,
        outputs,
        complete,
        duplicates: seen.duplicates,
        dead_letters: seen.dead_letters,
        startup_seconds: first.saturating_duration_since(start).as_secs_f64(),
        seconds,
        rate: rate(seconds),
        drain_seconds,
        drain_rate: rate(drain_seconds),
        longest_gap_ms: longest_gap.as_secs_f64() * 1e3,
        cpu_seconds: cpu_start.zip(cpu_end).map(|(a, b)| b - a),
        broker_cpu_seconds: broker_start.zip(broker_end).map(|(a, b)| b - a),
        committed,
    })
}

/// The backlog must be offsets `0..count` in every partition, one record each, or the
/// committed-offset check means nothing.
fn check_backlog(acks: &[(Instant, clients::Ack)], partitions: i32) -> Result<()> {
    let mut offsets: Vec<Vec<i64>> = vec![Vec::new(); partitions.max(1) as usize];
    for (_, a) in acks {
        offsets
            .get_mut(a.partition.max(0) as usize)
            .with_context(|| format!("an input landed in partition {}", a.partition))?
            .push(a.offset);
    }
    for (p, mut o) in offsets.into_iter().enumerate() {
        o.sort_unstable();
        if o.iter().enumerate().any(|(i, off)| *off != i as i64) {
            bail!("partition {p} of the backlog is not offsets 0..{}", o.len());
        }
    }
    Ok(())
}

/// Send inputs at `rate` and measure the send-to-visible time of each one that makes an
/// output.
async fn latency(
    subject: &Subject,
    shared: &Shared,
    workload: &Workload,
    rate: f64,
    warmup: Duration,
    measured: Duration,
) -> Result<LatencyRun> {
    let stage = Stage::new(subject, shared).await?;
    let observer = stage.observer(shared)?;
    let warm_events = (rate * warmup.as_secs_f64()).round() as usize;
    let measured_events = (rate * measured.as_secs_f64()).round().max(1.0) as usize;
    let total = warm_events + measured_events;
    let events = workload.events(total, "lat", 2);
    let event_emits = shared.job.emits(events.iter().map(|e| e.key.as_deref()));
    let (running, start) = Running::start(subject, &stage, shared).await?;

    let progress = observer.progress();
    let (common, bootstrap, topic) = (
        shared.common.clone(),
        stage.bootstrap.clone(),
        shared.input_topic.clone(),
    );
    let paced = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut producer = InputProducer::new(&common, &bootstrap, &topic)?;
        // Probes until an output shows the group joined and the path is warm.
        let mut probes = 0;
        let joined = loop {
            if progress.done() > 0 {
                break Instant::now();
            }
            if start.elapsed() > JOIN_TIMEOUT {
                bail!("no output within {JOIN_TIMEOUT:?} of starting the subject");
            }
            producer.send(&NewEvent {
                key: Some(PROBE_KEY.to_vec()),
                payload: format!("{{\"probe\":{probes}}}").into_bytes(),
                headers: Vec::new(),
            })?;
            probes += 1;
            std::thread::sleep(PROBE_INTERVAL);
        };
        let paced_start = Instant::now();
        for (i, e) in events.iter().enumerate() {
            let due = paced_start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            producer.send(e)?;
        }
        Ok((probes, joined, producer.finish()?))
    });
    let (probes, joined, acks) = paced.await.context("paced producer panicked")??;
    // Which inputs make an output, in the order they were sent: the probes (a key of
    // their own), then the rest.
    let mut emits = shared
        .job
        .emits(std::iter::repeat_n(Some(PROBE_KEY), probes));
    emits.extend(event_emits);
    let expected = emits.iter().filter(|e| **e).count();
    // An output that never came counts as missing below.
    observer.wait(expected, STALL_TIMEOUT).await;
    running.stop().await?;
    let seen = observer.finish().await?;
    let committed = stage
        .committed(subject.group(), shared.input_topic.clone())
        .await;
    stage.close().await;

    let measured_acks = &acks[(probes + warm_events).min(acks.len())..];
    let mut samples: Vec<Duration> = measured_acks
        .iter()
        .filter_map(|(sent, ack)| {
            seen.arrivals
                .get(&(ack.partition, ack.offset))
                .map(|at| at.saturating_duration_since(*sent))
        })
        .collect();
    samples.sort_unstable();
    let mut ack_times: Vec<Duration> = measured_acks
        .iter()
        .map(|(sent, ack)| ack.at.saturating_duration_since(*sent))
        .collect();
    ack_times.sort_unstable();
    let missing = acks
        .iter()
        .zip(&emits)
        .filter(|((_, a), emits)| **emits && !seen.arrivals.contains_key(&(a.partition, a.offset)))
        .count();
    let span = match (measured_acks.first(), measured_acks.last()) {
        (Some((a, _)), Some((b, _))) => b.saturating_duration_since(*a).as_secs_f64(),
        _ => 0.0,
    };
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Ok(LatencyRun {
        target_rate: rate,
        achieved_rate: if span > 0.0 {
            (measured_acks.len().saturating_sub(1)) as f64 / span
        } else {
            0.0
        },
        probes,
        startup_seconds: joined.saturating_duration_since(start).as_secs_f64(),
        events: total,
        samples: samples.len(),
        expected_outputs: expected,
        missing,
        duplicates: seen.duplicates,
        dead_letters: seen.dead_letters,
        p50_us: us(percentile(&samples, 0.5)),
        p90_us: us(percentile(&samples, 0.9)),
        p99_us: us(percentile(&samples, 0.99)),
        max_us: us(percentile(&samples, 1.0)),
        ack_p50_us: us(percentile(&ack_times, 0.5)),
        ack_p99_us: us(percentile(&ack_times, 0.99)),
        committed,
        produced: acks.len(),
        samples_us: samples.iter().map(|d| us(*d)).collect(),
    })
}

fn summarize(rounds: Vec<LatencyRun>) -> LatencySummary {
    let pooled = pool(rounds.iter().map(|r| r.samples_us.as_slice()));
    LatencySummary {
        samples: pooled.samples,
        p50_us: pooled.p50_us,
        p90_us: pooled.p90_us,
        p99_us: pooled.p99_us,
        max_us: pooled.max_us,
        rounds,
    }
}

/// The workloads of a bench on Kafka.
pub struct Workloads {
    /// The backlog of each throughput run.
    pub backlog: Workload,
    /// Events of each throughput run.
    pub events: usize,
    /// The paced runs' inputs.
    pub paced: Workload,
}

/// Run `rounds` interleaved rounds of `subjects` (per round: each one's throughput run,
/// then each one's paced run) and summarize each subject: its median throughput round and
/// its latency pooled over the rounds.
pub async fn measure(
    subjects: &[Subject],
    shared: &Shared,
    args: &RunArgs,
    workloads: &Workloads,
) -> Result<Vec<SubjectResult>> {
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let measured = Duration::from_secs_f64(args.paced_secs);
    super::progress(&format!(
        "{} events per throughput run; paced runs at {} events/s for {} s",
        workloads.events, args.rate, args.paced_secs
    ));
    let runs = super::interleave(
        subjects,
        args.rounds,
        |s| s.label.as_str(),
        async |subject| throughput(subject, shared, &workloads.backlog, workloads.events).await,
        async |subject| {
            let paced = &workloads.paced;
            latency(subject, shared, paced, args.rate, warmup, measured).await
        },
    )
    .await?;

    let mut results = Vec::new();
    for (subject, (rounds, lat)) in subjects.iter().zip(runs) {
        let mut sorted = rounds.clone();
        sorted.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let median = sorted
            .get(sorted.len() / 2)
            .cloned()
            .context("no throughput rounds ran")?;
        results.push(SubjectResult {
            label: subject.label.clone(),
            group: subject.group(),
            concurrency: match &subject.kind {
                Kind::Spate(v) => Some(v.info().manifest.limits.concurrency),
                Kind::Ceiling => None,
            },
            throughput: median,
            throughput_rounds: rounds,
            latency: summarize(lat),
        });
    }
    Ok(results)
}

/// Each Spate subject of `results` against the ceiling among them (none without one).
pub fn ratios(results: &[SubjectResult]) -> Vec<Ratio> {
    let Some(ceiling) = results.iter().find(|r| r.concurrency.is_none()) else {
        return Vec::new();
    };
    let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
    results
        .iter()
        .filter(|r| r.concurrency.is_some())
        .map(|r| Ratio {
            label: r.label.clone(),
            ceiling: ceiling.label.clone(),
            percent: pct(r.throughput.rate, ceiling.throughput.rate),
            drain_percent: pct(r.throughput.drain_rate, ceiling.throughput.drain_rate),
        })
        .collect()
}

/// The settings part of a report on a run with `args`, `events` per backlog over `keys`.
pub fn settings(args: &RunArgs, events: usize, keys: u32) -> KafkaSettings {
    KafkaSettings {
        broker: format!("Apache Kafka {} (KRaft, one node)", kafka_version()),
        partitions: args.partitions,
        keys,
        throughput_events: events,
        rounds: args.rounds,
        paced_rate: args.rate,
        paced_seconds: args.paced_secs,
        paced_warmup_seconds: args.warmup_secs,
        commit_interval_ms: args.commit_interval_ms,
        librdkafka: args
            .properties()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
    }
}

/// What a bench on Kafka starts from: a temporary directory, the sandbox, one compiled
/// plugin, its manifest from the tree (with `--concurrency`), and the topics that
/// manifest reads and emits to.
pub struct Setup {
    /// Where the temporary directory is.
    pub parent: PathBuf,
    /// The temporary directory (removed when dropped).
    pub root: tempfile::TempDir,
    /// The sandbox, with the server's defaults.
    pub sandbox: Arc<Sandbox>,
    /// The compiled plugin.
    pub plugin: super::Loaded,
    /// Its manifest.
    pub manifest: Manifest,
    /// The manifest's first subscription.
    pub input_topic: String,
    /// The manifest's first emit topic.
    pub output_topic: String,
}

impl Setup {
    /// Compile `file` (plugin `name`) from `--plugins-dir`, parse `manifest` (the text of
    /// `manifest_path`), and make a temporary directory with `prefix`.
    pub async fn new(
        run: &RunArgs,
        prefix: &str,
        file: &'static str,
        name: &'static str,
        manifest: &str,
        manifest_path: &str,
    ) -> Result<Self> {
        let plugins_dir = run
            .plugins_dir
            .clone()
            .unwrap_or_else(super::default_plugins_dir);
        let parent = run.data_dir.clone().unwrap_or_else(std::env::temp_dir);
        let root = super::temp_root(&parent, prefix)?;
        let sandbox = super::sandbox(root.path())?;
        super::progress(&format!("compiling {file} from {}", plugins_dir.display()));
        let plugin = {
            let sandbox = Arc::clone(&sandbox);
            tokio::task::spawn_blocking(move || super::load(&sandbox, &plugins_dir, file, name))
                .await
                .context("compile task panicked")??
        };
        let manifest = super::manifest(manifest, run.concurrency, manifest_path)?;
        let input_topic = manifest
            .subscriptions
            .first()
            .map(|s| s.topic.clone())
            .with_context(|| format!("{manifest_path} subscribes to nothing"))?;
        let output_topic = manifest
            .capabilities
            .emit_topics
            .first()
            .cloned()
            .with_context(|| format!("{manifest_path} emits to no topic"))?;
        Ok(Self {
            parent,
            root,
            sandbox,
            plugin,
            manifest,
            input_topic,
            output_topic,
        })
    }

    /// The compiled plugin as a version described by `manifest`.
    pub fn version(&self, manifest: Manifest) -> Result<Arc<dyn PluginVersion>> {
        let info = Arc::new(PluginInfo::new(manifest, self.plugin.hash.clone()));
        Ok(self.sandbox.plugin(&self.plugin.component, info)?)
    }

    /// How the subjects' manifests differ from the tree's, for the report: `changes`,
    /// then `--concurrency`.
    pub fn changes(&self, run: &RunArgs, changes: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        if let Some(c) = run.concurrency {
            out.push(format!("limits.concurrency = {c} (--concurrency)"));
        }
        out
    }
}

/// What the host knows of a native handler described by `manifest`.
pub fn native_info(manifest: Manifest) -> Arc<PluginInfo> {
    Arc::new(PluginInfo::new(manifest, "0".repeat(64)))
}

async fn run(args: &Args) -> Result<KafkaReport> {
    let run = &args.run;
    let setup = Setup::new(
        run,
        "spate-bench-kafka-",
        "trivial.wasm",
        "trivial",
        super::TRIVIAL_MANIFEST,
        "plugins/trivial/spate.toml",
    )
    .await?;
    let mut native_m = setup.manifest.clone();
    native_m.name = "native-trivial".into();
    let changes = setup.changes(
        run,
        &["native trivial = plugins/trivial/spate.toml with name = \"native-trivial\" (its own group and DLQ)"],
    );
    let wasm = setup.version(setup.manifest.clone())?;
    let native: Arc<dyn PluginVersion> = Arc::new(NativeTrivial::new(native_info(native_m)));

    let all = vec![
        Subject {
            label: "spate, trivial wasm (fresh)".into(),
            kind: Kind::Spate(wasm),
        },
        Subject {
            label: "spate, native trivial".into(),
            kind: Kind::Spate(native),
        },
        Subject {
            label: "rdkafka, no spate (ceiling)".into(),
            kind: Kind::Ceiling,
        },
    ];
    let subjects: Vec<Subject> = all
        .into_iter()
        .filter(|s| matches!(s.kind, Kind::Ceiling) || run.selects(&s.label))
        .collect();
    let shared = Shared::new(
        run,
        setup.input_topic.clone(),
        setup.output_topic.clone(),
        Job::OnePerInput,
        setup.root.path().to_path_buf(),
    );
    let workload = Workload::Keyed { keys: args.keys };
    let workloads = Workloads {
        backlog: workload.clone(),
        events: args.events,
        paced: workload,
    };
    let results = measure(&subjects, &shared, run, &workloads).await?;
    let ratios = ratios(&results);

    Ok(KafkaReport {
        job: "the trivial plugin (one `{}` per input)".into(),
        machine: super::machine(&setup.parent),
        settings: settings(run, args.events, args.keys),
        plugins: vec![setup.plugin.load],
        subjects: results,
        ratios,
        manifest_changes: changes,
    })
}
