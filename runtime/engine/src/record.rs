//! What the registry keeps and how it fails: a plugin's record of versions (what a
//! [`RegistryStore`](crate::store::RegistryStore) persists), the content hash that names a
//! component, and the registry's errors. Shared by the registry and its stores.

use crate::sandbox::LoadError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use spate_core::manifest::ManifestError;

/// Why a registry operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The component is unusable.
    #[error(transparent)]
    Component(#[from] LoadError),
    /// The component exceeds the upload size limit.
    #[error("component of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size received.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// The version exists with different content, or a namespace is taken.
    #[error("conflict: {0}")]
    Conflict(String),
    /// No such plugin or version.
    #[error("not found: {0}")]
    NotFound(String),
    /// Storage failure.
    #[error("registry storage error: {0}")]
    Storage(String),
}

/// One stored version of a plugin.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VersionRecord {
    /// Semantic version.
    pub version: String,
    /// Hex sha256 of the component.
    pub hash: String,
    /// The manifest as uploaded.
    pub manifest: String,
    /// Component size in bytes.
    pub size: usize,
    /// Upload time, milliseconds since the Unix epoch.
    pub uploaded_ms: i64,
}

/// A plugin's versions and which one serves.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PluginRecord {
    /// Versions in upload order.
    pub versions: Vec<VersionRecord>,
    /// The serving version.
    pub active: Option<String>,
    /// Versions that served before, most recent last (what rollback returns to).
    pub history: Vec<String>,
    /// A candidate version running beside the active one in capture mode (`spate plugin
    /// deploy --shadow`), compared with it event by event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
    /// When the shadow candidate was set (Unix ms): the runtimes' reports on it are kept
    /// under it, so a candidate stopped and run again starts a new report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_since_ms: Option<u64>,
    /// Shadow candidates promoted to active at an offset cut, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promotions: Vec<Promotion>,
}

/// A shadow candidate made active at an offset cut (the cuts themselves are kept in the
/// state store, written by the pipelines that took them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// Its id (the Unix ms it was made at, made unique per plugin).
    pub id: u64,
    /// The version active before.
    pub from: String,
    /// The version promoted.
    pub to: String,
}

/// Hex sha256 of `bytes`.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
