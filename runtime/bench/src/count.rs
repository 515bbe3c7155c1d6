//! `spate-bench count`: the count job, on Kafka and on the embedded log.
//!
//! The job: keyed JSON events; a per-key counter `count/<key>` in durable state (a decimal
//! `u64`) plus one per event; every 10th event of a key emits `{"n":N,"v":<the input>}`,
//! keyed like the input. The subjects on Kafka (the `kafka` module's machinery: a fresh
//! broker per run, the backlog produced first, interleaved rounds) are the `count` plugin
//! with its manifest as in the tree (`wasm-fresh`: a new sandbox per event) and with
//! `[execution] mode = "warm"` (`wasm-warm`), its native twin through the same dispatcher
//! and host API (`native`, [`NativeCount`]), and a plain rdkafka consume → `HashMap` →
//! produce → commit loop (`ceiling`). Every Spate subject keeps its state in an
//! `EmbeddedStateStore` in a temporary directory, deployed on the dispatcher's
//! `Supervisor` from a `DispatchContext` as `spate up` deploys it (the checkpointer makes
//! state and positions durable together). On the embedded log (the `harness` module, as the
//! embedded bench runs: events appended as fast as the log takes them while the
//! pipelines run) the subjects are the plugin fresh and its native twin.
//!
//! Only every 10th event of a key makes an output, so the clocks stop at outputs: a
//! throughput run ends when the last expected output is visible (with the defaults, 100
//! events per key sent round robin, every key's last event is one that emits), and
//! latency is measured on the inputs that emit, sent at the paced rate over a smaller key
//! space (`--paced-keys`, default 100: at 1,000 events/s each key emits once a second,
//! 100 samples per second).
//!
//! ```sh
//! scripts/bench count                          # builds the plugins, runs this in release
//! scripts/bench count --events 20000 --rounds 1
//! scripts/bench count --json                   # one JSON object per subject per line
//! ```

use crate::harness::{self, RunSettings, pool};
use crate::kafka::report::{KafkaReport, SubjectResult};
use crate::kafka::{self, Kind, RunArgs, Setup, Shared, Subject, Workloads};
use crate::native::NativeCount;
use crate::workload::{Job, Workload};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use spate_core::manifest::ExecutionMode;
use spate_core::plugin::PluginVersion;
use std::sync::Arc;
use std::time::Duration;

/// One output per this many events of a key (as `plugins/count` does).
const EMIT_EVERY: u64 = 10;
/// Label of the ceiling (kept by `--only` whenever a Spate subject on Kafka runs).
const CEILING: &str = "ceiling";
/// Prefix of the subjects on the embedded log.
const EMBEDDED: &str = "embedded-";

/// Options of `spate-bench count`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events in each throughput run (on Kafka the backlog, produced before the subject
    /// starts; on the embedded log appended as fast as it takes them).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Distinct keys of the throughput runs (`k-<i mod keys>` for event `i`). With
    /// `--events` a multiple of 10 × keys every key's last event emits, so the clock,
    /// which stops at the last output, covers every event.
    #[arg(long, default_value_t = 1_000)]
    keys: u32,
    /// Distinct keys of the paced runs: few enough that outputs (every 10th event of a
    /// key) come often; latency is measured on those.
    #[arg(long, default_value_t = 100)]
    paced_keys: u32,
    #[command(flatten)]
    run: RunArgs,
}

