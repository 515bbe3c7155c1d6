//! The bench's results, as a plain-text table or JSON.

use crate::harness::{Latency, Throughput};
use crate::micro::{Micro, Reuse};
use serde::Serialize;

/// Everything one run of the bench measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// What it was asked to do.
    pub settings: Settings,
    /// The plugins loaded.
    pub plugins: Vec<PluginLoad>,
    /// Median durable one-event append to an idle log, microseconds.
    pub append_floor_p50_us: f64,
    /// 90th percentile of the same, microseconds.
    pub append_floor_p90_us: f64,
    /// Per-call microbenchmarks.
    pub micro: Vec<Micro>,
    /// Median per-call cost ratios against the native handler.
    pub ratios: Ratios,
    /// Handlers driven through the dispatcher.
    pub runs: Vec<Run>,
    /// How each handler's manifest was changed from the one in `plugins/`.
    pub manifest_changes: Vec<String>,
}

/// The machine.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// Cores available to the process.
    pub cores: usize,
    /// CPU model, from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// Where the data directories were.
    pub data_root: String,
}

/// Settings of the run.
#[derive(Debug, Serialize)]
pub struct Settings {
    /// Events per throughput run.
    pub throughput_events: usize,
    /// Throughput runs per handler; the median is reported.
    pub throughput_rounds: usize,
    /// Events per `append` in throughput runs.
    pub throughput_batch: usize,
    /// Paced rate, events per second.
    pub paced_rate: f64,
    /// Paced run length, seconds.
    pub paced_seconds: f64,
    /// Paced warm-up excluded from latency, seconds.
    pub paced_warmup_seconds: f64,
    /// Calls per microbenchmark.
    pub micro_calls: usize,
    /// Dispatcher commit interval, milliseconds.
    pub commit_interval_ms: u64,
    /// Sandbox memory ceiling per instance slot, MiB.
    pub sandbox_max_memory_mb: usize,
    /// Sandbox pool slots.
    pub sandbox_pool_instances: u32,
}

/// One loaded plugin.
#[derive(Debug, Serialize)]
pub struct PluginLoad {
    /// Plugin name.
    pub name: String,
    /// Component file.
    pub path: String,
    /// Component size, bytes.
    pub bytes: usize,
    /// Compile and world check time, milliseconds.
    pub compile_ms: f64,
}

/// Per-call cost ratios.
#[derive(Debug, Serialize)]
pub struct Ratios {
    /// Median fresh Wasm call over median native call.
    pub wasm_fresh_over_native: f64,
    /// Median warm Wasm call over median native call.
    pub wasm_warm_over_native: f64,
}

/// One handler through the dispatcher.
#[derive(Debug, Serialize)]
pub struct Run {
    /// Row label.
    pub label: String,
    /// `limits.concurrency` of its manifest.
    pub concurrency: u32,
    /// Distinct keys in its workload.
    pub keys: u32,
    /// The median throughput round (by events per second).
    pub throughput: Throughput,
    /// Events per second of every round, in the order they ran.
    pub round_rates: Vec<f64>,
    /// Paced latency run.
    pub latency: Latency,
}

/// The paragraph printed under the tables.
const HOW_TO_READ: &str = "
How to read this: the first table is the price of the sandbox alone: a fresh Wasm
instance per event (the default) against a reused (warm) one and the same logic in
native Rust, called in a loop with no dispatcher and no storage; the ratios say how
many native calls one Wasm call costs. The second table runs each handler through the
whole embedded path: `events/s` is N events appended as fast as the log takes them,
divided by the time until the last output is visible to a subscriber (CPU s is the
whole process, producer and observer included, so ev/CPU-s is what one core buys), and
p50/p90/p99/max are per-event times from the start of the input's append to its output
being readable, at a paced rate that is a small fraction of the throughput, so they are
mostly service time, not queueing. Every event pays at least two durable appends on the
log's single writer thread (its input and its emit; order-totals also a state write on
the state store's writer), see the append floor: when the dispatcher rows sit close
together while the per-call costs differ by 10x or more, the sandbox is not the
bottleneck; storage, hand-offs and per-key ordering are. `wflow` counts review
workflows started, `dlq` dead letters (expected 0; a dead-lettered event counts as done
for the throughput clock, and `!` gives the first reason). `*` marks a timed-out run.
";

