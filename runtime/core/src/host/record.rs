//! The effect record: what each handled event did (its coordinates, the version, how it
//! ended, and its journal: state writes, cache writes, emits), kept for a while so a
//! replay through another version can be compared with it (`spate replay`), and a shadow
//! version with the active one.
//!
//! Opt-in per plugin (manifest `[record]`). Records are state in the plugin's reserved
//! namespace `_spate/record/<state namespace>`, written by the pipeline through the
//! checkpoint with the event's own effects, so a record exists exactly for the events
//! whose effects are durable. Each is bounded:
//! - by age: written with a TTL (`max-age-hours`);
//! - by count: partition `p` of `topic` keeps `per-partition` slots, keyed
//!   `<topic>/<p>/<offset % per-partition>` (10 digits each), so a newer event overwrites
//!   the record of the one `per-partition` offsets before it;
//! - by size: a record larger than `max-bytes` keeps digests (sha256 and length) of its
//!   values instead of the values, which still compare, and if that is still too large,
//!   only a digest of the whole.
//!
//! [`EffectRecord::diff`] compares two records of one event: the outcome, then the state
//! writes by key, the cache writes and the emits in order. Runtime headers (`spate-*`:
//! version, hash, provenance; and the trace context) are not part of a record, so two versions doing the same
//! compare the same.

use super::PluginInfo;
use super::journal::{CacheOp, DeadLetterKind, Effects, Reads};
use crate::manifest::{RESERVED_NAMESPACE_PREFIX, RecordSettings};
use crate::types::{Event, headers};
use crate::{BackendResult, StateStore, StateWrite};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;

/// Where the effect records of the plugin with state namespace `state_namespace` live.
pub fn namespace(state_namespace: &str) -> String {
    format!("{RESERVED_NAMESPACE_PREFIX}/record/{state_namespace}")
}

/// The key of the slot holding `topic`/`partition`/`offset`'s record.
pub fn slot_key(topic: &str, partition: u32, offset: u64, per_partition: u32) -> String {
    let slot = offset % u64::from(per_partition.max(1));
    format!("{topic}/{partition:010}/{slot:010}")
}

/// The prefix of every slot of `topic` (of one partition with `Some`).
pub fn prefix(topic: &str, partition: Option<u32>) -> String {
    match partition {
        Some(p) => format!("{topic}/{p:010}/"),
        None => format!("{topic}/"),
    }
}

/// The write keeping `event`'s record, if `plugin` keeps records: it handled `event` in
/// `attempts` attempts, ending in `outcome` with `effects` (`None`: it applied nothing).
pub fn write_for(
    plugin: &PluginInfo,
    event: &Event,
    outcome: Outcome,
    attempts: u32,
    effects: Option<&Effects>,
) -> Option<(String, StateWrite)> {
    let settings = &plugin.manifest.record;
    settings.enabled.then(|| {
        let version = plugin.manifest.version.to_string();
        let record = EffectRecord::new(event, &version, outcome, attempts, effects);
        (namespace(&plugin.namespace), record.to_write(settings))
    })
}

/// Bytes as a record shows them: text when they are UTF-8, else base64; or, for a value
/// too large to keep, its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Bytes {
    /// UTF-8 text.
    Text(String),
    /// Other bytes.
    Base64 {
        /// Standard base64.
        base64: String,
    },
    /// A value the record did not keep.
    Digest {
        /// Hex sha256 of the value.
        sha256: String,
        /// Its length in bytes.
        len: usize,
    },
}

impl Bytes {
    /// `bytes` as kept.
    pub fn of(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => Self::Text(s.to_owned()),
            Err(_) => Self::Base64 {
                base64: BASE64.encode(bytes),
            },
        }
    }

    /// The bytes, unless only a digest was kept.
    pub fn raw(&self) -> Option<Vec<u8>> {
        match self {
            Self::Text(s) => Some(s.as_bytes().to_vec()),
            Self::Base64 { base64 } => BASE64.decode(base64).ok(),
            Self::Digest { .. } => None,
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Text(s) => s.len(),
            Self::Base64 { base64 } => base64.len() * 3 / 4,
            Self::Digest { len, .. } => *len,
        }
    }

    /// The digest form of this value.
    fn digest(&self) -> Self {
        match self.raw() {
            Some(raw) => Self::Digest {
                sha256: hex::encode(Sha256::digest(&raw)),
                len: raw.len(),
            },
            None => self.clone(),
        }
    }

    /// Whether two values are the same (by digest when either was not kept).
    pub fn same_as(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Digest { .. }, _) | (_, Self::Digest { .. }) => self.digest() == other.digest(),
            _ => self.raw() == other.raw(),
        }
    }
}

