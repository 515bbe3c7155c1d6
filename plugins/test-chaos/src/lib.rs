//! Test plugin for the runtime's end-to-end tests: one build whose behaviour each event
//! chooses with its JSON payload `{"op": "...", ...}`, so tests can exercise emits,
//! state, cache, workflows, retries, rejects and traps without building more plugins.
//!
//! Fields every op understands (all optional):
//! * `seq`: any JSON value, copied into every payload the op emits, so tests can check
//!   order and exactly-once delivery;
//! * `topic`: where the op's emits go (default `out`);
//! * `id`: names the event for `fail-until`, `flaky` and `workflow` (default: the input
//!   key as text, else `<partition>-<offset>`).
//!
//! Every emit is keyed with the input key. The table of ops is in this crate's README;
//! an unknown op, a non-JSON payload or a missing required field rejects the event.

use serde_json::{Map, Value, json};
use spate_sdk::{Event, Handler, HandlerError, Outcome, cache, emit, log, state};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

struct Chaos;

/// Events handled by this instance (see the `instance-count` op).
static INSTANCE_EVENTS: AtomicU64 = AtomicU64::new(0);

impl Handler for Chaos {
    fn handle(event: Event) -> Outcome {
        let input: Value = serde_json::from_slice(event.payload())
            .map_err(|e| HandlerError::reject(format!("test-chaos payload is not JSON: {e}")))?;
        let Value::Object(input) = input else {
            return Err(HandlerError::reject(
                "test-chaos payload must be a JSON object",
            ));
        };
        let op = input
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| HandlerError::reject("test-chaos payload needs a string field `op`"))?
            .to_owned();
        Call {
            event: &event,
            input: &input,
            op: &op,
        }
        .run()
    }
}

spate_sdk::export_handler!(Chaos);

/// One invocation: the event, its parsed payload and the op it asks for.
struct Call<'a> {
    event: &'a Event,
    input: &'a Map<String, Value>,
    op: &'a str,
}

