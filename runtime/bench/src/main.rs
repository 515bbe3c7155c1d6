//! `spate-bench`: measures the embedded path end to end and the price of the sandbox; its
//! `kafka` subcommand measures Spate on a real Kafka broker against a plain rdkafka program
//! doing the same work (see the `kafka` module), and its `count` subcommand runs the count
//! job (a per-key counter in durable state) on Kafka and on the embedded log (see the
//! `count` module).
//!
//! It loads the `trivial` and `order-totals` components (built for `wasm32-wasip2`), runs
//! them and a native Rust twin of `trivial` through the real dispatcher against the
//! embedded log, state store and cache in temporary directories, and prints throughput,
//! append-to-visible latency and per-call costs. It owns measurement only: everything it
//! drives is the runtime's own code (`spate-core`, `spate-engine`), wired as `spate up`
//! wires it. Run it through `scripts/bench`, which builds the plugins first.

mod count;
mod guests;
mod harness;
mod kafka;
mod micro;
mod native;
mod report;
mod tier;
mod workload;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use harness::{RunSettings, Subject, THROUGHPUT_BATCH};
use micro::Reuse;
use native::NativeTrivial;
use report::{Machine, PluginLoad, Ratios, Report, Run, Settings};
use spate_core::host::PluginInfo;
use spate_core::manifest::{ExecutionMode, LimitCeilings, Manifest};
use spate_core::plugin::PluginVersion;
use spate_engine::{Sandbox, SandboxConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{Job, Workload};

/// Manifest of the `trivial` plugin, as in the tree.
const TRIVIAL_MANIFEST: &str = include_str!("../../../plugins/trivial/spate.toml");
/// Manifest of the `count` plugin, as in the tree.
const COUNT_MANIFEST: &str = include_str!("../../../plugins/count/spate.toml");
/// Manifest of the `order-totals` plugin, as in the tree.
const ORDER_TOTALS_MANIFEST: &str = include_str!("../../../plugins/order-totals/spate.toml");
/// Untimed calls before each microbenchmark.
const MICRO_WARMUP: usize = 500;
/// One-event appends timed for the append floor.
const FLOOR_APPENDS: usize = 200;

/// Command line: the embedded bench's options, or a subcommand.
#[derive(Debug, Parser)]
#[command(
    name = "spate-bench",
    about = "Benchmark the embedded path: Wasm plugins vs a native handler through the same dispatcher.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    embedded: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Spate on a real Kafka broker (Apache Kafka, KRaft, one node) against a plain
    /// rdkafka consumer doing the same work: throughput and paced latency.
    Kafka(kafka::Args),
    /// The count job (a per-key counter in durable state, an emit every 10th event of a
    /// key): the `count` plugin fresh and warm, its native twin and a plain rdkafka
    /// ceiling on Kafka, and the plugin and its twin on the embedded log.
    Count(count::Args),
    /// The read-through state tier on a skewed read-modify-write workload: state-store
    /// reads saved and the Redis hop's cost, against Apache Cassandra and Redis.
    Tier(tier::Args),
    /// What a handler's language costs: the example plugin in Rust, Python and JavaScript
    /// (component size, upload-to-serving and restart times, per-event cost, smallest
    /// memory); `scripts/bench guests` builds the components.
    Guests(guests::Args),
}

