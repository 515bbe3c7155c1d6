//! The native baselines: the `trivial` and `count` plugins' logic as plain Rust behind the
//! same [`PluginVersion`] seam the sandbox implements, so the dispatcher, host API, journal
//! and checkpoints are identical and only the WebAssembly part differs.

use async_trait::async_trait;
use spate_core::host::{HostError, Invocation, PluginInfo};
use spate_core::plugin::{CallOutcome, Instance, PluginVersion};
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
    async fn call(&mut self, mut invocation: Invocation) -> CallOutcome {
        let key = invocation.event().key.clone();
        match invocation.emit(OUT_TOPIC, key, b"{}".to_vec(), Vec::new()) {
            Ok(()) => CallOutcome::Ok(invocation.take_journal()),
            Err(e) => CallOutcome::Reject(e.to_string()),
        }
    }
}

/// The count job (`plugins/count`) in native Rust: `count/<key>` in state (a decimal
/// `u64`) plus one per event, and every `every`th event of a key emits
/// [`counted`](crate::workload::counted) to the manifest's first emit topic, keyed like
/// the input. Every state read, write and emit goes through the host [`Invocation`], as
/// the component's do.
pub struct NativeCount {
    info: Arc<PluginInfo>,
    output_topic: String,
    every: u64,
}

impl NativeCount {
    /// A native version described by `info`, emitting to `output_topic` every `every`th
    /// event of a key.
    pub fn new(info: Arc<PluginInfo>, output_topic: String, every: u64) -> Self {
        Self {
            info,
            output_topic,
            every: every.max(1),
        }
    }
}

impl PluginVersion for NativeCount {
    fn info(&self) -> &Arc<PluginInfo> {
        &self.info
    }

    fn instance(&self) -> Box<dyn Instance> {
        Box::new(CountInstance {
            output_topic: self.output_topic.clone(),
            every: self.every,
        })
    }
}

/// Holds only its settings: the counter lives in state, as the component's does.
struct CountInstance {
    output_topic: String,
    every: u64,
}

/// Why a count call did not return `ok`.
enum Failed {
    /// As the component's `HandlerError::reject`.
    Reject(String),
    /// A host call failed: classified as the sandbox classifies a host error trapping
    /// the guest.
    Host(HostError),
}

impl From<HostError> for Failed {
    fn from(e: HostError) -> Self {
        Self::Host(e)
    }
}

impl CountInstance {
    async fn count(&self, invocation: &mut Invocation) -> Result<(), Failed> {
        let event = Arc::clone(invocation.event());
        let key = event
            .key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| Failed::Reject("count events must have a UTF-8 key".into()))?;
        let state_key = format!("count/{key}");
        let n = match invocation.state_get(&state_key).await? {
            None => 0,
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| Failed::Reject(format!("`{state_key}` is not a decimal count")))?,
        } + 1;
        invocation.state_put(&state_key, n.to_string().into_bytes(), None)?;
        if n.is_multiple_of(self.every) {
            let payload = crate::workload::counted(n, &event.payload)
                .map_err(|e| Failed::Reject(format!("invalid JSON: {e}")))?;
            invocation.emit(
                &self.output_topic,
                Some(key.as_bytes().to_vec()),
                payload,
                Vec::new(),
            )?;
        }
        Ok(())
    }
}

#[async_trait]
impl Instance for CountInstance {
    async fn call(&mut self, mut invocation: Invocation) -> CallOutcome {
        match self.count(&mut invocation).await {
            Ok(()) => CallOutcome::Ok(invocation.take_journal()),
            Err(Failed::Reject(reason)) => CallOutcome::Reject(reason),
            Err(Failed::Host(e)) => {
                let (kind, reason) = spate_engine::sandbox::classify(&wasmtime::Error::new(e));
                CallOutcome::Trap(kind, reason)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spate_core::StateWrite;
    use spate_core::manifest::{LimitCeilings, Manifest};

    fn count() -> Arc<dyn PluginVersion> {
        let manifest = Manifest::parse(crate::COUNT_MANIFEST, &LimitCeilings::default());
        let info = Arc::new(PluginInfo::new(
            manifest.unwrap_or_else(|e| panic!("plugins/count/spate.toml: {e}")),
            "0".repeat(64),
        ));
        Arc::new(NativeCount::new(info, "count-out".into(), 10))
    }

    async fn call(
        version: &Arc<dyn PluginVersion>,
        root: &std::path::Path,
        stored: &[u8],
        key: Option<&str>,
    ) -> CallOutcome {
        let (services, dir) = crate::micro::services(root).unwrap_or_else(|e| panic!("{e:#}"));
        let info = Arc::clone(version.info());
        let write = StateWrite {
            key: "count/k-1".into(),
            value: Some(stored.to_vec()),
            ttl: None,
            condition: None,
        };
        services
            .state
            .apply(&info.namespace, &[write])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut event = (*crate::micro::event("count-in", "k-1", r#"{"seq": 1}"#)).clone();
        event.key = key.map(|k| k.as_bytes().to_vec());
        let invocation = Invocation::new(info, services, Arc::new(event));
        let result = version.instance().call(invocation).await;
        drop(dir);
        result
    }

    #[tokio::test]
    async fn native_count_counts_in_state_and_emits_every_tenth() {
        let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let version = count();

        let tenth = call(&version, root.path(), b"9", Some("k-1")).await;
        let CallOutcome::Ok(tenth) = tenth else {
            panic!("{tenth:?}");
        };
        let writes = tenth.state_writes();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].key, "count/k-1");
        assert_eq!(writes[0].value.as_deref(), Some(&b"10"[..]));
        assert_eq!(tenth.emits.len(), 1);
        let emit = &tenth.emits[0];
        assert_eq!(emit.topic, "count-out");
        assert_eq!(emit.event.key.as_deref(), Some(&b"k-1"[..]));
        assert_eq!(emit.event.payload, br#"{"n":10,"v":{"seq": 1}}"#);

        let eleventh = call(&version, root.path(), b"10", Some("k-1")).await;
        let CallOutcome::Ok(eleventh) = eleventh else {
            panic!("{eleventh:?}");
        };
        assert!(eleventh.emits.is_empty());

        let corrupt = call(&version, root.path(), b"ten", Some("k-1")).await;
        assert!(matches!(corrupt, CallOutcome::Reject(_)), "{corrupt:?}");
        let unkeyed = call(&version, root.path(), b"1", None).await;
        assert!(matches!(unkeyed, CallOutcome::Reject(_)), "{unkeyed:?}");
    }
}
