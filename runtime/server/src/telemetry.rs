//! Process-wide telemetry: the Prometheus metrics recorder behind `GET /metrics` and the
//! `tracing` subscriber for logs.
//!
//! Both are global and installed at most once per process, so tests that build many
//! runtimes and routers in one process share them. Metric names and labels are the ones
//! the dispatcher records (low cardinality: plugin, outcome, kind, topic — never keys or
//! offsets).
//!
//! Gauges that name a plugin (`spate_consumer_lag`) are kept beside the Prometheus
//! registry, which cannot forget a series: [`forget_plugin`] drops them when the plugin's
//! pipelines stop, so a deleted plugin does not keep reporting its last lag.

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use parking_lot::Mutex;
use spate_core::metric_names::{self, Kind};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Histogram buckets for handler durations, in seconds: 50 µs up to 10 s.
pub const HANDLER_DURATION_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// How often histogram data is drained when nobody scrapes `/metrics`.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Gauges labelled by plugin that [`forget_plugin`] removes.
const PLUGIN_GAUGES: &[&str] = &[
    metric_names::CONSUMER_LAG,
    metric_names::PARKED_KEYS,
    metric_names::PARKED_EVENTS,
    metric_names::PARKED_OLDEST_SECONDS,
];

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics: renders the scrape text of `GET /metrics`.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    plugin_gauges: Arc<PluginGauges>,
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        self.plugin_gauges.render(&mut text);
        text
    }
}

/// The series of [`PLUGIN_GAUGES`], by key.
#[derive(Default)]
struct PluginGauges {
    series: Mutex<BTreeMap<Key, Arc<AtomicU64>>>,
}

impl PluginGauges {
    fn gauge(&self, key: &Key) -> Gauge {
        let mut series = self.series.lock();
        Gauge::from_arc(Arc::clone(series.entry(key.clone()).or_default()))
    }

    fn forget(&self, plugin: &str) {
        self.series.lock().retain(|key, _| {
            !key.labels()
                .any(|l| l.key() == "plugin" && l.value() == plugin)
        });
    }

    fn render(&self, out: &mut String) {
        let series = self.series.lock();
        for name in PLUGIN_GAUGES {
            let help = metric_names::ALL
                .iter()
                .find(|m| m.name == *name)
                .map_or("", |m| m.help);
            let mut of_name = series.iter().filter(|(k, _)| k.name() == *name).peekable();
            if of_name.peek().is_none() {
                continue;
            }
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (key, value) in of_name {
                let labels: Vec<String> = key
                    .labels()
                    .map(|l| format!("{}=\"{}\"", l.key(), escape_label(l.value())))
                    .collect();
                let value = f64::from_bits(value.load(Ordering::Acquire));
                let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
            }
            out.push('\n');
        }
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus recorder, with [`PLUGIN_GAUGES`] routed to [`PluginGauges`].
struct Recorder {
    inner: PrometheusRecorder,
    plugin_gauges: Arc<PluginGauges>,
}

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner.register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if PLUGIN_GAUGES.contains(&key.name()) {
            self.plugin_gauges.gauge(key)
        } else {
            self.inner.register_gauge(key, metadata)
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.inner.register_histogram(key, metadata)
    }
}

/// Remove every series of a plugin-labelled gauge (`spate_consumer_lag`) that names
/// `plugin`. Called once its pipelines have stopped (removed, or restarted on other
/// topics); running pipelines report again within a second.
pub fn forget_plugin(plugin: &str) {
    if let Some(m) = METRICS.get() {
        m.plugin_gauges.forget(plugin);
    }
}

/// Install the Prometheus recorder (first call only) and return a handle that renders
/// the scrape text. Later calls return the same handle.
///
/// If another recorder was installed first (say, by an embedding program), metrics
/// recorded through the `metrics` macros go there and this handle renders nothing; the
/// process keeps running either way.
pub fn metrics() -> Metrics {
    METRICS
        .get_or_init(|| {
            let builder = match PrometheusBuilder::new().set_buckets_for_metric(
                Matcher::Full("spate_handler_duration_seconds".into()),
                HANDLER_DURATION_BUCKETS,
            ) {
                Ok(b) => b,
                // Only fails for an empty bucket list, which the constant is not.
                Err(_) => PrometheusBuilder::new(),
            };
            let inner = builder.build_recorder();
            let handle = inner.handle();
            let plugin_gauges = Arc::new(PluginGauges::default());
            let recorder = Recorder {
                inner,
                plugin_gauges: Arc::clone(&plugin_gauges),
            };
            match metrics::set_global_recorder(recorder) {
                Ok(()) => describe(),
                Err(e) => tracing::warn!(error = %e, "a metrics recorder was already installed; /metrics will be empty"),
            }
            let upkeep = handle.clone();
            // Histograms buffer samples until upkeep drains them; without a scraper that
            // would grow without bound. A named thread keeps this independent of tokio.
            let spawned = std::thread::Builder::new()
                .name("spate-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start the metrics upkeep thread");
            }
            Metrics {
                handle,
                plugin_gauges,
            }
        })
        .clone()
}

/// HELP lines for every metric the runtime records ([`metric_names::ALL`]).
fn describe() {
    for m in metric_names::ALL {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// Install the `tracing` subscriber: human-readable logs to stderr, filtered by
/// `RUST_LOG` (default `info`). Does nothing if a subscriber is already installed.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn recorder_is_installed_once_and_renders_buckets_and_help() {
        let a = metrics();
        let b = metrics();
        metrics::histogram!("spate_handler_duration_seconds", "plugin" => "t").record(0.0002);
        metrics::counter!("spate_events_total", "plugin" => "t", "outcome" => "ok").increment(1);
        let text = b.render();
        assert!(text.contains("# HELP spate_events_total"), "{text}");
        assert!(
            text.contains("spate_handler_duration_seconds_bucket{plugin=\"t\",le=\"0.00025\"} 1"),
            "{text}"
        );
        assert_eq!(a.render().is_empty(), text.is_empty());
    }

    #[test]
    fn a_forgotten_plugin_loses_its_lag_series() {
        let m = metrics();
        metrics::gauge!("spate_consumer_lag", "plugin" => "gone", "topic" => "t").set(7.0);
        metrics::gauge!("spate_consumer_lag", "plugin" => "kept", "topic" => "t").set(3.0);
        let text = m.render();
        assert!(text.contains("# TYPE spate_consumer_lag gauge"), "{text}");
        assert!(
            text.contains("spate_consumer_lag{plugin=\"gone\",topic=\"t\"} 7"),
            "{text}"
        );
        forget_plugin("gone");
        let text = m.render();
        assert!(!text.contains("plugin=\"gone\""), "{text}");
        assert!(
            text.contains("spate_consumer_lag{plugin=\"kept\",topic=\"t\"} 3"),
            "{text}"
        );
    }
}
