//! The host API as the guest sees it, minus WebAssembly: capability checks, namespacing,
//! limits and the effect journal of one invocation.
//!
//! Every state, cache and emit call of a handler goes through an [`Invocation`]. Reads see
//! the call's own earlier writes; writes are only recorded in a [`Journal`], which becomes
//! what the dispatcher applies when the handler returns ok (both in [`journal`]). Backends
//! are touched only after the checks here pass, so a backend never sees another plugin's
//! namespace.

pub mod capture;
pub mod journal;
pub mod record;

pub use journal::{CacheOp, DeadLetterKind, Effects, Journal, PendingEmit, Reads, idempotency_id};

use crate::manifest::Manifest;
use crate::types::{Event, Header, NewEvent, headers};
use crate::{BackendError, Cache, StateStore};
use journal::PendingState;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Longest state or cache key accepted from a guest.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest state or cache value accepted from a guest.
pub const MAX_VALUE_LEN: usize = 4 << 20;
/// Most entries one `scan` returns.
pub const MAX_SCAN_LIMIT: u32 = 10_000;
/// Longest retry or reject reason kept from a guest (the rest is cut, and says so).
pub const MAX_REASON_LEN: usize = 4096;
/// Most log lines one call may write; later ones are counted and dropped.
pub const MAX_LOG_LINES_PER_CALL: u32 = 100;
/// Most log bytes one call may write; later lines are counted and dropped.
pub const MAX_LOG_BYTES_PER_CALL: usize = 64 << 10;

/// `text` cut to at most `max` bytes on a character boundary, saying how much was cut.
pub fn truncate_reason(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("… [{} of {total} bytes cut]", total - end));
    text
}

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

/// One call of a handler: its event, its plugin version and its journal.
pub struct Invocation {
    plugin: Arc<PluginInfo>,
    services: HostServices,
    event: Arc<Event>,
    journal: Journal,
    /// Keep the call's reads in its journal, up to this many bytes.
    keep_reads: Option<usize>,
}

impl Invocation {
    /// Start a call of `plugin` on `event`.
    pub fn new(plugin: Arc<PluginInfo>, services: HostServices, event: Arc<Event>) -> Self {
        let record = &plugin.manifest.record;
        let keep_reads = record.enabled.then_some(record.max_bytes);
        Self {
            plugin,
            services,
            event,
            journal: Journal::default(),
            keep_reads,
        }
    }

    /// Keep what the call reads (the first read of each key, up to the plugin's record
    /// size) even if the plugin keeps no effect record: a shadow candidate is served the
    /// same values.
    pub fn keep_reads(&mut self) {
        self.keep_reads = Some(self.plugin.manifest.record.max_bytes);
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
        self.stored(key).await
    }

    /// `key`'s stored value, kept in the call's reads if the plugin keeps an effect record.
    async fn stored(&mut self, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        let value = self.services.state.get(&self.plugin.namespace, key).await?;
        if let Some(max) = self.keep_reads {
            self.journal.reads.state_read(max, key, &value);
        }
        Ok(value)
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
        self.journal
            .record_state(&self.plugin.manifest.limits, key, Some(value), ttl)
    }

    /// `state.delete`.
    pub fn state_delete(&mut self, key: &str) -> Result<(), HostError> {
        Self::check_key(key)?;
        self.journal
            .record_state(&self.plugin.manifest.limits, key, None, None)
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
            None => (self.stored(key).await?, None),
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
        self.journal.insert_state(
            &self.plugin.manifest.limits,
            key,
            PendingState {
                value: new,
                ttl,
                condition,
            },
        )?;
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
        // The answer is copied into the guest's memory: more bytes than that memory holds
        // can never be useful, so the store stops reading there.
        let max_bytes = self.plugin.manifest.limits.memory_bytes();
        let stored = self
            .services
            .state
            .scan_bounded(
                &self.plugin.namespace,
                prefix,
                limit.saturating_add(pending_in_range),
                max_bytes,
            )
            .await?;
        let scanned: usize = stored.iter().map(|(k, v)| k.len() + v.len()).sum();
        if scanned > max_bytes {
            return Err(HostError::Limit(format!(
                "state.scan of prefix `{prefix}` returns more than {} MiB, the plugin's memory \
                 limit (limits.memory-mb); scan with a smaller limit or a longer prefix",
                self.plugin.manifest.limits.memory_mb
            )));
        }
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
        let record = &self.plugin.manifest.record;
        if record.enabled {
            self.journal
                .reads
                .cache_read(record.max_bytes, &full, &stored);
        }
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
        self.journal.record_cache(
            &self.plugin.manifest.limits,
            CacheOp::Set { key, value, ttl },
        )
    }

    /// `cache.delete`.
    pub fn cache_delete(&mut self, key: &str) -> Result<(), HostError> {
        let key = self.cache_key(key)?;
        self.journal
            .record_cache(&self.plugin.manifest.limits, CacheOp::Delete { key })
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
        self.journal.record_cache(
            &self.plugin.manifest.limits,
            CacheOp::Incr { key: full, delta },
        )?;
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
        // `spate-*` headers are the runtime's (provenance, idempotency, workflow starts):
        // a guest may not set any of them.
        let mut extra_headers = extra_headers;
        extra_headers.retain(|h| !headers::is_reserved(&h.name));
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
        // Workflow ids are the plugin's own: another plugin starting the same name and id
        // is another run, never a duplicate of this one.
        let plugin = self.plugin.name().to_string();
        self.record_emit(
            topic,
            Some(id.as_bytes().to_vec()),
            input,
            headers,
            Some(format!("workflow/{plugin}/{name}/{id}")),
        )
    }

