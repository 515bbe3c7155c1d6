//! The state contract: what every [`StateStore`] must do, as the embedded store defines it.
//!
//! Each case is a public async function taking a [`Ctx`]; [`crate::state_suite!`] turns
//! the groups a backend supports into one `#[tokio::test]` per case. Groups:
//!
//! - `basic`: get, put, overwrite, delete, batches, binary values, namespace isolation;
//! - `ttl`: expiry (whole seconds, since CQL counts TTLs in seconds);
//! - `scan`: prefix scans in byte order, limits, paging, namespace confinement;
//! - `ttl_scan`: scans skip expired values;
//! - `conditions`: compare-and-swap conditions, all-or-nothing batches, concurrency;
//! - `ttl_conditions`: an expired value is absent for a condition.
//!
//! Every case works in namespaces of its own ([`Ctx::ns`]), so suites can share one
//! long-lived server (a real ScyllaDB) between runs.

use spate_core::{ApplyOutcome, BackendError, StateStore, StateWrite};
use std::sync::Arc;
use std::time::Duration;

/// What a case gets: the store under test and a namespace scope unique to this run.
pub struct Ctx {
    /// The store under test.
    pub store: Arc<dyn StateStore>,
    run: String,
}

impl Ctx {
    /// A context over `store` with fresh namespaces.
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self {
            store,
            run: crate::unique_id(),
        }
    }

    /// The namespace this run uses for `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.run)
    }

    async fn get(&self, ns: &str, key: &str) -> Option<Vec<u8>> {
        self.store
            .get(ns, key)
            .await
            .unwrap_or_else(|e| panic!("get {ns}/{key}: {e}"))
    }

    async fn apply(&self, ns: &str, writes: &[StateWrite]) -> ApplyOutcome {
        self.store
            .apply(ns, writes)
            .await
            .unwrap_or_else(|e| panic!("apply to {ns}: {e}"))
    }

    async fn scan_keys(&self, ns: &str, prefix: &str, limit: u32) -> Vec<String> {
        self.scan(ns, prefix, limit)
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    async fn scan(&self, ns: &str, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        self.store
            .scan(ns, prefix, limit)
            .await
            .unwrap_or_else(|e| panic!("scan {ns}/{prefix}*: {e}"))
    }
}

/// A put of `value` (UTF-8) to `key`.
pub fn put(key: &str, value: &str) -> StateWrite {
    put_bytes(key, value.as_bytes().to_vec())
}

/// A put of raw bytes.
pub fn put_bytes(key: &str, value: Vec<u8>) -> StateWrite {
    StateWrite {
        key: key.into(),
        value: Some(value),
        ttl: None,
        condition: None,
    }
}

/// A put with a TTL.
pub fn put_ttl(key: &str, value: &str, ttl: Duration) -> StateWrite {
    StateWrite {
        ttl: Some(ttl),
        ..put(key, value)
    }
}

/// A delete.
pub fn delete(key: &str) -> StateWrite {
    StateWrite {
        key: key.into(),
        value: None,
        ttl: None,
        condition: None,
    }
}

/// `write`, applied only if the stored value is `expected` (`None` = absent).
pub fn when(mut write: StateWrite, expected: Option<&str>) -> StateWrite {
    write.condition = Some(expected.map(|v| v.as_bytes().to_vec()));
    write
}

fn val(v: &str) -> Option<Vec<u8>> {
    Some(v.as_bytes().to_vec())
}

/// The TTL of a value a case reads back (or checks a condition against) before it expires.
/// CQL counts TTLs in whole seconds from the coordinator's clock second, so such a value
/// may live up to a second less than its TTL; the read-back comes one or two round trips
/// after the write, which a loaded Cassandra can stretch past a second. (It was 2 s,
/// leaving as little as 1 s.)
const SHORT_TTL: Duration = Duration::from_secs(4);

