//! Where the registry keeps plugin records and components, and how runtimes sharing a
//! registry hear of each other's changes.
//!
//! [`LocalStore`] is the data directory of one runtime (`registry.json` and `blobs/`).
//! [`SharedStore`] keeps both in the cluster's [`StateStore`] (ScyllaDB/Cassandra), in
//! namespaces reserved for the runtime, so every pod reads the same registry and none needs
//! local state to recover: records under `_spate_registry`, each component chunked into a
//! partition of its own (`_spate_component_<sha256>`), its `meta` row written last so a
//! half-written component is never read. A [`ChangeFeed`] (a compacted Kafka topic in a
//! cluster) carries small "plugin X changed" notices; receivers re-read X's record.

use crate::record::{PluginRecord, RegistryError, content_hash};
use crate::sandbox::write_atomic;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
pub use spate_core::ChangeFeed;
use spate_core::{StateStore, StateWrite};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

fn storage(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Storage(e.to_string())
}

/// Persistence of the registry.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Every plugin's record.
    async fn load_all(&self) -> Result<BTreeMap<String, PluginRecord>, RegistryError>;

    /// One plugin's record, `None` if it has none.
    async fn load(&self, name: &str) -> Result<Option<PluginRecord>, RegistryError>;

    /// Store `name`'s record (`None` removes the plugin). `all` is the whole registry after
    /// the change, for stores that write it as one file.
    async fn save(
        &self,
        name: &str,
        record: Option<&PluginRecord>,
        all: &BTreeMap<String, PluginRecord>,
    ) -> Result<(), RegistryError>;

    /// Store a component under its content hash (idempotent).
    async fn put_component(&self, hash: &str, bytes: &[u8]) -> Result<(), RegistryError>;

    /// A component's bytes, checked against its hash.
    async fn get_component(&self, hash: &str) -> Result<Vec<u8>, RegistryError>;
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    plugins: BTreeMap<String, PluginRecord>,
}

/// The registry in one runtime's data directory.
pub struct LocalStore {
    dir: PathBuf,
}

impl LocalStore {
    /// A store in `dir` (created if absent).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Arc<Self>, RegistryError> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("blobs")).map_err(storage)?;
        Ok(Arc::new(Self { dir }))
    }

    fn blob_path(&self, hash: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{hash}.wasm"))
    }
}

#[async_trait]
impl RegistryStore for LocalStore {
    async fn load_all(&self) -> Result<BTreeMap<String, PluginRecord>, RegistryError> {
        match std::fs::read(self.dir.join("registry.json")) {
            Ok(bytes) => Ok(serde_json::from_slice::<RegistryFile>(&bytes)
                .map_err(storage)?
                .plugins),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(storage(e)),
        }
    }

    async fn load(&self, name: &str) -> Result<Option<PluginRecord>, RegistryError> {
        Ok(self.load_all().await?.remove(name))
    }

    async fn save(
        &self,
        _name: &str,
        _record: Option<&PluginRecord>,
        all: &BTreeMap<String, PluginRecord>,
    ) -> Result<(), RegistryError> {
        let file = RegistryFile {
            plugins: all.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(storage)?;
        let path = self.dir.join("registry.json");
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(storage)?
            .map_err(storage)
    }

    async fn put_component(&self, hash: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        let path = self.blob_path(hash);
        if path.exists() {
            return Ok(());
        }
        let bytes = bytes.to_vec();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(storage)?
            .map_err(storage)
    }

    async fn get_component(&self, hash: &str) -> Result<Vec<u8>, RegistryError> {
        let path = self.blob_path(hash);
        tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(storage)?
            .map_err(storage)
    }
}

/// Namespace of the shared registry's records.
pub const REGISTRY_NAMESPACE: &str = "_spate_registry";
/// Key listing every plugin name (the store may not support scans).
const INDEX_KEY: &str = "plugins";
/// Bytes per component chunk: well under CQL's comfortable cell and batch sizes.
const CHUNK_BYTES: usize = 256 << 10;

#[derive(Serialize, Deserialize)]
struct ComponentMeta {
    size: usize,
    chunks: usize,
}

/// The registry in the cluster's state store: shared by every runtime pointed at it.
///
/// Concurrent changes to the same plugin from two runtimes are last-writer-wins (the
/// test CQL server has no lightweight transactions to make them conditional).
pub struct SharedStore {
    store: Arc<dyn StateStore>,
}

impl SharedStore {
    /// The registry in `store` (the raw store, not a read-through tier: every runtime
    /// must see the others' writes at once).
    pub fn new(store: Arc<dyn StateStore>) -> Arc<Self> {
        Arc::new(Self { store })
    }

    fn component_namespace(hash: &str) -> String {
        format!("_spate_component_{hash}")
    }

    async fn index(&self) -> Result<Vec<String>, RegistryError> {
        match self
            .store
            .get(REGISTRY_NAMESPACE, INDEX_KEY)
            .await
            .map_err(storage)?
        {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(storage),
            None => Ok(Vec::new()),
        }
    }

