//! The events the bench appends: trivial keyed events, and realistic orders for the
//! `order-totals` example (with a few customer profiles seeded first).
//!
//! Generation is deterministic (seeded) and done before any clock starts.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use spate_core::NewEvent;

/// Topic the `order-totals` plugin reads profiles from.
pub const CUSTOMERS_TOPIC: &str = "customers";

/// What a run appends to its handler's input topic.
#[derive(Clone, Debug)]
pub enum Workload {
    /// `{"seq": n}` keyed `k-<n mod keys>`.
    Keyed {
        /// Distinct keys (key lanes).
        keys: u32,
    },
    /// Orders `{"order_id", "customer_id", "amount_cents", "currency", "seq"}` keyed by
    /// customer `c-<i>`, about 2% of them large enough to start a review workflow.
    Orders {
        /// Distinct customers (key lanes).
        customers: u32,
    },
}

impl Workload {
    /// Distinct keys the workload uses.
    pub fn keys(&self) -> u32 {
        match self {
            Self::Keyed { keys } => *keys,
            Self::Orders { customers } => *customers,
        }
    }

    /// `n` input events. `run` keeps order ids unique per run.
    pub fn events(&self, n: usize, run: &str, seed: u64) -> Vec<NewEvent> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|seq| match self {
                Self::Keyed { keys } => NewEvent {
                    key: Some(format!("k-{}", seq as u64 % u64::from((*keys).max(1))).into_bytes()),
                    payload: json!({ "seq": seq }).to_string().into_bytes(),
                    headers: Vec::new(),
                },
                Self::Orders { customers } => {
                    let customer = format!("c-{}", rng.random_range(0..(*customers).max(1)));
                    let amount_cents: u64 = if rng.random_bool(0.02) {
                        rng.random_range(100_000..250_000)
                    } else {
                        rng.random_range(500..60_000)
                    };
                    let payload = json!({
                        "order_id": format!("o-{run}-{seq}"),
                        "customer_id": customer,
                        "amount_cents": amount_cents,
                        "currency": "EUR",
                        "seq": seq,
                    });
                    NewEvent {
                        key: Some(customer.into_bytes()),
                        payload: payload.to_string().into_bytes(),
                        headers: Vec::new(),
                    }
                }
            })
            .collect()
    }

    /// Events to append (topic, event) before measuring: profiles for a quarter of the
    /// customers (gold and silver); the rest default to the standard tier.
    pub fn seed_events(&self) -> Vec<(String, NewEvent)> {
        match self {
            Self::Keyed { .. } => Vec::new(),
            Self::Orders { customers } => (0..customers.div_ceil(4))
                .map(|i| {
                    let customer = format!("c-{i}");
                    let tier = if i % 2 == 0 { "gold" } else { "silver" };
                    let payload = json!({ "customer_id": customer, "tier": tier });
                    (
                        CUSTOMERS_TOPIC.to_string(),
                        NewEvent {
                            key: Some(customer.into_bytes()),
                            payload: payload.to_string().into_bytes(),
                            headers: Vec::new(),
                        },
                    )
                })
                .collect(),
        }
    }
}