    fn record_emit(
        &mut self,
        topic: String,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Vec<Header>,
        id: Option<String>,
    ) -> Result<(), HostError> {
        let event = NewEvent {
            key,
            payload,
            headers,
        };
        self.journal
            .record_emit(&self.plugin, &self.event, topic, event, id)
    }
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
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::manifest::LimitCeilings;
    use crate::{cache::MokaCache, state::EmbeddedStateStore};

    /// An invocation of a plugin with `limits`, on an event with `input_headers`, over an
    /// embedded store in a directory of its own (kept alive with it).
    fn invocation(limits: &str, input_headers: Vec<Header>) -> (tempfile::TempDir, Invocation) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "name = \"p\"\nversion = \"1.0.0\"\nsubscriptions = [{{ topic = \"in\" }}]\n\
             [capabilities]\nemit-topics = [\"out\"]\n[limits]\n{limits}\n"
        );
        let manifest = Manifest::parse(&text, &LimitCeilings::default()).unwrap();
        let services = HostServices {
            state: EmbeddedStateStore::open(dir.path()).unwrap(),
            cache: Arc::new(MokaCache::new(1 << 20)),
            workflow_topic: "workflows".into(),
        };
        let event = Event {
            topic: "in".into(),
            partition: 0,
            offset: 7,
            key: Some(b"k".to_vec()),
            payload: b"{}".to_vec(),
            headers: input_headers,
            timestamp_ms: 0,
        };
        let inv = Invocation::new(
            Arc::new(PluginInfo::new(manifest, "hash".into())),
            services,
            Arc::new(event),
        );
        (dir, inv)
    }

    #[test]
    fn the_journal_holds_at_most_the_plugins_memory_and_max_writes() {
        let (_dir, mut inv) = invocation("memory-mb = 4", vec![]);
        let mib = vec![0u8; 1 << 20];
        // Rewriting one key does not grow the journal.
        for _ in 0..100 {
            inv.state_put("same", mib.clone(), None).unwrap();
        }
        for i in 0..2 {
            inv.state_put(&format!("k{i}"), mib.clone(), None).unwrap();
        }
        let err = inv
            .state_put("one-too-many", mib.clone(), None)
            .unwrap_err();
        assert!(
            matches!(&err, HostError::Limit(m) if m.contains("limits.memory-mb")),
            "{err}"
        );
        let err = inv.cache_set("c", mib, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, HostError::Limit(_)));

        let (_dir2, mut inv) = invocation("max-writes = 10", vec![]);
        for i in 0..10 {
            inv.state_delete(&format!("k{i}")).unwrap();
        }
        let err = inv.state_delete("k10").unwrap_err();
        assert!(
            matches!(&err, HostError::Limit(m) if m.contains("limits.max-writes")),
            "{err}"
        );
    }

    #[test]
    fn emit_bytes_count_keys_and_headers_and_reserved_headers_are_dropped() {
        let (_dir, mut inv) = invocation("max-emit-bytes = 100", vec![]);
        let err = inv
            .emit("out", Some(vec![b'k'; 200]), Vec::new(), vec![])
            .unwrap_err();
        assert!(
            matches!(&err, HostError::Limit(m) if m.contains("max-emit-bytes")),
            "{err}"
        );
        let err = inv
            .emit(
                "out",
                None,
                Vec::new(),
                vec![Header::text("h", "x".repeat(200))],
            )
            .unwrap_err();
        assert!(matches!(err, HostError::Limit(_)));
        let forged = vec![
            Header::text(headers::WORKFLOW, "w"),
            Header::text("SPATE-IDEMPOTENCY-ID", "x"),
            Header::text("mine", "1"),
        ];
        inv.emit("out", None, b"{}".to_vec(), forged).unwrap();
        let journal = inv.take_journal();
        let names: Vec<&str> = journal.emits[0]
            .event
            .headers
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        assert!(names.contains(&"mine"));
        assert!(!names.contains(&headers::WORKFLOW), "{names:?}");
        assert_eq!(
            names
                .iter()
                .filter(|n| n.eq_ignore_ascii_case(headers::IDEMPOTENCY_ID))
                .count(),
            1
        );
    }

    #[test]
    fn emits_carry_a_hop_count_bounded_by_max_hops() {
        let (_dir, mut inv) = invocation("max-hops = 3", vec![Header::text(headers::HOPS, "2")]);
        inv.emit("out", None, b"{}".to_vec(), vec![]).unwrap();
        let journal = inv.take_journal();
        let hops = crate::types::header_str(&journal.emits[0].event.headers, headers::HOPS);
        assert_eq!(hops, Some("3"));
        let (_dir2, mut inv) = invocation("max-hops = 3", vec![Header::text(headers::HOPS, "3")]);
        let err = inv.emit("out", None, b"{}".to_vec(), vec![]).unwrap_err();
        assert!(
            matches!(&err, HostError::Limit(m) if m.contains("max-hops")),
            "{err}"
        );
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let cut = truncate_reason("é".repeat(3000), 4096);
        assert!(
            cut.len() < 4200 && cut.contains("bytes cut"),
            "{}",
            cut.len()
        );
        assert_eq!(truncate_reason("short".into(), 4096), "short");
    }
}