/// Options of the embedded bench.
#[derive(Debug, clap::Args)]
struct Args {
    /// Events appended in each throughput run.
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// Directory holding `trivial.wasm` and `order_totals.wasm` (wasm32-wasip2, release).
    /// Default: `${SPATE_CACHE_DIR:-$HOME/.cache/spate}/plugins-target/wasm32-wasip2/release`.
    #[arg(long)]
    plugins_dir: Option<PathBuf>,
    /// Throughput runs per handler (interleaved); the table shows the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events per second appended in the paced latency runs.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// Seconds each paced latency run lasts.
    #[arg(long, default_value_t = 5.0)]
    paced_secs: f64,
    /// Timed calls per microbenchmark.
    #[arg(long, default_value_t = 20_000)]
    micro_calls: usize,
    /// Distinct keys of the trivial workloads.
    #[arg(long, default_value_t = 1024)]
    keys: u32,
    /// Distinct customers of the order workload.
    #[arg(long, default_value_t = 32)]
    customers: u32,
    /// Override `limits.concurrency` in every manifest.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Dispatcher commit interval, milliseconds.
    #[arg(long, default_value_t = 10)]
    commit_interval_ms: u64,
    /// Directory for the temporary data directories (default: the system temp dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run only the dispatcher rows whose label contains this text (e.g. `order`);
    /// the per-call microbenchmarks always run.
    #[arg(long)]
    only: Option<String>,
    /// Print the results as JSON instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Some(Command::Kafka(args)) => return kafka::main(&args),
        Some(Command::Count(args)) => return count::main(&args),
        Some(Command::Tier(args)) => return block_on(tier::main(args)),
        Some(Command::Guests(args)) => return block_on(guests::run(args)),
        None => {}
    }
    let args = cli.embedded;
    check(&args)?;
    let report = block_on(run(&args))?;
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
    if args.events == 0
        || args.rounds == 0
        || args.micro_calls == 0
        || args.keys == 0
        || args.customers == 0
    {
        bail!("--events, --rounds, --micro-calls, --keys and --customers must be at least 1");
    }
    if !(args.rate > 0.0 && args.rate <= 1_000_000.0) {
        bail!("--rate must be in (0, 1000000]");
    }
    if !(args.paced_secs > 0.0 && args.paced_secs <= 600.0) {
        bail!("--paced-secs must be in (0, 600]");
    }
    if args.commit_interval_ms == 0 {
        bail!("--commit-interval-ms must be at least 1");
    }
    Ok(())
}

fn default_plugins_dir() -> PathBuf {
    let cache = std::env::var_os("SPATE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/spate")))
        .unwrap_or_else(|| PathBuf::from(".cache/spate"));
    cache.join("plugins-target/wasm32-wasip2/release")
}

/// Progress goes to stderr so `--json` output stays clean.
fn progress(line: &str) {
    eprintln!("spate-bench: {line}");
}

/// Run `bench` on a multi-threaded tokio runtime of its own.
fn block_on<T>(bench: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(bench)
}

/// `Ok` if there are no `problems`, else all of them in one error.
fn no_problems(problems: Vec<String>) -> Result<()> {
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// A run's result in one line of progress.
trait Summary {
    /// E.g. `p50 1.20 ms, p99 8.00 ms`.
    fn summary(&self) -> String;
}

impl Summary for harness::Throughput {
    fn summary(&self) -> String {
        format!(
            "{:.0} events/s{}",
            self.events_per_second,
            if self.complete { "" } else { " (INCOMPLETE)" }
        )
    }
}

impl Summary for harness::Latency {
    fn summary(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms",
            self.p50_us / 1e3,
            self.p99_us / 1e3
        )
    }
}

/// Interleaved rounds: each round runs `throughput` on every subject (named by `label`),
/// then `paced` on every subject, so a slow spell of the shared machine hits every subject
/// instead of one. Returns each subject's results in run order.
async fn interleave<S, T: Summary, L: Summary>(
    subjects: &[S],
    rounds: usize,
    label: impl Fn(&S) -> &str,
    mut throughput: impl AsyncFnMut(&S) -> Result<T>,
    mut paced: impl AsyncFnMut(&S) -> Result<L>,
) -> Result<Vec<(Vec<T>, Vec<L>)>> {
    let mut results: Vec<(Vec<T>, Vec<L>)> =
        subjects.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for round in 1..=rounds {
        for (subject, (t, _)) in subjects.iter().zip(results.iter_mut()) {
            let label = label(subject);
            progress(&format!("round {round}/{rounds}: {label}: throughput"));
            let run = throughput(subject)
                .await
                .with_context(|| format!("{label}: throughput run"))?;
            progress(&format!("  {}", run.summary()));
            t.push(run);
        }
        for (subject, (_, l)) in subjects.iter().zip(results.iter_mut()) {
            let label = label(subject);
            progress(&format!("round {round}/{rounds}: {label}: paced"));
            let run = paced(subject)
                .await
                .with_context(|| format!("{label}: latency run"))?;
            progress(&format!("  {}", run.summary()));
            l.push(run);
        }
    }
    Ok(results)
}

