// Test plugin for the end-to-end tests of JavaScript guests: each event's JSON payload
// `{"op": ...}` picks what it does (the ops table is in README.md).

import { Reject, Retry, emitJson, state } from "spate";

export function handle(event) {
  const req = event.json();
  if (typeof req !== "object" || req === null || typeof req.op !== "string") {
    throw new Reject("test-chaos-js payload must be an object with a string `op`");
  }
  const topic = req.topic ?? "out";
  const id = req.id ?? event.keyString ?? `${event.partition}-${event.offset}`;
  const out = (value) => {
    if ("seq" in req) value.seq = req.seq;
    emitJson(topic, value, { key: event.key });
  };

  switch (req.op) {
    case "emit":
      return out({ n: req.n ?? 0, lang: "js" });
    case "flaky": {
      const succeedOn = req["succeed-on"] ?? 2;
      const attempt = event.attempt;
      // Made on every attempt; only the successful attempt's may be applied.
      state.put(`flaky/${id}`, String(attempt));
      out({ attempt });
      if (attempt < succeedOn) throw new Retry(`flaky: attempt ${attempt}, succeeds on ${succeedOn}`);
      return;
    }
    case "get":
      return out({ key: req.key, value: state.getString(req.key) ?? null });
    case "retry":
      throw new Retry(req.reason ?? "retry requested by test-chaos-js");
    case "reject":
      throw new Reject(req.reason ?? "rejected by test-chaos-js");
    case "raise":
      throw new TypeError("test-chaos-js: exception requested");
    case "loop": {
      let n = 0;
      for (;;) n++;
    }
    case "membomb": {
      const chunks = [];
      const limit = req["alloc-mb"];
      while (limit === undefined || chunks.length < limit) {
        const chunk = new Uint8Array(1 << 20);
        for (let i = 0; i < chunk.length; i += 4096) chunk[i] = 1;
        chunks.push(chunk);
      }
      return out({ allocated_mb: chunks.length });
    }
    case "wasi":
      return out({
        fetch: typeof globalThis.fetch,
        process: typeof globalThis.process,
        require: typeof globalThis.require,
      });
    case "fetch":
      // Built without the `http` feature: the call traps; there is no network to reach.
      fetch("http://127.0.0.1:9/");
      return out({ fetched: true });
    default:
      throw new Reject(`test-chaos-js: unknown op \`${req.op}\``);
  }
}