/// How an event ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum Outcome {
    /// The handler returned ok and its effects were applied.
    Ok,
    /// It could not be handled.
    Failed {
        /// Why, as a dead letter's kind says it (`rejected`, `retries-exhausted`, a trap
        /// kind...).
        kind: String,
        /// The reason.
        reason: String,
        /// What became of it: `dead-lettered`, `parked`, or (in a replay, which makes one
        /// attempt) `not-retried`.
        then: String,
    },
    /// The manifest's filter passed it over (replays only: passed-over events are not
    /// recorded).
    Filtered,
}

impl Outcome {
    /// A failure of `kind`.
    pub fn failed(kind: DeadLetterKind, reason: &str, then: &str) -> Self {
        Self::Failed {
            kind: kind.as_str().to_owned(),
            reason: reason.to_owned(),
            then: then.to_owned(),
        }
    }

    /// What two outcomes are compared by: ok, filtered, or the failure's kind.
    pub fn class(&self) -> String {
        match self {
            Self::Ok => "ok".into(),
            Self::Filtered => "filtered".into(),
            Self::Failed { kind, .. } => format!("failed ({kind})"),
        }
    }
}

/// A state write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEffect {
    /// The key.
    pub key: String,
    /// The new value; `None` deletes.
    pub value: Option<Bytes>,
    /// Its TTL, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// A cache write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub enum CacheEffect {
    /// Set a value.
    Set {
        /// The key, with the plugin's prefix.
        key: String,
        /// The value.
        value: Bytes,
        /// Its TTL.
        ttl_ms: u64,
    },
    /// Delete a key.
    Delete {
        /// The key.
        key: String,
    },
    /// Add to a counter.
    Incr {
        /// The key.
        key: String,
        /// The amount.
        delta: i64,
    },
}

/// An emit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmitEffect {
    /// Destination topic.
    pub topic: String,
    /// Its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Bytes>,
    /// Its payload.
    pub payload: Bytes,
    /// Its own headers (the runtime's `spate-*` headers are not recorded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Bytes>,
}

/// What a handled event read (the first read of each key), so a replay can serve it the
/// same inputs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedReads {
    /// State reads by key (`null`: absent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub state: BTreeMap<String, Option<Bytes>>,
    /// Cache reads by full key (`null`: a miss).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cache: BTreeMap<String, Option<Bytes>>,
    /// Whether some reads were not kept (the record's size bound).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incomplete: bool,
}

impl RecordedReads {
    fn of(reads: &Reads) -> Option<Self> {
        if reads.is_empty() && !reads.incomplete {
            return None;
        }
        let map = |m: &BTreeMap<String, Option<Vec<u8>>>| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_deref().map(Bytes::of)))
                .collect()
        };
        Some(Self {
            state: map(&reads.state),
            cache: map(&reads.cache),
            incomplete: reads.incomplete,
        })
    }

    /// The state value read of `key`, if the record kept one (`Some(None)`: absent).
    pub fn state_value(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.state.get(key).map(|v| v.as_ref().and_then(Bytes::raw))
    }

    /// The cache value read of `key`, if kept.
    pub fn cache_value(&self, key: &str) -> Option<Option<Vec<u8>>> {
        self.cache.get(key).map(|v| v.as_ref().and_then(Bytes::raw))
    }
}

