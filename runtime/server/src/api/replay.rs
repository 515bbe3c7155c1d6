//! `POST /v1/plugins/{name}/replay`: run stored events through a version of a plugin in
//! capture mode ([`spate_core::host::capture`]) and compare what each did with its effect
//! record ([`spate_core::host::record`]), where the plugin keeps one.
//!
//! Nothing is applied, emitted or committed: state reads see the current state (as of the
//! last checkpoint) plus the replayed events' own earlier writes. Events are picked from
//! the log by coordinates, an offset range, a time range or a key, and replayed partition
//! by partition in offset order.

use crate::api::{ApiError, ApiResult, ApiState, body_error, parse_json, path_error};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use spate_core::host::HostServices;
use spate_core::host::capture::Capture;
use spate_core::host::record::{self, EffectRecord};
use spate_core::manifest::RecordSettings;
use spate_core::plugin::PluginVersion;
use std::sync::Arc;

/// Events one replay runs at most (`limit`'s default and ceiling).
pub const DEFAULT_LIMIT: usize = 100;
/// The most `limit` may be.
pub const MAX_LIMIT: usize = 1000;
/// Events one replay reads at most to find those it runs.
pub const MAX_SCANNED: u64 = 100_000;
const READ_BATCH: u64 = 500;

const EXAMPLE: &str = r#"{"version": "2.0.0", "event": "orders/0/42"} or {"topic": "orders", "partition": 0, "from_offset": 100, "to_offset": 199} or {"key": "c-1", "from_ms": 1748764800000, "limit": 50}"#;

/// What to replay (the body of `POST /v1/plugins/{name}/replay`). Every field is
/// optional; the conditions given must all hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The version to run (default: the active one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// One event, as `topic/partition/offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The topic (default: the plugin's only subscription).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// One partition (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// First offset (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_offset: Option<u64>,
    /// Last offset (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_offset: Option<u64>,
    /// Events at or after this time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    /// Events before this time (Unix ms, exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<i64>,
    /// Events of this key (as text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Events replayed at most (default 100, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// One replayed event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayedEvent {
    /// What the version did with it.
    pub replayed: EffectRecord,
    /// Its effect record, if one is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<EffectRecord>,
    /// How the replay compares with the record (when there is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<record::Diff>,
}

/// The answer of `POST /v1/plugins/{name}/replay`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// The plugin.
    pub plugin: String,
    /// The version the events ran through.
    pub version: String,
    /// The topic read.
    pub topic: String,
    /// Events read to find them.
    pub scanned: u64,
    /// Whether the limit, or the scan bound, stopped the replay before the selection's end.
    pub truncated: bool,
    /// Replayed events that did what their record says.
    pub same: usize,
    /// Replayed events that did not.
    pub differing: usize,
    /// Replayed events without a record (the plugin keeps none, or it expired, or a later
    /// event took its slot).
    pub unrecorded: usize,
    /// The events, in the order replayed.
    pub events: Vec<ReplayedEvent>,
}

/// The selection, checked: what to read.
struct Selection {
    topic: String,
    partitions: Vec<u32>,
    from: u64,
    to: Option<u64>,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    key: Option<Vec<u8>>,
    limit: usize,
}

fn bad(message: String) -> ApiError {
    ApiError::bad(
        "invalid_body",
        format!("{message}; send JSON like {EXAMPLE}"),
    )
}

/// `POST /v1/plugins/{name}/replay`.
pub(crate) async fn replay(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ReplayReport>> {
    let Path(name) = name.map_err(path_error)?;
    let body = body.map_err(|r| body_error(r, state.runtime.config.api.max_body_bytes))?;
    let request: ReplayRequest = parse_json(&body, EXAMPLE)?;
    let registry = &state.runtime.registry;
    let active = registry.active(&name);
    let version: Arc<dyn PluginVersion> = match (&request.version, &active) {
        (Some(v), _) => registry.version(&name, v).await?,
        (None, Some(a)) => Arc::clone(a),
        (None, None) => {
            return Err(ApiError::NotFound {
                code: "not_found",
                message: match registry.show(&name).await {
                    Some(_) => {
                        format!("plugin `{name}` has no active version; name one with `version`")
                    }
                    None => format!(
                        "no plugin named `{name}`; `GET /v1/plugins` (`spate plugin ls`) lists them"
                    ),
                },
            });
        }
    };
    let selection = select(&state, &request, version.as_ref()).await?;
    // The record settings of the version that wrote the records: the active one's.
    let recorded_by = active.as_ref().unwrap_or(&version).info();
    let settings = recorded_by.manifest.record.clone();
    let backends = &state.runtime.backends;
    let store = backends.tier.for_plugin(&name);
    let capture = Capture::new(&HostServices {
        state: Arc::clone(&store),
        cache: Arc::clone(&backends.cache),
        workflow_topic: state.runtime.config.workflow_topic.clone(),
    });
    let records_ns = record::namespace(&recorded_by.namespace);
    let mut report = ReplayReport {
        plugin: name.clone(),
        version: version.info().manifest.version.to_string(),
        topic: selection.topic.clone(),
        ..ReplayReport::default()
    };
    let _permit = state
        .reads
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the runtime is stopping".into()))?;
    let bus = &backends.bus;
    let ends = bus.end_offsets(&selection.topic).await?;
    'partitions: for &p in &selection.partitions {
        let end = ends.get(p as usize).copied().unwrap_or(0);
        let end = selection.to.map_or(end, |to| end.min(to.saturating_add(1)));
        let mut at = selection.from;
        while at < end {
            if report.scanned >= MAX_SCANNED {
                report.truncated = true;
                break 'partitions;
            }
            let want = READ_BATCH.min(end - at).min(MAX_SCANNED - report.scanned);
            let batch = bus
                .read(
                    &selection.topic,
                    p,
                    at,
                    usize::try_from(want).unwrap_or(usize::MAX),
                )
                .await?;
            let Some(last) = batch.last() else {
                break;
            };
            at = last.offset + 1;
            for event in batch {
                if event.offset >= end {
                    break;
                }
                report.scanned += 1;
                if selection.from_ms.is_some_and(|f| event.timestamp_ms < f)
                    || selection.to_ms.is_some_and(|t| event.timestamp_ms >= t)
                    || selection
                        .key
                        .as_ref()
                        .is_some_and(|k| event.key.as_ref() != Some(k))
                {
                    continue;
                }
                if report.events.len() == selection.limit {
                    report.truncated = true;
                    break 'partitions;
                }
                let recorded = if settings.enabled {
                    lookup(&*store, &records_ns, &settings, &event).await?
                } else {
                    None
                };
                let replayed = capture.run(&version, &event, recorded.as_ref()).await;
                let diff = recorded.as_ref().map(|r| r.diff(&replayed));
                match &diff {
                    None => report.unrecorded += 1,
                    Some(d) if d.is_same() => report.same += 1,
                    Some(_) => report.differing += 1,
                }
                report.events.push(ReplayedEvent {
                    replayed,
                    recorded,
                    diff,
                });
            }
        }
    }
    tracing::info!(plugin = %name, version = %report.version, replayed = report.events.len(), same = report.same, differing = report.differing, "replay");
    Ok(Json(report))
}

