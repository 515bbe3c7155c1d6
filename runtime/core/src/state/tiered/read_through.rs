//! Read-through caching of state values: its settings, the cached copies' encoding, the
//! stripes that order fills against writes, and the keys suspected stale after a failed
//! cache update (see the [tier's docs](super)).

use super::RESERVED_CACHE_PREFIX;
use super::counting::Counters;
use crate::{Cache, Entry, Expiry, StateWrite};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Stripes of locks and generations (a power of two).
pub(super) const STRIPES: usize = 1024;

/// Suspect keys whose copies a successful write also deletes, so the set drains once the
/// cache is back even for keys that are never read again.
pub(super) const SUSPECTS_DRAINED_PER_WRITE: usize = 8;

/// Tag of a cached present value (followed by the value).
pub(super) const PRESENT: u8 = b'v';
/// A cached "no such key".
pub(super) const ABSENT: u8 = b'x';

/// What a committed write does to the cached copy of its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WritePolicy {
    /// Cache the new value (or "absent" after a delete): a read-modify-write workload keeps
    /// hitting the cache.
    #[default]
    Update,
    /// Delete the cached copy; the next read fills it.
    Invalidate,
}

/// Settings of the read-through tier: the `[read-through]` section of the runtime's
/// configuration (every key optional).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ReadThroughConfig {
    /// Serve plugins' state reads through the cache backend. Default off.
    pub enabled: bool,
    /// Longest a cached copy lives; also the bound on staleness across processes.
    /// Default 60 s.
    #[serde(rename = "ttl-ms", with = "crate::millis")]
    pub ttl: Duration,
    /// What writes do to cached copies. Default [`WritePolicy::Update`].
    pub on_write: WritePolicy,
    /// Prefix of the tier's cache keys; must start with [`RESERVED_CACHE_PREFIX`].
    /// Default `_spate/rt/`.
    pub key_prefix: String,
    /// Values larger than this are not cached. Default 1 MiB.
    pub max_value_bytes: usize,
    /// Most keys remembered as possibly stale after failed cache updates; beyond it the
    /// cache is bypassed for one `ttl`. Default 65,536.
    pub max_suspect_keys: usize,
}

impl Default for ReadThroughConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl: Duration::from_secs(60),
            on_write: WritePolicy::Update,
            key_prefix: format!("{RESERVED_CACHE_PREFIX}/rt/"),
            max_value_bytes: 1 << 20,
            max_suspect_keys: 65_536,
        }
    }
}

impl ReadThroughConfig {
    /// Problems with these settings, if any.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.ttl.is_zero() {
            p.push("read-through ttl must be more than zero".to_owned());
        }
        if !self.key_prefix.starts_with(RESERVED_CACHE_PREFIX) {
            p.push(format!(
                "read-through key-prefix must start with `{RESERVED_CACHE_PREFIX}` (reserved for the runtime, so no plugin can read or forge the copies)"
            ));
        }
        if self.max_suspect_keys == 0 {
            p.push("read-through max-suspect-keys must be at least 1".to_owned());
        }
        p
    }
}

pub(super) struct Flight {
    pub(super) generation: u64,
    pub(super) id: u64,
    pub(super) rx: watch::Receiver<Option<Option<Vec<u8>>>>,
}

/// Removes a finished (or abandoned) flight, unless a newer one replaced it.
pub(super) struct FlightGuard<'a> {
    pub(super) layer: &'a Layer,
    pub(super) key: (String, String),
    pub(super) id: u64,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut flights) = self.layer.flights.lock()
            && flights.get(&self.key).is_some_and(|f| f.id == self.id)
        {
            flights.remove(&self.key);
        }
    }
}

pub(super) struct Stripe {
    pub(super) lock: tokio::sync::Mutex<()>,
    pub(super) generation: AtomicU64,
}

#[derive(Default)]
pub(super) struct Suspects {
    pub(super) keys: HashSet<(String, String)>,
    pub(super) bypass_until: Option<Instant>,
}

pub(super) enum Suspicion {
    None,
    Key,
    All,
}

pub(super) struct Layer {
    pub(super) cache: Arc<dyn Cache>,
    pub(super) config: ReadThroughConfig,
    pub(super) stripes: Box<[Stripe]>,
    pub(super) flights: Mutex<HashMap<(String, String), Flight>>,
    pub(super) next_flight: AtomicU64,
    pub(super) suspects: Mutex<Suspects>,
}

impl Layer {
    pub(super) fn cache_key(&self, ns: &str, key: &str) -> String {
        // The namespace's length keeps `("a", "bc")` and `("ab", "c")` apart.
        format!("{}{}:{ns}{key}", self.config.key_prefix, ns.len())
    }

