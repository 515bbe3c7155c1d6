//! Shadow versions: a candidate version runs on the events the active version handles, at
//! the same positions, in capture mode (nothing applied, emitted or committed), and how
//! its effects differ from the active version's is reported.
//!
//! The candidate gets the inputs the active version got: every key the active call read
//! is served the value it read ([`Capture::run`] with the active call's reads), so a
//! difference is the code's, not a state that moved on. It runs beside the lanes, never in
//! them: one shadow call at a time per plugin, and only while its CPU budget lasts (a
//! token bucket refilled at `share` seconds of call time per second, so at most that share
//! of one core), so the active version is never held up; events over the budget are
//! counted as skipped.
//!
//! Each runtime compares the events of its own partitions. So that any runtime can answer
//! for the cluster, each one publishes its report to the state store ([`publish`], every
//! second while a candidate runs) and a report is the sum of every runtime's
//! ([`cluster_report`]). Layout, in the reserved namespace `_spate/shadow/<plugin>`:
//! `<candidate>@<set at, Unix ms>/<instance>` = that runtime's report as JSON, with a TTL of
//! a week. The [generation] (`<candidate>@<set at>`) comes from the registry, so a report a
//! runtime publishes late, after the candidate was stopped, never counts for a later run.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use spate_core::host::HostServices;
use spate_core::host::capture::Capture;
use spate_core::host::record::{Diff, EffectRecord, Outcome};
use spate_core::metric_names;
use spate_core::plugin::PluginVersion;
use spate_core::types::Event;
use spate_core::{BackendError, BackendResult, StateStore, StateWrite};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Divergences a report keeps with their diffs (the first ones).
pub const KEPT_DIVERGENCES: usize = 20;

/// The most call time the budget saves up (a burst after an idle spell).
const MAX_SAVED: Duration = Duration::from_millis(10);

/// How a candidate compares with the active version so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    /// The plugin.
    pub plugin: String,
    /// The candidate version.
    pub candidate: String,
    /// Since when it runs (Unix ms).
    pub since_ms: u64,
    /// The share of one core its calls may take.
    pub cpu_share: f64,
    /// Events both versions handled and that were compared.
    pub compared: u64,
    /// Of those, events whose effects were the same.
    pub identical: u64,
    /// Events whose effects or outcome differed.
    pub differing: u64,
    /// Events the candidate failed on (a trap, retry or reject) while the active version
    /// did not; counted in `differing` too.
    pub traps: u64,
    /// Events not compared (each once, however many attempts it took): the CPU budget was
    /// spent, or a shadow call was running.
    pub skipped: u64,
    /// The first divergences, with both records and the diff.
    pub divergences: Vec<Divergence>,
    /// The runtimes (instance ids) whose comparisons are summed here.
    #[serde(default)]
    pub runtimes: Vec<String>,
}

impl ShadowReport {
    /// Add `other`'s comparisons (another runtime's, of the same candidate) to these.
    fn absorb(&mut self, other: ShadowReport) {
        if self.since_ms == 0 || (other.since_ms != 0 && other.since_ms < self.since_ms) {
            self.since_ms = other.since_ms;
        }
        self.compared += other.compared;
        self.identical += other.identical;
        self.differing += other.differing;
        self.traps += other.traps;
        self.skipped += other.skipped;
        let room = KEPT_DIVERGENCES.saturating_sub(self.divergences.len());
        self.divergences
            .extend(other.divergences.into_iter().take(room));
        self.runtimes.extend(other.runtimes);
    }
}

/// One event on which the candidate differed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Divergence {
    /// What the active version did.
    pub active: EffectRecord,
    /// What the candidate would have done.
    pub candidate: EffectRecord,
    /// How they differ.
    pub diff: Diff,
}

/// Call time a plugin's shadow may still spend, in seconds: negative while a call took
/// more than was left (the debt is paid before the next one).
struct Budget {
    available: f64,
    refilled: Instant,
}

/// A plugin's shadow candidate (if any), its budget and report; shared by its pipelines.
pub struct Shadow {
    candidate: arc_swap::ArcSwapOption<Arc<dyn PluginVersion>>,
    share: f64,
    budget: Mutex<Budget>,
    running: AtomicBool,
    report: Mutex<ShadowReport>,
    /// Events not compared (an atomic: the check every event of a shadowed plugin makes).
    skipped: AtomicU64,
    skipped_total: Mutex<Option<metrics::Counter>>,
}

