//! The native baseline: the `trivial` plugin's logic as plain Rust behind the same
//! [`PluginVersion`] seam the sandbox implements, so the dispatcher, host API and journal
//! are identical and only the WebAssembly part differs.

use async_trait::async_trait;
use spate_core::dispatch::{CallOutcome, CallResult, Instance, PluginVersion};
use spate_core::host::{Invocation, PluginInfo};
use std::sync::Arc;

/// Topic the trivial handler emits to (as in `plugins/trivial`).
const OUT_TOPIC: &str = "out";

/// A native plugin version that emits one `{}` to `out`, keyed like its input.
pub struct NativeTrivial {
    info: Arc<PluginInfo>,
}

impl NativeTrivial {
    /// A native version described by `info` (its manifest must allow emits to `out`).
    pub fn new(info: Arc<PluginInfo>) -> Self {
        Self { info }
    }
}

impl PluginVersion for NativeTrivial {
    fn info(&self) -> &Arc<PluginInfo> {
        &self.info
    }

    fn instance(&self) -> Box<dyn Instance> {
        Box::new(NativeInstance)
    }
}

/// Stateless: a "fresh instance" of native code costs one allocation.
struct NativeInstance;

#[async_trait]
impl Instance for NativeInstance {
    async fn call(&mut self, mut invocation: Invocation) -> CallResult {
        let key = invocation.event().key.clone();
        let outcome = match invocation.emit(OUT_TOPIC, key, b"{}".to_vec(), Vec::new()) {
            Ok(()) => CallOutcome::Ok,
            Err(e) => CallOutcome::Reject(e.to_string()),
        };
        CallResult {
            outcome,
            journal: invocation.take_journal(),
        }
    }
}