/// A fresh directory under `parent` (created if missing) for one run's files.
fn temp_root(parent: &Path, prefix: &str) -> Result<tempfile::TempDir> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .with_context(|| format!("creating a directory under {}", parent.display()))
}

/// The sandbox with the server's defaults, its compiled-code cache under `root`.
/// A sandbox with the server's defaults (memory ceiling per slot, pool size).
fn sandbox(root: &Path) -> Result<Arc<Sandbox>> {
    Sandbox::new(SandboxConfig::new(root.join("compiled"))).context("starting the sandbox")
}

/// This machine, with data directories under `data_root`.
fn machine(data_root: &Path) -> Machine {
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_model: cpu_model(),
        data_root: data_root.display().to_string(),
    }
}

/// A compiled component with its content hash.
pub struct Loaded {
    /// The component.
    pub component: wasmtime::component::Component,
    /// Its content hash.
    pub hash: String,
    /// How loading it went.
    pub load: PluginLoad,
}

fn load(sandbox: &Sandbox, dir: &Path, file: &str, name: &str) -> Result<Loaded> {
    let path = dir.join(file);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {}; build the plugins first (scripts/bench does), or pass --plugins-dir",
            path.display()
        )
    })?;
    let hash = spate_engine::registry::content_hash(&bytes);
    let start = Instant::now();
    let component = sandbox
        .compile(&bytes)
        .with_context(|| format!("compiling {}", path.display()))?;
    Ok(Loaded {
        component,
        hash,
        load: PluginLoad {
            name: name.to_string(),
            path: path.display().to_string(),
            bytes: bytes.len(),
            compile_ms: start.elapsed().as_secs_f64() * 1e3,
        },
    })
}

