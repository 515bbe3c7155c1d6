//! Plugin uploads and their lifecycle: list, show, activate, roll back, delete; and the
//! typed bodies these routes take and answer with (the CLI decodes the same types).
//!
//! Routes (all under the API's bearer token):
//! - `POST /v1/plugins[?activate=false]`, a multipart form → [`UploadOutcome`] (201, or
//!   200 for an unchanged re-upload);
//! - `GET /v1/plugins` → [`PluginList`];
//! - `GET /v1/plugins/{name}` → [`PluginShow`];
//! - `POST /v1/plugins/{name}/activate`, an [`ActivateBody`] → [`Activated`];
//! - `POST /v1/plugins/{name}/rollback` (no body) → [`Activated`];
//! - `DELETE /v1/plugins/{name}[?purge=true]` → 204, no body;
//! - `POST /v1/plugins?shadow=true` uploads a shadow candidate; `GET
//!   /v1/plugins/{name}/shadow` → its [`ShadowReport`]; `DELETE .../shadow` stops it;
//!   `POST .../promote` → [`Activated`] (the candidate becomes active).
//!
//! The answers' fields are declared in name order: the order these bodies have always had.

use super::*;

pub use spate_dispatch::shadow::ShadowReport;
pub use spate_engine::UploadOutcome;

/// One stored version of a plugin, as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionView {
    /// Hex sha256 of the component.
    pub hash: String,
    /// Component size in bytes.
    pub size: usize,
    /// Upload time, milliseconds since the Unix epoch.
    pub uploaded_ms: i64,
    /// Semantic version.
    pub version: String,
}

impl VersionView {
    fn new(v: &spate_engine::registry::VersionRecord) -> Self {
        Self {
            hash: v.hash.clone(),
            size: v.size,
            uploaded_ms: v.uploaded_ms,
            version: v.version.clone(),
        }
    }

    fn all(versions: &[spate_engine::registry::VersionRecord]) -> Vec<Self> {
        versions.iter().map(Self::new).collect()
    }
}

/// One plugin of a [`PluginList`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginSummary {
    /// The serving version, if any.
    pub active: Option<String>,
    /// The plugin.
    pub name: String,
    /// The shadow candidate running beside the active version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
    /// Its stored versions, in upload order.
    pub versions: Vec<VersionView>,
}

/// `GET /v1/plugins`: every deployed plugin, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginList {
    /// The plugins.
    pub plugins: Vec<PluginSummary>,
}

/// `GET /v1/plugins/{name}`: one plugin, its active manifest and activation history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginShow {
    /// The serving version, if any.
    pub active: Option<String>,
    /// Versions that served before, most recent last (at most the last 20).
    pub history: Vec<String>,
    /// The active version's manifest as JSON; its text if it no longer parses (a manifest
    /// stored by an older release), `null` without an active version.
    pub manifest: Value,
    /// The plugin.
    pub name: String,
    /// Shadow candidates promoted to active, with their offset cuts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promotions: Vec<PromotionView>,
    /// The shadow candidate running beside the active version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
    /// Its stored versions, in upload order.
    pub versions: Vec<VersionView>,
}

/// The body of `POST /v1/plugins/{name}/activate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateBody {
    /// The stored version to make active.
    pub version: String,
}

/// The answer of `POST .../activate` and `.../rollback`: the version now serving.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activated {
    /// The version now active.
    pub active: String,
    /// The plugin.
    pub name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadQuery {
    #[serde(default = "default_true")]
    activate: bool,
    /// Run the new version beside the active one as a shadow candidate (not activated).
    #[serde(default)]
    shadow: bool,
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
    let registry = &state.runtime.registry;
    let mut outcome = registry
        .upload(&manifest, component, query.activate && !query.shadow)
        .await?;
    if query.shadow {
        registry
            .set_shadow(&outcome.name, Some(&outcome.version))
            .await?;
        // A new candidate starts with an empty report: the earlier ones' are dropped.
        forget_reports(&state, &outcome.name).await;
        outcome.shadow = true;
    }
    tracing::info!(plugin = %outcome.name, version = %outcome.version, active = outcome.active, unchanged = outcome.unchanged, "plugin uploaded");
    let status = if outcome.unchanged {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(outcome)).into_response())
}

pub(super) async fn list_plugins(State(state): State<ApiState>) -> Json<PluginList> {
    let plugins = state
        .runtime
        .registry
        .list()
        .await
        .into_iter()
        .map(|(name, record)| PluginSummary {
            active: record.active,
            name,
            shadow: record.shadow,
            versions: VersionView::all(&record.versions),
        })
        .collect();
    Json(PluginList { plugins })
}

pub(super) async fn show_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<PluginShow>> {
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
    let promotions = promotion_views(&state, &name, &record).await?;
    Ok(Json(PluginShow {
        promotions,
        versions: VersionView::all(&record.versions),
        history: record.history[skip..].to_vec(),
        active: record.active,
        manifest,
        name,
        shadow: record.shadow,
    }))
}

