/**
 * JavaScript guest SDK for Spate plugins.
 *
 * A thin, idiomatic layer over the bindings that ComponentizeJS generates from the
 * repository's `wit/spate.wit` (the `spate:plugin/event-handler` world) when a handler is
 * built; this module keeps no copy of the contract. Handlers import it as `spate`:
 *
 * ```js
 * import { Reject, emitJson, state } from "spate";
 *
 * export function handle(event) {
 *   const order = event.json(); // invalid JSON rejects the event
 *   if (typeof order.order_id !== "string") throw new Reject("order without order_id");
 *   const key = `count/${event.keyString}`;
 *   const n = (state.getJson(key) ?? 0) + 1;
 *   state.putJson(key, n);
 *   emitJson("counts", { key: event.keyString, n }, { key: event.key });
 * }
 * ```
 *
 * Outcomes: returning applies the call's state writes, cache writes and emits together;
 * `throw new Retry(reason)` discards them and retries the event later with backoff (up to
 * the manifest's `retry.max-attempts`, then the dead-letter topic); `throw new
 * Reject(reason)` discards them and dead-letters the event at once. Any other exception
 * traps the instance like a Rust panic: it counts as a retryable failure, and its stack
 * goes into the dead-letter reason.
 *
 * Capability checks, limits and the effect journal are the host's, not this module's.
 *
 * @module spate
 */

import * as host_state from "spate:plugin/state@0.1.0";
import * as host_cache from "spate:plugin/cache@0.1.0";
import * as host_emit from "spate:plugin/emit@0.1.0";
import * as host_log from "spate:plugin/log@0.1.0";

/** Header carrying the 1-based attempt number of this invocation. */
export const ATTEMPT_HEADER = "spate-attempt";

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });
const lossyDecoder = new TextDecoder("utf-8");

/**
 * A transient failure: the runtime retries the event with backoff, up to the plugin's
 * retry limit, then dead-letters it with `reason`.
 */
export class Retry extends Error {
  /** @param {string} reason */
  constructor(reason) {
    super(String(reason));
    this.name = "Retry";
    /** Why the event failed. */
    this.reason = String(reason);
    /** The WIT `handle-error` this lowers to. */
    this.payload = { tag: "retry", val: this.reason };
  }
}

/** The event can never be handled: it goes to the dead-letter topic at once with `reason`. */
export class Reject extends Error {
  /** @param {string} reason */
  constructor(reason) {
    super(String(reason));
    this.name = "Reject";
    /** Why the event was rejected. */
    this.reason = String(reason);
    /** The WIT `handle-error` this lowers to. */
    this.payload = { tag: "reject", val: this.reason };
  }
}

/**
 * Bytes from a `Uint8Array`, an `ArrayBuffer` or a string (UTF-8).
 * @param {Uint8Array|ArrayBuffer|string} value
 * @param {string} what
 * @returns {Uint8Array}
 */
function bytes(value, what) {
  if (typeof value === "string") return encoder.encode(value);
  if (value instanceof Uint8Array) return value;
  // Byte arrays lifted by the bindings come from another realm: `instanceof` fails for them.
  if (ArrayBuffer.isView(value) || Object.prototype.toString.call(value) === "[object ArrayBuffer]") {
    return ownBytes(value);
  }
  throw new TypeError(`${what} must be a string or a Uint8Array, not ${describe(value)}`);
}

/** A `Uint8Array` of this realm with the bytes of `value` (a view or an ArrayBuffer). */
function ownBytes(value) {
  if (value instanceof Uint8Array) return value;
  if (ArrayBuffer.isView(value)) {
    return new Uint8Array(value.buffer, value.byteOffset, value.byteLength).slice();
  }
  return new Uint8Array(value).slice();
}

function describe(value) {
  return value === null ? "null" : Object.prototype.toString.call(value).slice(8, -1);
}

/** @returns {Uint8Array|undefined} */
function optBytes(value, what) {
  return value === undefined || value === null ? undefined : bytes(value, what);
}

/** Milliseconds as the WIT `u64`, or `undefined`. */
function optMs(ms) {
  return ms === undefined || ms === null ? undefined : BigInt(Math.max(0, Math.trunc(ms)));
}

function toJson(value) {
  return encoder.encode(JSON.stringify(value));
}

