//! The effect journal of one call, from recording to what is applied.
//!
//! While a handler runs, its state, cache and emit calls are recorded here (within the
//! manifest's per-event limits), never applied: reads of the call see them through the
//! [`Invocation`](super::Invocation). When the call returns ok its [`Journal`] becomes the
//! [`Effects`] the dispatcher's checkpointer applies as one unit; an event that cannot be
//! handled becomes the [`Effects`] of its dead letter. Emits and dead letters get their
//! runtime headers (idempotency id, provenance, trace context) here, from one function.

use super::{HostError, MAX_REASON_LEN, PluginInfo, truncate_reason};
use crate::StateWrite;
use crate::manifest::Limits;
use crate::plugin::TrapKind;
use crate::types::{Event, Header, NewEvent, header_str, headers};
use std::collections::BTreeMap;
use std::time::Duration;

/// A state write recorded during a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PendingState {
    /// The value written; `None` deletes.
    pub(super) value: Option<Vec<u8>>,
    pub(super) ttl: Option<Duration>,
    /// The stored value this write requires (from a compare-and-swap), if any.
    pub(super) condition: Option<Option<Vec<u8>>>,
}

/// A cache write recorded during a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheOp {
    /// Set a value with a TTL.
    Set {
        /// Full (prefixed) key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Expiry.
        ttl: Duration,
    },
    /// Delete a key.
    Delete {
        /// Full (prefixed) key.
        key: String,
    },
    /// Add to a counter.
    Incr {
        /// Full (prefixed) key.
        key: String,
        /// Amount.
        delta: i64,
    },
}

/// An emit recorded during a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEmit {
    /// Destination topic.
    pub topic: String,
    /// The event, headers included (idempotency id and provenance already added).
    pub event: NewEvent,
}

/// What a call read from the state store and the cache: the first read of each key, as
/// the store answered it. Kept only for plugins that keep an effect record (a replay then
/// serves the same inputs), and only up to the record's size bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// State reads by key (`None`: absent).
    pub state: BTreeMap<String, Option<Vec<u8>>>,
    /// Cache reads by full key (`None`: a miss).
    pub cache: BTreeMap<String, Option<Vec<u8>>>,
    /// Bytes held; reads stop being kept past the record's `max-bytes`.
    bytes: usize,
    /// Whether some reads were not kept.
    pub incomplete: bool,
}

impl Reads {
    /// Whether nothing was read (or kept).
    pub fn is_empty(&self) -> bool {
        self.state.is_empty() && self.cache.is_empty()
    }

    fn keep(
        map: &mut BTreeMap<String, Option<Vec<u8>>>,
        bytes: &mut usize,
        incomplete: &mut bool,
        max: usize,
        key: &str,
        value: &Option<Vec<u8>>,
    ) {
        if map.contains_key(key) {
            return;
        }
        let size = key.len() + value.as_ref().map_or(0, Vec::len);
        if *bytes + size > max {
            *incomplete = true;
            return;
        }
        *bytes += size;
        map.insert(key.to_owned(), value.clone());
    }

    /// Keep a state read (the first of `key`), within `max` bytes in all.
    pub fn state_read(&mut self, max: usize, key: &str, value: &Option<Vec<u8>>) {
        Self::keep(
            &mut self.state,
            &mut self.bytes,
            &mut self.incomplete,
            max,
            key,
            value,
        );
    }

    /// Keep a cache read (the first of `key`), within `max` bytes in all.
    pub fn cache_read(&mut self, max: usize, key: &str, value: &Option<Vec<u8>>) {
        Self::keep(
            &mut self.cache,
            &mut self.bytes,
            &mut self.incomplete,
            max,
            key,
            value,
        );
    }
}

/// Everything a call wants to change, applied only if it returns ok.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Journal {
    /// State writes by key (a key written twice keeps the last write).
    pub(super) state: BTreeMap<String, PendingState>,
    /// Cache writes in call order.
    pub cache: Vec<CacheOp>,
    /// Emits in call order.
    pub emits: Vec<PendingEmit>,
    /// What the call read (plugins that keep an effect record only).
    pub reads: Reads,
    emitted_bytes: u64,
    /// Bytes of the recorded state and cache writes (keys and values): what the host
    /// holds for the call until it is applied.
    write_bytes: usize,
}

impl Journal {
    /// The state writes as a batch for [`StateStore::apply`](crate::StateStore::apply).
    pub fn state_writes(&self) -> Vec<StateWrite> {
        self.state
            .iter()
            .map(|(key, w)| StateWrite {
                key: key.clone(),
                value: w.value.clone(),
                ttl: w.ttl,
                condition: w.condition.clone(),
            })
            .collect()
    }