pub(super) async fn activate_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Activated>> {
    let Path(name) = name.map_err(path_error)?;
    let body = body.map_err(|r| body_error(r, state.runtime.config.api.max_body_bytes))?;
    let ActivateBody { version } = parse_json(&body, r#"{"version":"1.2.0"}"#)?;
    state.runtime.registry.activate(&name, &version).await?;
    tracing::info!(plugin = %name, %version, "plugin version activated");
    Ok(Json(Activated {
        active: version,
        name,
    }))
}

pub(super) async fn rollback_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Activated>> {
    let Path(name) = name.map_err(path_error)?;
    let version = state.runtime.registry.rollback(&name).await?;
    tracing::info!(plugin = %name, %version, "plugin rolled back");
    Ok(Json(Activated {
        active: version,
        name,
    }))
}

/// `GET /v1/plugins/{name}/shadow`: how the shadow candidate compares with the active
/// version on the events every runtime of the cluster handled since it started running it
/// (this runtime's comparisons live, the others' as they published them, at most a second
/// old). Until this runtime's pipelines run the candidate its own share is empty, never
/// the previous candidate's.
pub(super) async fn shadow_report(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<ShadowReport>> {
    let Path(name) = name.map_err(path_error)?;
    let (candidate, generation) = no_shadow(&state, &name).await?;
    let report = state
        .runtime
        .cluster_shadow_report(&name, (&candidate, &generation))
        .await
        .map_err(|e| ApiError::store(e, "retry shortly"))?;
    Ok(Json(report))
}

/// Drop the shadow reports the runtimes published on `name`'s earlier candidates. A failure
/// is logged, not returned: the registry change it follows stands, and the reports left
/// behind are never summed again (their TTL removes them).
async fn forget_reports(state: &ApiState, name: &str) {
    if let Err(e) = state.runtime.forget_shadow_reports(name).await {
        tracing::warn!(plugin = %name, error = %e, "cannot drop the published shadow reports");
    }
}

/// 404 unless `name` exists and has a shadow candidate; the candidate and the generation
/// its reports are kept under.
async fn no_shadow(state: &ApiState, name: &str) -> ApiResult<(String, String)> {
    if let Some(found) = state.runtime.shadow_generation(name).await {
        return Ok(found);
    }
    match state.runtime.registry.show(name).await {
        None => Err(ApiError::NotFound {
            code: "not_found",
            message: format!(
                "no plugin named `{name}`; `GET /v1/plugins` (`spate plugin ls`) lists them"
            ),
        }),
        Some(_) => Err(ApiError::NotFound {
            code: "no_shadow",
            message: format!(
                "plugin `{name}` has no shadow candidate; upload one with `POST /v1/plugins?shadow=true` (`spate plugin deploy --shadow`)"
            ),
        }),
    }
}

/// `DELETE /v1/plugins/{name}/shadow`: stop the shadow candidate (it stays stored).
pub(super) async fn stop_shadow(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(name) = name.map_err(path_error)?;
    no_shadow(&state, &name).await?;
    state.runtime.registry.set_shadow(&name, None).await?;
    forget_reports(&state, &name).await;
    tracing::info!(plugin = %name, "shadow candidate stopped");
    Ok(StatusCode::NO_CONTENT)
}

/// The answer of `POST /v1/plugins/{name}/promote`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promoted {
    /// The version now active (the candidate).
    pub active: String,
    /// The version it replaced: events below each partition's cut stay on it.
    pub from: String,
    /// The plugin.
    pub name: String,
    /// The promotion's id; its cuts are listed by `GET /v1/plugins/{name}` once the
    /// pipelines took them (within a commit interval).
    pub promotion: u64,
}

/// One promotion in a plugin's history, with the cuts taken so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionView {
    /// Per `topic/partition`, the first offset the promoted version handled.
    pub cuts: BTreeMap<String, u64>,
    /// The version replaced.
    pub from: String,
    /// The promotion's id (Unix ms when it was made).
    pub id: u64,
    /// The version promoted.
    pub to: String,
}

/// `POST /v1/plugins/{name}/promote`: make the shadow candidate the active version at an
/// offset cut per partition.
pub(super) async fn promote_plugin(
    State(state): State<ApiState>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Promoted>> {
    let Path(name) = name.map_err(path_error)?;
    no_shadow(&state, &name).await?;
    let p = state.runtime.registry.promote(&name).await?;
    forget_reports(&state, &name).await;
    tracing::info!(plugin = %name, from = %p.from, to = %p.to, promotion = p.id, "shadow candidate promoted");
    Ok(Json(Promoted {
        active: p.to,
        from: p.from,
        name,
        promotion: p.id,
    }))
}

/// The plugin's promotions, newest last, with their cuts from the state store.
async fn promotion_views(
    state: &ApiState,
    name: &str,
    record: &spate_engine::registry::PluginRecord,
) -> ApiResult<Vec<PromotionView>> {
    let store = state.runtime.backends.tier.for_plugin(name);
    let mut out = Vec::new();
    for p in &record.promotions {
        let cuts = spate_dispatch::promotion::cuts(&*store, name, p.id).await?;
        out.push(PromotionView {
            cuts,
            from: p.from.clone(),
            id: p.id,
            to: p.to.clone(),
        });
    }
    Ok(out)
}

/// How long a purge waits for the deleted plugin's pipelines here to drain.
const PURGE_DRAIN: Duration = Duration::from_secs(30);

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
        // A stopping pipeline's last checkpoint writes state: purging before it would let
        // that state outlive the purge, to be read by the namespace's next owner.
        if !state.runtime.stopped_here(&name, PURGE_DRAIN).await {
            return Err(ApiError::Unavailable(format!(
                "plugin `{name}` is deleted but its pipelines are still draining; \
                 retry the purge shortly"
            )));
        }
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
