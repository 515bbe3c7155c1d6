//! The memory cap of one store.

use wasmtime::ResourceLimiter;

/// The memory cap of one store. Growing past it traps with [`MemoryCapExceeded`] instead
/// of returning -1 to the guest, so the cause is known exactly.
pub(super) struct MemoryCap {
    pub(super) cap: usize,
}

/// The typed trap raised when a guest grows memory past its cap.
#[derive(Debug, thiserror::Error)]
#[error("memory cap of {cap} bytes exceeded (wanted {desired})")]
pub struct MemoryCapExceeded {
    cap: usize,
    desired: usize,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            return Err(wasmtime::Error::new(MemoryCapExceeded {
                cap: self.cap,
                desired,
            }));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
