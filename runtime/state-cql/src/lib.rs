//! Spate's cluster state store: plugin state in ScyllaDB or Cassandra, through the
//! `scylla` 1.x driver, behind the core's [`StateStore`] trait.
//!
//! It owns the schema, the statements and the mapping of driver errors; namespaces, key
//! checks and capabilities are the host layer's. One table holds every plugin's state:
//!
//! ```text
//! CREATE TABLE <keyspace>.<table> (ns text, key blob, value blob, PRIMARY KEY ((ns), key))
//! ```
//!
//! One partition per namespace, keys as clustering columns in byte order: a prefix scan is
//! a range `key >= prefix AND key < successor(prefix)` inside one partition, read page by
//! page (keyset pagination, `LIMIT ?`), and the writes of one event — always one namespace
//! — are a single-partition batch, which Cassandra and ScyllaDB apply atomically, and may
//! carry lightweight-transaction conditions (`IF value = ?`, `IF value = null`) for
//! compare-and-swap. Values are written with `UPDATE ... USING TTL ?` (0 = no TTL), so a
//! row exists exactly while its `value` cell is live. Statements are prepared once at
//! start-up; reads and unconditional writes are marked idempotent so the driver's retry
//! policy may retry them, lightweight transactions are not.
//!
//! Outages (no connection, timeouts, unavailable replicas, overload) are
//! [`BackendError::Unavailable`], which the dispatcher retries without dead-lettering;
//! statements the server refuses are [`BackendError::Invalid`].
//!
//! TTLs are whole seconds in CQL: a TTL is rounded up to the next second, and a zero TTL
//! deletes the key (the value "expires at once"). TTLs beyond CQL's 20-year maximum are
//! capped at it.
//!
//! At start-up the store checks that the server understood each statement as written (the
//! bind markers and result columns it reports must match): a server that silently ignores
//! `USING TTL ?`, range restrictions or `IF` would otherwise corrupt state, so it is
//! refused with [`ConnectError::MissingFeatures`] naming what it lacks.

use async_trait::async_trait;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError};
use scylla::frame::response::result::ColumnType;
use scylla::serialize::SerializationError;
use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::{CellWriter, WrittenCellProof};
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};
use spate_core::{
    ApplyOutcome, BackendError, BackendResult, Entry, Expiry, SourcePosition, StateStore,
    StateWrite,
};
use std::time::Duration;
use tracing::{info, warn};

/// Consistency level of reads and writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// One replica.
    One,
    /// One replica in the local datacenter.
    LocalOne,
    /// A majority of all replicas.
    Quorum,
    /// A majority of the local datacenter's replicas.
    #[default]
    LocalQuorum,
    /// A majority in each datacenter (writes).
    EachQuorum,
    /// Every replica.
    All,
}

impl From<Consistency> for scylla::statement::Consistency {
    fn from(c: Consistency) -> Self {
        match c {
            Consistency::One => Self::One,
            Consistency::LocalOne => Self::LocalOne,
            Consistency::Quorum => Self::Quorum,
            Consistency::LocalQuorum => Self::LocalQuorum,
            Consistency::EachQuorum => Self::EachQuorum,
            Consistency::All => Self::All,
        }
    }
}

/// Consistency of lightweight transactions' Paxos rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialConsistency {
    /// Paxos across all datacenters.
    Serial,
    /// Paxos within the local datacenter.
    #[default]
    LocalSerial,
}

impl From<SerialConsistency> for scylla::statement::SerialConsistency {
    fn from(c: SerialConsistency) -> Self {
        match c {
            SerialConsistency::Serial => Self::Serial,
            SerialConsistency::LocalSerial => Self::LocalSerial,
        }
    }
}

/// Longest TTL CQL accepts: 20 years, in seconds.
pub const MAX_TTL_SECS: i32 = 630_720_000;