/// What one event did; see the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectRecord {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: u32,
    /// Source offset.
    pub offset: u64,
    /// The event's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Bytes>,
    /// The event's timestamp.
    pub timestamp_ms: i64,
    /// The plugin version that handled it.
    pub version: String,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Attempts made.
    pub attempts: u32,
    /// State writes, by key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<StateEffect>,
    /// Cache writes, in call order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cache: Vec<CacheEffect>,
    /// Emits (workflow starts included), in call order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emits: Vec<EmitEffect>,
    /// What it read (the inputs a replay serves it again), when the record had room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reads: Option<RecordedReads>,
    /// Set when the record was too large even with digests: only this digest of the
    /// effects was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effects_sha256: Option<String>,
}

impl EffectRecord {
    /// The record of `event`, handled by `version`, ending in `outcome` with `effects`
    /// (`None` for an event that failed: it applied nothing).
    pub fn new(
        event: &Event,
        version: &str,
        outcome: Outcome,
        attempts: u32,
        effects: Option<&Effects>,
    ) -> Self {
        let mut record = Self {
            topic: event.topic.clone(),
            partition: event.partition,
            offset: event.offset,
            key: event.key.as_deref().map(Bytes::of),
            timestamp_ms: event.timestamp_ms,
            version: version.to_owned(),
            outcome,
            attempts,
            state: Vec::new(),
            cache: Vec::new(),
            emits: Vec::new(),
            reads: None,
            effects_sha256: None,
        };
        if let Some(effects) = effects {
            record.reads = RecordedReads::of(&effects.reads);
            record.state = effects
                .writes
                .iter()
                .map(|w| StateEffect {
                    key: w.key.clone(),
                    value: w.value.as_deref().map(Bytes::of),
                    ttl_ms: w
                        .ttl
                        .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                })
                .collect();
            record.cache = effects
                .cache
                .iter()
                .map(|op| match op {
                    CacheOp::Set { key, value, ttl } => CacheEffect::Set {
                        key: key.clone(),
                        value: Bytes::of(value),
                        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                    },
                    CacheOp::Delete { key } => CacheEffect::Delete { key: key.clone() },
                    CacheOp::Incr { key, delta } => CacheEffect::Incr {
                        key: key.clone(),
                        delta: *delta,
                    },
                })
                .collect();
            record.emits = effects
                .emits
                .iter()
                .map(|e| EmitEffect {
                    topic: e.topic.clone(),
                    key: e.event.key.as_deref().map(Bytes::of),
                    payload: Bytes::of(&e.event.payload),
                    headers: e
                        .event
                        .headers
                        .iter()
                        .filter(|h| {
                            !headers::is_reserved(&h.name) && h.name != headers::TRACEPARENT
                        })
                        .map(|h| (h.name.clone(), Bytes::of(&h.value)))
                        .collect(),
                })
                .collect();
        }
        record
    }

    /// The record as stored: JSON of at most `max_bytes` (values beyond it kept as
    /// digests, then only a digest of the whole).
    pub fn encode(mut self, max_bytes: usize) -> Vec<u8> {
        let full = serde_json::to_vec(&self).unwrap_or_default();
        if full.len() <= max_bytes {
            return full;
        }
        // The reads go first (a replay then reads the current state), then the values.
        if self.reads.take().is_some() {
            let without_reads = serde_json::to_vec(&self).unwrap_or_default();
            if without_reads.len() <= max_bytes {
                return without_reads;
            }
        }
        // Keep values of up to 64 bytes (keys, counters), digest the rest.
        let digest = |b: &mut Bytes| {
            if b.len() > 64 {
                *b = b.digest();
            }
        };
        for s in &mut self.state {
            if let Some(v) = &mut s.value {
                digest(v);
            }
        }
        for c in &mut self.cache {
            if let CacheEffect::Set { value, .. } = c {
                digest(value);
            }
        }
        for e in &mut self.emits {
            digest(&mut e.payload);
            e.headers.values_mut().for_each(digest);
        }
        let digested = serde_json::to_vec(&self).unwrap_or_default();
        // Digests of the values, so a full record of the same effects digests the same.
        if digested.len() <= max_bytes {
            return digested;
        }
        self.effects_sha256 = Some(self.effects_digest());
        self.state.clear();
        self.cache.clear();
        self.emits.clear();
        serde_json::to_vec(&self).unwrap_or_default()
    }