/// `ns` as ns, µs or ms with three significant digits.
fn human_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

fn human_us(us: f64) -> String {
    human_ns(us * 1e3)
}

impl Report {
    /// The plain-text table and the note on how to read it.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let s = &self.settings;
        o.push_str(
            "Spate bench: the embedded path (EmbeddedLog + EmbeddedStateStore + MokaCache,\n",
        );
        o.push_str(
            "the real dispatcher Pipeline, wasmtime 48 sandbox), everything in-process.\n\n",
        );
        o.push_str(&format!(
            "machine: {} cores{}; ONE NOISY SHARED MACHINE: compare rows of this run with each\n         other, not with runs elsewhere or at other times.\n",
            m.cores,
            m.cpu_model
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        ));
        o.push_str(&format!(
            "data:    fresh temporary directories under {}\n",
            m.data_root
        ));
        o.push_str(&format!(
            "sandbox: pooling allocator, {} slots, {} MiB memory ceiling per slot (server defaults)\n",
            s.sandbox_pool_instances, s.sandbox_max_memory_mb
        ));
        for p in &self.plugins {
            o.push_str(&format!(
                "plugin:  {} ({} bytes, compiled in {:.0} ms) from {}\n",
                p.name, p.bytes, p.compile_ms, p.path
            ));
        }
        o.push_str(&format!(
            "runs:    throughput = {} events appended in batches of {}, median of {} interleaved rounds;\n         latency = {:.0} events/s paced for {:.1} s (first {:.1} s excluded as warm-up);\n         commit interval {} ms, other dispatch settings at their defaults\n",
            s.throughput_events,
            s.throughput_batch,
            s.throughput_rounds,
            s.paced_rate,
            s.paced_seconds,
            s.paced_warmup_seconds,
            s.commit_interval_ms
        ));
        for c in &self.manifest_changes {
            o.push_str(&format!("manifest: {c}\n"));
        }

        o.push_str(
            "\nPer-call cost, no dispatcher, journal not applied (timed calls after 500 untimed)\n",
        );
        o.push_str(&format!(
            "  {:<26} {:<21} {:>6} {:>10} {:>10} {:>10} {:>8}\n",
            "handler", "loop", "calls", "median", "p99", "mean", "/native"
        ));
        let native = self
            .micro
            .iter()
            .find(|x| x.label.starts_with("native"))
            .map(|x| x.median_ns)
            .unwrap_or(0.0);
        for x in &self.micro {
            let reuse = match x.reuse {
                Reuse::InstancePerCall => "instance()+call()",
                Reuse::OneInstance => "one instance, call()",
            };
            // Only the trivial rows run the same logic as the native handler.
            let ratio = if native > 0.0
                && (x.label.starts_with("trivial") || x.label.starts_with("native"))
            {
                format!("{:.1}x", x.median_ns / native)
            } else {
                "-".into()
            };
            o.push_str(&format!(
                "  {:<26} {:<21} {:>6} {:>10} {:>10} {:>10} {:>8}\n",
                x.label,
                reuse,
                x.calls,
                human_ns(x.median_ns),
                human_ns(x.p99_ns),
                human_ns(x.mean_ns),
                ratio
            ));
        }
        o.push_str(&format!(
            "  ratios (medians): wasm fresh / native = {:.1}x, wasm warm / native = {:.1}x\n",
            self.ratios.wasm_fresh_over_native, self.ratios.wasm_warm_over_native
        ));
        o.push_str(&format!(
            "  durable append of 1 event to an idle log: p50 {}, p90 {}\n",
            human_us(self.append_floor_p50_us),
            human_us(self.append_floor_p90_us)
        ));