/// Check the options, run the bench, print the rows.
pub fn main(args: &Args) -> Result<()> {
    check(args)?;
    let report = super::block_on(run(args))?;
    if args.run.json {
        for row in &report.rows {
            println!(
                "{}",
                serde_json::to_string(&row.rounded()).context("encoding a result")?
            );
        }
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn check(args: &Args) -> Result<()> {
    let mut problems = args.run.problems();
    if args.events == 0 || args.keys == 0 || args.paced_keys == 0 {
        problems.push("--events, --keys and --paced-keys must be at least 1".to_string());
    }
    super::no_problems(problems)
}

/// One subject's result: what `--json` prints, one per line.
#[derive(Debug, Serialize)]
struct Row {
    /// `wasm-fresh`, `wasm-warm`, `native`, `ceiling` (on Kafka), `embedded-wasm-fresh`,
    /// `embedded-native`.
    subject: String,
    /// `kafka` or `embedded`.
    log: &'static str,
    /// Events per throughput run.
    events: usize,
    /// Median over the rounds of events per second: events over the time from the
    /// subject starting (Kafka; the backlog already produced) or the first append
    /// (embedded) to the last output visible.
    events_per_s: f64,
    /// Median over the rounds of this process's CPU time (user + system, all threads)
    /// during the throughput run, over the events: on Kafka the subject and the bench's
    /// consumer of the outputs; on the embedded log also the appends and the log itself.
    cpu_us_per_event: Option<f64>,
    /// Median over the rounds of each paced run's median send-to-output-visible latency
    /// of its emitting events, milliseconds.
    p50_ms: f64,
    /// Median over the rounds of each paced run's 99th percentile, milliseconds.
    p99_ms: f64,
    /// The 99th percentile of every round's samples pooled, milliseconds: one bad round
    /// shows here and not in `p99_ms`.
    pooled_p99_ms: f64,
    /// Latency samples, over every round.
    latency_samples: usize,
    /// Events per second asked for in the paced runs.
    paced_rate: f64,
    /// Median over the rounds of the events per second from the first output visible to
    /// the last (Kafka: without the group join).
    drain_events_per_s: Option<f64>,
    /// Median over the rounds of the broker's CPU time over the events (Kafka).
    broker_cpu_us_per_event: Option<f64>,
    /// `events_per_s` over the ceiling's, percent (Spate subjects on Kafka).
    percent_of_ceiling: Option<f64>,
    /// Every throughput round, in run order.
    rounds_events_per_s: Vec<f64>,
    /// Every paced round's 99th percentile, milliseconds, in run order.
    rounds_p99_ms: Vec<f64>,
    /// Whether every expected output of every run came.
    complete: bool,
    /// Outputs the throughput runs should make (every 10th event of a key).
    expected_outputs: usize,
    /// Outputs for inputs that already had one, over every run.
    duplicates: usize,
    /// Dead letters, over every run.
    dead_letters: u64,
    /// `limits.concurrency` of the manifest (Spate subjects).
    concurrency: Option<u32>,
}

/// `x` to `digits` decimals (the JSON carries no false precision).
fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

impl Row {
    /// The row with rates to whole events, CPU to 0.01 µs and times to µs.
    fn rounded(&self) -> Self {
        let opt = |v: Option<f64>, d| v.map(|x| round(x, d));
        Self {
            subject: self.subject.clone(),
            rounds_events_per_s: self
                .rounds_events_per_s
                .iter()
                .map(|x| round(*x, 0))
                .collect(),
            rounds_p99_ms: self.rounds_p99_ms.iter().map(|x| round(*x, 3)).collect(),
            events_per_s: round(self.events_per_s, 0),
            cpu_us_per_event: opt(self.cpu_us_per_event, 2),
            p50_ms: round(self.p50_ms, 3),
            p99_ms: round(self.p99_ms, 3),
            pooled_p99_ms: round(self.pooled_p99_ms, 3),
            drain_events_per_s: opt(self.drain_events_per_s, 0),
            broker_cpu_us_per_event: opt(self.broker_cpu_us_per_event, 2),
            percent_of_ceiling: opt(self.percent_of_ceiling, 1),
            ..*self
        }
    }
}

/// Everything one `spate-bench count` run measured.
struct CountReport {
    rows: Vec<Row>,
    /// The Kafka part's own report (its detailed tables), if it ran.
    kafka: Option<KafkaReport>,
    keys: u32,
    paced_keys: u32,
    rounds: usize,
    partitions: i32,
    commit_interval_ms: u64,
    manifest_changes: Vec<String>,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// The median of microsecond values, in milliseconds.
fn median_ms(us: impl Iterator<Item = f64>) -> f64 {
    median(us.collect()).unwrap_or(0.0) / 1e3
}

fn kafka_row(r: &SubjectResult, paced_rate: f64, ceiling_rate: Option<f64>) -> Row {
    let rounds = &r.throughput_rounds;
    let per_event = |secs: Option<f64>, events: usize| secs.map(|s| s * 1e6 / events.max(1) as f64);
    let spate = r.concurrency.is_some();
    Row {
        subject: r.label.clone(),
        log: "kafka",
        events: r.throughput.events,
        events_per_s: r.throughput.rate,
        cpu_us_per_event: median(
            rounds
                .iter()
                .filter_map(|t| per_event(t.cpu_seconds, t.events))
                .collect(),
        ),
        p50_ms: median_ms(r.latency.rounds.iter().map(|l| l.p50_us)),
        p99_ms: median_ms(r.latency.rounds.iter().map(|l| l.p99_us)),
        pooled_p99_ms: r.latency.p99_us / 1e3,
        latency_samples: r.latency.samples,
        paced_rate,
        drain_events_per_s: median(rounds.iter().map(|t| t.drain_rate).collect()),
        broker_cpu_us_per_event: median(
            rounds
                .iter()
                .filter_map(|t| per_event(t.broker_cpu_seconds, t.events))
                .collect(),
        ),
        percent_of_ceiling: ceiling_rate
            .filter(|c| spate && *c > 0.0)
            .map(|c| 100.0 * r.throughput.rate / c),
        rounds_events_per_s: rounds.iter().map(|t| t.rate).collect(),
        rounds_p99_ms: r.latency.rounds.iter().map(|l| l.p99_us / 1e3).collect(),
        complete: rounds.iter().all(|t| t.complete)
            && r.latency.rounds.iter().all(|l| l.missing == 0),
        expected_outputs: r.throughput.expected_outputs,
        duplicates: rounds.iter().map(|t| t.duplicates).sum::<usize>()
            + r.latency.rounds.iter().map(|l| l.duplicates).sum::<usize>(),
        dead_letters: (rounds.iter().map(|t| t.dead_letters).sum::<usize>()
            + r.latency
                .rounds
                .iter()
                .map(|l| l.dead_letters)
                .sum::<usize>()) as u64,
        concurrency: r.concurrency,
    }
}

async fn run(args: &Args) -> Result<CountReport> {
    let run = &args.run;
    let setup = Setup::new(
        run,
        "spate-bench-count-",
        "count.wasm",
        "count",
        super::COUNT_MANIFEST,
        "plugins/count/spate.toml",
    )
    .await?;
    let fresh_m = setup.manifest.clone();
    if fresh_m.execution.mode != ExecutionMode::Fresh {
        bail!("plugins/count/spate.toml must say [execution] mode = \"fresh\"");
    }
    let (input_topic, output_topic) = (setup.input_topic.clone(), setup.output_topic.clone());
    let mut warm_m = fresh_m.clone();
    warm_m.execution.mode = ExecutionMode::Warm;
    let mut eos_m = fresh_m.clone();
    eos_m.exactly_once = true;
    let mut park_m = fresh_m.clone();
    park_m.on_failure = spate_core::manifest::OnFailure::ParkKey;
    let mut record_m = fresh_m.clone();
    record_m.record.enabled = true;
    let mut candidate_m = fresh_m.clone();
    candidate_m.version.minor += 1;
    let mut native_m = fresh_m.clone();
    native_m.name = "native-count".into();
    let changes = setup.changes(
        run,
        &[
            "wasm-warm = plugins/count/spate.toml with [execution] mode = \"warm\"",
            "wasm-fresh-eos = plugins/count/spate.toml with exactly-once = true (Kafka transactions)",
            "wasm-fresh-park = plugins/count/spate.toml with on-failure = \"park-key\" (no event fails: the cost of the parked-key check)",
            "wasm-fresh-record = plugins/count/spate.toml with [record] enabled = true (embedded log only)",
            "wasm-fresh-shadow = wasm-fresh with the same component as a shadow candidate (next minor version; embedded log only)",
            "native = plugins/count/spate.toml with name = \"native-count\" (its own group, state namespace and DLQ)",
        ],
    );
    let fresh = setup.version(fresh_m)?;
    let warm = setup.version(warm_m)?;
    let eos = setup.version(eos_m)?;
    let park = setup.version(park_m)?;
    let record = setup.version(record_m)?;
    let candidate = setup.version(candidate_m)?;
    let native: Arc<dyn PluginVersion> = Arc::new(NativeCount::new(
        kafka::native_info(native_m),
        output_topic.clone(),
        EMIT_EVERY,
    ));
    let job = Job::Count { every: EMIT_EVERY };
    let backlog = Workload::Keyed { keys: args.keys };
    let paced = Workload::Keyed {
        keys: args.paced_keys,
    };
    if !(args.events as u64).is_multiple_of(u64::from(args.keys) * EMIT_EVERY) {
        super::progress(&format!(
            "note: --events {} is not a multiple of 10 x --keys {}: events after a key's last \
             10th are not waited for (the clock stops at the last output)",
            args.events, args.keys
        ));
    }

    // Kafka: the ceiling runs whenever a Spate subject does.
    let kafka_subjects: Vec<Subject> = [
        ("wasm-fresh", Kind::Spate(Arc::clone(&fresh))),
        ("wasm-warm", Kind::Spate(warm)),
        ("wasm-fresh-eos", Kind::Spate(eos)),
        ("wasm-fresh-park", Kind::Spate(Arc::clone(&park))),
        ("native", Kind::Spate(Arc::clone(&native))),
    ]
    .into_iter()
    .filter(|(label, _)| run.selects(label))
    .map(|(label, kind)| Subject {
        label: label.into(),
        kind,
    })
    .collect();
    let kafka_report = if kafka_subjects.is_empty() {
        None
    } else {
        let mut subjects = kafka_subjects;
        subjects.push(Subject {
            label: CEILING.into(),
            kind: Kind::Ceiling,
        });
        let shared = Shared::new(
            run,
            input_topic.clone(),
            output_topic.clone(),
            job,
            setup.root.path().to_path_buf(),
        );
        let workloads = Workloads {
            backlog: backlog.clone(),
            events: args.events,
            paced: paced.clone(),
        };
        let results = kafka::measure(&subjects, &shared, run, &workloads).await?;
        Some(KafkaReport {
            job: "the count job (plugins/count)".into(),
            machine: super::machine(&setup.parent),
            settings: kafka::settings(run, args.events, args.keys),
            plugins: Vec::new(),
            ratios: kafka::ratios(&results),
            subjects: results,
            manifest_changes: changes.clone(),
        })
    };

    let mut rows = Vec::new();
    if let Some(report) = &kafka_report {
        let ceiling = report
            .subjects
            .iter()
            .find(|r| r.concurrency.is_none())
            .map(|r| r.throughput.rate);
        rows.extend(
            report
                .subjects
                .iter()
                .map(|r| kafka_row(r, run.rate, ceiling)),
        );
    }

    let embedded: Vec<harness::Subject> = [
        ("wasm-fresh", Arc::clone(&fresh), None),
        ("wasm-fresh-park", park, None),
        ("wasm-fresh-record", record, None),
        ("wasm-fresh-shadow", fresh, Some(candidate)),
        ("native", native, None),
    ]
    .into_iter()
    .map(|(label, version, shadow)| harness::Subject {
        label: format!("{EMBEDDED}{label}"),
        version,
        input_topic: input_topic.clone(),
        output_topic: output_topic.clone(),
        workload: backlog.clone(),
        job,
        shadow,
    })
    .filter(|s| run.selects(&s.label))
    .collect();
    rows.extend(embedded_rows(&embedded, args, setup.root.path()).await?);

    Ok(CountReport {
        rows,
        kafka: kafka_report.map(|mut r| {
            r.plugins.push(setup.plugin.load);
            r
        }),
        keys: args.keys,
        paced_keys: args.paced_keys,
        rounds: run.rounds,
        partitions: run.partitions,
        commit_interval_ms: run.commit_interval_ms,
        manifest_changes: changes,
    })
}

/// The subjects on the embedded log, in interleaved rounds as on Kafka: each round a
/// throughput run of each, then a paced run of each.
async fn embedded_rows(
    subjects: &[harness::Subject],
    args: &Args,
    root: &std::path::Path,
) -> Result<Vec<Row>> {
    let run = &args.run;
    let settings = RunSettings {
        commit_interval: Duration::from_millis(run.commit_interval_ms),
    };
    let paced = Workload::Keyed {
        keys: args.paced_keys,
    };
    let warmup = Duration::from_secs_f64(run.warmup_secs);
    super::progress(&format!(
        "embedded log: {} events per throughput run; paced runs at {} events/s for {} s",
        args.events, run.rate, run.paced_secs
    ));
    let runs = super::interleave(
        subjects,
        run.rounds,
        |s| s.label.as_str(),
        async |subject| harness::throughput(subject, root, &settings, args.events).await,
        // The harness's paced run counts its warm-up in its length.
        async |subject| {
            let seconds = run.warmup_secs + run.paced_secs;
            harness::latency(subject, &paced, root, &settings, run.rate, seconds, warmup).await
        },
    )
    .await?;
    let mut rows = Vec::new();
    for (subject, (tps, lats)) in subjects.iter().zip(runs) {
        let pooled = pool(lats.iter().map(|l| l.samples_us.as_slice()));
        rows.push(Row {
            subject: subject.label.clone(),
            log: "embedded",
            events: args.events,
            events_per_s: median(tps.iter().map(|t| t.events_per_second).collect()).unwrap_or(0.0),
            cpu_us_per_event: median(
                tps.iter()
                    .filter_map(|t| t.cpu_seconds.map(|c| c * 1e6 / t.events.max(1) as f64))
                    .collect(),
            ),
            p50_ms: median_ms(lats.iter().map(|l| l.p50_us)),
            p99_ms: median_ms(lats.iter().map(|l| l.p99_us)),
            pooled_p99_ms: pooled.p99_us / 1e3,
            latency_samples: pooled.samples,
            paced_rate: run.rate,
            drain_events_per_s: None,
            broker_cpu_us_per_event: None,
            percent_of_ceiling: None,
            rounds_events_per_s: tps.iter().map(|t| t.events_per_second).collect(),
            rounds_p99_ms: lats.iter().map(|l| l.p99_us / 1e3).collect(),
            complete: tps.iter().all(|t| t.complete) && lats.iter().all(|l| l.missing == 0),
            expected_outputs: tps.first().map_or(0, |t| t.expected_outputs),
            // The embedded log drops a repeated emit by its idempotency id.
            duplicates: 0,
            dead_letters: tps.iter().map(|t| t.dead_letters).sum::<u64>()
                + lats.iter().map(|l| l.dead_letters).sum::<u64>(),
            concurrency: Some(subject.version.info().manifest.limits.concurrency),
        });
    }
    Ok(rows)
}

/// The paragraph printed under the table.
const HOW_TO_READ: &str = "
How to read this: `ev/s` is the median over the rounds of N events over the time from the
subject starting (Kafka: its backlog already produced; the group join included) or from
the first append (embedded log: appends run alongside) to its last output visible to a
separate consumer. `CPU µs/ev` is this process's CPU time (every thread) over that span,
over N, median over the rounds: on Kafka the subject plus the bench's reader of the
outputs (one per ten events), the broker's JVM apart (see the detail below); on the
embedded log the appends and the log's writer too, since the log is in the process.
Latency is from an input's send (Kafka: the producer's send; embedded: the start of its
append) to its output being read, measured on the inputs that emit (every 10th of a key)
in paced runs over fewer keys (`--paced-keys`): p50 and p99 are medians of the rounds'
own percentiles, `pooled p99` the 99th percentile of every round's samples together.
Every Spate subject keeps its counters in an EmbeddedStateStore (redb) in a temporary
directory, made durable with the source positions at each checkpoint (the commit
interval); the ceiling keeps them in a HashMap and commits offsets only, so it is a
ceiling, not a durable equivalent. `*` marks a subject with a run that missed expected
outputs.
";

impl CountReport {
    fn row(&self, subject: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.subject == subject)
    }

    /// The team's targets for this job (issue 5), each with whether this run met it.
    fn targets(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |what: String, met: bool| {
            out.push(format!("{} {what}", if met { "met   " } else { "MISSED" }));
        };
        if let Some(r) = self.row("wasm-fresh") {
            check(
                format!("kafka wasm-fresh >= 40000 ev/s: {:.0}", r.events_per_s),
                r.events_per_s >= 40_000.0,
            );
            if let Some(cpu) = r.cpu_us_per_event {
                check(
                    format!("kafka wasm-fresh <= 40 µs CPU/event: {cpu:.1}"),
                    cpu <= 40.0,
                );
            }
        }
        if let Some(r) = self.row("wasm-warm") {
            check(
                format!("kafka wasm-warm >= 80000 ev/s: {:.0}", r.events_per_s),
                r.events_per_s >= 80_000.0,
            );
        }
        for r in self.rows.iter().filter(|r| r.log == "kafka") {
            if let Some(p) = r.percent_of_ceiling {
                check(
                    format!("kafka {} >= 50% of the ceiling: {p:.0}%", r.subject),
                    p >= 50.0,
                );
            }
        }
        for r in self.rows.iter().filter(|r| r.concurrency.is_some()) {
            check(
                format!("{} {} p99 <= 50 ms: {:.1}", r.log, r.subject, r.p99_ms),
                r.p99_ms <= 50.0,
            );
        }
        if let Some(r) = self.row("embedded-wasm-fresh") {
            check(
                format!("embedded wasm-fresh >= 60000 ev/s: {:.0}", r.events_per_s),
                r.events_per_s >= 60_000.0,
            );
        }
        out
    }

    fn to_text(&self) -> String {
        let mut o = String::new();
        o.push_str(
            "Spate bench, count job: a per-key counter in durable state, an emit every 10th event of a key\n",
        );
        o.push_str(&format!(
            "{} keys ({} in the paced runs), Kafka topics of {} partitions (embedded log: 4), {} interleaved rounds,\ncommit interval {} ms; ONE NOISY SHARED MACHINE: compare rows of this run with each other.\n",
            self.keys, self.paced_keys, self.partitions, self.rounds, self.commit_interval_ms
        ));
        for c in &self.manifest_changes {
            o.push_str(&format!("manifest: {c}\n"));
        }
        o.push_str(&format!(
            "\n  {:<20} {:<8} {:>7} | {:>8} {:>9} {:>7} {:>7} {:>10} | {:>7} {:>8} {:>5} | {:>4}\n",
            "subject",
            "log",
            "events",
            "ev/s",
            "CPU µs/ev",
            "p50 ms",
            "p99 ms",
            "pooled p99",
            "samples",
            "% ceil",
            "dlq",
            "dup"
        ));
        let opt = |v: Option<f64>, digits: usize| {
            v.map(|x| format!("{x:.digits$}"))
                .unwrap_or_else(|| "-".into())
        };
        for r in &self.rows {
            o.push_str(&format!(
                "  {:<20} {:<8} {:>7} | {:>8} {:>9} {:>7.2} {:>7.2} {:>10.2} | {:>7} {:>8} {:>5} | {:>4}\n",
                r.subject,
                r.log,
                r.events,
                format!("{:.0}{}", r.events_per_s, if r.complete { "" } else { "*" }),
                opt(r.cpu_us_per_event, 1),
                r.p50_ms,
                r.p99_ms,
                r.pooled_p99_ms,
                r.latency_samples,
                opt(r.percent_of_ceiling, 0),
                r.dead_letters,
                r.duplicates,
            ));
        }
        o.push_str("  rounds (ev/s; p99 ms), in run order:\n");
        for r in &self.rows {
            let rates: Vec<String> = r
                .rounds_events_per_s
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect();
            let p99s: Vec<String> = r.rounds_p99_ms.iter().map(|x| format!("{x:.1}")).collect();
            o.push_str(&format!(
                "    {:<20} {:<8} {}; {}\n",
                r.subject,
                r.log,
                rates.join(" "),
                p99s.join(" ")
            ));
        }
        let targets = self.targets();
        if !targets.is_empty() {
            o.push_str("  against the issue's targets:\n");
            for t in targets {
                o.push_str(&format!("    {t}\n"));
            }
        }
        o.push_str(HOW_TO_READ);
        if let Some(k) = &self.kafka {
            o.push_str("\n--- Kafka runs in detail ---\n\n");
            o.push_str(&k.to_text());
        }
        o
    }
}
