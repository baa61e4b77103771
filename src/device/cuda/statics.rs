//! Prefetch static buffers in GPU memory (cuMemAlloc), exported to workers as CUDA IPC memory
//! handles, and the copies into them: `cuMemcpyHtoDAsync` on the device's copy stream straight
//! from a pinned pool, or through a small pinned staging ring when the pool is not pinned, so the
//! copy stays asynchronous without pinning the pool (and never asserts pinning when the policy
//! said no).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUresult};

use super::driver::{DriverState, DriverThread};
use crate::device::host::HostRegion;
use crate::device::{AsyncCopy, CopyOp, DeviceError, StaticBuffer};

/// Bytes per staging buffer; two of them make the ring.
pub const STAGE_BYTES: usize = 64 << 20;

#[derive(Debug)]
pub struct CudaStatic {
    id: String,
    dptr: u64,
    len: u64,
    handle: Vec<u8>,
    /// Per slot: our inter-process "copy done" event (as an address) and its IPC handle.
    copy_done: Vec<(usize, Vec<u8>)>,
    /// Workers' "slot free" events, opened once per handle.
    opened: Arc<Mutex<HashMap<Vec<u8>, usize>>>,
    driver: Arc<DriverThread>,
}

/// What `alloc` made on the driver thread.
pub struct Allocated {
    dptr: u64,
    handle: Vec<u8>,
    copy_done: Vec<(usize, Vec<u8>)>,
}

impl CudaStatic {
    pub fn new(id: String, a: Allocated, len: u64, driver: Arc<DriverThread>) -> Self {
        Self {
            id,
            dptr: a.dptr,
            len,
            handle: a.handle,
            copy_done: a.copy_done,
            opened: Arc::default(),
            driver,
        }
    }
}

/// INTERPROCESS | DISABLE_TIMING: what cuIpcGetEventHandle requires.
const IPC_EVENT_FLAGS: u32 = 4 | 2;

pub(super) fn check(id: &str, call: &'static str, rc: CUresult) -> Result<(), DeviceError> {
    rc.result().map_err(|e| DeviceError::Cuda {
        device: id.to_string(),
        call,
        name: super::error_name(e),
    })
}

/// Allocates `len` bytes on the device and exports them, with one "copy done" event per slot.
/// Runs on the driver thread.
pub(super) fn alloc(
    st: &mut DriverState,
    id: &str,
    len: u64,
    slots: usize,
) -> Result<Allocated, DeviceError> {
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
    let mut copy_done = Vec::with_capacity(slots);
    for _ in 0..slots {
        let mut ev = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; context current.
        let made = check(id, "cuEventCreate", unsafe {
            sys::cuEventCreate(&mut ev, IPC_EVENT_FLAGS)
        })
        .and_then(|()| {
            let mut h = std::mem::MaybeUninit::<sys::CUipcEventHandle>::zeroed();
            // SAFETY: `ev` is a live inter-process event.
            check(id, "cuIpcGetEventHandle", unsafe {
                sys::cuIpcGetEventHandle(h.as_mut_ptr(), ev)
            })?;
            // SAFETY: initialised on success.
            Ok(unsafe { h.assume_init() }
                .reserved
                .iter()
                .map(|&b| b as u8)
                .collect::<Vec<u8>>())
        });
        match made {
            Ok(h) => copy_done.push((ev as usize, h)),
            Err(e) => {
                // SAFETY: releasing what this function created so far.
                unsafe {
                    for (ev, _) in &copy_done {
                        sys::cuEventDestroy_v2(*ev as sys::CUevent);
                    }
                    sys::cuMemFree_v2(dptr);
                }
                return Err(e);
            }
        }
    }
    Ok(Allocated {
        dptr,
        handle: handle.reserved.iter().map(|&b| b as u8).collect(),
        copy_done,
    })
}

/// Enqueues `ops` on the copy stream: direct from a pinned pool, through the staging ring
/// otherwise.
fn enqueue(
    st: &mut DriverState,
    id: &str,
    base: usize,
    dptr: u64,
    ops: &[CopyOp],
    src_pinned: bool,
) -> Result<(), DeviceError> {
    let stream = st.stream()?;
    if !src_pinned {
        return staged_copy(st, id, base, dptr, ops);
    }
    for op in ops {
        // SAFETY: source inside the registered (pinned) pool, destination inside our allocation
        // (the lease computed both from the plan).
        let rc = unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dptr + op.dst_offset,
                (base + op.src_offset as usize) as *const _,
                op.len as usize,
                stream,
            )
        };
        check(id, "cuMemcpyHtoDAsync", rc)?;
    }
    Ok(())
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

    fn copy_done_events(&self) -> Vec<Vec<u8>> {
        self.copy_done.iter().map(|(_, h)| h.clone()).collect()
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
        self.driver.run_checked(move |st| {
            st.context()?;
            enqueue(st, &id, base, dptr, &ops, src_pinned)?;
            let stream = st.stream()?;
            // SAFETY: our own stream.
            check(&id, "cuStreamSynchronize", unsafe {
                sys::cuStreamSynchronize(stream)
            })
        })
    }

    fn copy_from_async(&self, req: AsyncCopy<'_>) -> Result<(), DeviceError> {
        let id = self.id.clone();
        let dptr = self.dptr;
        let base = req.src.as_ptr() as usize;
        let ops = req.ops.to_vec();
        let src_pinned = req.src_pinned;
        let done = self
            .copy_done
            .get(req.slot)
            .map(|(ev, _)| *ev)
            .ok_or_else(|| {
                DeviceError::Unsupported(format!("slot {} has no copy-done event", req.slot))
            })?;
        let slot_free = req.slot_free.map(<[u8]>::to_vec);
        let opened = Arc::clone(&self.opened);
        self.driver.run_checked(move |st| {
            st.context()?;
            let stream = st.stream()?;
            if let Some(handle) = slot_free {
                let ev = open_event(&id, &opened, handle)?;
                // SAFETY: an event opened from the worker's handle; our stream.
                check(&id, "cuStreamWaitEvent", unsafe {
                    sys::cuStreamWaitEvent(stream, ev as sys::CUevent, 0)
                })?;
            }
            enqueue(st, &id, base, dptr, &ops, src_pinned)?;
            // SAFETY: our inter-process event, our stream.
            check(&id, "cuEventRecord", unsafe {
                sys::cuEventRecord(done as sys::CUevent, stream)
            })
        })
    }
}