/// Settings of the CQL state store: the `[state]` section with `type = "cql"` of the
/// runtime's configuration (every key optional, defaults in [`CqlOptions::default`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct CqlOptions {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace of the state table (created if absent).
    pub keyspace: String,
    /// Name of the state table (created if absent).
    pub table: String,
    /// Replication of the keyspace when it is created, as a CQL map literal.
    pub replication: String,
    /// ScyllaDB only: `Some(false)` creates the keyspace with `tablets = {'enabled':
    /// false}` (ScyllaDB releases whose tablets lack lightweight transactions); `None`
    /// leaves the server's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tablets: Option<bool>,
    /// Create the keyspace and table if they do not exist.
    pub create_schema: bool,
    /// Consistency of reads and writes.
    pub consistency: Consistency,
    /// Consistency of the Paxos round of compare-and-swap writes.
    pub serial_consistency: SerialConsistency,
    /// Client-side timeout of one request (retries included).
    #[serde(rename = "request-timeout-ms", with = "spate_core::millis")]
    pub request_timeout: Duration,
    /// Timeout of opening one connection.
    #[serde(rename = "connect-timeout-ms", with = "spate_core::millis")]
    pub connect_timeout: Duration,
    /// Rows read per page of a scan.
    pub scan_page_size: u32,
    /// User name, if the cluster requires authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password for `username`.
    #[serde(skip_serializing)]
    pub password: Option<String>,
}

impl Default for CqlOptions {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:9042".into()],
            keyspace: "spate".into(),
            table: "state".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            tablets: None,
            create_schema: true,
            consistency: Consistency::LocalQuorum,
            serial_consistency: SerialConsistency::LocalSerial,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            scan_page_size: 1000,
            username: None,
            password: None,
        }
    }
}

impl CqlOptions {
    /// Problems with these settings, if any.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.nodes.is_empty() {
            p.push("at least one CQL node is needed".to_owned());
        }
        for (what, name) in [("keyspace", &self.keyspace), ("table", &self.table)] {
            if !valid_identifier(name) {
                p.push(format!(
                    "{what} `{name}` must be 1-48 letters, digits or `_`, starting with a letter"
                ));
            }
        }
        let r = self.replication.trim();
        if !(r.starts_with('{') && r.ends_with('}')) || r.contains(';') {
            p.push(format!(
                "replication `{r}` must be a CQL map such as {{'class': 'NetworkTopologyStrategy', 'dc1': 3}}"
            ));
        }
        if self.scan_page_size == 0 {
            p.push("scan page size must be at least 1".to_owned());
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            p.push("CQL timeouts must be more than zero".to_owned());
        }
        p
    }
}

fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && s.len() <= 48
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why the store could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The settings are wrong.
    #[error("invalid CQL settings: {0}")]
    Config(String),
    /// No node could be reached.
    #[error("cannot connect to the CQL nodes {nodes:?}: {source}")]
    Connect {
        /// The contact points.
        nodes: Vec<String>,
        /// The driver's error.
        source: NewSessionError,
    },
    /// Creating the keyspace or table failed.
    #[error("cannot create the schema (`{statement}`): {source}")]
    Schema {
        /// The statement.
        statement: String,
        /// The driver's error.
        source: ExecutionError,
    },
    /// A statement could not be prepared.
    #[error("cannot prepare `{statement}`: {source}")]
    Prepare {
        /// The statement.
        statement: String,
        /// The driver's error.
        source: PrepareError,
    },
    /// The server lacks something the store relies on.
    #[error(
        "the CQL server does not support {0}, which the state store relies on (ScyllaDB and Cassandra 3+ do)"
    )]
    MissingFeatures(String),
}

struct Statements {
    /// A point read with the value's remaining TTL.
    get: PreparedStatement,
    put: PreparedStatement,
    put_ttl: PreparedStatement,
    delete: PreparedStatement,
    scan_range: PreparedStatement,
    scan_from: PreparedStatement,
    cas_put: PreparedStatement,
    cas_put_absent: PreparedStatement,
    cas_delete: PreparedStatement,
    cas_delete_absent: PreparedStatement,
}