/// The right to run one shadow call: the running flag is held until it is spent, or
/// released if the active call does not end in a comparison.
pub(crate) struct Ticket {
    shadow: Arc<Shadow>,
    spent: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.spent {
            self.shadow.running.store(false, Ordering::Release);
        }
    }
}

impl Ticket {
    /// Compare the candidate with what the active version did to `event` (`active`, its
    /// record, with the reads it made), in a task of its own.
    pub(crate) fn compare(mut self, services: &HostServices, event: &Event, active: EffectRecord) {
        let Some(candidate) = self.shadow.candidate() else {
            return;
        };
        self.spent = true;
        let (shadow, services, event) = (Arc::clone(&self.shadow), services.clone(), event.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            // A capture of its own per event: nothing carries over between events but what
            // the active version applied.
            let capture = Capture::new(&services);
            let mine = capture.run(&candidate, &event, Some(&active)).await;
            shadow.spend(started.elapsed());
            shadow.record(active, mine);
        });
    }
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("candidate", &self.report.lock().candidate)
            .field("share", &self.share)
            .finish_non_exhaustive()
    }
}

impl Shadow {
    /// No candidate; calls may take `share` of one core once there is one.
    pub fn new(share: f64) -> Self {
        Self {
            candidate: arc_swap::ArcSwapOption::empty(),
            share: share.clamp(0.0, 1.0),
            budget: Mutex::new(Budget {
                available: 0.0,
                refilled: Instant::now(),
            }),
            running: AtomicBool::new(false),
            report: Mutex::default(),
            skipped: AtomicU64::new(0),
            skipped_total: Mutex::default(),
        }
    }