/** One input event, as read from its topic. */
export class Event {
  /** @param {object} raw the WIT `event` record */
  constructor(raw) {
    /** Topic the event was read from. @type {string} */
    this.topic = raw.topic;
    /** Partition of the topic. @type {number} */
    this.partition = raw.partition;
    /** Offset within the partition. @type {bigint} */
    this.offset = BigInt(raw.offset);
    /** Partition key bytes, or `undefined`. @type {Uint8Array|undefined} */
    this.key = raw.key === undefined || raw.key === null ? undefined : ownBytes(raw.key);
    /** Event body. @type {Uint8Array} */
    this.payload = ownBytes(raw.payload);
    /** `{name, value}` headers (value: `Uint8Array`) in the order they were written. */
    this.headers = (raw.headers ?? []).map((h) => ({ name: h.name, value: ownBytes(h.value) }));
    /** Append time, milliseconds since the Unix epoch. @type {number} */
    this.timestampMs = Number(raw.timestampMs);
  }

  /** The key as text, or `undefined` if absent or not UTF-8. */
  get keyString() {
    if (this.key === undefined) return undefined;
    try {
      return strictDecoder.decode(this.key);
    } catch {
      return undefined;
    }
  }

  /** The payload as text; rejects the event if it is not UTF-8. */
  text() {
    try {
      return strictDecoder.decode(this.payload);
    } catch (e) {
      throw new Reject(`invalid UTF-8: ${e.message}`);
    }
  }

  /** The payload parsed as JSON; rejects the event if it does not parse. */
  json() {
    const text = this.text();
    try {
      return JSON.parse(text);
    } catch (e) {
      throw new Reject(`invalid JSON: ${e.message}`);
    }
  }

  /** The first header named `name` (ASCII case-insensitive), or `undefined`. */
  header(name) {
    const lower = name.toLowerCase();
    return this.headers.find((h) => h.name.toLowerCase() === lower)?.value;
  }

  /** The first header named `name` as text, or `undefined`. */
  headerString(name) {
    const v = this.header(name);
    return v === undefined ? undefined : lossyDecoder.decode(v);
  }

  /** The 1-based attempt number of this invocation (the `spate-attempt` header). */
  get attempt() {
    const n = Number.parseInt(this.headerString(ATTEMPT_HEADER) ?? "1", 10);
    return Number.isFinite(n) && n >= 1 ? n : 1;
  }
}

function decodeState(key, value) {
  try {
    return JSON.parse(lossyDecoder.decode(value));
  } catch (e) {
    throw new Reject(`state value at \`${key}\` is not valid JSON: ${e.message}`);
  }
}

/**
 * Durable key-value state, private to the plugin (the WIT `state` interface). Writes are
 * journaled and applied only when the handler returns; reads in the same call see the
 * call's earlier writes.
 */
export const state = {
  /** The value under `key` (`Uint8Array`), or `undefined`. */
  get(key) {
    const v = host_state.get(key);
    return v === undefined || v === null ? undefined : ownBytes(v);
  },
  /** The value under `key` as text, or `undefined`. */
  getString(key) {
    const v = host_state.get(key);
    return v === undefined || v === null ? undefined : lossyDecoder.decode(v);
  },
  /** The value under `key` parsed as JSON, or `undefined`; a non-JSON value rejects. */
  getJson(key) {
    const v = host_state.get(key);
    return v === undefined || v === null ? undefined : decodeState(key, v);
  },
  /** Store `value` (string or bytes) under `key`; `{ ttlMs }` makes it expire. */
  put(key, value, { ttlMs } = {}) {
    host_state.put(key, bytes(value, "value"), optMs(ttlMs));
  },
  /** Store `value` as JSON under `key`; `{ ttlMs }` makes it expire. */
  putJson(key, value, { ttlMs } = {}) {
    host_state.put(key, toJson(value), optMs(ttlMs));
  },
  /** Remove `key`. Removing a missing key is not an error. */
  delete(key) {
    host_state.delete(key);
  },
  /**
   * Replace the value of `key` with `next` (remove it when `undefined`) only if its
   * current value equals `expected` (`undefined`: the key must be absent). Returns
   * whether the swap happened; the host re-checks it when it applies the journal.
   */
  compareAndSwap(key, expected, next, { ttlMs } = {}) {
    return host_state.compareAndSwap(
      key,
      optBytes(expected, "expected"),
      optBytes(next, "next"),
      optMs(ttlMs),
    );
  },
  /** Up to `limit` `{key, value}` entries whose keys start with `prefix`, in key order. */
  scan(prefix, limit = 100) {
    return host_state.scan(prefix, limit).map((e) => ({ key: e.key, value: ownBytes(e.value) }));
  },
};

