//! The API's parked-key and dead-letter routes, and the typed bodies they take and answer
//! with (the CLI decodes the same types).
//!
//! Operators list a plugin's parked keys and their queues, and ask for a key to be
//! redriven or discarded, or for dead letters to be sent back through the active version.
//! Nothing here changes parked entries or handles events: every action is a
//! [`parked::Request`] filed in the plugin's parked namespace for the pipeline owning the
//! key's partition, which carries it out in the key's lane within about half a second
//! (see `spate_core::state::parked`). A `202 Accepted` therefore means "filed", not "done";
//! `GET /v1/plugins/{name}/parked` shows the outcome.
//!
//! Routes (all under the API's bearer token):
//! - `GET  /v1/plugins/{name}/parked?limit=N` → [`ParkedList`];
//! - `GET  /v1/plugins/{name}/parked/{key}?limit=N&hex=true` → [`ParkedShow`];
//! - `POST /v1/plugins/{name}/parked/redrive` and `.../parked/discard`, a
//!   [`KeySelection`] → [`Filed`];
//! - `POST /v1/plugins/{name}/dead-letters/redrive`, a [`DeadLetterSelection`] →
//!   [`DeadLetterRedrive`].

use crate::api::events::text_headers;
use crate::api::{ApiError, ApiResult, ApiState, body_error, parse_json, path_error, query_error};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use spate_core::host::PluginInfo;
use spate_core::state::parked::{self, Action, ParkedEvent, ParkedKey, Request};
use spate_core::types::{header_str, headers};
use spate_core::{BackendError, Event};
use spate_core::{StateStore, StateWrite};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Keys or events a listing shows when no `limit` is given.
pub const DEFAULT_LIMIT: u32 = 1000;

/// Most keys or events one listing shows, and most keys one `{"all":true}` acts on.
pub const MAX_LIMIT: u32 = 10_000;

/// Most dead-letter records one `dead-letters/redrive` reads; past it the answer says
/// `truncated`.
pub const MAX_DEAD_LETTERS_SCANNED: u64 = 100_000;

/// Most bytes of dead letters (keys, payloads, headers) one `dead-letters/redrive` holds
/// and files; past it the answer says `truncated`.
pub const MAX_REDRIVE_BYTES: usize = 64 << 20;

/// Records asked of the bus per read while scanning a dead-letter topic.
const READ_BATCH: u64 = 500;

/// Bytes of events one dead-letter request carries at most (one larger event alone
/// excepted): a request is one state entry, and stores bound their values.
const REQUEST_BYTES: usize = 256 << 10;

/// Requests written to the store in one unit at most.
const FILE_BATCH_WRITES: usize = 64;

/// Bytes of requests written in one unit at most (one larger request goes alone): CQL
/// refuses large batches.
const FILE_BATCH_BYTES: usize = 32 << 10;

const KEYS_EXAMPLE: &str =
    r#"{"keys":["c-1","c-2"]} or {"all":true} (add "hex":true if the keys are given in hex)"#;

const DEAD_LETTERS_EXAMPLE: &str = r#"{"key":"c-1","from_ms":1717200000000,"to_ms":1717286400000} (every field optional: {} redrives every dead letter)"#;

// ---------------------------------------------------------------------------------------
// Bodies

/// `GET /v1/plugins/{name}/parked`: the plugin's parked keys, in key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedList {
    /// The plugin.
    pub plugin: String,
    /// Its parked keys (at most the `limit` asked for).
    pub keys: Vec<ParkedKey>,
    /// More keys are parked than listed.
    pub truncated: bool,
}

/// `GET /v1/plugins/{name}/parked/{key}`: one parked key and its queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedShow {
    /// The plugin.
    pub plugin: String,
    /// The key: since when, why, and how many events wait.
    pub key: ParkedKey,
    /// Its parked events in source order (at most the `limit` asked for).
    pub events: Vec<ParkedEventView>,
    /// More events are parked than shown (the `limit`, or the server's read size cap,
    /// `api.max-read-bytes`).
    pub truncated: bool,
}

