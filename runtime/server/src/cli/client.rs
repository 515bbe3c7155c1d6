//! A small async client for the Spate HTTP API: finds the token, sends requests, and
//! turns error bodies into [`ApiFailure`]s that print as
//! `<message> (HTTP <status> <code>)`.

use super::{DEFAULT_DATA_DIR, GlobalArgs};
use anyhow::Context as _;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use spate::api::ErrorBody;
use std::path::PathBuf;
use std::time::Duration;

/// An error answer from the API.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {} {code})", status.as_u16())]
pub struct ApiFailure {
    /// HTTP status.
    pub status: StatusCode,
    /// The API's error code (`not_found`, `invalid_manifest`, ...).
    pub code: String,
    /// The API's message.
    pub message: String,
}

/// Where the client talks to and with which token.
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    token_file: PathBuf,
}

impl ApiClient {
    /// A client for `--api`, with the token from `--token`/`SPATE_API_TOKEN` or the data
    /// directory's token file.
    pub fn new(global: &GlobalArgs) -> anyhow::Result<Self> {
        let base = global.api.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            anyhow::bail!(
                "--api must be an http:// or https:// URL, got `{}`",
                global.api
            );
        }
        let token_file = global
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
            .join(spate::api::TOKEN_FILE);
        let token = match &global.token {
            Some(t) => Some(t.trim().to_string()),
            None => std::fs::read_to_string(&token_file)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("spate-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base,
            token,
            token_file,
        })
    }

    /// A request to `path` (which starts with `/`).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// Send `req` (a read or a write; every `/v1` route needs the token, reads included)
    /// and decode its answer as the API's typed body `T`.
    pub async fn typed<T: DeserializeOwned>(&self, req: RequestBuilder) -> anyhow::Result<T> {
        let bytes = self.authorized_bytes(req).await?;
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "the API at {} answered with JSON this CLI does not understand; are the CLI and \
                 the server the same version?",
                self.base
            )
        })
    }

    /// Send `req`, whose answer has no body (`204 No Content`).
    pub async fn no_content(&self, req: RequestBuilder) -> anyhow::Result<()> {
        self.authorized_bytes(req).await.map(drop)
    }

    /// The body of a successful answer to `req`, sent with the token.
    async fn authorized_bytes(&self, req: RequestBuilder) -> anyhow::Result<bytes::Bytes> {
        let Some(token) = &self.token else {
            anyhow::bail!(
                "no API token: pass --token or set SPATE_API_TOKEN, or run where `spate up` wrote {} \
                 (point --data-dir at its data directory)",
                self.token_file.display()
            );
        };
        self.send(req.bearer_auth(token)).await
    }

    async fn send(&self, req: RequestBuilder) -> anyhow::Result<bytes::Bytes> {
        let res = req.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                anyhow::anyhow!(
                    "cannot reach the Spate API at {}: {}; is `spate up` running? (set --api or SPATE_API to point elsewhere)",
                    self.base,
                    root_cause(&e)
                )
            } else {
                anyhow::anyhow!("request to {} failed: {}", self.base, root_cause(&e))
            }
        })?;
        let status = res.status();
        let bytes = res
            .bytes()
            .await
            .with_context(|| format!("reading the answer from {}", self.base))?;
        if status.is_success() {
            return Ok(bytes);
        }
        let parsed = serde_json::from_slice::<ErrorBody>(&bytes)
            .ok()
            .map(|b| (b.error.code, b.error.message));
        let (code, message) = parsed.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            let message = if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("request failed")
                    .to_string()
            } else {
                text
            };
            ("http_error".to_string(), message)
        });
        Err(ApiFailure {
            status,
            code,
            message,
        }
        .into())
    }
}

/// The innermost error's text: reqwest's own is "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Whether `e` is an API answer with `status`.
pub fn is_status(e: &anyhow::Error, status: StatusCode) -> bool {
    e.downcast_ref::<ApiFailure>()
        .is_some_and(|f| f.status == status)
}
