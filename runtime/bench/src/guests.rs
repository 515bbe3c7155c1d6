//! `spate-bench guests`: what a handler's language costs, measured on the example plugin in
//! Rust, Python and JavaScript (`plugins/order-totals{,-py,-js}`; `scripts/bench guests`
//! builds the three components).
//!
//! For each language it prints the component's size; the upload-to-serving time (validate,
//! compile, store and activate through the registry, as `POST /v1/plugins` does); the time
//! a restart takes to serve it again from the compiled-artifact cache; the per-event cost
//! with a fresh instance (instantiate + handle one order, the journal dropped) and with a
//! reused one; and the smallest `memory-mb` the order succeeds with.

use anyhow::{Context, Result, bail};
use spate_core::host::{HostServices, Invocation, PluginInfo};
use spate_core::manifest::{LimitCeilings, Manifest};
use spate_core::plugin::{CallOutcome, PluginVersion};
use spate_core::{cache::MokaCache, state::EmbeddedStateStore};
use spate_engine::{Registry, Sandbox, SandboxConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The order every call handles: a first order of a customer without a profile, so it
/// reads state and the cache, writes state, and emits one update.
const ORDER: &str =
    r#"{"order_id":"o-1","customer_id":"c-1","amount_cents":4999,"currency":"EUR"}"#;
/// The server's default upload limit (`api.max-upload-bytes`).
const MAX_UPLOAD_BYTES: usize = 64 << 20;

/// Options of `spate-bench guests`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Calls measured per language and instance kind (after a tenth as many to warm up).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    calls: u64,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
    /// The Rust component (`plugins/order-totals`, built for wasm32-wasip2).
    #[arg(long)]
    rust: PathBuf,
    /// The Python component (`sdk/python/build.py plugins/order-totals-py/handler.py`).
    #[arg(long)]
    python: PathBuf,
    /// The JavaScript component (`sdk/js/build.mjs plugins/order-totals-js/handler.js`).
    #[arg(long)]
    js: PathBuf,
}