/// How [`ParkedEventView::payload`] holds the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadEncoding {
    /// The payload is valid UTF-8 and shown as it is.
    #[serde(rename = "utf-8")]
    Utf8,
    /// The payload is binary, shown in standard base64.
    #[serde(rename = "base64")]
    Base64,
}

/// One parked event as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedEventView {
    /// The event's topic.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset.
    pub offset: u64,
    /// Its key, as text when it is UTF-8 (else hex).
    pub key: String,
    /// Its payload, as [`ParkedEventView::payload_encoding`] says.
    pub payload: String,
    /// Whether `payload` is the text itself or base64.
    pub payload_encoding: PayloadEncoding,
    /// Its headers (values as lossy UTF-8).
    pub headers: BTreeMap<String, String>,
    /// When it was appended, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Why it was parked: the failure, or `queued behind a parked event`.
    pub reason: String,
    /// The failure kind (`rejected`, `retries-exhausted`, `trap:…`), or `queued`.
    pub kind: String,
    /// Attempts made on it, redrives included.
    pub attempts: u32,
    /// The version that handled it (or was active when it queued).
    pub version: String,
    /// Wall-clock millis when it was parked.
    pub parked_at_ms: u64,
}

impl ParkedEventView {
    fn new(parked: ParkedEvent) -> Self {
        let ParkedEvent {
            event,
            reason,
            kind,
            attempts,
            version,
            parked_at_ms,
        } = parked;
        let (payload, payload_encoding) = match String::from_utf8(event.payload) {
            Ok(text) => (text, PayloadEncoding::Utf8),
            Err(e) => (BASE64.encode(e.as_bytes()), PayloadEncoding::Base64),
        };
        Self {
            key: parked::display_key(event.key.as_deref()),
            headers: text_headers(&event.headers),
            topic: event.topic,
            partition: event.partition,
            offset: event.offset,
            payload,
            payload_encoding,
            timestamp_ms: event.timestamp_ms,
            reason,
            kind,
            attempts,
            version,
            parked_at_ms,
        }
    }
}

/// The body of `POST .../parked/redrive` and `.../parked/discard`: exactly one of `keys`
/// and `all`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySelection {
    /// The keys to act on, as text (or hex with `hex`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// Act on every parked key (up to [`MAX_LIMIT`]); only `true` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
    /// `keys` are given in hex (for keys that are not UTF-8).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hex: bool,
}

/// One request filed for a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FiledRequest {
    /// The key, as text when it is UTF-8 (else hex).
    pub key: String,
    /// The topic whose pipeline carries it out.
    pub topic: String,
    /// The partition whose owner carries it out.
    pub partition: u32,
    /// The request's id (ids sort in filing order).
    pub id: String,
}

/// The answer of `POST .../parked/redrive` and `.../parked/discard` (`202 Accepted`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filed {
    /// The plugin.
    pub plugin: String,
    /// What was asked.
    pub action: Action,
    /// A request per parked key, in the order given (key order for `all`).
    pub requested: Vec<FiledRequest>,
    /// Keys asked for that are not parked, as given (nothing was filed for them).
    pub not_parked: Vec<String>,
    /// With `all`: more than [`MAX_LIMIT`] keys are parked and the rest were not asked
    /// for; send it again for them.
    #[serde(default)]
    pub truncated: bool,
}

/// The body of `POST .../dead-letters/redrive`: which dead letters to send back through
/// the active version (every field optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSelection {
    /// Only dead letters of this key (as text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Only dead letters written at or after this time (milliseconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    /// Only dead letters written before this time (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<i64>,
}

