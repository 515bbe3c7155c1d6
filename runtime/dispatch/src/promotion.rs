//! Promotion at an offset cut: when a shadow candidate is promoted, each partition gets a
//! cut, the next offset its pipeline had not yet read. Events below the cut are handled by
//! the version that was active, events at or above it by the promoted one, whatever order
//! the key lanes start them in, so every event is handled by exactly one of the two.
//!
//! A cut is made durable in the state store before any event at or above it is handled by
//! the new version, with a conditional write that keeps the first one written: a restart,
//! or the partition's next owner after a rebalance, loads it and splits the same way (the
//! old version stays loaded for that). A partition no pipeline held at the promotion gets
//! its cut when it is next assigned: its start position (everything from there is new).
//!
//! Layout, in the reserved namespace `_spate/promotion/<plugin>`:
//! `<id, 20 digits>/<topic>/<partition, 10 digits>` = the cut offset in decimal.

use spate_core::manifest::RESERVED_NAMESPACE_PREFIX;
use spate_core::plugin::PluginVersion;
use spate_core::{ApplyOutcome, BackendError, BackendResult, StateStore, StateWrite};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A promotion in effect: its id and the version it replaced.
pub struct Promotion {
    /// The registry's promotion id.
    pub id: u64,
    /// The version events below the cuts are handled by.
    pub old: Arc<dyn PluginVersion>,
}

/// Where plugin `plugin` keeps its promotions' cuts.
pub fn namespace(plugin: &str) -> String {
    format!("{RESERVED_NAMESPACE_PREFIX}/promotion/{plugin}")
}

fn prefix(id: u64) -> String {
    format!("{id:020}/")
}

fn key(id: u64, topic: &str, partition: u32) -> String {
    format!("{id:020}/{topic}/{partition:010}")
}

/// The cut of `topic`/`partition` for promotion `id`: the one stored, or else `proposed`,
/// stored now (the first writer wins; its cut is returned).
pub async fn cut(
    store: &dyn StateStore,
    plugin: &str,
    id: u64,
    (topic, partition): (&str, u32),
    proposed: u64,
) -> BackendResult<u64> {
    let ns = namespace(plugin);
    let key = key(id, topic, partition);
    loop {
        if let Some(v) = store.get(&ns, &key).await? {
            return parse(&v);
        }
        let write = StateWrite {
            key: key.clone(),
            value: Some(proposed.to_string().into_bytes()),
            ttl: None,
            condition: Some(None),
        };
        match store.apply(&ns, std::slice::from_ref(&write)).await? {
            ApplyOutcome::Applied => return Ok(proposed),
            // Another runtime wrote it first: read theirs.
            ApplyOutcome::Conflict { .. } => continue,
        }
    }
}

fn parse(v: &[u8]) -> BackendResult<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BackendError::Corrupt("a promotion cut is not an offset".into()))
}

/// Every cut of promotion `id`, by `topic/partition`.
pub async fn cuts(
    store: &dyn StateStore,
    plugin: &str,
    id: u64,
) -> BackendResult<BTreeMap<String, u64>> {
    let p = prefix(id);
    let mut out = BTreeMap::new();
    for (k, v) in store.scan(&namespace(plugin), &p, 100_000).await? {
        let Some((topic, partition)) = k[p.len()..].rsplit_once('/') else {
            continue;
        };
        let partition = partition.trim_start_matches('0');
        let partition = if partition.is_empty() { "0" } else { partition };
        out.insert(format!("{topic}/{partition}"), parse(&v)?);
    }
    Ok(out)
}
