//! The HTTP API: health and metrics, plugin uploads and their lifecycle (activate,
//! rollback, delete), and appending to and reading from topics. Parked keys and
//! dead-letter redrives are served by [`crate::parked_api`], routed here.
//!
//! [`router`] builds the whole API from an [`ApiState`], so tests drive it in-process;
//! [`serve`] runs it on a listener until a shutdown signal. Every failure — a handler's,
//! an extractor's, the framework's (unknown route, wrong method, body too large, time
//! limit) — is rendered as `{"error":{"code","message"}}` by [`ApiError`]. Every
//! `/v1` route, reads included, needs `Authorization: Bearer <token>`; health and metrics
//! are open. Event reads are bounded in bytes (`api.max-read-bytes`) and in number at
//! once (`api.max-concurrent-reads`).
//!
//! This module maps requests onto the registry and the event bus; it does not validate
//! manifests or components itself (the registry does) and holds no state of its own.

use crate::config::Config;
use crate::parked_api;
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
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use spate_core::manifest::{Manifest, valid_topic};
use spate_core::types::headers;
use spate_core::{BackendError, Event, Header, NewEvent};
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

/// Every error the API returns, rendered as `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401 `unauthorized`: no usable `Authorization` header.
    #[error("{0}")]
    Unauthorized(String),
    /// 403 `forbidden`: a token that is not this server's.
    #[error("the bearer token is not valid for this server")]
    Forbidden,
    /// 400 with a specific code: the request is malformed; the message says what to fix.
    #[error("{message}")]
    BadRequest {
        /// Machine-readable code, e.g. `invalid_json`.
        code: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// 404 with a specific code (`not_found`, `unknown_topic`).
    #[error("{message}")]
    NotFound {
        /// Machine-readable code.
        code: &'static str,
        /// What was not found.
        message: String,
    },
    /// 405 `method_not_allowed`.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409 `conflict`: the request contradicts stored state.
    #[error("{0}")]
    Conflict(String),
    /// 413 `too_large`: the body or component exceeds a limit.
    #[error("{0}")]
    TooLarge(String),
    /// 422 `wrong_world`: a valid component that does not target the plugin world.
    #[error("{0}")]
    WrongWorld(String),
    /// 503 `unavailable`: a backing service is unreachable; retrying may help.
    #[error("{0}")]
    Unavailable(String),
    /// 503 `busy` with `Retry-After`: too many event reads at once.
    #[error("{0}")]
    Busy(String),
    /// 500 `internal`: details are logged, never returned.
    #[error("internal error; the server log has the details")]
    Internal,
    /// Any other status produced outside the handlers (framework rejections, time limits).
    #[error("{message}")]
    Other {
        /// Status to return.
        status: StatusCode,
        /// Machine-readable code.
        code: &'static str,
        /// Message.
        message: String,
    },
}

