//! The cache contract: what every [`Cache`] must do, as the in-process cache defines it.
//!
//! Keys arrive already prefixed by the host layer, so the contract has no namespaces; each
//! case still works under a key prefix of its own ([`CacheCtx::key`]) so suites may share a
//! server. [`crate::cache_suite!`] turns the groups into tests:
//!
//! - `basic`: get, set, overwrite, delete, binary values, distinct keys, counters;
//! - `ttl`: expiry, zero TTLs, and counters keeping (or not having) a TTL.

use spate_core::{BackendError, Cache};
use std::sync::Arc;
use std::time::Duration;

/// What a case gets: the cache under test and a key scope unique to this run.
pub struct CacheCtx {
    /// The cache under test.
    pub cache: Arc<dyn Cache>,
    run: String,
}

impl CacheCtx {
    /// A context over `cache` with fresh keys.
    pub fn new(cache: Arc<dyn Cache>) -> Self {
        Self {
            cache,
            run: crate::unique_id(),
        }
    }

    /// The full key this run uses for `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.run)
    }

    async fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.cache
            .get(&self.key(name))
            .await
            .unwrap_or_else(|e| panic!("get {name}: {e}"))
    }

    async fn set(&self, name: &str, value: &[u8], ttl: Duration) {
        self.cache
            .set(&self.key(name), value.to_vec(), ttl)
            .await
            .unwrap_or_else(|e| panic!("set {name}: {e}"));
    }

    async fn delete(&self, name: &str) {
        self.cache
            .delete(&self.key(name))
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }

    async fn incr(&self, name: &str, delta: i64) -> i64 {
        self.cache
            .incr(&self.key(name), delta)
            .await
            .unwrap_or_else(|e| panic!("incr {name}: {e}"))
    }
}

const LONG: Duration = Duration::from_secs(3600);

/// The TTL of a value a case reads back before it expires: one or more round trips after
/// the write, each of which may stall for hundreds of milliseconds on a loaded machine.
const SHORT: Duration = Duration::from_secs(2);

/// Long enough after a write with [`SHORT`] for the value to be gone.
const PAST_SHORT: Duration = Duration::from_millis(2_600);

/// A key never set reads as `None`.
pub async fn get_missing_is_none(cx: CacheCtx) {
    assert_eq!(cx.get("nothing").await, None);
}

/// Set, read back, overwrite, delete; deleting an absent key succeeds.
pub async fn set_get_overwrite_delete(cx: CacheCtx) {
    cx.set("k", b"v1", LONG).await;
    assert_eq!(cx.get("k").await, Some(b"v1".to_vec()));
    cx.set("k", b"v2", LONG).await;
    assert_eq!(cx.get("k").await, Some(b"v2".to_vec()));
    cx.delete("k").await;
    assert_eq!(cx.get("k").await, None);
    cx.delete("k").await;
}

/// Values are arbitrary bytes (empty is a value); keys sharing a prefix are distinct.
pub async fn values_are_bytes_and_keys_are_distinct(cx: CacheCtx) {
    let all: Vec<u8> = (0..=255).collect();
    let big: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
    cx.set("empty", b"", LONG).await;
    cx.set("bytes", &all, LONG).await;
    cx.set("big", &big, LONG).await;
    cx.set("ab", b"long", LONG).await;
    cx.set("ключ 🙂", b"unicode", LONG).await;
    assert_eq!(cx.get("empty").await, Some(Vec::new()));
    assert_eq!(cx.get("bytes").await, Some(all));
    assert_eq!(cx.get("big").await, Some(big));
    assert_eq!(cx.get("a").await, None);
    assert_eq!(cx.get("ab").await, Some(b"long".to_vec()));
    assert_eq!(cx.get("ключ 🙂").await, Some(b"unicode".to_vec()));
}

/// `incr` counts from zero, adds negative deltas, and works on a decimal value `set` wrote.
pub async fn incr_counts_from_missing_and_from_set_values(cx: CacheCtx) {
    assert_eq!(cx.incr("n", 5).await, 5);
    assert_eq!(cx.incr("n", -7).await, -2);
    assert_eq!(cx.get("n").await, Some(b"-2".to_vec()));
    cx.set("s", b"41", LONG).await;
    assert_eq!(cx.incr("s", 1).await, 42);
    assert_eq!(cx.get("s").await, Some(b"42".to_vec()));
    assert_eq!(cx.incr("zero", 0).await, 0);
}