/// How long a value with [`SHORT_TTL`] may take to disappear: CQL counts TTLs in whole
/// seconds from the coordinator's clock second, so allow one more.
const EXPIRED_AFTER: Duration = Duration::from_millis(5_300);

// ---- basic ------------------------------------------------------------------------

/// A key never written reads as `None`.
pub async fn get_missing_is_none(cx: Ctx) {
    let ns = cx.ns("a");
    assert_eq!(cx.get(&ns, "nothing").await, None);
}

/// A put is read back; a second put replaces it.
pub async fn put_then_get_and_overwrite(cx: Ctx) {
    let ns = cx.ns("a");
    assert_eq!(
        cx.apply(&ns, &[put("k", "v1")]).await,
        ApplyOutcome::Applied
    );
    assert_eq!(cx.get(&ns, "k").await, val("v1"));
    assert_eq!(
        cx.apply(&ns, &[put("k", "v2")]).await,
        ApplyOutcome::Applied
    );
    assert_eq!(cx.get(&ns, "k").await, val("v2"));
}

/// A delete removes the key; deleting an absent key succeeds.
pub async fn delete_removes_and_deleting_nothing_is_fine(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put("k", "v"), put("keep", "x")]).await;
    assert_eq!(cx.apply(&ns, &[delete("k")]).await, ApplyOutcome::Applied);
    assert_eq!(cx.get(&ns, "k").await, None);
    assert_eq!(cx.get(&ns, "keep").await, val("x"));
    assert_eq!(cx.apply(&ns, &[delete("k")]).await, ApplyOutcome::Applied);
    assert_eq!(
        cx.apply(&ns, &[delete("never-there")]).await,
        ApplyOutcome::Applied
    );
    // Written again after a delete.
    cx.apply(&ns, &[put("k", "back")]).await;
    assert_eq!(cx.get(&ns, "k").await, val("back"));
}

/// Keys that are prefixes of each other are distinct keys.
pub async fn keys_sharing_a_prefix_are_distinct(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put("ab", "long"), put("b", "next")]).await;
    assert_eq!(cx.get(&ns, "a").await, None, "`a` is not `ab`");
    assert_eq!(cx.get(&ns, "aa").await, None, "nor the key after it");
    assert_eq!(cx.get(&ns, "abc").await, None);
    cx.apply(&ns, &[put("a", "short")]).await;
    assert_eq!(cx.get(&ns, "a").await, val("short"));
    cx.apply(&ns, &[delete("a")]).await;
    assert_eq!(cx.get(&ns, "a").await, None);
    assert_eq!(cx.get(&ns, "ab").await, val("long"));
}

/// Namespaces never see each other's keys, even when one name is a prefix of another.
pub async fn namespaces_are_isolated(cx: Ctx) {
    let (a, ab) = (cx.ns("a"), cx.ns("ab"));
    cx.apply(&a, &[put("k", "in a"), put("only-a", "1")]).await;
    cx.apply(&ab, &[put("k", "in ab")]).await;
    assert_eq!(cx.get(&a, "k").await, val("in a"));
    assert_eq!(cx.get(&ab, "k").await, val("in ab"));
    assert_eq!(cx.get(&ab, "only-a").await, None);
    cx.apply(&ab, &[delete("k")]).await;
    assert_eq!(cx.get(&a, "k").await, val("in a"));
    assert_eq!(cx.get(&ab, "k").await, None);
}