/// Opens a worker's event handle once and caches it for the lease's life.
fn open_event(
    id: &str,
    opened: &Mutex<HashMap<Vec<u8>, usize>>,
    handle: Vec<u8>,
) -> Result<usize, DeviceError> {
    let mut cache = opened.lock().expect("event cache lock");
    if let Some(ev) = cache.get(&handle) {
        return Ok(*ev);
    }
    if handle.len() != 64 {
        return Err(DeviceError::Unsupported(format!(
            "slot_free_event must be a 64-byte CUDA IPC event handle, got {} bytes",
            handle.len()
        )));
    }
    let mut h = sys::CUipcEventHandle { reserved: [0; 64] };
    for (d, s) in h.reserved.iter_mut().zip(&handle) {
        *d = *s as std::ffi::c_char;
    }
    let mut ev = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the handle came from the worker's cuIpcGetEventHandle.
    check(id, "cuIpcOpenEventHandle", unsafe {
        sys::cuIpcOpenEventHandle(&mut ev, h)
    })?;
    cache.insert(handle, ev as usize);
    Ok(ev as usize)
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
            .for_each(|(d, s)| stream_copy(d, s))
    });
}

/// Copies with non-temporal stores where the CPU has them: the staging buffer is next read by
/// the DMA engine, not the CPU, so filling it through the cache only costs an extra read of every
/// destination line (read-for-ownership) on a path bounded by memory bandwidth.
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let len = dst.len().min(src.len());
        let head = dst.as_ptr().align_offset(16).min(len);
        dst[..head].copy_from_slice(&src[..head]);
        let blocks = (len - head) / 64;
        // SAFETY: SSE2 is part of x86_64. `d` is 16-byte aligned; both pointers stay inside their
        // slices for `blocks * 64` bytes; the sfence orders the streaming stores before the copy
        // is reported done (and the DMA is enqueued).
        unsafe {
            let mut d = dst.as_mut_ptr().add(head).cast::<__m128i>();
            let mut s = src.as_ptr().add(head).cast::<__m128i>();
            for _ in 0..blocks {
                let (a, b, c, e) = (
                    _mm_loadu_si128(s),
                    _mm_loadu_si128(s.add(1)),
                    _mm_loadu_si128(s.add(2)),
                    _mm_loadu_si128(s.add(3)),
                );
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
                d = d.add(4);
                s = s.add(4);
            }
            _mm_sfence();
        }
        let done = head + blocks * 64;
        dst[done..len].copy_from_slice(&src[done..len]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

impl Drop for CudaStatic {
    fn drop(&mut self) {
        let dptr = self.dptr;
        let id = self.id.clone();
        let events: Vec<usize> = self.copy_done.iter().map(|(ev, _)| *ev).collect();
        let opened: Vec<usize> = self
            .opened
            .lock()
            .expect("event cache lock")
            .values()
            .copied()
            .collect();
        let res = self.driver.run(move |st| {
            st.context()?;
            let stream = st.stream()?;
            // SAFETY: asynchronous copies may still be in flight into this buffer: drain the
            // stream, then release the events and the allocation made in `alloc`.
            unsafe {
                sys::cuStreamSynchronize(stream);
                for ev in events.iter().chain(&opened) {
                    sys::cuEventDestroy_v2(*ev as sys::CUevent);
                }
            }
            // SAFETY: see above.
            check(&id, "cuMemFree", unsafe { sys::cuMemFree_v2(dptr) })
        });
        if !matches!(res, Ok(Ok(()))) {
            tracing::warn!(device = %self.id, "freeing static buffers failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stream_copy_copies_every_byte_at_any_alignment() {
        let src: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        for (s_off, d_off, len) in [
            (0, 0, 10_000 - 64),
            (1, 3, 5000),
            (7, 0, 63),
            (0, 15, 4097),
            (3, 3, 0),
        ] {
            let mut dst = vec![0u8; 10_000];
            super::stream_copy(&mut dst[d_off..d_off + len], &src[s_off..s_off + len]);
            assert_eq!(
                &dst[d_off..d_off + len],
                &src[s_off..s_off + len],
                "{s_off} {d_off} {len}"
            );
            assert!(
                dst[..d_off].iter().all(|&b| b == 0) && dst[d_off + len..].iter().all(|&b| b == 0)
            );
        }
    }
}