    /// Run `candidate` beside the active version from now on (`None`: stop), with a new
    /// report.
    pub fn set(&self, plugin: &str, candidate: Option<Arc<dyn PluginVersion>>) {
        let same = match (&candidate, self.candidate.load().as_ref()) {
            (Some(new), Some(old)) => Arc::ptr_eq(new, old),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        *self.report.lock() = ShadowReport {
            plugin: plugin.to_owned(),
            candidate: candidate
                .as_ref()
                .map(|c| c.info().manifest.version.to_string())
                .unwrap_or_default(),
            since_ms: now_ms(),
            cpu_share: self.share,
            ..ShadowReport::default()
        };
        self.skipped.store(0, Ordering::Relaxed);
        *self.skipped_total.lock() = Some(
            metrics::counter!(metric_names::SHADOW_EVENTS_TOTAL, "plugin" => plugin.to_owned(), "result" => "skipped"),
        );
        self.candidate.store(candidate.map(Arc::new));
    }

    /// The candidate, if one runs.
    pub fn candidate(&self) -> Option<Arc<dyn PluginVersion>> {
        self.candidate.load_full().map(|c| Arc::clone(&*c))
    }

    /// Whether a candidate runs (one atomic load: what every event checks).
    pub fn is_on(&self) -> bool {
        self.candidate.load().is_some()
    }

    /// The report so far, if a candidate runs.
    pub fn report(&self) -> Option<ShadowReport> {
        self.is_on().then(|| {
            let mut r = self.report.lock().clone();
            r.skipped = self.skipped.load(Ordering::Relaxed);
            r
        })
    }

    /// The right to run a shadow call on the event about to be handled (one attempt of
    /// it), if a candidate runs, none of its calls is running and the budget has time
    /// left. Cheap when it says no: one or two atomics. An event that ends without a
    /// comparison is counted by [`Shadow::passed_over`], once, however many attempts it
    /// took.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Ticket> {
        if !self.is_on() || self.running.load(Ordering::Acquire) || !self.budget_left() {
            return None;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(Ticket {
            shadow: Arc::clone(self),
            spent: false,
        })
    }

    /// An event ended (handled or failed for good) without a comparison: counted as
    /// skipped while a candidate runs.
    pub(crate) fn passed_over(&self) {
        if !self.is_on() {
            return;
        }
        self.skipped.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &*self.skipped_total.lock() {
            c.increment(1);
        }
    }

    fn budget_left(&self) -> bool {
        let mut b = self.budget.lock();
        let now = Instant::now();
        let earned = now.duration_since(b.refilled).as_secs_f64() * self.share;
        b.available = (b.available + earned).min(MAX_SAVED.as_secs_f64());
        b.refilled = now;
        b.available > 0.0
    }

    fn spend(&self, took: Duration) {
        let mut b = self.budget.lock();
        b.available -= took.as_secs_f64();
        drop(b);
        self.running.store(false, Ordering::Release);
    }

    fn record(&self, active: EffectRecord, candidate: EffectRecord) {
        let diff = active.diff(&candidate);
        let trap = matches!(candidate.outcome, Outcome::Failed { .. })
            && !matches!(active.outcome, Outcome::Failed { .. });
        let result = if diff.is_same() {
            "identical"
        } else if trap {
            "trap"
        } else {
            "differing"
        };
        let mut r = self.report.lock();
        metrics::counter!(metric_names::SHADOW_EVENTS_TOTAL, "plugin" => r.plugin.clone(), "result" => result).increment(1);
        r.compared += 1;
        if diff.is_same() {
            r.identical += 1;
            return;
        }
        r.differing += 1;
        if trap {
            r.traps += 1;
        }
        if r.divergences.len() < KEPT_DIVERGENCES {
            r.divergences.push(Divergence {
                active,
                candidate,
                diff,
            });
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How long a published report outlives its last update (a runtime that stopped, or a
/// candidate whose reports were not [forgotten](forget)).
pub const PUBLISHED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most bytes one published report takes: divergences past it are left out (the
/// counts always stay).
pub const PUBLISHED_MAX_BYTES: usize = 256 * 1024;

/// Where the runtimes keep plugin `plugin`'s shadow reports.
pub fn namespace(plugin: &str) -> String {
    format!(
        "{}/shadow/{plugin}",
        spate_core::manifest::RESERVED_NAMESPACE_PREFIX
    )
}

/// What a candidate's reports are kept under: its version and when the registry set it.
pub fn generation(candidate: &str, since_ms: u64) -> String {
    format!("{candidate}@{since_ms}")
}

/// Store this runtime's (`instance`'s) report on the candidate of `generation` for the
/// others to sum.
pub async fn publish(
    store: &dyn StateStore,
    instance: &str,
    generation: &str,
    report: &ShadowReport,
) -> BackendResult<()> {
    let mut report = report.clone();
    report.runtimes = vec![instance.to_owned()];
    let mut value = to_json(&report)?;
    while value.len() > PUBLISHED_MAX_BYTES && !report.divergences.is_empty() {
        let keep = report.divergences.len() / 2;
        report.divergences.truncate(keep);
        value = to_json(&report)?;
    }
    let write = StateWrite {
        key: format!("{generation}/{instance}"),
        value: Some(value),
        ttl: Some(PUBLISHED_TTL),
        condition: None,
    };
    store
        .apply(&namespace(&report.plugin), std::slice::from_ref(&write))
        .await?;
    Ok(())
}

fn to_json(report: &ShadowReport) -> BackendResult<Vec<u8>> {
    serde_json::to_vec(report)
        .map_err(|e| BackendError::Corrupt(format!("a shadow report does not encode: {e}")))
}

/// The cluster's report on the candidate of `generation`: the sum of every runtime's
/// published report, with this runtime's (`instance`) taken live from `local` (its
/// published copy may be a second old). Reports that no longer decode are left out.
pub async fn cluster_report(
    store: &dyn StateStore,
    instance: &str,
    generation: &str,
    mut local: ShadowReport,
) -> BackendResult<ShadowReport> {
    let prefix = format!("{generation}/");
    local.runtimes = vec![instance.to_owned()];
    let published = store
        .scan(&namespace(&local.plugin), &prefix, MAX_RUNTIMES)
        .await?;
    for (key, value) in published {
        if &key[prefix.len()..] == instance {
            continue;
        }
        match serde_json::from_slice::<ShadowReport>(&value) {
            Ok(other) => local.absorb(other),
            Err(e) => {
                tracing::warn!(plugin = %local.plugin, %key, error = %e, "a published shadow report does not decode; left out")
            }
        }
    }
    local.runtimes.sort();
    Ok(local)
}

/// Most runtimes' reports one cluster report sums.
const MAX_RUNTIMES: u32 = 1_000;

/// Drop the published reports of `plugin`'s candidates but the one of generation `keep`
/// (the candidate running now, if any).
pub async fn forget(store: &dyn StateStore, plugin: &str, keep: Option<&str>) -> BackendResult<()> {
    let ns = namespace(plugin);
    let kept = keep.map(|g| format!("{g}/"));
    let deletes: Vec<StateWrite> = store
        .scan(&ns, "", MAX_RUNTIMES * 10)
        .await?
        .into_iter()
        .filter(|(key, _)| kept.as_deref().is_none_or(|k| !key.starts_with(k)))
        .map(|(key, _)| StateWrite {
            key,
            value: None,
            ttl: None,
            condition: None,
        })
        .collect();
    if !deletes.is_empty() {
        store.apply(&ns, &deletes).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use spate_core::host::record::{Bytes, EmitEffect};
    use spate_core::state::EmbeddedStateStore;

    const G: &str = "2.0.0@42";

    fn record(offset: u64, payload: &str) -> EffectRecord {
        EffectRecord {
            topic: "in".into(),
            partition: 0,
            offset,
            key: None,
            timestamp_ms: 0,
            version: "1".into(),
            outcome: Outcome::Ok,
            attempts: 1,
            state: Vec::new(),
            cache: Vec::new(),
            emits: vec![EmitEffect {
                topic: "out".into(),
                key: None,
                payload: Bytes::Text(payload.into()),
                headers: Default::default(),
            }],
            reads: None,
            effects_sha256: None,
        }
    }

    fn report(compared: u64, differing: u64, since_ms: u64, payload: &str) -> ShadowReport {
        let divergences = (0..differing)
            .map(|i| {
                let (active, candidate) = (record(i, "a"), record(i, payload));
                let diff = active.diff(&candidate);
                Divergence {
                    active,
                    candidate,
                    diff,
                }
            })
            .collect();
        ShadowReport {
            plugin: "p".into(),
            candidate: "2.0.0".into(),
            since_ms,
            cpu_share: 0.05,
            compared,
            identical: compared - differing,
            differing,
            traps: 0,
            skipped: 7,
            divergences,
            runtimes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_cluster_report_sums_every_runtime_and_takes_its_own_live() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStateStore::open(dir.path()).unwrap();
        publish(&*store, "r1", G, &report(10, 2, 300, "b"))
            .await
            .unwrap();
        publish(&*store, "r2", G, &report(20, 15, 200, "b"))
            .await
            .unwrap();
        // Its own stale copy is replaced by the live report.
        publish(&*store, "me", G, &report(1, 0, 100, "b"))
            .await
            .unwrap();
        // Another candidate's report, or the same candidate's from an earlier run, is
        // not summed.
        let mut other = report(1_000, 0, 1, "b");
        other.candidate = "3.0.0".into();
        publish(&*store, "r3", &generation("3.0.0", 1), &other)
            .await
            .unwrap();
        let earlier = generation("2.0.0", 1);
        publish(&*store, "r4", &earlier, &report(1_000, 0, 1, "b"))
            .await
            .unwrap();

        let sum = cluster_report(&*store, "me", G, report(5, 5, 250, "b"))
            .await
            .unwrap();
        assert_eq!(
            (sum.compared, sum.identical, sum.differing, sum.skipped),
            (35, 13, 22, 21)
        );
        assert_eq!(sum.since_ms, 200);
        assert_eq!(sum.runtimes, ["me", "r1", "r2"]);
        assert_eq!(sum.divergences.len(), KEPT_DIVERGENCES);

        // Forgetting the others keeps this run's.
        forget(&*store, "p", Some(G)).await.unwrap();
        let left = store.scan(&namespace("p"), "", 10).await.unwrap();
        assert_eq!(left.len(), 3, "{left:?}");
        forget(&*store, "p", None).await.unwrap();
        assert!(
            store
                .scan(&namespace("p"), "", 10)
                .await
                .unwrap()
                .is_empty()
        );
        let alone = cluster_report(&*store, "me", G, report(5, 0, 250, "b"))
            .await
            .unwrap();
        assert_eq!((alone.compared, alone.runtimes.len()), (5, 1));
    }

    #[tokio::test]
    async fn a_published_report_keeps_its_counts_within_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStateStore::open(dir.path()).unwrap();
        let big = "x".repeat(40_000);
        publish(&*store, "r1", G, &report(30, 20, 1, &big))
            .await
            .unwrap();
        let stored = store.scan(&namespace("p"), "", 10).await.unwrap();
        assert_eq!(stored[0].0, "2.0.0@42/r1");
        assert!(
            stored[0].1.len() <= PUBLISHED_MAX_BYTES,
            "{}",
            stored[0].1.len()
        );
        let back: ShadowReport = serde_json::from_slice(&stored[0].1).unwrap();
        assert_eq!((back.compared, back.differing), (30, 20));
        assert!(!back.divergences.is_empty() && back.divergences.len() < 20);
    }
}
