//! The host API as the guest sees it, minus WebAssembly: capability checks, namespacing,
//! limits and the effect journal of one invocation.
//!
//! Every state, cache and emit call of a handler goes through an [`Invocation`]. Reads see
//! the call's own earlier writes; writes are only recorded in a [`Journal`], which the
//! dispatcher applies when the handler returns ok. Backends are touched only after the
//! checks here pass, so a backend never sees another plugin's namespace.

use crate::backend::{BackendError, Cache, StateStore, StateWrite};
use crate::manifest::Manifest;
use crate::types::{Event, Header, NewEvent, headers};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Longest state or cache key accepted from a guest.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest state or cache value accepted from a guest.
pub const MAX_VALUE_LEN: usize = 4 << 20;
/// Most entries one `scan` returns.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// What the host knows of one loaded plugin version, shared by all its invocations.
#[derive(Debug)]
pub struct PluginInfo {
    /// The manifest.
    pub manifest: Manifest,
    /// Hex sha256 of the component bytes.
    pub hash: String,
    /// Topics the plugin may emit to.
    pub emit_topics: HashSet<String>,
    /// Its state namespace.
    pub namespace: String,
    /// Its cache key prefix.
    pub cache_prefix: String,
    /// Its dead-letter topic.
    pub dead_letter_topic: String,
}

impl PluginInfo {
    /// Derive the host's view of a plugin version from its manifest and content hash.
    pub fn new(manifest: Manifest, hash: String) -> Self {
        Self {
            emit_topics: manifest.capabilities.emit_topics.iter().cloned().collect(),
            namespace: manifest.state_namespace().to_string(),
            cache_prefix: manifest.cache_prefix(),
            dead_letter_topic: manifest.dead_letter_topic(),
            manifest,
            hash,
        }
    }

    /// Plugin name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// `name@version`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }
}

/// The services an invocation reaches through the host API.
#[derive(Clone)]
pub struct HostServices {
    /// Durable state.
    pub state: Arc<dyn StateStore>,
    /// Cache.
    pub cache: Arc<dyn Cache>,
    /// Topic that `start-workflow` emits to.
    pub workflow_topic: String,
}

/// Why a host call aborted the guest. Each variant is a trap kind of its own.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The plugin tried something its manifest does not allow.
    #[error("capability denied: {0}")]
    Capability(String),
    /// The plugin exceeded a manifest limit (emits per event, bytes).
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// The plugin passed an argument the host refuses (empty or oversized key, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A backing service failed; the event is retried later.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// A state write recorded during a call.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PendingState {
    value: Option<Vec<u8>>,
    ttl: Option<Duration>,
    /// The stored value this write requires (from a compare-and-swap), if any.
    condition: Option<Option<Vec<u8>>>,
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

/// Everything a call wants to change, applied only if it returns ok.
#[derive(Clone, Debug, Default)]
pub struct Journal {
    state: BTreeMap<String, PendingState>,
    /// Cache writes in call order.
    pub cache: Vec<CacheOp>,
    /// Emits in call order.
    pub emits: Vec<PendingEmit>,
    emitted_bytes: u64,
}

impl Journal {
    /// The state writes as a batch for [`StateStore::apply`].
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

    /// Whether the call changed nothing.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty() && self.cache.is_empty() && self.emits.is_empty()
    }
}

/// The idempotency id of emit number `index` of the call handling `event` in `plugin`.
pub fn idempotency_id(plugin: &str, event: &Event, index: usize) -> String {
    format!(
        "{plugin}/{}/{}/{}/{index}",
        event.topic, event.partition, event.offset
    )
}

/// One call of a handler: its event, its plugin version and its journal.
pub struct Invocation {
    plugin: Arc<PluginInfo>,
    services: HostServices,
    event: Arc<Event>,
    journal: Journal,
}

impl Invocation {
    /// Start a call of `plugin` on `event`.
    pub fn new(plugin: Arc<PluginInfo>, services: HostServices, event: Arc<Event>) -> Self {
        Self {
            plugin,
            services,
            event,
            journal: Journal::default(),
        }
    }

    /// The plugin version being called.
    pub fn plugin(&self) -> &Arc<PluginInfo> {
        &self.plugin
    }

    /// The event being handled.
    pub fn event(&self) -> &Arc<Event> {
        &self.event
    }

    /// Take the journal, leaving an empty one (a warm instance's next call starts clean).
    pub fn take_journal(&mut self) -> Journal {
        std::mem::take(&mut self.journal)
    }

    /// Discard recorded effects.
    pub fn reset(&mut self, event: Arc<Event>) {
        self.event = event;
        self.journal = Journal::default();
    }

