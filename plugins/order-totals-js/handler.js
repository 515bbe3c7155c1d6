// Example Spate plugin in JavaScript, with the same behaviour as the Rust example
// plugins/order-totals: keeps each customer's running order totals in state, reads the
// customer's profile through the cache, and starts a `review-order` workflow the moment
// an order needs a human look.
//
// * `orders` (keyed by customer id): {"order_id", "customer_id", "amount_cents",
//   "currency"} updates `totals/<customer>`, emits `order-totals.updated` to
//   `customer-totals`, and starts `review-order` (run id = order id) when a rule fires.
// * `customers`: {"customer_id", "tier"} upserts `profile/<customer>` in state and
//   invalidates its cache entry.
//
// Malformed events are rejected (dead-lettered with the reason); they are never retried.

import { Reject, cache, emitJson, log, startWorkflowJson, state } from "spate";

/** One order at or above this amount is always reviewed. */
export const LARGE_ORDER_CENTS = 100_000;
/** A standard-tier customer whose running total crosses this is reviewed once. */
export const STANDARD_TOTAL_REVIEW_CENTS = 500_000;
/** Tier of customers without a profile. */
const DEFAULT_TIER = "standard";
/** How long a profile stays cached; an upsert invalidates the entry at once. */
const PROFILE_CACHE_TTL_MS = 60_000;
/** How long an order id is remembered, so a redelivered order is not counted twice. */
const SEEN_ORDER_TTL_MS = 7 * 24 * 3600 * 1000;
const TOTALS_TOPIC = "customer-totals";
const REVIEW_WORKFLOW = "review-order";

export function handle(event) {
  switch (event.topic) {
    case "orders":
      return onOrder(event);
    case "customers":
      return onCustomer(event);
    default:
      throw new Reject(`order-totals does not handle topic \`${event.topic}\``);
  }
}

function onOrder(event) {
  const order = parse(event, "Order", {
    order_id: "string",
    customer_id: "string",
    amount_cents: "uint",
    currency: "string",
  });
  requireNonEmpty("order_id", order.order_id);
  requireNonEmpty("customer_id", order.customer_id);
  const customer = order.customer_id;
  checkKey(event, customer);
  if (!/^[A-Z]{3}$/.test(order.currency)) {
    throw new Reject(`currency \`${order.currency}\` is not an ISO 4217 code like \`EUR\``);
  }

  // Delivery is at-least-once: after a crash an order can arrive again. State writes of
  // one call are atomic, so the marker and the totals are written together or not at all.
  const seen = `seen/${order.order_id}`;
  if (state.get(seen) !== undefined) {
    log.info(`order ${order.order_id} already counted; skipping`);
    return;
  }

  const totalsKey = `totals/${customer}`;
  const previous = state.getJson(totalsKey) ?? { order_count: 0, total_cents: 0, last_order_id: null };
  const before = previous.total_cents;
  const after = before + order.amount_cents;
  // JavaScript numbers are exact up to 2^53 - 1; beyond that a total would silently round.
  if (!Number.isSafeInteger(after)) throw new Reject(`total of ${customer} overflows`);
  const totals = {
    order_count: previous.order_count + 1,
    total_cents: after,
    last_order_id: order.order_id,
  };
  state.putJson(totalsKey, totals);
  state.put(seen, "1", { ttlMs: SEEN_ORDER_TTL_MS });

  const { tier } = profile(customer);
  const reasons = reviewReasons(order.amount_cents, tier, before, after);
  if (reasons.length > 0) {
    // The run id is the order id: a retried event cannot start a second review.
    startWorkflowJson(REVIEW_WORKFLOW, order.order_id, {
      order_id: order.order_id,
      customer_id: customer,
      amount_cents: order.amount_cents,
      currency: order.currency,
      tier,
      total_cents: after,
      reasons,
    });
  }
  emitJson(
    TOTALS_TOPIC,
    {
      type: "order-totals.updated",
      customer_id: customer,
      order_count: totals.order_count,
      total_cents: after,
      last_order_id: order.order_id,
      review: reasons.length > 0,
    },
    { key: customer },
  );
}

function onCustomer(event) {
  const update = parse(event, "CustomerUpdate", { customer_id: "string" }, { tier: "string" });
  requireNonEmpty("customer_id", update.customer_id);
  checkKey(event, update.customer_id);
  const tier = update.tier ?? DEFAULT_TIER;
  requireNonEmpty("tier", tier);
  const key = `profile/${update.customer_id}`;
  state.putJson(key, { tier });
  // The next order re-reads the profile from state and re-fills the cache.
  cache.delete(key);
}

/**
 * The customer's profile: from the cache, else from state (then cached), else the default
 * tier. A missing profile is not cached, so a first upsert is seen at once.
 */
function profile(customer) {
  const key = `profile/${customer}`;
  const cached = cache.getJson(key);
  if (typeof cached?.tier === "string") return cached;
  const stored = state.getJson(key);
  if (stored === undefined) return { tier: DEFAULT_TIER };
  if (typeof stored?.tier !== "string") throw new Reject(`state value at \`${key}\` is not a valid Profile`);
  cache.setJson(key, stored, { ttlMs: PROFILE_CACHE_TTL_MS });
  return stored;
}

/** Why an order needs review; empty if it does not. */
export function reviewReasons(amount, tier, totalBefore, totalAfter) {
  const reasons = [];
  if (amount >= LARGE_ORDER_CENTS) reasons.push("large-order");
  if (tier === DEFAULT_TIER && totalBefore < STANDARD_TOTAL_REVIEW_CENTS && totalAfter >= STANDARD_TOTAL_REVIEW_CENTS) {
    reasons.push("standard-tier-total-crossed");
  }
  return reasons;
}

/**
 * The payload as an object with `fields` of the given types ("string", or "uint": a
 * non-negative safe integer); rejects the event with the first problem, like the Rust
 * example's serde types.
 */
function parse(event, what, fields, optional = {}) {
  const value = event.json();
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Reject(`event payload is not a valid ${what}: expected an object`);
  }
  for (const [name, type] of [...Object.entries(fields), ...Object.entries(optional)]) {
    const v = value[name];
    if (v === undefined || v === null) {
      if (name in fields) throw new Reject(`event payload is not a valid ${what}: missing field \`${name}\``);
      delete value[name];
      continue;
    }
    const ok = type === "uint" ? Number.isSafeInteger(v) && v >= 0 : typeof v === type;
    if (!ok) {
      const expected = type === "uint" ? "an unsigned integer" : "a string";
      throw new Reject(
        `event payload is not a valid ${what}: field \`${name}\` must be ${expected}, got ${JSON.stringify(v)}`,
      );
    }
  }
  return value;
}

function requireNonEmpty(field, value) {
  if (value.trim() === "") throw new Reject(`field \`${field}\` must not be empty`);
}

/** Events are keyed by customer id; a different key would break per-customer order. */
function checkKey(event, customer) {
  if (event.key !== undefined && event.keyString !== customer) {
    throw new Reject(
      `event key \`${new TextDecoder().decode(event.key)}\` does not match customer_id \`${customer}\``,
    );
  }
}