impl Statements {
    /// Prepares every statement on `table`, checking each is read as written; what the
    /// server lacks is reported together.
    async fn prepare(session: &Session, table: &str) -> Result<Self, ConnectError> {
        // Each statement must be read as written: the bind markers (and result columns)
        // the server reports are checked, and what fails is reported together.
        let mut missing = Vec::new();
        let mut prepare = async |feature: &'static str,
                                 statement: String,
                                 markers: usize,
                                 columns: Option<usize>,
                                 idempotent: bool|
               -> Result<Option<PreparedStatement>, ConnectError> {
            match checked(session, &statement, markers, columns, idempotent).await {
                Ok(p) => Ok(Some(p)),
                Err(Misread::Refused(source)) if feature.is_empty() => {
                    Err(ConnectError::Prepare { statement, source })
                }
                Err(_) => {
                    missing.push(if feature.is_empty() { "CQL 3" } else { feature });
                    Ok(None)
                }
            }
        };
        let get = prepare(
            "`TTL(value)`",
            format!("SELECT key, value, TTL(value) FROM {table} WHERE ns = ? AND key = ?"),
            2,
            Some(3),
            true,
        )
        .await?;
        let put = prepare(
            "",
            format!("UPDATE {table} SET value = ? WHERE ns = ? AND key = ?"),
            3,
            None,
            true,
        )
        .await?;
        let delete = prepare(
            "",
            format!("DELETE FROM {table} WHERE ns = ? AND key = ?"),
            2,
            None,
            true,
        )
        .await?;
        let put_ttl = prepare(
            "`USING TTL ?`",
            format!("UPDATE {table} USING TTL ? SET value = ? WHERE ns = ? AND key = ?"),
            4,
            None,
            true,
        )
        .await?;
        let ranges =
            "range restrictions on clustering keys (`key >= ? AND key < ?`) with `LIMIT ?`";
        let scan_range = prepare(
            ranges,
            format!("SELECT key, value FROM {table} WHERE ns = ? AND key >= ? AND key < ? LIMIT ?"),
            4,
            Some(2),
            true,
        )
        .await?;
        let scan_from = prepare(
            ranges,
            format!("SELECT key, value FROM {table} WHERE ns = ? AND key >= ? LIMIT ?"),
            3,
            Some(2),
            true,
        )
        .await?;
        // Lightweight transactions are never idempotent: a retried Paxos round may see its
        // own earlier write.
        let lwt = "lightweight transactions (`IF value = ?`)";
        let cas_put = prepare(
            lwt,
            format!(
                "UPDATE {table} USING TTL ? SET value = ? WHERE ns = ? AND key = ? IF value = ?"
            ),
            5,
            None,
            false,
        )
        .await?;
        let cas_put_absent = prepare(
            lwt,
            format!(
                "UPDATE {table} USING TTL ? SET value = ? WHERE ns = ? AND key = ? IF value = null"
            ),
            4,
            None,
            false,
        )
        .await?;
        let cas_delete = prepare(
            lwt,
            format!("DELETE FROM {table} WHERE ns = ? AND key = ? IF value = ?"),
            3,
            None,
            false,
        )
        .await?;
        let cas_delete_absent = prepare(
            lwt,
            format!("DELETE FROM {table} WHERE ns = ? AND key = ? IF value = null"),
            // Same markers as a plain delete: a server ignoring `IF` is caught by the
            // other three.
            2,
            None,
            false,
        )
        .await?;
        let (
            Some(get),
            Some(put),
            Some(put_ttl),
            Some(delete),
            Some(scan_range),
            Some(scan_from),
            Some(cas_put),
            Some(cas_put_absent),
            Some(cas_delete),
            Some(cas_delete_absent),
        ) = (
            get,
            put,
            put_ttl,
            delete,
            scan_range,
            scan_from,
            cas_put,
            cas_put_absent,
            cas_delete,
            cas_delete_absent,
        )
        else {
            missing.dedup();
            return Err(ConnectError::MissingFeatures(missing.join(", ")));
        };
        Ok(Statements {
            get,
            put,
            put_ttl,
            delete,
            scan_range,
            scan_from,
            cas_put,
            cas_put_absent,
            cas_delete,
            cas_delete_absent,
        })
    }
}

/// The CQL state store; see the [crate docs](crate).
pub struct CqlStateStore {
    session: Session,
    statements: Statements,
    page_size: u32,
}

impl CqlStateStore {
    /// Connect, create the keyspace and table if configured to, prepare the statements and
    /// check what the server supports.
    pub async fn connect(options: CqlOptions) -> Result<Self, ConnectError> {
        let problems = options.problems();
        if !problems.is_empty() {
            return Err(ConnectError::Config(problems.join("; ")));
        }
        let session = Self::open_session(&options).await?;
        let table = format!("{}.{}", options.keyspace, options.table);
        if options.create_schema {
            Self::create_schema(&session, &options, &table).await?;
        }
        let statements = Statements::prepare(&session, &table).await?;
        info!(nodes = ?options.nodes, %table, "CQL state store ready");
        Ok(Self {
            session,
            statements,
            page_size: options.scan_page_size,
        })
    }

