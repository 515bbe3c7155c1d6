//! A fast cache with expiry, private to the plugin (the WIT `cache` interface).
//!
//! Keys are prefixed with the plugin's cache prefix by the host. Writes are journaled
//! like state writes and applied only when the handler returns `Ok`. A cache may forget
//! anything at any time: keep the source of truth in [`crate::state`].

use crate::{HandlerError, state::ttl_ms, wit::cache as host};
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;

/// The cached value of `key`, or `None` if absent or expired.
pub fn get(key: &str) -> Option<Vec<u8>> {
    host::get(key)
}

/// The cached value of `key` parsed as JSON, or `None` if absent, expired or unreadable.
///
/// A value that does not parse as `T` (say, written by an older plugin version with a
/// different shape) counts as a miss and is logged at `warn`, so the handler falls back
/// to its source of truth instead of failing every event until the entry expires.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Option<T> {
    let bytes = host::get(key)?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            crate::log::warn(&format!(
                "cache value at `{key}` is not valid JSON, treating as a miss: {e}"
            ));
            None
        }
    }
}

/// Cache `value` under `key` for `ttl` (millisecond resolution).
pub fn set(key: &str, value: impl AsRef<[u8]>, ttl: Duration) {
    host::set(key, value.as_ref(), ttl_ms(ttl));
}

/// Cache `value` as JSON under `key` for `ttl`.
pub fn set_json<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    ttl: Duration,
) -> Result<(), HandlerError> {
    set(key, serde_json::to_vec(value)?, ttl);
    Ok(())
}

/// Forget `key`.
pub fn delete(key: &str) {
    host::delete(key);
}

/// Add `delta` to the integer counter at `key` (a missing key counts as 0) and return
/// the new value. A counter created here does not expire.
///
/// Like every cache write, the increment is discarded if the handler fails, so it
/// cannot count attempts of a failing event.
pub fn incr(key: &str, delta: i64) -> i64 {
    host::incr(key, delta)
}
