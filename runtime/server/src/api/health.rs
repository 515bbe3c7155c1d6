//! Health, readiness, liveness and the metrics scrape: open routes, no token. The probes
//! answer with a [`Probe`] body.

use super::*;

/// The body of `GET /healthz`, `/readyz` and `/livez`. Healthy, each answers only its
/// `status` (`ok`, `ready`, `live`); with a 503 it answers the API's `error` and the
/// reason's list, and `/healthz` its `status` (`degraded`) too:
/// - `/healthz`: `storage`, the embedded storage that cannot be written;
/// - `/readyz`: `not_joined`, the pipelines still joining their groups, and `storage`;
/// - `/livez`: `stalled`, the pipelines whose event loop is stuck.
///
/// Fields are declared in name order, the order these bodies have always had.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Why the probe fails (503 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
    /// `/readyz`: consumers still joining their groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_joined: Option<Vec<String>>,
    /// `/livez`: event loops not making progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled: Option<Vec<String>>,
    /// `ok`, `degraded`, `ready` or `live`; a failing `/readyz` or `/livez` has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `/healthz` and `/readyz`: embedded storage that cannot be written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Vec<String>>,
}

impl Probe {
    fn passing(status: &str) -> Response {
        Json(Self {
            status: Some(status.to_string()),
            ..Self::default()
        })
        .into_response()
    }

    fn failing(self) -> Response {
        (StatusCode::SERVICE_UNAVAILABLE, Json(self)).into_response()
    }
}

/// Health: 200 `ok`, or 503 `degraded` naming the embedded storage that cannot be
/// written (a full disk) while it is being reopened. Liveness is `/livez`: a degraded
/// runtime recovers by itself and needs no restart.
pub(super) async fn healthz(State(state): State<ApiState>) -> Response {
    let h = state.runtime.health();
    if h.storage.is_empty() {
        return Probe::passing("ok");
    }
    Probe {
        error: Some(ErrorDetail::new(
            "storage_unavailable",
            storage_message(&h.storage),
        )),
        status: Some("degraded".into()),
        storage: Some(h.storage),
        ..Probe::default()
    }
    .failing()
}

pub(super) fn storage_message(storage: &[String]) -> String {
    format!(
        "embedded storage cannot be written (appends and event handling wait and are retried): {}",
        storage.join("; ")
    )
}

/// Ready: plugins loaded and every consumer joined its group. 503 with the API's error
/// shape and the pipelines still joining.
pub(super) async fn readyz(State(state): State<ApiState>) -> Response {
    let h = state.runtime.health();
    if h.ready {
        return Probe::passing("ready");
    }
    let message = if !h.storage.is_empty() {
        storage_message(&h.storage)
    } else if h.not_joined.is_empty() {
        "the runtime is starting or shutting down".to_string()
    } else {
        format!(
            "consumers still joining their groups: {}",
            h.not_joined.join(", ")
        )
    };
    Probe {
        error: Some(ErrorDetail::new("not_ready", message)),
        not_joined: Some(h.not_joined),
        storage: Some(h.storage),
        ..Probe::default()
    }
    .failing()
}

/// Live: every pipeline's event loop went round within the last minute. 503 with the
/// API's error shape naming the stuck ones.
pub(super) async fn livez(State(state): State<ApiState>) -> Response {
    let h = state.runtime.health();
    if h.live {
        return Probe::passing("live");
    }
    Probe {
        error: Some(ErrorDetail::new(
            "stalled",
            format!("event loops not making progress: {}", h.stalled.join(", ")),
        )),
        stalled: Some(h.stalled),
        ..Probe::default()
    }
    .failing()
}

pub(super) async fn metrics(State(state): State<ApiState>) -> Response {
    // Sizes are read when scraped: a stat call per file and the log's in-memory counts.
    let backends = &state.runtime.backends;
    for h in &backends.storage {
        metrics::gauge!(spate_core::metric_names::STORAGE_FILE_BYTES, "file" => h.name())
            .set(h.file_bytes() as f64);
    }
    if let Some(log) = &backends.log {
        for t in log.usage() {
            metrics::gauge!(spate_core::metric_names::LOG_RETAINED_BYTES, "topic" => t.topic.clone())
                .set(t.bytes as f64);
            metrics::gauge!(spate_core::metric_names::LOG_RETAINED_EVENTS, "topic" => t.topic)
                .set(t.events as f64);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}
