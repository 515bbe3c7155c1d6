//! The state seam: durable key-value state by namespace ([`StateStore`]), the embedded
//! store on `redb` ([`EmbeddedStateStore`]), the read-through tier in front of any store
//! ([`tiered`]), and the reserved namespaces of parked keys ([`parked`]). The
//! ScyllaDB/Cassandra implementation is the `spate-state-cql` crate.

pub mod embedded;
pub mod parked;
pub mod tiered;

pub use embedded::{EmbeddedStateStore, StateConfig};

use crate::error::{BackendError, BackendResult};
use crate::events::SourcePosition;
use async_trait::async_trait;
use std::time::Duration;

/// One write of a state journal, applied atomically with the rest of its batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateWrite {
    /// Key within the namespace.
    pub key: String,
    /// New value; `None` deletes the key.
    pub value: Option<Vec<u8>>,
    /// Expiry of the new value.
    pub ttl: Option<Duration>,
    /// `Some(expected)`: apply only if the stored value (`None` = absent) still equals
    /// `expected`, otherwise the whole batch is refused with [`ApplyOutcome::Conflict`].
    pub condition: Option<Option<Vec<u8>>>,
}

/// The result of applying a batch of state writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Every write was applied.
    Applied,
    /// A condition did not hold; nothing was applied.
    Conflict {
        /// The key whose condition failed.
        key: String,
    },
}

/// How long a stored value has left to live, as far as its store can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Written without a TTL.
    Never,
    /// Expires after about this long.
    In(Duration),
    /// The store does not report expiry.
    Unknown,
}

/// A live value with its remaining lifetime; see [`StateStore::get_entry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// When it expires.
    pub expiry: Expiry,
}

/// Durable key-value state, partitioned by namespace.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// The live (unexpired) value of `key` in `namespace`.
    async fn get(&self, namespace: &str, key: &str) -> BackendResult<Option<Vec<u8>>>;

    /// [`StateStore::get`] with the value's remaining lifetime, for layers that copy values
    /// (the read-through tier must not serve a copy past the value's expiry). Stores that
    /// cannot tell report [`Expiry::Unknown`], which this default does.
    async fn get_entry(&self, namespace: &str, key: &str) -> BackendResult<Option<Entry>> {
        Ok(self.get(namespace, key).await?.map(|value| Entry {
            value,
            expiry: Expiry::Unknown,
        }))
    }

    /// Up to `limit` live entries of `namespace` whose keys start with `prefix`, in key order.
    async fn scan(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
    ) -> BackendResult<Vec<(String, Vec<u8>)>> {
        self.scan_bounded(namespace, prefix, limit, usize::MAX)
            .await
    }

    /// [`StateStore::scan`] that stops reading once the entries' keys and values add up
    /// to more than `max_bytes` (the entry crossing it is the last one returned), so a
    /// caller can bound what one scan makes it hold.
    async fn scan_bounded(
        &self,
        namespace: &str,
        prefix: &str,
        limit: u32,
        max_bytes: usize,
    ) -> BackendResult<Vec<(String, Vec<u8>)>>;

    /// Apply `writes` to `namespace` as one unit, checking their conditions first.
    async fn apply(&self, namespace: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome>;

    /// Whether the store can make a checkpoint durable in one unit with
    /// [`StateStore::commit_checkpoint`], so writes may wait in a view in front of it until
    /// the checkpoint. Stores that cannot (the default) get every event's writes at once.
    fn checkpoints(&self) -> bool {
        false
    }

    /// Whether other runtimes write this store too (a cluster's CQL store): a
    /// compare-and-swap must then be decided by the store, not by a view in front of it.
    fn shared(&self) -> bool {
        false
    }

    /// Make a checkpoint durable in one unit: `writes` (per namespace, unconditional)
    /// and the source `positions` they cover, kept with namespace `home` (the plugin's),
    /// so after a crash state and positions agree.
    async fn commit_checkpoint(
        &self,
        _writes: &[(String, Vec<StateWrite>)],
        _home: &str,
        _positions: &[SourcePosition],
    ) -> BackendResult<()> {
        Err(BackendError::Invalid(
            "this state store does not take checkpoints".into(),
        ))
    }

    /// Whether the store can [`StateStore::prepare_checkpoint`]: keep what a checkpoint
    /// overwrote until it is resolved, for checkpoints whose positions are committed
    /// elsewhere afterwards (a Kafka transaction).
    fn prepares(&self) -> bool {
        false
    }

    /// [`StateStore::commit_checkpoint`] that also keeps, in the same unit, what it
    /// overwrites (values and positions) as `home`'s pending checkpoint, until
    /// [`StateStore::resolve_checkpoint`] keeps or undoes it. At most one is pending per
    /// `home`; preparing another resolves the previous one as kept.
    async fn prepare_checkpoint(
        &self,
        _writes: &[(String, Vec<StateWrite>)],
        _home: &str,
        _positions: &[SourcePosition],
    ) -> BackendResult<()> {
        Err(BackendError::Invalid(
            "this state store cannot undo a checkpoint".into(),
        ))
    }

    /// The positions of `home`'s pending checkpoint, if one is pending.
    async fn pending_checkpoint(&self, _home: &str) -> BackendResult<Option<Vec<SourcePosition>>> {
        Ok(None)
    }

    /// Resolve `home`'s pending checkpoint: `keep` it (its positions were committed), or
    /// put back every value and position it overwrote. Nothing pending: nothing to do.
    async fn resolve_checkpoint(&self, _home: &str, _keep: bool) -> BackendResult<()> {
        Ok(())
    }

    /// The position last recorded by [`StateStore::commit_checkpoint`] with namespace
    /// `home` for `group` in one source partition.
    async fn source_position(
        &self,
        _home: &str,
        _group: &str,
        _topic: &str,
        _partition: u32,
    ) -> BackendResult<Option<SourcePosition>> {
        Ok(None)
    }
}
