//! `spate-bench kafka`: Spate against a real Kafka broker, next to the same work done by a
//! plain rdkafka program (the ceiling).
//!
//! Each run starts a fresh Apache Kafka broker (spate-conformance's `KafkaBroker`: KRaft,
//! one node, its log on disk under the system temp dir, a free loopback port, the JVM's
//! optimizing JIT on) and creates the topics. The subjects are the `trivial`
//! component (fresh instance per event, its manifest from the tree) and its native twin,
//! each through the real dispatcher [`Pipeline`] on a [`KafkaBus`] wired as `spate up`
//! wires it with `events.type = "kafka"` (one runtime: one group member per topic), and
//! the [`ceiling`]: consume in a group, produce one `{}` keyed like the input with an
//! idempotent `acks=all` producer, commit after the acknowledgement. Rounds interleave the
//! subjects; each round has, per subject, a throughput run (a backlog produced first,
//! then the subject drains it) and a paced latency run (send-to-visible per event).
//! Outputs are matched to inputs by the `spate-source` header, read by an observer that
//! consumes the output topic without a group. It measures only; everything Spate does in
//! it is `spate-core`, `spate-engine` and `spate-kafka` code.
//!
//! ```sh
//! scripts/bench kafka                         # builds the plugins, runs this in release
//! scripts/bench kafka --events 50000 --rounds 5 --json
//! scripts/bench kafka --librdkafka fetch.wait.max.ms=100
//! ```

mod ceiling;
mod clients;
mod report;

use crate::harness::percentile;
use crate::native::NativeTrivial;
use crate::report::Machine;
use crate::workload::Workload;
use anyhow::{Context, Result, bail};
use clients::{Common, InputProducer, Observer};
use report::{
    KafkaReport, KafkaSettings, LatencyRun, LatencySummary, Ratio, SubjectResult, ThroughputRun,
};
use spate_conformance::kafka::{BrokerOptions, KafkaBroker, kafka_version};
use spate_core::backend::{BackendError, EventBus, EventSource};
use spate_core::dispatch::{ActiveVersion, Pipeline, PipelineConfig, PluginVersion};
use spate_core::embedded::{EmbeddedStateStore, MokaCache};
use spate_core::host::{HostServices, PluginInfo};
use spate_core::{NewEvent, StateStore};
use spate_engine::{Sandbox, SandboxConfig};
use spate_kafka::{KafkaBus, KafkaOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// `events.group` of the Spate runtime: plugin groups are `bench.<plugin>`.
const GROUP_PREFIX: &str = "bench";
/// Consumer group of the ceiling.
const CEILING_GROUP: &str = "bench.rdkafka";
/// Topic the trivial handler emits to.
const OUTPUT_TOPIC: &str = "out";
/// Topic of the record each subject's producer delivers before it starts consuming.
const WARM_TOPIC: &str = "bench-warm";
/// A run ends when no new output arrived for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Probe events are sent this far apart until the first output shows the group joined.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
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
    /// Interleaved rounds; each runs every subject once for throughput and once paced.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events per second sent in the paced latency runs.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// Seconds of each paced run that are measured.
    #[arg(long, default_value_t = 5.0)]
    paced_secs: f64,
    /// Seconds of each paced run before the measured part (after the group joined).
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Distinct keys of the inputs.
    #[arg(long, default_value_t = 1024)]
    keys: u32,
    /// Commit interval of Spate's pipelines and the ceiling, milliseconds (the server's
    /// default `dispatch.commit-interval-ms`).
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
    /// `fetch.wait.max.ms` of every client (Spate's consumer through `events.librdkafka`,
    /// as an operator would set it). Default: librdkafka's own (500 ms), which costs no
    /// latency: the broker answers a fetch as soon as records are there.
    #[arg(long)]
    fetch_wait_ms: Option<u64>,
    /// Extra librdkafka property `KEY=VALUE` for every client (Spate's and the ceiling's
    /// alike); repeatable.
    #[arg(long = "librdkafka", value_name = "KEY=VALUE")]
    librdkafka: Vec<String>,
    /// Override `limits.concurrency` in the Spate subjects' manifests.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Directory holding `trivial.wasm` (wasm32-wasip2, release).
    /// Default: `${SPATE_CACHE_DIR:-$HOME/.cache/spate}/plugins-target/wasm32-wasip2/release`.
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// Directory for temporary files (default: the system temp dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run only the subjects whose label contains this text (e.g. `wasm`); the ceiling
    /// always runs.
    #[arg(long)]
    only: Option<String>,
    /// Print the results as JSON instead of the tables.
    #[arg(long)]
    json: bool,
}

