//! Follow-up events and workflow starts (the WIT `emit` interface).
//!
//! Emits are journaled and published only when the handler returns `Ok`, each with an
//! idempotency id derived from the input event and the emit's index in the call. A
//! plugin may only emit to the topics and start the workflows its manifest declares;
//! anything else aborts the call and dead-letters the event.

use crate::{HandlerError, wit::emit as host, wit::types::Header};
use serde::Serialize;

/// The partition key of an emitted event: bytes, text, or none.
///
/// Built implicitly from `&str`, `&String`, `&[u8]`, `&Vec<u8>`, byte-string literals
/// and `Option`s of those (such as [`crate::Event::key`]); use [`Key::NONE`] for an
/// unkeyed event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Key<'a>(Option<&'a [u8]>);

impl Key<'_> {
    /// No key: the runtime picks a partition.
    pub const NONE: Key<'static> = Key(None);
}

impl<'a> From<&'a str> for Key<'a> {
    fn from(k: &'a str) -> Self {
        Key(Some(k.as_bytes()))
    }
}

impl<'a> From<&'a String> for Key<'a> {
    fn from(k: &'a String) -> Self {
        Key(Some(k.as_bytes()))
    }
}

impl<'a> From<&'a [u8]> for Key<'a> {
    fn from(k: &'a [u8]) -> Self {
        Key(Some(k))
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Key<'a> {
    fn from(k: &'a [u8; N]) -> Self {
        Key(Some(k))
    }
}

impl<'a> From<&'a Vec<u8>> for Key<'a> {
    fn from(k: &'a Vec<u8>) -> Self {
        Key(Some(k))
    }
}

impl<'a> From<Option<&'a [u8]>> for Key<'a> {
    fn from(k: Option<&'a [u8]>) -> Self {
        Key(k)
    }
}

impl<'a> From<Option<&'a str>> for Key<'a> {
    fn from(k: Option<&'a str>) -> Self {
        Key(k.map(str::as_bytes))
    }
}

/// Publish `payload` on `topic`, partitioned by `key`.
pub fn emit<'k>(topic: &str, key: impl Into<Key<'k>>, payload: impl AsRef<[u8]>) {
    host::emit(topic, key.into().0, payload.as_ref(), &[]);
}

/// Publish `payload` on `topic` with `headers` as `(name, value)` pairs.
pub fn emit_with_headers<'k>(
    topic: &str,
    key: impl Into<Key<'k>>,
    payload: impl AsRef<[u8]>,
    headers: &[(&str, &[u8])],
) {
    let headers: Vec<Header> = headers
        .iter()
        .map(|(name, value)| Header {
            name: (*name).to_owned(),
            value: value.to_vec(),
        })
        .collect();
    host::emit(topic, key.into().0, payload.as_ref(), &headers);
}

/// Publish `value` serialized as JSON on `topic`, partitioned by `key`.
pub fn emit_json<'k, T: Serialize + ?Sized>(
    topic: &str,
    key: impl Into<Key<'k>>,
    value: &T,
) -> Result<(), HandlerError> {
    emit(topic, key, serde_json::to_vec(value)?);
    Ok(())
}

/// Start the workflow `name` for run `id` with `input`.
///
/// Starting the same `id` twice is one run, so a retried event never starts a
/// duplicate: derive `id` from the input (an order id, say), not from a counter.
pub fn start_workflow(name: &str, id: &str, input: impl AsRef<[u8]>) {
    host::start_workflow(name, id, input.as_ref());
}

/// Start the workflow `name` for run `id` with `input` serialized as JSON.
pub fn start_workflow_json<T: Serialize + ?Sized>(
    name: &str,
    id: &str,
    input: &T,
) -> Result<(), HandlerError> {
    start_workflow(name, id, serde_json::to_vec(input)?);
    Ok(())
}