    /// A digest of the effects (state, cache, emits) with every value as its digest.
    fn effects_digest(&self) -> String {
        let mut copy = self.clone();
        for s in &mut copy.state {
            if let Some(v) = &mut s.value {
                *v = v.digest();
            }
        }
        for c in &mut copy.cache {
            if let CacheEffect::Set { value, .. } = c {
                *value = value.digest();
            }
        }
        for e in &mut copy.emits {
            e.payload = e.payload.digest();
            e.key = e.key.as_ref().map(Bytes::digest);
            e.headers.values_mut().for_each(|v| *v = v.digest());
        }
        let effects =
            serde_json::to_vec(&(&copy.state, &copy.cache, &copy.emits)).unwrap_or_default();
        hex::encode(Sha256::digest(&effects))
    }

    /// The state write keeping this record in the plugin's record namespace, by its
    /// `settings`.
    pub fn to_write(self, settings: &RecordSettings) -> StateWrite {
        StateWrite {
            key: slot_key(
                &self.topic,
                self.partition,
                self.offset,
                settings.per_partition,
            ),
            value: Some(self.encode(settings.max_bytes)),
            ttl: Some(settings.max_age()),
            condition: None,
        }
    }

    /// How `replayed` differs from this record of the same event.
    pub fn diff(&self, replayed: &EffectRecord) -> Diff {
        let mut differences = Vec::new();
        let mut verdicts = Vec::new();
        if self.outcome.class() != replayed.outcome.class() {
            verdicts.push(Verdict::OutcomeDiffers);
            differences.push(Difference {
                what: "outcome".into(),
                key: None,
                recorded: serde_json::json!(self.outcome.class()),
                replayed: serde_json::json!(replayed.outcome.class()),
            });
        }
        if let Some(kept) = &self.effects_sha256 {
            // Only a digest was kept: the effects compare as a whole.
            let now = replayed.effects_digest();
            if *kept != now {
                verdicts.push(Verdict::EffectsDiffer);
                differences.push(Difference {
                    what: "effects".into(),
                    key: None,
                    recorded: serde_json::json!({ "sha256": kept }),
                    replayed: serde_json::json!({ "sha256": now }),
                });
            }
            if verdicts.is_empty() {
                verdicts.push(Verdict::Same);
            }
            return Diff {
                verdicts,
                differences,
            };
        }
        let recorded: BTreeMap<&str, &StateEffect> =
            self.state.iter().map(|s| (s.key.as_str(), s)).collect();
        let now: BTreeMap<&str, &StateEffect> =
            replayed.state.iter().map(|s| (s.key.as_str(), s)).collect();
        let mut state_differs = false;
        for key in recorded
            .keys()
            .chain(now.keys())
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let (a, b) = (recorded.get(key), now.get(key));
            let same = match (a, b) {
                (Some(a), Some(b)) => match (&a.value, &b.value) {
                    (Some(x), Some(y)) => x.same_as(y),
                    (None, None) => true,
                    _ => false,
                },
                _ => false,
            };
            if !same {
                state_differs = true;
                differences.push(Difference {
                    what: "state".into(),
                    key: Some(key.to_owned()),
                    recorded: state_view(a.copied()),
                    replayed: state_view(b.copied()),
                });
            }
        }
        if state_differs {
            verdicts.push(Verdict::StateDiffers);
        }
        let cache_same = self.cache.len() == replayed.cache.len()
            && self
                .cache
                .iter()
                .zip(&replayed.cache)
                .all(|(a, b)| cache_same(a, b));
        if !cache_same {
            verdicts.push(Verdict::CacheDiffers);
            differences.push(Difference {
                what: "cache".into(),
                key: None,
                recorded: serde_json::to_value(&self.cache).unwrap_or_default(),
                replayed: serde_json::to_value(&replayed.cache).unwrap_or_default(),
            });
        }
        let mut emits_differ = false;
        for i in 0..self.emits.len().max(replayed.emits.len()) {
            let (a, b) = (self.emits.get(i), replayed.emits.get(i));
            let same = match (a, b) {
                (Some(a), Some(b)) => emit_same(a, b),
                _ => false,
            };
            if !same {
                emits_differ = true;
                differences.push(Difference {
                    what: "emit".into(),
                    key: Some(i.to_string()),
                    recorded: serde_json::to_value(a).unwrap_or_default(),
                    replayed: serde_json::to_value(b).unwrap_or_default(),
                });
            }
        }
        if emits_differ {
            verdicts.push(Verdict::EmitsDiffer);
        }
        if verdicts.is_empty() {
            verdicts.push(Verdict::Same);
        }
        Diff {
            verdicts,
            differences,
        }
    }
}

