//! Prefetch static buffers in GPU memory (cuMemAlloc), exported to workers as CUDA IPC memory
//! handles, and the copies into them: `cuMemcpyHtoDAsync` on the lease's own stream straight
//! from a pinned pool, or through a small pinned staging ring when the pool is not pinned, so the
//! copy stays asynchronous without pinning the pool (and never asserts pinning when the policy
//! said no). Each lease has its own stream, and a synchronous copy waits on an event recorded
//! after its own copies, on the calling thread: neither another lease's copies nor the driver
//! thread's queue stand between a worker and its layer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUresult};

use super::driver::{DriverState, DriverThread};
use super::pacer::{PIECE, Pacer, Request};
use crate::device::host::HostRegion;
use crate::device::{AsyncCopy, CopyOp, DeviceError, SlotWrite, StaticBuffer};

#[derive(Debug)]
pub struct CudaStatic {
    id: String,
    dptr: u64,
    len: u64,
    /// The lease's copy stream and the event a synchronous copy waits on (as addresses).
    stream: usize,
    synced: usize,
    /// The device's primary context, made current on threads that wait.
    ctx: usize,
    /// Copy straight from pageable memory when the pool is not pinned (coherent platforms, or
    /// `pin.staging_bytes = 0`) instead of through the pinned staging ring.
    direct_pageable: bool,
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
    stream: usize,
    synced: usize,
    ctx: usize,
    handle: Vec<u8>,
    copy_done: Vec<(usize, Vec<u8>)>,
}

/// How [`CudaStatic::new`] wires a buffer to its device.
pub struct StaticParts {
    pub id: String,
    pub len: u64,
    pub direct_pageable: bool,
    pub driver: Arc<DriverThread>,
}

