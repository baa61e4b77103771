//! CUDA access for the reference worker: opens the lease's static buffers by their IPC handles
//! and reads device memory back, so the worker can verify what OnloadToStatic put there. One of
//! the few modules with `unsafe` (driver FFI).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::driver::{CudaContext, result, sys};

/// A context on one device, made current on the calling thread before each call.
pub struct CudaAccess {
    ctx: Arc<CudaContext>,
}

/// The driver's name for an error (`CUDA_ERROR_…`), or its number.
fn name(e: cudarc::driver::DriverError) -> String {
    e.error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("CUresult {}", e.0 as i32))
}

impl CudaAccess {
    /// `device` is the lease segment's device, e.g. "cuda:0".
    pub fn new(device: &str) -> Result<Self, String> {
        let ordinal: usize = device
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{device:?} is not a cuda device"))?;
        // SAFETY: only tries to dlopen libcuda.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcuda is not available in this process".into());
        }
        let ctx = catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal)))
            .map_err(|_| "libcuda is missing a required symbol".to_string())?
            .map_err(name)?;
        Ok(Self { ctx })
    }

    /// Opens a 64-byte CUDA IPC memory handle exported by the daemon.
    pub fn open_ipc(&self, handle: &[u8]) -> Result<u64, String> {
        self.ctx.bind_to_thread().map_err(name)?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        if handle.len() != h.reserved.len() {
            return Err(format!("IPC handle of {} bytes, expected 64", handle.len()));
        }
        for (d, s) in h.reserved.iter_mut().zip(handle) {
            *d = *s as std::ffi::c_char;
        }
        let mut dptr = 0;
        // SAFETY: out-pointer to a local; the handle came from the daemon's cuIpcGetMemHandle;
        // LAZY_ENABLE_PEER_ACCESS (1) is the flag the driver documents for this call.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut dptr, h, 1) }
            .result()
            .map_err(name)?;
        Ok(dptr)
    }

    /// Copies `len` bytes at `dptr` back to the host.
    pub fn read(&self, dptr: u64, len: usize) -> Result<Vec<u8>, String> {
        self.ctx.bind_to_thread().map_err(name)?;
        let mut out = vec![0u8; len];
        // SAFETY: `dptr` lies inside memory opened by `open_ipc` for at least `len` bytes (the
        // lease's static offsets and lengths); `out` is a host buffer of `len` bytes.
        unsafe { result::memcpy_dtoh_sync(&mut out, dptr) }.map_err(name)?;
        Ok(out)
    }
}