/// Values are arbitrary bytes (empty is a value, not absence); keys are any text.
pub async fn values_are_bytes_and_keys_are_text(cx: Ctx) {
    let ns = cx.ns("a");
    let all_bytes: Vec<u8> = (0..=255).collect();
    let big: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
    cx.apply(
        &ns,
        &[
            put_bytes("empty", Vec::new()),
            put_bytes("bytes", all_bytes.clone()),
            put_bytes("big", big.clone()),
            put("ключ/🙂 with spaces:and;colons", "unicode"),
            put("\u{0}nul", "nul"),
        ],
    )
    .await;
    assert_eq!(cx.get(&ns, "empty").await, Some(Vec::new()));
    assert_eq!(cx.get(&ns, "bytes").await, Some(all_bytes));
    assert_eq!(cx.get(&ns, "big").await, Some(big));
    assert_eq!(
        cx.get(&ns, "ключ/🙂 with spaces:and;colons").await,
        val("unicode")
    );
    assert_eq!(cx.get(&ns, "\u{0}nul").await, val("nul"));
}

/// One batch applies all of its puts and deletes; an empty batch is a no-op.
pub async fn a_batch_applies_every_write(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put("gone", "x")]).await;
    let mut writes: Vec<StateWrite> = (0..20)
        .map(|i| put(&format!("k{i:02}"), &i.to_string()))
        .collect();
    writes.push(delete("gone"));
    assert_eq!(cx.apply(&ns, &writes).await, ApplyOutcome::Applied);
    for i in 0..20 {
        assert_eq!(cx.get(&ns, &format!("k{i:02}")).await, val(&i.to_string()));
    }
    assert_eq!(cx.get(&ns, "gone").await, None);
    assert_eq!(cx.apply(&ns, &[]).await, ApplyOutcome::Applied);
}

/// Concurrent batches to distinct keys all land.
pub async fn concurrent_batches_all_land(cx: Ctx) {
    let ns = cx.ns("a");
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let store = Arc::clone(&cx.store);
            let ns = ns.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let w = [put(&format!("t{t}/{i}"), &format!("{t}.{i}"))];
                    assert_eq!(
                        store.apply(&ns, &w).await.unwrap_or_else(|e| panic!("{e}")),
                        ApplyOutcome::Applied
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap_or_else(|e| panic!("task: {e}"));
    }
    for t in 0..16 {
        for i in 0..10 {
            assert_eq!(
                cx.get(&ns, &format!("t{t}/{i}")).await,
                val(&format!("{t}.{i}"))
            );
        }
    }
}

// ---- ttl --------------------------------------------------------------------------

/// A value with a TTL disappears after it; others stay; rewriting without a TTL makes a
/// value permanent.
pub async fn values_expire_after_their_ttl(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(
        &ns,
        &[
            put_ttl("short", "x", SHORT_TTL),
            put_ttl("long", "y", Duration::from_secs(3600)),
            put("forever", "z"),
            put_ttl("made-permanent", "1", SHORT_TTL),
        ],
    )
    .await;
    cx.apply(&ns, &[put("made-permanent", "2")]).await;
    assert_eq!(cx.get(&ns, "short").await, val("x"));
    tokio::time::sleep(EXPIRED_AFTER).await;
    assert_eq!(cx.get(&ns, "short").await, None);
    assert_eq!(cx.get(&ns, "long").await, val("y"));
    assert_eq!(cx.get(&ns, "forever").await, val("z"));
    assert_eq!(cx.get(&ns, "made-permanent").await, val("2"));
    // An expired key can be written again.
    cx.apply(&ns, &[put("short", "again")]).await;
    assert_eq!(cx.get(&ns, "short").await, val("again"));
}

/// A zero TTL means "expired at once": the write leaves the key absent.
pub async fn a_zero_ttl_write_is_absent(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put("k", "old")]).await;
    cx.apply(&ns, &[put_ttl("k", "new", Duration::ZERO)]).await;
    assert_eq!(cx.get(&ns, "k").await, None);
}

// ---- scan -------------------------------------------------------------------------

