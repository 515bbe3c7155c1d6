//! Counting each plugin's state reads: how many `get`s, how many reached the store, and
//! how the read-through cache answered (see the [tier's docs](super)).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one plugin's state reads (see [`StateTier::stats`](super::StateTier::stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    /// `get` calls.
    pub gets: u64,
    /// `get` calls that read the state store.
    pub store_reads: u64,
    /// `scan` calls (always served by the store).
    pub scans: u64,
    /// `get` calls answered by the cache.
    pub cache_hits: u64,
    /// `get` calls the cache could not answer.
    pub cache_misses: u64,
    /// Misses answered by another caller's store read of the same key (single flight).
    pub coalesced: u64,
    /// Cache calls that failed (a read counts as a miss; a failed update marks the key
    /// suspect).
    pub cache_errors: u64,
    /// `get` calls sent past the cache because its copy might be stale.
    pub bypassed: u64,
}

impl TierStats {
    pub(super) fn add(&mut self, o: &TierStats) {
        self.gets += o.gets;
        self.store_reads += o.store_reads;
        self.scans += o.scans;
        self.cache_hits += o.cache_hits;
        self.cache_misses += o.cache_misses;
        self.coalesced += o.coalesced;
        self.cache_errors += o.cache_errors;
        self.bypassed += o.bypassed;
    }
}

/// One plugin's counters and its metric handles.
pub(super) struct Counters {
    pub(super) gets: AtomicU64,
    pub(super) store_reads: AtomicU64,
    pub(super) scans: AtomicU64,
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) coalesced: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) bypassed: AtomicU64,
    pub(super) m_gets: metrics::Counter,
    pub(super) m_store_reads: metrics::Counter,
    pub(super) m_hits: metrics::Counter,
    pub(super) m_misses: metrics::Counter,
    pub(super) m_errors: metrics::Counter,
}

impl Counters {
    pub(super) fn new(plugin: &str) -> Self {
        let p = plugin.to_owned();
        Self {
            gets: AtomicU64::new(0),
            store_reads: AtomicU64::new(0),
            scans: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bypassed: AtomicU64::new(0),
            m_gets: metrics::counter!(crate::metric_names::STATE_READS_TOTAL, "plugin" => p.clone()),
            m_store_reads: metrics::counter!(crate::metric_names::STATE_STORE_READS_TOTAL, "plugin" => p.clone()),
            m_hits: metrics::counter!(crate::metric_names::STATE_CACHE_HITS_TOTAL, "plugin" => p.clone()),
            m_misses: metrics::counter!(crate::metric_names::STATE_CACHE_MISSES_TOTAL, "plugin" => p.clone()),
            m_errors: metrics::counter!(crate::metric_names::STATE_CACHE_ERRORS_TOTAL, "plugin" => p),
        }
    }

    pub(super) fn get(&self) {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.m_gets.increment(1);
    }
    pub(super) fn store_read(&self) {
        self.store_reads.fetch_add(1, Ordering::Relaxed);
        self.m_store_reads.increment(1);
    }
    pub(super) fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.m_hits.increment(1);
    }
    pub(super) fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.m_misses.increment(1);
    }
    pub(super) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.m_errors.increment(1);
    }

    pub(super) fn snapshot(&self) -> TierStats {
        TierStats {
            gets: self.gets.load(Ordering::Relaxed),
            store_reads: self.store_reads.load(Ordering::Relaxed),
            scans: self.scans.load(Ordering::Relaxed),
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            cache_errors: self.errors.load(Ordering::Relaxed),
            bypassed: self.bypassed.load(Ordering::Relaxed),
        }
    }
}