    fn put(key: String, value: Vec<u8>) -> StateWrite {
        StateWrite {
            key,
            value: Some(value),
            ttl: None,
            condition: None,
        }
    }
}

#[async_trait]
impl RegistryStore for SharedStore {
    async fn load_all(&self) -> Result<BTreeMap<String, PluginRecord>, RegistryError> {
        let mut all = BTreeMap::new();
        for name in self.index().await? {
            if let Some(record) = self.load(&name).await? {
                all.insert(name, record);
            }
        }
        Ok(all)
    }

    async fn load(&self, name: &str) -> Result<Option<PluginRecord>, RegistryError> {
        self.store
            .get(REGISTRY_NAMESPACE, &format!("plugin/{name}"))
            .await
            .map_err(storage)?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(storage))
            .transpose()
    }

    async fn save(
        &self,
        name: &str,
        record: Option<&PluginRecord>,
        _all: &BTreeMap<String, PluginRecord>,
    ) -> Result<(), RegistryError> {
        let mut index = self.index().await?;
        index.retain(|n| n != name);
        let key = format!("plugin/{name}");
        let record_write = match record {
            Some(r) => {
                index.push(name.to_string());
                Self::put(key, serde_json::to_vec(r).map_err(storage)?)
            }
            None => StateWrite {
                key,
                value: None,
                ttl: None,
                condition: None,
            },
        };
        index.sort();
        let index_write = Self::put(
            INDEX_KEY.to_string(),
            serde_json::to_vec(&index).map_err(storage)?,
        );
        // One namespace is one partition: the record and the index change together.
        self.store
            .apply(REGISTRY_NAMESPACE, &[record_write, index_write])
            .await
            .map_err(storage)?;
        Ok(())
    }

    async fn put_component(&self, hash: &str, bytes: &[u8]) -> Result<(), RegistryError> {
        let ns = Self::component_namespace(hash);
        if self
            .store
            .get(&ns, "meta")
            .await
            .map_err(storage)?
            .is_some()
        {
            return Ok(());
        }
        let chunks: Vec<&[u8]> = bytes.chunks(CHUNK_BYTES).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            self.store
                .apply(&ns, &[Self::put(format!("chunk/{i:06}"), chunk.to_vec())])
                .await
                .map_err(storage)?;
        }
        // Written last: a component without `meta` is incomplete and never read.
        let meta = ComponentMeta {
            size: bytes.len(),
            chunks: chunks.len(),
        };
        self.store
            .apply(
                &ns,
                &[Self::put(
                    "meta".into(),
                    serde_json::to_vec(&meta).map_err(storage)?,
                )],
            )
            .await
            .map_err(storage)?;
        Ok(())
    }

    async fn get_component(&self, hash: &str) -> Result<Vec<u8>, RegistryError> {
        let ns = Self::component_namespace(hash);
        let meta: ComponentMeta = match self.store.get(&ns, "meta").await.map_err(storage)? {
            Some(m) => serde_json::from_slice(&m).map_err(storage)?,
            None => {
                return Err(RegistryError::Storage(format!(
                    "component {hash} is not in the shared registry (or only partly written)"
                )));
            }
        };
        let mut bytes = Vec::with_capacity(meta.size);
        for i in 0..meta.chunks {
            let chunk = self
                .store
                .get(&ns, &format!("chunk/{i:06}"))
                .await
                .map_err(storage)?
                .ok_or_else(|| {
                    RegistryError::Storage(format!("component {hash} is missing chunk {i}"))
                })?;
            bytes.extend_from_slice(&chunk);
        }
        if content_hash(&bytes) != hash {
            return Err(RegistryError::Storage(format!(
                "component {hash} read back with a different hash"
            )));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::record::VersionRecord;
    use spate_core::state::EmbeddedStateStore;

    #[tokio::test]
    async fn the_shared_store_round_trips_records_and_chunked_components() {
        let dir = tempfile::tempdir().unwrap();
        let state = EmbeddedStateStore::open(&dir.path().join("state")).unwrap();
        let store = SharedStore::new(state);
        assert!(store.load_all().await.unwrap().is_empty());

        let bytes: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| i as u8).collect();
        let hash = content_hash(&bytes);
        store.put_component(&hash, &bytes).await.unwrap();
        store.put_component(&hash, &bytes).await.unwrap();
        assert_eq!(store.get_component(&hash).await.unwrap(), bytes);
        assert!(store.get_component(&content_hash(b"other")).await.is_err());

        let record = PluginRecord {
            versions: vec![VersionRecord {
                version: "1.0.0".into(),
                hash,
                manifest: "name = \"a\"".into(),
                size: bytes.len(),
                uploaded_ms: 1,
            }],
            active: Some("1.0.0".into()),
            history: vec![],
            shadow: None,
            shadow_since_ms: None,
            promotions: vec![],
        };
        let empty = BTreeMap::new();
        store.save("a", Some(&record), &empty).await.unwrap();
        store.save("b", Some(&record), &empty).await.unwrap();
        assert_eq!(store.load("a").await.unwrap(), Some(record.clone()));
        assert_eq!(
            store.load_all().await.unwrap().keys().collect::<Vec<_>>(),
            ["a", "b"]
        );
        store.save("a", None, &empty).await.unwrap();
        assert_eq!(store.load("a").await.unwrap(), None);
        assert_eq!(
            store.load_all().await.unwrap().keys().collect::<Vec<_>>(),
            ["b"]
        );
    }
}
