//! The cheapest possible Spate handler, for benchmarks: every event emits one `{}`
//! to topic `out`, keyed with the input key. No state, no cache, no parsing.

use spate_sdk::{Event, Handler, Outcome, emit};

struct Trivial;

impl Handler for Trivial {
    fn handle(event: Event) -> Outcome {
        emit::emit("out", event.key(), b"{}");
        Ok(())
    }
}

spate_sdk::export_handler!(Trivial);
