"""Example Spate plugin in Python, with the same behaviour as the Rust example
``plugins/order-totals``: keeps each customer's running order totals in state, reads the
customer's profile through the cache, and starts a ``review-order`` workflow the moment
an order needs a human look.

* ``orders`` (keyed by customer id): ``{"order_id", "customer_id", "amount_cents",
  "currency"}`` updates ``totals/<customer>``, emits ``order-totals.updated`` to
  ``customer-totals``, and starts ``review-order`` (run id = order id) when a rule fires.
* ``customers``: ``{"customer_id", "tier"}`` upserts ``profile/<customer>`` in state and
  invalidates its cache entry.

Malformed events are rejected (dead-lettered with the reason); they are never retried.
"""

import spate
from spate import Event, Reject, cache, state

#: One order at or above this amount is always reviewed.
LARGE_ORDER_CENTS = 100_000
#: A standard-tier customer whose running total crosses this is reviewed once.
STANDARD_TOTAL_REVIEW_CENTS = 500_000
#: Tier of customers without a profile.
DEFAULT_TIER = "standard"
#: How long a profile stays cached; an upsert invalidates the entry at once.
PROFILE_CACHE_TTL_MS = 60_000
#: How long an order id is remembered, so a redelivered order is not counted twice.
SEEN_ORDER_TTL_MS = 7 * 24 * 3600 * 1000
TOTALS_TOPIC = "customer-totals"
REVIEW_WORKFLOW = "review-order"
#: Totals are unsigned 64-bit in every language's version of this plugin.
U64_MAX = 2**64 - 1


def handle(event: Event) -> None:
    if event.topic == "orders":
        on_order(event)
    elif event.topic == "customers":
        on_customer(event)
    else:
        raise Reject(f"order-totals does not handle topic `{event.topic}`")


def on_order(event: Event) -> None:
    order = parse(
        event,
        "Order",
        {"order_id": str, "customer_id": str, "amount_cents": int, "currency": str},
    )
    require("order_id", order["order_id"])
    require("customer_id", order["customer_id"])
    customer = order["customer_id"]
    check_key(event, customer)
    currency = order["currency"]
    if len(currency) != 3 or not all("A" <= c <= "Z" for c in currency):
        raise Reject(f"currency `{currency}` is not an ISO 4217 code like `EUR`")

    # Delivery is at-least-once: after a crash an order can arrive again. State writes of
    # one call are atomic, so the marker and the totals are written together or not at all.
    seen = f"seen/{order['order_id']}"
    if state.get(seen) is not None:
        spate.log.info(f"order {order['order_id']} already counted; skipping")
        return

    totals_key = f"totals/{customer}"
    totals = state.get_json(totals_key) or {"order_count": 0, "total_cents": 0, "last_order_id": None}
    before = totals["total_cents"]
    after = before + order["amount_cents"]
    if after > U64_MAX:
        raise Reject(f"total of {customer} overflows")
    totals = {
        "order_count": totals["order_count"] + 1,
        "total_cents": after,
        "last_order_id": order["order_id"],
    }
    state.put_json(totals_key, totals)
    state.put(seen, b"1", ttl_ms=SEEN_ORDER_TTL_MS)

    tier = profile(customer)["tier"]
    reasons = review_reasons(order["amount_cents"], tier, before, after)
    if reasons:
        # The run id is the order id: a retried event cannot start a second review.
        spate.start_workflow_json(
            REVIEW_WORKFLOW,
            order["order_id"],
            {
                "order_id": order["order_id"],
                "customer_id": customer,
                "amount_cents": order["amount_cents"],
                "currency": currency,
                "tier": tier,
                "total_cents": after,
                "reasons": reasons,
            },
        )
    spate.emit_json(
        TOTALS_TOPIC,
        {
            "type": "order-totals.updated",
            "customer_id": customer,
            "order_count": totals["order_count"],
            "total_cents": after,
            "last_order_id": order["order_id"],
            "review": bool(reasons),
        },
        key=customer,
    )


def on_customer(event: Event) -> None:
    update = parse(event, "CustomerUpdate", {"customer_id": str}, optional={"tier": str})
    require("customer_id", update["customer_id"])
    check_key(event, update["customer_id"])
    tier = update.get("tier")
    if tier is None:
        tier = DEFAULT_TIER
    require("tier", tier)
    key = f"profile/{update['customer_id']}"
    state.put_json(key, {"tier": tier})
    # The next order re-reads the profile from state and re-fills the cache.
    cache.delete(key)


def profile(customer: str) -> dict:
    """The customer's profile: from the cache, else from state (then cached), else the
    default tier. A missing profile is not cached, so a first upsert is seen at once."""
    key = f"profile/{customer}"
    cached = cache.get_json(key)
    if isinstance(cached, dict) and isinstance(cached.get("tier"), str):
        return cached
    stored = state.get_json(key)
    if stored is None:
        return {"tier": DEFAULT_TIER}
    if not isinstance(stored, dict) or not isinstance(stored.get("tier"), str):
        raise Reject(f"state value at `{key}` is not a valid Profile")
    cache.set_json(key, stored, PROFILE_CACHE_TTL_MS)
    return stored


def review_reasons(amount: int, tier: str, total_before: int, total_after: int) -> list:
    """Why an order needs review; empty if it does not."""
    reasons = []
    if amount >= LARGE_ORDER_CENTS:
        reasons.append("large-order")
    if tier == DEFAULT_TIER and total_before < STANDARD_TOTAL_REVIEW_CENTS <= total_after:
        reasons.append("standard-tier-total-crossed")
    return reasons


def parse(event: Event, what: str, fields: dict, optional: dict = None) -> dict:
    """The payload as an object with ``fields`` of the given types (ints unsigned 64-bit);
    rejects the event with the first problem, like the Rust example's serde types."""
    value = event.json()
    if not isinstance(value, dict):
        raise Reject(f"event payload is not a valid {what}: expected an object")
    for name, typ in list(fields.items()) + list((optional or {}).items()):
        if name not in value or value[name] is None:
            if name in fields:
                raise Reject(f"event payload is not a valid {what}: missing field `{name}`")
            continue
        v = value[name]
        ok = (
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U64_MAX
            if typ is int
            else isinstance(v, typ)
        )
        if not ok:
            expected = "an unsigned integer" if typ is int else "a string"
            raise Reject(
                f"event payload is not a valid {what}: field `{name}` must be {expected}, got {v!r}"
            )
    return value


def require(field: str, value: str) -> None:
    if not value.strip():
        raise Reject(f"field `{field}` must not be empty")


def check_key(event: Event, customer: str) -> None:
    """Events are keyed by customer id; a different key would break per-customer order."""
    if event.key is not None and event.key != customer.encode():
        raise Reject(
            f"event key `{event.key.decode('utf-8', 'replace')}` does not match customer_id `{customer}`"
        )