/**
 * A fast cache with expiry, private to the plugin (the WIT `cache` interface). Writes are
 * journaled like state writes. A cache may forget anything: keep the truth in `state`.
 */
export const cache = {
  /** The cached value of `key` (`Uint8Array`), or `undefined`. */
  get(key) {
    const v = host_cache.get(key);
    return v === undefined || v === null ? undefined : ownBytes(v);
  },
  /** The cached value parsed as JSON, or `undefined` if absent or unreadable (logged). */
  getJson(key) {
    const v = host_cache.get(key);
    if (v === undefined || v === null) return undefined;
    try {
      return JSON.parse(lossyDecoder.decode(v));
    } catch (e) {
      log.warn(`cache value at \`${key}\` is not valid JSON, treating as a miss: ${e.message}`);
      return undefined;
    }
  },
  /** Cache `value` (string or bytes) under `key` for `ttlMs` milliseconds. */
  set(key, value, { ttlMs }) {
    host_cache.set(key, bytes(value, "value"), optMs(ttlMs));
  },
  /** Cache `value` as JSON under `key` for `ttlMs` milliseconds. */
  setJson(key, value, { ttlMs }) {
    host_cache.set(key, toJson(value), optMs(ttlMs));
  },
  /** Forget `key`. */
  delete(key) {
    host_cache.delete(key);
  },
  /** Add `delta` to the counter at `key` (missing counts as 0); returns the new value. */
  incr(key, delta = 1) {
    return Number(host_cache.incr(key, BigInt(delta)));
  },
};

function writeLog(level, message) {
  host_log.log(level, String(message));
}

/**
 * Log lines into the runtime's log, tagged with the plugin (the WIT `log` interface).
 * Unlike effects, log lines are written even when the handler fails.
 */
export const log = {
  /** Very detailed diagnostics. */
  trace: (message) => writeLog("trace", message),
  /** Diagnostics while developing a handler. */
  debug: (message) => writeLog("debug", message),
  /** Normal operation. */
  info: (message) => writeLog("info", message),
  /** Something unexpected the handler recovered from. */
  warn: (message) => writeLog("warn", message),
  /** Something failed. */
  error: (message) => writeLog("error", message),
};

function headerList(headers) {
  if (!headers) return [];
  const entries = Array.isArray(headers) ? headers : Object.entries(headers);
  return entries.map(([name, value]) => ({ name, value: bytes(value, "header value") }));
}

/**
 * Publish `payload` (string or bytes) on `topic` when the handler returns. Options:
 * `key` (string or bytes) partitions it; `headers` is an object or `[name, value]` pairs.
 * The topic must be in the manifest's `capabilities.emit-topics`.
 */
export function emit(topic, payload, { key, headers } = {}) {
  host_emit.emit(topic, optBytes(key, "key"), bytes(payload, "payload"), headerList(headers));
}

/** Publish `value` serialized as JSON on `topic` (options as for {@link emit}). */
export function emitJson(topic, value, options = {}) {
  emit(topic, toJson(value), options);
}

/**
 * Start the workflow `name` for run `id` with `input` (string or bytes). Starting the same
 * `id` twice is one run, so a retried event never starts a duplicate: derive `id` from the
 * input (an order id), not from a counter.
 */
export function startWorkflow(name, id, input) {
  host_emit.startWorkflow(name, id, bytes(input, "input"));
}

/** Start the workflow `name` for run `id` with `value` serialized as JSON. */
export function startWorkflowJson(name, id, value) {
  startWorkflow(name, id, toJson(value));
}

/**
 * The `spate:plugin/handler` export wrapping a plugin's `handle(event)` function; the
 * build's generated entry module exports it as `handler`. Not for handlers to call.
 * @param {(event: Event) => void} handle
 */
export function exportHandler(handle) {
  if (typeof handle !== "function") {
    throw new TypeError("the handler module must export a function `handle(event)`");
  }
  return {
    handle(raw) {
      try {
        handle(new Event(raw));
      } catch (e) {
        if (e instanceof Retry || e instanceof Reject) throw e;
        // Anything else traps, like a Rust panic; stderr goes into the dead-letter reason.
        // SpiderMonkey's `stack` has the frames only, not the message.
        console.error(`uncaught exception in handler: ${e}\n${e?.stack ?? ""}`);
        throw e;
      }
    },
  };
}
