//! The plugin registry: uploaded versions stored by content hash, the active version of
//! each plugin, activation, rollback and removal — persisted in a [`RegistryStore`] (the
//! data directory, or the cluster store every pod shares) so a restart serves the same
//! versions, and compiled artifacts cached per runtime so it does not recompile.
//!
//! Every change is validated and compiled before it is recorded; the switch is a single
//! swap that subscribers (the runtime's supervisor) observe through [`Registry::changes`].
//! With a [`ChangeFeed`], each change is announced to the other runtimes, which re-read
//! the plugin's record ([`Registry::refresh`]), load and compile its active version and
//! swap it in the same way; a periodic re-read catches a lost notice.

pub use crate::record::{PluginRecord, Promotion, RegistryError, VersionRecord, content_hash};
use crate::sandbox::{Sandbox, WasmPlugin};
use crate::store::{ChangeFeed, RegistryStore};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use spate_core::host::PluginInfo;
use spate_core::manifest::{LimitCeilings, Manifest};
use spate_core::plugin::PluginVersion;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::broadcast;

fn storage(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

#[derive(Clone, Debug, Default)]
struct RegistryFile {
    plugins: BTreeMap<String, PluginRecord>,
}

/// Prefix of the record a deleted plugin leaves (`deleted.<name>`; plugin names have no
/// `.`): its versions' manifests keep its state namespace and cache prefix reserved until
/// it is purged, so no new plugin reads the old plugin's state.
pub const TOMBSTONE_PREFIX: &str = "deleted.";

fn tombstone(name: &str) -> String {
    format!("{TOMBSTONE_PREFIX}{name}")
}

/// How often a registry with a change feed re-reads every record, in case a notice was
/// lost.
const RESYNC_INTERVAL: Duration = Duration::from_secs(30);

/// A change to the set of active plugins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryChange {
    /// `name` has a new active version.
    Activated(String),
    /// `name` was removed.
    Removed(String),
    /// `name`'s shadow candidate changed (set, replaced or stopped).
    Shadowed(String),
}

/// What an upload did (the API's answer to an upload, which the CLI decodes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadOutcome {
    /// Plugin name.
    pub name: String,
    /// Version stored.
    pub version: String,
    /// Content hash.
    pub hash: String,
    /// Whether it is now the active version.
    pub active: bool,
    /// Whether this exact version was already stored (an idempotent re-upload).
    pub unchanged: bool,
    /// Compile time in milliseconds (0 when the compiled artifact was cached).
    pub compile_ms: u64,
    /// Whether it now runs as the plugin's shadow candidate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

/// The plugin registry.
pub struct Registry {
    sandbox: Arc<Sandbox>,
    store: Arc<dyn RegistryStore>,
    feed: Option<Arc<dyn ChangeFeed>>,
    ceilings: LimitCeilings,
    max_component_bytes: usize,
    file: tokio::sync::Mutex<RegistryFile>,
    loaded: Mutex<HashMap<String, Arc<WasmPlugin>>>,
    active: Mutex<HashMap<String, Arc<WasmPlugin>>>,
    changes: broadcast::Sender<RegistryChange>,
}

