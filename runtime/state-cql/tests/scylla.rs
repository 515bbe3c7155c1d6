//! The full state conformance suite — every group, lightweight transactions included —
//! against a real ScyllaDB or Cassandra named by `SPATE_TEST_CQL=host:port`.
//!
//! No such server can run on the build machines, so these tests are `#[ignore]`d; run them
//! with one (for example from `deploy/compose/`):
//!
//! ```sh
//! docker compose -f deploy/compose/compose.yaml up -d scylla
//! SPATE_TEST_CQL=127.0.0.1:9042 cargo test -p spate-state-cql --test scylla -- --ignored
//! ```
//!
//! Each case works in namespaces of its own, in the keyspace `spate_conformance`, so runs
//! never see each other's data.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use spate_core::backend::StateStore;
use spate_core::embedded::MokaCache;
use spate_core::tiered::{ReadThroughConfig, StateTier};
use spate_state_cql::{CqlOptions, CqlStateStore};
use std::sync::Arc;

const HOW: &str = "set SPATE_TEST_CQL=host:port to a ScyllaDB or Cassandra node, e.g. \
    `docker compose -f deploy/compose/compose.yaml up -d scylla` then \
    `SPATE_TEST_CQL=127.0.0.1:9042 cargo test -p spate-state-cql --test scylla -- --ignored`";

async fn scylla() -> (Arc<dyn StateStore>, ()) {
    let node = std::env::var("SPATE_TEST_CQL").unwrap_or_else(|_| panic!("{HOW}"));
    let store = CqlStateStore::connect(CqlOptions {
        nodes: vec![node],
        keyspace: "spate_conformance".into(),
        ..CqlOptions::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let f = store.features();
    assert!(f.ttl && f.ttl_read && f.scan && f.conditions, "{f:?}");
    (Arc::new(store), ())
}

async fn scylla_read_through() -> (Arc<dyn StateStore>, ()) {
    let (store, ()) = scylla().await;
    let tier = StateTier::read_through(
        store,
        Arc::new(MokaCache::default()),
        ReadThroughConfig::default(),
    );
    (tier.for_plugin("conformance"), ())
}

mod cql {
    use super::*;
    spate_conformance::state_suite! {
        #[ignore = "needs a real ScyllaDB/Cassandra: SPATE_TEST_CQL=host:port cargo test -p spate-state-cql --test scylla -- --ignored"]
        fixture: scylla(),
        groups: [basic, ttl, scan, ttl_scan, conditions, ttl_conditions],
    }
}

mod cql_read_through {
    use super::*;
    spate_conformance::state_suite! {
        #[ignore = "needs a real ScyllaDB/Cassandra: SPATE_TEST_CQL=host:port cargo test -p spate-state-cql --test scylla -- --ignored"]
        fixture: scylla_read_through(),
        groups: [basic, ttl, scan, ttl_scan, conditions, ttl_conditions],
    }
}
