//! Plugin uploads and their lifecycle: list, show, activate, roll back, delete.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadQuery {
    #[serde(default = "default_true")]
    activate: bool,
}

pub(super) fn default_true() -> bool {
    true
}

pub(super) const HOW_TO_UPLOAD: &str = "send a multipart form with a `manifest` part (the spate.toml text) and a `component` part \
    (the .wasm file), e.g. `curl -H \"Authorization: Bearer $TOKEN\" -F manifest=@spate.toml -F component=@plugin.wasm \
    http://127.0.0.1:8780/v1/plugins`, or use `spate plugin deploy`";

pub(super) async fn upload_plugin(
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

pub(super) fn version_json(v: &spate_engine::registry::VersionRecord) -> Value {
    json!({
        "version": v.version,
        "hash": v.hash,
        "size": v.size,
        "uploaded_ms": v.uploaded_ms,
    })
}

pub(super) async fn list_plugins(State(state): State<ApiState>) -> Json<Value> {
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

pub(super) async fn show_plugin(
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
pub(super) struct ActivateBody {
    version: String,
}

pub(super) async fn activate_plugin(
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

pub(super) async fn rollback_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = name.map_err(path_error)?;
    let version = state.runtime.registry.rollback(&name).await?;
    tracing::info!(plugin = %name, %version, "plugin rolled back");
    Ok(Json(json!({ "name": name, "active": version })))
}

#[derive(Debug, Deserialize)]
pub(super) struct DeleteQuery {
    /// Also delete the plugin's state and release its namespace and cache prefix.
    #[serde(default)]
    purge: bool,
}

/// `DELETE /v1/plugins/{name}[?purge=true]`. A deleted plugin's state namespace and cache
/// prefix stay reserved (no new plugin can read its state) until it is purged; purging
/// deletes its state (the cache forgets on its own: entries expire) and releases them.
pub(super) async fn delete_plugin(
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
                let deletes: Vec<spate_core::StateWrite> = page
                    .into_iter()
                    .map(|(key, _)| spate_core::StateWrite {
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
