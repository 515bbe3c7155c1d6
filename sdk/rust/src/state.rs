//! Durable key-value state, private to the plugin (the WIT `state` interface).
//!
//! Keys live in the plugin's own namespace. Writes are journaled and applied only when
//! the handler returns `Ok`; reads within the same call see the call's earlier writes.
//! Store outages never reach the guest: the host aborts and retries the call.

use crate::{HandlerError, wit::state as host};
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;

/// One key and its value, as returned by [`scan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value stored under it.
    pub value: Vec<u8>,
}

impl Entry {
    /// The value parsed as JSON into `T`; rejects the event if it does not parse.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        decode(&self.key, &self.value)
    }
}

/// The value stored under `key`, or `None` if there is none (or it has expired).
pub fn get(key: &str) -> Option<Vec<u8>> {
    host::get(key)
}

/// The value under `key` parsed as JSON, or `None` if there is none.
///
/// A stored value that does not parse as `T` rejects the event with the key and
/// serde's reason: retrying would read the same bytes again.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, HandlerError> {
    host::get(key).map(|v| decode(key, &v)).transpose()
}

/// Store `value` under `key` until it is deleted.
pub fn put(key: &str, value: impl AsRef<[u8]>) {
    host::put(key, value.as_ref(), None);
}

/// Store `value` under `key`; it expires after `ttl` (millisecond resolution).
pub fn put_with_ttl(key: &str, value: impl AsRef<[u8]>, ttl: Duration) {
    host::put(key, value.as_ref(), Some(ttl_ms(ttl)));
}

/// Store `value` as JSON under `key` until it is deleted.
pub fn put_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), HandlerError> {
    put(key, serde_json::to_vec(value)?);
    Ok(())
}

/// Store `value` as JSON under `key`; it expires after `ttl`.
pub fn put_json_with_ttl<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    ttl: Duration,
) -> Result<(), HandlerError> {
    put_with_ttl(key, serde_json::to_vec(value)?, ttl);
    Ok(())
}

/// Remove `key`. Removing a missing key is not an error.
pub fn delete(key: &str) {
    host::delete(key);
}

/// Replace the value of `key` with `new` (remove it when `new` is `None`) only if its
/// current value equals `expected` (`None`: the key must be absent). Returns whether
/// the swap happened.
///
/// The host checks the condition again when it applies the journal; if another event
/// changed the key in between, this event is retried, so a `true` is never lost.
pub fn compare_and_swap(key: &str, expected: Option<&[u8]>, new: Option<&[u8]>) -> bool {
    host::compare_and_swap(key, expected, new, None)
}

/// [`compare_and_swap`] whose new value expires after `ttl`.
pub fn compare_and_swap_with_ttl(
    key: &str,
    expected: Option<&[u8]>,
    new: Option<&[u8]>,
    ttl: Duration,
) -> bool {
    host::compare_and_swap(key, expected, new, Some(ttl_ms(ttl)))
}

/// Up to `limit` entries whose keys start with `prefix`, in key order.
pub fn scan(prefix: &str, limit: u32) -> Vec<Entry> {
    host::scan(prefix, limit)
        .into_iter()
        .map(|e| Entry {
            key: e.key,
            value: e.value,
        })
        .collect()
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| HandlerError::reject(format!("state value at `{key}` is not valid JSON: {e}")))
}

/// Milliseconds, saturating: a TTL beyond `u64::MAX` ms is "forever" in practice.
pub(crate) fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}
