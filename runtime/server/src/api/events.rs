//! Topics and their events: appending, reading from per-partition cursors within the
//! byte cap, and a topic's partitions and end offsets; and the typed bodies these routes
//! take and answer with (the CLI decodes the same types).
//!
//! Routes (all under the API's bearer token):
//! - `POST /v1/topics/{topic}/events`, one [`AppendEvent`] or an [`AppendBatch`] →
//!   [`AppendedEvents`] (201);
//! - `GET /v1/topics/{topic}/events?partition=P&offset=O&from=P:O,..&limit=N` →
//!   [`EventPage`] of [`EventView`]s;
//! - `GET /v1/topics/{topic}` → [`TopicInfo`].
//!
//! The answers' fields are declared in the order these bodies have always had (name
//! order, but for the page, which the handler writes by hand as it reads).

use super::*;

/// One event of an append: the whole body of `POST /v1/topics/{topic}/events`, or one of
/// an [`AppendBatch`]'s. Exactly one of `payload` and `payload_base64`; at most one of
/// `key` and `key_base64`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendEvent {
    /// Text headers (names starting with `spate-` are the runtime's and refused).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The partition key, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The partition key, binary in standard base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    /// The payload, any JSON (stored as its JSON text). Present-but-null is a JSON `null`
    /// payload, not a missing one.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub payload: Option<Value>,
    /// The payload, binary in standard base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

/// The batch body of `POST /v1/topics/{topic}/events`: 1 to
/// [`MAX_EVENTS_PER_REQUEST`] events, appended in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendBatch {
    /// The events.
    pub events: Vec<AppendEvent>,
}

/// The answer of `POST /v1/topics/{topic}/events` (`201 Created`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendedEvents {
    /// Where each event landed, in the order sent.
    pub appended: Vec<Appended>,
}

/// `GET /v1/topics/{topic}`: the topic's partitions and where each ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    /// Per partition, the offset the next event gets.
    pub end_offsets: Vec<u64>,
    /// Its partition count.
    pub partitions: u32,
    /// The topic.
    pub topic: String,
}

/// One event as the API shows it: the key as text when it is UTF-8 (else `key_base64`),
/// the payload as JSON when it parses (else `payload_text` when it is UTF-8, else
/// `payload_base64`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    /// Its headers (values as lossy UTF-8).
    pub headers: BTreeMap<String, String>,
    /// Its key when it is UTF-8: `Some(None)` is an event without a key (`"key":null`);
    /// `None` (no `key` field) a binary key, in `key_base64`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub key: Option<Option<String>>,
    /// Its key in standard base64 when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_base64: Option<String>,
    /// Its offset.
    pub offset: u64,
    /// Its partition.
    pub partition: u32,
    /// Its payload when it is JSON (a JSON `null` payload is `Some(Value::Null)`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub payload: Option<Value>,
    /// Its payload in standard base64 when it is neither JSON nor UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Its payload when it is UTF-8 text but not JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_text: Option<String>,
    /// When it was appended, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Its topic.
    pub topic: String,
}

impl EventView {
    /// How the API shows `e`.
    pub fn new(e: &Event) -> Self {
        let (key, key_base64) = match e.key.as_deref() {
            None => (Some(None), None),
            Some(k) => match std::str::from_utf8(k) {
                Ok(s) => (Some(Some(s.to_string())), None),
                Err(_) => (None, Some(BASE64.encode(k))),
            },
        };
        let (payload, payload_text, payload_base64) =
            match serde_json::from_slice::<Value>(&e.payload) {
                Ok(v) => (Some(v), None, None),
                Err(_) => match std::str::from_utf8(&e.payload) {
                    Ok(s) => (None, Some(s.to_string()), None),
                    Err(_) => (None, None, Some(BASE64.encode(&e.payload))),
                },
            };
        Self {
            headers: text_headers(&e.headers),
            key,
            key_base64,
            offset: e.offset,
            partition: e.partition,
            payload,
            payload_base64,
            payload_text,
            timestamp_ms: e.timestamp_ms,
            topic: e.topic.clone(),
        }
    }
}

/// Headers as the API shows them: by name (the last of a repeated name), values as lossy
/// UTF-8.
pub(crate) fn text_headers(headers: &[Header]) -> BTreeMap<String, String> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.clone(),
                String::from_utf8_lossy(&h.value).into_owned(),
            )
        })
        .collect()
}

/// `GET /v1/topics/{topic}/events`: a page of events and where the next page starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPage {
    /// The topic.
    pub topic: String,
    /// The events, each partition's in offset order.
    pub events: Vec<EventView>,
    /// Per partition read (its number as text), the offset to read from next.
    pub next: BTreeMap<String, u64>,
    /// `next` as a `from` query value (`0:12,1:4`).
    pub next_from: String,
    /// Some partition stopped at its share of the byte cap (`api.max-read-bytes`) with
    /// events left.
    pub truncated: bool,
    /// Bytes of events in the answer.
    pub bytes: usize,
}