fn loaded_key(name: &str, version: &str) -> String {
    format!("{name}@{version}")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Registry {
    /// Open the registry kept in `store` and load every active version (from the
    /// compiled cache when possible). With a `feed`, subscribe to the other runtimes'
    /// changes first (so none made while loading is missed), announce this runtime's own
    /// changes, and follow theirs until the registry is dropped.
    pub async fn open(
        sandbox: Arc<Sandbox>,
        store: Arc<dyn RegistryStore>,
        feed: Option<Arc<dyn ChangeFeed>>,
        ceilings: LimitCeilings,
        max_component_bytes: usize,
    ) -> Result<Arc<Self>, RegistryError> {
        let notices = match &feed {
            Some(f) => Some(f.subscribe().await.map_err(storage)?),
            None => None,
        };
        let plugins = store.load_all().await?;
        let (changes, _) = broadcast::channel(256);
        let registry = Arc::new(Self {
            sandbox,
            store,
            feed,
            ceilings,
            max_component_bytes,
            file: tokio::sync::Mutex::new(RegistryFile {
                plugins: plugins.clone(),
            }),
            loaded: Mutex::new(HashMap::new()),
            active: Mutex::new(HashMap::new()),
            changes,
        });
        for (name, record) in &plugins {
            let Some(active) = &record.active else {
                continue;
            };
            let Some(v) = record.versions.iter().find(|v| &v.version == active) else {
                continue;
            };
            match registry.load_version(name, v).await {
                Ok(plugin) => {
                    registry.active.lock().insert(name.clone(), plugin);
                }
                Err(e) => {
                    tracing::error!(plugin = %name, version = %active, error = %e, "could not load active version")
                }
            }
        }
        if let Some(notices) = notices {
            tokio::spawn(follow(Arc::downgrade(&registry), notices));
        }
        Ok(registry)
    }

    /// Subscribe to activations and removals.
    pub fn changes(&self) -> broadcast::Receiver<RegistryChange> {
        self.changes.subscribe()
    }

    /// The active version of `name`.
    pub fn active(&self, name: &str) -> Option<Arc<dyn PluginVersion>> {
        self.active
            .lock()
            .get(name)
            .map(|p| Arc::clone(p) as Arc<dyn PluginVersion>)
    }

    /// Version `version` of `name`, loaded (compiled, or from the compiled cache) whether
    /// or not it is active: what a replay runs.
    pub async fn version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<dyn PluginVersion>, RegistryError> {
        let stored = self
            .show(name)
            .await
            .and_then(|r| r.versions.iter().find(|v| v.version == version).cloned());
        let Some(v) = stored else {
            return Err(RegistryError::NotFound(format!(
                "version {version} of plugin `{name}`"
            )));
        };
        Ok(self.load_version(name, &v).await? as Arc<dyn PluginVersion>)
    }

    /// `name`'s shadow candidate, loaded, if it has one.
    pub async fn shadow(&self, name: &str) -> Option<Arc<dyn PluginVersion>> {
        let record = self.show(name).await?;
        let version = record.shadow.as_ref()?;
        let v = record.versions.iter().find(|v| &v.version == version)?;
        match self.load_version(name, v).await {
            Ok(p) => Some(p as Arc<dyn PluginVersion>),
            Err(e) => {
                tracing::warn!(plugin = name, %version, error = %e, "cannot load the shadow candidate");
                None
            }
        }
    }

    /// Run stored version `version` of `name` beside its active version as a shadow
    /// candidate (`None`: stop the one running). Loaded and compiled before it is
    /// recorded, like an activation.
    pub async fn set_shadow(&self, name: &str, version: Option<&str>) -> Result<(), RegistryError> {
        let mut file = self.file.lock().await;
        let record = file
            .plugins
            .get(name)
            .filter(|_| !name.starts_with(TOMBSTONE_PREFIX))
            .ok_or_else(|| RegistryError::NotFound(format!("plugin `{name}`")))?;
        if record.shadow.as_deref() == version {
            return Ok(());
        }
        if let Some(version) = version {
            if record.active.as_deref() == Some(version) {
                return Err(RegistryError::Conflict(format!(
                    "{name}@{version} is the active version; a shadow candidate is another version"
                )));
            }
            let v = record
                .versions
                .iter()
                .find(|v| v.version == version)
                .cloned()
                .ok_or_else(|| RegistryError::NotFound(format!("{name}@{version}")))?;
            self.load_version(name, &v).await?;
        }
        let mut new_file = file.clone();
        if let Some(rec) = new_file.plugins.get_mut(name) {
            rec.shadow = version.map(str::to_owned);
            rec.shadow_since_ms = version.map(|_| now_ms().max(0) as u64);
        }
        self.persist(&new_file, name).await?;
        *file = new_file;
        drop(file);
        let _ = self
            .changes
            .send(RegistryChange::Shadowed(name.to_string()));
        self.announce(name).await;
        Ok(())
    }

    /// Make `name`'s shadow candidate active at an offset cut: recorded as a
    /// [`Promotion`] with the activation, in one write.
    pub async fn promote(&self, name: &str) -> Result<Promotion, RegistryError> {
        let mut file = self.file.lock().await;
        let record = file
            .plugins
            .get(name)
            .filter(|_| !name.starts_with(TOMBSTONE_PREFIX))
            .ok_or_else(|| RegistryError::NotFound(format!("plugin `{name}`")))?;
        let to = record.shadow.clone().ok_or_else(|| {
            RegistryError::NotFound(format!("a shadow candidate of plugin `{name}`"))
        })?;
        let from = record.active.clone().ok_or_else(|| {
            RegistryError::Conflict(format!(
                "plugin `{name}` has no active version to promote over; activate {to} instead"
            ))
        })?;
        let last = record.promotions.last().map_or(0, |p| p.id);
        let promotion = Promotion {
            id: (now_ms().max(0) as u64).max(last + 1),
            from: from.clone(),
            to: to.clone(),
        };
        let kept = promotion.clone();
        self.switch(&mut file, name, &to, move |rec| {
            rec.history.push(from);
            rec.promotions.push(kept);
        })
        .await?;
        Ok(promotion)
    }

    /// The promotion that made `name`'s active version active, with the version it
    /// replaced loaded, if its active version was promoted.
    pub async fn promotion(&self, name: &str) -> Option<(u64, Arc<dyn PluginVersion>)> {
        let record = self.show(name).await?;
        let last = record.promotions.last()?;
        if record.active.as_deref() != Some(last.to.as_str()) {
            return None;
        }
        let v = record.versions.iter().find(|v| v.version == last.from)?;
        match self.load_version(name, v).await {
            Ok(p) => Some((last.id, p as Arc<dyn PluginVersion>)),
            Err(e) => {
                tracing::warn!(plugin = name, version = %last.from, error = %e, "cannot load the version a promotion replaced; events below its cut go to the active version");
                None
            }
        }
    }

    /// Names of every plugin with an active version.
    pub fn active_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.active.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Every plugin and its versions (deleted ones excluded).
    pub async fn list(&self) -> BTreeMap<String, PluginRecord> {
        let file = self.file.lock().await;
        file.plugins
            .iter()
            .filter(|(name, _)| !name.starts_with(TOMBSTONE_PREFIX))
            .map(|(name, r)| (name.clone(), r.clone()))
            .collect()
    }

    /// One plugin and its versions.
    pub async fn show(&self, name: &str) -> Option<PluginRecord> {
        if name.starts_with(TOMBSTONE_PREFIX) {
            return None;
        }
        self.file.lock().await.plugins.get(name).cloned()
    }

    /// The state namespaces a deleted plugin keeps reserved, if `name` was deleted and not
    /// purged since.
    pub async fn deleted_namespaces(&self, name: &str) -> Option<Vec<String>> {
        let file = self.file.lock().await;
        let record = file.plugins.get(&tombstone(name))?;
        let mut namespaces: Vec<String> = record
            .versions
            .iter()
            .filter_map(|v| toml::from_str::<Manifest>(&v.manifest).ok())
            .map(|m| m.state_namespace().to_string())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        Some(namespaces)
    }

    /// Forget a deleted plugin (its state already removed): its namespace and cache prefix
    /// may be claimed again.
    pub async fn release(&self, name: &str) -> Result<(), RegistryError> {
        let key = tombstone(name);
        let mut file = self.file.lock().await;
        if !file.plugins.contains_key(&key) {
            return Err(RegistryError::NotFound(format!(
                "deleted plugin `{name}` (nothing to purge)"
            )));
        }
        let mut new_file = file.clone();
        new_file.plugins.remove(&key);
        self.persist(&new_file, &key).await?;
        *file = new_file;
        drop(file);
        self.announce(&key).await;
        Ok(())
    }

    async fn load_version(
        &self,
        name: &str,
        v: &VersionRecord,
    ) -> Result<Arc<WasmPlugin>, RegistryError> {
        let key = loaded_key(name, &v.version);
        if let Some(p) = self.loaded.lock().get(&key) {
            return Ok(Arc::clone(p));
        }
        let manifest = Manifest::parse(&v.manifest, &self.ceilings)?;
        // A compiled artifact cached by this runtime needs no component bytes (in a
        // cluster, fetching them is a store round trip per chunk).
        let cached = if self.sandbox.is_cached(&v.hash) {
            let sandbox = Arc::clone(&self.sandbox);
            let hash = v.hash.clone();
            tokio::task::spawn_blocking(move || sandbox.load_cached(&hash, &[]))
                .await
                .map_err(storage)?
                .ok()
        } else {
            None
        };
        let component = match cached {
            Some(c) => c,
            None => {
                let bytes = self.store.get_component(&v.hash).await?;
                let sandbox = Arc::clone(&self.sandbox);
                let hash = v.hash.clone();
                tokio::task::spawn_blocking(move || sandbox.load_cached(&hash, &bytes))
                    .await
                    .map_err(storage)??
            }
        };
        let info = Arc::new(PluginInfo::new(manifest, v.hash.clone()));
        let plugin = self.sandbox.plugin(&component, info)?;
        self.loaded.lock().insert(key, Arc::clone(&plugin));
        Ok(plugin)
    }

    /// Store `name`'s record as it is in `file`.
    async fn persist(&self, file: &RegistryFile, name: &str) -> Result<(), RegistryError> {
        self.store
            .save(name, file.plugins.get(name), &file.plugins)
            .await
    }

    /// Tell the other runtimes that `name` changed. The change is already stored, so a
    /// failure only delays them until their next re-read.
    async fn announce(&self, name: &str) {
        if let Some(feed) = &self.feed
            && let Err(e) = feed.publish(name).await
        {
            tracing::warn!(plugin = name, error = %e, "could not announce a registry change; other runtimes pick it up at their next re-read");
        }
    }

    /// Bring `name` in line with its stored record: another runtime changed it. Loads and
    /// compiles a newly active version before swapping it in, exactly like a local
    /// activation; nothing changes if that fails.
    pub async fn refresh(&self, name: &str) -> Result<(), RegistryError> {
        let stored = self.store.load(name).await?;
        let mut file = self.file.lock().await;
        let active_now = self
            .active
            .lock()
            .get(name)
            .map(|p| p.info().manifest.version.to_string());
        if file.plugins.get(name) == stored.as_ref()
            && active_now == stored.as_ref().and_then(|r| r.active.clone())
        {
            return Ok(());
        }
        let target = stored.as_ref().and_then(|r| {
            let v = r.active.as_ref()?;
            r.versions.iter().find(|x| &x.version == v).cloned()
        });
        match target {
            Some(v) => {
                if active_now.as_deref() != Some(v.version.as_str()) {
                    let plugin = self.load_version(name, &v).await?;
                    self.active.lock().insert(name.to_string(), plugin);
                    let _ = self
                        .changes
                        .send(RegistryChange::Activated(name.to_string()));
                    tracing::info!(plugin = name, version = %v.version, "switched to a version activated by another runtime");
                }
            }
            None => {
                if self.active.lock().remove(name).is_some() {
                    let _ = self.changes.send(RegistryChange::Removed(name.to_string()));
                    tracing::info!(plugin = name, "plugin removed by another runtime");
                }
            }
        }
        let shadow_was = file.plugins.get(name).and_then(|r| r.shadow.clone());
        let shadow_now = stored.as_ref().and_then(|r| r.shadow.clone());
        if shadow_was != shadow_now {
            let _ = self
                .changes
                .send(RegistryChange::Shadowed(name.to_string()));
        }
        match stored {
            Some(r) => {
                file.plugins.insert(name.to_string(), r);
            }
            None => {
                file.plugins.remove(name);
                self.loaded
                    .lock()
                    .retain(|k, _| !k.starts_with(&format!("{name}@")));
            }
        }
        Ok(())
    }

    /// Re-read every record (a lost notice, a runtime that was away).
    pub async fn resync(&self) -> Result<(), RegistryError> {
        let mut names: Vec<String> = self.store.load_all().await?.into_keys().collect();
        names.extend(self.file.lock().await.plugins.keys().cloned());
        names.sort();
        names.dedup();
        for name in names {
            if let Err(e) = self.refresh(&name).await {
                tracing::warn!(plugin = %name, error = %e, "could not refresh plugin");
            }
        }
        Ok(())
    }

    /// Validate, compile and store a new version; with `activate`, switch to it.
    /// Compilation runs off the async runtime. Nothing changes if any check fails.
    pub async fn upload(
        &self,
        manifest_text: &str,
        component: Vec<u8>,
        activate: bool,
    ) -> Result<UploadOutcome, RegistryError> {
        if component.len() > self.max_component_bytes {
            return Err(RegistryError::TooLarge {
                size: component.len(),
                limit: self.max_component_bytes,
            });
        }
        let manifest = Manifest::parse(manifest_text, &self.ceilings)?;
        let name = manifest.name.clone();
        let version = manifest.version.to_string();
        let hash = content_hash(&component);

        // Compile before taking the registry lock: an upload never blocks serving.
        let started = std::time::Instant::now();
        let cached = self.sandbox.is_cached(&hash);
        let sandbox = Arc::clone(&self.sandbox);
        let h = hash.clone();
        let bytes = component.clone();
        let compiled = tokio::task::spawn_blocking(move || sandbox.load_cached(&h, &bytes))
            .await
            .map_err(storage)??;
        let compile_ms = if cached {
            0
        } else {
            started.elapsed().as_millis() as u64
        };

        let mut file = self.file.lock().await;
        check_namespaces(&file, &manifest)?;
        let record = file.plugins.entry(name.clone()).or_default().clone();
        let existing = record.versions.iter().find(|v| v.version == version);
        if let Some(v) = existing
            && v.hash != hash
        {
            return Err(RegistryError::Conflict(format!(
                "{name}@{version} already exists with different content; bump the version"
            )));
        }
        let unchanged = existing.is_some_and(|v| v.manifest == manifest_text);
        if existing.is_some() && !unchanged {
            return Err(RegistryError::Conflict(format!(
                "{name}@{version} already exists with a different manifest; bump the version"
            )));
        }
        let size = component.len();
        self.store.put_component(&hash, &component).await?;
        let info = Arc::new(PluginInfo::new(manifest, hash.clone()));
        let plugin = self.sandbox.plugin(&compiled, info)?;
        let mut new_file = file.clone();
        let rec = new_file.plugins.entry(name.clone()).or_default();
        if !unchanged {
            rec.versions.push(VersionRecord {
                version: version.clone(),
                hash: hash.clone(),
                manifest: manifest_text.to_string(),
                size,
                uploaded_ms: now_ms(),
            });
        }
        let switching = activate && rec.active.as_deref() != Some(version.as_str());
        if switching {
            if let Some(prev) = rec.active.take() {
                rec.history.push(prev);
            }
            rec.active = Some(version.clone());
        }
        self.persist(&new_file, &name).await?;
        *file = new_file;
        self.loaded
            .lock()
            .insert(loaded_key(&name, &version), Arc::clone(&plugin));
        let is_active =
            file.plugins.get(&name).and_then(|r| r.active.as_deref()) == Some(version.as_str());
        if switching {
            self.active.lock().insert(name.clone(), plugin);
            let _ = self.changes.send(RegistryChange::Activated(name.clone()));
        }
        drop(file);
        if !unchanged || switching {
            self.announce(&name).await;
        }
        Ok(UploadOutcome {
            name,
            version,
            hash,
            active: is_active,
            unchanged,
            compile_ms,
            shadow: false,
        })
    }

    /// Make a stored version the active one.
    pub async fn activate(&self, name: &str, version: &str) -> Result<(), RegistryError> {
        let mut file = self.file.lock().await;
        let record = file
            .plugins
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(format!("plugin `{name}`")))?;
        if record.active.as_deref() == Some(version) {
            return Ok(());
        }
        self.switch(&mut file, name, version, |rec| {
            if let Some(prev) = rec.active.take() {
                rec.history.push(prev);
            }
        })
        .await
    }

    /// Switch back to the version that served before the current one. Returns it.
    pub async fn rollback(&self, name: &str) -> Result<String, RegistryError> {
        let mut file = self.file.lock().await;
        let record = file
            .plugins
            .get(name)
            .ok_or_else(|| RegistryError::NotFound(format!("plugin `{name}`")))?;
        let previous = record.history.last().cloned().ok_or_else(|| {
            RegistryError::Conflict(format!(
                "plugin `{name}` has no previous version to roll back to"
            ))
        })?;
        self.switch(&mut file, name, &previous, |rec| {
            rec.history.pop();
        })
        .await?;
        Ok(previous)
    }

    /// Load `version` of `name`, record it as active (after `update_history` adjusts the
    /// record), persist, then swap it in and tell subscribers. Nothing changes on error.
    async fn switch(
        &self,
        file: &mut RegistryFile,
        name: &str,
        version: &str,
        update_history: impl FnOnce(&mut PluginRecord),
    ) -> Result<(), RegistryError> {
        let v = file
            .plugins
            .get(name)
            .and_then(|r| r.versions.iter().find(|v| v.version == version))
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(format!("{name}@{version}")))?;
        let plugin = self.load_version(name, &v).await?;
        let mut new_file = file.clone();
        let mut unshadowed = false;
        if let Some(rec) = new_file.plugins.get_mut(name) {
            update_history(rec);
            rec.active = Some(version.to_string());
            // A candidate that becomes active is no longer a shadow.
            if rec.shadow.as_deref() == Some(version) {
                rec.shadow = None;
                rec.shadow_since_ms = None;
                unshadowed = true;
            }
        }
        self.persist(&new_file, name).await?;
        *file = new_file;
        self.active.lock().insert(name.to_string(), plugin);
        let _ = self
            .changes
            .send(RegistryChange::Activated(name.to_string()));
        if unshadowed {
            let _ = self
                .changes
                .send(RegistryChange::Shadowed(name.to_string()));
        }
        self.announce(name).await;
        Ok(())
    }

    /// Remove a plugin and all its versions. Its consumer positions are kept, so a
    /// re-upload under the same name resumes where it stopped.
    pub async fn delete(&self, name: &str) -> Result<(), RegistryError> {
        let mut file = self.file.lock().await;
        if !file.plugins.contains_key(name) {
            return Err(RegistryError::NotFound(format!("plugin `{name}`")));
        }
        let mut new_file = file.clone();
        if let Some(record) = new_file.plugins.remove(name) {
            // The tombstone keeps the namespaces reserved (of every version ever deleted
            // under this name); it never serves.
            let stone = new_file.plugins.entry(tombstone(name)).or_default();
            stone.versions.extend(record.versions);
        }
        self.persist(&new_file, &tombstone(name)).await?;
        self.persist(&new_file, name).await?;
        *file = new_file;
        self.active.lock().remove(name);
        self.loaded
            .lock()
            .retain(|k, _| !k.starts_with(&format!("{name}@")));
        let _ = self.changes.send(RegistryChange::Removed(name.to_string()));
        drop(file);
        self.announce(name).await;
        Ok(())
    }
}