/// The answer of `POST .../dead-letters/redrive` (`202 Accepted`). Every record in the
/// time range and of the key (`matched`) is filed (`events`) or counted in exactly one of
/// `not_dead_letters`, `other_plugin`, `not_subscribed` and `duplicates`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRedrive {
    /// The plugin.
    pub plugin: String,
    /// Its dead-letter topic, the one read.
    pub topic: String,
    /// Records read.
    pub scanned: u64,
    /// Records in the time range and of the key asked for.
    pub matched: u64,
    /// Dead letters filed for redrive.
    pub events: u64,
    /// Keys (per topic and partition) they belong to.
    pub keys: u64,
    /// Requests filed (a key's dead letters go in order, several per request).
    pub requests: u64,
    /// Matched records that are not dead letters of this runtime (no `spate-source` and
    /// `spate-dlq-kind` headers).
    pub not_dead_letters: u64,
    /// Matched dead letters another plugin wrote (a dead-letter topic shared by plugins).
    pub other_plugin: u64,
    /// Matched dead letters of topics the active version no longer subscribes to.
    pub not_subscribed: u64,
    /// Matched dead letters of an event already filed in this call (dead-lettered again
    /// after an earlier redrive).
    pub duplicates: u64,
    /// The scan stopped early ([`MAX_DEAD_LETTERS_SCANNED`] records, or
    /// [`MAX_REDRIVE_BYTES`] of dead letters): later records were not looked at.
    pub truncated: bool,
}

// ---------------------------------------------------------------------------------------
// Handlers

/// The query of `GET .../parked`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Most keys answered.
    limit: Option<u32>,
}

/// The query of `GET .../parked/{key}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShowQuery {
    /// Most events answered.
    limit: Option<u32>,
    /// The `{key}` path segment is hex (for keys that are not UTF-8, or contain `/`).
    #[serde(default)]
    hex: bool,
}

fn checked_limit(limit: Option<u32>) -> ApiResult<u32> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ApiError::bad("invalid_query", "`limit` must be at least 1")),
        n => Ok(n.min(MAX_LIMIT)),
    }
}

/// The active version's view of plugin `name`; a 404 saying how to find plugins otherwise.
async fn active_info(state: &ApiState, name: &str) -> ApiResult<Arc<PluginInfo>> {
    if let Some(version) = state.runtime.registry.active(name) {
        return Ok(Arc::clone(version.info()));
    }
    let message = match state.runtime.registry.show(name).await {
        Some(_) => format!(
            "plugin `{name}` has no active version; activate one with `POST /v1/plugins/{name}/activate` (`spate plugin activate`)"
        ),
        None => {
            format!("no plugin named `{name}`; `GET /v1/plugins` (`spate plugin ls`) lists them")
        }
    };
    Err(ApiError::NotFound {
        code: "not_found",
        message,
    })
}

/// A state-store failure: the bus's wording of `From<BackendError>` would blame the log.
fn store_error(e: BackendError) -> ApiError {
    ApiError::store(
        e,
        "retry shortly (requests already filed stay filed, and filing one again is harmless)",
    )
}