/// A scan returns the prefix's entries in key order, up to the limit.
pub async fn scan_returns_the_prefix_in_key_order_up_to_the_limit(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(
        &ns,
        &[
            put("user:3", "c"),
            put("user:1", "a"),
            put("user:2", "b"),
            put("order:1", "o"),
        ],
    )
    .await;
    assert_eq!(
        cx.scan(&ns, "user:", 10).await,
        vec![
            ("user:1".to_owned(), b"a".to_vec()),
            ("user:2".to_owned(), b"b".to_vec()),
            ("user:3".to_owned(), b"c".to_vec()),
        ]
    );
    assert_eq!(
        cx.scan_keys(&ns, "user:", 2).await,
        vec!["user:1", "user:2"]
    );
    assert_eq!(
        cx.scan_keys(&ns, "", 100).await,
        vec!["order:1", "user:1", "user:2", "user:3"]
    );
    assert!(cx.scan(&ns, "zzz", 10).await.is_empty());
    assert!(cx.scan(&ns, "user:", 0).await.is_empty());
}

/// Order is by the keys' UTF-8 bytes; the prefix matches exactly (no neighbours).
pub async fn scan_orders_by_bytes_and_matches_the_prefix_exactly(cx: Ctx) {
    let ns = cx.ns("a");
    let keys = [
        "user",
        "user:1",
        "user:Z",
        "user:a",
        "user:~",
        "user:é",
        "user:🙂",
        "user;",
        "usera",
        "use",
    ];
    let writes: Vec<StateWrite> = keys.iter().map(|k| put(k, k)).collect();
    cx.apply(&ns, &writes).await;
    assert_eq!(
        cx.scan_keys(&ns, "user:", 100).await,
        vec!["user:1", "user:Z", "user:a", "user:~", "user:é", "user:🙂"]
    );
    assert_eq!(
        cx.scan_keys(&ns, "user", 100).await,
        vec![
            "user",
            "user:1",
            "user:Z",
            "user:a",
            "user:~",
            "user:é",
            "user:🙂",
            "user;",
            "usera"
        ]
    );
    assert_eq!(cx.scan_keys(&ns, "user:é", 100).await, vec!["user:é"]);
}

/// Prefixes with more entries than a page are read through to the limit.
pub async fn scan_pages_through_large_prefixes(cx: Ctx) {
    let ns = cx.ns("a");
    let writes: Vec<StateWrite> = (0..2_500)
        .map(|i| put(&format!("p/{i:05}"), &i.to_string()))
        .collect();
    for chunk in writes.chunks(100) {
        cx.apply(&ns, chunk).await;
    }
    cx.apply(&ns, &[put("q/after", "x"), put("o/before", "x")])
        .await;
    let all = cx.scan(&ns, "p/", 10_000).await;
    assert_eq!(all.len(), 2_500);
    for (i, (k, v)) in all.iter().enumerate() {
        assert_eq!(k, &format!("p/{i:05}"));
        assert_eq!(v, &i.to_string().into_bytes());
    }
    let some = cx.scan_keys(&ns, "p/", 2_100).await;
    assert_eq!(some.len(), 2_100);
    assert_eq!(some.last().map(String::as_str), Some("p/02099"));
}

/// A scan never leaves its namespace, and deleted keys are gone from it.
pub async fn scan_is_confined_to_its_namespace_and_skips_deletes(cx: Ctx) {
    let (a, ab) = (cx.ns("a"), cx.ns("ab"));
    cx.apply(&a, &[put("k1", "1"), put("k2", "2"), put("k3", "3")])
        .await;
    cx.apply(&ab, &[put("k0", "other")]).await;
    cx.apply(&a, &[delete("k2")]).await;
    assert_eq!(cx.scan_keys(&a, "", 100).await, vec!["k1", "k3"]);
    assert_eq!(cx.scan_keys(&ab, "", 100).await, vec!["k0"]);
}

// ---- ttl_scan ---------------------------------------------------------------------

