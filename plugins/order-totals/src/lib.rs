//! Example Spate plugin: keeps each customer's running order totals in state, reads the
//! customer's profile through the cache, and starts a `review-order` workflow the
//! moment an order needs a human look, instead of a batch job finding it minutes later.
//!
//! * `orders` (keyed by customer id): `{"order_id", "customer_id", "amount_cents",
//!   "currency"}` updates `totals/<customer>`, emits `order-totals.updated` to
//!   `customer-totals`, and starts `review-order` (run id = order id) when a rule fires.
//! * `customers`: `{"customer_id", "tier"}` upserts `profile/<customer>` in state and
//!   invalidates its cache entry.
//!
//! Malformed events are rejected (dead-lettered with the reason); they are never retried.

use serde::{Deserialize, Serialize};
use spate_sdk::{Event, Handler, HandlerError, Outcome, ResultExt, cache, emit, state};
use std::time::Duration;

/// One order at or above this amount is always reviewed.
const LARGE_ORDER_CENTS: u64 = 100_000;
/// A standard-tier customer whose running total crosses this is reviewed once.
const STANDARD_TOTAL_REVIEW_CENTS: u64 = 500_000;
/// Tier of customers without a profile.
const DEFAULT_TIER: &str = "standard";
/// How long a profile stays cached. An upsert invalidates the entry at once; the TTL
/// bounds staleness when an order and an upsert of the same customer race.
const PROFILE_CACHE_TTL: Duration = Duration::from_secs(60);
/// How long an order id is remembered, so a redelivered order is not counted twice.
const SEEN_ORDER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Topic of the per-order totals update.
const TOTALS_TOPIC: &str = "customer-totals";
/// Workflow started for orders that need review.
const REVIEW_WORKFLOW: &str = "review-order";

/// An event on `orders`.
#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    customer_id: String,
    amount_cents: u64,
    currency: String,
}

/// An event on `customers`.
#[derive(Debug, Deserialize)]
struct CustomerUpdate {
    customer_id: String,
    #[serde(default)]
    tier: Option<String>,
}

/// `profile/<customer>` in state and in the cache.
#[derive(Debug, Serialize, Deserialize)]
struct Profile {
    tier: String,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            tier: DEFAULT_TIER.to_owned(),
        }
    }
}

/// `totals/<customer>` in state.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Totals {
    order_count: u64,
    total_cents: u64,
    last_order_id: Option<String>,
}

/// Payload emitted to `customer-totals` for every counted order.
#[derive(Serialize)]
struct TotalsUpdated<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    customer_id: &'a str,
    order_count: u64,
    total_cents: u64,
    last_order_id: &'a str,
    review: bool,
}

/// Input of the `review-order` workflow.
#[derive(Serialize)]
struct ReviewInput<'a> {
    order_id: &'a str,
    customer_id: &'a str,
    amount_cents: u64,
    currency: &'a str,
    tier: &'a str,
    total_cents: u64,
    reasons: Vec<&'static str>,
}

struct OrderTotals;

impl Handler for OrderTotals {
    fn handle(event: Event) -> Outcome {
        match event.topic() {
            "orders" => on_order(&event),
            "customers" => on_customer(&event),
            other => Err(HandlerError::reject(format!(
                "order-totals does not handle topic `{other}`"
            ))),
        }
    }
}

spate_sdk::export_handler!(OrderTotals);

fn on_order(event: &Event) -> Outcome {
    let order: Order = event.json()?;
    require("order_id", &order.order_id)?;
    require("customer_id", &order.customer_id)?;
    check_key(event, &order.customer_id)?;
    if order.currency.len() != 3 || !order.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HandlerError::reject(format!(
            "currency `{}` is not an ISO 4217 code like `EUR`",
            order.currency
        )));
    }

    // Delivery is at-least-once: after a crash an order can arrive again. State writes of
    // one call are atomic, so the marker and the totals are written together or not at all.
    let seen = format!("seen/{}", order.order_id);
    if state::get(&seen).is_some() {
        spate_sdk::info!("order {} already counted; skipping", order.order_id);
        return Ok(());
    }

    let totals_key = format!("totals/{}", order.customer_id);
    let mut totals: Totals = state::get_json(&totals_key)?.unwrap_or_default();
    let before = totals.total_cents;
    totals.total_cents = before
        .checked_add(order.amount_cents)
        .or_reject(format!("total of {} overflows", order.customer_id))?;
    totals.order_count += 1;
    totals.last_order_id = Some(order.order_id.clone());
    state::put_json(&totals_key, &totals)?;
    state::put_with_ttl(&seen, b"1", SEEN_ORDER_TTL);

    let profile = profile(&order.customer_id)?;
    let reasons = review_reasons(
        order.amount_cents,
        &profile.tier,
        before,
        totals.total_cents,
    );
    let review = !reasons.is_empty();
    if review {
        // The run id is the order id: a retried event cannot start a second review.
        emit::start_workflow_json(
            REVIEW_WORKFLOW,
            &order.order_id,
            &ReviewInput {
                order_id: &order.order_id,
                customer_id: &order.customer_id,
                amount_cents: order.amount_cents,
                currency: &order.currency,
                tier: &profile.tier,
                total_cents: totals.total_cents,
                reasons,
            },
        )?;
    }

    emit::emit_json(
        TOTALS_TOPIC,
        order.customer_id.as_str(),
        &TotalsUpdated {
            kind: "order-totals.updated",
            customer_id: &order.customer_id,
            order_count: totals.order_count,
            total_cents: totals.total_cents,
            last_order_id: &order.order_id,
            review,
        },
    )
}