    /// A driver session with the options' nodes, credentials, consistency and timeouts.
    async fn open_session(options: &CqlOptions) -> Result<Session, ConnectError> {
        let profile = ExecutionProfile::builder()
            .consistency(options.consistency.into())
            .serial_consistency(Some(options.serial_consistency.into()))
            .request_timeout(Some(options.request_timeout))
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&options.nodes)
            .connection_timeout(options.connect_timeout)
            .default_execution_profile_handle(profile.into_handle())
            // Spate reads no schema metadata, and schema changes are only its own
            // `IF NOT EXISTS` DDL at start-up; skipping both also lets it run against
            // minimal CQL servers.
            .fetch_schema_metadata(false)
            .auto_await_schema_agreement(false);
        if let Some(user) = &options.username {
            let password = options.password.clone().unwrap_or_default();
            builder = builder.user(user, password);
        }
        builder
            .build()
            .await
            .map_err(|source| ConnectError::Connect {
                nodes: options.nodes.clone(),
                source,
            })
    }

    /// Creates the keyspace and table if they do not exist, and waits for the nodes to
    /// agree on the schema.
    async fn create_schema(
        session: &Session,
        options: &CqlOptions,
        table: &str,
    ) -> Result<(), ConnectError> {
        let tablets = match options.tablets {
            Some(enabled) => format!(" AND tablets = {{'enabled': {enabled}}}"),
            None => String::new(),
        };
        for statement in [
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {}{tablets}",
                options.keyspace,
                options.replication.trim()
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {table} (ns text, key blob, value blob, PRIMARY KEY ((ns), key))"
            ),
        ] {
            session
                .query_unpaged(statement.as_str(), ())
                .await
                .map_err(|source| ConnectError::Schema { statement, source })?;
        }
        // Every node must know the table before statements run on it. (A single node —
        // or the in-process test server, which has no schema versions — has nothing to
        // agree with.)
        if session.get_cluster_state().get_nodes_info().len() > 1
            && let Err(e) = session.await_schema_agreement().await
        {
            warn!(error = %e, "schema agreement not reached; continuing");
        }
        Ok(())
    }

    /// The driver session (for tests and tools).
    pub fn session(&self) -> &Session {
        &self.session
    }

    async fn read(&self, ns: &str, key: &str) -> BackendResult<Option<Entry>> {
        let result = self
            .session
            .execute_unpaged(&self.statements.get, (ns, key.as_bytes()))
            .await
            .map_err(execution_error)?;
        let rows = result.into_rows_result().map_err(corrupt)?;
        // At most one row; take the first and check its key, so a server that answers a
        // point lookup with a range can never hand back a neighbour's value.
        let first = rows
            .rows::<(Vec<u8>, Option<Vec<u8>>, Option<i32>)>()
            .map_err(corrupt)?
            .next()
            .transpose()
            .map_err(corrupt)?;
        Ok(match first {
            Some((k, Some(value), ttl)) if k == key.as_bytes() => Some(Entry {
                value,
                expiry: match ttl {
                    None => Expiry::Never,
                    Some(secs) => Expiry::In(Duration::from_secs(
                        u64::try_from(secs.max(0)).unwrap_or_default(),
                    )),
                },
            }),
            _ => None,
        })
    }

    /// `writes` (unconditional) and the raw `extra` rows in one single-partition batch of
    /// namespace `ns`.
    async fn write_batch(
        &self,
        ns: &str,
        writes: &[StateWrite],
        extra: &[(Vec<u8>, Vec<u8>)],
    ) -> BackendResult<()> {
        if writes.is_empty() && extra.is_empty() {
            return Ok(());
        }
        let mut statements: Vec<(&PreparedStatement, Vec<Arg<'_>>)> =
            writes.iter().map(|w| self.statement_for(ns, w)).collect();
        for (key, value) in extra {
            statements.push((
                &self.statements.put,
                vec![Arg::Blob(value), Arg::Text(ns), Arg::Blob(key)],
            ));
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for (statement, _) in &statements {
            batch.append_statement((*statement).clone());
        }
        // Blind writes of final values: sending it again changes nothing.
        batch.set_is_idempotent(true);
        let values: Vec<&Vec<Arg<'_>>> = statements.iter().map(|(_, v)| v).collect();
        self.session
            .batch(&batch, values)
            .await
            .map_err(execution_error)?;
        Ok(())
    }

    /// The statement and bound values for one write of a batch.
    fn statement_for<'a>(
        &'a self,
        ns: &'a str,
        w: &'a StateWrite,
    ) -> (&'a PreparedStatement, Vec<Arg<'a>>) {
        let key = Arg::Blob(w.key.as_bytes());
        let ns = Arg::Text(ns);
        let ttl = w.ttl.map(ttl_secs);
        // A zero TTL is "expired at once": a delete.
        let value = match (&w.value, ttl) {
            (Some(_), Some(0)) | (None, _) => None,
            (Some(v), _) => Some(Arg::Blob(v)),
        };
        let ttl_arg = Arg::Int(ttl.unwrap_or(0));
        let st = &self.statements;
        let Some(condition) = &w.condition else {
            return match (value, ttl) {
                (None, _) => (&st.delete, vec![ns, key]),
                (Some(v), Some(_)) => (&st.put_ttl, vec![ttl_arg, v, ns, key]),
                (Some(v), None) => (&st.put, vec![v, ns, key]),
            };
        };
        match (value, condition) {
            (Some(v), Some(expected)) => {
                (&st.cas_put, vec![ttl_arg, v, ns, key, Arg::Blob(expected)])
            }
            (Some(v), None) => (&st.cas_put_absent, vec![ttl_arg, v, ns, key]),
            (None, Some(expected)) => (&st.cas_delete, vec![ns, key, Arg::Blob(expected)]),
            (None, None) => (&st.cas_delete_absent, vec![ns, key]),
        }
    }

    /// Which conditional write failed: the first whose condition does not hold now.
    async fn conflicting_key(&self, ns: &str, writes: &[StateWrite]) -> String {
        let conditional = writes.iter().filter(|w| w.condition.is_some());
        for w in conditional.clone() {
            if let (Some(expected), Ok(current)) = (&w.condition, self.read(ns, &w.key).await)
                && current.map(|e| e.value) != *expected
            {
                return w.key.clone();
            }
        }
        // Changed again since; name the first condition.
        conditional
            .map(|w| w.key.clone())
            .next()
            .unwrap_or_default()
    }
}