impl ApiError {
    /// A 500 whose `detail` goes to the log only.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error serving an API request");
        Self::Internal
    }

    /// A 400 with `code` and a `message` saying what to fix.
    pub(crate) fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::WrongWorld(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Unavailable(_) | Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Other { status, .. } => *status,
        }
    }

    /// The machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::BadRequest { code, .. }
            | Self::NotFound { code, .. }
            | Self::Other { code, .. } => code,
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Conflict(_) => "conflict",
            Self::TooLarge(_) => "too_large",
            Self::WrongWorld(_) => "wrong_world",
            Self::Unavailable(_) => "unavailable",
            Self::Busy(_) => "busy",
            Self::Internal => "internal",
        }
    }

    /// An error for a response the framework produced with `status` and plain-text `body`.
    fn from_status(status: StatusCode, body: String) -> Self {
        let (code, default) = match status {
            StatusCode::BAD_REQUEST => ("bad_request", "the request is malformed"),
            StatusCode::UNAUTHORIZED => ("unauthorized", "authentication required"),
            StatusCode::FORBIDDEN => ("forbidden", "not allowed"),
            StatusCode::NOT_FOUND => ("not_found", "no such resource"),
            StatusCode::METHOD_NOT_ALLOWED => (
                "method_not_allowed",
                "this route does not accept that method",
            ),
            StatusCode::REQUEST_TIMEOUT => ("timeout", "the request took too long to arrive"),
            StatusCode::PAYLOAD_TOO_LARGE => ("too_large", "the request body is too large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                "unsupported_media_type",
                "unsupported content type for this route",
            ),
            StatusCode::UNPROCESSABLE_ENTITY => {
                ("unprocessable", "the request cannot be processed")
            }
            // Everything this module answers with 503 is JSON already; a plain 503 comes
            // from the time-limit layer.
            StatusCode::SERVICE_UNAVAILABLE => (
                "timeout",
                "the request did not finish within the server's time limit (api.request-timeout-ms)",
            ),
            s if s.is_server_error() => {
                ("internal", "internal error; the server log has the details")
            }
            _ => ("error", "the request failed"),
        };
        // Framework rejection texts say what is wrong (e.g. a bad query string); server
        // errors might carry internals, so those keep the generic message.
        let message = if body.is_empty() || status.is_server_error() {
            default.to_string()
        } else {
            body
        };
        Self::Other {
            status,
            code,
            message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut res = (self.status(), Json(body)).into_response();
        match self {
            Self::Unauthorized(_) => {
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Busy(_) => {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        res
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Manifest(m) => Self::bad("invalid_manifest", m.to_string()),
            RegistryError::Component(
                l @ (LoadError::NotWasm | LoadError::CoreModule | LoadError::Invalid(_)),
            ) => Self::bad("invalid_component", l.to_string()),
            RegistryError::Component(l @ LoadError::WrongWorld(_)) => {
                Self::WrongWorld(l.to_string())
            }
            RegistryError::Component(l @ LoadError::Engine(_)) => Self::internal(l),
            e @ RegistryError::TooLarge { .. } => Self::TooLarge(format!(
                "{e}; raise api.max-upload-bytes on the server if this is expected"
            )),
            RegistryError::Conflict(m) => Self::Conflict(m),
            RegistryError::NotFound(m) => Self::NotFound {
                code: "not_found",
                message: format!("no such plugin or version: {m}"),
            },
            e @ RegistryError::Storage(_) => Self::internal(e),
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::UnknownTopic(t) => Self::NotFound {
                code: "unknown_topic",
                message: format!("topic `{t}` does not exist"),
            },
            BackendError::Invalid(m) => Self::bad("invalid_request", m),
            BackendError::Unavailable(m) => {
                tracing::warn!(error = %m, "event backend unavailable");
                Self::Unavailable("the event log is unavailable; retry shortly".into())
            }
            e @ BackendError::Corrupt(_) => Self::internal(e),
        }
    }
}

/// What a handler returns.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

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
            bounded(get(parked_api::list), body, timeout),
        )
        .route(
            "/v1/plugins/{name}/parked/{key}",
            bounded(get(parked_api::show), body, timeout),
        )
        // The action routes shadow `{key}`: their GET shows the key of that name.
        .route(
            "/v1/plugins/{name}/parked/redrive",
            bounded(
                post(parked_api::redrive).merge(get(parked_api::show_redrive_key)),
                body,
                timeout,
            ),
        )
        .route(
            "/v1/plugins/{name}/parked/discard",
            bounded(
                post(parked_api::discard).merge(get(parked_api::show_discard_key)),
                body,
                timeout,
            ),
        )
        // Reads the whole dead-letter topic before answering.
        .route(
            "/v1/plugins/{name}/dead-letters/redrive",
            bounded(
                post(parked_api::redrive_dead_letters),
                body,
                upload_timeout,
            ),
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

/// The API token: `api.token` if configured; otherwise the one in
/// `<data-dir>/api-token`, created there (mode 0600) with 32 random bytes in hex on
/// first use.
pub fn resolve_token(config: &Config) -> anyhow::Result<String> {
    if let Some(t) = &config.api.token {
        return Ok(t.clone());
    }
    let path = token_path(config);
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 8 => return Ok(text.trim().to_string()),
        Ok(_) => {
            tracing::warn!(path = %path.display(), "token file is too short; writing a new token")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the API token from {}", path.display()));
        }
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let token = hex::encode(rand::random::<[u8; 32]>());
    write_private(&path, token.as_bytes())
        .with_context(|| format!("writing the API token to {}", path.display()))?;
    Ok(token)
}

/// Where [`resolve_token`] keeps a generated token.
pub fn token_path(config: &Config) -> PathBuf {
    config.data_dir.join(TOKEN_FILE)
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let mut f = opts.open(path)?;
        // `mode` only applies to a new file; an existing one may have been wider.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut f = opts.open(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    }
}

// ---------------------------------------------------------------------------------------
// Middleware and fallbacks

/// Every route behind it needs the bearer token, reads included: events, dead letters,
/// workflows and manifests are the deployment's data.
async fn require_token(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    match check_token(&state.token, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn check_token(expected: &str, headers: &HeaderMap) -> ApiResult<()> {
    const HOW: &str = "send `Authorization: Bearer <token>`; the token is `api.token` in the server's \
        configuration or, if unset, the contents of <data-dir>/api-token (the `spate` CLI reads it \
        from there, or pass --token / set SPATE_API_TOKEN)";
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::Unauthorized(format!(
            "this route needs a token: {HOW}"
        )));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or_else(|| {
            ApiError::Unauthorized(format!(
                "the Authorization header is not a bearer token: {HOW}"
            ))
        })?;
    // Comparing digests keeps the comparison constant-time whatever the lengths.
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    if bool::from(a.as_slice().ct_eq(b.as_slice())) {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

/// Replaces any error response that is not already JSON (framework rejections, the
/// time limit) with the API's error body, keeping its status and headers.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let mut out = ApiError::from_status(status, text).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound {
        code: "not_found",
        message: format!(
            "no route for {method} {}; the API serves /healthz, /readyz, /metrics, /v1/plugins[/NAME[/activate|/rollback|/parked[/KEY|/redrive|/discard]|/dead-letters/redrive]] and /v1/topics/TOPIC[/events]",
            uri.path()
        ),
    }
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} does not accept {method}", uri.path()))
}

/// A path that does not parse, as a 400 `invalid_path`.
pub(crate) fn path_error(r: PathRejection) -> ApiError {
    ApiError::bad("invalid_path", r.body_text())
}

/// A query string that does not parse, as a 400 `invalid_query`.
pub(crate) fn query_error(r: QueryRejection) -> ApiError {
    ApiError::bad("invalid_query", r.body_text())
}

/// A body that could not be read: 413 `too_large` over `limit`, else 400 `invalid_body`.
pub(crate) fn body_error(r: BytesRejection, limit: usize) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!(
            "the request body exceeds the limit of {limit} bytes (api.max-body-bytes); send fewer events per request"
        ))
    } else {
        ApiError::bad("invalid_body", r.body_text())
    }
}

