//! A plain WASI command: it builds to a valid component, but of the `wasi:cli/command`
//! world (exports `wasi:cli/run`), not `spate:plugin/event-handler`. Uploads of it must
//! be refused with a world-mismatch error.

fn main() {
    println!("hi");
}