/// The manifest of `plugins/<dir>`, as in the tree.
fn manifest_of(dir: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../plugins")
        .join(dir)
        .join("spate.toml");
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// One language's figures.
#[derive(Debug)]
struct Row {
    lang: &'static str,
    size: usize,
    upload: Duration,
    restart: Duration,
    fresh_median: Duration,
    fresh_p99: Duration,
    warm_median: Duration,
    min_memory_mb: Option<u64>,
}

/// Measures the three languages and prints the table.
pub async fn run(args: Args) -> Result<()> {
    let calls = usize::try_from(args.calls)?;
    let examples = [
        ("Rust", &args.rust, manifest_of("order-totals")?),
        ("Python", &args.python, manifest_of("order-totals-py")?),
        ("JavaScript", &args.js, manifest_of("order-totals-js")?),
    ];
    let root = tempfile::Builder::new()
        .prefix("spate-bench-guests-")
        .tempdir()
        .context("creating a temporary directory")?;
    let mut rows = Vec::new();
    for (lang, path, manifest) in &examples {
        eprintln!("spate-bench guests: {lang} ({})", path.display());
        rows.push(measure(lang, path, manifest, &root.path().join(lang), calls).await?);
    }
    if args.json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "lang": r.lang,
                    "component_bytes": r.size,
                    "upload_to_serving_ms": ms(r.upload),
                    "restart_from_cache_ms": ms(r.restart),
                    "fresh_instance_median_us": us(r.fresh_median),
                    "fresh_instance_p99_us": us(r.fresh_p99),
                    "reused_instance_median_us": us(r.warm_median),
                    "min_memory_mb": r.min_memory_mb,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "| language | component | upload to serving (compile) | restart from cache | per event, fresh instance (median / p99) | per event, reused instance | smallest memory-mb |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.1} MB | {:.0} ms | {:.0} ms | {:.0} µs / {:.0} µs | {:.0} µs | {} |",
            r.lang,
            r.size as f64 / 1e6,
            ms(r.upload),
            ms(r.restart),
            us(r.fresh_median),
            us(r.fresh_p99),
            us(r.warm_median),
            r.min_memory_mb
                .map_or_else(|| "> 64".to_string(), |m| m.to_string()),
        );
    }
    println!(
        "\n{} calls each, one order event, journal dropped (no storage in the figures); {} cores; release build.",
        calls,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn sandbox(dir: &Path) -> Result<Arc<Sandbox>> {
    // The runtime's defaults: the manifests' memory ceiling per pool slot, the default pool.
    Sandbox::new(SandboxConfig::new(dir.join("compiled"))).context("starting the sandbox")
}

async fn measure(
    lang: &'static str,
    path: &Path,
    manifest: &str,
    dir: &Path,
    calls: usize,
) -> Result<Row> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let size = bytes.len();
    let ceilings = LimitCeilings::default();
    let registry_dir = dir.join("plugins");

    // Upload to serving: what `POST /v1/plugins?activate=true` does after reading the body.
    let upload = {
        let registry = Registry::open(
            sandbox(dir)?,
            spate_engine::LocalStore::open(&registry_dir)?,
            None,
            ceilings.clone(),
            MAX_UPLOAD_BYTES,
        )
        .await?;
        let started = Instant::now();
        let outcome = registry.upload(manifest, bytes.clone(), true).await?;
        let took = started.elapsed();
        if !outcome.active || outcome.compile_ms == 0 {
            bail!("{lang}: the upload was not compiled and activated: {outcome:?}");
        }
        took
    };

    // Restart: a new engine and registry on the same directory, active version from cache.
    let started = Instant::now();
    let sandbox = sandbox(dir)?;
    let registry = Registry::open(
        Arc::clone(&sandbox),
        spate_engine::LocalStore::open(&registry_dir)?,
        None,
        ceilings.clone(),
        MAX_UPLOAD_BYTES,
    )
    .await?;
    let parsed = Manifest::parse(manifest, &ceilings)?;
    let version = registry
        .active(&parsed.name)
        .with_context(|| format!("{lang}: not active after the restart"))?;
    let restart = started.elapsed();
    // The same compiled component, for binding to other manifests below (from the cache).
    let hash = spate_engine::registry::content_hash(&bytes);
    let component = sandbox.load_cached(&hash, &bytes)?;

    let state = EmbeddedStateStore::open(&dir.join("state")).context("opening state")?;
    let services = HostServices {
        state,
        cache: Arc::new(MokaCache::new(1 << 20)),
        workflow_topic: "workflows".into(),
    };
    let event = Arc::new(spate_core::Event {
        topic: "orders".into(),
        partition: 0,
        offset: 0,
        key: Some(b"c-1".to_vec()),
        payload: ORDER.as_bytes().to_vec(),
        headers: Vec::new(),
        timestamp_ms: 0,
    });

    let warmup = calls / 10 + 1;
    let mut fresh = Vec::with_capacity(calls);
    for i in 0..warmup + calls {
        let inv = Invocation::new(
            Arc::clone(version.info()),
            services.clone(),
            Arc::clone(&event),
        );
        let started = Instant::now();
        let result = version.instance().call(inv).await;
        let took = started.elapsed();
        check(lang, i, &result)?;
        if i >= warmup {
            fresh.push(took);
        }
    }
    fresh.sort_unstable();

    let mut warm = Vec::with_capacity(calls);
    let mut warm_manifest = parsed.clone();
    warm_manifest.execution.mode = spate_core::manifest::ExecutionMode::Warm;
    warm_manifest.execution.max_events_per_instance = u32::MAX;
    let warm_version: Arc<dyn PluginVersion> = sandbox.plugin(
        &component,
        Arc::new(PluginInfo::new(warm_manifest, hash.clone())),
    )?;
    let mut instance = warm_version.instance();
    for i in 0..warmup + calls {
        let inv = Invocation::new(
            Arc::clone(warm_version.info()),
            services.clone(),
            Arc::clone(&event),
        );
        let started = Instant::now();
        let result = instance.call(inv).await;
        let took = started.elapsed();
        check(lang, i, &result)?;
        if i >= warmup {
            warm.push(took);
        }
    }
    warm.sort_unstable();

    // The smallest cap (in MiB steps of 4) with which a fresh instance handles the order.
    let mut min_memory_mb = None;
    for mb in (4..=64).step_by(4) {
        let mut m = parsed.clone();
        m.limits.memory_mb = mb;
        let v: Arc<dyn PluginVersion> =
            sandbox.plugin(&component, Arc::new(PluginInfo::new(m, hash.clone())))?;
        let inv = Invocation::new(Arc::clone(v.info()), services.clone(), Arc::clone(&event));
        if matches!(v.instance().call(inv).await, CallOutcome::Ok(_)) {
            min_memory_mb = Some(mb);
            break;
        }
    }

    Ok(Row {
        lang,
        size,
        upload,
        restart,
        fresh_median: fresh[fresh.len() / 2],
        fresh_p99: fresh[(fresh.len() * 99 / 100).min(fresh.len() - 1)],
        warm_median: warm[warm.len() / 2],
        min_memory_mb,
    })
}

fn check(lang: &str, i: usize, result: &CallOutcome) -> Result<()> {
    let emits = match result {
        CallOutcome::Ok(journal) => journal.emits.len(),
        _ => 0,
    };
    if !matches!(result, CallOutcome::Ok(_)) || emits != 1 {
        bail!("{lang}: call {i} ended {result:?} with {emits} emits, expected ok with 1");
    }
    Ok(())
}