    /// State and cache writes recorded (a key written twice counts once).
    pub fn writes(&self) -> usize {
        self.state.len() + self.cache.len()
    }

    /// Bytes the recorded writes and emits hold.
    pub fn bytes(&self) -> u64 {
        self.write_bytes as u64 + self.emitted_bytes
    }

    /// Whether the call changed nothing.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty() && self.cache.is_empty() && self.emits.is_empty()
    }

    /// The journal may hold at most `limits.max-writes` writes and, with the emits, as
    /// many bytes as the plugin's own memory (`limits.memory-mb`): a call cannot make the
    /// host hold more for it than its sandbox may hold itself.
    fn check_budget(
        &self,
        limits: &Limits,
        added_writes: usize,
        added_bytes: usize,
    ) -> Result<(), HostError> {
        let writes = self.writes() + added_writes;
        if writes > limits.max_writes as usize {
            return Err(HostError::Limit(format!(
                "more than {} state and cache writes in one event (limits.max-writes)",
                limits.max_writes
            )));
        }
        let bytes = self.bytes() + added_bytes as u64;
        if bytes > limits.memory_bytes() as u64 {
            return Err(HostError::Limit(format!(
                "the event's writes and emits hold more than {} MiB, its memory limit \
                 (limits.memory-mb); write less per event",
                limits.memory_mb
            )));
        }
        Ok(())
    }

    /// Bytes a pending state write holds in the journal.
    fn state_bytes(key: &str, p: &PendingState) -> usize {
        let value = p.value.as_ref().map_or(0, Vec::len);
        let condition = p
            .condition
            .as_ref()
            .and_then(Option::as_ref)
            .map_or(0, Vec::len);
        key.len() + value + condition
    }

    /// Record a blind write (or delete, `value` `None`) of `key`.
    pub(super) fn record_state(
        &mut self,
        limits: &Limits,
        key: &str,
        value: Option<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<(), HostError> {
        // A later blind write keeps an earlier compare-and-swap's condition: the swap's
        // answer was given to the guest and must still hold when the batch is applied.
        let condition = self.state.get(key).and_then(|p| p.condition.clone());
        self.insert_state(
            limits,
            key,
            PendingState {
                value,
                ttl,
                condition,
            },
        )
    }

    /// Record `pending` as the write of `key`, within the budget.
    pub(super) fn insert_state(
        &mut self,
        limits: &Limits,
        key: &str,
        pending: PendingState,
    ) -> Result<(), HostError> {
        let old = self.state.get(key).map(|p| Self::state_bytes(key, p));
        let new = Self::state_bytes(key, &pending);
        let added = new.saturating_sub(old.unwrap_or(0));
        self.check_budget(limits, usize::from(old.is_none()), added)?;
        self.write_bytes = self.write_bytes + new - old.unwrap_or(0);
        self.state.insert(key.to_string(), pending);
        Ok(())
    }

    /// Record a cache write, within the budget.
    pub(super) fn record_cache(&mut self, limits: &Limits, op: CacheOp) -> Result<(), HostError> {
        let bytes = match &op {
            CacheOp::Set { key, value, .. } => key.len() + value.len(),
            CacheOp::Delete { key } | CacheOp::Incr { key, .. } => key.len() + 8,
        };
        self.check_budget(limits, 1, bytes)?;
        self.write_bytes += bytes;
        self.cache.push(op);
        Ok(())
    }

    /// Record an emit of `event` to `topic` by `plugin` handling `input`, within the
    /// per-event limits, with the runtime's headers added: its idempotency id (`id`, or
    /// one derived from the input and the emit's index), provenance, hop count and trace
    /// context.
    pub(super) fn record_emit(
        &mut self,
        plugin: &PluginInfo,
        input: &Event,
        topic: String,
        event: NewEvent,
        id: Option<String>,
    ) -> Result<(), HostError> {
        let NewEvent {
            key,
            payload,
            headers: mut extra,
        } = event;
        let limits = &plugin.manifest.limits;
        if self.emits.len() as u64 >= u64::from(limits.max_emits) {
            return Err(HostError::Limit(format!(
                "more than {} emits in one event (limits.max-emits)",
                limits.max_emits
            )));
        }
        // Keys and headers are bytes the host holds and publishes as much as payloads.
        let size = payload.len()
            + key.as_ref().map_or(0, Vec::len)
            + extra
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>();
        let bytes = self.emitted_bytes + size as u64;
        if bytes > limits.max_emit_bytes {
            return Err(HostError::Limit(format!(
                "more than {} emitted bytes (keys, headers and payloads) in one event \
                 (limits.max-emit-bytes)",
                limits.max_emit_bytes
            )));
        }
        self.check_budget(limits, 0, size)?;
        let hops = header_str(&input.headers, headers::HOPS)
            .and_then(|h| h.trim().parse::<u32>().ok())
            .unwrap_or(0)
            .saturating_add(1);
        if hops > limits.max_hops {
            return Err(HostError::Limit(format!(
                "this emit would be hop {hops} of a chain of handlers feeding each other \
                 (limits.max-hops = {}): a plugin emitting to its own input, or plugins \
                 emitting to each other's, loop",
                limits.max_hops
            )));
        }
        let index = self.emits.len();
        let id = id.unwrap_or_else(|| idempotency_id(plugin.name(), input, index));
        extra.push(Header::text(headers::IDEMPOTENCY_ID, &id));
        provenance(&mut extra, plugin, input, Some(hops));
        extra.retain(|h| h.name != headers::TRACEPARENT);
        let parent = header_str(&input.headers, headers::TRACEPARENT);
        extra.push(Header::text(
            headers::TRACEPARENT,
            child_traceparent(parent, &input.topic, input.partition, input.offset, &id),
        ));
        self.emitted_bytes = bytes;
        self.emits.push(PendingEmit {
            topic,
            event: NewEvent {
                key,
                payload,
                headers: extra,
            },
        });
        Ok(())
    }

    /// What applying the journal changes, as the checkpointer takes it: the state writes
    /// (with their conditions) in `namespace`, the cache writes and the emits in call
    /// order.
    pub fn into_effects(self, namespace: &str) -> Effects {
        Effects {
            namespace: namespace.to_owned(),
            writes: self.state_writes(),
            cache: self.cache,
            emits: self.emits,
            side: Vec::new(),
            reads: self.reads,
        }
    }
}