impl Call<'_> {
    fn run(&self) -> Outcome {
        match self.op {
            "noop" => Ok(()),
            "emit" => {
                let mut out = json!({ "n": self.input.get("n").cloned().unwrap_or(json!(0)) });
                if let Some(pad) = self.opt_u64("pad")? {
                    out["pad"] = Value::String("x".repeat(usize::try_from(pad).unwrap_or(0)));
                }
                self.emit(out)
            }
            "emit-raw" => {
                // An emit with a chosen key and headers: `key-pad` bytes of key,
                // `headers` {name: value}, `header-pad` bytes in one more header.
                let key = match self.opt_u64("key-pad")? {
                    Some(n) => Some("k".repeat(usize::try_from(n).unwrap_or(0)).into_bytes()),
                    None => self.event.key().map(<[u8]>::to_vec),
                };
                let mut headers: Vec<(String, Vec<u8>)> = match self.input.get("headers") {
                    Some(Value::Object(h)) => h
                        .iter()
                        .map(|(n, v)| (n.clone(), v.as_str().unwrap_or("").as_bytes().to_vec()))
                        .collect(),
                    _ => Vec::new(),
                };
                if let Some(n) = self.opt_u64("header-pad")? {
                    headers.push(("pad".into(), vec![b'h'; usize::try_from(n).unwrap_or(0)]));
                }
                let refs: Vec<(&str, &[u8])> = headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_slice()))
                    .collect();
                let payload = serde_json::to_vec(&self.with_seq(json!({ "raw": true })))
                    .map_err(|e| HandlerError::reject(e.to_string()))?;
                emit::emit_with_headers(self.topic()?, key.as_deref(), payload, &refs);
                Ok(())
            }
            "put-many" => {
                // `count` puts of `bytes`-byte values under `<prefix>/<i>`.
                let prefix = self.opt_str("prefix")?.unwrap_or("many");
                let value = "v".repeat(usize::try_from(self.u64("bytes")?).unwrap_or(0));
                for i in 0..self.u64("count")? {
                    state::put(&format!("{prefix}/{i:06}"), &value);
                }
                self.emit(json!({ "put": self.u64("count")? }))
            }
            "log-many" => {
                let line = "l".repeat(usize::try_from(self.u64("bytes")?).unwrap_or(0));
                for _ in 0..self.u64("count")? {
                    log::log(log::Level::Info, &line);
                }
                Ok(())
            }
            "exit" => std::process::exit(0),
            "forward" => {
                // Re-emit the input payload unchanged: with `topic` = the plugin's own input,
                // every event begets the next (a loop only `limits.max-hops` stops).
                emit::emit(self.topic()?, self.event.key(), self.event.payload());
                Ok(())
            }
            "emit-many" => {
                for n in 0..self.u64("count")? {
                    self.emit(json!({ "n": n }))?;
                }
                Ok(())
            }
            "workflow" => {
                let name = self.opt_str("name")?.unwrap_or("chaos-workflow");
                let input = match self.input.get("input") {
                    Some(v) => v.clone(),
                    None => self.with_seq(json!({})),
                };
                emit::start_workflow_json(name, &self.id(), &input)
            }
            "put" => {
                let key = self.str("key")?;
                let value = self.str("value")?;
                match self.opt_u64("ttl-ms")? {
                    Some(ms) => state::put_with_ttl(key, value, Duration::from_millis(ms)),
                    None => state::put(key, value),
                }
                self.emit_state_value(key)
            }
            "count" => {
                // The count job: one more event of this key, in durable state, emitted.
                let key = format!(
                    "count/{}",
                    String::from_utf8_lossy(self.event.key().unwrap_or_default())
                );
                let n = state::get(&key)
                    .and_then(|v| String::from_utf8(v).ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    + 1;
                state::put(&key, n.to_string());
                self.emit(json!({ "n": n }))
            }
            "get" => self.emit_state_value(self.str("key")?),
            "delete" => {
                let key = self.str("key")?;
                state::delete(key);
                self.emit_state_value(key)
            }
            "put-then-fail" => {
                let key = self.str("key")?;
                let value = self.str("value")?;
                state::put(key, value);
                cache::set(key, value, Duration::from_secs(60));
                self.emit(json!({ "key": key, "value": value }))?;
                let reason = format!("put-then-fail on `{key}`");
                match self.opt_str("fail")? {
                    Some("reject") => Err(HandlerError::reject(reason)),
                    _ => Err(HandlerError::retry(reason)),
                }
            }
            "fail-until" => {
                let marker = format!("ok/{}", self.id());
                if state::get(&marker).is_none() {
                    return Err(HandlerError::retry(format!(
                        "not yet: `{marker}` is not set"
                    )));
                }
                self.emit(json!({ "op": "fail-until", "id": self.id() }))
            }
            "flaky" => {
                let succeed_on = self.opt_u64("succeed-on")?.unwrap_or(2);
                let attempt = self.event.attempt();
                // These effects are made on every attempt; only the successful attempt's
                // may be applied, so a test sees one emit and `flaky/<id>` = succeed-on.
                state::put(&format!("flaky/{}", self.id()), attempt.to_string());
                self.emit(json!({ "attempt": attempt }))?;
                if u64::from(attempt) < succeed_on {
                    return Err(HandlerError::retry(format!(
                        "flaky: attempt {attempt}, succeeds on {succeed_on}"
                    )));
                }
                Ok(())
            }
            "reject" => match self.opt_u64("reason-pad")? {
                Some(n) => Err(HandlerError::reject(
                    "r".repeat(usize::try_from(n).unwrap_or(0)),
                )),
                None => Err(HandlerError::reject(
                    self.opt_str("reason")?.unwrap_or("rejected by test-chaos"),
                )),
            },
            "retry" => Err(HandlerError::retry(
                self.opt_str("reason")?
                    .unwrap_or("retry requested by test-chaos"),
            )),
            "loop" => {
                let mut spins: u64 = 0;
                loop {
                    spins = black_box(spins.wrapping_add(1));
                }
            }
            "membomb" => self.membomb(),
            "panic" => panic!("test-chaos: panic requested"),
            "cas" => {
                let key = self.str("key")?;
                let expected = self.opt_str("expected")?;
                let new = self.opt_str("new")?;
                let swapped = state::compare_and_swap(
                    key,
                    expected.map(str::as_bytes),
                    new.map(str::as_bytes),
                );
                self.emit(json!({ "key": key, "swapped": swapped, "value": text(state::get(key)) }))
            }
            "scan" => {
                let prefix = self.opt_str("prefix")?.unwrap_or("");
                let limit =
                    u32::try_from(self.opt_u64("limit")?.unwrap_or(100)).unwrap_or(u32::MAX);
                let entries: Vec<Value> = state::scan(prefix, limit)
                    .into_iter()
                    .map(|e| json!({ "key": e.key, "value": text(Some(e.value)) }))
                    .collect();
                self.emit(json!({ "prefix": prefix, "entries": entries }))
            }
            "cache" => {
                let key = self.str("key")?;
                let value = self.str("value")?;
                let ttl = Duration::from_millis(self.opt_u64("ttl-ms")?.unwrap_or(60_000));
                let counter = match self.opt_str("counter")? {
                    Some(c) => c.to_owned(),
                    None => format!("{key}/counter"),
                };
                let delta = self.input.get("delta").and_then(Value::as_i64).unwrap_or(1);
                cache::set(key, value, ttl);
                let read = cache::get(key);
                let count = cache::incr(&counter, delta);
                self.emit(json!({
                    "key": key, "value": text(read), "counter": counter, "count": count,
                }))
            }
            "cache-get" => {
                let key = self.str("key")?;
                self.emit(json!({ "key": key, "value": text(cache::get(key)) }))
            }
            "sleep-ms" => {
                let ms = self.u64("ms")?;
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(ms) {
                    black_box(());
                }
                self.emit(json!({ "slept_ms": ms }))
            }
            "echo" => {
                let headers: Map<String, Value> = self
                    .event
                    .headers()
                    .map(|(n, v)| {
                        (
                            n.to_owned(),
                            Value::String(String::from_utf8_lossy(v).into()),
                        )
                    })
                    .collect();
                self.emit(json!({
                    "topic": self.event.topic(),
                    "partition": self.event.partition(),
                    "offset": self.event.offset(),
                    "key": self.event.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    "timestamp_ms": self.event.timestamp_ms(),
                    "attempt": self.event.attempt(),
                    "headers": headers,
                }))
            }
            "log" => {
                let message = self.opt_str("message")?.unwrap_or("test-chaos log line");
                let level = match self.opt_str("level")?.unwrap_or("info") {
                    "trace" => log::Level::Trace,
                    "debug" => log::Level::Debug,
                    "info" => log::Level::Info,
                    "warn" => log::Level::Warn,
                    "error" => log::Level::Error,
                    other => {
                        return Err(HandlerError::reject(format!("unknown log level `{other}`")));
                    }
                };
                log::log(level, message);
                Ok(())
            }
            "instance-count" => {
                // Events this instance has handled, itself included: always 1 with a fresh
                // instance per event; counts up in warm mode until the instance is replaced.
                let n = INSTANCE_EVENTS.fetch_add(1, AtomicOrdering::Relaxed) + 1;
                self.emit(json!({ "instance_events": n }))
            }
            other => Err(HandlerError::reject(format!(
                "test-chaos: unknown op `{other}`"
            ))),
        }
    }

    /// Allocate and touch 1 MiB chunks, keeping them all: forever (until the memory cap
    /// traps the instance), or up to `alloc-mb` MiB, then emit how much was allocated.
    fn membomb(&self) -> Outcome {
        const MIB: usize = 1 << 20;
        let cap = self.opt_u64("alloc-mb")?;
        let mut chunks: Vec<Vec<u8>> = Vec::new();
        while cap.is_none_or(|cap| (chunks.len() as u64) < cap) {
            let mut chunk = vec![0u8; MIB];
            for page in chunk.chunks_mut(4096) {
                page[0] = 1;
            }
            chunks.push(black_box(chunk));
        }
        self.emit(json!({ "allocated_mb": chunks.len() }))
    }

    /// Emit `{"key", "value": <state value as text, or null>}`.
    fn emit_state_value(&self, key: &str) -> Outcome {
        self.emit(json!({ "key": key, "value": text(state::get(key)) }))
    }

    /// Emit `payload` (plus the input's `seq`) to the op's topic, keyed like the input.
    fn emit(&self, payload: Value) -> Outcome {
        emit::emit_json(self.topic()?, self.event.key(), &self.with_seq(payload))
    }

    fn with_seq(&self, mut payload: Value) -> Value {
        if let (Some(seq), Value::Object(map)) = (self.input.get("seq"), &mut payload) {
            map.insert("seq".into(), seq.clone());
        }
        payload
    }

    fn topic(&self) -> Result<&str, HandlerError> {
        Ok(self.opt_str("topic")?.unwrap_or("out"))
    }

    fn id(&self) -> String {
        match (
            self.input.get("id").and_then(Value::as_str),
            self.event.key_str(),
        ) {
            (Some(id), _) => id.to_owned(),
            (None, Some(key)) => key.to_owned(),
            (None, None) => format!("{}-{}", self.event.partition(), self.event.offset()),
        }
    }

    fn str(&self, field: &str) -> Result<&str, HandlerError> {
        self.opt_str(field)?
            .ok_or_else(|| self.missing(field, "a string"))
    }

    fn u64(&self, field: &str) -> Result<u64, HandlerError> {
        self.opt_u64(field)?
            .ok_or_else(|| self.missing(field, "an unsigned integer"))
    }

    /// A string field; absent and `null` are `None`, another type rejects.
    fn opt_str(&self, field: &str) -> Result<Option<&str>, HandlerError> {
        match self.input.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.missing(field, "a string")),
        }
    }

    /// An unsigned integer field; absent and `null` are `None`, another type rejects.
    fn opt_u64(&self, field: &str) -> Result<Option<u64>, HandlerError> {
        match self.input.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.missing(field, "an unsigned integer")),
        }
    }

    fn missing(&self, field: &str, what: &str) -> HandlerError {
        HandlerError::reject(format!(
            "op `{}` needs field `{field}` to be {what}",
            self.op
        ))
    }
}

/// Stored bytes as JSON: a (lossy UTF-8) string, or `null` when absent.
fn text(value: Option<Vec<u8>>) -> Value {
    match value {
        Some(v) => Value::String(String::from_utf8_lossy(&v).into_owned()),
        None => Value::Null,
    }
}