/// `body` as JSON of `T`; a 400 `invalid_json` showing `example` otherwise.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    example: &str,
) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad(
            "invalid_json",
            format!("the request body is empty; send JSON like {example}"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad(
            "invalid_json",
            format!("the request body is not valid JSON ({e}); send JSON like {example}"),
        )
    })
}

// ---------------------------------------------------------------------------------------
// Health and metrics

/// Health: 200 `ok`, or 503 `degraded` naming the embedded storage that cannot be
/// written (a full disk) while it is being reopened. Liveness is `/livez`: a degraded
/// runtime recovers by itself and needs no restart.
async fn healthz(State(state): State<ApiState>) -> Response {
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

fn storage_message(storage: &[String]) -> String {
    format!(
        "embedded storage cannot be written (appends and event handling wait and are retried): {}",
        storage.join("; ")
    )
}

/// Ready: plugins loaded and every consumer joined its group. 503 with the API's error
/// shape and the pipelines still joining.
async fn readyz(State(state): State<ApiState>) -> Response {
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
async fn livez(State(state): State<ApiState>) -> Response {
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

async fn metrics(State(state): State<ApiState>) -> Response {
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

// ---------------------------------------------------------------------------------------
// Plugins

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    #[serde(default = "default_true")]
    activate: bool,
}

fn default_true() -> bool {
    true
}

const HOW_TO_UPLOAD: &str = "send a multipart form with a `manifest` part (the spate.toml text) and a `component` part \
    (the .wasm file), e.g. `curl -H \"Authorization: Bearer $TOKEN\" -F manifest=@spate.toml -F component=@plugin.wasm \
    http://127.0.0.1:8780/v1/plugins`, or use `spate plugin deploy`";

async fn upload_plugin(
    State(state): State<ApiState>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(query_error)?;
    let mut multipart = multipart.map_err(|r| {
        ApiError::bad(
            "invalid_multipart",
            format!("{}; {HOW_TO_UPLOAD}", r.body_text()),
        )
    })?;
    let limit = state.runtime.config.api.max_upload_bytes;
    let part_error = |e: MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!(
                "the upload exceeds the limit of {limit} bytes (api.max-upload-bytes)"
            ))
        } else {
            ApiError::bad(
                "invalid_multipart",
                format!("{}; {HOW_TO_UPLOAD}", e.body_text()),
            )
        }
    };
    let mut manifest: Option<String> = None;
    let mut component: Option<Vec<u8>> = None;
    while let Some(field) = multipart.next_field().await.map_err(part_error)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "manifest" => {
                let bytes = field.bytes().await.map_err(part_error)?;
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    ApiError::bad("invalid_manifest", "the `manifest` part is not UTF-8 text")
                })?;
                manifest = Some(text);
            }
            "component" => component = Some(field.bytes().await.map_err(part_error)?.to_vec()),
            other => {
                return Err(ApiError::bad(
                    "invalid_multipart",
                    format!("unexpected part `{other}`; {HOW_TO_UPLOAD}"),
                ));
            }
        }
    }
    let missing = |part: &str| {
        ApiError::bad(
            "missing_part",
            format!("the `{part}` part is missing; {HOW_TO_UPLOAD}"),
        )
    };
    let manifest = manifest.ok_or_else(|| missing("manifest"))?;
    let component = component.ok_or_else(|| missing("component"))?;
    let outcome = state
        .runtime
        .registry
        .upload(&manifest, component, query.activate)
        .await?;
    tracing::info!(plugin = %outcome.name, version = %outcome.version, active = outcome.active, unchanged = outcome.unchanged, "plugin uploaded");
    let status = if outcome.unchanged {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(outcome)).into_response())
}