fn on_customer(event: &Event) -> Outcome {
    let update: CustomerUpdate = event.json()?;
    require("customer_id", &update.customer_id)?;
    check_key(event, &update.customer_id)?;
    let profile = Profile {
        tier: update.tier.unwrap_or_else(|| DEFAULT_TIER.to_owned()),
    };
    require("tier", &profile.tier)?;
    let key = format!("profile/{}", update.customer_id);
    state::put_json(&key, &profile)?;
    // The next order re-reads the profile from state and re-fills the cache.
    cache::delete(&key);
    Ok(())
}

/// The customer's profile: from the cache, else from state (then cached), else the
/// default tier.
///
/// A missing profile is not cached: `orders` and `customers` are different topics, so an
/// order can read "no profile" while the customer's first upsert commits, and a cached
/// default would then hide the new tier until it expired.
fn profile(customer: &str) -> Result<Profile, HandlerError> {
    let key = format!("profile/{customer}");
    if let Some(profile) = cache::get_json(&key) {
        return Ok(profile);
    }
    match state::get_json::<Profile>(&key)? {
        Some(profile) => {
            cache::set_json(&key, &profile, PROFILE_CACHE_TTL)?;
            Ok(profile)
        }
        None => Ok(Profile::default()),
    }
}

/// Why an order needs review; empty if it does not.
fn review_reasons(
    amount: u64,
    tier: &str,
    total_before: u64,
    total_after: u64,
) -> Vec<&'static str> {
    let mut reasons = Vec::new();
    if amount >= LARGE_ORDER_CENTS {
        reasons.push("large-order");
    }
    if tier == DEFAULT_TIER
        && total_before < STANDARD_TOTAL_REVIEW_CENTS
        && total_after >= STANDARD_TOTAL_REVIEW_CENTS
    {
        reasons.push("standard-tier-total-crossed");
    }
    reasons
}

fn require(field: &str, value: &str) -> Outcome {
    if value.trim().is_empty() {
        return Err(HandlerError::reject(format!(
            "field `{field}` must not be empty"
        )));
    }
    Ok(())
}

/// Events are keyed by customer id; a different key would break per-customer ordering.
fn check_key(event: &Event, customer: &str) -> Outcome {
    match event.key() {
        None => Ok(()),
        Some(k) if k == customer.as_bytes() => Ok(()),
        Some(k) => Err(HandlerError::reject(format!(
            "event key `{}` does not match customer_id `{customer}`",
            String::from_utf8_lossy(k)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_orders_are_reviewed_for_every_tier() {
        assert_eq!(review_reasons(100_000, "gold", 0, 100_000), ["large-order"]);
        assert!(review_reasons(99_999, "gold", 0, 99_999).is_empty());
    }

    #[test]
    fn standard_tier_is_reviewed_once_when_the_total_crosses() {
        let r = review_reasons(60_000, "standard", 450_000, 510_000);
        assert_eq!(r, ["standard-tier-total-crossed"]);
        assert!(review_reasons(60_000, "standard", 510_000, 570_000).is_empty());
        assert!(review_reasons(60_000, "gold", 450_000, 510_000).is_empty());
        assert_eq!(
            review_reasons(150_000, "standard", 400_000, 550_000),
            ["large-order", "standard-tier-total-crossed"]
        );
    }

    #[test]
    fn bad_orders_reject_with_the_missing_field() {
        let ev = Event::new(
            "orders",
            r#"{"order_id":"o-1","customer_id":"c-1","currency":"EUR"}"#,
        );
        let err = on_order(&ev)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("missing field `amount_cents`"), "{err}");
        let ev = Event::new("orders", "not json");
        assert!(on_order(&ev).is_err_and(|e| e.is_reject()));
    }
}