/// Why a statement cannot be used.
enum Misread {
    /// The server refused to prepare it.
    Refused(PrepareError),
    /// It reports other bind markers (or result columns) than written.
    Misread,
}

/// Prepare `statement`, checking that the server read it as written.
async fn checked(
    session: &Session,
    statement: &str,
    markers: usize,
    columns: Option<usize>,
    idempotent: bool,
) -> Result<PreparedStatement, Misread> {
    match session.prepare(statement).await {
        Ok(mut p) => {
            let markers_ok = p.get_variable_col_specs().len() == markers;
            let columns_ok =
                columns.is_none_or(|c| p.get_current_result_set_col_specs().get().len() == c);
            if markers_ok && columns_ok {
                p.set_is_idempotent(idempotent);
                Ok(p)
            } else {
                warn!(%statement, markers = p.get_variable_col_specs().len(), expected = markers,
                    "the CQL server misread a statement");
                Err(Misread::Misread)
            }
        }
        Err(e) => {
            warn!(%statement, error = %e, "the CQL server refused a statement");
            Err(Misread::Refused(e))
        }
    }
}

/// Whole seconds of a TTL, rounded up, capped at CQL's maximum.
fn ttl_secs(ttl: Duration) -> i32 {
    let secs = ttl.as_millis().div_ceil(1000);
    i32::try_from(secs)
        .unwrap_or(MAX_TTL_SECS)
        .min(MAX_TTL_SECS)
}

/// First byte of the keys a checkpoint's positions are kept under, in the plugin's own
/// partition (so they are written in the same single-partition batch as its state). A
/// guest's key is UTF-8 text and never holds this byte, nor does a scan reach it.
const RESERVED: u8 = 0xFF;