fn version_json(v: &spate_engine::registry::VersionRecord) -> Value {
    json!({
        "version": v.version,
        "hash": v.hash,
        "size": v.size,
        "uploaded_ms": v.uploaded_ms,
    })
}

async fn list_plugins(State(state): State<ApiState>) -> Json<Value> {
    let plugins: Vec<Value> = state
        .runtime
        .registry
        .list()
        .await
        .into_iter()
        .map(|(name, record)| {
            json!({
                "name": name,
                "active": record.active,
                "versions": record.versions.iter().map(version_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "plugins": plugins }))
}

async fn show_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = name.map_err(path_error)?;
    let record = state
        .runtime
        .registry
        .show(&name)
        .await
        .ok_or_else(|| ApiError::NotFound {
            code: "not_found",
            message: format!("no plugin named `{name}`; `GET /v1/plugins` lists them"),
        })?;
    let manifest = record
        .active
        .as_deref()
        .and_then(|a| record.versions.iter().find(|v| v.version == a))
        .map(|v| match toml::from_str::<Manifest>(&v.manifest) {
            Ok(m) => serde_json::to_value(m).unwrap_or(Value::Null),
            Err(_) => Value::String(v.manifest.clone()),
        })
        .unwrap_or(Value::Null);
    let skip = record.history.len().saturating_sub(SHOWN_HISTORY);
    Ok(Json(json!({
        "name": name,
        "active": record.active,
        "manifest": manifest,
        "versions": record.versions.iter().map(version_json).collect::<Vec<_>>(),
        "history": record.history[skip..],
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateBody {
    version: String,
}

async fn activate_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = name.map_err(path_error)?;
    let body = body.map_err(|r| body_error(r, state.runtime.config.api.max_body_bytes))?;
    let ActivateBody { version } = parse_json(&body, r#"{"version":"1.2.0"}"#)?;
    state.runtime.registry.activate(&name, &version).await?;
    tracing::info!(plugin = %name, %version, "plugin version activated");
    Ok(Json(json!({ "name": name, "active": version })))
}

async fn rollback_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = name.map_err(path_error)?;
    let version = state.runtime.registry.rollback(&name).await?;
    tracing::info!(plugin = %name, %version, "plugin rolled back");
    Ok(Json(json!({ "name": name, "active": version })))
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    /// Also delete the plugin's state and release its namespace and cache prefix.
    #[serde(default)]
    purge: bool,
}

/// `DELETE /v1/plugins/{name}[?purge=true]`. A deleted plugin's state namespace and cache
/// prefix stay reserved (no new plugin can read its state) until it is purged; purging
/// deletes its state (the cache forgets on its own: entries expire) and releases them.
async fn delete_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<DeleteQuery>, QueryRejection>,
) -> ApiResult<StatusCode> {
    let Path(name) = name.map_err(path_error)?;
    let Query(query) = query.map_err(query_error)?;
    let registry = &state.runtime.registry;
    let existed = match registry.delete(&name).await {
        Ok(()) => true,
        Err(RegistryError::NotFound(_)) if query.purge => false,
        Err(e) => return Err(e.into()),
    };
    if existed {
        tracing::info!(plugin = %name, "plugin deleted");
    }
    if query.purge {
        let Some(namespaces) = registry.deleted_namespaces(&name).await else {
            return Err(RegistryError::NotFound(format!("plugin `{name}`")).into());
        };
        let store = &state.runtime.backends.state;
        let mut removed = 0usize;
        for ns in &namespaces {
            loop {
                let page = store.scan(ns, "", 1000).await?;
                if page.is_empty() {
                    break;
                }
                let deletes: Vec<spate_core::backend::StateWrite> = page
                    .into_iter()
                    .map(|(key, _)| spate_core::backend::StateWrite {
                        key,
                        value: None,
                        ttl: None,
                        condition: None,
                    })
                    .collect();
                removed += deletes.len();
                store.apply(ns, &deletes).await?;
            }
        }
        registry.release(&name).await?;
        tracing::info!(plugin = %name, ?namespaces, keys = removed, "plugin purged");
    }
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------
// Topics and events

fn checked_topic(topic: Result<Path<String>, PathRejection>) -> ApiResult<String> {
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

/// One event of a `POST /v1/topics/{topic}/events` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_base64: Option<String>,
    /// Present-but-null is a JSON `null` payload, not a missing one.
    #[serde(default, deserialize_with = "present")]
    payload: Option<Value>,
    #[serde(default)]
    payload_base64: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

const EVENT_EXAMPLE: &str =
    r#"{"key":"c-1","payload":{"amount":3},"headers":{"source":"web"}} or {"events":[...]}"#;

impl EventIn {
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

fn parse_events(body: &[u8]) -> ApiResult<Vec<NewEvent>> {
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
                serde_json::from_value::<EventIn>(v)
                    .map_err(|e| e.to_string())
                    .and_then(EventIn::into_new_event)
                    .map_err(|m| ApiError::bad("invalid_event", format!("events[{i}]: {m}")))
            })
            .collect()
    } else {
        let event = serde_json::from_value::<EventIn>(Value::Object(object))
            .map_err(|e| e.to_string())
            .and_then(EventIn::into_new_event)
            .map_err(|m| ApiError::bad("invalid_event", format!("{m}; send {EVENT_EXAMPLE}")))?;
        Ok(vec![event])
    }
}

async fn append_events(
    State(state): State<ApiState>,
    topic: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let topic = checked_topic(topic)?;
    let body = body.map_err(|r| body_error(r, state.runtime.config.api.max_body_bytes))?;
    let events = parse_events(&body)?;
    let appended = state.runtime.backends.bus.append(&topic, events).await?;
    Ok((StatusCode::CREATED, Json(json!({ "appended": appended }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    /// Read only this partition.
    partition: Option<u32>,
    /// Start offset (every partition read, unless `from` names it).
    offset: Option<u64>,
    /// Per-partition start offsets, `P:O,P:O`.
    from: Option<String>,
    /// Most events returned in all.
    limit: Option<usize>,
}

fn parse_cursors(from: &str) -> ApiResult<BTreeMap<u32, u64>> {
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

async fn topic_partitions(state: &ApiState, topic: &str) -> ApiResult<u32> {
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

async fn topic_info(
    State(state): State<ApiState>,
    topic: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let topic = checked_topic(topic)?;
    let partitions = topic_partitions(&state, &topic).await?;
    let end_offsets = state.runtime.backends.bus.end_offsets(&topic).await?;
    Ok(Json(json!({
        "topic": topic,
        "partitions": partitions,
        "end_offsets": end_offsets,
    })))
}

/// Events of the first read of a partition, before their size is known.
const FIRST_BATCH: usize = 4;
/// Most events asked of the bus at once.
const MAX_BATCH: usize = 256;

async fn read_events(
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
    let mut next = Map::new();
    for &p in &targets {
        let mut at = start_of(p);
        if !has_events(p) {
            next.insert(p.to_string(), json!(at));
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
                let json = serde_json::to_vec(&event_json(&e)).map_err(ApiError::internal)?;
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
        next.insert(p.to_string(), json!(at));
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
fn held_body(bytes: Bytes, permit: OwnedSemaphorePermit) -> axum::body::Body {
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

/// An event as JSON: the key as text when it is UTF-8 (else `key_base64`), the payload
/// as JSON when it parses (else `payload_text` or `payload_base64`).
pub fn event_json(e: &Event) -> Value {
    let mut o = Map::new();
    o.insert("topic".into(), json!(e.topic));
    o.insert("partition".into(), json!(e.partition));
    o.insert("offset".into(), json!(e.offset));
    match &e.key {
        None => {
            o.insert("key".into(), Value::Null);
        }
        Some(k) => match std::str::from_utf8(k) {
            Ok(s) => {
                o.insert("key".into(), json!(s));
            }
            Err(_) => {
                o.insert("key_base64".into(), json!(BASE64.encode(k)));
            }
        },
    }
    match serde_json::from_slice::<Value>(&e.payload) {
        Ok(v) => {
            o.insert("payload".into(), v);
        }
        Err(_) => match std::str::from_utf8(&e.payload) {
            Ok(s) => {
                o.insert("payload_text".into(), json!(s));
            }
            Err(_) => {
                o.insert("payload_base64".into(), json!(BASE64.encode(&e.payload)));
            }
        },
    }
    let headers: Map<String, Value> = e
        .headers
        .iter()
        .map(|h| (h.name.clone(), json!(String::from_utf8_lossy(&h.value))))
        .collect();
    o.insert("headers".into(), Value::Object(headers));
    o.insert("timestamp_ms".into(), json!(e.timestamp_ms));
    Value::Object(o)
}
