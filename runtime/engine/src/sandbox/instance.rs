//! Plugin versions and their instances: a store per call (or a warm store reused between
//! calls), the call under its deadline, and the call's outcome with its journal.

use super::{HOST_CALL_GRACE, HostState, Sandbox, classify};
use crate::bindings::spate::plugin::types;
use crate::bindings::{EventHandler, EventHandlerPre};
use spate_core::host::{Invocation, MAX_REASON_LEN, PluginInfo, truncate_reason};
use spate_core::plugin::{CallOutcome, Instance, PluginVersion, TrapKind};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::{Store, UpdateDeadline};

/// A loaded plugin version: its compiled component pre-instantiated against the host.
pub struct WasmPlugin {
    pub(super) info: Arc<PluginInfo>,
    pub(super) pre: EventHandlerPre<HostState>,
    pub(super) sandbox: Arc<Sandbox>,
}

impl PluginVersion for WasmPlugin {
    fn info(&self) -> &Arc<PluginInfo> {
        &self.info
    }

    fn instance(&self) -> Box<dyn Instance> {
        let warm = matches!(
            self.info.manifest.execution.mode,
            spate_core::manifest::ExecutionMode::Warm
        );
        Box::new(WasmInstance {
            pre: self.pre.clone(),
            sandbox: Arc::clone(&self.sandbox),
            memory_cap: self.info.manifest.limits.memory_bytes(),
            timeout: self.info.manifest.limits.timeout(),
            max_uses: if warm {
                self.info.manifest.execution.max_events_per_instance
            } else {
                1
            },
            live: None,
        })
    }
}

struct Live {
    store: Store<HostState>,
    bindings: EventHandler,
    uses: u32,
}

/// Calls for one lane: a fresh store per call, or (warm mode) one store reused for up to
/// `max_uses` calls and dropped after any failure.
struct WasmInstance {
    pre: EventHandlerPre<HostState>,
    sandbox: Arc<Sandbox>,
    memory_cap: usize,
    timeout: Duration,
    max_uses: u32,
    live: Option<Live>,
}

fn to_wit(e: &spate_core::Event) -> types::Event {
    types::Event {
        topic: e.topic.clone(),
        partition: e.partition,
        offset: e.offset,
        key: e.key.clone(),
        payload: e.payload.clone(),
        headers: e
            .headers
            .iter()
            .map(|h| types::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        timestamp_ms: e.timestamp_ms,
    }
}

/// A new store with the plugin's limits and an instance in it. Takes its parts rather
/// than `&WasmInstance` so the future stays `Send` (a store is not `Sync`).
async fn fresh_live(
    pre: EventHandlerPre<HostState>,
    sandbox: Arc<Sandbox>,
    memory_cap: usize,
    timeout: Duration,
) -> wasmtime::Result<Live> {
    let mut store = Store::new(sandbox.engine(), HostState::new(memory_cap));
    store.limiter(|s| &mut s.limiter);
    // Guest code yields to the scheduler every few ticks and traps past the call's
    // deadline. Instantiation runs guest start code too: it is under the same deadline.
    let ticks = sandbox.yield_ticks();
    store.data_mut().begin(timeout);
    store.set_epoch_deadline(ticks);
    store.epoch_deadline_callback(move |ctx| {
        if Instant::now() >= ctx.data().deadline {
            return Ok(UpdateDeadline::Interrupt);
        }
        Ok(UpdateDeadline::YieldCustom(
            ticks,
            Box::pin(tokio::task::yield_now()),
        ))
    });
    let bindings = pre.instantiate_async(&mut store).await?;
    Ok(Live {
        store,
        bindings,
        uses: 0,
    })
}

#[async_trait::async_trait]
impl Instance for WasmInstance {
    fn release(&mut self) {
        self.live = None;
    }

    async fn call(&mut self, invocation: Invocation) -> CallOutcome {
        let event = to_wit(invocation.event());
        let mut live = match self.live.take() {
            Some(l) => l,
            None => match fresh_live(
                self.pre.clone(),
                Arc::clone(&self.sandbox),
                self.memory_cap,
                self.timeout,
            )
            .await
            {
                Ok(l) => l,
                Err(e) => {
                    let (kind, message) = classify(&e);
                    return CallOutcome::Trap(kind, message);
                }
            },
        };
        live.store.data_mut().invocation = Some(invocation);
        live.store.data_mut().begin(self.timeout);
        live.store.set_epoch_deadline(self.sandbox.yield_ticks());
        // Epoch interruption only fires while guest code runs; a host call stuck on a
        // backend would outlive the deadline. This bound covers that case: dropping the
        // future abandons the call and the store with it.
        let bound = self.timeout.saturating_mul(2) + HOST_CALL_GRACE;
        let call = live
            .bindings
            .spate_plugin_handler()
            .call_handle(&mut live.store, &event);
        let result = match tokio::time::timeout(bound, call).await {
            Ok(r) => r,
            Err(_) => {
                return CallOutcome::Trap(
                    TrapKind::Deadline,
                    format!("call exceeded {bound:?} (deadline while blocked in a host call)"),
                );
            }
        };
        live.store.data_mut().report_dropped_logs();
        let journal = live
            .store
            .data_mut()
            .invocation
            .take()
            .map(|mut i| i.take_journal())
            .unwrap_or_default();
        let outcome = match result {
            Ok(Ok(())) => CallOutcome::Ok(journal),
            Ok(Err(types::HandleError::Retry(r))) => {
                CallOutcome::Retry(truncate_reason(r, MAX_REASON_LEN))
            }
            Ok(Err(types::HandleError::Reject(r))) => {
                CallOutcome::Reject(truncate_reason(r, MAX_REASON_LEN))
            }
            Err(e) => {
                let (kind, mut message) = classify(&e);
                let stderr = live.store.data().stderr.contents();
                if matches!(kind, TrapKind::Panic | TrapKind::Other) && !stderr.is_empty() {
                    let text = String::from_utf8_lossy(&stderr);
                    message = format!("{message}; guest stderr: {}", text.trim_end());
                }
                CallOutcome::Trap(kind, message)
            }
        };
        live.uses += 1;
        if matches!(outcome, CallOutcome::Ok(_)) && live.uses < self.max_uses {
            self.live = Some(live);
        }
        outcome
    }
}