pub(super) fn checked_topic(topic: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Path(topic) = topic.map_err(path_error)?;
    if valid_topic(&topic) {
        Ok(topic)
    } else {
        Err(ApiError::bad(
            "invalid_topic",
            format!("`{topic}` is not a valid topic name: use 1-249 of A-Z a-z 0-9 . _ -"),
        ))
    }
}

/// A field that is present, even as `null`, deserializes to `Some`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

pub(super) const EVENT_EXAMPLE: &str =
    r#"{"key":"c-1","payload":{"amount":3},"headers":{"source":"web"}} or {"events":[...]}"#;

impl AppendEvent {
    fn into_new_event(self) -> Result<NewEvent, String> {
        let key = match (self.key, self.key_base64) {
            (Some(_), Some(_)) => return Err("give `key` or `key_base64`, not both".into()),
            (Some(k), None) => Some(k.into_bytes()),
            (None, Some(b)) => Some(
                BASE64
                    .decode(b.as_bytes())
                    .map_err(|e| format!("`key_base64` is not valid base64: {e}"))?,
            ),
            (None, None) => None,
        };
        let payload = match (self.payload, self.payload_base64) {
            (Some(_), Some(_)) => {
                return Err("give `payload` or `payload_base64`, not both".into());
            }
            (Some(v), None) => serde_json::to_vec(&v).map_err(|e| e.to_string())?,
            (None, Some(b)) => BASE64
                .decode(b.as_bytes())
                .map_err(|e| format!("`payload_base64` is not valid base64: {e}"))?,
            (None, None) => {
                return Err(
                    "the event has no `payload` (any JSON) or `payload_base64` (binary)".into(),
                );
            }
        };
        if self.headers.keys().any(String::is_empty) {
            return Err("header names must not be empty".into());
        }
        // The runtime's own headers drive deduplication, provenance and workflow starts: a
        // producer setting one could have its event silently dropped as a duplicate.
        if let Some(name) = self.headers.keys().find(|n| headers::is_reserved(n)) {
            return Err(format!(
                "header `{name}` is reserved: names starting with `spate-` are set by the runtime"
            ));
        }
        let headers = self
            .headers
            .into_iter()
            .map(|(name, value)| Header::text(name, value))
            .collect();
        Ok(NewEvent {
            key,
            payload,
            headers,
        })
    }
}

pub(super) fn parse_events(body: &[u8]) -> ApiResult<Vec<NewEvent>> {
    let value: Value = parse_json(body, EVENT_EXAMPLE)?;
    let Value::Object(mut object) = value else {
        return Err(ApiError::bad(
            "invalid_event",
            format!("the body must be a JSON object: {EVENT_EXAMPLE}"),
        ));
    };
    if let Some(events) = object.remove("events") {
        if let Some(other) = object.keys().next() {
            return Err(ApiError::bad(
                "invalid_event",
                format!("a batch body has only `events`; found `{other}` beside it"),
            ));
        }
        let Value::Array(events) = events else {
            return Err(ApiError::bad(
                "invalid_event",
                "`events` must be an array of events",
            ));
        };
        if events.is_empty() {
            return Err(ApiError::bad("invalid_event", "`events` is empty"));
        }
        if events.len() > MAX_EVENTS_PER_REQUEST {
            return Err(ApiError::bad(
                "too_many_events",
                format!(
                    "{} events in one request; send at most {MAX_EVENTS_PER_REQUEST} per request",
                    events.len()
                ),
            ));
        }
        events
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                serde_json::from_value::<AppendEvent>(v)
                    .map_err(|e| e.to_string())
                    .and_then(AppendEvent::into_new_event)
                    .map_err(|m| ApiError::bad("invalid_event", format!("events[{i}]: {m}")))
            })
            .collect()
    } else {
        let event = serde_json::from_value::<AppendEvent>(Value::Object(object))
            .map_err(|e| e.to_string())
            .and_then(AppendEvent::into_new_event)
            .map_err(|m| ApiError::bad("invalid_event", format!("{m}; send {EVENT_EXAMPLE}")))?;
        Ok(vec![event])
    }
}

