//! The count job, for benchmarks: every event on `count-in` (keyed, a JSON payload) adds one
//! to its key's counter `count/<key>` in durable state (a decimal `u64`), and every 10th
//! event of a key emits `{"n": N, "v": <the input payload>}` to `count-out`, keyed like
//! the input.
//!
//! `spate-bench`'s native twin (`runtime/bench/src/native.rs`, `NativeCount`) and its plain
//! rdkafka ceiling do exactly this too; change all three together.
//!
//! An unkeyed event, a payload that is not JSON, or a stored counter that is not a number
//! is rejected (dead-lettered with the reason): none of them gets better on retry.

use serde::Serialize;
use serde_json::value::RawValue;
use spate_sdk::{Event, Handler, HandlerError, Outcome, ResultExt, emit, state};

/// Topic the every-10th emits go to.
const OUTPUT_TOPIC: &str = "count-out";
/// One emit per this many events of a key.
const EMIT_EVERY: u64 = 10;

/// The payload emitted every [`EMIT_EVERY`]th event of a key.
#[derive(Serialize)]
struct Counted<'a> {
    /// The key's count, this event included.
    n: u64,
    /// The input payload, as it came.
    v: &'a RawValue,
}

struct Count;

impl Handler for Count {
    fn handle(event: Event) -> Outcome {
        let key = event
            .key_str()
            .ok_or_else(|| HandlerError::reject("count events must have a UTF-8 key"))?;
        let payload: &RawValue = serde_json::from_slice(event.payload())?;
        let state_key = format!("count/{key}");
        let n = match state::get(&state_key) {
            None => 0,
            Some(v) => std::str::from_utf8(&v)?
                .parse::<u64>()
                .or_reject(format!("`{state_key}` is not a decimal count"))?,
        } + 1;
        state::put(&state_key, n.to_string());
        if n.is_multiple_of(EMIT_EVERY) {
            emit::emit_json(OUTPUT_TOPIC, key, &Counted { n, v: payload })?;
        }
        Ok(())
    }
}

spate_sdk::export_handler!(Count);
