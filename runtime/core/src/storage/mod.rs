//! The `redb` plumbing the embedded log ([`crate::events::EmbeddedLog`]) and state store
//! ([`crate::state::EmbeddedStateStore`]) share. Each owns one file in the data directory
//! and both go through the group-commit writer in `group_commit`: every write request is
//! queued to one writer thread that commits everything queued in a single transaction, so
//! a burst of writers pays for one fsync, and a call returns only once its write is
//! durable. Reads run on tokio's blocking pool against `redb`'s MVCC snapshots and never
//! wait for the writer.

mod db;
pub(crate) mod group_commit;

pub(crate) use db::SharedDb;
pub use db::StorageHealth;

use crate::error::{BackendError, BackendResult};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Maps a `redb` failure onto the backend error a caller can act on: damaged or
/// incompatible files are `Corrupt`, oversized values `Invalid`, the rest (I/O, locks, a
/// closed database) `Unavailable`.
pub(crate) fn redb_error(e: impl Into<redb::Error>) -> BackendError {
    match e.into() {
        redb::Error::Corrupted(message) => BackendError::Corrupt(message),
        redb::Error::ValueTooLarge(len) => {
            BackendError::Invalid(format!("a value of {len} bytes is too large to store"))
        }
        e @ (redb::Error::UpgradeRequired(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)) => BackendError::Corrupt(e.to_string()),
        e => BackendError::Unavailable(e.to_string()),
    }
}

/// Default size of each `redb` file's page cache (redb's own default is 1 GiB).
pub(crate) const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

/// Opens (or creates) the `redb` file at `path`, creating its directory, with a page
/// cache of at most `cache_bytes`.
pub(crate) fn open_database(path: &Path, cache_bytes: usize) -> BackendResult<redb::Database> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            BackendError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
    }
    redb::Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => BackendError::Unavailable(format!(
                "{} is already open (another spate process, or an instance not yet dropped)",
                path.display()
            )),
            e => match redb_error(e) {
                BackendError::Unavailable(m) => {
                    BackendError::Unavailable(format!("cannot open {}: {m}", path.display()))
                }
                other => other,
            },
        })
}

/// Runs blocking `redb` work on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> BackendResult<T> + Send + 'static,
) -> BackendResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BackendError::Unavailable(format!("storage task failed: {e}")))?
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
