//! Spate's cluster cache: cache entries in Redis (one server, or Redis Cluster), through
//! `redis-rs` with Tokio, behind the core's [`Cache`] trait.
//!
//! It owns the connection and the mapping of commands and errors; keys arrive already
//! prefixed by the host layer (the plugin's cache prefix), and what to do while Redis is
//! down is the core's [`GuardedCache`](spate_core::cache::GuardedCache)'s job.
//!
//! - `get` is `GET`; `set` is `SET key value PX <ms>` (a zero TTL deletes: the value
//!   "expires at once"); `delete` is `DEL`; `incr` is `INCRBY`, so a counter created by
//!   `incr` has no TTL and one incremented keeps its TTL, as in the in-process cache.
//! - One server goes through a [`ConnectionManager`]: connected lazily, multiplexed, and
//!   re-connected by itself after a failure. Redis Cluster goes through the cluster client,
//!   which follows slot moves and reconnects to nodes itself; it is connected on first use
//!   and again after a failed connect.
//! - Every command is bounded by a timeout. Refused connections, timeouts and cluster
//!   failovers are [`BackendError::Unavailable`]; a command Redis rejects (`INCRBY` of a
//!   word, overflow, a key of another type) is [`BackendError::Invalid`].

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, RedisError, ServerErrorKind};
use spate_core::{BackendError, BackendResult, Cache};
use std::time::Duration;
use tokio::sync::Mutex;

/// Settings of the Redis cache: the `[cache]` section with `type = "redis"` of the
/// runtime's configuration (every key optional, defaults in [`RedisOptions::default`]).
/// While Redis is unreachable, reads are misses and writes are skipped (the runtime's
/// cache guard); it is tried again every `retry-interval-ms`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct RedisOptions {
    /// `redis://host:port/db` of the server, or of cluster nodes to start from.
    pub urls: Vec<String>,
    /// Talk Redis Cluster (`urls` are seed nodes) instead of one server.
    pub cluster: bool,
    /// Longest wait for one command, connecting included; beyond it the call is
    /// `Unavailable`.
    #[serde(rename = "command-timeout-ms", with = "spate_core::millis")]
    pub command_timeout: Duration,
    /// Longest wait for one connection attempt.
    #[serde(rename = "connect-timeout-ms", with = "spate_core::millis")]
    pub connect_timeout: Duration,
    /// While Redis is unreachable, how often to try it again.
    #[serde(rename = "retry-interval-ms", with = "spate_core::millis")]
    pub retry_interval: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            urls: vec!["redis://127.0.0.1:6379/".into()],
            cluster: false,
            command_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            retry_interval: Duration::from_secs(1),
        }
    }
}

impl RedisOptions {
    /// Problems with these settings, if any.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.urls.is_empty() {
            p.push("at least one Redis URL is needed".to_owned());
        }
        if !self.cluster && self.urls.len() > 1 {
            p.push("several Redis URLs need `cluster = true`; one server takes one URL".to_owned());
        }
        for url in &self.urls {
            if let Err(e) = redis::Client::open(url.as_str()) {
                p.push(format!("Redis URL `{url}`: {e}"));
            }
        }
        if self.command_timeout.is_zero() || self.connect_timeout.is_zero() {
            p.push("Redis timeouts must be more than zero".to_owned());
        }
        if self.retry_interval.is_zero() {
            p.push("retry-interval-ms must be at least 1".to_owned());
        }
        p
    }
}

/// Why the cache could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis settings: {0}")]
pub struct ConfigError(pub String);

enum Connection {
    Single(ConnectionManager),
    Cluster(Box<ClusterSlot>),
}

/// The cluster client and its connection, made on first use.
struct ClusterSlot {
    client: ClusterClient,
    connection: Mutex<Option<ClusterConnection>>,
}

/// The Redis cache; see the [crate docs](crate).
pub struct RedisCache {
    connection: Connection,
    command_timeout: Duration,
}

