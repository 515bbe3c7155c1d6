//! One `redb` file behind a handle that can be closed and reopened while the process runs,
//! and the health that says whether it currently can be written.
//!
//! After an I/O error (a full disk, say) `redb` refuses every later operation with
//! `PreviousIo` until the `Database` is dropped and opened again. The group-commit writer
//! is the only one that notices and recovers ([`SharedDb::close_failed`] then
//! [`SharedDb::try_reopen`]); readers take the current handle with [`SharedDb::get`] and
//! get `Unavailable` while there is none. The same exclusive access serves compaction,
//! which `redb` only does with no transaction alive.

use super::{open_database, redb_error};
use crate::{BackendError, BackendResult};
use redb::{Database, Durability, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A value written and removed after a reopen, to check that the file takes writes again.
const PROBE: TableDefinition<u8, &[u8]> = TableDefinition::new("_spate_probe");
/// Bytes of that value.
const PROBE_BYTES: usize = 1 << 20;
/// Least free space on the file's filesystem before a failed file is reopened. The probe
/// alone is not enough: it may fit in pages the failed transaction already wrote, and the
/// file would flap between failed and healthy while the disk stays full.
const MIN_FREE_BYTES: u64 = 8 << 20;

/// Whether an embedded database file can be written, and why not; one per file.
#[derive(Debug)]
pub struct StorageHealth {
    name: &'static str,
    path: PathBuf,
    reason: Mutex<Option<String>>,
    failures: AtomicU64,
}

impl StorageHealth {
    fn new(name: &'static str, path: PathBuf) -> Self {
        Self {
            name,
            path,
            reason: Mutex::new(None),
            failures: AtomicU64::new(0),
        }
    }

    /// Short name of the file (`log`, `state`), the `file` label of its metrics.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why the file cannot be written right now; `None` while it is healthy.
    pub fn degraded(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Storage failures (each followed by a reopen) since the process started.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Bytes the file takes on disk now (0 if it cannot be read).
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    fn set(&self, reason: Option<String>) {
        let degraded = reason.is_some();
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        metrics::gauge!(crate::metric_names::STORAGE_DEGRADED, "file" => self.name)
            .set(if degraded { 1.0 } else { 0.0 });
    }
}

/// Whether a `redb` error means the file itself failed (I/O), so the handle is unusable.
pub(crate) fn is_io(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo)
}

/// A reopenable `redb` database; see the [module docs](self).
pub(crate) struct SharedDb {
    cache_bytes: usize,
    slot: RwLock<Option<Arc<Database>>>,
    health: Arc<StorageHealth>,
}

impl SharedDb {
    /// Opens (or creates) the file at `path`.
    pub(crate) fn open(
        name: &'static str,
        path: &Path,
        cache_bytes: usize,
    ) -> BackendResult<Arc<Self>> {
        let db = open_database(path, cache_bytes)?;
        let health = Arc::new(StorageHealth::new(name, path.to_path_buf()));
        health.set(None);
        Ok(Arc::new(Self {
            cache_bytes,
            slot: RwLock::new(Some(Arc::new(db))),
            health,
        }))
    }

    /// The health of this file.
    pub(crate) fn health(&self) -> &Arc<StorageHealth> {
        &self.health
    }

    /// The open database, or `Unavailable` with the reason while it is being reopened.
    /// Hold the handle only for one operation: a reopen or compaction waits for it.
    pub(crate) fn get(&self) -> BackendResult<Arc<Database>> {
        let slot = self.slot.read().unwrap_or_else(|e| e.into_inner());
        slot.clone().ok_or_else(|| {
            BackendError::Unavailable(
                self.health
                    .degraded()
                    .unwrap_or_else(|| format!("{} is closed", self.health.path.display())),
            )
        })
    }

    /// Runs `f` with the only handle to the database: new readers wait, and `f` starts
    /// once the readers holding a handle have let go (at most `wait`). Called on the
    /// writer thread, so no write transaction is alive either.
    pub(crate) fn exclusive<T>(
        &self,
        wait: Duration,
        f: impl FnOnce(&mut Database) -> T,
    ) -> BackendResult<T> {
        let mut slot = self.slot.write().unwrap_or_else(|e| e.into_inner());
        let Some(db) = slot.as_mut() else {
            return Err(self.get_error());
        };
        let started = Instant::now();
        loop {
            if let Some(db) = Arc::get_mut(db) {
                return Ok(f(db));
            }
            if started.elapsed() > wait {
                return Err(BackendError::Unavailable(
                    "readers did not finish in time for exclusive access".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn get_error(&self) -> BackendError {
        BackendError::Unavailable(
            self.health
                .degraded()
                .unwrap_or_else(|| "the database is closed".into()),
        )
    }

    /// Marks the file failed with `reason`: done before anyone hears of the failure, so
    /// a caller told to retry finds the probes already saying why.
    pub(crate) fn mark_failed(&self, reason: String) {
        self.health.failures.fetch_add(1, Ordering::Relaxed);
        self.health.set(Some(reason));
    }

    /// Drops the database once no reader holds it, so that it can be opened again.
    /// Called on the writer thread, after [`Self::mark_failed`].
    pub(crate) fn close_failed(&self) {
        let taken = self.slot.write().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut db) = taken {
            // Readers finish quickly (one snapshot read each): wait for them, so dropping
            // this handle really closes the file and releases its lock.
            let started = Instant::now();
            loop {
                match Arc::try_unwrap(db) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if started.elapsed() < Duration::from_secs(30) => {
                        db = shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => {
                        tracing::error!(file = %self.health.path.display(),
                            "a reader kept the failed database open for 30 s");
                        break;
                    }
                }
            }
        }
    }

    /// Opens the file again and checks that it takes a write; on success the file is
    /// healthy again and the new handle is returned.
    pub(crate) fn try_reopen(&self) -> BackendResult<Arc<Database>> {
        if let Some(free) = free_bytes(&self.health.path)
            && free < MIN_FREE_BYTES
        {
            return Err(BackendError::Unavailable(format!(
                "{} bytes free on the filesystem of {}; waiting for {MIN_FREE_BYTES}",
                free,
                self.health.path.display()
            )));
        }
        let db = open_database(&self.health.path, self.cache_bytes)?;
        probe(&db).map_err(redb_error)?;
        let db = Arc::new(db);
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(db.clone());
        self.health.set(None);
        Ok(db)
    }
}

/// Bytes available to this process on the filesystem holding `path`, if known.
fn free_bytes(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let stats = rustix::fs::statvfs(path.parent()?).ok()?;
        Some(stats.f_bavail.saturating_mul(stats.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Writes and removes a value of [`PROBE_BYTES`], each durably.
fn probe(db: &Database) -> Result<(), redb::Error> {
    let value = vec![0u8; PROBE_BYTES];
    for insert in [true, false] {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(PROBE)?;
            if insert {
                table.insert(0, value.as_slice())?;
            } else {
                table.remove(0)?;
            }
        }
        txn.commit()?;
    }
    Ok(())
}
