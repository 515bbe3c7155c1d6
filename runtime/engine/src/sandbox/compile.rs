//! Compiling components and the compiled-artifact cache: a component is checked against
//! the host's world before it is accepted, and its native code is kept on disk under its
//! content hash and the engine's compatibility hash, so a restart does not recompile.

use super::{HostState, LoadError, Sandbox, engine_err};
use crate::bindings::EventHandlerPre;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wasmtime::Engine;
use wasmtime::component::Component;

impl Sandbox {
    /// Check the header, compile, and check the component against the host's world.
    /// CPU-heavy: call it off the async runtime (e.g. in `spawn_blocking`).
    pub fn compile(&self, bytes: &[u8]) -> Result<Component, LoadError> {
        if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
            return Err(LoadError::NotWasm);
        }
        if wasmparser::Parser::is_core_wasm(bytes) {
            return Err(LoadError::CoreModule);
        }
        if !wasmparser::Parser::is_component(bytes) {
            return Err(LoadError::Invalid(
                "unknown WebAssembly layer or version".into(),
            ));
        }
        let component = Component::new(&self.engine, bytes)
            .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
        self.check_world(&component)?;
        Ok(component)
    }

    pub(super) fn check_world(
        &self,
        component: &Component,
    ) -> Result<EventHandlerPre<HostState>, LoadError> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        EventHandlerPre::new(pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))
    }

    fn compiled_path(&self, hash: &str) -> PathBuf {
        self.config
            .compiled_dir
            .join(format!("{hash}-{}.cwasm", self.engine_hash))
    }

    /// Load the component with content hash `hash`: from the compiled-artifact cache if
    /// present, else compile `bytes` and write the cache. Blocking.
    pub fn load_cached(&self, hash: &str, bytes: &[u8]) -> Result<Component, LoadError> {
        let path = self.compiled_path(hash);
        let lock = {
            let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(loading.entry(hash.to_owned()).or_default())
        };
        let _one_at_a_time = lock.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.load_locked(&path, bytes);
        drop(_one_at_a_time);
        let mut loading = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the lock once nobody else holds or waits for it.
        if loading.get(hash).is_some_and(|l| Arc::strong_count(l) <= 2) {
            loading.remove(hash);
        }
        result
    }

    fn load_locked(&self, path: &Path, bytes: &[u8]) -> Result<Component, LoadError> {
        if path.exists() {
            match deserialize(&self.engine, path) {
                Ok(c) => {
                    self.check_world(&c)?;
                    return Ok(c);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "compiled artifact unusable; recompiling")
                }
            }
        }
        let component = self.compile(bytes)?;
        let serialized = component.serialize().map_err(engine_err)?;
        write_atomic(path, &serialized).map_err(engine_err)?;
        Ok(component)
    }

    /// Whether a compiled artifact for `hash` is cached.
    pub fn is_cached(&self, hash: &str) -> bool {
        self.compiled_path(hash).exists()
    }
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> Result<Component, LoadError> {
    // SAFETY: the file was written by `Component::serialize` of this engine configuration
    // (the name carries the engine's compatibility hash) into the runtime's own data
    // directory, which only the runtime writes; wasmtime also checks the header.
    unsafe { Component::deserialize_file(engine, path) }.map_err(engine_err)
}

/// Write `bytes` to `path` through a temporary file of its own (unique, so concurrent
/// writers never share one) and a rename, so a crash never leaves a half-written file
/// under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map(|_| ()).map_err(|e| e.error)
}