/// The idempotency id of emit number `index` of the call handling `event` in `plugin`.
pub fn idempotency_id(plugin: &str, event: &Event, index: usize) -> String {
    format!(
        "{plugin}/{}/{}/{}/{index}",
        event.topic, event.partition, event.offset
    )
}

/// The effects of one event, applied together by the dispatcher's checkpointer: a
/// successful call's journal ([`Journal::into_effects`]) or a dead letter
/// ([`Effects::dead_letter`]).
#[derive(Clone, Debug, Default)]
pub struct Effects {
    /// Namespace of `writes`.
    pub namespace: String,
    /// State writes (with their conditions), applied to the view. Empty when the store
    /// is not fronted by a view (the caller applied them).
    pub writes: Vec<StateWrite>,
    /// Cache writes, applied at the checkpoint.
    pub cache: Vec<CacheOp>,
    /// Emits, published in order by the sender.
    pub emits: Vec<PendingEmit>,
    /// Writes to the runtime's own namespaces (`(namespace, write)`, no conditions) that
    /// belong to the same unit: a redriven event's removal from its parked queue, an
    /// attempt record's removal.
    pub side: Vec<(String, StateWrite)>,
    /// What the call read, for its effect record (empty unless the plugin keeps one; not
    /// applied).
    pub reads: Reads,
}

impl Effects {
    /// `input` written to `plugin`'s dead-letter topic, because of `kind` (`reason`) after
    /// `attempts` attempts: its key, payload and own headers, with the runtime's reserved
    /// ones replaced by the dead letter's and the same provenance an emit carries. It
    /// writes no state, so it can neither conflict nor need the store.
    pub fn dead_letter(
        plugin: &PluginInfo,
        input: &Event,
        kind: DeadLetterKind,
        reason: &str,
        attempts: u32,
    ) -> Self {
        let mut hdrs = input.headers.clone();
        hdrs.retain(|h| !headers::is_reserved(&h.name));
        let reason = truncate_reason(reason.to_string(), 2 * MAX_REASON_LEN);
        hdrs.extend([
            Header::text(headers::DLQ_REASON, &reason),
            Header::text(headers::DLQ_KIND, kind.as_str()),
            Header::text(headers::DLQ_ATTEMPTS, attempts.to_string()),
        ]);
        provenance(&mut hdrs, plugin, input, None);
        hdrs.push(Header::text(
            headers::IDEMPOTENCY_ID,
            format!(
                "dlq/{}/{}/{}/{}",
                plugin.name(),
                input.topic,
                input.partition,
                input.offset
            ),
        ));
        Self {
            emits: vec![PendingEmit {
                topic: plugin.dead_letter_topic.clone(),
                event: NewEvent {
                    key: input.key.clone(),
                    payload: input.payload.clone(),
                    headers: hdrs,
                },
            }],
            ..Self::default()
        }
    }
}

