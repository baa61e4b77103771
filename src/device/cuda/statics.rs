//! Prefetch static buffers in GPU memory (cuMemAlloc), exported to workers as CUDA IPC memory
//! handles, and the copies into them: `cuMemcpyHtoDAsync` on the device's copy stream straight
//! from a pinned pool, or through a small pinned staging ring when the pool is not pinned, so the
//! copy stays asynchronous without pinning the pool (and never asserts pinning when the policy
//! said no).

use std::sync::Arc;

use cudarc::driver::sys::{self, CUresult};

use super::driver::{DriverState, DriverThread};
use crate::device::host::HostRegion;
use crate::device::{CopyOp, DeviceError, StaticBuffer};

/// Bytes per staging buffer; two of them make the ring.
pub const STAGE_BYTES: usize = 64 << 20;

#[derive(Debug)]
pub struct CudaStatic {
    pub(super) id: String,
    pub(super) dptr: u64,
    pub(super) len: u64,
    pub(super) handle: Vec<u8>,
    pub(super) driver: Arc<DriverThread>,
}

pub(super) fn check(id: &str, call: &'static str, rc: CUresult) -> Result<(), DeviceError> {
    rc.result().map_err(|e| DeviceError::Cuda {
        device: id.to_string(),
        call,
        name: super::error_name(e),
    })
}

/// Allocates `len` bytes on the device and exports them. Runs on the driver thread.
pub(super) fn alloc(
    st: &mut DriverState,
    id: &str,
    len: u64,
) -> Result<(u64, Vec<u8>), DeviceError> {
    st.context()?;
    let mut dptr: sys::CUdeviceptr = 0;
    // SAFETY: out-pointer to a local; the context is current on this thread.
    check(id, "cuMemAlloc", unsafe {
        sys::cuMemAlloc_v2(&mut dptr, len.max(1) as usize)
    })?;
    let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
    // SAFETY: `dptr` was just allocated by cuMemAlloc; the handle is a plain 64-byte struct.
    let rc = unsafe { sys::cuIpcGetMemHandle(handle.as_mut_ptr(), dptr) };
    if let Err(e) = check(id, "cuIpcGetMemHandle", rc) {
        // SAFETY: freeing what we allocated above.
        unsafe { sys::cuMemFree_v2(dptr) };
        return Err(e);
    }
    // SAFETY: initialised by cuIpcGetMemHandle on success.
    let handle = unsafe { handle.assume_init() };
    Ok((dptr, handle.reserved.iter().map(|&b| b as u8).collect()))
}

impl StaticBuffer for CudaStatic {
    fn len(&self) -> u64 {
        self.len
    }

    fn path(&self) -> Option<&std::path::Path> {
        None
    }

    fn ipc_handle(&self) -> Vec<u8> {
        self.handle.clone()
    }

    fn copy_from(
        &self,
        src: &HostRegion,
        ops: &[CopyOp],
        src_pinned: bool,
    ) -> Result<(), DeviceError> {
        let id = self.id.clone();
        let dptr = self.dptr;
        let base = src.as_ptr() as usize;
        let ops = ops.to_vec();
        self.driver.run(move |st| {
            st.context()?;
            let stream = st.stream()?;
            if src_pinned {
                for op in &ops {
                    // SAFETY: source inside the registered (pinned) pool, destination inside our
                    // allocation (the lease computed both from the plan).
                    let rc = unsafe {
                        sys::cuMemcpyHtoDAsync_v2(
                            dptr + op.dst_offset,
                            (base + op.src_offset as usize) as *const _,
                            op.len as usize,
                            stream,
                        )
                    };
                    check(&id, "cuMemcpyHtoDAsync", rc)?;
                }
            } else {
                staged_copy(st, &id, base, dptr, &ops)?;
            }
            // SAFETY: our own stream.
            check(&id, "cuStreamSynchronize", unsafe {
                sys::cuStreamSynchronize(stream)
            })
        })?
    }
}

/// Pageable pool → pinned staging buffer (CPU copy, several threads) → device (async DMA),
/// double-buffered so filling one buffer overlaps the DMA of the other.
fn staged_copy(
    st: &mut DriverState,
    id: &str,
    base: usize,
    dptr: u64,
    ops: &[CopyOp],
) -> Result<(), DeviceError> {
    let stream = st.stream()?;
    let ring = st.staging()?;
    let mut slot = 0;
    for op in ops {
        let mut done = 0u64;
        while done < op.len {
            let n = (STAGE_BYTES as u64).min(op.len - done) as usize;
            if ring.in_flight[slot] {
                // SAFETY: an event recorded on our stream.
                check(id, "cuEventSynchronize", unsafe {
                    sys::cuEventSynchronize(ring.events[slot])
                })?;
            }
            let stage = ring.buffers[slot];
            let src = base + (op.src_offset + done) as usize;
            parallel_copy(&ring.copiers, src, stage as usize, n);
            // SAFETY: the staging buffer is pinned host memory of STAGE_BYTES; the destination
            // lies inside our allocation.
            let rc = unsafe {
                sys::cuMemcpyHtoDAsync_v2(dptr + op.dst_offset + done, stage as *const _, n, stream)
            };
            check(id, "cuMemcpyHtoDAsync", rc)?;
            // SAFETY: our event and stream.
            check(id, "cuEventRecord", unsafe {
                sys::cuEventRecord(ring.events[slot], stream)
            })?;
            ring.in_flight[slot] = true;
            slot ^= 1;
            done += n as u64;
        }
    }
    Ok(())
}

/// memcpy split over a persistent pool of threads: one core cannot fill a PCIe Gen5 link, and
/// spawning threads per chunk cost a fifth of the bandwidth on an H100 host.
fn parallel_copy(pool: &rayon::ThreadPool, src: usize, dst: usize, len: usize) {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 20;
    // SAFETY: the source is a pool range and the destination a staging buffer, both valid for
    // `len` bytes and disjoint; the slices live only for this call.
    let (s, d) = unsafe {
        (
            std::slice::from_raw_parts(src as *const u8, len),
            std::slice::from_raw_parts_mut(dst as *mut u8, len),
        )
    };
    pool.install(|| {
        d.par_chunks_mut(PIECE)
            .zip(s.par_chunks(PIECE))
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
}

impl Drop for CudaStatic {
    fn drop(&mut self) {
        let dptr = self.dptr;
        let id = self.id.clone();
        let res = self.driver.run(move |st| {
            st.context()?;
            // SAFETY: frees the allocation made in `alloc`; no copy is in flight (copies
            // synchronise before returning).
            check(&id, "cuMemFree", unsafe { sys::cuMemFree_v2(dptr) })
        });
        if !matches!(res, Ok(Ok(()))) {
            tracing::warn!(device = %self.id, "freeing static buffers failed");
        }
    }
}