    fn check_key(key: &str) -> Result<(), HostError> {
        if key.is_empty() {
            return Err(HostError::Invalid("key must not be empty".into()));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(HostError::Invalid(format!(
                "key of {} bytes exceeds {MAX_KEY_LEN}",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(value: &[u8]) -> Result<(), HostError> {
        if value.len() > MAX_VALUE_LEN {
            return Err(HostError::Invalid(format!(
                "value of {} bytes exceeds {MAX_VALUE_LEN}",
                value.len()
            )));
        }
        Ok(())
    }

    /// `state.get`: the call's own pending write, else the store.
    pub async fn state_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        Self::check_key(key)?;
        if let Some(p) = self.journal.state.get(key) {
            return Ok(p.value.clone());
        }
        Ok(self.services.state.get(&self.plugin.namespace, key).await?)
    }

    fn record_state(&mut self, key: &str, value: Option<Vec<u8>>, ttl: Option<Duration>) {
        // A later blind write keeps an earlier compare-and-swap's condition: the swap's
        // answer was given to the guest and must still hold when the batch is applied.
        let condition = self
            .journal
            .state
            .get(key)
            .and_then(|p| p.condition.clone());
        self.journal.state.insert(
            key.to_string(),
            PendingState {
                value,
                ttl,
                condition,
            },
        );
    }

    /// `state.put`.
    pub fn state_put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<(), HostError> {
        Self::check_key(key)?;
        Self::check_value(&value)?;
        self.record_state(key, Some(value), ttl);
        Ok(())
    }

    /// `state.delete`.
    pub fn state_delete(&mut self, key: &str) -> Result<(), HostError> {
        Self::check_key(key)?;
        self.record_state(key, None, None);
        Ok(())
    }

    /// `state.compare-and-swap` against the call's view; re-checked when applied.
    pub async fn state_cas(
        &mut self,
        key: &str,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<bool, HostError> {
        Self::check_key(key)?;
        if let Some(v) = &new {
            Self::check_value(v)?;
        }
        let (current, inherited) = match self.journal.state.get(key) {
            Some(p) => (p.value.clone(), Some(p.condition.clone())),
            None => (
                self.services.state.get(&self.plugin.namespace, key).await?,
                None,
            ),
        };
        if current != expected {
            return Ok(false);
        }
        // First touch of this key in the call: the stored value must still be `expected`
        // when the journal is applied. Otherwise the earlier write's condition carries over.
        let condition = match inherited {
            Some(c) => c,
            None => Some(expected),
        };
        self.journal.state.insert(
            key.to_string(),
            PendingState {
                value: new,
                ttl,
                condition,
            },
        );
        Ok(true)
    }

    /// `state.scan`: the store's entries merged with the call's pending writes.
    pub async fn state_scan(
        &mut self,
        prefix: &str,
        limit: u32,
    ) -> Result<Vec<(String, Vec<u8>)>, HostError> {
        let limit = limit.min(MAX_SCAN_LIMIT);
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Pending deletes may hide stored entries, so ask for enough to fill `limit`.
        let pending_in_range = self
            .journal
            .state
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .count() as u32;
        let stored = self
            .services
            .state
            .scan(
                &self.plugin.namespace,
                prefix,
                limit.saturating_add(pending_in_range),
            )
            .await?;
        let mut merged: BTreeMap<String, Vec<u8>> = stored.into_iter().collect();
        for (k, p) in self
            .journal
            .state
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            match &p.value {
                Some(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        Ok(merged.into_iter().take(limit as usize).collect())
    }

    fn cache_key(&self, key: &str) -> Result<String, HostError> {
        Self::check_key(key)?;
        Ok(format!("{}{key}", self.plugin.cache_prefix))
    }

    /// `cache.get`: the call's pending cache write, else the cache.
    pub async fn cache_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        let full = self.cache_key(key)?;
        let mut pending_delta = 0i64;
        for op in self.journal.cache.iter().rev() {
            match op {
                CacheOp::Set { key, value, .. } if *key == full => {
                    return Ok(Some(add_to_counter(value, pending_delta)?));
                }
                CacheOp::Delete { key } if *key == full => {
                    return Ok((pending_delta != 0).then(|| pending_delta.to_string().into()));
                }
                CacheOp::Incr { key, delta } if *key == full => {
                    pending_delta = pending_delta.saturating_add(*delta);
                }
                _ => {}
            }
        }
        let stored = self.services.cache.get(&full).await?;
        match (stored, pending_delta) {
            (v, 0) => Ok(v),
            (Some(v), d) => Ok(Some(add_to_counter(&v, d)?)),
            (None, d) => Ok(Some(d.to_string().into_bytes())),
        }
    }

    /// `cache.set`.
    pub fn cache_set(&mut self, key: &str, value: Vec<u8>, ttl: Duration) -> Result<(), HostError> {
        let key = self.cache_key(key)?;
        Self::check_value(&value)?;
        self.journal.cache.push(CacheOp::Set { key, value, ttl });
        Ok(())
    }

    /// `cache.delete`.
    pub fn cache_delete(&mut self, key: &str) -> Result<(), HostError> {
        let key = self.cache_key(key)?;
        self.journal.cache.push(CacheOp::Delete { key });
        Ok(())
    }

    /// `cache.incr`: the value the counter will have if this call's effects are applied
    /// now; the increment itself is applied with the journal.
    pub async fn cache_incr(&mut self, key: &str, delta: i64) -> Result<i64, HostError> {
        let current = self.cache_get(key).await?;
        let base = match current {
            None => 0,
            Some(v) => parse_counter(&v)?,
        };
        let full = self.cache_key(key)?;
        self.journal.cache.push(CacheOp::Incr { key: full, delta });
        Ok(base.saturating_add(delta))
    }

    /// `emit.emit`: checks the topic against the manifest and the per-event limits.
    pub fn emit(
        &mut self,
        topic: &str,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        extra_headers: Vec<Header>,
    ) -> Result<(), HostError> {
        if !self.plugin.emit_topics.contains(topic) {
            return Err(HostError::Capability(format!(
                "plugin `{}` may not emit to topic `{topic}`; add it to capabilities.emit-topics",
                self.plugin.name()
            )));
        }
        self.record_emit(topic.to_string(), key, payload, extra_headers, None)
    }

    /// `emit.start-workflow`: an emit to the workflow topic whose idempotency id is `id`.
    pub fn start_workflow(
        &mut self,
        name: &str,
        id: &str,
        input: Vec<u8>,
    ) -> Result<(), HostError> {
        if !self.plugin.manifest.may_start_workflow(name) {
            return Err(HostError::Capability(format!(
                "plugin `{}` may not start workflow `{name}`; add it to capabilities.workflows",
                self.plugin.name()
            )));
        }
        if id.is_empty() || id.len() > MAX_KEY_LEN {
            return Err(HostError::Invalid(
                "workflow id must be 1-1024 bytes".into(),
            ));
        }
        let headers = vec![
            Header::text(headers::WORKFLOW, name),
            Header::text(headers::WORKFLOW_ID, id),
        ];
        let topic = self.services.workflow_topic.clone();
        self.record_emit(
            topic,
            Some(id.as_bytes().to_vec()),
            input,
            headers,
            Some(format!("workflow/{name}/{id}")),
        )
    }

    fn record_emit(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        mut extra: Vec<Header>,
        id: Option<String>,
    ) -> Result<(), HostError> {
        let limits = &self.plugin.manifest.limits;
        if self.journal.emits.len() as u64 >= u64::from(limits.max_emits) {
            return Err(HostError::Limit(format!(
                "more than {} emits in one event (limits.max-emits)",
                limits.max_emits
            )));
        }
        let bytes = self.journal.emitted_bytes + payload.len() as u64;
        if bytes > limits.max_emit_bytes {
            return Err(HostError::Limit(format!(
                "more than {} emitted bytes in one event (limits.max-emit-bytes)",
                limits.max_emit_bytes
            )));
        }
        // Guests may not forge the runtime's provenance headers.
        extra.retain(|h| {
            !h.name.starts_with("spate-")
                || h.name == headers::WORKFLOW
                || h.name == headers::WORKFLOW_ID
        });
        let index = self.journal.emits.len();
        let id = id.unwrap_or_else(|| idempotency_id(self.plugin.name(), &self.event, index));
        let e = &self.event;
        extra.push(Header::text(headers::IDEMPOTENCY_ID, &id));
        extra.push(Header::text(headers::PLUGIN, self.plugin.name()));
        extra.push(Header::text(
            headers::PLUGIN_VERSION,
            self.plugin.manifest.version.to_string(),
        ));
        extra.push(Header::text(headers::PLUGIN_HASH, &self.plugin.hash));
        extra.push(Header::text(
            headers::SOURCE,
            format!("{}/{}/{}", e.topic, e.partition, e.offset),
        ));
        extra.retain(|h| h.name != headers::TRACEPARENT);
        let parent = crate::types::header_str(&e.headers, headers::TRACEPARENT);
        extra.push(Header::text(
            headers::TRACEPARENT,
            child_traceparent(parent, &e.topic, e.partition, e.offset, &id),
        ));
        self.journal.emitted_bytes = bytes;
        self.journal.emits.push(PendingEmit {
            topic,
            event: NewEvent {
                key,
                payload,
                headers: extra,
            },
        });
        Ok(())
    }
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

fn parse_counter(v: &[u8]) -> Result<i64, HostError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .ok_or_else(|| HostError::Invalid("cache value is not an integer counter".into()))
}

fn add_to_counter(v: &[u8], delta: i64) -> Result<Vec<u8>, HostError> {
    if delta == 0 {
        return Ok(v.to_vec());
    }
    Ok(parse_counter(v)?
        .saturating_add(delta)
        .to_string()
        .into_bytes())
}

#[cfg(test)]
mod tests {
    use super::child_traceparent;

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