impl CudaStatic {
    pub fn new(a: Allocated, p: StaticParts) -> Self {
        let StaticParts {
            id,
            len,
            direct_pageable,
            driver,
        } = p;
        Self {
            id,
            dptr: a.dptr,
            len,
            stream: a.stream,
            synced: a.synced,
            ctx: a.ctx,
            direct_pageable,
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

/// Allocates `len` bytes on the device and exports them, with the lease's stream, the event its
/// synchronous copies wait on and one "copy done" event per slot. Runs on the driver thread.
pub(super) fn alloc(
    st: &mut DriverState,
    id: &str,
    len: u64,
    slots: usize,
) -> Result<Allocated, DeviceError> {
    let ctx = st.context()? as usize;
    let mut made = Made::default();
    match alloc_into(&mut made, id, len, slots) {
        Ok(handle) => Ok(Allocated {
            dptr: made.dptr,
            stream: made.stream,
            synced: made.events[0],
            ctx,
            handle,
            copy_done: made.events[1..].iter().copied().zip(made.handles).collect(),
        }),
        Err(e) => {
            made.release();
            Err(e)
        }
    }
}

/// What `alloc_into` has made so far, so a failure part way releases exactly that.
#[derive(Default)]
struct Made {
    dptr: u64,
    stream: usize,
    /// The synchronous-copy event, then one "copy done" event per slot.
    events: Vec<usize>,
    handles: Vec<Vec<u8>>,
}

impl Made {
    fn release(&self) {
        // SAFETY: each handle below was created by `alloc_into` on this thread's context and
        // was never handed out; zero means not made.
        unsafe {
            for ev in &self.events {
                sys::cuEventDestroy_v2(*ev as sys::CUevent);
            }
            if self.stream != 0 {
                sys::cuStreamDestroy_v2(self.stream as sys::CUstream);
            }
            if self.dptr != 0 {
                sys::cuMemFree_v2(self.dptr);
            }
        }
    }
}

fn alloc_into(made: &mut Made, id: &str, len: u64, slots: usize) -> Result<Vec<u8>, DeviceError> {
    // SAFETY: out-pointer to a field; the context is current on this thread.
    check(id, "cuMemAlloc", unsafe {
        sys::cuMemAlloc_v2(&mut made.dptr, len.max(1) as usize)
    })?;
    let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::zeroed();
    // SAFETY: `dptr` was just allocated by cuMemAlloc; the handle is a plain 64-byte struct.
    check(id, "cuIpcGetMemHandle", unsafe {
        sys::cuIpcGetMemHandle(handle.as_mut_ptr(), made.dptr)
    })?;
    // SAFETY: initialised by cuIpcGetMemHandle on success.
    let handle = unsafe { handle.assume_init() };
    let mut stream = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; non-blocking (1), so it never serialises with the legacy
    // stream.
    check(id, "cuStreamCreate", unsafe {
        sys::cuStreamCreate(&mut stream, 1)
    })?;
    made.stream = stream as usize;
    let mut ev = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; DISABLE_TIMING (2) makes the event cheap.
    check(id, "cuEventCreate", unsafe {
        sys::cuEventCreate(&mut ev, 2)
    })?;
    made.events.push(ev as usize);
    for _ in 0..slots {
        let mut ev = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; context current.
        check(id, "cuEventCreate", unsafe {
            sys::cuEventCreate(&mut ev, IPC_EVENT_FLAGS)
        })?;
        made.events.push(ev as usize);
        let mut h = std::mem::MaybeUninit::<sys::CUipcEventHandle>::zeroed();
        // SAFETY: `ev` is a live inter-process event.
        check(id, "cuIpcGetEventHandle", unsafe {
            sys::cuIpcGetEventHandle(h.as_mut_ptr(), ev)
        })?;
        // SAFETY: initialised on success.
        let h = unsafe { h.assume_init() };
        made.handles
            .push(h.reserved.iter().map(|&b| b as u8).collect());
    }
    Ok(handle.reserved.iter().map(|&b| b as u8).collect())
}

/// Where a copy goes and how its source is read.
#[derive(Clone, Copy)]
struct Target {
    dptr: u64,
    stream: usize,
    /// The source is registered (pinned) memory.
    src_pinned: bool,
    direct_pageable: bool,
}

/// Enqueues `ops` on the lease's stream: direct from a pinned pool (or from pageable memory
/// where that is the plan), through the staging ring otherwise.
fn enqueue(
    st: &mut DriverState,
    id: &str,
    base: usize,
    to: Target,
    ops: &[CopyOp],
) -> Result<(), DeviceError> {
    if !to.src_pinned && !to.direct_pageable {
        return staged_copy(st, id, base, to, ops);
    }
    for op in ops {
        // SAFETY: source inside the pool mapping (registered, or read by the driver as
        // pageable memory), destination inside our allocation (the lease computed both from the
        // plan).
        let rc = unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                to.dptr + op.dst_offset,
                (base + op.src_offset as usize) as *const _,
                op.len as usize,
                to.stream as sys::CUstream,
            )
        };
        check(id, "cuMemcpyHtoDAsync", rc)?;
    }
    Ok(())
}

/// [`enqueue`] for a pinned pool, in gated pieces the device's pacer opens.
fn enqueue_paced(
    pacer: &Pacer,
    req: &mut Request,
    id: &str,
    base: usize,
    to: Target,
    ops: &[CopyOp],
) -> Result<(), DeviceError> {
    let stream = to.stream as sys::CUstream;
    for p in pieces(ops, PIECE) {
        let (dst, src) = (to.dptr + p.dst_offset, base + p.src_offset as usize);
        pacer.piece(req, stream, p.len, id, || {
            // SAFETY: as in `enqueue`: inside the registered pool and our allocation.
            check(id, "cuMemcpyHtoDAsync", unsafe {
                sys::cuMemcpyHtoDAsync_v2(dst, src as *const _, p.len as usize, stream)
            })
        })?;
    }
    Ok(())
}

/// `ops` cut into copies of at most `max` bytes, in order.
fn pieces(ops: &[CopyOp], max: u64) -> impl Iterator<Item = CopyOp> + '_ {
    ops.iter().flat_map(move |op| {
        (0..op.len).step_by(max as usize).map(move |done| CopyOp {
            src_offset: op.src_offset + done,
            dst_offset: op.dst_offset + done,
            len: max.min(op.len - done),
        })
    })
}

impl CudaStatic {
    fn target(&self, src_pinned: bool) -> Target {
        Target {
            dptr: self.dptr,
            stream: self.stream,
            src_pinned,
            direct_pageable: self.direct_pageable,
        }
    }

