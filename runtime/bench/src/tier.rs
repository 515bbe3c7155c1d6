//! `spate-bench tier`: what the read-through state tier saves and costs on a skewed workload.
//!
//! Runs the same Zipf-like workload (default 100,000 events over 10,000 keys, s = 1) twice
//! against the same CQL store — once reading state straight from the store, once through
//! the read-through tier with Redis as its cache — and prints the state-store reads of
//! each run and the latency the Redis hop adds per event. Each event does what the example
//! plugin does per order: read its key's state and write it back changed (`get` + `apply`),
//! in per-key order (events hash to lanes, each lane in order, lanes concurrently).
//!
//! By default it starts its own `redis-server` and Apache Cassandra node (the test
//! harness's, from its Maven Central jars: a JDK 17+ and Maven are needed) on free loopback
//! ports; `--redis URL` and `--cql HOST:PORT` point it at others (say the compose file's
//! ScyllaDB and Redis).
//!
//! ```sh
//! scripts/bench tier [--events N] [--keys N] [--lanes N]
//! ```

use anyhow::{Context, bail};
use async_trait::async_trait;
use spate_cache_redis::{RedisCache, RedisOptions};
use spate_conformance::cassandra::Cassandra;
use spate_conformance::services::RedisServer;
use spate_core::cache::GuardedCache;
use spate_core::state::tiered::{ReadThroughConfig, StateTier, TierStats};
use spate_core::{BackendResult, Cache, StateStore, StateWrite};
use spate_state_cql::{CqlOptions, CqlStateStore};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `spate-bench tier`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events of the workload.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    keys: u32,
    /// Skew of the Zipf-like key popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Lanes handled concurrently (each in order).
    #[arg(long, default_value_t = 16)]
    lanes: usize,
    /// Bytes of each state value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Namespaces the keys are spread over (default 1 against a real CQL server, 100
    /// against the in-process one, whose point reads cost as much as the rest of the
    /// partition).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    partitions: Option<u32>,
    /// Redis to use instead of starting a `redis-server` (`redis://host:port/`).
    #[arg(long)]
    redis: Option<String>,
    /// CQL server to use instead of starting Apache Cassandra (`host:port`).
    #[arg(long)]
    cql: Option<String>,
}

tokio::task_local! {
    /// Nanoseconds this event spent waiting for the cache.
    static CACHE_NANOS: Cell<u64>;
}

/// A cache that adds the time of every call to the running event's [`CACHE_NANOS`].
struct Timed(Arc<dyn Cache>);

impl Timed {
    async fn time<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let out = f.await;
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let _ = CACHE_NANOS.try_with(|c| c.set(c.get() + nanos));
        out
    }
}

#[async_trait]
impl Cache for Timed {
    async fn get(&self, key: &str) -> BackendResult<Option<Vec<u8>>> {
        self.time(self.0.get(key)).await
    }
    async fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) -> BackendResult<()> {
        self.time(self.0.set(key, value, ttl)).await
    }
    async fn delete(&self, key: &str) -> BackendResult<()> {
        self.time(self.0.delete(key)).await
    }
    async fn incr(&self, key: &str, delta: i64) -> BackendResult<i64> {
        self.time(self.0.incr(key, delta)).await
    }
}

fn value(n: u64, bytes: usize) -> Vec<u8> {
    let mut v = format!("{n:020}").into_bytes();
    v.resize(bytes.max(20), b'.');
    v
}

/// One run's outcome.
struct Run {
    stats: TierStats,
    elapsed: Duration,
    /// Per-event latency (get + apply), nanoseconds, sorted.
    event_nanos: Vec<u64>,
    /// Per-event time in cache calls, nanoseconds, sorted.
    cache_nanos: Vec<u64>,
}

fn pct(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_nanos(sorted[i.min(sorted.len() - 1)])
}

