//! Test doubles for the plugin contract (feature `test-kit`): a plugin whose handler is a
//! closure, so tests of the dispatcher need neither WebAssembly nor a hand-written
//! `PluginVersion`/`Instance` pair.

use crate::host::{Invocation, PluginInfo};
use crate::manifest::{LimitCeilings, Manifest};
use crate::plugin::{CallOutcome, Instance, PluginVersion};
use async_trait::async_trait;
use futures::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

type Handler = dyn Fn(Invocation) -> BoxFuture<'static, CallOutcome> + Send + Sync;

/// A plugin version that handles each call with a closure, and counts its live instances
/// (as a sandbox pool would count slots).
pub struct FnPlugin {
    info: Arc<PluginInfo>,
    handler: Arc<Handler>,
    live: Arc<AtomicUsize>,
}

impl FnPlugin {
    /// A version of the plugin `manifest` (TOML, parsed under the default ceilings) whose
    /// calls run `handler`.
    ///
    /// # Panics
    /// If the manifest does not parse: a test's own input.
    pub fn new<F, Fut>(manifest: &str, handler: F) -> Arc<Self>
    where
        F: Fn(Invocation) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CallOutcome> + Send + 'static,
    {
        #[allow(clippy::expect_used)]
        let manifest = Manifest::parse(manifest, &LimitCeilings::default())
            .expect("a test manifest that parses");
        Self::with_manifest(manifest, handler)
    }

    /// [`FnPlugin::new`] with a parsed manifest.
    pub fn with_manifest<F, Fut>(manifest: Manifest, handler: F) -> Arc<Self>
    where
        F: Fn(Invocation) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CallOutcome> + Send + 'static,
    {
        Arc::new(Self {
            info: Arc::new(PluginInfo::new(manifest, "test-kit".into())),
            handler: Arc::new(move |inv| Box::pin(handler(inv))),
            live: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Instances made and not yet dropped.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl PluginVersion for FnPlugin {
    fn info(&self) -> &Arc<PluginInfo> {
        &self.info
    }

    fn instance(&self) -> Box<dyn Instance> {
        self.live.fetch_add(1, Ordering::SeqCst);
        Box::new(FnInstance {
            handler: Arc::clone(&self.handler),
            live: Arc::clone(&self.live),
        })
    }
}

struct FnInstance {
    handler: Arc<Handler>,
    live: Arc<AtomicUsize>,
}

impl Drop for FnInstance {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Instance for FnInstance {
    async fn call(&mut self, invocation: Invocation) -> CallOutcome {
        (self.handler)(invocation).await
    }
}

/// Emit the event's payload, keyed like it, to `topic`: what most test handlers do.
pub fn echo(mut inv: Invocation, topic: &str) -> CallOutcome {
    let event = Arc::clone(inv.event());
    match inv.emit(topic, event.key.clone(), event.payload.clone(), vec![]) {
        Ok(()) => CallOutcome::Ok(inv.take_journal()),
        Err(e) => CallOutcome::Reject(e.to_string()),
    }
}