    /// Waits on the calling thread (never the driver thread, whose queue other leases need).
    fn wait(&self, call: &'static str, f: impl FnOnce() -> CUresult) -> Result<(), DeviceError> {
        // SAFETY: the primary context stays retained by the driver thread for the device's life;
        // making it current here only affects this thread.
        let current =
            unsafe { cudarc::driver::result::ctx::set_current(self.ctx as sys::CUcontext) };
        let rc = match current {
            Ok(()) => f(),
            Err(e) => e.0,
        };
        self.driver.observe(check(&self.id, call, rc))
    }
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
        _slot: &SlotWrite<'_>,
    ) -> Result<(), DeviceError> {
        let id = self.id.clone();
        let to = self.target(src_pinned);
        let synced = self.synced;
        let base = src.as_ptr() as usize;
        let ops = ops.to_vec();
        self.driver.run_checked(move |st| {
            st.context()?;
            enqueue(st, &id, base, to, &ops)?;
            // SAFETY: our event, our stream.
            check(&id, "cuEventRecord", unsafe {
                sys::cuEventRecord(synced as sys::CUevent, to.stream as sys::CUstream)
            })
        })?;
        // SAFETY: our event, just recorded after this call's copies.
        self.wait("cuEventSynchronize", || unsafe {
            sys::cuEventSynchronize(synced as sys::CUevent)
        })
    }

    fn copy_from_async(&self, req: AsyncCopy<'_>) -> Result<(), DeviceError> {
        let id = self.id.clone();
        let to = self.target(req.src_pinned);
        let base = req.src.as_ptr() as usize;
        let ops = req.ops.to_vec();
        let done = self
            .copy_done
            .get(req.slot.slot())
            .map(|(ev, _)| *ev)
            .ok_or_else(|| {
                DeviceError::Unsupported(format!("slot {} has no copy-done event", req.slot.slot()))
            })?;
        let slot_free = req.slot_free.map(<[u8]>::to_vec);
        let opened = Arc::clone(&self.opened);
        self.driver.run_checked(move |st| {
            st.context()?;
            let stream = to.stream as sys::CUstream;
            let mut free_ev = None;
            if let Some(handle) = slot_free {
                let ev = open_event(&id, &opened, handle)?;
                // SAFETY: an event opened from the worker's handle; our stream.
                check(&id, "cuStreamWaitEvent", unsafe {
                    sys::cuStreamWaitEvent(stream, ev as sys::CUevent, 0)
                })?;
                free_ev = Some(ev);
            }
            // From a pinned pool, through the device's pacer, so this lease's layers cannot
            // hold the copy engine for everyone else. Staged copies pace themselves through the
            // ring, and a pageable copy must not sit behind a gate (the driver would block in it).
            let pacer = if to.src_pinned { st.pacer(&id) } else { None };
            match pacer.and_then(|p| Some((p, p.request(to.stream, free_ev)?))) {
                Some((pacer, mut req)) => {
                    let r = enqueue_paced(pacer, &mut req, &id, base, to, &ops);
                    // Submitted even on failure: every gate enqueued must open.
                    pacer.submit(req);
                    r?;
                }
                None => enqueue(st, &id, base, to, &ops)?,
            }
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
    to: Target,
    ops: &[CopyOp],
) -> Result<(), DeviceError> {
    let stream = to.stream as sys::CUstream;
    let ring = st.staging()?;
    let mut slot = 0;
    for p in pieces(ops, ring.stage_bytes as u64) {
        let n = p.len as usize;
        if ring.in_flight[slot] {
            // SAFETY: an event recorded on some lease's stream of this context.
            check(id, "cuEventSynchronize", unsafe {
                sys::cuEventSynchronize(ring.events[slot])
            })?;
        }
        let stage = ring.buffers[slot];
        let src = base + p.src_offset as usize;
        parallel_copy(&ring.copiers, src, stage as usize, n);
        // SAFETY: the staging buffer is pinned host memory of `stage_bytes`; the destination
        // lies inside our allocation.
        let rc = unsafe {
            sys::cuMemcpyHtoDAsync_v2(to.dptr + p.dst_offset, stage as *const _, n, stream)
        };
        check(id, "cuMemcpyHtoDAsync", rc)?;
        // SAFETY: our event and stream.
        check(id, "cuEventRecord", unsafe {
            sys::cuEventRecord(ring.events[slot], stream)
        })?;
        ring.in_flight[slot] = true;
        slot ^= 1;
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
        let stream = self.stream;
        // Asynchronous copies may still be writing this buffer or reading the pool: wait for
        // this lease's stream (here, not on the driver thread) before anything is freed.
        // SAFETY: our own stream, alive until the job below destroys it.
        if let Err(e) = self.wait("cuStreamSynchronize", || unsafe {
            sys::cuStreamSynchronize(stream as sys::CUstream)
        }) {
            tracing::warn!(device = %self.id, error = %e, "waiting for a lease's copies failed");
        }
        let dptr = self.dptr;
        let id = self.id.clone();
        let mut events: Vec<usize> = self.copy_done.iter().map(|(ev, _)| *ev).collect();
        events.push(self.synced);
        events.extend(
            self.opened
                .lock()
                .expect("event cache lock")
                .values()
                .copied(),
        );
        let res = self.driver.run(move |st| {
            st.context()?;
            st.forget_paced(stream);
            // SAFETY: the stream is drained; these are the events, stream and allocation made in
            // `alloc` (and the workers' events opened for this lease), used by nothing else.
            unsafe {
                for ev in &events {
                    sys::cuEventDestroy_v2(*ev as sys::CUevent);
                }
                sys::cuStreamDestroy_v2(stream as sys::CUstream);
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
    use super::{CopyOp, pieces};

    #[test]
    fn pieces_cover_every_op_exactly_in_order() {
        let op = |src_offset, dst_offset, len| CopyOp {
            src_offset,
            dst_offset,
            len,
        };
        let ops = [op(100, 0, 10), op(0, 50, 4), op(7, 7, 0)];
        let got: Vec<_> = pieces(&ops, 4).collect();
        assert_eq!(
            got,
            [op(100, 0, 4), op(104, 4, 4), op(108, 8, 2), op(0, 50, 4),]
        );
    }

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
