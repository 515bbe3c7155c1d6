//! The backend conformance suites against the embedded backends — the `redb` state store
//! and the in-process `moka` cache — and against the read-through tier composed of them.
//! Every group of cases runs: these backends define the contracts.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use spate_core::cache::GuardedCache;
use spate_core::state::tiered::{ReadThroughConfig, StateTier, WritePolicy};
use spate_core::{Cache, StateStore};
use spate_core::{cache::MokaCache, state::EmbeddedStateStore};
use std::sync::Arc;
use std::time::Duration;

async fn embedded() -> (Arc<dyn StateStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStateStore::open(dir.path()).unwrap();
    (store, dir)
}

async fn tier(policy: WritePolicy) -> (Arc<dyn StateStore>, tempfile::TempDir) {
    let (store, dir) = embedded().await;
    let config = ReadThroughConfig {
        on_write: policy,
        ..ReadThroughConfig::default()
    };
    let tier = StateTier::read_through(store, Arc::new(MokaCache::default()), config);
    (tier.for_plugin("conformance"), dir)
}

async fn moka() -> (Arc<dyn Cache>, ()) {
    (Arc::new(MokaCache::default()), ())
}

async fn guarded_moka() -> (Arc<dyn Cache>, ()) {
    let guard = GuardedCache::new(
        Arc::new(MokaCache::default()),
        "conformance",
        Duration::from_secs(1),
    );
    (Arc::new(guard), ())
}

mod embedded_state {
    use super::*;
    spate_conformance::state_suite! {
        fixture: embedded(),
        groups: [basic, ttl, scan, ttl_scan, conditions, ttl_conditions, checkpoints],
    }
}

mod read_through_update {
    use super::*;
    spate_conformance::state_suite! {
        fixture: tier(WritePolicy::Update),
        groups: [basic, ttl, scan, ttl_scan, conditions, ttl_conditions],
    }
}

mod read_through_invalidate {
    use super::*;
    spate_conformance::state_suite! {
        fixture: tier(WritePolicy::Invalidate),
        groups: [basic, ttl, conditions, ttl_conditions],
    }
}

mod in_process_cache {
    use super::*;
    spate_conformance::cache_suite! {
        fixture: moka(),
        groups: [basic, ttl],
    }
}

mod guarded_in_process_cache {
    use super::*;
    spate_conformance::cache_suite! {
        fixture: guarded_moka(),
        groups: [basic, ttl],
    }
}
