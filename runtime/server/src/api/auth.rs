//! The bearer token: where it comes from (configured, or generated into the data
//! directory) and the middleware every `/v1` route sits behind.

use super::*;

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

pub(super) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
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

/// Every route behind it needs the bearer token, reads included: events, dead letters,
/// workflows and manifests are the deployment's data.
pub(super) async fn require_token(
    State(state): State<ApiState>,
    req: Request,
    next: Next,
) -> Response {
    match check_token(&state.token, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

pub(super) fn check_token(expected: &str, headers: &HeaderMap) -> ApiResult<()> {
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