fn state_view(s: Option<&StateEffect>) -> serde_json::Value {
    match s {
        None => serde_json::json!("(not written)"),
        Some(StateEffect { value: None, .. }) => serde_json::json!("(deleted)"),
        Some(StateEffect { value: Some(v), .. }) => serde_json::to_value(v).unwrap_or_default(),
    }
}

fn cache_same(a: &CacheEffect, b: &CacheEffect) -> bool {
    match (a, b) {
        (
            CacheEffect::Set {
                key: ka,
                value: va,
                ttl_ms: ta,
            },
            CacheEffect::Set {
                key: kb,
                value: vb,
                ttl_ms: tb,
            },
        ) => ka == kb && ta == tb && va.same_as(vb),
        _ => a == b,
    }
}

fn emit_same(a: &EmitEffect, b: &EmitEffect) -> bool {
    let opt_same = |x: &Option<Bytes>, y: &Option<Bytes>| match (x, y) {
        (Some(x), Some(y)) => x.same_as(y),
        (None, None) => true,
        _ => false,
    };
    a.topic == b.topic
        && opt_same(&a.key, &b.key)
        && a.payload.same_as(&b.payload)
        && a.headers.len() == b.headers.len()
        && a.headers
            .iter()
            .zip(&b.headers)
            .all(|((na, va), (nb, vb))| na == nb && va.same_as(vb))
}

/// One way a replayed event differs from its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Everything compares equal.
    Same,
    /// It ended differently (ok vs failed, or another failure kind).
    OutcomeDiffers,
    /// It wrote other state.
    StateDiffers,
    /// It wrote the cache differently.
    CacheDiffers,
    /// It emitted other events.
    EmitsDiffer,
    /// The record kept only a digest of its effects (it was too large), and the replay's
    /// differ from it.
    EffectsDiffer,
}

/// A difference, with both sides' values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Difference {
    /// `outcome`, `state`, `cache` or `emit`.
    pub what: String,
    /// The state key, or the emit's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What the record holds.
    pub recorded: serde_json::Value,
    /// What the replay did.
    pub replayed: serde_json::Value,
}

/// How a replayed event compares with its record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Diff {
    /// `same`, or each way it differs.
    pub verdicts: Vec<Verdict>,
    /// The differing values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<Difference>,
}

impl Diff {
    /// Whether the replay did exactly what was recorded.
    pub fn is_same(&self) -> bool {
        self.verdicts == [Verdict::Same]
    }
}

