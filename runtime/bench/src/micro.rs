//! Per-call cost without the dispatcher: `PluginVersion::instance()` and
//! `Instance::call(Invocation)` in a tight loop on one task, timing each call.
//!
//! The journal a call returns is dropped, not applied, so this is the cost of the sandbox
//! (or native code) and the host API's journaling only, never of storage.

use crate::harness::percentile;
use anyhow::{Context, Result, bail};
use serde::Serialize;
use spate_core::Event;
use spate_core::host::{HostServices, Invocation};
use spate_core::plugin::{CallOutcome, Instance, PluginVersion};
use spate_core::{cache::MokaCache, state::EmbeddedStateStore};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How instances are used in a microbenchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reuse {
    /// `instance()` then `call()` on every iteration (what fresh mode costs per event).
    InstancePerCall,
    /// One `instance()`, then `call()` on every iteration; a warm-mode instance renews
    /// its sandbox every `max-events-per-instance` calls by itself.
    OneInstance,
}

/// Result of one microbenchmark.
#[derive(Clone, Debug, Serialize)]
pub struct Micro {
    /// Row label.
    pub label: String,
    /// How instances were used.
    pub reuse: Reuse,
    /// Calls timed.
    pub calls: usize,
    /// Median per call, nanoseconds.
    pub median_ns: f64,
    /// 99th percentile per call, nanoseconds.
    pub p99_ns: f64,
    /// Mean per call, nanoseconds.
    pub mean_ns: f64,
}

/// Services for the calls: a throwaway, empty state store and cache (the trivial
/// handlers touch neither; order-totals reads both and finds nothing).
pub fn services(root: &Path) -> Result<(HostServices, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix("spate-bench-micro-")
        .tempdir_in(root)
        .with_context(|| format!("creating a data dir under {}", root.display()))?;
    let state = EmbeddedStateStore::open(dir.path()).context("opening the state store")?;
    Ok((
        HostServices {
            state,
            cache: Arc::new(MokaCache::new(1 << 20)),
            workflow_topic: crate::harness::WORKFLOW_TOPIC.to_string(),
        },
        dir,
    ))
}

/// The event every call of a microbenchmark handles.
pub fn event(topic: &str, key: &str, payload: &str) -> Arc<Event> {
    Arc::new(Event {
        topic: topic.to_string(),
        partition: 0,
        offset: 0,
        key: Some(key.as_bytes().to_vec()),
        payload: payload.as_bytes().to_vec(),
        headers: Vec::new(),
        timestamp_ms: 0,
    })
}

/// Time `calls` calls of `version` on `event` (after `warmup` untimed ones). Every call
/// must end ok with at least one emit.
pub async fn run(
    label: &str,
    version: &Arc<dyn PluginVersion>,
    reuse: Reuse,
    services: &HostServices,
    event: &Arc<Event>,
    calls: usize,
    warmup: usize,
) -> Result<Micro> {
    let info = version.info();
    let mut kept: Box<dyn Instance> = version.instance();
    let mut samples = Vec::with_capacity(calls);
    let mut total = Duration::ZERO;
    for i in 0..warmup + calls {
        let invocation = Invocation::new(Arc::clone(info), services.clone(), Arc::clone(event));
        let start = Instant::now();
        let result = match reuse {
            Reuse::InstancePerCall => version.instance().call(invocation).await,
            Reuse::OneInstance => kept.call(invocation).await,
        };
        let took = start.elapsed();
        let CallOutcome::Ok(journal) = result else {
            bail!("{label}: call {i} ended {result:?}");
        };
        if journal.emits.len() != 1 {
            bail!(
                "{label}: call {i} emitted {} events, expected 1",
                journal.emits.len()
            );
        }
        if i >= warmup {
            samples.push(took);
            total += took;
        }
    }
    samples.sort_unstable();
    Ok(Micro {
        label: label.to_string(),
        reuse,
        calls,
        median_ns: percentile(&samples, 0.5).as_nanos() as f64,
        p99_ns: percentile(&samples, 0.99).as_nanos() as f64,
        mean_ns: if calls > 0 {
            total.as_nanos() as f64 / calls as f64
        } else {
            0.0
        },
    })
}
