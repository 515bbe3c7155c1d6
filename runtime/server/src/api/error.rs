//! Every failure as `{"error":{"code","message"}}`: the [`ApiError`]s handlers return,
//! the framework's own rejections and fallbacks rewritten the same way, and the
//! extractors' errors turned into ones that say what to fix.

use super::*;

/// The body of every error answer: `{"error":{"code","message"}}`. The CLI prints it as
/// `<message> (HTTP <status> <code>)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The `error` of an [`ErrorBody`] (the probes' 503 answers carry one too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable code (`not_found`, `invalid_manifest`, ...).
    pub code: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl ErrorDetail {
    /// An error `code` with its `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
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
        let body = ErrorBody {
            error: ErrorDetail::new(self.code(), self.to_string()),
        };
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

impl ApiError {
    /// A state-store failure (`From<BackendError>` words it for the event log): a 503
    /// saying the store is unavailable, then `retry` (what retrying means for this
    /// request); anything else is a 500.
    pub fn store(e: BackendError, retry: &str) -> Self {
        match e {
            BackendError::Unavailable(m) => {
                tracing::warn!(error = %m, "state store unavailable");
                Self::Unavailable(format!("the state store is unavailable ({m}); {retry}"))
            }
            e => Self::internal(e),
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

/// Replaces any error response that is not already JSON (framework rejections, the
/// time limit) with the API's error body, keeping its status and headers.
pub(super) async fn json_errors(res: Response) -> Response {
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

pub(super) async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound {
        code: "not_found",
        message: format!(
            "no route for {method} {}; the API serves /healthz, /readyz, /metrics, /v1/plugins[/NAME[/activate|/rollback|/parked[/KEY|/redrive|/discard]|/dead-letters/redrive]] and /v1/topics/TOPIC[/events]",
            uri.path()
        ),
    }
}

pub(super) async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
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