impl RedisCache {
    /// A cache on `options`. Nothing is connected yet (the first command connects), so the
    /// runtime starts while Redis is down and the cache joins when it is up.
    pub fn new(options: RedisOptions) -> Result<Self, ConfigError> {
        let problems = options.problems();
        if !problems.is_empty() {
            return Err(ConfigError(problems.join("; ")));
        }
        let connection = if options.cluster {
            let client = ClusterClient::builder(options.urls.iter().map(String::as_str))
                .tcp_settings(tcp_settings())
                .connection_timeout(options.connect_timeout)
                .response_timeout(options.command_timeout)
                .retries(2)
                .build()
                .map_err(|e| ConfigError(e.to_string()))?;
            Connection::Cluster(Box::new(ClusterSlot {
                client,
                connection: Mutex::new(None),
            }))
        } else {
            let url = options.urls.first().map(String::as_str).unwrap_or_default();
            let info = url
                .into_connection_info()
                .map_err(|e| ConfigError(e.to_string()))?
                .set_tcp_settings(tcp_settings());
            let client = redis::Client::open(info).map_err(|e| ConfigError(e.to_string()))?;
            // Few quick reconnect attempts per failure: the command timeout bounds the
            // wait anyway, and the next command starts a new round.
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(options.connect_timeout))
                .set_response_timeout(Some(options.command_timeout))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500));
            let manager = ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| ConfigError(e.to_string()))?;
            Connection::Single(manager)
        };
        Ok(Self {
            connection,
            command_timeout: options.command_timeout,
        })
    }

    async fn run<T: FromRedisValue>(&self, cmd: &Cmd) -> BackendResult<T> {
        match tokio::time::timeout(self.command_timeout, self.run_unbounded(cmd)).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Unavailable(format!(
                "Redis did not answer within {:?}",
                self.command_timeout
            ))),
        }
    }

    async fn run_unbounded<T: FromRedisValue>(&self, cmd: &Cmd) -> BackendResult<T> {
        match &self.connection {
            Connection::Single(manager) => {
                let mut conn = manager.clone();
                query(cmd, &mut conn).await
            }
            Connection::Cluster(cluster) => {
                let ClusterSlot { client, connection } = cluster.as_ref();
                let mut conn = {
                    let mut slot = connection.lock().await;
                    match slot.as_ref() {
                        Some(c) => c.clone(),
                        None => {
                            let c = client.get_async_connection().await.map_err(redis_error)?;
                            *slot = Some(c.clone());
                            c
                        }
                    }
                };
                query(cmd, &mut conn).await
            }
        }
    }
}

/// `TCP_NODELAY` on: commands are small and multiplexed on one connection, and Nagle's
/// algorithm would hold one back until the previous reply's ACK (up to 40 ms on Linux).
fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

async fn query<T: FromRedisValue>(cmd: &Cmd, conn: &mut impl ConnectionLike) -> BackendResult<T> {
    cmd.query_async(conn).await.map_err(redis_error)
}

/// What Redis refuses is `Invalid`; everything else (I/O, timeouts, failovers, a cluster
/// without a master for the slot, a loading server) is `Unavailable`.
fn redis_error(e: RedisError) -> BackendError {
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError)
        | ErrorKind::Extension
        | ErrorKind::UnexpectedReturnType
        | ErrorKind::InvalidClientConfig => BackendError::Invalid(format!("Redis: {e}")),
        _ => BackendError::Unavailable(format!("Redis: {e}")),
    }
}

/// Milliseconds of a TTL, rounded up (Redis counts in whole milliseconds).
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, key: &str) -> BackendResult<Option<Vec<u8>>> {
        self.run(redis::cmd("GET").arg(key)).await
    }

    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> BackendResult<()> {
        if ttl.is_zero() {
            return self.delete(key).await;
        }
        self.run(
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms(ttl)),
        )
        .await
    }

    async fn delete(&self, key: &str) -> BackendResult<()> {
        self.run::<i64>(redis::cmd("DEL").arg(key))
            .await
            .map(|_| ())
    }

    async fn incr(&self, key: &str, delta: i64) -> BackendResult<i64> {
        self.run(redis::cmd("INCRBY").arg(key).arg(delta)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn settings_are_checked() {
        assert!(RedisOptions::default().problems().is_empty());
        let two = RedisOptions {
            urls: vec!["redis://a/".into(), "redis://b/".into()],
            ..RedisOptions::default()
        };
        assert_eq!(two.problems().len(), 1);
        let bad = RedisOptions {
            urls: vec!["http://nope".into()],
            command_timeout: Duration::ZERO,
            ..RedisOptions::default()
        };
        assert_eq!(bad.problems().len(), 2, "{:?}", bad.problems());
        assert!(RedisCache::new(bad).is_err());
    }

    #[test]
    fn ttls_round_up_to_milliseconds() {
        assert_eq!(ttl_ms(Duration::from_micros(1)), 1);
        assert_eq!(ttl_ms(Duration::from_millis(1500)), 1500);
    }
}