fn manifest(text: &str, concurrency: Option<u32>, what: &str) -> Result<Manifest> {
    let ceilings = LimitCeilings::default();
    let mut m = Manifest::parse(text, &ceilings).with_context(|| format!("parsing {what}"))?;
    if let Some(c) = concurrency {
        m.limits.concurrency = c;
        m.validate(&ceilings)
            .with_context(|| format!("--concurrency {c} in {what}"))?;
    }
    Ok(m)
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

async fn run(args: &Args) -> Result<Report> {
    let plugins_dir = args.plugins_dir.clone().unwrap_or_else(default_plugins_dir);
    let parent = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = temp_root(&parent, "spate-bench-run-")?;
    let root_path = root.path().to_path_buf();
    let sandbox = sandbox(&root_path)?;

    progress(&format!("compiling plugins from {}", plugins_dir.display()));
    let (trivial, order_totals) = {
        let sandbox = Arc::clone(&sandbox);
        let dir = plugins_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(Loaded, Loaded)> {
            Ok((
                load(&sandbox, &dir, "trivial.wasm", "trivial")?,
                load(&sandbox, &dir, "order_totals.wasm", "order-totals")?,
            ))
        })
        .await
        .context("compile task panicked")??
    };

    // Manifests: the ones in the tree, with these changes (also printed).
    let mut changes = Vec::new();
    let fresh_m = manifest(
        TRIVIAL_MANIFEST,
        args.concurrency,
        "plugins/trivial/spate.toml",
    )?;
    let mut warm_m = fresh_m.clone();
    warm_m.execution.mode = ExecutionMode::Warm;
    changes.push(format!(
        "trivial warm = plugins/trivial/spate.toml + [execution] mode = \"warm\" (max-events-per-instance {})",
        warm_m.execution.max_events_per_instance
    ));
    let mut native_m = fresh_m.clone();
    native_m.name = "native-trivial".into();
    changes.push(
        "native trivial = plugins/trivial/spate.toml with name = \"native-trivial\" (its own group and DLQ)"
            .into(),
    );
    let orders_m = manifest(
        ORDER_TOTALS_MANIFEST,
        args.concurrency,
        "plugins/order-totals/spate.toml",
    )?;
    match args.concurrency {
        Some(c) => changes.push(format!(
            "limits.concurrency = {c} in every manifest (--concurrency)"
        )),
        None => changes.push(format!(
            "limits.concurrency unchanged ({} trivial, {} order-totals)",
            fresh_m.limits.concurrency, orders_m.limits.concurrency
        )),
    }

    let info = |m: Manifest, hash: &str| Arc::new(PluginInfo::new(m, hash.to_string()));
    let trivial_fresh: Arc<dyn PluginVersion> =
        sandbox.plugin(&trivial.component, info(fresh_m.clone(), &trivial.hash))?;
    let trivial_warm: Arc<dyn PluginVersion> =
        sandbox.plugin(&trivial.component, info(warm_m, &trivial.hash))?;
    let orders: Arc<dyn PluginVersion> =
        sandbox.plugin(&order_totals.component, info(orders_m, &order_totals.hash))?;
    let native: Arc<dyn PluginVersion> =
        Arc::new(NativeTrivial::new(info(native_m, &"0".repeat(64))));

    let in_topic = fresh_m
        .subscriptions
        .first()
        .map(|s| s.topic.clone())
        .context("the trivial manifest subscribes to nothing")?;

    // Per-call costs first, while nothing else runs.
    let (services, _micro_dir) = micro::services(&root_path)?;
    let mut micros = Vec::new();
    let keyed_event = micro::event(&in_topic, "k-1", r#"{"seq":1}"#);
    let order_event = micro::event(
        "orders",
        "c-1",
        r#"{"order_id":"o-1","customer_id":"c-1","amount_cents":4999,"currency":"EUR","seq":1}"#,
    );
    for (label, version, reuse, event) in [
        (
            "trivial wasm, fresh",
            &trivial_fresh,
            Reuse::InstancePerCall,
            &keyed_event,
        ),
        (
            "trivial wasm, warm",
            &trivial_warm,
            Reuse::OneInstance,
            &keyed_event,
        ),
        (
            "native trivial",
            &native,
            Reuse::InstancePerCall,
            &keyed_event,
        ),
        (
            "order-totals wasm, fresh",
            &orders,
            Reuse::InstancePerCall,
            &order_event,
        ),
    ] {
        progress(&format!("microbenchmark: {label}"));
        let calls = if std::ptr::eq(event, &order_event) {
            // Each order call reads the state store (three misses): fewer calls.
            (args.micro_calls / 4).max(1)
        } else {
            args.micro_calls
        };
        micros
            .push(micro::run(label, version, reuse, &services, event, calls, MICRO_WARMUP).await?);
    }
    let median = |i: usize| micros.get(i).map(|m| m.median_ns).unwrap_or(0.0);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ratios = Ratios {
        wasm_fresh_over_native: ratio(median(0), median(2)),
        wasm_warm_over_native: ratio(median(1), median(2)),
    };
    progress("append floor");
    let (floor_p50, floor_p90) = harness::append_floor(&root_path, FLOOR_APPENDS).await?;

    let keyed = Workload::Keyed { keys: args.keys };
    let subjects = [
        Subject {
            label: "trivial wasm, fresh".into(),
            version: trivial_fresh,
            input_topic: in_topic.clone(),
            output_topic: "out".into(),
            workload: keyed.clone(),
            job: Job::OnePerInput,
            shadow: None,
        },
        Subject {
            label: "trivial wasm, warm".into(),
            version: trivial_warm,
            input_topic: in_topic.clone(),
            output_topic: "out".into(),
            workload: keyed.clone(),
            job: Job::OnePerInput,
            shadow: None,
        },
        Subject {
            label: "order-totals wasm, fresh".into(),
            version: orders,
            input_topic: "orders".into(),
            output_topic: "customer-totals".into(),
            workload: Workload::Orders {
                customers: args.customers,
            },
            job: Job::OnePerInput,
            shadow: None,
        },
        Subject {
            label: "native trivial".into(),
            version: native,
            input_topic: in_topic,
            output_topic: "out".into(),
            workload: keyed,
            job: Job::OnePerInput,
            shadow: None,
        },
    ];

    let settings = RunSettings {
        commit_interval: Duration::from_millis(args.commit_interval_ms),
    };
    let warmup = Duration::from_secs_f64((args.paced_secs / 5.0).min(0.5));
    let selected: Vec<&Subject> = subjects
        .iter()
        .filter(|s| {
            args.only
                .as_deref()
                .is_none_or(|only| s.label.contains(only))
        })
        .collect();
    // Throughput rounds interleave the handlers, so a slow spell of the shared machine
    // (its disk above all) hits every row instead of one.
    let mut rounds: Vec<Vec<harness::Throughput>> = selected.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds {
        for (subject, results) in selected.iter().zip(rounds.iter_mut()) {
            progress(&format!(
                "{}: throughput round {round}/{}, {} events",
                subject.label, args.rounds, args.events
            ));
            results.push(
                harness::throughput(subject, &root_path, &settings, args.events)
                    .await
                    .with_context(|| format!("{}: throughput run", subject.label))?,
            );
        }
    }
    let mut runs = Vec::new();
    for (subject, mut results) in selected.into_iter().zip(rounds) {
        progress(&format!(
            "{}: paced latency, {} events/s for {} s",
            subject.label, args.rate, args.paced_secs
        ));
        let latency = harness::latency(
            subject,
            &subject.workload,
            &root_path,
            &settings,
            args.rate,
            args.paced_secs,
            warmup,
        )
        .await
        .with_context(|| format!("{}: latency run", subject.label))?;
        let round_rates: Vec<f64> = results.iter().map(|t| t.events_per_second).collect();
        results.sort_by(|a, b| a.events_per_second.total_cmp(&b.events_per_second));
        let median = results.len() / 2;
        let throughput = results
            .into_iter()
            .nth(median)
            .context("no throughput rounds ran")?;
        runs.push(Run {
            label: subject.label.clone(),
            concurrency: subject.version.info().manifest.limits.concurrency,
            keys: subject.workload.keys(),
            throughput,
            round_rates,
            latency,
        });
    }

    Ok(Report {
        machine: machine(&parent),
        settings: Settings {
            throughput_events: args.events,
            throughput_rounds: args.rounds,
            throughput_batch: THROUGHPUT_BATCH,
            paced_rate: args.rate,
            paced_seconds: args.paced_secs,
            paced_warmup_seconds: warmup.as_secs_f64(),
            micro_calls: args.micro_calls,
            commit_interval_ms: args.commit_interval_ms,
            sandbox_max_memory_mb: SandboxConfig::new("").max_memory_bytes >> 20,
            sandbox_pool_instances: SandboxConfig::new("").pool_instances,
        },
        plugins: vec![trivial.load, order_totals.load],
        append_floor_p50_us: floor_p50.as_secs_f64() * 1e6,
        append_floor_p90_us: floor_p90.as_secs_f64() * 1e6,
        micro: micros,
        ratios,
        runs,
        manifest_changes: changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_embedded_options_and_the_subcommands_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["spate-bench", "--events", "7", "--only", "order"])
            .map_err(|e| e.to_string());
        assert!(
            matches!(&cli, Ok(c) if c.command.is_none() && c.embedded.events == 7),
            "{cli:?}"
        );
        // scripts/bench puts the subcommand first and --plugins-dir after it.
        let cli = Cli::try_parse_from([
            "spate-bench",
            "kafka",
            "--plugins-dir",
            "/p",
            "--events",
            "9",
            "--librdkafka",
            "linger.ms=5",
        ])
        .map_err(|e| e.to_string());
        assert!(
            matches!(&cli, Ok(c) if matches!(c.command, Some(Command::Kafka(_)))),
            "{cli:?}"
        );
        let cli = Cli::try_parse_from([
            "spate-bench",
            "count",
            "--plugins-dir",
            "/p",
            "--events",
            "20000",
            "--rounds",
            "1",
            "--json",
        ])
        .map_err(|e| e.to_string());
        assert!(
            matches!(&cli, Ok(c) if matches!(c.command, Some(Command::Count(_)))),
            "{cli:?}"
        );
    }
}