/// Expired values do not appear in scans.
pub async fn scan_skips_expired_values(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(
        &ns,
        &[
            put_ttl("s/short", "x", SHORT_TTL),
            put("s/forever", "z"),
            put_ttl("s/long", "y", Duration::from_secs(3600)),
        ],
    )
    .await;
    assert_eq!(cx.scan_keys(&ns, "s/", 10).await.len(), 3);
    tokio::time::sleep(EXPIRED_AFTER).await;
    assert_eq!(
        cx.scan_keys(&ns, "s/", 10).await,
        vec!["s/forever", "s/long"]
    );
}

// ---- conditions -------------------------------------------------------------------

/// "Must be absent" lets exactly one create through.
pub async fn a_condition_of_absence_creates_once(cx: Ctx) {
    let ns = cx.ns("a");
    assert_eq!(
        cx.apply(&ns, &[when(put("k", "first"), None)]).await,
        ApplyOutcome::Applied
    );
    assert_eq!(
        cx.apply(&ns, &[when(put("k", "second"), None)]).await,
        ApplyOutcome::Conflict { key: "k".into() }
    );
    assert_eq!(cx.get(&ns, "k").await, val("first"));
}

/// A condition on the value swaps only from that value.
pub async fn a_condition_on_the_value_swaps_once(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put("n", "1")]).await;
    assert_eq!(
        cx.apply(&ns, &[when(put("n", "2"), Some("1"))]).await,
        ApplyOutcome::Applied
    );
    assert_eq!(
        cx.apply(&ns, &[when(put("n", "3"), Some("1"))]).await,
        ApplyOutcome::Conflict { key: "n".into() }
    );
    assert_eq!(
        cx.apply(&ns, &[when(put("n", "3"), None)]).await,
        ApplyOutcome::Conflict { key: "n".into() }
    );
    assert_eq!(cx.get(&ns, "n").await, val("2"));
    // A condition on a value with a TTL, and a swap that sets one.
    assert_eq!(
        cx.apply(
            &ns,
            &[when(
                put_ttl("n", "4", Duration::from_secs(3600)),
                Some("2")
            )]
        )
        .await,
        ApplyOutcome::Applied
    );
    assert_eq!(cx.get(&ns, "n").await, val("4"));
}

/// A batch whose condition fails applies none of its writes.
pub async fn a_failed_condition_applies_nothing(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put("balance", "10"), put("other", "keep")])
        .await;
    let outcome = cx
        .apply(
            &ns,
            &[
                put("log", "debited"),
                when(put("balance", "5"), Some("11")),
                delete("other"),
            ],
        )
        .await;
    assert_eq!(
        outcome,
        ApplyOutcome::Conflict {
            key: "balance".into()
        }
    );
    assert_eq!(cx.get(&ns, "log").await, None);
    assert_eq!(cx.get(&ns, "balance").await, val("10"));
    assert_eq!(cx.get(&ns, "other").await, val("keep"));

    let outcome = cx
        .apply(
            &ns,
            &[
                put("log", "debited"),
                when(put("balance", "5"), Some("10")),
                when(put("created", "yes"), None),
                delete("other"),
            ],
        )
        .await;
    assert_eq!(outcome, ApplyOutcome::Applied);
    assert_eq!(cx.get(&ns, "log").await, val("debited"));
    assert_eq!(cx.get(&ns, "balance").await, val("5"));
    assert_eq!(cx.get(&ns, "created").await, val("yes"));
    assert_eq!(cx.get(&ns, "other").await, None);
}

/// Deletes can carry conditions too, including "must already be absent".
pub async fn conditional_deletes(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put("k", "v")]).await;
    assert_eq!(
        cx.apply(&ns, &[when(delete("k"), Some("other"))]).await,
        ApplyOutcome::Conflict { key: "k".into() }
    );
    assert_eq!(cx.get(&ns, "k").await, val("v"));
    assert_eq!(
        cx.apply(&ns, &[when(delete("k"), Some("v"))]).await,
        ApplyOutcome::Applied
    );
    assert_eq!(cx.get(&ns, "k").await, None);
    assert_eq!(
        cx.apply(&ns, &[when(delete("k"), None)]).await,
        ApplyOutcome::Applied
    );
    cx.apply(&ns, &[put("k", "again")]).await;
    assert_eq!(
        cx.apply(&ns, &[when(delete("k"), None)]).await,
        ApplyOutcome::Conflict { key: "k".into() }
    );
}

