//! The Kafka bench's results, as a plain-text table or JSON.

use crate::report::{Machine, PluginLoad};
use serde::Serialize;

/// Everything one `spate-bench kafka` run measured.
#[derive(Debug, Serialize)]
pub struct KafkaReport {
    /// What the subjects do.
    pub job: String,
    /// Where it ran.
    pub machine: Machine,
    /// What it was asked to do.
    pub settings: KafkaSettings,
    /// The plugins loaded.
    pub plugins: Vec<PluginLoad>,
    /// One entry per subject, in run order.
    pub subjects: Vec<SubjectResult>,
    /// Each Spate subject against the ceiling.
    pub ratios: Vec<Ratio>,
    /// How each Spate subject's manifest was changed from the one in `plugins/`.
    pub manifest_changes: Vec<String>,
}

/// Settings of the run.
#[derive(Debug, Serialize)]
pub struct KafkaSettings {
    /// The broker: its release and how it runs.
    pub broker: String,
    /// Partitions of every topic.
    pub partitions: i32,
    /// Distinct keys of the inputs.
    pub keys: u32,
    /// Events per throughput run.
    pub throughput_events: usize,
    /// Interleaved rounds (a throughput run and a paced run per subject each).
    pub rounds: usize,
    /// Paced rate, events per second.
    pub paced_rate: f64,
    /// Measured part of each paced run, seconds.
    pub paced_seconds: f64,
    /// Paced warm-up excluded from latency, seconds.
    pub paced_warmup_seconds: f64,
    /// Commit interval of Spate and the ceiling, milliseconds.
    pub commit_interval_ms: u64,
    /// librdkafka properties every client got (Spate's through `events.librdkafka`).
    pub librdkafka: Vec<String>,
}

/// One throughput run: a backlog produced first, then the subject started.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputRun {
    /// Inputs in the backlog.
    pub events: usize,
    /// Seconds producing the backlog took (batched as a user's producer does; before the
    /// clock).
    pub produce_seconds: f64,
    /// Inputs that make an output (all of them, or every 10th of a key for the count job).
    pub expected_outputs: usize,
    /// Inputs whose output became visible.
    pub outputs: usize,
    /// Whether every expected output (or a dead letter) came before the stall timeout.
    pub complete: bool,
    /// Extra outputs for inputs that already had one.
    pub duplicates: usize,
    /// Dead letters.
    pub dead_letters: usize,
    /// Seconds from the subject starting to consume (its producer already initialised;
    /// the group join included) to its first output visible.
    pub startup_seconds: f64,
    /// Seconds from the subject starting to consume to its last output visible.
    pub seconds: f64,
    /// Inputs per second over `seconds` (the inputs the outputs seen account for: all of
    /// them in a complete run).
    pub rate: f64,
    /// Seconds from the first output visible to the last.
    pub drain_seconds: f64,
    /// Inputs per second over `drain_seconds`: the rate without the group join.
    pub drain_rate: f64,
    /// Longest time between two consecutive outputs becoming visible, milliseconds: a
    /// consumer that stalls shows here.
    pub longest_gap_ms: f64,
    /// CPU seconds this process used from the start until every output was seen (the
    /// subject and the observer; the input producer had finished).
    pub cpu_seconds: Option<f64>,
    /// CPU seconds the broker process used over the same span.
    pub broker_cpu_seconds: Option<f64>,
    /// Sum over partitions of the group's committed offsets after the subject stopped
    /// (inputs are offsets `0..n`, so this equals `events` when everything is committed).
    pub committed: Option<i64>,
}

/// One paced run.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyRun {
    /// Events per second asked for.
    pub target_rate: f64,
    /// Events per second actually sent in the measured part.
    pub achieved_rate: f64,
    /// Probe events sent one by one until the first output appeared (group joined).
    pub probes: usize,
    /// Seconds from starting the subject to the first probe's output.
    pub startup_seconds: f64,
    /// Events sent after the probes (warm-up and measured).
    pub events: usize,
    /// Events measured (sent after the warm-up, output seen).
    pub samples: usize,
    /// Inputs sent (probes included) that make an output; only those are measured.
    pub expected_outputs: usize,
    /// Inputs that make an output whose output never became visible before the stall
    /// timeout.
    pub missing: usize,
    /// Extra outputs for inputs that already had one.
    pub duplicates: usize,
    /// Dead letters.
    pub dead_letters: usize,
    /// Median send-to-visible latency, microseconds.
    pub p50_us: f64,
    /// 90th percentile, microseconds.
    pub p90_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Largest, microseconds.
    pub max_us: f64,
    /// Median time from sending an input to its acknowledgement, microseconds.
    pub ack_p50_us: f64,
    /// 99th percentile of the same, microseconds.
    pub ack_p99_us: f64,
    /// Sum of the group's committed offsets after the subject stopped, against the
    /// inputs produced (probes included).
    pub committed: Option<i64>,
    /// Inputs produced (probes included).
    pub produced: usize,
    /// Every measured latency, microseconds, sorted (pooled across rounds for the table).
    #[serde(skip)]
    pub samples_us: Vec<f64>,
}

