//! Health, readiness, liveness and the metrics scrape: open routes, no token.

use super::*;

/// Health: 200 `ok`, or 503 `degraded` naming the embedded storage that cannot be
/// written (a full disk) while it is being reopened. Liveness is `/livez`: a degraded
/// runtime recovers by itself and needs no restart.
pub(super) async fn healthz(State(state): State<ApiState>) -> Response {
    let h = state.runtime.health();
    if h.storage.is_empty() {
        return Json(json!({ "status": "ok" })).into_response();
    }
    let body = json!({
        "status": "degraded",
        "error": { "code": "storage_unavailable", "message": storage_message(&h.storage) },
        "storage": h.storage,
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
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
        return Json(json!({ "status": "ready" })).into_response();
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
    let body = json!({
        "error": { "code": "not_ready", "message": message },
        "not_joined": h.not_joined,
        "storage": h.storage,
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// Live: every pipeline's event loop went round within the last minute. 503 with the
/// API's error shape naming the stuck ones.
pub(super) async fn livez(State(state): State<ApiState>) -> Response {
    let h = state.runtime.health();
    if h.live {
        return Json(json!({ "status": "live" })).into_response();
    }
    let body = json!({
        "error": {
            "code": "stalled",
            "message": format!("event loops not making progress: {}", h.stalled.join(", ")),
        },
        "stalled": h.stalled,
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
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