/// `incr` of a value that is not a decimal integer, or past `i64`, is `Invalid` and
/// changes nothing.
pub async fn incr_refuses_non_integers_and_overflow(cx: CacheCtx) {
    cx.set("word", b"abc", LONG).await;
    match cx.cache.incr(&cx.key("word"), 1).await {
        Err(BackendError::Invalid(_)) => {}
        other => panic!("incr of a word: {other:?}"),
    }
    assert_eq!(cx.get("word").await, Some(b"abc".to_vec()));
    cx.set("max", i64::MAX.to_string().as_bytes(), LONG).await;
    match cx.cache.incr(&cx.key("max"), 1).await {
        Err(BackendError::Invalid(_)) => {}
        other => panic!("incr past i64::MAX: {other:?}"),
    }
    assert_eq!(cx.get("max").await, Some(i64::MAX.to_string().into_bytes()));
}

/// Concurrent increments all count.
pub async fn concurrent_increments_all_count(cx: CacheCtx) {
    let key = cx.key("hits");
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let cache = Arc::clone(&cx.cache);
            let key = key.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    cache
                        .incr(&key, 1)
                        .await
                        .unwrap_or_else(|e| panic!("incr: {e}"));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("task: {e}"));
    }
    assert_eq!(cx.get("hits").await, Some(b"800".to_vec()));
}

/// Values disappear after their TTL; a rewrite sets a new TTL.
pub async fn values_expire_after_their_ttl(cx: CacheCtx) {
    // `short` is read back after three more round trips, so its TTL is `SHORT`, not
    // 300 ms: a stall there could expire it before the presence check on a loaded machine.
    cx.set("short", b"x", SHORT).await;
    cx.set("long", b"y", LONG).await;
    cx.set("renewed", b"1", Duration::from_millis(300)).await;
    cx.set("renewed", b"2", LONG).await;
    assert_eq!(cx.get("short").await, Some(b"x".to_vec()));
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(cx.get("short").await, None);
    assert_eq!(cx.get("long").await, Some(b"y".to_vec()));
    assert_eq!(cx.get("renewed").await, Some(b"2".to_vec()));
    cx.set("long", b"z", Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(cx.get("long").await, None);
}

/// A zero TTL leaves nothing behind.
pub async fn a_zero_ttl_set_is_absent(cx: CacheCtx) {
    cx.set("k", b"old", LONG).await;
    cx.set("k", b"new", Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(cx.get("k").await, None);
}

/// `incr` keeps the TTL of the value it changes; a counter it creates never expires; an
/// expired counter starts again from zero.
pub async fn incr_keeps_an_existing_ttl_and_new_counters_persist(cx: CacheCtx) {
    // The `incr` must land before the TTL ends (a round trip later): `SHORT`, not 300 ms.
    cx.set("ttl", b"1", SHORT).await;
    assert_eq!(cx.incr("ttl", 1).await, 2);
    assert_eq!(cx.incr("counter", 1).await, 1);
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(cx.get("ttl").await, None);
    assert_eq!(cx.get("counter").await, Some(b"1".to_vec()));
    assert_eq!(cx.incr("ttl", 1).await, 1);
}

/// Generates one `#[tokio::test]` per case of the named groups of the cache contract;
/// `fixture` yields a future of `(Arc<dyn Cache>, guard)`, as in [`crate::state_suite!`].
#[macro_export]
macro_rules! cache_suite {
    ($(#[$attr:meta])* fixture: $fixture:expr, groups: [$($group:ident),* $(,)?] $(,)?) => {
        $crate::cache_suite!(@groups [$(#[$attr])*] $fixture; $($group),*);
    };
    (@groups $attrs:tt $fixture:expr; $($group:ident),*) => {
        $( $crate::cache_suite!(@group $group $attrs $fixture); )*
    };
    (@group basic $attrs:tt $fixture:expr) => {
        $crate::cache_suite!(@cases $attrs $fixture;
            get_missing_is_none,
            set_get_overwrite_delete,
            values_are_bytes_and_keys_are_distinct,
            incr_counts_from_missing_and_from_set_values,
            incr_refuses_non_integers_and_overflow,
            concurrent_increments_all_count,
        );
    };
    (@group ttl $attrs:tt $fixture:expr) => {
        $crate::cache_suite!(@cases $attrs $fixture;
            values_expire_after_their_ttl,
            a_zero_ttl_set_is_absent,
            incr_keeps_an_existing_ttl_and_new_counters_persist,
        );
    };
    (@cases $attrs:tt $fixture:expr; $($case:ident),* $(,)?) => {
        $( $crate::cache_suite!(@case $attrs $fixture; $case); )*
    };
    (@case [$($attr:tt)*] $fixture:expr; $case:ident) => {
        $($attr)*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let (cache, _guard) = $fixture.await;
            $crate::cache::$case($crate::cache::CacheCtx::new(cache)).await;
        }
    };
}