/// Why an event went to the dead-letter topic: its `spate-dlq-kind` header and the
/// `kind` label of `spate_dead_letters_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// The handler asked for retries until its attempts ran out.
    RetriesExhausted,
    /// The handler rejected the event.
    Rejected,
    /// Its compare-and-swap kept losing to concurrent writes until its attempts ran out.
    StateConflict,
    /// A backend refused its effects as invalid (not an outage).
    BackendRefused,
    /// The last attempt trapped.
    Trap(TrapKind),
    /// An operator discarded it from its parked key's queue.
    Discarded,
}

impl DeadLetterKind {
    /// The kind as written in headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetriesExhausted => "retries-exhausted",
            Self::Rejected => "rejected",
            Self::StateConflict => "state-conflict",
            Self::BackendRefused => "backend-refused",
            Self::Trap(k) => k.as_str(),
            Self::Discarded => "discarded",
        }
    }
}

/// The headers saying which plugin version made a record (an emit or a dead letter) from
/// which input event, and, for an emit, its place in a chain of handlers (`hops`).
fn provenance(out: &mut Vec<Header>, plugin: &PluginInfo, input: &Event, hops: Option<u32>) {
    out.push(Header::text(headers::PLUGIN, plugin.name()));
    out.push(Header::text(
        headers::PLUGIN_VERSION,
        plugin.manifest.version.to_string(),
    ));
    out.push(Header::text(headers::PLUGIN_HASH, &plugin.hash));
    if let Some(hops) = hops {
        out.push(Header::text(headers::HOPS, hops.to_string()));
    }
    out.push(Header::text(
        headers::SOURCE,
        format!("{}/{}/{}", input.topic, input.partition, input.offset),
    ));
}

/// The W3C `traceparent` of an emitted event: a child of the input's trace if it carried
/// a valid one, else a trace rooted at the input event. Ids are derived from the input's
/// coordinates and the emit's idempotency id, so a replayed emit carries the same context.
fn child_traceparent(
    parent: Option<&str>,
    topic: &str,
    partition: u32,
    offset: u64,
    idempotency_id: &str,
) -> String {
    use xxhash_rust::xxh3::{xxh3_64, xxh3_128};
    let parsed = parent.and_then(|p| {
        let parts: Vec<&str> = p.trim().split('-').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        match parts.as_slice() {
            [v, trace, span, flags]
                if hex(v, 2)
                    && *v != "ff"
                    && hex(trace, 32)
                    && trace.bytes().any(|b| b != b'0')
                    && hex(span, 16)
                    && hex(flags, 2) =>
            {
                Some((trace.to_ascii_lowercase(), flags.to_ascii_lowercase()))
            }
            _ => None,
        }
    });
    let (trace, flags) = parsed.unwrap_or_else(|| {
        let root = xxh3_128(format!("{topic}/{partition}/{offset}").as_bytes()).max(1);
        (format!("{root:032x}"), "01".to_string())
    });
    let span = xxh3_64(idempotency_id.as_bytes()).max(1);
    format!("00-{trace}-{span:016x}-{flags}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_continue_the_input_trace() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = child_traceparent(Some(parent), "orders", 1, 7, "p/orders/1/7/0");
        let parts: Vec<&str> = child.split('-').collect();
        assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(parts[2], "00f067aa0ba902b7");
        assert_eq!(parts[3], "01");
        // Deterministic: a replayed emit carries the same context.
        assert_eq!(
            child,
            child_traceparent(Some(parent), "orders", 1, 7, "p/orders/1/7/0")
        );
    }

    #[test]
    fn a_missing_or_invalid_parent_roots_a_trace_at_the_input() {
        for bad in [
            None,
            Some("garbage"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ] {
            let t = child_traceparent(bad, "orders", 1, 7, "p/orders/1/7/0");
            let parts: Vec<&str> = t.split('-').collect();
            assert_eq!(
                (parts.len(), parts[0], parts[1].len(), parts[2].len()),
                (4, "00", 32, 16)
            );
            assert_ne!(parts[1], "00000000000000000000000000000000");
        }
        let a = child_traceparent(None, "orders", 1, 7, "p/orders/1/7/0");
        let b = child_traceparent(None, "orders", 1, 7, "p/orders/1/7/1");
        assert_eq!(
            a.split('-').nth(1),
            b.split('-').nth(1),
            "one trace per input event"
        );
        assert_ne!(a, b, "one span per emit");
    }
}
