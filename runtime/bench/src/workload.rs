//! The events the bench appends: trivial keyed events, and realistic orders for the
//! `order-totals` example (with a few customer profiles seeded first); and the [`Job`] a
//! subject does with them, as far as the bench must know it: which inputs make an output,
//! and the count job's output itself (for its native twin and its rdkafka ceiling).
//!
//! Generation is deterministic (seeded) and done before any clock starts.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use spate_core::NewEvent;
use std::collections::HashMap;

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

/// What a subject does with each input, as far as the bench needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    /// One output per input (`trivial`, `order-totals`).
    OnePerInput,
    /// The count job (`plugins/count`): a per-key counter; the `every`th, 2·`every`th, ...
    /// input of a key emits [`counted`].
    Count {
        /// One output per this many inputs of a key.
        every: u64,
    },
}

impl Job {
    /// Whether each input makes an output, for `keys` in the order one producer sends
    /// them (per-key order is what the counter sees). Unkeyed inputs of the count job are
    /// rejected, so they make none.
    pub fn emits<'a>(&self, keys: impl IntoIterator<Item = Option<&'a [u8]>>) -> Vec<bool> {
        match *self {
            Self::OnePerInput => keys.into_iter().map(|_| true).collect(),
            Self::Count { every } => {
                let mut counts: HashMap<&[u8], u64> = HashMap::new();
                keys.into_iter()
                    .map(|key| {
                        key.is_some_and(|k| {
                            let n = counts.entry(k).or_insert(0);
                            *n += 1;
                            n.is_multiple_of(every.max(1))
                        })
                    })
                    .collect()
            }
        }
    }

    /// How many of `events` make an output.
    pub fn outputs(&self, events: &[NewEvent]) -> usize {
        self.emits(events.iter().map(|e| e.key.as_deref()))
            .into_iter()
            .filter(|e| *e)
            .count()
    }
}

/// The count job's output: `{"n":N,"v":<payload>}` with the payload copied verbatim. Fails
/// if the payload is not JSON.
pub fn counted(n: u64, payload: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(Serialize)]
    struct Counted<'a> {
        n: u64,
        v: &'a RawValue,
    }
    let v: &RawValue = serde_json::from_slice(payload)?;
    serde_json::to_vec(&Counted { n, v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_job_emits_every_nth_input_of_each_key() {
        let keys: Vec<Option<&[u8]>> = vec![
            Some(b"a"),
            Some(b"b"),
            Some(b"a"),
            None,
            Some(b"a"),
            Some(b"b"),
            Some(b"a"),
        ];
        assert_eq!(
            Job::Count { every: 2 }.emits(keys.clone()),
            [false, false, true, false, false, true, true]
        );
        assert!(Job::OnePerInput.emits(keys).into_iter().all(|e| e));
        // The bench's default: 100,000 inputs over 1,000 keys, 100 each, 10 outputs each.
        let events = Workload::Keyed { keys: 1000 }.events(100_000, "t", 1);
        assert_eq!(Job::Count { every: 10 }.outputs(&events), 10_000);
    }

    #[test]
    fn counted_copies_the_payload_and_refuses_what_is_not_json() {
        assert_eq!(
            counted(20, br#"{"seq": 7}"#).ok().as_deref(),
            Some(&br#"{"n":20,"v":{"seq": 7}}"#[..])
        );
        assert!(counted(1, b"not json").is_err());
    }
}