/// Check the options, run the bench, print the report.
pub fn main(args: &Args) -> Result<()> {
    check(args)?;
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(args))?;
    if args.json {
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
    let mut problems = Vec::new();
    if args.events == 0 || args.rounds == 0 || args.keys == 0 {
        problems.push("--events, --rounds and --keys must be at least 1".to_string());
    }
    if !(args.rate > 0.0 && args.rate <= 100_000.0) {
        problems.push("--rate must be in (0, 100000]".into());
    }
    if !(args.paced_secs > 0.0 && args.paced_secs <= 600.0) {
        problems.push("--paced-secs must be in (0, 600]".into());
    }
    if !(args.warmup_secs >= 0.0 && args.warmup_secs <= 600.0) {
        problems.push("--warmup-secs must be in [0, 600]".into());
    }
    if !(1..=256).contains(&args.partitions) {
        problems.push("--partitions must be in 1..=256".into());
    }
    if args.commit_interval_ms == 0 {
        problems.push("--commit-interval-ms must be at least 1".into());
    }
    for p in &args.librdkafka {
        if p.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            problems.push(format!("--librdkafka `{p}` is not KEY=VALUE"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// What a run measures.
enum Kind {
    /// A plugin version through Spate's dispatcher.
    Spate(Arc<dyn PluginVersion>),
    /// The plain rdkafka program.
    Ceiling,
}

struct Subject {
    label: String,
    kind: Kind,
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
struct Shared {
    common: Common,
    input_topic: String,
    partitions: i32,
    commit_interval: Duration,
    root: PathBuf,
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
            OUTPUT_TOPIC,
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
            OUTPUT_TOPIC,
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
        shutdown: CancellationToken,
        tasks: JoinSet<Result<(), BackendError>>,
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
                    output: OUTPUT_TOPIC.into(),
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
            Self::Spate {
                shutdown,
                mut tasks,
                ..
            } => {
                shutdown.cancel();
                while let Some(joined) = tasks.join_next().await {
                    joined
                        .context("pipeline task panicked")?
                        .context("pipeline failed")?;
                }
                Ok(())
            }
            Self::Ceiling(c) => c.stop().await.map(|_| ()),
        }
    }
}

/// Spate with `events.type = "kafka"`, as the server wires one plugin: a [`KafkaBus`] as
/// source and emit target, one [`Pipeline`] per subscription sharing one concurrency
/// semaphore, the embedded state store and the memory cache.
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
    let services = HostServices {
        state,
        cache: Arc::new(MokaCache::new(CACHE_BYTES)),
        workflow_topic: crate::harness::WORKFLOW_TOPIC.to_string(),
    };
    let info = Arc::clone(version.info());
    let manifest = &info.manifest;
    let active = ActiveVersion::new(Arc::clone(version));
    let permits = Arc::new(Semaphore::new(manifest.limits.concurrency as usize));
    let shutdown = CancellationToken::new();
    let source: Arc<dyn EventSource> = bus.clone();
    let emit: Arc<dyn EventBus> = bus.clone();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for sub in &manifest.subscriptions {
        let mut cfg = PipelineConfig::new(&manifest.name, &sub.topic);
        cfg.group = format!("{GROUP_PREFIX}.{}", manifest.name);
        cfg.start = sub.start;
        cfg.ordering = manifest.ordering;
        cfg.commit_interval = shared.commit_interval;
        cfg.drain_timeout = DRAIN_TIMEOUT;
        let pipeline = Pipeline::new(
            cfg,
            Arc::clone(&active),
            Arc::clone(&source),
            Arc::clone(&emit),
            services.clone(),
            Arc::clone(&permits),
            shutdown.clone(),
        );
        tasks.spawn(async move { pipeline.run().await });
    }
    Ok((
        Running::Spate {
            shutdown,
            tasks,
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
    let complete = observer.wait(n, STALL_TIMEOUT).await;
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
    let rate = |secs: f64| {
        if secs > 0.0 {
            outputs as f64 / secs
        } else {
            0.0
        }
    };
    Ok(ThroughputRun {
        events: n,
        produce_seconds,
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

/// Send inputs at `rate` and measure each one's send-to-visible time.
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
                key: Some(b"probe".to_vec()),
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
    // An output that never came counts as missing below.
    observer.wait(acks.len(), STALL_TIMEOUT).await;
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
        .filter(|(_, a)| !seen.arrivals.contains_key(&(a.partition, a.offset)))
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
    let mut pooled: Vec<Duration> = rounds
        .iter()
        .flat_map(|r| r.samples_us.iter())
        .map(|us| Duration::from_secs_f64(us / 1e6))
        .collect();
    pooled.sort_unstable();
    let us = |q: f64| percentile(&pooled, q).as_secs_f64() * 1e6;
    LatencySummary {
        samples: pooled.len(),
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        max_us: us(1.0),
        rounds,
    }
}

async fn run(args: &Args) -> Result<KafkaReport> {
    let plugins_dir = args
        .plugins_dir
        .clone()
        .unwrap_or_else(super::default_plugins_dir);
    let parent = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let root = tempfile::Builder::new()
        .prefix("spate-bench-kafka-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a directory under {}", parent.display()))?;

    let mut sandbox_config = SandboxConfig::new(root.path().join("compiled"));
    sandbox_config.max_memory_bytes = super::SANDBOX_MAX_MEMORY_MB << 20;
    sandbox_config.pool_instances = super::SANDBOX_POOL_INSTANCES;
    let sandbox = Sandbox::new(sandbox_config).context("starting the sandbox")?;
    super::progress(&format!(
        "compiling trivial.wasm from {}",
        plugins_dir.display()
    ));
    let trivial = {
        let sandbox = Arc::clone(&sandbox);
        let dir = plugins_dir.clone();
        tokio::task::spawn_blocking(move || super::load(&sandbox, &dir, "trivial.wasm", "trivial"))
            .await
            .context("compile task panicked")??
    };
    let fresh_m = super::manifest(
        super::TRIVIAL_MANIFEST,
        args.concurrency,
        "plugins/trivial/spate.toml",
    )?;
    let input_topic = fresh_m
        .subscriptions
        .first()
        .map(|s| s.topic.clone())
        .context("the trivial manifest subscribes to nothing")?;
    let mut native_m = fresh_m.clone();
    native_m.name = "native-trivial".into();
    let mut changes = vec![
        "native trivial = plugins/trivial/spate.toml with name = \"native-trivial\" (its own group and DLQ)"
            .to_string(),
    ];
    if let Some(c) = args.concurrency {
        changes.push(format!("limits.concurrency = {c} (--concurrency)"));
    }
    let concurrency = fresh_m.limits.concurrency;
    let info = |m, hash: &str| Arc::new(PluginInfo::new(m, hash.to_string()));
    let wasm: Arc<dyn PluginVersion> =
        sandbox.plugin(&trivial.component, info(fresh_m, &trivial.hash))?;
    let native: Arc<dyn PluginVersion> =
        Arc::new(NativeTrivial::new(info(native_m, &"0".repeat(64))));

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
        .filter(|s| {
            matches!(s.kind, Kind::Ceiling)
                || args.only.as_deref().is_none_or(|o| s.label.contains(o))
        })
        .collect();

    let mut properties = Vec::new();
    if let Some(wait) = args.fetch_wait_ms {
        properties.push(("fetch.wait.max.ms".to_string(), wait.to_string()));
    }
    for p in &args.librdkafka {
        if let Some((k, v)) = p.split_once('=') {
            properties.push((k.to_string(), v.to_string()));
        }
    }
    let shared = Shared {
        common: Common {
            properties: properties.clone(),
        },
        input_topic,
        partitions: args.partitions,
        commit_interval: Duration::from_millis(args.commit_interval_ms),
        root: root.path().to_path_buf(),
    };
    let workload = Workload::Keyed { keys: args.keys };
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let measured = Duration::from_secs_f64(args.paced_secs);

    let mut throughputs: Vec<Vec<ThroughputRun>> = subjects.iter().map(|_| Vec::new()).collect();
    let mut latencies: Vec<Vec<LatencyRun>> = subjects.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for (i, subject) in subjects.iter().enumerate() {
            super::progress(&format!(
                "round {round}/{}: {}: throughput, {} events",
                args.rounds, subject.label, args.events
            ));
            let t = throughput(subject, &shared, &workload, args.events)
                .await
                .with_context(|| format!("{}: throughput run", subject.label))?;
            super::progress(&format!(
                "  backlog produced in {:.1} s; drained at {:.0} events/s{}",
                t.produce_seconds,
                t.rate,
                if t.complete { "" } else { " (INCOMPLETE)" }
            ));
            throughputs[i].push(t);
        }
        for (i, subject) in subjects.iter().enumerate() {
            super::progress(&format!(
                "round {round}/{}: {}: paced, {} events/s for {} s",
                args.rounds, subject.label, args.rate, args.paced_secs
            ));
            let l = latency(subject, &shared, &workload, args.rate, warmup, measured)
                .await
                .with_context(|| format!("{}: latency run", subject.label))?;
            super::progress(&format!(
                "  p50 {:.2} ms, p99 {:.2} ms",
                l.p50_us / 1e3,
                l.p99_us / 1e3
            ));
            latencies[i].push(l);
        }
    }

    let mut results = Vec::new();
    for ((subject, rounds), lat) in subjects.iter().zip(throughputs).zip(latencies) {
        let mut sorted = rounds.clone();
        sorted.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let median = sorted
            .get(sorted.len() / 2)
            .cloned()
            .context("no throughput rounds ran")?;
        results.push(SubjectResult {
            label: subject.label.clone(),
            group: subject.group(),
            concurrency: match subject.kind {
                Kind::Spate(_) => Some(concurrency),
                Kind::Ceiling => None,
            },
            throughput: median,
            throughput_rounds: rounds,
            latency: summarize(lat),
        });
    }
    let ratios = match results.iter().find(|r| r.concurrency.is_none()) {
        Some(ceiling) => results
            .iter()
            .filter(|r| r.concurrency.is_some())
            .map(|r| {
                let pct = |a: f64, b: f64| if b > 0.0 { 100.0 * a / b } else { 0.0 };
                Ratio {
                    label: r.label.clone(),
                    ceiling: ceiling.label.clone(),
                    percent: pct(r.throughput.rate, ceiling.throughput.rate),
                    drain_percent: pct(r.throughput.drain_rate, ceiling.throughput.drain_rate),
                }
            })
            .collect(),
        None => Vec::new(),
    };

    Ok(KafkaReport {
        machine: Machine {
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model: super::cpu_model(),
            data_root: parent.display().to_string(),
        },
        settings: KafkaSettings {
            broker: format!("Apache Kafka {} (KRaft, one node)", kafka_version()),
            partitions: args.partitions,
            keys: args.keys,
            throughput_events: args.events,
            rounds: args.rounds,
            paced_rate: args.rate,
            paced_seconds: args.paced_secs,
            paced_warmup_seconds: args.warmup_secs,
            commit_interval_ms: args.commit_interval_ms,
            librdkafka: properties.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        },
        plugins: vec![trivial.load],
        subjects: results,
        ratios,
        manifest_changes: changes,
    })
}
