//! The embedded state store: namespaced key-value state with expiry in one `redb` file
//! (`<dir>/state.redb`).
//!
//! It owns storage, expiry and the atomicity of a batch; namespaces arrive already chosen
//! by the host layer. Entries are keyed by the tuple `(namespace, key)`, so namespaces never
//! overlap (a scan of `a` cannot reach `ab`). Each value carries its expiry time; expired
//! values are invisible at once and are deleted later, a bounded number at a time, by the
//! writer when it next commits.
//!
//! Durability: `apply` goes through a group-commit writer. Concurrent applies share one
//! write transaction committed with `Durability::Immediate` (one fsync per group), and each
//! call returns only after its group is durable. Conditions are checked inside that
//! transaction, after the earlier applies of the same group, so compare-and-swap stays
//! exact under concurrency.

use crate::storage::group_commit::{Batcher, GroupWriter};
use crate::storage::{DEFAULT_CACHE_BYTES, now_ms, redb_error};
use crate::storage::{SharedDb, StorageHealth};
use crate::{
    ApplyOutcome, BackendError, BackendResult, Entry, Expiry, SourcePosition, StateStore,
    StateWrite,
};
use async_trait::async_trait;
use redb::ReadTransaction;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// (namespace, key) -> expires-at millis (u64 LE, 0 = never) followed by the value.
const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");
/// (expires-at millis, namespace, key) -> (): which entries to purge, oldest first.
const EXPIRIES: TableDefinition<(u64, &str, &str), ()> = TableDefinition::new("expiries");
/// (group, topic, partition) -> next offset (u64 LE) followed by the offsets above it that
/// are done (u64 LE each): the source positions a checkpoint's state covers.
const POSITIONS: TableDefinition<(&str, &str, u32), &[u8]> = TableDefinition::new("positions");

/// home namespace -> what its pending (prepared, unresolved) checkpoint overwrote: see
/// [`Undo`].
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");

/// Bytes of the expiry prefix of a stored value.
const EXPIRY_LEN: usize = 8;

/// Settings of the embedded state store.
#[derive(Clone, Debug)]
pub struct StateConfig {
    /// Least time between two purges of expired entries. Default 1 s.
    pub purge_interval: Duration,
    /// Most expired entries deleted per purge. Default 1024.
    pub purge_batch: usize,
    /// Most `apply` calls committed in one transaction. Default 1024.
    pub max_group_commit: usize,
    /// Most memory `redb` uses to cache the file's pages. Default 256 MiB.
    pub cache_bytes: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            purge_interval: Duration::from_secs(1),
            purge_batch: 1024,
            max_group_commit: 1024,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

/// The durable embedded state store; see the [module docs](self).
pub struct EmbeddedStateStore {
    db: Arc<SharedDb>,
    writer: GroupWriter<StateWriter>,
}

impl EmbeddedStateStore {
    /// Opens the store in `dir` (creating `dir/state.redb` if needed) with default
    /// settings. Blocks while the file is opened and already-expired entries are purged.
    pub fn open(dir: &Path) -> BackendResult<Arc<Self>> {
        Self::open_with(dir, StateConfig::default())
    }

    /// Opens the store in `dir` with `config`.
    pub fn open_with(dir: &Path, config: StateConfig) -> BackendResult<Arc<Self>> {
        if config.purge_batch == 0 || config.max_group_commit == 0 {
            return Err(BackendError::Invalid(
                "purge_batch and max_group_commit must be at least 1".into(),
            ));
        }
        let db = SharedDb::open("state", &dir.join("state.redb"), config.cache_bytes)?;
        // Create the tables, and clear what expired while the store was closed.
        let handle = db.get()?;
        loop {
            let txn = handle.begin_write().map_err(redb_error)?;
            txn.open_table(ENTRIES).map_err(redb_error)?;
            let purged = purge(&txn, now_ms(), config.purge_batch).map_err(redb_error)?;
            txn.commit().map_err(redb_error)?;
            if purged < config.purge_batch {
                break;
            }
        }
        drop(handle);
        let batcher = StateWriter {
            last_purge: Instant::now(),
            config: config.clone(),
        };
        let writer = GroupWriter::spawn(
            "spate-state-writer",
            db.clone(),
            batcher,
            config.max_group_commit,
        )?;
        Ok(Arc::new(Self { db, writer }))
    }

