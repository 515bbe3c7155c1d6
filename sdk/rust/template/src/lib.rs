//! {{name}}: a Spate plugin. Counts the events of each key in state, emits the running
//! count to `counts`, and starts the `milestone` workflow every 100th event of a key.
//!
//! Build with `spate plugin build` (or `cargo build --release --target wasm32-wasip2`),
//! deploy with `spate plugin deploy`.

use spate_sdk::{Event, Handler, HandlerError, Outcome, emit, state};

struct Plugin;

impl Handler for Plugin {
    fn handle(event: Event) -> Outcome {
        let key = event
            .key_str()
            .ok_or_else(|| HandlerError::reject("events must be keyed"))?;
        // Reads see this call's own writes; every write applies only if we return Ok.
        let state_key = format!("count/{key}");
        let n = state::get_json::<u64>(&state_key)?.unwrap_or(0) + 1;
        state::put_json(&state_key, &n)?;
        emit::emit_json("counts", key, &spate_sdk::serde_json::json!({ "key": key, "count": n }))?;
        if n % 100 == 0 {
            // The run id names this milestone: a retried event never starts it twice.
            emit::start_workflow_json("milestone", &format!("{key}/{n}"), &n)?;
        }
        Ok(())
    }
}

spate_sdk::export_handler!(Plugin);