pub(super) async fn append_events(
    State(state): State<ApiState>,
    topic: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<AppendedEvents>)> {
    let topic = checked_topic(topic)?;
    let body = body.map_err(|r| body_error(r, state.runtime.config.api.max_body_bytes))?;
    let events = parse_events(&body)?;
    let appended = state.runtime.backends.bus.append(&topic, events).await?;
    Ok((StatusCode::CREATED, Json(AppendedEvents { appended })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReadQuery {
    /// Read only this partition.
    partition: Option<u32>,
    /// Start offset (every partition read, unless `from` names it).
    offset: Option<u64>,
    /// Per-partition start offsets, `P:O,P:O`.
    from: Option<String>,
    /// Most events returned in all.
    limit: Option<usize>,
}

pub(super) fn parse_cursors(from: &str) -> ApiResult<BTreeMap<u32, u64>> {
    let bad = |part: &str| {
        ApiError::bad(
            "invalid_query",
            format!("`from` must look like `0:12,1:4` (partition:offset pairs); `{part}` is not"),
        )
    };
    from.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|part| {
            let (p, o) = part.split_once(':').ok_or_else(|| bad(part))?;
            Ok((
                p.trim().parse().map_err(|_| bad(part))?,
                o.trim().parse().map_err(|_| bad(part))?,
            ))
        })
        .collect()
}

pub(super) async fn topic_partitions(state: &ApiState, topic: &str) -> ApiResult<u32> {
    state
        .runtime
        .backends
        .bus
        .partitions(topic)
        .await?
        .ok_or_else(|| ApiError::NotFound {
            code: "unknown_topic",
            message: format!(
                "topic `{topic}` does not exist (yet): it is created by its first event"
            ),
        })
}

pub(super) async fn topic_info(
    State(state): State<ApiState>,
    topic: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<TopicInfo>> {
    let topic = checked_topic(topic)?;
    let partitions = topic_partitions(&state, &topic).await?;
    let end_offsets = state.runtime.backends.bus.end_offsets(&topic).await?;
    Ok(Json(TopicInfo {
        end_offsets,
        partitions,
        topic,
    }))
}

/// Events of the first read of a partition, before their size is known.
pub(super) const FIRST_BATCH: usize = 4;
/// Most events asked of the bus at once.
pub(super) const MAX_BATCH: usize = 256;

pub(super) async fn read_events(
    State(state): State<ApiState>,
    topic: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let topic = checked_topic(topic)?;
    let Query(q) = query.map_err(query_error)?;
    let api = &state.runtime.config.api;
    let max = api.max_read_events.max(1);
    let limit = q.limit.unwrap_or(max).min(max);
    if limit == 0 {
        return Err(ApiError::bad("invalid_query", "`limit` must be at least 1"));
    }
    let cap = api.max_read_bytes.max(1);
    // Held until the answer has been handed to the connection (see `held_body`).
    let permit = Arc::clone(&state.reads).try_acquire_owned().map_err(|_| {
        ApiError::Busy(format!(
            "{} event reads are being served, the most at once (api.max-concurrent-reads); retry in a second",
            api.max_concurrent_reads.max(1)
        ))
    })?;
    let partitions = topic_partitions(&state, &topic).await?;
    let cursors = q
        .from
        .as_deref()
        .map(parse_cursors)
        .transpose()?
        .unwrap_or_default();
    let default_offset = q.offset.unwrap_or(0);
    let mut targets: Vec<u32> = match q.partition {
        Some(p) if p >= partitions => {
            return Err(ApiError::NotFound {
                code: "unknown_partition",
                message: format!("topic `{topic}` has partitions 0..{partitions}; there is no {p}"),
            });
        }
        Some(p) => vec![p],
        None => (0..partitions).collect(),
    };
    if let Some(p) = cursors.keys().find(|p| **p >= partitions) {
        return Err(ApiError::bad(
            "invalid_query",
            format!(
                "`from` names partition {p}, but topic `{topic}` has partitions 0..{partitions}"
            ),
        ));
    }
    // Which partition goes first moves with the cursors: the first event of an answer is
    // taken whatever its size, so an event larger than the cap in any partition is
    // reached even while others keep filling answers.
    let starts: u64 = targets
        .iter()
        .map(|p| cursors.get(p).copied().unwrap_or(default_offset))
        .fold(0u64, u64::wrapping_add);
    let turn = usize::try_from(starts % targets.len().max(1) as u64).unwrap_or(0);
    targets.rotate_left(turn);
    // The answer is built as bytes, event by event, and never grows past the cap (one
    // event larger than the cap alone excepted): a read costs at most `cap` plus one
    // batch of the bus, and batches are sized by the largest event seen so far.
    let mut out = Vec::new();
    out.extend_from_slice(br#"{"topic":"#);
    serde_json::to_writer(&mut out, &topic).map_err(ApiError::internal)?;
    out.extend_from_slice(br#","events":["#);
    let header_len = out.len();
    // An equal share, of events and of bytes, per partition with events past its cursor
    // keeps one busy partition from starving the others; what a partition leaves unused
    // goes to the next ones.
    let ends = state.runtime.backends.bus.end_offsets(&topic).await?;
    let start_of = |p: u32| cursors.get(&p).copied().unwrap_or(default_offset);
    let has_events = |p: u32| ends.get(p as usize).is_none_or(|end| start_of(p) < *end);
    let mut sharing = targets.iter().filter(|p| has_events(**p)).count();
    let mut remaining = limit;
    let mut used = 0usize;
    let mut largest = 0usize;
    // Some partition stopped at its byte share or the cap, with events left.
    let mut truncated = false;
    // The cap is reached: no partition gets more.
    let mut full = false;
    let mut next = BTreeMap::new();
    for &p in &targets {
        let mut at = start_of(p);
        if !has_events(p) {
            next.insert(p.to_string(), at);
            continue;
        }
        let mut want = remaining.div_ceil(sharing.max(1));
        let byte_share = cap.saturating_sub(used) / sharing.max(1);
        sharing = sharing.saturating_sub(1);
        let mut part_bytes = 0usize;
        'partition: while want > 0 && !full {
            let batch_len = cap
                .saturating_sub(used)
                .checked_div(largest)
                .map_or(FIRST_BATCH, |n| n.clamp(1, MAX_BATCH))
                .min(want);
            let batch = state
                .runtime
                .backends
                .bus
                .read(&topic, p, at, batch_len)
                .await?;
            let got = batch.len();
            for e in batch {
                let json = serde_json::to_vec(&EventView::new(&e)).map_err(ApiError::internal)?;
                largest = largest.max(json.len());
                let size = json.len() + usize::from(out.len() > header_len);
                let in_cap = used + size <= cap;
                // A partition's first event needs only to fit the cap; the very first
                // event of the answer is taken whatever its size, so a read always moves.
                let fits = in_cap && (part_bytes == 0 || part_bytes + size <= byte_share);
                if !fits && used > 0 {
                    truncated = true;
                    full = !in_cap;
                    break 'partition;
                }
                if out.len() > header_len {
                    out.push(b',');
                }
                out.extend_from_slice(&json);
                used += size;
                part_bytes += size;
                at = e.offset + 1;
                want -= 1;
                remaining -= 1;
                if want == 0 {
                    break 'partition;
                }
            }
            if got < batch_len {
                break;
            }
        }
        next.insert(p.to_string(), at);
    }
    let next_from = next
        .iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",");
    out.extend_from_slice(br#"],"next":"#);
    serde_json::to_writer(&mut out, &next).map_err(ApiError::internal)?;
    out.extend_from_slice(br#","next_from":"#);
    serde_json::to_writer(&mut out, &next_from).map_err(ApiError::internal)?;
    let _ = write!(out, r#","truncated":{truncated},"bytes":{used}}}"#);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        held_body(Bytes::from(out), permit),
    )
        .into_response())
}

/// A body that keeps the read's permit until the connection asks for more after it,
/// i.e. until the answer has left the handler's memory for the socket's buffers.
pub(super) fn held_body(bytes: Bytes, permit: OwnedSemaphorePermit) -> axum::body::Body {
    enum Step {
        Send(Bytes, OwnedSemaphorePermit),
        Release(OwnedSemaphorePermit),
    }
    let stream = futures::stream::unfold(Some(Step::Send(bytes, permit)), |step| async move {
        match step? {
            Step::Send(bytes, permit) => {
                Some((Ok::<_, Infallible>(bytes), Some(Step::Release(permit))))
            }
            Step::Release(_permit) => None,
        }
    });
    axum::body::Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The event view's JSON is the wire format clients (and `spate events tail`) read:
    /// fields in name order, `"key":null` for no key, one payload field.
    #[test]
    fn events_show_as_they_always_have_and_decode_back() {
        let event = |key: Option<&[u8]>, payload: &[u8]| Event {
            topic: "t".into(),
            partition: 3,
            offset: 9,
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            headers: vec![Header::text("z", "1"), Header::text("a", "2")],
            timestamp_ms: 5,
        };
        let head = r#"{"headers":{"a":"2","z":"1"},"#;
        let tail = r#","timestamp_ms":5,"topic":"t"}"#;
        for (e, middle) in [
            (
                event(None, b"null"),
                r#""key":null,"offset":9,"partition":3,"payload":null"#,
            ),
            (
                event(Some(b"c-1"), br#"{"b":1,"a":2}"#),
                r#""key":"c-1","offset":9,"partition":3,"payload":{"a":2,"b":1}"#,
            ),
            (
                event(Some(b"\xff"), b"plain"),
                r#""key_base64":"/w==","offset":9,"partition":3,"payload_text":"plain""#,
            ),
            (
                event(Some(b""), b"\xff"),
                r#""key":"","offset":9,"partition":3,"payload_base64":"/w==""#,
            ),
        ] {
            let view = EventView::new(&e);
            let text = serde_json::to_string(&view).unwrap();
            assert_eq!(text, format!("{head}{middle}{tail}"));
            assert_eq!(serde_json::from_str::<EventView>(&text).unwrap(), view);
        }
    }
}