/// The namespace of key `k`: `<ns>/<k mod partitions>`.
fn namespace(ns: &str, k: u32, partitions: u32) -> String {
    format!("{ns}/{}", k % partitions)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    state: Arc<dyn StateStore>,
    tier: &StateTier,
    ns: &str,
    partitions: u32,
    keys: &[u32],
    lanes: usize,
    value_bytes: usize,
) -> anyhow::Result<Run> {
    let mut per_lane: Vec<Vec<u32>> = vec![Vec::new(); lanes];
    for &k in keys {
        per_lane[k as usize % lanes].push(k);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in per_lane {
        let state = Arc::clone(&state);
        let ns = ns.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut events = Vec::with_capacity(lane.len());
            let mut cache = Vec::with_capacity(lane.len());
            for k in lane {
                let key = format!("k{k:05}");
                let ns = namespace(&ns, k, partitions);
                let (event, cache_spent) = CACHE_NANOS
                    .scope(Cell::new(0), async {
                        let t = Instant::now();
                        let current = state.get(&ns, &key).await?;
                        let n = current
                            .as_deref()
                            .and_then(|v| std::str::from_utf8(v.get(..20)?).ok()?.parse().ok())
                            .unwrap_or(0u64);
                        let w = StateWrite {
                            key: key.clone(),
                            value: Some(value(n + 1, value_bytes)),
                            ttl: None,
                            condition: None,
                        };
                        state.apply(&ns, &[w]).await?;
                        let nanos = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                        Ok::<_, spate_core::BackendError>((nanos, CACHE_NANOS.get().get()))
                    })
                    .await?;
                events.push(event);
                cache.push(cache_spent);
            }
            Ok::<_, spate_core::BackendError>((events, cache))
        }));
    }
    let mut event_nanos = Vec::with_capacity(keys.len());
    let mut cache_nanos = Vec::with_capacity(keys.len());
    for t in tasks {
        let (e, c) = t.await.context("lane task")??;
        event_nanos.extend(e);
        cache_nanos.extend(c);
    }
    let elapsed = started.elapsed();
    event_nanos.sort_unstable();
    cache_nanos.sort_unstable();
    Ok(Run {
        stats: tier.stats("bench"),
        elapsed,
        event_nanos,
        cache_nanos,
    })
}

async fn preload(
    store: &dyn StateStore,
    ns: &str,
    partitions: u32,
    keys: u32,
    value_bytes: usize,
) -> anyhow::Result<()> {
    for p in 0..partitions {
        let all: Vec<u32> = (0..keys).filter(|k| k % partitions == p).collect();
        for chunk in all.chunks(100) {
            let writes: Vec<StateWrite> = chunk
                .iter()
                .map(|k| StateWrite {
                    key: format!("k{k:05}"),
                    value: Some(value(0, value_bytes)),
                    ttl: None,
                    condition: None,
                })
                .collect();
            store.apply(&namespace(ns, p, partitions), &writes).await?;
        }
    }
    Ok(())
}

/// Run both passes and print what the tier saved and cost.
pub async fn main(args: Args) -> anyhow::Result<()> {
    if args.events == 0 || args.lanes == 0 {
        bail!("--events and --lanes must be at least 1");
    }
    bench(args).await
}