        o.push_str("\nThrough the dispatcher (append -> Pipeline -> handler -> emit -> visible to a subscriber)\n");
        o.push_str(&format!(
            "  {:<26} {:>4} {:>5} | {:>9} {:>6} {:>9} | {:>7} {:>9} {:>9} {:>9} {:>9} | {:>5} {:>4}\n",
            "handler", "conc", "keys", "events/s", "CPU s", "ev/CPU-s", "rate", "p50", "p90", "p99", "max", "wflow", "dlq"
        ));
        o.push_str(&format!(
            "  {:<26} {:>4} {:>5} | {:^26} | {:^47} |\n",
            "", "", "", "throughput run", "paced latency run"
        ));
        for r in &self.runs {
            let t = &r.throughput;
            let l = &r.latency;
            let eps = if t.complete {
                format!("{:.0}", t.events_per_second)
            } else {
                format!("{:.0}*", t.events_per_second)
            };
            let (cpu, per_cpu) = match t.cpu_seconds {
                Some(c) if c > 0.0 => (format!("{c:.2}"), format!("{:.0}", t.outputs as f64 / c)),
                _ => ("-".into(), "-".into()),
            };
            o.push_str(&format!(
                "  {:<26} {:>4} {:>5} | {:>9} {:>6} {:>9} | {:>7.0} {:>9} {:>9} {:>9} {:>9} | {:>5} {:>4}\n",
                r.label,
                r.concurrency,
                r.keys,
                eps,
                cpu,
                per_cpu,
                l.achieved_rate,
                human_us(l.p50_us),
                human_us(l.p90_us),
                human_us(l.p99_us),
                human_us(l.max_us),
                t.workflows + l.workflows,
                t.dead_letters + l.dead_letters,
            ));
        }
        for r in &self.runs {
            let t = &r.throughput;
            let l = &r.latency;
            if !t.complete || l.missing as u64 > l.dead_letters {
                o.push_str(&format!(
                    "  * {}: {} of {} throughput outputs seen before the timeout; {} of {} paced outputs missing\n",
                    r.label, t.outputs, t.events, l.missing, l.events
                ));
            }
            if let Some(reason) = t
                .dead_letter_reason
                .as_ref()
                .or(l.dead_letter_reason.as_ref())
            {
                o.push_str(&format!(
                    "  ! {}: {} + {} events dead-lettered (throughput + paced), first because {reason}\n",
                    r.label, t.dead_letters, l.dead_letters
                ));
            }
        }
        o.push_str("  throughput rounds (events/s, in run order):\n");
        for r in &self.runs {
            let rates: Vec<String> = r.round_rates.iter().map(|x| format!("{x:.0}")).collect();
            o.push_str(&format!("    {:<26} {}\n", r.label, rates.join("  ")));
        }
        o.push_str(
            "  paced runs, where the time goes: the input's own durable append, then the rest\n",
        );
        o.push_str(
            "  (wake-up, fetch, key lane, handler, emit append, observer wake-up and read):\n",
        );
        for r in &self.runs {
            let l = &r.latency;
            o.push_str(&format!(
                "    {:<26} input append p50 {:>9}  p99 {:>9}   rest ~p50 {:>9}\n",
                r.label,
                human_us(l.append_p50_us),
                human_us(l.append_p99_us),
                human_us((l.p50_us - l.append_p50_us).max(0.0)),
            ));
        }
        for r in &self.runs {
            let (t, l) = (&r.throughput, &r.latency);
            if t.workflows + l.workflows > 0 {
                o.push_str(&format!(
                    "  workflows fired by {}: {} for {} orders (throughput run), {} for {} (paced run)\n",
                    r.label, t.workflows, t.events, l.workflows, l.events
                ));
            }
        }

        o.push_str(HOW_TO_READ);
        o
    }
}