/// Concurrent read-compare-swap loops lose no increment.
pub async fn concurrent_compare_and_swap_loses_no_update(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put("n", "0")]).await;
    let (tasks, each) = (8u64, 5u64);
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let store = Arc::clone(&cx.store);
            let ns = ns.clone();
            tokio::spawn(async move {
                for _ in 0..each {
                    loop {
                        let cur = match store.get(&ns, "n").await {
                            Ok(Some(v)) => v,
                            Ok(None) => panic!("counter vanished"),
                            // Contention may time a transaction out; the dispatcher retries.
                            Err(BackendError::Unavailable(_)) => continue,
                            Err(e) => panic!("{e}"),
                        };
                        let n: u64 = String::from_utf8_lossy(&cur).parse().unwrap_or(0);
                        let w = StateWrite {
                            condition: Some(Some(cur)),
                            ..put("n", &(n + 1).to_string())
                        };
                        match store.apply(&ns, &[w]).await {
                            Ok(ApplyOutcome::Applied) => break,
                            Ok(ApplyOutcome::Conflict { .. }) => {}
                            Err(BackendError::Unavailable(_)) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap_or_else(|e| panic!("task: {e}"));
    }
    // An ambiguous timeout may have applied a swap the task then redid, so the count is
    // at least the total; without timeouts it is exact.
    let n: u64 = String::from_utf8_lossy(&cx.get(&ns, "n").await.unwrap_or_default())
        .parse()
        .unwrap_or(0);
    assert!(n >= tasks * each, "lost updates: {n} < {}", tasks * each);
}

// ---- ttl_conditions ---------------------------------------------------------------

/// An expired value counts as absent for a condition.
pub async fn an_expired_value_counts_as_absent_for_conditions(cx: Ctx) {
    let ns = cx.ns("a");
    cx.apply(&ns, &[put_ttl("k", "old", SHORT_TTL)]).await;
    assert_eq!(
        cx.apply(&ns, &[when(put("k", "new"), None)]).await,
        ApplyOutcome::Conflict { key: "k".into() }
    );
    tokio::time::sleep(EXPIRED_AFTER).await;
    assert_eq!(
        cx.apply(&ns, &[when(put("k", "new"), None)]).await,
        ApplyOutcome::Applied
    );
    assert_eq!(cx.get(&ns, "k").await, val("new"));
}

/// A checkpoint's writes and positions land together; the positions read back per
/// partition, a later checkpoint replaces them, and no scan or read of a guest's keys
/// ever sees them.
pub async fn a_checkpoint_holds_state_and_positions_together(cx: Ctx) {
    use spate_core::SourcePosition;
    let ns = cx.ns("ckpt");
    let pos = |partition, next, done: Vec<u64>| SourcePosition {
        group: "g".into(),
        topic: "in".into(),
        partition,
        next,
        done,
    };
    assert!(cx.store.checkpoints());
    assert_eq!(
        cx.store
            .source_position(&ns, "g", "in", 0)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
    cx.store
        .commit_checkpoint(
            &[(ns.clone(), vec![put("a", "1"), put("b", "2"), delete("c")])],
            &ns,
            &[pos(0, 10, vec![12, 15]), pos(1, 3, vec![])],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cx.get(&ns, "a").await, val("1"));
    assert_eq!(
        cx.store
            .source_position(&ns, "g", "in", 0)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(pos(0, 10, vec![12, 15]))
    );
    assert_eq!(
        cx.store
            .source_position(&ns, "g", "in", 1)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(pos(1, 3, vec![]))
    );
    assert_eq!(
        cx.store
            .source_position(&ns, "other", "in", 0)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
    // Positions only: a checkpoint of events that wrote nothing.
    cx.store
        .commit_checkpoint(&[], &ns, &[pos(0, 16, vec![])])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cx.store
            .source_position(&ns, "g", "in", 0)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(pos(0, 16, vec![]))
    );
    assert_eq!(cx.scan_keys(&ns, "", 100).await, vec!["a", "b"]);
}

/// Generates one `#[tokio::test]` per case of the named groups of the state contract.
///
/// `fixture` is an expression evaluated afresh in each test that yields a future of
/// `(Arc<dyn StateStore>, guard)`; the guard (a temporary directory, a server) lives until
/// the test ends. Attributes before `fixture` (say `#[ignore = "..."]`) go on every test.
///
/// ```ignore
/// spate_conformance::state_suite! {
///     fixture: async { (store, dir) },
///     groups: [basic, ttl, scan, ttl_scan, conditions, ttl_conditions],
/// }
/// ```
#[macro_export]
macro_rules! state_suite {
    ($(#[$attr:meta])* fixture: $fixture:expr, groups: [$($group:ident),* $(,)?] $(,)?) => {
        $crate::state_suite!(@groups [$(#[$attr])*] $fixture; $($group),*);
    };
    (@groups $attrs:tt $fixture:expr; $($group:ident),*) => {
        $( $crate::state_suite!(@group $group $attrs $fixture); )*
    };
    (@group basic $attrs:tt $fixture:expr) => {
        $crate::state_suite!(@cases $attrs $fixture;
            get_missing_is_none,
            put_then_get_and_overwrite,
            delete_removes_and_deleting_nothing_is_fine,
            keys_sharing_a_prefix_are_distinct,
            namespaces_are_isolated,
            values_are_bytes_and_keys_are_text,
            a_batch_applies_every_write,
            concurrent_batches_all_land,
        );
    };
    (@group ttl $attrs:tt $fixture:expr) => {
        $crate::state_suite!(@cases $attrs $fixture;
            values_expire_after_their_ttl,
            a_zero_ttl_write_is_absent,
        );
    };
    (@group scan $attrs:tt $fixture:expr) => {
        $crate::state_suite!(@cases $attrs $fixture;
            scan_returns_the_prefix_in_key_order_up_to_the_limit,
            scan_orders_by_bytes_and_matches_the_prefix_exactly,
            scan_pages_through_large_prefixes,
            scan_is_confined_to_its_namespace_and_skips_deletes,
        );
    };
    (@group ttl_scan $attrs:tt $fixture:expr) => {
        $crate::state_suite!(@cases $attrs $fixture; scan_skips_expired_values);
    };
    (@group conditions $attrs:tt $fixture:expr) => {
        $crate::state_suite!(@cases $attrs $fixture;
            a_condition_of_absence_creates_once,
            a_condition_on_the_value_swaps_once,
            a_failed_condition_applies_nothing,
            conditional_deletes,
            concurrent_compare_and_swap_loses_no_update,
        );
    };
    (@group checkpoints $attrs:tt $fixture:expr) => {
        $crate::state_suite!(@cases $attrs $fixture;
            a_checkpoint_holds_state_and_positions_together);
    };
    (@group ttl_conditions $attrs:tt $fixture:expr) => {
        $crate::state_suite!(@cases $attrs $fixture;
            an_expired_value_counts_as_absent_for_conditions);
    };
    (@cases $attrs:tt $fixture:expr; $($case:ident),* $(,)?) => {
        $( $crate::state_suite!(@case $attrs $fixture; $case); )*
    };
    (@case [$($attr:tt)*] $fixture:expr; $case:ident) => {
        $($attr)*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let (store, _guard) = $fixture.await;
            $crate::state::$case($crate::state::Ctx::new(store)).await;
        }
    };
}