/// Latency of one subject over all its paced rounds.
#[derive(Clone, Debug, Serialize)]
pub struct LatencySummary {
    /// Samples pooled from every round.
    pub samples: usize,
    /// Pooled median, microseconds.
    pub p50_us: f64,
    /// Pooled 90th percentile, microseconds.
    pub p90_us: f64,
    /// Pooled 99th percentile, microseconds.
    pub p99_us: f64,
    /// Pooled maximum, microseconds.
    pub max_us: f64,
    /// Each round.
    pub rounds: Vec<LatencyRun>,
}

/// One subject over all rounds.
#[derive(Debug, Serialize)]
pub struct SubjectResult {
    /// Row label.
    pub label: String,
    /// Consumer group.
    pub group: String,
    /// `limits.concurrency` of its manifest (Spate subjects).
    pub concurrency: Option<u32>,
    /// The median throughput round (by `rate`).
    pub throughput: ThroughputRun,
    /// Every throughput round, in run order.
    pub throughput_rounds: Vec<ThroughputRun>,
    /// Paced latency.
    pub latency: LatencySummary,
}

/// A Spate subject against the ceiling.
#[derive(Debug, Serialize)]
pub struct Ratio {
    /// The Spate subject.
    pub label: String,
    /// The ceiling.
    pub ceiling: String,
    /// Median `rate` over the ceiling's, percent.
    pub percent: f64,
    /// Median round's `drain_rate` over the ceiling's median round's, percent.
    pub drain_percent: f64,
}

/// A throughput run whose outputs paused this long gets a note under the table.
const STALL_NOTE_MS: f64 = 200.0;

/// The paragraph printed under the tables.
const HOW_TO_READ: &str = "
How to read this: every run gets a fresh Apache Kafka broker (KRaft, one node, its log on
disk in the system temp dir, a JVM with the optimizing JIT) on loopback, sharing the
machine's cores with this process; the broker's JVM starts cold in each run, alike for
every subject. `spate` rows run the real dispatcher (Pipeline) on KafkaBus from
spate-kafka, one runtime: one consumer-group member per topic, emits through its
idempotent acks=all producer, commits after the emits are acknowledged; the `rdkafka` row
is the ceiling, a plain consume -> produce -> commit loop with the same client settings
and no Spate. Throughput: N inputs are produced first, batched as a user's producer does
(linger.ms=1, idempotent, acks=all); the subject connects and its producer delivers one
warm-up record, then it starts consuming; `ev/s` is N over the time from then to its last
output visible, `drain` N over the time from its first output to its last (`join s`,
before the first output, is the group join and the first fetch); `gap` is the longest
time between two consecutive outputs, where a consumer that stopped fetching shows. The
median round is the one with the median `ev/s`. `CPU s` is this process (subject and
observer), `broker` the broker's JVM, over the same span; on two cores the broker's share
is capacity the subject did not get. Latency: inputs sent one at a time at the paced rate
once a probe's output showed the group joined, after a warm-up; per-event time from the
producer's send to the output being read by a separate consumer of the output topic (no
group, librdkafka's default fetch settings: the broker answers a fetch as soon as records
arrive, so fetch.wait.max.ms is no floor under these latencies), pooled across rounds;
`ack` is the input's own produce acknowledgement, part of that time. `dup` counts outputs
for inputs that already had one, `dlq` dead letters, `commit` the committed offsets
against the inputs after the subject stopped; `*` marks a run that stalled before every
output.
";

fn human_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

impl KafkaReport {
    /// The plain-text tables and the note on how to read them.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let s = &self.settings;
        o.push_str(&format!(
            "Spate bench, Kafka: {} through the real dispatcher on spate-kafka,\n",
            self.job
        ));
        o.push_str(&format!(
            "against {} on loopback, and the same work as a plain rdkafka program.\n\n",
            s.broker
        ));
        o.push_str(&format!(
            "machine: {} cores{}; ONE NOISY SHARED MACHINE: compare rows of this run with each\n         other, not with runs elsewhere or at other times.\n",
            m.cores,
            m.cpu_model
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        ));
        for p in &self.plugins {
            o.push_str(&format!(
                "plugin:  {} ({} bytes, compiled in {:.0} ms) from {}\n",
                p.name, p.bytes, p.compile_ms, p.path
            ));
        }
        o.push_str(&format!(
            "topics:  {} partitions each, {} keys; a fresh broker per run\n",
            s.partitions, s.keys
        ));
        o.push_str(&format!(
            "runs:    {} interleaved rounds; throughput = {} events produced before the subject starts,\n         median round; latency = {:.0} events/s paced for {:.1} s after a {:.1} s warm-up, pooled\n",
            s.rounds, s.throughput_events, s.paced_rate, s.paced_seconds, s.paced_warmup_seconds
        ));
        o.push_str(&format!(
            "clients: {}; commit interval {} ms; other settings at spate-kafka's defaults\n",
            if s.librdkafka.is_empty() {
                "librdkafka defaults".to_string()
            } else {
                s.librdkafka.join(", ")
            },
            s.commit_interval_ms
        ));
        for c in &self.manifest_changes {
            o.push_str(&format!("manifest: {c}\n"));
        }