    /// Whether the file takes writes, and its size on disk.
    pub fn health(&self) -> Arc<StorageHealth> {
        self.db.health().clone()
    }

    #[cfg(test)]
    fn commits(&self) -> u64 {
        self.writer.commits()
    }
}

/// Expiry time of a write made at `now`; 0 means never. A zero TTL expires at once.
fn expires_at(now: u64, ttl: Option<Duration>) -> u64 {
    match ttl {
        None => 0,
        Some(ttl) => {
            let ms = u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
            now.saturating_add(ms).max(1)
        }
    }
}

fn encode(expires_at: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(EXPIRY_LEN + value.len());
    out.extend_from_slice(&expires_at.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn split(stored: &[u8]) -> BackendResult<(u64, &[u8])> {
    if stored.len() < EXPIRY_LEN {
        return Err(BackendError::Corrupt("truncated state entry".into()));
    }
    let (head, value) = stored.split_at(EXPIRY_LEN);
    let mut exp = [0; EXPIRY_LEN];
    exp.copy_from_slice(head);
    Ok((u64::from_le_bytes(exp), value))
}

/// The value of a stored entry if it has not expired by `now`.
fn live(stored: &[u8], now: u64) -> BackendResult<Option<&[u8]>> {
    let (exp, value) = split(stored)?;
    Ok((exp == 0 || exp > now).then_some(value))
}

/// Deletes up to `limit` entries that expired by `now`; returns how many index rows it
/// cleared.
fn purge(txn: &WriteTransaction, now: u64, limit: usize) -> Result<usize, redb::Error> {
    let mut expiries = txn.open_table(EXPIRIES)?;
    let due = expiries
        .range(..(now.saturating_add(1), "", ""))?
        .take(limit)
        .map(|row| {
            row.map(|(k, _)| {
                let (exp, ns, key) = k.value();
                (exp, ns.to_owned(), key.to_owned())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut entries = txn.open_table(ENTRIES)?;
    for (exp, ns, key) in &due {
        expiries.remove((*exp, ns.as_str(), key.as_str()))?;
        let current = entries
            .get((ns.as_str(), key.as_str()))?
            .and_then(|g| split(g.value()).ok().map(|(e, _)| e));
        // Only if the entry was not rewritten with another expiry since.
        if current == Some(*exp) {
            entries.remove((ns.as_str(), key.as_str()))?;
        }
    }
    Ok(due.len())
}

/// What a prepared checkpoint overwrote, to put back if the transaction that commits its
/// positions elsewhere fails, and the positions it recorded, to tell whether it did.
#[derive(Debug, Default, PartialEq)]
struct Undo {
    /// (namespace, key, the stored bytes before, `None` if absent).
    entries: Vec<(String, String, Option<Vec<u8>>)>,
    /// (group, topic, partition, the encoded position before, `None` if absent).
    positions: Vec<(String, String, u32, Option<Vec<u8>>)>,
    /// The positions the checkpoint recorded.
    prepared: Vec<SourcePosition>,
}

impl Undo {
    fn encode(&self) -> Vec<u8> {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        fn opt(out: &mut Vec<u8>, b: Option<&[u8]>) {
            out.push(u8::from(b.is_some()));
            if let Some(b) = b {
                bytes(out, b);
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (ns, key, before) in &self.entries {
            bytes(&mut out, ns.as_bytes());
            bytes(&mut out, key.as_bytes());
            opt(&mut out, before.as_deref());
        }
        out.extend_from_slice(&(self.positions.len() as u32).to_le_bytes());
        for (group, topic, partition, before) in &self.positions {
            bytes(&mut out, group.as_bytes());
            bytes(&mut out, topic.as_bytes());
            out.extend_from_slice(&partition.to_le_bytes());
            opt(&mut out, before.as_deref());
        }
        out.extend_from_slice(&(self.prepared.len() as u32).to_le_bytes());
        for p in &self.prepared {
            bytes(&mut out, p.group.as_bytes());
            bytes(&mut out, p.topic.as_bytes());
            out.extend_from_slice(&p.partition.to_le_bytes());
            bytes(&mut out, &p.encode());
        }
        out
    }

    fn decode(mut b: &[u8]) -> BackendResult<Self> {
        fn corrupt() -> BackendError {
            BackendError::Corrupt("malformed pending checkpoint".into())
        }
        fn u32_(b: &mut &[u8]) -> BackendResult<u32> {
            let (head, rest) = b.split_first_chunk::<4>().ok_or_else(corrupt)?;
            *b = rest;
            Ok(u32::from_le_bytes(*head))
        }
        fn bytes(b: &mut &[u8]) -> BackendResult<Vec<u8>> {
            let n = u32_(b)? as usize;
            if b.len() < n {
                return Err(corrupt());
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Ok(head.to_vec())
        }
        fn string(b: &mut &[u8]) -> BackendResult<String> {
            String::from_utf8(bytes(b)?).map_err(|_| corrupt())
        }
        fn opt(b: &mut &[u8]) -> BackendResult<Option<Vec<u8>>> {
            let (tag, rest) = b.split_first().ok_or_else(corrupt)?;
            *b = rest;
            match tag {
                0 => Ok(None),
                1 => bytes(b).map(Some),
                _ => Err(corrupt()),
            }
        }
        let mut undo = Self::default();
        for _ in 0..u32_(&mut b)? {
            undo.entries
                .push((string(&mut b)?, string(&mut b)?, opt(&mut b)?));
        }
        for _ in 0..u32_(&mut b)? {
            undo.positions.push((
                string(&mut b)?,
                string(&mut b)?,
                u32_(&mut b)?,
                opt(&mut b)?,
            ));
        }
        for _ in 0..u32_(&mut b)? {
            let (group, topic, partition) = (string(&mut b)?, string(&mut b)?, u32_(&mut b)?);
            let encoded = bytes(&mut b)?;
            undo.prepared
                .push(SourcePosition::decode(&group, &topic, partition, &encoded)?);
        }
        if !b.is_empty() {
            return Err(corrupt());
        }
        Ok(undo)
    }

    /// What `writes` and `positions` are about to overwrite in `txn`.
    fn before(
        txn: &WriteTransaction,
        writes: &[(String, Vec<StateWrite>)],
        positions: &[SourcePosition],
    ) -> Result<Self, redb::Error> {
        let entries = txn.open_table(ENTRIES)?;
        let table = txn.open_table(POSITIONS)?;
        let mut undo = Self {
            prepared: positions.to_vec(),
            ..Self::default()
        };
        for (ns, writes) in writes {
            for w in writes {
                let before = entries
                    .get((ns.as_str(), w.key.as_str()))?
                    .map(|g| g.value().to_vec());
                undo.entries.push((ns.clone(), w.key.clone(), before));
            }
        }
        for p in positions {
            let before = table
                .get((p.group.as_str(), p.topic.as_str(), p.partition))?
                .map(|g| g.value().to_vec());
            undo.positions
                .push((p.group.clone(), p.topic.clone(), p.partition, before));
        }
        Ok(undo)
    }

    /// Put back in `txn` every value and position it holds.
    fn restore(&self, txn: &WriteTransaction) -> Result<(), redb::Error> {
        let mut entries = txn.open_table(ENTRIES)?;
        let mut expiries = txn.open_table(EXPIRIES)?;
        let expiry = |raw: &[u8]| split(raw).map(|(e, _)| e).unwrap_or(0);
        for (ns, key, before) in &self.entries {
            let (ns, key) = (ns.as_str(), key.as_str());
            let now = match before {
                Some(raw) => entries.insert((ns, key), raw.as_slice())?,
                None => entries.remove((ns, key))?,
            }
            .map(|g| expiry(g.value()))
            .unwrap_or(0);
            let was = before.as_deref().map(expiry).unwrap_or(0);
            if now != 0 && now != was {
                expiries.remove((now, ns, key))?;
            }
            if was != 0 {
                expiries.insert((was, ns, key), ())?;
            }
        }
        let mut table = txn.open_table(POSITIONS)?;
        for (group, topic, partition, before) in &self.positions {
            let at = (group.as_str(), topic.as_str(), *partition);
            match before {
                Some(b) => {
                    table.insert(at, b.as_slice())?;
                }
                None => {
                    table.remove(at)?;
                }
            }
        }
        Ok(())
    }
}

enum StateOp {
    /// One batch of one namespace, conditions checked first.
    Apply {
        namespace: String,
        writes: Vec<StateWrite>,
    },
    /// A checkpoint: unconditional writes and the positions they cover; with `prepare`
    /// (the home namespace), what they overwrite is kept as its pending checkpoint.
    Checkpoint {
        writes: Vec<(String, Vec<StateWrite>)>,
        positions: Vec<SourcePosition>,
        prepare: Option<String>,
    },
    /// Keep or undo `home`'s pending checkpoint.
    Resolve { home: String, keep: bool },
}

/// Writes `writes` to `ns` in `txn` without checking conditions.
fn write_entries(
    txn: &WriteTransaction,
    ns: &str,
    writes: &[StateWrite],
    now: u64,
) -> Result<(), redb::Error> {
    let mut entries = txn.open_table(ENTRIES)?;
    let mut expiries = txn.open_table(EXPIRIES)?;
    for write in writes {
        let key = write.key.as_str();
        let (new_exp, old) = match &write.value {
            Some(value) => {
                let exp = expires_at(now, write.ttl);
                let old = entries.insert((ns, key), encode(exp, value).as_slice())?;
                (exp, old.and_then(|g| split(g.value()).ok().map(|(e, _)| e)))
            }
            None => {
                let old = entries.remove((ns, key))?;
                (0, old.and_then(|g| split(g.value()).ok().map(|(e, _)| e)))
            }
        };
        if let Some(old_exp) = old
            && old_exp != 0
            && old_exp != new_exp
        {
            expiries.remove((old_exp, ns, key))?;
        }
        if new_exp != 0 {
            expiries.insert((new_exp, ns, key), ())?;
        }
    }
    Ok(())
}

struct StateWriter {
    last_purge: Instant,
    config: StateConfig,
}

impl Batcher for StateWriter {
    type Op = StateOp;
    type Out = ApplyOutcome;
    type Staged = ();

    fn apply(
        &mut self,
        txn: &WriteTransaction,
        op: &StateOp,
        _staged: &mut (),
    ) -> Result<BackendResult<ApplyOutcome>, redb::Error> {
        let now = now_ms();
        match op {
            StateOp::Apply { namespace, writes } => {
                let ns = namespace.as_str();
                let entries = txn.open_table(ENTRIES)?;
                for write in writes {
                    let Some(expected) = &write.condition else {
                        continue;
                    };
                    let stored = entries.get((ns, write.key.as_str()))?;
                    let current = match stored.as_ref().map(|g| live(g.value(), now)).transpose() {
                        Ok(current) => current.flatten(),
                        Err(e) => return Ok(Err(e)),
                    };
                    if current != expected.as_deref() {
                        return Ok(Ok(ApplyOutcome::Conflict {
                            key: write.key.clone(),
                        }));
                    }
                }
                drop(entries);
                write_entries(txn, ns, writes, now)?;
            }
            StateOp::Checkpoint {
                writes,
                positions,
                prepare,
            } => {
                if let Some(home) = prepare {
                    let undo = Undo::before(txn, writes, positions)?;
                    txn.open_table(PENDING)?
                        .insert(home.as_str(), undo.encode().as_slice())?;
                }
                for (ns, writes) in writes {
                    write_entries(txn, ns, writes, now)?;
                }
                let mut table = txn.open_table(POSITIONS)?;
                for p in positions {
                    table.insert(
                        (p.group.as_str(), p.topic.as_str(), p.partition),
                        p.encode().as_slice(),
                    )?;
                }
            }
            StateOp::Resolve { home, keep } => {
                let mut pending = txn.open_table(PENDING)?;
                let Some(raw) = pending.remove(home.as_str())? else {
                    return Ok(Ok(ApplyOutcome::Applied));
                };
                if !keep {
                    let undo = match Undo::decode(raw.value()) {
                        Ok(u) => u,
                        Err(e) => return Ok(Err(e)),
                    };
                    drop(raw);
                    drop(pending);
                    undo.restore(txn)?;
                }
            }
        }
        Ok(Ok(ApplyOutcome::Applied))
    }

    fn before_commit(&mut self, txn: &WriteTransaction, _: &mut ()) -> Result<(), redb::Error> {
        if self.last_purge.elapsed() >= self.config.purge_interval {
            self.last_purge = Instant::now();
            purge(txn, now_ms(), self.config.purge_batch)?;
        }
        Ok(())
    }

    fn committed(&mut self, _staged: ()) {}
}

#[async_trait]
impl StateStore for EmbeddedStateStore {
    async fn get(&self, namespace: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        Ok(self.get_entry(namespace, key).await?.map(|e| e.value))
    }

    async fn get_entry(&self, namespace: &str, key: &str) -> BackendResult<Option<Entry>> {
        // Answered inline: a read of pages redb already caches takes microseconds, less
        // than handing it to another thread and back.
        self.read(|txn| {
            let table = txn.open_table(ENTRIES).map_err(redb_error)?;
            let stored = table.get((namespace, key)).map_err(redb_error)?;
            let Some(g) = stored else { return Ok(None) };
            let now = now_ms();
            let (exp, value) = split(g.value())?;
            Ok(match exp {
                0 => Some(Entry {
                    value: value.to_vec(),
                    expiry: Expiry::Never,
                }),
                exp if exp > now => Some(Entry {
                    value: value.to_vec(),
                    expiry: Expiry::In(Duration::from_millis(exp - now)),
                }),
                _ => None,
            })
        })
    }

    async fn scan_bounded(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
        max_bytes: usize,
    ) -> BackendResult<Vec<(String, Vec<u8>)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (ns, prefix) = (namespace, prefix);
        self.read(|txn| {
            let table = txn.open_table(ENTRIES).map_err(redb_error)?;
            let now = now_ms();
            let limit = limit as usize;
            let mut out = Vec::new();
            let mut bytes = 0usize;
            for row in table.range((ns, prefix)..).map_err(redb_error)? {
                let (k, v) = row.map_err(redb_error)?;
                let (row_ns, row_key) = k.value();
                // Keys with the prefix are contiguous in key order: stop at the first miss.
                if row_ns != ns || !row_key.starts_with(prefix) {
                    break;
                }
                if let Some(value) = live(v.value(), now)? {
                    bytes = bytes.saturating_add(row_key.len() + value.len());
                    out.push((row_key.to_owned(), value.to_vec()));
                    if out.len() >= limit || bytes > max_bytes {
                        break;
                    }
                }
            }
            Ok(out)
        })
    }

    async fn apply(&self, namespace: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome> {
        if writes.is_empty() {
            return Ok(ApplyOutcome::Applied);
        }
        self.writer
            .call(StateOp::Apply {
                namespace: namespace.to_owned(),
                writes: writes.to_vec(),
            })
            .await
    }

    fn checkpoints(&self) -> bool {
        true
    }

    async fn commit_checkpoint(
        &self,
        writes: &[(String, Vec<StateWrite>)],
        _home: &str,
        positions: &[SourcePosition],
    ) -> BackendResult<()> {
        if writes.iter().all(|(_, w)| w.is_empty()) && positions.is_empty() {
            return Ok(());
        }
        self.writer
            .call(StateOp::Checkpoint {
                writes: writes.to_vec(),
                positions: positions.to_vec(),
                prepare: None,
            })
            .await
            .map(|_| ())
    }

    fn prepares(&self) -> bool {
        true
    }

    async fn prepare_checkpoint(
        &self,
        writes: &[(String, Vec<StateWrite>)],
        home: &str,
        positions: &[SourcePosition],
    ) -> BackendResult<()> {
        self.writer
            .call(StateOp::Checkpoint {
                writes: writes.to_vec(),
                positions: positions.to_vec(),
                prepare: Some(home.to_owned()),
            })
            .await
            .map(|_| ())
    }

    async fn pending_checkpoint(&self, home: &str) -> BackendResult<Option<Vec<SourcePosition>>> {
        self.read(|txn| {
            let table = match txn.open_table(PENDING) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(redb_error(e)),
            };
            table
                .get(home)
                .map_err(redb_error)?
                .map(|g| Undo::decode(g.value()).map(|u| u.prepared))
                .transpose()
        })
    }

    async fn resolve_checkpoint(&self, home: &str, keep: bool) -> BackendResult<()> {
        self.writer
            .call(StateOp::Resolve {
                home: home.to_owned(),
                keep,
            })
            .await
            .map(|_| ())
    }

    async fn source_position(
        &self,
        _home: &str,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> BackendResult<Option<SourcePosition>> {
        self.read(|txn| {
            let table = match txn.open_table(POSITIONS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(redb_error(e)),
            };
            table
                .get((group, topic, partition))
                .map_err(redb_error)?
                .map(|g| SourcePosition::decode(group, topic, partition, g.value()))
                .transpose()
        })
    }
}

impl EmbeddedStateStore {
    /// Runs `f` on a read transaction, on the calling thread.
    fn read<T>(&self, f: impl FnOnce(&ReadTransaction) -> BackendResult<T>) -> BackendResult<T> {
        // The handle outlives the snapshot: a reopen or compaction waits for both.
        let handle = self.db.get()?;
        let txn = handle.begin_read().map_err(redb_error)?;
        f(&txn)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn put(key: &str, value: &str) -> StateWrite {
        StateWrite {
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
            ttl: None,
            condition: None,
        }
    }

    fn put_ttl(key: &str, value: &str, ttl: Duration) -> StateWrite {
        StateWrite {
            ttl: Some(ttl),
            ..put(key, value)
        }
    }

    fn delete(key: &str) -> StateWrite {
        StateWrite {
            key: key.into(),
            value: None,
            ttl: None,
            condition: None,
        }
    }

    fn when(mut write: StateWrite, expected: Option<&str>) -> StateWrite {
        write.condition = Some(expected.map(|v| v.as_bytes().to_vec()));
        write
    }

    fn val(v: &str) -> Option<Vec<u8>> {
        Some(v.as_bytes().to_vec())
    }

    fn raw_entries(store: &EmbeddedStateStore) -> usize {
        let txn = store.db.get().unwrap().begin_read().unwrap();
        let entries = txn.open_table(ENTRIES).unwrap().iter().unwrap().count();
        let expiries = txn.open_table(EXPIRIES).unwrap().iter().unwrap().count();
        entries + expiries
    }

    #[tokio::test]
    async fn get_put_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStateStore::open(dir.path()).unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), None);
        assert_eq!(
            s.apply("ns", &[put("k", "v1")]).await.unwrap(),
            ApplyOutcome::Applied
        );
        assert_eq!(s.get("ns", "k").await.unwrap(), val("v1"));
        s.apply("ns", &[put("k", "v2")]).await.unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), val("v2"));
        assert_eq!(s.get("other", "k").await.unwrap(), None);
        s.apply("ns", &[delete("k")]).await.unwrap();
        assert_eq!(s.get("ns", "k").await.unwrap(), None);
        // Deleting what is not there is fine.
        s.apply("ns", &[delete("k")]).await.unwrap();
    }

    #[tokio::test]
    async fn ttl_hides_then_purges_expired_values() {
        let dir = tempfile::tempdir().unwrap();
        let config = StateConfig {
            purge_interval: Duration::ZERO,
            ..StateConfig::default()
        };
        let s = EmbeddedStateStore::open_with(dir.path(), config).unwrap();
        s.apply(
            "ns",
            &[
                // 1 s, not 50 ms: the commit's fsync and the read must fit in it under load.
                put_ttl("short", "x", Duration::from_millis(1_000)),
                put_ttl("long", "y", Duration::from_secs(3600)),
                put("forever", "z"),
            ],
        )
        .await
        .unwrap();
        assert_eq!(s.get("ns", "short").await.unwrap(), val("x"));
        tokio::time::sleep(Duration::from_millis(1_300)).await;
        assert_eq!(s.get("ns", "short").await.unwrap(), None);
        assert_eq!(s.get("ns", "long").await.unwrap(), val("y"));
        let keys: Vec<_> = s
            .scan("ns", "", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec!["forever", "long"]);
        // An expired value counts as absent for conditions.
        assert_eq!(
            s.apply("ns", &[when(put("short", "again"), None)])
                .await
                .unwrap(),
            ApplyOutcome::Applied
        );
        assert_eq!(s.get("ns", "short").await.unwrap(), val("again"));

        // Rewriting without a TTL makes a value permanent.
        s.apply("ns", &[put_ttl("k", "1", Duration::from_millis(50))])
            .await
            .unwrap();
        s.apply("ns", &[put("k", "2")]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(s.get("ns", "k").await.unwrap(), val("2"));

        // The next commit purges what expired: only live rows remain on disk
        // ("long" has an entry and an expiry row; "forever", "short", "k", "touch" one each).
        s.apply("ns", &[put_ttl("gone", "g", Duration::ZERO)])
            .await
            .unwrap();
        assert_eq!(s.get("ns", "gone").await.unwrap(), None);
        s.apply("ns", &[put("touch", "t")]).await.unwrap();
        assert_eq!(raw_entries(&s), 2 + 1 + 1 + 1 + 1);
    }

    #[tokio::test]
    async fn failed_condition_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStateStore::open(dir.path()).unwrap();
        s.apply("ns", &[put("balance", "10")]).await.unwrap();
        let outcome = s
            .apply(
                "ns",
                &[
                    put("log", "debited"),
                    when(put("balance", "5"), Some("11")),
                    delete("other"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(
            outcome,
            ApplyOutcome::Conflict {
                key: "balance".into()
            }
        );
        assert_eq!(s.get("ns", "log").await.unwrap(), None);
        assert_eq!(s.get("ns", "balance").await.unwrap(), val("10"));

        // Matching conditions apply, including "must be absent".
        let outcome = s
            .apply(
                "ns",
                &[
                    when(put("balance", "5"), Some("10")),
                    when(put("created", "yes"), None),
                ],
            )
            .await
            .unwrap();
        assert_eq!(outcome, ApplyOutcome::Applied);
        assert_eq!(s.get("ns", "balance").await.unwrap(), val("5"));
        assert_eq!(
            s.apply("ns", &[when(put("created", "again"), None)])
                .await
                .unwrap(),
            ApplyOutcome::Conflict {
                key: "created".into()
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_compare_and_swap_loses_no_update() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStateStore::open(dir.path()).unwrap();
        s.apply("ns", &[put("n", "0")]).await.unwrap();
        let before = s.commits();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        loop {
                            let cur = s.get("ns", "n").await.unwrap().unwrap();
                            let n: u64 = std::str::from_utf8(&cur).unwrap().parse().unwrap();
                            let write = StateWrite {
                                condition: Some(Some(cur)),
                                ..put("n", &(n + 1).to_string())
                            };
                            if s.apply("ns", &[write]).await.unwrap() == ApplyOutcome::Applied {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.get("ns", "n").await.unwrap(), val("160"));
        assert!(s.commits() > before);
    }

    #[tokio::test]
    async fn scan_respects_prefix_limit_order_and_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let s = EmbeddedStateStore::open(dir.path()).unwrap();
        s.apply(
            "a",
            &[
                put("user:3", "c"),
                put("user:1", "a"),
                put("user:2", "b"),
                put("order:1", "o"),
                put("", "empty key"),
            ],
        )
        .await
        .unwrap();
        s.apply("ab", &[put("user:0", "other ns"), put("", "x")])
            .await
            .unwrap();
        s.apply("", &[put("a", "empty ns")]).await.unwrap();

        let users = s.scan("a", "user:", 10).await.unwrap();
        assert_eq!(
            users,
            vec![
                ("user:1".to_owned(), b"a".to_vec()),
                ("user:2".to_owned(), b"b".to_vec()),
                ("user:3".to_owned(), b"c".to_vec()),
            ]
        );
        let limited: Vec<_> = s
            .scan("a", "user:", 2)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(limited, vec!["user:1", "user:2"]);
        let all: Vec<_> = s
            .scan("a", "", 100)
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(all, vec!["", "order:1", "user:1", "user:2", "user:3"]);
        assert_eq!(s.scan("", "", 100).await.unwrap().len(), 1);
        assert_eq!(s.scan("ab", "", 100).await.unwrap().len(), 2);
        assert!(s.scan("a", "zzz", 10).await.unwrap().is_empty());
        assert!(s.scan("a", "", 0).await.unwrap().is_empty());
    }

    fn position(partition: u32, next: u64, done: Vec<u64>) -> SourcePosition {
        SourcePosition {
            group: "g".into(),
            topic: "in".into(),
            partition,
            next,
            done,
        }
    }

    /// A prepared checkpoint is written like any other; undone, every value (present,
    /// absent, with a TTL) and position it overwrote is back, across a reopen; kept, it
    /// stays.
    #[tokio::test]
    async fn a_prepared_checkpoint_is_undone_or_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = [position(0, 10, vec![]), position(1, 5, vec![7])];
        {
            let s = EmbeddedStateStore::open(dir.path()).unwrap();
            s.commit_checkpoint(
                &[(
                    "ns".into(),
                    vec![put("a", "1"), put_ttl("t", "x", Duration::from_secs(3600))],
                )],
                "home",
                &first[..1],
            )
            .await
            .unwrap();
            assert_eq!(s.pending_checkpoint("home").await.unwrap(), None);
            let second = [position(0, 20, vec![22]), position(1, 9, vec![])];
            s.prepare_checkpoint(
                &[
                    (
                        "ns".into(),
                        vec![put("a", "2"), put("b", "new"), delete("t")],
                    ),
                    (
                        "other".into(),
                        vec![put_ttl("c", "y", Duration::from_secs(60))],
                    ),
                ],
                "home",
                &second,
            )
            .await
            .unwrap();
            assert_eq!(s.get("ns", "a").await.unwrap(), val("2"));
            assert_eq!(
                s.pending_checkpoint("home").await.unwrap(),
                Some(second.to_vec())
            );
            assert_eq!(
                s.source_position("home", "g", "in", 0).await.unwrap(),
                Some(second[0].clone())
            );
        }
        let s = EmbeddedStateStore::open(dir.path()).unwrap();
        s.resolve_checkpoint("home", false).await.unwrap();
        assert_eq!(s.get("ns", "a").await.unwrap(), val("1"));
        assert_eq!(s.get("ns", "b").await.unwrap(), None);
        assert_eq!(s.get("ns", "t").await.unwrap(), val("x"));
        assert!(matches!(
            s.get_entry("ns", "t").await.unwrap().unwrap().expiry,
            Expiry::In(d) if d > Duration::from_secs(3500)
        ));
        assert_eq!(s.get("other", "c").await.unwrap(), None);
        assert_eq!(
            s.source_position("home", "g", "in", 0).await.unwrap(),
            Some(first[0].clone())
        );
        assert_eq!(s.source_position("home", "g", "in", 1).await.unwrap(), None);
        assert_eq!(s.pending_checkpoint("home").await.unwrap(), None);
        // `a`, `t` and `t`'s expiry: no expiry of `c` dangles.
        assert_eq!(raw_entries(&s), 3);

        s.prepare_checkpoint(&[("ns".into(), vec![put("a", "3")])], "home", &first)
            .await
            .unwrap();
        s.resolve_checkpoint("home", true).await.unwrap();
        s.resolve_checkpoint("home", false).await.unwrap(); // nothing pending: no-op
        assert_eq!(s.get("ns", "a").await.unwrap(), val("3"));
        assert_eq!(
            s.source_position("home", "g", "in", 1).await.unwrap(),
            Some(first[1].clone())
        );
    }

    #[test]
    fn an_undo_record_round_trips() {
        let undo = Undo {
            entries: vec![
                ("ns".into(), "k".into(), Some(vec![0, 1, 2])),
                ("ns".into(), "".into(), None),
            ],
            positions: vec![("g".into(), "t".into(), 3, None)],
            prepared: vec![position(3, 4, vec![6, 9])],
        };
        assert_eq!(Undo::decode(&undo.encode()).unwrap(), undo);
        assert!(Undo::decode(&undo.encode()[..5]).is_err());
    }

    #[tokio::test]
    async fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmbeddedStateStore::open(dir.path()).unwrap();
            let tasks: Vec<_> = (0..50)
                .map(|i| {
                    let s = s.clone();
                    tokio::spawn(async move {
                        s.apply("ns", &[put(&format!("k{i:02}"), &i.to_string())])
                            .await
                    })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap().unwrap(), ApplyOutcome::Applied);
            }
            s.apply(
                "ns",
                &[
                    put_ttl("ttl-long", "y", Duration::from_secs(3600)),
                    put_ttl("ttl-short", "n", Duration::from_millis(50)),
                ],
            )
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        let s = EmbeddedStateStore::open(dir.path()).unwrap();
        assert_eq!(s.get("ns", "k07").await.unwrap(), val("7"));
        assert_eq!(s.scan("ns", "k", 100).await.unwrap().len(), 50);
        assert_eq!(s.get("ns", "ttl-long").await.unwrap(), val("y"));
        assert_eq!(s.get("ns", "ttl-short").await.unwrap(), None);
        // Opening purged the expired entry: 50 + "ttl-long" and its expiry row.
        assert_eq!(raw_entries(&s), 50 + 2);
    }
}