/// The key of `group`'s position in one source partition.
fn position_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = vec![RESERVED];
    k.extend_from_slice(b"position\0");
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The smallest byte string greater than every string starting with `prefix`, if any.
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < u8::MAX {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

#[async_trait]
impl StateStore for CqlStateStore {
    async fn get(&self, namespace: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        Ok(self.read(namespace, key).await?.map(|e| e.value))
    }

    async fn get_entry(&self, namespace: &str, key: &str) -> BackendResult<Option<Entry>> {
        self.read(namespace, key).await
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
        let mut bytes = 0usize;
        let (range, from) = (&self.statements.scan_range, &self.statements.scan_from);
        // Never past the reserved keys: a guest's scan sees only guests' keys.
        let end = successor(prefix.as_bytes()).or_else(|| Some(vec![RESERVED]));
        let mut start = prefix.as_bytes().to_vec();
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let want = (limit as usize - out.len()).min(self.page_size as usize);
            let page = i32::try_from(want).unwrap_or(i32::MAX);
            let result = match &end {
                Some(end) => {
                    self.session
                        .execute_unpaged(range, (namespace, &start, end, page))
                        .await
                }
                None => {
                    self.session
                        .execute_unpaged(from, (namespace, &start, page))
                        .await
                }
            }
            .map_err(execution_error)?;
            let rows = result.into_rows_result().map_err(corrupt)?;
            let mut got = 0;
            for row in rows.rows::<(Vec<u8>, Option<Vec<u8>>)>().map_err(corrupt)? {
                let (key, value) = row.map_err(corrupt)?;
                got += 1;
                // The next page starts just after this key.
                start.clone_from(&key);
                start.push(0);
                let Some(value) = value else { continue };
                let key = String::from_utf8(key)
                    .map_err(|_| BackendError::Corrupt("a stored key is not UTF-8".into()))?;
                bytes = bytes.saturating_add(key.len() + value.len());
                out.push((key, value));
                if bytes > max_bytes {
                    return Ok(out);
                }
            }
            if got < want || out.len() >= limit as usize {
                return Ok(out);
            }
        }
    }

    fn checkpoints(&self) -> bool {
        true
    }

    fn shared(&self) -> bool {
        true
    }

    /// Each namespace's writes are one single-partition batch, which the server applies
    /// atomically and in isolation; the positions go in the batch of namespace `home`, so
    /// a checkpoint's state and positions land together or not at all (a replay after a
    /// crash never applies an event's state twice). Namespaces other than `home` (only a
    /// version that changed its namespace has them) are sent first.
    async fn commit_checkpoint(
        &self,
        writes: &[(String, Vec<StateWrite>)],
        home: &str,
        positions: &[SourcePosition],
    ) -> BackendResult<()> {
        let others = writes.iter().filter(|(ns, w)| ns != home && !w.is_empty());
        futures::future::try_join_all(others.map(|(ns, w)| self.write_batch(ns, w, &[]))).await?;
        let own: &[StateWrite] = writes
            .iter()
            .find(|(ns, _)| ns == home)
            .map_or(&[], |(_, w)| w.as_slice());
        let encoded: Vec<(Vec<u8>, Vec<u8>)> = positions
            .iter()
            .map(|p| (position_key(&p.group, &p.topic, p.partition), p.encode()))
            .collect();
        self.write_batch(home, own, &encoded).await
    }

    async fn source_position(
        &self,
        home: &str,
        group: &str,
        topic: &str,
        partition: u32,
    ) -> BackendResult<Option<SourcePosition>> {
        let key = position_key(group, topic, partition);
        let result = self
            .session
            .execute_unpaged(&self.statements.get, (home, key.as_slice()))
            .await
            .map_err(execution_error)?;
        let rows = result.into_rows_result().map_err(corrupt)?;
        let first = rows
            .rows::<(Vec<u8>, Option<Vec<u8>>, Option<i32>)>()
            .map_err(corrupt)?
            .next()
            .transpose()
            .map_err(corrupt)?;
        match first {
            Some((k, Some(v), _)) if k == key => {
                SourcePosition::decode(group, topic, partition, &v).map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn apply(&self, namespace: &str, writes: &[StateWrite]) -> BackendResult<ApplyOutcome> {
        if writes.is_empty() {
            return Ok(ApplyOutcome::Applied);
        }
        let conditional = writes.iter().any(|w| w.condition.is_some());
        let mut statements = Vec::with_capacity(writes.len());
        for w in writes {
            statements.push(self.statement_for(namespace, w));
        }
        let result = if let [(statement, values)] = statements.as_slice() {
            self.session.execute_unpaged(statement, values).await
        } else {
            // One namespace is one partition: a single-partition batch is atomic, and may
            // be conditional.
            let mut batch = Batch::new(BatchType::Unlogged);
            for (statement, _) in &statements {
                batch.append_statement((*statement).clone());
            }
            batch.set_is_idempotent(!conditional);
            let values: Vec<&Vec<Arg<'_>>> = statements.iter().map(|(_, v)| v).collect();
            self.session.batch(&batch, values).await
        }
        .map_err(execution_error)?;
        if !conditional {
            return Ok(ApplyOutcome::Applied);
        }
        if applied(result)? {
            Ok(ApplyOutcome::Applied)
        } else {
            Ok(ApplyOutcome::Conflict {
                key: self.conflicting_key(namespace, writes).await,
            })
        }
    }
}

/// The `[applied]` column of a lightweight transaction's result.
fn applied(result: scylla::response::query_result::QueryResult) -> BackendResult<bool> {
    let rows = result.into_rows_result().map_err(corrupt)?;
    let index = rows
        .column_specs()
        .get_by_name("[applied]")
        .map(|(i, _)| i)
        .ok_or_else(|| {
            BackendError::Corrupt("a conditional write returned no [applied] column".into())
        })?;
    let row: Option<Row> = rows.maybe_first_row().map_err(corrupt)?;
    match row.and_then(|r| r.columns.into_iter().nth(index).flatten()) {
        Some(CqlValue::Boolean(applied)) => Ok(applied),
        other => Err(BackendError::Corrupt(format!(
            "unexpected [applied] value {other:?}"
        ))),
    }
}

/// One bound value of a statement.
#[derive(Debug)]
enum Arg<'a> {
    Int(i32),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl SerializeValue for Arg<'_> {
    fn serialize<'b>(
        &self,
        typ: &ColumnType,
        writer: CellWriter<'b>,
    ) -> Result<WrittenCellProof<'b>, SerializationError> {
        match self {
            Arg::Int(v) => v.serialize(typ, writer),
            Arg::Text(v) => v.serialize(typ, writer),
            Arg::Blob(v) => v.serialize(typ, writer),
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> BackendError {
    BackendError::Corrupt(format!("unexpected CQL result: {e}"))
}

/// Outages are `Unavailable` (retried by the dispatcher); what the server refuses as
/// wrong is `Invalid`.
fn execution_error(e: ExecutionError) -> BackendError {
    let refused = match &e {
        ExecutionError::BadQuery(_) => true,
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => matches!(
            db,
            DbError::SyntaxError
                | DbError::Invalid
                | DbError::AlreadyExists { .. }
                | DbError::FunctionFailure { .. }
                | DbError::Unauthorized
                | DbError::ConfigError
                | DbError::ProtocolError
        ),
        ExecutionError::LastAttemptError(RequestAttemptError::SerializationError(_)) => true,
        _ => false,
    };
    if refused {
        BackendError::Invalid(format!("CQL: {e}"))
    } else {
        BackendError::Unavailable(format!("CQL: {e}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn successor_bounds_a_prefix() {
        assert_eq!(successor(b"user:"), Some(b"user;".to_vec()));
        assert_eq!(successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(successor(b"\xff\xff"), None);
        assert_eq!(successor(b""), None);
    }

    #[test]
    fn ttls_round_up_to_seconds_and_are_capped() {
        assert_eq!(ttl_secs(Duration::from_millis(1)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1000)), 1);
        assert_eq!(ttl_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_secs(Duration::ZERO), 0);
        assert_eq!(ttl_secs(Duration::from_secs(u64::MAX / 4)), MAX_TTL_SECS);
    }

    #[test]
    fn settings_are_checked() {
        assert!(CqlOptions::default().problems().is_empty());
        let bad = CqlOptions {
            nodes: vec![],
            keyspace: "spate; DROP".into(),
            table: "1t".into(),
            replication: "3".into(),
            scan_page_size: 0,
            ..CqlOptions::default()
        };
        assert_eq!(bad.problems().len(), 5, "{:?}", bad.problems());
    }
}
