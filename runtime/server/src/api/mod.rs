//! The HTTP API: health and metrics, plugin uploads and their lifecycle (activate,
//! rollback, delete), and appending to and reading from topics. Parked keys and
//! dead-letter redrives are served by [`crate::api::parked`], routed here.
//!
//! [`router`] builds the whole API from an [`ApiState`], so tests drive it in-process;
//! [`serve`] runs it on a listener until a shutdown signal. Every failure — a handler's,
//! an extractor's, the framework's (unknown route, wrong method, body too large, time
//! limit) — is rendered as `{"error":{"code","message"}}` by [`ApiError`]. Every
//! `/v1` route, reads included, needs `Authorization: Bearer <token>`; health and metrics
//! are open. Event reads are bounded in bytes (`api.max-read-bytes`) and in number at
//! once (`api.max-concurrent-reads`).
//!
//! The bodies each route takes and answers with are typed, beside their handlers
//! ([`plugins`], [`events`], [`health`], [`parked`]; every error is an [`ErrorBody`]),
//! and the CLI decodes the same types.
//!
//! This module maps requests onto the registry and the event bus; it does not validate
//! manifests or components itself (the registry does) and holds no state of its own.

mod auth;
mod error;
pub mod events;
pub mod health;
pub mod parked;
pub mod plugins;
pub mod replay;

use crate::config::Config;
use crate::runtime::Runtime;
use crate::serve::ConnLimits;
use crate::telemetry::Metrics;
use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use spate_core::manifest::{Manifest, valid_topic};
use spate_core::types::headers;
use spate_core::{Appended, BackendError, Event, Header, NewEvent};
use spate_engine::{LoadError, RegistryError};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use auth::*;
pub use auth::{resolve_token, token_path};
use error::*;
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub(crate) use error::{ApiResult, body_error, parse_json, path_error, query_error};
use events::*;
use health::*;
use plugins::*;

/// Most events one `POST /v1/topics/{topic}/events` may append.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;

/// Name of the token file written to the data directory when no token is configured.
pub const TOKEN_FILE: &str = "api-token";

/// How many past active versions `GET /v1/plugins/{name}` shows.
const SHOWN_HISTORY: usize = 20;

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    /// The running runtime (registry, backends, configuration).
    pub runtime: Arc<Runtime>,
    /// Bearer token required on mutating routes.
    pub token: Arc<str>,
    /// Renders `GET /metrics`.
    pub metrics: Metrics,
    /// Permits of event reads served at once (`api.max-concurrent-reads`).
    pub reads: Arc<Semaphore>,
}

impl ApiState {
    /// State for a runtime, its API token and the process's metrics handle.
    pub fn new(runtime: Arc<Runtime>, token: impl Into<Arc<str>>, metrics: Metrics) -> Self {
        let reads = Arc::new(Semaphore::new(
            runtime.config.api.max_concurrent_reads.max(1),
        ));
        Self {
            runtime,
            token: token.into(),
            metrics,
            reads,
        }
    }
}

/// The whole API. Limits and time limits come from `state.runtime.config.api`.
pub fn router(state: ApiState) -> Router {
    let api = &state.runtime.config.api;
    let timeout = Duration::from_millis(api.request_timeout_ms.max(1));
    // Uploads compile the component before answering; a dead-letter redrive reads the
    // plugin's dead-letter topic.
    let upload_timeout = timeout.saturating_mul(4);
    let body = api.max_body_bytes;
    let upload = api.max_upload_bytes;
    fn bounded(
        route: MethodRouter<ApiState>,
        limit: usize,
        timeout: Duration,
    ) -> MethodRouter<ApiState> {
        route
            .layer::<_, Infallible>(DefaultBodyLimit::max(limit))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::SERVICE_UNAVAILABLE,
                timeout,
            ))
    }

    Router::new()
        .route(
            "/v1/plugins",
            bounded(get(list_plugins), body, timeout).merge(bounded(
                post(upload_plugin),
                upload,
                upload_timeout,
            )),
        )
        .route(
            "/v1/plugins/{name}",
            bounded(get(show_plugin).merge(delete(delete_plugin)), body, timeout),
        )
        .route(
            "/v1/plugins/{name}/activate",
            bounded(post(activate_plugin), body, timeout),
        )
        .route(
            "/v1/plugins/{name}/rollback",
            bounded(post(rollback_plugin), body, timeout),
        )
        .route(
            "/v1/plugins/{name}/parked",
            bounded(get(parked::list), body, timeout),
        )
        .route(
            "/v1/plugins/{name}/parked/{key}",
            bounded(get(parked::show), body, timeout),
        )
        // The action routes shadow `{key}`: their GET shows the key of that name.
        .route(
            "/v1/plugins/{name}/parked/redrive",
            bounded(
                post(parked::redrive).merge(get(parked::show_redrive_key)),
                body,
                timeout,
            ),
        )
        .route(
            "/v1/plugins/{name}/parked/discard",
            bounded(
                post(parked::discard).merge(get(parked::show_discard_key)),
                body,
                timeout,
            ),
        )
        // Reads the whole dead-letter topic before answering.
        .route(
            "/v1/plugins/{name}/dead-letters/redrive",
            bounded(
                post(parked::redrive_dead_letters),
                body,
                upload_timeout,
            ),
        )
        .route(
            "/v1/plugins/{name}/shadow",
            bounded(get(shadow_report).merge(delete(stop_shadow)), body, timeout),
        )
        .route(
            "/v1/plugins/{name}/promote",
            bounded(post(promote_plugin), body, timeout),
        )
        // Runs up to `replay::MAX_LIMIT` events through a version.
        .route(
            "/v1/plugins/{name}/replay",
            bounded(post(replay::replay), body, upload_timeout),
        )
        .route("/v1/topics/{topic}", bounded(get(topic_info), body, timeout))
        .route(
            "/v1/topics/{topic}/events",
            bounded(get(read_events).merge(post(append_events)), body, timeout),
        )
        // Only matched routes check the token, so an unknown path is a 404, not a 401.
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        // Added after the token layer: probes and scrapers carry no token.
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/livez", get(livez))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::map_response(json_errors))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// Serve `state`'s API on `listener` until `shutdown` completes, then stop accepting and
/// give open connections `api.shutdown-grace-ms` to finish (see [`crate::serve`]).
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let api = &state.runtime.config.api;
    let limits = ConnLimits {
        header_read: Duration::from_millis(api.header_read_timeout_ms.max(1)),
        idle: Duration::from_millis(api.idle_timeout_ms.max(1)),
        shutdown_grace: Duration::from_millis(api.shutdown_grace_ms),
    };
    crate::serve::serve(listener, router(state), limits, shutdown).await
}