/// The record of `topic`/`partition`/`offset` in `namespace` (a record namespace), if one
/// is kept (its slot may hold a later event's).
pub async fn lookup(
    store: &dyn StateStore,
    namespace: &str,
    settings: &RecordSettings,
    (topic, partition, offset): (&str, u32, u64),
) -> BackendResult<Option<EffectRecord>> {
    let key = slot_key(topic, partition, offset, settings.per_partition);
    let Some(bytes) = store.get(namespace, &key).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<EffectRecord>(&bytes)
        .ok()
        .filter(|r| r.topic == topic && r.partition == partition && r.offset == offset))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::host::journal::PendingEmit;
    use crate::types::{Header, NewEvent};

    fn event() -> Event {
        Event {
            topic: "orders".into(),
            partition: 3,
            offset: 12_345,
            key: Some(b"c-1".to_vec()),
            payload: b"{}".to_vec(),
            headers: Vec::new(),
            timestamp_ms: 7,
        }
    }

    fn effects(total: &str, emit: &str) -> Effects {
        Effects {
            namespace: "ns".into(),
            writes: vec![StateWrite {
                key: "total/c-1".into(),
                value: Some(total.as_bytes().to_vec()),
                ttl: None,
                condition: None,
            }],
            cache: vec![CacheOp::Incr {
                key: "p:n".into(),
                delta: 1,
            }],
            emits: vec![PendingEmit {
                topic: "out".into(),
                event: NewEvent {
                    key: Some(b"c-1".to_vec()),
                    payload: emit.as_bytes().to_vec(),
                    headers: vec![
                        Header::text("spate-plugin-version", "1.0.0"),
                        Header::text("mine", "x"),
                    ],
                },
            }],
            side: Vec::new(),
            reads: Reads::default(),
        }
    }

    #[test]
    fn slots_are_bounded_per_partition() {
        assert_eq!(slot_key("t", 3, 12_345, 1000), "t/0000000003/0000000345");
        assert_eq!(
            slot_key("t", 3, 13_345, 1000),
            slot_key("t", 3, 12_345, 1000)
        );
        assert!(slot_key("t", 3, 1, 1000).starts_with(&prefix("t", Some(3))));
    }

    #[test]
    fn a_record_round_trips_without_runtime_headers() {
        let r = EffectRecord::new(
            &event(),
            "1.0.0",
            Outcome::Ok,
            1,
            Some(&effects("5", "{\"n\":5}")),
        );
        assert_eq!(
            r.emits[0].headers.len(),
            1,
            "spate-* headers are not recorded"
        );
        let back: EffectRecord = serde_json::from_slice(&r.clone().encode(1 << 20)).unwrap();
        assert_eq!(back, r);
        assert!(r.diff(&back).is_same());
    }

    #[test]
    fn the_diff_names_what_changed_with_both_values() {
        let a = EffectRecord::new(
            &event(),
            "1.0.0",
            Outcome::Ok,
            1,
            Some(&effects("5", "{\"n\":5}")),
        );
        let b = EffectRecord::new(
            &event(),
            "2.0.0",
            Outcome::Ok,
            1,
            Some(&effects("6", "{\"n\":5}")),
        );
        let d = a.diff(&b);
        assert_eq!(d.verdicts, vec![Verdict::StateDiffers]);
        assert_eq!(d.differences[0].key.as_deref(), Some("total/c-1"));
        assert_eq!(d.differences[0].recorded, serde_json::json!("5"));
        assert_eq!(d.differences[0].replayed, serde_json::json!("6"));
        let c = EffectRecord::new(
            &event(),
            "2.0.0",
            Outcome::failed(DeadLetterKind::Rejected, "no", "not-retried"),
            1,
            None,
        );
        let d = a.diff(&c);
        assert!(d.verdicts.contains(&Verdict::OutcomeDiffers), "{d:?}");
        assert!(d.verdicts.contains(&Verdict::EmitsDiffer), "{d:?}");
    }

    #[test]
    fn large_records_keep_digests_that_still_compare() {
        let big = "x".repeat(10_000);
        let a = EffectRecord::new(
            &event(),
            "1.0.0",
            Outcome::Ok,
            1,
            Some(&effects(&big, "{}")),
        );
        let stored: EffectRecord = serde_json::from_slice(&a.clone().encode(2_000)).unwrap();
        assert!(matches!(
            stored.state[0].value,
            Some(Bytes::Digest { len: 10_000, .. })
        ));
        assert!(
            stored.diff(&a).is_same(),
            "a digest compares with the full value"
        );
        let other = EffectRecord::new(
            &event(),
            "1.0.0",
            Outcome::Ok,
            1,
            Some(&effects(&format!("{big}y"), "{}")),
        );
        assert_eq!(stored.diff(&other).verdicts, vec![Verdict::StateDiffers]);
        let tiny: EffectRecord = serde_json::from_slice(&a.clone().encode(300)).unwrap();
        assert!(tiny.effects_sha256.is_some() && tiny.state.is_empty());
        assert!(
            tiny.diff(&a).is_same(),
            "a digest of the whole compares too"
        );
        assert_eq!(tiny.diff(&other).verdicts, vec![Verdict::EffectsDiffer]);
        assert!(tiny.encode(usize::MAX).len() < 400);
    }
}