    pub(super) fn stripe_index(&self, ns: &str, key: &str) -> usize {
        let seed = xxhash_rust::xxh3::xxh3_64(ns.as_bytes());
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), seed);
        (h as usize) & (STRIPES - 1)
    }

    pub(super) fn stripe(&self, ns: &str, key: &str) -> &Stripe {
        &self.stripes[self.stripe_index(ns, key)]
    }

    pub(super) fn suspicion(&self, ns: &str, key: &str) -> Suspicion {
        let Ok(mut s) = self.suspects.lock() else {
            return Suspicion::All;
        };
        if let Some(until) = s.bypass_until {
            if Instant::now() < until {
                return Suspicion::All;
            }
            s.bypass_until = None;
        }
        if !s.keys.is_empty() && s.keys.contains(&(ns.to_owned(), key.to_owned())) {
            Suspicion::Key
        } else {
            Suspicion::None
        }
    }

    pub(super) fn suspect(&self, ns: &str, key: &str) {
        let Ok(mut s) = self.suspects.lock() else {
            return;
        };
        if s.keys.len() >= self.config.max_suspect_keys {
            // Too many to track: distrust every copy until all older ones have expired.
            s.keys.clear();
            s.bypass_until = Some(Instant::now() + self.config.ttl);
            tracing::warn!(ttl = ?self.config.ttl,
                "too many state keys with possibly stale cached copies; reading state from the store until they expire");
            return;
        }
        s.keys.insert((ns.to_owned(), key.to_owned()));
    }

    pub(super) fn clear_suspect(&self, ns: &str, key: &str) {
        if let Ok(mut s) = self.suspects.lock()
            && !s.keys.is_empty()
        {
            s.keys.remove(&(ns.to_owned(), key.to_owned()));
        }
    }

    /// How long a copy of `entry` (or of "absent") may be cached; `None` = do not cache.
    pub(super) fn copy_ttl(&self, entry: Option<&Entry>) -> Option<Duration> {
        let Some(e) = entry else {
            return Some(self.config.ttl);
        };
        if e.value.len() > self.config.max_value_bytes {
            return None;
        }
        match e.expiry {
            Expiry::Never | Expiry::Unknown => Some(self.config.ttl),
            Expiry::In(left) if left.is_zero() => None,
            Expiry::In(left) => Some(left.min(self.config.ttl)),
        }
    }

    /// Cache what the store holds for a key, unless a write moved the stripe's generation
    /// past `generation` since the store was read. Returns whether the cache now agrees
    /// with the store.
    pub(super) async fn fill(
        &self,
        c: &Counters,
        ns: &str,
        key: &str,
        ck: &str,
        generation: Option<u64>,
        entry: Option<Entry>,
    ) -> bool {
        let stripe = self.stripe(ns, key);
        let _lock = stripe.lock.lock().await;
        if generation.is_some_and(|g| stripe.generation.load(Ordering::Acquire) != g) {
            return false;
        }
        let result = match self.copy_ttl(entry.as_ref()) {
            Some(ttl) => {
                self.cache
                    .set(ck, encode(entry.map(|e| e.value)), ttl)
                    .await
            }
            None => self.cache.delete(ck).await,
        };
        match result {
            Ok(()) => true,
            Err(_) => {
                c.error();
                false
            }
        }
    }

    /// Bring the cached copy in line with a committed write. Called with the key's stripe
    /// locked.
    pub(super) async fn after_write(&self, c: &Counters, ns: &str, w: &StateWrite) {
        let ck = self.cache_key(ns, &w.key);
        let result = match self.config.on_write {
            WritePolicy::Invalidate => self.cache.delete(&ck).await,
            WritePolicy::Update => {
                let entry = match (&w.value, w.ttl) {
                    (None, _) => None,
                    (Some(_), Some(ttl)) if ttl.is_zero() => None,
                    (Some(v), ttl) => Some(Entry {
                        value: v.clone(),
                        expiry: ttl.map_or(Expiry::Never, Expiry::In),
                    }),
                };
                match self.copy_ttl(entry.as_ref()) {
                    Some(ttl) => {
                        self.cache
                            .set(&ck, encode(entry.map(|e| e.value)), ttl)
                            .await
                    }
                    None => self.cache.delete(&ck).await,
                }
            }
        };
        match result {
            Ok(()) => self.clear_suspect(ns, &w.key),
            Err(_) => {
                c.error();
                self.suspect(ns, &w.key);
            }
        }
    }

    /// Delete the copies of up to `max` suspect keys, each under its stripe lock, and stop
    /// suspecting those that succeeded. Called with no stripe locked.
    pub(super) async fn drain_suspects(&self, c: &Counters, max: usize) {
        let batch: Vec<(String, String)> = match self.suspects.lock() {
            Ok(s) if !s.keys.is_empty() => s.keys.iter().take(max).cloned().collect(),
            _ => return,
        };
        for (ns, key) in batch {
            let _lock = self.stripe(&ns, &key).lock.lock().await;
            match self.cache.delete(&self.cache_key(&ns, &key)).await {
                Ok(()) => self.clear_suspect(&ns, &key),
                Err(_) => {
                    c.error();
                    // Still unreachable: leave the rest for a later write.
                    return;
                }
            }
        }
    }

    /// Delete the cached copy of a key. Called with the key's stripe locked.
    pub(super) async fn invalidate(&self, c: &Counters, ns: &str, key: &str) {
        match self.cache.delete(&self.cache_key(ns, key)).await {
            Ok(()) => self.clear_suspect(ns, key),
            Err(_) => {
                c.error();
                self.suspect(ns, key);
            }
        }
    }
}

pub(super) fn encode(value: Option<Vec<u8>>) -> Vec<u8> {
    match value {
        None => vec![ABSENT],
        Some(v) => {
            let mut out = Vec::with_capacity(v.len() + 1);
            out.push(PRESENT);
            out.extend_from_slice(&v);
            out
        }
    }
}

/// `Some(value or absence)` for a copy this tier wrote; `None` for anything else (a miss).
pub(super) fn decode(bytes: &[u8]) -> Option<Option<Vec<u8>>> {
    match bytes.split_first() {
        Some((&PRESENT, v)) => Some(Some(v.to_vec())),
        Some((&ABSENT, [])) => Some(None),
        _ => None,
    }
}