/// `GET /v1/plugins/{name}/parked`.
pub(crate) async fn list(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<ParkedList>> {
    let Path(name) = name.map_err(path_error)?;
    let Query(query) = query.map_err(query_error)?;
    let limit = checked_limit(query.limit)?;
    let info = active_info(&state, &name).await?;
    let ns = parked::namespace(&info.namespace);
    let store = &state.runtime.backends.store;
    let mut keys = parked::keys(&**store, &ns, limit + 1)
        .await
        .map_err(store_error)?;
    let truncated = keys.len() > limit as usize;
    keys.truncate(limit as usize);
    Ok(Json(ParkedList {
        plugin: name,
        keys,
        truncated,
    }))
}

/// `GET /v1/plugins/{name}/parked/{key}`.
pub(crate) async fn show(
    State(state): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ShowQuery>, QueryRejection>,
) -> ApiResult<Json<ParkedShow>> {
    let Path((name, key)) = path.map_err(path_error)?;
    show_key(state, name, key, query).await
}

/// `GET /v1/plugins/{name}/parked/redrive`: the key named `redrive` (the `POST` route of
/// the same path would otherwise hide it).
pub(crate) async fn show_redrive_key(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<ShowQuery>, QueryRejection>,
) -> ApiResult<Json<ParkedShow>> {
    let Path(name) = name.map_err(path_error)?;
    show_key(state, name, "redrive".into(), query).await
}

/// `GET /v1/plugins/{name}/parked/discard`: the key named `discard`.
pub(crate) async fn show_discard_key(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<ShowQuery>, QueryRejection>,
) -> ApiResult<Json<ParkedShow>> {
    let Path(name) = name.map_err(path_error)?;
    show_key(state, name, "discard".into(), query).await
}

async fn show_key(
    state: ApiState,
    name: String,
    key: String,
    query: Result<Query<ShowQuery>, QueryRejection>,
) -> ApiResult<Json<ParkedShow>> {
    let Query(query) = query.map_err(query_error)?;
    let limit = checked_limit(query.limit)?;
    let key_id = if query.hex {
        checked_hex(&key).map_err(|m| ApiError::bad("invalid_key", m))?
    } else {
        parked::key_id(Some(key.as_bytes()))
    };
    // How the key is named in answers: as text when it is UTF-8, whichever way it came.
    let shown = hex::decode(&key_id)
        .map(|bytes| parked::display_key(Some(&bytes)))
        .unwrap_or(key);
    let info = active_info(&state, &name).await?;
    let ns = parked::namespace(&info.namespace);
    let store = &state.runtime.backends.store;
    let Some(parked_key) = parked::key(&**store, &ns, &key_id)
        .await
        .map_err(store_error)?
    else {
        return Err(ApiError::NotFound {
            code: "not_parked",
            message: format!(
                "key `{shown}` is not parked in plugin `{name}` (a key leaves the parked state once its redrive finishes); `GET /v1/plugins/{name}/parked` (`spate parked ls {name}`) lists the parked keys"
            ),
        });
    };
    // Payloads may be large: the queue is read up to the size of an event read.
    let max_bytes = state.runtime.config.api.max_read_bytes.max(1);
    let raw = store
        .scan_bounded(&ns, &parked::queue_prefix(&key_id), limit + 1, max_bytes)
        .await
        .map_err(store_error)?;
    // The scan returns the entry crossing the cap too: it is shown only if it is the
    // first (a read always shows something), and then more may follow it.
    let found = raw.len();
    let mut bytes = 0usize;
    let mut events = Vec::with_capacity(found.min(limit as usize));
    for (entry, value) in raw.into_iter().take(limit as usize) {
        bytes += entry.len() + value.len();
        if bytes > max_bytes && !events.is_empty() {
            break;
        }
        let parked: ParkedEvent = serde_json::from_slice(&value).map_err(|e| {
            ApiError::internal(format!("parked entry `{entry}` in `{ns}` is corrupt: {e}"))
        })?;
        events.push(ParkedEventView::new(parked));
    }
    let truncated = events.len() < found || bytes > max_bytes;
    Ok(Json(ParkedShow {
        plugin: name,
        key: parked_key,
        events,
        truncated,
    }))
}

/// `key` as the hex key id entries use; a message saying what is wrong otherwise.
fn checked_hex(key: &str) -> Result<String, String> {
    hex::decode(key)
        .map(|bytes| parked::key_id(Some(&bytes)))
        .map_err(|e| {
            format!("`{key}` is not a hex key ({e}); give it as hex digits, e.g. 632d31 for `c-1`")
        })
}

/// What a [`KeySelection`] asks for, checked.
enum Selection {
    /// Every parked key.
    All,
    /// These keys: `(as given, key id)`, without repeats.
    Keys(Vec<(String, String)>),
}

impl KeySelection {
    fn checked(self) -> ApiResult<Selection> {
        let bad = |m: String| ApiError::bad("invalid_body", format!("{m}; send {KEYS_EXAMPLE}"));
        match (self.keys, self.all) {
            (Some(_), Some(_)) => Err(bad("give `keys` or `all`, not both".into())),
            (None, None) => Err(bad("say which keys: `keys` or `all`".into())),
            (None, Some(false)) => Err(bad(
                "`all` may only be true (to act on some keys, list them in `keys`)".into(),
            )),
            (None, Some(true)) if self.hex => Err(bad("`hex` applies to `keys` only".into())),
            (None, Some(true)) => Ok(Selection::All),
            (Some(keys), None) => {
                if keys.is_empty() {
                    return Err(bad("`keys` is empty".into()));
                }
                if keys.len() > MAX_LIMIT as usize {
                    return Err(bad(format!(
                        "{} keys in one request; send at most {MAX_LIMIT}",
                        keys.len()
                    )));
                }
                let mut seen = HashSet::new();
                let mut out = Vec::with_capacity(keys.len());
                for (i, key) in keys.into_iter().enumerate() {
                    let id = if self.hex {
                        checked_hex(&key).map_err(|m| bad(format!("keys[{i}]: {m}")))?
                    } else {
                        parked::key_id(Some(key.as_bytes()))
                    };
                    if seen.insert(id.clone()) {
                        out.push((key, id));
                    }
                }
                Ok(Selection::Keys(out))
            }
        }
    }
}

/// `POST /v1/plugins/{name}/parked/redrive`.
pub(crate) async fn redrive(
    state: State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Filed>)> {
    act_on_keys(state, name, body, Action::Redrive).await
}

/// `POST /v1/plugins/{name}/parked/discard`.
pub(crate) async fn discard(
    state: State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Filed>)> {
    act_on_keys(state, name, body, Action::Discard).await
}

async fn act_on_keys(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
    action: Action,
) -> ApiResult<(StatusCode, Json<Filed>)> {
    let Path(name) = name.map_err(path_error)?;
    let body = body.map_err(|r| body_error(r, state.runtime.config.api.max_body_bytes))?;
    let selection = parse_json::<KeySelection>(&body, KEYS_EXAMPLE)?.checked()?;
    let info = active_info(&state, &name).await?;
    let ns = parked::namespace(&info.namespace);
    let store = &state.runtime.backends.store;
    let mut not_parked = Vec::new();
    let mut truncated = false;
    let targets: Vec<ParkedKey> = match selection {
        Selection::All => {
            let mut keys = parked::keys(&**store, &ns, MAX_LIMIT + 1)
                .await
                .map_err(store_error)?;
            truncated = keys.len() > MAX_LIMIT as usize;
            keys.truncate(MAX_LIMIT as usize);
            keys
        }
        Selection::Keys(keys) => {
            let mut found = Vec::with_capacity(keys.len());
            for (given, id) in keys {
                match parked::key(&**store, &ns, &id).await.map_err(store_error)? {
                    Some(k) => found.push(k),
                    None => not_parked.push(given),
                }
            }
            found
        }
    };
    let requests: Vec<Request> = targets
        .iter()
        .map(|k| Request::new(action, &k.topic, k.partition, &k.key_id, vec![]))
        .collect();
    file_all(Arc::clone(store), ns, &requests).await?;
    let requested: Vec<FiledRequest> = targets
        .into_iter()
        .zip(&requests)
        .map(|(k, r)| FiledRequest {
            key: k.key,
            topic: k.topic,
            partition: k.partition,
            id: r.id.clone(),
        })
        .collect();
    tracing::info!(plugin = %name, action = action.as_str(), keys = requested.len(), not_parked = not_parked.len(), "operator requests filed");
    Ok((
        StatusCode::ACCEPTED,
        Json(Filed {
            plugin: name,
            action,
            requested,
            not_parked,
            truncated,
        }),
    ))
}

/// File `requests`, in order, several per store write. The writing runs on a task of its
/// own, so a request cut by the time limit or a client that goes away cannot leave the
/// chunks of one key's redrive half filed.
async fn file_all(store: Arc<dyn StateStore>, ns: String, requests: &[Request]) -> ApiResult<()> {
    let mut units: Vec<Vec<StateWrite>> = Vec::new();
    let mut unit_bytes = 0usize;
    for request in requests {
        let write = parked::put(parked::request_entry(request), request, None);
        let size = write.key.len() + write.value.as_ref().map_or(0, Vec::len);
        match units.last_mut() {
            Some(unit)
                if unit.len() < FILE_BATCH_WRITES && unit_bytes + size <= FILE_BATCH_BYTES =>
            {
                unit_bytes += size;
                unit.push(write);
            }
            _ => {
                unit_bytes = size;
                units.push(vec![write]);
            }
        }
    }
    if units.is_empty() {
        return Ok(());
    }
    tokio::spawn(async move {
        for unit in units {
            store.apply(&ns, &unit).await?;
        }
        Ok::<_, BackendError>(())
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(store_error)
}

/// `POST /v1/plugins/{name}/dead-letters/redrive`: reads the plugin's dead-letter topic
/// from its start, keeps the dead letters asked for (of topics the active version still
/// subscribes to, each source event once) and files their redrive, per key in source
/// order.
pub(crate) async fn redrive_dead_letters(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<DeadLetterRedrive>)> {
    let Path(name) = name.map_err(path_error)?;
    let body = body.map_err(|r| body_error(r, state.runtime.config.api.max_body_bytes))?;
    let selection: DeadLetterSelection = parse_json(&body, DEAD_LETTERS_EXAMPLE)?;
    if let (Some(from), Some(to)) = (selection.from_ms, selection.to_ms)
        && from >= to
    {
        return Err(ApiError::bad(
            "invalid_body",
            format!(
                "`from_ms` ({from}) must be before `to_ms` ({to}), which is exclusive; send {DEAD_LETTERS_EXAMPLE}"
            ),
        ));
    }
    let info = active_info(&state, &name).await?;
    let bus = &state.runtime.backends.bus;
    let topic = info.dead_letter_topic.clone();
    let mut out = DeadLetterRedrive {
        plugin: name.clone(),
        topic: topic.clone(),
        ..DeadLetterRedrive::default()
    };
    let Some(partitions) = bus.partitions(&topic).await? else {
        return Ok((StatusCode::ACCEPTED, Json(out)));
    };
    let ends = bus.end_offsets(&topic).await?;
    let subscribed: HashSet<&str> = info
        .manifest
        .subscriptions
        .iter()
        .map(|s| s.topic.as_str())
        .collect();
    let key = selection.key.as_ref().map(|k| k.as_bytes());
    let in_range = |ts: i64| {
        selection.from_ms.is_none_or(|from| ts >= from) && selection.to_ms.is_none_or(|to| ts < to)
    };
    let mut seen: HashSet<(String, u32, u64)> = HashSet::new();
    let mut groups: BTreeMap<Lane, Vec<Event>> = BTreeMap::new();
    let mut held = 0usize;
    'scan: for p in 0..partitions {
        let end = ends.get(p as usize).copied().unwrap_or(0);
        let mut at = 0u64;
        while at < end {
            let budget = MAX_DEAD_LETTERS_SCANNED - out.scanned;
            if budget == 0 {
                out.truncated = true;
                break 'scan;
            }
            let want = READ_BATCH.min(budget).min(end - at);
            let batch = bus
                .read(&topic, p, at, usize::try_from(want).unwrap_or(usize::MAX))
                .await?;
            let Some(last) = batch.last() else {
                break;
            };
            at = last.offset + 1;
            for record in batch {
                if record.offset >= end {
                    break;
                }
                out.scanned += 1;
                if !in_range(record.timestamp_ms)
                    || key.is_some_and(|k| record.key.as_deref() != Some(k))
                {
                    continue;
                }
                let Some(source) = parked::dead_letter_source(&record) else {
                    out.matched += 1;
                    out.not_dead_letters += 1;
                    continue;
                };
                if header_str(&record.headers, headers::PLUGIN).is_some_and(|p| p != name) {
                    out.matched += 1;
                    out.other_plugin += 1;
                    continue;
                }
                if !subscribed.contains(source.topic.as_str()) {
                    out.matched += 1;
                    out.not_subscribed += 1;
                    continue;
                }
                let coordinates = (source.topic.clone(), source.partition, source.offset);
                if seen.contains(&coordinates) {
                    out.matched += 1;
                    out.duplicates += 1;
                    continue;
                }
                let size = source.held_bytes();
                if held + size > MAX_REDRIVE_BYTES {
                    out.truncated = true;
                    break 'scan;
                }
                out.matched += 1;
                seen.insert(coordinates);
                held += size;
                out.events += 1;
                groups
                    .entry((source.topic.clone(), source.partition, source.key.clone()))
                    .or_default()
                    .push(source);
            }
        }
    }
    out.keys = groups.len() as u64;
    let requests = plan(groups);
    out.requests = requests.len() as u64;
    file_all(
        Arc::clone(&state.runtime.backends.store),
        parked::namespace(&info.namespace),
        &requests,
    )
    .await?;
    tracing::info!(plugin = %name, events = out.events, requests = out.requests, truncated = out.truncated, "dead-letter redrive filed");
    Ok((StatusCode::ACCEPTED, Json(out)))
}

/// The lane a redriven dead letter runs in: its original topic, partition and key.
type Lane = (String, u32, Option<Vec<u8>>);

/// The requests redriving each lane's dead letters in source order: at most
/// [`parked::MAX_REQUEST_EVENTS`] and [`REQUEST_BYTES`] each, one lane's made one after
/// the other, so their ids sort in the order they must run.
fn plan(groups: BTreeMap<Lane, Vec<Event>>) -> Vec<Request> {
    let mut requests = Vec::new();
    for ((topic, partition, key), mut events) in groups {
        events.sort_by_key(|e| e.offset);
        let key_id = parked::key_id(key.as_deref());
        let mut chunk: Vec<Event> = Vec::new();
        let mut bytes = 0usize;
        for event in events {
            let size = event.held_bytes();
            if !chunk.is_empty()
                && (chunk.len() >= parked::MAX_REQUEST_EVENTS || bytes + size > REQUEST_BYTES)
            {
                requests.push(Request::new(
                    Action::RedriveDeadLetters,
                    &topic,
                    partition,
                    &key_id,
                    std::mem::take(&mut chunk),
                ));
                bytes = 0;
            }
            bytes += size;
            chunk.push(event);
        }
        if !chunk.is_empty() {
            requests.push(Request::new(
                Action::RedriveDeadLetters,
                &topic,
                partition,
                &key_id,
                chunk,
            ));
        }
    }
    requests
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn event(key: &str, offset: u64, payload_len: usize) -> Event {
        Event {
            topic: "orders".into(),
            partition: 2,
            offset,
            key: Some(key.as_bytes().to_vec()),
            payload: vec![b'x'; payload_len],
            headers: vec![],
            timestamp_ms: 0,
        }
    }

    #[test]
    fn a_keys_dead_letters_are_chunked_in_source_order_with_ids_in_that_order() {
        let mut groups: BTreeMap<Lane, Vec<Event>> = BTreeMap::new();
        // 600 events of c-1 out of order, 2 of c-2.
        let mut offsets: Vec<u64> = (0..600).map(|i| i * 2).collect();
        offsets.reverse();
        offsets.swap(10, 400);
        let lane = |k: &str| ("orders".to_string(), 2, Some(k.as_bytes().to_vec()));
        groups.insert(
            lane("c-1"),
            offsets.iter().map(|o| event("c-1", *o, 10)).collect(),
        );
        groups.insert(lane("c-2"), vec![event("c-2", 7, 10), event("c-2", 3, 10)]);
        let requests = plan(groups);
        let shape: Vec<(String, usize)> = requests
            .iter()
            .map(|r| (r.key_id.clone(), r.events.len()))
            .collect();
        let (c1, c2) = (parked::key_id(Some(b"c-1")), parked::key_id(Some(b"c-2")));
        assert_eq!(
            shape,
            vec![
                (c1.clone(), 256),
                (c1.clone(), 256),
                (c1.clone(), 88),
                (c2.clone(), 2)
            ]
        );
        let c1_offsets: Vec<u64> = requests[..3]
            .iter()
            .flat_map(|r| r.events.iter().map(|e| e.offset))
            .collect();
        assert_eq!(c1_offsets, (0..600).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(
            requests[3]
                .events
                .iter()
                .map(|e| e.offset)
                .collect::<Vec<_>>(),
            vec![3, 7]
        );
        for pair in requests.windows(2) {
            assert!(pair[0].id < pair[1].id, "{} < {}", pair[0].id, pair[1].id);
        }
        assert!(
            requests
                .iter()
                .all(|r| r.action == Action::RedriveDeadLetters
                    && r.topic == "orders"
                    && r.partition == 2)
        );
    }

    #[test]
    fn large_dead_letters_are_split_by_size_one_large_one_alone() {
        let mut groups: BTreeMap<Lane, Vec<Event>> = BTreeMap::new();
        groups.insert(
            ("orders".into(), 2, None),
            vec![
                event("k", 0, 100 << 10),
                event("k", 1, 100 << 10),
                event("k", 2, 100 << 10),
                event("k", 3, 1 << 20),
                event("k", 4, 10),
            ],
        );
        let sizes: Vec<Vec<u64>> = plan(groups)
            .iter()
            .map(|r| r.events.iter().map(|e| e.offset).collect())
            .collect();
        assert_eq!(sizes, vec![vec![0, 1], vec![2], vec![3], vec![4]]);
    }

    #[test]
    fn a_key_selection_is_exactly_one_of_keys_and_all() {
        let sel = |json: &str| {
            serde_json::from_str::<KeySelection>(json)
                .unwrap()
                .checked()
        };
        let code = |r: ApiResult<Selection>| match r {
            Err(e) => (e.status(), e.code()),
            Ok(_) => panic!("accepted"),
        };
        assert_eq!(
            code(sel(r#"{"keys":["a"],"all":true}"#)),
            (StatusCode::BAD_REQUEST, "invalid_body")
        );
        assert_eq!(code(sel("{}")).1, "invalid_body");
        assert_eq!(code(sel(r#"{"all":false}"#)).1, "invalid_body");
        assert_eq!(code(sel(r#"{"keys":[]}"#)).1, "invalid_body");
        assert_eq!(code(sel(r#"{"keys":["zz"],"hex":true}"#)).1, "invalid_body");
        assert!(serde_json::from_str::<KeySelection>(r#"{"key":"a"}"#).is_err());
        assert!(matches!(sel(r#"{"all":true}"#), Ok(Selection::All)));
        match sel(r#"{"keys":["632d31","632d31","ff00"],"hex":true}"#) {
            Ok(Selection::Keys(keys)) => assert_eq!(
                keys,
                vec![
                    ("632d31".to_string(), "632d31".to_string()),
                    ("ff00".to_string(), "ff00".to_string())
                ]
            ),
            _ => panic!("refused"),
        }
        match sel(r#"{"keys":["c-1"]}"#) {
            Ok(Selection::Keys(keys)) => {
                assert_eq!(keys, vec![("c-1".to_string(), "632d31".to_string())])
            }
            _ => panic!("refused"),
        }
    }
}
