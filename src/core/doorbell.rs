//! A per-lease doorbell: OnloadToStatic without gRPC on the hot path. The worker writes the
//! layer into a small shared-memory page and wakes a daemon thread with a futex; the thread copies
//! the layer and wakes the worker back. Same semantics and errors as the RPC (the copy is complete
//! when the worker wakes), at the cost of two futex round trips instead of an HTTP/2 call.
//!
//! Layout of the page (little-endian words, all accessed atomically by both processes):
//!
//! | offset | word | written by | meaning |
//! | --- | --- | --- | --- |
//! | 0 | u32 `req_seq` | worker | incremented after writing `layer`; futex the daemon waits on |
//! | 4 | u32 `layer` | worker | model layer to onload |
//! | 8 | u32 `done_seq` | daemon | set to `req_seq` when answered; futex the worker waits on |
//! | 12 | u32 `status` | daemon | gRPC status code of the answer (0 = OK) |
//! | 16 | u64 `bytes` | daemon | bytes copied |
//! | 24 | u32 `closed` | daemon | 1 once the lease has ended |
//!
//! One request at a time per lease: a worker serialises its onloads, as it does with the RPC.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustix::thread::futex;

use crate::device::host::{HostMemError, HostRegion};

pub const REQ_SEQ: usize = 0;
pub const LAYER: usize = 4;
pub const DONE_SEQ: usize = 8;
pub const STATUS: usize = 12;
pub const BYTES: usize = 16;
pub const CLOSED: usize = 24;
pub const DOORBELL_BYTES: u64 = 4096;

/// The daemon's side: the page and the thread that answers it.
#[derive(Debug)]
pub struct Doorbell {
    region: Arc<HostRegion>,
}

impl Doorbell {
    pub fn create(path: &Path) -> Result<Self, HostMemError> {
        Ok(Self {
            region: Arc::new(HostRegion::create(path, DOORBELL_BYTES)?),
        })
    }

    pub fn path(&self) -> &Path {
        self.region.path()
    }

    /// Starts the thread that answers this doorbell with `handler`, which returns the status
    /// code and bytes of one onload, or None once the lease is gone. The thread exits when the
    /// doorbell is closed.
    pub fn serve(&self, name: String, handler: Handler) -> std::io::Result<()> {
        let region = Arc::clone(&self.region);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || answer(&region, &handler))?;
        Ok(())
    }

    /// Ends the doorbell: the thread exits and a waiting worker is woken with `closed`.
    pub fn close(&self) {
        self.region.atomic_u32(CLOSED).store(1, Ordering::Release);
        for word in [REQ_SEQ, DONE_SEQ] {
            let _ = futex::wake(
                self.region.atomic_u32(word),
                futex::Flags::empty(),
                u32::MAX,
            );
        }
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        self.close();
        let _ = self.region.unlink();
    }
}

/// Waits on `word` while it still equals `seen`, for at most `timeout` (spurious wake-ups and
/// timeouts just make the caller look again).
pub fn wait_while(word: &AtomicU32, seen: u32, timeout: Duration) {
    let ts = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    let _ = futex::wait(word, futex::Flags::empty(), seen, Some(&ts));
}

/// Answers one doorbell request: (status code, bytes), or None when the lease is gone. Status
/// codes are the caller's (the gRPC layer's), so this module stays protocol-agnostic.
pub type Handler = Box<dyn Fn(u32) -> Option<(u32, u64)> + Send>;

fn answer(region: &HostRegion, handler: &Handler) {
    let req = region.atomic_u32(REQ_SEQ);
    let done = region.atomic_u32(DONE_SEQ);
    let closed = region.atomic_u32(CLOSED);
    loop {
        let answered = done.load(Ordering::Acquire);
        let seq = req.load(Ordering::Acquire);
        if closed.load(Ordering::Acquire) != 0 {
            return;
        }
        if seq == answered {
            wait_while(req, seq, Duration::from_secs(1));
            continue;
        }
        let layer = region.atomic_u32(LAYER).load(Ordering::Acquire);
        let Some((status, bytes)) = handler(layer) else {
            return;
        };
        region.atomic_u32(STATUS).store(status, Ordering::Relaxed);
        region.atomic_u64(BYTES).store(bytes, Ordering::Relaxed);
        done.store(seq, Ordering::Release);
        let _ = futex::wake(done, futex::Flags::empty(), u32::MAX);
    }
}