async fn bench(args: Args) -> anyhow::Result<()> {
    // Our own servers unless pointed at real ones; kept alive until the end.
    let redis_server = args.redis.is_none().then(RedisServer::start);
    let cql_server = args.cql.is_none().then(Cassandra::start);
    let redis_url = match (&args.redis, &redis_server) {
        (Some(url), _) => url.clone(),
        (None, Some(s)) => s.url(),
        (None, None) => bail!("no Redis"),
    };
    let cql_node = match (&args.cql, &cql_server) {
        (Some(node), _) => node.clone(),
        (None, Some(s)) => s.addr().to_string(),
        (None, None) => bail!("no CQL server"),
    };
    let store = Arc::new(
        CqlStateStore::connect(CqlOptions {
            nodes: vec![cql_node.clone()],
            ..CqlOptions::default()
        })
        .await
        .context("connecting to the CQL server")?,
    );
    let redis = RedisCache::new(RedisOptions {
        urls: vec![redis_url.clone()],
        ..RedisOptions::default()
    })?;
    let cache: Arc<dyn Cache> = Arc::new(Timed(Arc::new(GuardedCache::new(
        Arc::new(redis),
        "redis",
        Duration::from_secs(1),
    ))));

    let keys = spate_conformance::zipf_keys(args.keys, args.zipf_s, args.events, 42);
    let mut distinct = keys.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let run_id = spate_conformance::unique_id();
    println!(
        "tier-bench: {} events over {} keys (Zipf s = {}; {} distinct keys drawn), {} lanes, {}-byte values",
        args.events,
        args.keys,
        args.zipf_s,
        distinct.len(),
        args.lanes,
        args.value_bytes
    );
    println!(
        "  store: CQL at {cql_node}{}; cache: Redis at {redis_url}{}",
        if cql_server.is_some() {
            " (local Apache Cassandra)"
        } else {
            ""
        },
        if redis_server.is_some() {
            " (local redis-server)"
        } else {
            ""
        }
    );
    println!("  each event: state get + state write of its key (read-modify-write)");

    let partitions = args
        .partitions
        .unwrap_or(if cql_server.is_some() { 100 } else { 1 });
    println!(
        "  keys spread over {partitions} namespace(s) (CQL partitions){}",
        if cql_server.is_some() {
            "; the in-process server answers a point read with the rest of the partition, \
             so store latencies here are its, not ScyllaDB's"
        } else {
            ""
        }
    );
    let direct_ns = format!("{run_id}-direct");
    let tiered_ns = format!("{run_id}-tiered");
    preload(
        store.as_ref(),
        &direct_ns,
        partitions,
        args.keys,
        args.value_bytes,
    )
    .await?;
    preload(
        store.as_ref(),
        &tiered_ns,
        partitions,
        args.keys,
        args.value_bytes,
    )
    .await?;

    let direct = StateTier::direct(store.clone());
    let without = run(
        direct.for_plugin("bench"),
        &direct,
        &direct_ns,
        partitions,
        &keys,
        args.lanes,
        args.value_bytes,
    )
    .await?;
    let tiered = StateTier::read_through(store.clone(), cache, ReadThroughConfig::default());
    let with = run(
        tiered.for_plugin("bench"),
        &tiered,
        &tiered_ns,
        partitions,
        &keys,
        args.lanes,
        args.value_bytes,
    )
    .await?;

    println!();
    println!(
        "{:<22} {:>12} {:>10} {:>12} {:>12} {:>12} {:>10}",
        "", "store reads", "hit rate", "p50/event", "p99/event", "p99.9/event", "events/s"
    );
    for (name, r) in [
        ("without the tier", &without),
        ("read-through (Redis)", &with),
    ] {
        let hit_rate = if r.stats.gets == 0 {
            0.0
        } else {
            r.stats.cache_hits as f64 / r.stats.gets as f64 * 100.0
        };
        println!(
            "{:<22} {:>12} {:>9.1}% {:>12?} {:>12?} {:>12?} {:>10.0}",
            name,
            r.stats.store_reads,
            hit_rate,
            pct(&r.event_nanos, 0.50),
            pct(&r.event_nanos, 0.99),
            pct(&r.event_nanos, 0.999),
            args.events as f64 / r.elapsed.as_secs_f64()
        );
    }
    let saved =
        100.0 * (1.0 - with.stats.store_reads as f64 / without.stats.store_reads.max(1) as f64);
    println!();
    println!(
        "store reads: {} -> {} ({saved:.1}% fewer)",
        without.stats.store_reads, with.stats.store_reads
    );
    println!(
        "Redis hop per event (time in cache calls: get, and set after each write): p50 {:?}, p99 {:?}, p99.9 {:?}",
        pct(&with.cache_nanos, 0.50),
        pct(&with.cache_nanos, 0.99),
        pct(&with.cache_nanos, 0.999)
    );
    println!(
        "per-event p99 with the tier minus without: {:+.3} ms (the store reads it saves are counted against the Redis hop)",
        (pct(&with.event_nanos, 0.99).as_secs_f64()
            - pct(&without.event_nanos, 0.99).as_secs_f64())
            * 1000.0
    );
    println!(
        "tier counters: {} gets, {} hits, {} misses ({} coalesced), {} cache errors",
        with.stats.gets,
        with.stats.cache_hits,
        with.stats.cache_misses,
        with.stats.coalesced,
        with.stats.cache_errors
    );
    Ok(())
}