async fn lookup(
    store: &dyn spate_core::StateStore,
    namespace: &str,
    settings: &RecordSettings,
    event: &spate_core::Event,
) -> ApiResult<Option<EffectRecord>> {
    record::lookup(
        store,
        namespace,
        settings,
        (&event.topic, event.partition, event.offset),
    )
    .await
    .map_err(|e| ApiError::store(e, "retry shortly"))
}

/// Checks the request against the plugin and the log.
async fn select(
    state: &ApiState,
    request: &ReplayRequest,
    version: &dyn PluginVersion,
) -> ApiResult<Selection> {
    let manifest = &version.info().manifest;
    let limit = request.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad(format!("`limit` must be 1 to {MAX_LIMIT}")));
    }
    if let (Some(from), Some(to)) = (request.from_ms, request.to_ms)
        && from >= to
    {
        return Err(bad(format!(
            "`from_ms` ({from}) must be before `to_ms` ({to}), which is exclusive"
        )));
    }
    if let (Some(from), Some(to)) = (request.from_offset, request.to_offset)
        && from > to
    {
        return Err(bad(format!(
            "`from_offset` ({from}) must not be after `to_offset` ({to})"
        )));
    }
    let mut partition = request.partition;
    let mut from = request.from_offset;
    let mut to = request.to_offset;
    let topic = match &request.event {
        Some(coordinates) => {
            if request.topic.is_some()
                || request.partition.is_some()
                || from.is_some()
                || to.is_some()
            {
                return Err(bad(
                    "`event` names one event: give it without `topic`, `partition` or offsets"
                        .into(),
                ));
            }
            let parsed = coordinates.rsplitn(3, '/').collect::<Vec<_>>();
            let [o, p, t] = parsed.as_slice() else {
                return Err(bad(format!(
                    "`event` `{coordinates}` is not `topic/partition/offset`"
                )));
            };
            let (Ok(p), Ok(o)) = (p.parse::<u32>(), o.parse::<u64>()) else {
                return Err(bad(format!(
                    "`event` `{coordinates}` is not `topic/partition/offset`"
                )));
            };
            partition = Some(p);
            from = Some(o);
            to = Some(o);
            (*t).to_owned()
        }
        None => match (&request.topic, manifest.subscriptions.as_slice()) {
            (Some(t), _) => t.clone(),
            (None, [only]) => only.topic.clone(),
            (None, subs) => {
                let topics: Vec<&str> = subs.iter().map(|s| s.topic.as_str()).collect();
                return Err(bad(format!(
                    "the plugin reads {}: name one in `topic`",
                    topics.join(", ")
                )));
            }
        },
    };
    if !manifest.subscriptions.iter().any(|s| s.topic == topic) {
        return Err(bad(format!(
            "version {} of `{}` does not subscribe to `{topic}`",
            manifest.version, manifest.name
        )));
    }
    let Some(count) = state.runtime.backends.bus.partitions(&topic).await? else {
        return Err(ApiError::NotFound {
            code: "not_found",
            message: format!("topic `{topic}` does not exist"),
        });
    };
    let partitions = match partition {
        Some(p) if p >= count => {
            return Err(bad(format!(
                "`{topic}` has {count} partitions: partition {p} does not exist"
            )));
        }
        Some(p) => vec![p],
        None => (0..count).collect(),
    };
    Ok(Selection {
        topic,
        partitions,
        from: from.unwrap_or(0),
        to,
        from_ms: request.from_ms,
        to_ms: request.to_ms,
        key: request.key.as_ref().map(|k| k.as_bytes().to_vec()),
        limit,
    })
}