        o.push_str("\nThroughput: backlog drained (median round)\n");
        o.push_str(&format!(
            "  {:<30} {:>4} | {:>7} {:>7} {:>6} {:>7} | {:>5} {:>6} {:>8} | {:>3} {:>3} {:>11}\n",
            "subject",
            "conc",
            "ev/s",
            "drain",
            "join s",
            "gap ms",
            "CPU s",
            "broker",
            "ev/CPU-s",
            "dup",
            "dlq",
            "commit"
        ));
        for r in &self.subjects {
            let t = &r.throughput;
            let mark = if t.complete { "" } else { "*" };
            let per_cpu = t
                .cpu_seconds
                .filter(|c| *c > 0.0)
                .map(|c| t.outputs as f64 / c);
            o.push_str(&format!(
                "  {:<30} {:>4} | {:>7} {:>7} {:>6.2} {:>7.0} | {:>5} {:>6} {:>8} | {:>3} {:>3} {:>11}\n",
                r.label,
                r.concurrency
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                format!("{:.0}{mark}", t.rate),
                format!("{:.0}{mark}", t.drain_rate),
                t.startup_seconds,
                t.longest_gap_ms,
                opt(t.cpu_seconds, 2),
                opt(t.broker_cpu_seconds, 2),
                opt(per_cpu, 0),
                t.duplicates,
                t.dead_letters,
                t.committed
                    .map(|c| format!("{c}/{}", t.events))
                    .unwrap_or_else(|| "-".into()),
            ));
        }
        o.push_str("  rounds (ev/s / drain, in run order; time to produce the backlog):\n");
        for r in &self.subjects {
            let rates: Vec<String> = r
                .throughput_rounds
                .iter()
                .map(|t| {
                    format!(
                        "{:.0}{} / {:.0} ({:.1} s)",
                        t.rate,
                        if t.complete { "" } else { "*" },
                        t.drain_rate,
                        t.produce_seconds
                    )
                })
                .collect();
            o.push_str(&format!("    {:<30} {}\n", r.label, rates.join("  ")));
        }
        for r in &self.subjects {
            let t = &r.throughput;
            if t.longest_gap_ms >= STALL_NOTE_MS {
                o.push_str(&format!(
                    "  ! {}: no output for {:.0} ms at a stretch while inputs were waiting (the consumer stopped fetching)\n",
                    r.label, t.longest_gap_ms
                ));
            }
        }
        for ratio in &self.ratios {
            o.push_str(&format!(
                "  {} / ceiling: {:.0}% of ev/s ({:.0}% of drain)\n",
                ratio.label, ratio.percent, ratio.drain_percent
            ));
        }

        o.push_str("\nLatency: send -> output visible to a consumer, paced (pooled over rounds)\n");
        o.push_str(&format!(
            "  {:<30} {:>5} {:>5} | {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>3} {:>3} {:>4}\n",
            "subject",
            "rate",
            "n",
            "p50",
            "p90",
            "p99",
            "max",
            "ack p50",
            "ack p99",
            "dup",
            "dlq",
            "miss"
        ));
        for r in &self.subjects {
            let l = &r.latency;
            let rounds = &l.rounds;
            let avg = |f: fn(&LatencyRun) -> f64| {
                if rounds.is_empty() {
                    0.0
                } else {
                    rounds.iter().map(f).sum::<f64>() / rounds.len() as f64
                }
            };
            let sum = |f: fn(&LatencyRun) -> usize| rounds.iter().map(f).sum::<usize>();
            o.push_str(&format!(
                "  {:<30} {:>5.0} {:>5} | {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>3} {:>3} {:>4}\n",
                r.label,
                avg(|x| x.achieved_rate),
                l.samples,
                human_us(l.p50_us),
                human_us(l.p90_us),
                human_us(l.p99_us),
                human_us(l.max_us),
                human_us(avg(|x| x.ack_p50_us)),
                human_us(avg(|x| x.ack_p99_us)),
                sum(|x| x.duplicates),
                sum(|x| x.dead_letters),
                sum(|x| x.missing),
            ));
        }
        o.push_str(
            "  rounds (p50 / p99, in run order; consuming start to the first probe's output):\n",
        );
        for r in &self.subjects {
            let rounds: Vec<String> = r
                .latency
                .rounds
                .iter()
                .map(|l| {
                    format!(
                        "{} / {} ({:.1} s)",
                        human_us(l.p50_us),
                        human_us(l.p99_us),
                        l.startup_seconds
                    )
                })
                .collect();
            o.push_str(&format!("    {:<30} {}\n", r.label, rounds.join("  ")));
        }
        for r in &self.subjects {
            for (i, l) in r.latency.rounds.iter().enumerate() {
                if l.committed.is_some_and(|c| c != l.produced as i64) {
                    o.push_str(&format!(
                        "  ! {} paced round {}: committed {} of {} inputs\n",
                        r.label,
                        i + 1,
                        l.committed.unwrap_or(0),
                        l.produced
                    ));
                }
            }
        }
        o.push_str(HOW_TO_READ);
        o
    }
}