/// Apply the other runtimes' notices, and re-read everything now and then, for as long as
/// the registry lives.
async fn follow(registry: Weak<Registry>, mut notices: tokio::sync::mpsc::Receiver<String>) {
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    resync.tick().await;
    loop {
        tokio::select! {
            notice = notices.recv() => {
                let Some(name) = notice else { return };
                let Some(registry) = registry.upgrade() else { return };
                if let Err(e) = registry.refresh(&name).await {
                    tracing::warn!(plugin = %name, error = %e, "could not apply a registry change; retrying at the next re-read");
                }
            }
            _ = resync.tick() => {
                let Some(registry) = registry.upgrade() else { return };
                if let Err(e) = registry.resync().await {
                    tracing::warn!(error = %e, "registry re-read failed");
                }
            }
        }
    }
}

/// No two plugins may share a state namespace, and no cache prefix may be a prefix of
/// another plugin's: otherwise one plugin could read the other's data. A dead-letter topic
/// is the plugin's own: never another plugin's input, emit or dead-letter topic (a write
/// into another plugin's input that no emit capability granted).
fn check_namespaces(file: &RegistryFile, manifest: &Manifest) -> Result<(), RegistryError> {
    let ns = manifest.state_namespace();
    let prefix = manifest.cache_prefix();
    let dlq = manifest.dead_letter_topic();
    for (other, record) in &file.plugins {
        // A plugin's own versions, and those it left when deleted (a re-deploy of a deleted
        // plugin takes its state back).
        if *other == manifest.name || *other == tombstone(&manifest.name) {
            continue;
        }
        let other = match other.strip_prefix(TOMBSTONE_PREFIX) {
            Some(deleted) => format!(
                "deleted plugin `{deleted}` (its state is kept until purged: \
                 `spate plugin rm {deleted} --purge`)"
            ),
            None => format!("plugin `{other}`"),
        };
        for v in &record.versions {
            let Ok(m) = toml::from_str::<Manifest>(&v.manifest) else {
                continue;
            };
            if m.state_namespace() == ns {
                return Err(RegistryError::Conflict(format!(
                    "state namespace `{ns}` belongs to {other}"
                )));
            }
            let p = m.cache_prefix();
            if p.starts_with(&prefix) || prefix.starts_with(&p) {
                return Err(RegistryError::Conflict(format!(
                    "cache prefix `{prefix}` overlaps `{p}` of {other}"
                )));
            }
            let used = if m.subscriptions.iter().any(|s| s.topic == dlq) {
                Some("an input topic")
            } else if m.capabilities.emit_topics.contains(&dlq) {
                Some("an emit topic")
            } else if m.dead_letter_topic() == dlq {
                Some("the dead-letter topic")
            } else {
                None
            };
            if let Some(role) = used {
                return Err(RegistryError::Conflict(format!(
                    "dead-letter-topic `{dlq}` is {role} of {other}; give dead \
                     letters a topic of their own"
                )));
            }
        }
    }
    Ok(())
}
