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

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use spate_core::host::HostServices;
use spate_core::host::capture::Capture;
use spate_core::host::record::{Diff, EffectRecord, Outcome};
use spate_core::metric_names;
use spate_core::plugin::PluginVersion;
use spate_core::types::Event;
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
    /// Events not compared: the CPU budget was spent, or a shadow call was running.
    pub skipped: u64,
    /// The first divergences, with both records and the diff.
    pub divergences: Vec<Divergence>,
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

    /// The right to run a shadow call on the event about to be handled, if a candidate
    /// runs, none of its calls is running and the budget has time left; otherwise the
    /// event is counted as skipped. Cheap when it says no: one or two atomics.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Ticket> {
        if !self.is_on() {
            return None;
        }
        if self.running.load(Ordering::Acquire) || !self.budget_left() {
            self.skip();
            return None;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            self.skip();
            return None;
        }
        Some(Ticket {
            shadow: Arc::clone(self),
            spent: false,
        })
    }

    fn skip(&self) {
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
