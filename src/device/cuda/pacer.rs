//! Fair use of a GPU's host-to-device copy engine across leases. The engine runs the copies of
//! every stream in the order they were submitted: on an H200, a 400 KB copy of one lease waited
//! 57 ms behind another lease's 3 GB of queued layers, whatever the streams' priorities. So
//! asynchronous copies from pinned pools are enqueued behind gates (`cuStreamWaitValue32` on a
//! word of mapped host memory, one word per lease) and a pacer thread opens them a piece at a
//! time, keeping at most `leases.copy_window_bytes` opened and unfinished. Another lease's copy
//! then waits behind that window at most (0.75 ms instead of 54 on an H200, with 0.98 of the
//! bandwidth). Everything is still enqueued, and each slot's "copy done" event recorded, before
//! OnloadToStatic answers: the worker's stream waits on that record.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cudarc::driver::sys::{self, CUresult};

use crate::device::DeviceError;

/// Bytes per gated piece: small enough that a window of a few keeps another lease's wait short.
pub const PIECE: u64 = 16 << 20;
/// Gate words (leases with paced copies at once); a lease beyond them is not paced.
const GATES: usize = 1024;
/// How often gates blocked on a worker's "slot free" event are looked at again.
const POLL: Duration = Duration::from_micros(50);

/// One asynchronous copy's gated pieces, in stream order.
pub struct Request {
    gate: usize,
    /// The worker's "slot free" event the copy waits on; no piece opens before it completes, so
    /// an opened piece never waits on anything outside the daemon.
    slot_free: Option<usize>,
    pieces: VecDeque<Piece>,
}

struct Piece {
    ticket: u32,
    bytes: u64,
    /// Recorded after the piece on the lease's stream.
    done: usize,
}

struct State {
    queue: VecDeque<Request>,
    /// Gate index of each paced lease, by its stream.
    gates: HashMap<usize, usize>,
    free: Vec<usize>,
    /// Per gate: the last ticket handed out and the last one opened.
    issued: Vec<u32>,
    opened: Vec<u32>,
    /// Spare events for pieces.
    events: Vec<usize>,
    /// Opened pieces not known to be finished (their events), oldest first, and their bytes.
    open: VecDeque<(usize, u64)>,
    open_bytes: u64,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Host address of the gate words (mapped, so the device polls them over PCIe).
    host: usize,
    /// Bytes opened and not yet copied, across the device's leases.
    window: u64,
}

impl Shared {
    /// Opens `gate` up to `ticket`; never moves a gate back (a stream waiting for a later ticket
    /// would wait forever).
    fn open(&self, st: &mut State, gate: usize, ticket: u32) {
        if (ticket.wrapping_sub(st.opened[gate]) as i32) > 0 {
            st.opened[gate] = ticket;
            // SAFETY: `host` is GATES u32 words of pinned host memory owned by the pacer for the
            // device's life; the device only reads them.
            unsafe { std::ptr::write_volatile((self.host as *mut u32).add(gate), ticket) };
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// The device's pacer: gate words and the thread that opens them.
pub struct Pacer {
    shared: Arc<Shared>,
    /// Device address of the gate words.
    dev: u64,
}

impl Pacer {
    /// Allocates the gate words and starts the thread. Runs on the driver thread (context
    /// current); `ctx` is made current on the pacer's thread too.
    pub fn start(ctx: sys::CUcontext, id: &str, window: u64) -> Result<Self, DeviceError> {
        let check = |call, rc: CUresult| super::statics::check(id, call, rc);
        let mut host = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; PORTABLE | DEVICEMAP so the device can read it.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut host, GATES * 4, 0x01 | 0x02)
        })?;
        // SAFETY: just allocated, GATES words.
        unsafe { std::ptr::write_bytes(host as *mut u32, 0, GATES) };
        let mut dev = 0;
        // SAFETY: `host` was allocated with DEVICEMAP above.
        if let Err(e) = check("cuMemHostGetDevicePointer", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0)
        }) {
            // SAFETY: freeing what was allocated above.
            unsafe { sys::cuMemFreeHost(host) };
            return Err(e);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                gates: HashMap::new(),
                free: (0..GATES).rev().collect(),
                issued: vec![0; GATES],
                opened: vec![0; GATES],
                events: Vec::new(),
                open: VecDeque::new(),
                open_bytes: 0,
                stop: false,
            }),
            wake: Condvar::new(),
            host: host as usize,
            window,
        });
        let (s, c) = (Arc::clone(&shared), ctx as usize);
        std::thread::Builder::new()
            .name(format!("{id}-pacer"))
            .spawn(move || run(&s, c))
            .map_err(|e| DeviceError::Unsupported(format!("copy pacer thread: {e}")))?;
        tracing::info!(
            device = id,
            window_bytes = window,
            piece_bytes = PIECE,
            "copy pacer started"
        );
        Ok(Self { shared, dev })
    }

    /// A request for the lease on `stream`, or None when every gate is taken (the copy then
    /// goes unpaced).
    pub fn request(&self, stream: usize, slot_free: Option<usize>) -> Option<Request> {
        let mut st = self.shared.state.lock().expect("pacer lock");
        let gate = match st.gates.get(&stream) {
            Some(&g) => g,
            None => {
                let g = st.free.pop()?;
                st.gates.insert(stream, g);
                g
            }
        };
        Some(Request {
            gate,
            slot_free,
            pieces: VecDeque::new(),
        })
    }

    /// Enqueues one gated piece on `stream`: the wait, the copy (via `copy`) and its event.
    /// Runs on the driver thread.
    pub fn piece(
        &self,
        req: &mut Request,
        stream: sys::CUstream,
        bytes: u64,
        id: &str,
        copy: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let check = |call, rc: CUresult| super::statics::check(id, call, rc);
        let (ticket, spare) = {
            let mut st = self.shared.state.lock().expect("pacer lock");
            st.issued[req.gate] = st.issued[req.gate].wrapping_add(1);
            (st.issued[req.gate], st.events.pop())
        };
        let done = match spare {
            Some(ev) => ev,
            None => {
                let mut ev = std::ptr::null_mut();
                // SAFETY: out-pointer to a local; DISABLE_TIMING (2); context current.
                check("cuEventCreate", unsafe { sys::cuEventCreate(&mut ev, 2) })?;
                ev as usize
            }
        };
        // Whatever fails below, the piece is in the request: the pacer opens its gate, so the
        // stream never waits for a ticket nobody will open.
        req.pieces.push_back(Piece {
            ticket,
            bytes,
            done,
        });
        // SAFETY: the gate word is ours for the device's life; GEQ (0) is a cyclic compare.
        check("cuStreamWaitValue32", unsafe {
            sys::cuStreamWaitValue32_v2(stream, self.dev + 4 * req.gate as u64, ticket, 0)
        })?;
        copy()?;
        // SAFETY: our event and the lease's stream.
        check("cuEventRecord", unsafe {
            sys::cuEventRecord(done as sys::CUevent, stream)
        })
    }

    /// Queues the request's pieces and opens what fits now, so an uncontended copy never waits
    /// for the pacer thread to wake; the thread opens the rest as pieces finish.
    pub fn submit(&self, req: Request) {
        if req.pieces.is_empty() {
            return;
        }
        let mut st = self.shared.state.lock().expect("pacer lock");
        st.queue.push_back(req);
        pump(&self.shared, &mut st);
        drop(st);
        self.shared.wake.notify_one();
    }

    /// The lease on `stream` is gone (its stream drained): its gate is free again.
    pub fn forget(&self, stream: usize) {
        let mut st = self.shared.state.lock().expect("pacer lock");
        if let Some(g) = st.gates.remove(&stream) {
            st.free.push(g);
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shared.state.lock().expect("pacer lock").stop = true;
        self.shared.wake.notify_one();
    }
}

/// The first request of each gate, in queue order, whose "slot free" event has completed.
fn eligible(st: &mut State) -> Option<usize> {
    let mut seen = Vec::new();
    for (i, r) in st.queue.iter_mut().enumerate() {
        if seen.contains(&r.gate) {
            continue;
        }
        seen.push(r.gate);
        if let Some(ev) = r.slot_free {
            // SAFETY: an event the lease opened from the worker's handle; it outlives the
            // request (the lease drains its stream, which needs this request opened, first).
            match unsafe { sys::cuEventQuery(ev as sys::CUevent) } {
                CUresult::CUDA_ERROR_NOT_READY => continue,
                _ => r.slot_free = None, // done, or an error the copy itself will report
            }
        }
        return Some(i);
    }
    None
}

/// Opens queued pieces while the window has room.
fn pump(shared: &Shared, st: &mut State) {
    while st.open_bytes < shared.window {
        let Some(i) = eligible(st) else { break };
        let r = &mut st.queue[i];
        let (gate, p) = (
            r.gate,
            r.pieces.pop_front().expect("requests are never empty"),
        );
        if r.pieces.is_empty() {
            st.queue.remove(i);
        }
        shared.open(st, gate, p.ticket);
        st.open.push_back((p.done, p.bytes));
        st.open_bytes += p.bytes;
    }
}

fn run(shared: &Shared, ctx: usize) {
    // SAFETY: the device's primary context, retained by the driver thread while the daemon runs.
    if unsafe { cudarc::driver::result::ctx::set_current(ctx as sys::CUcontext) }.is_err() {
        tracing::error!("copy pacer cannot use the device's context; paced copies will stall");
    }
    loop {
        let mut st = shared.state.lock().expect("pacer lock");
        pump(shared, &mut st);
        if let Some(&(ev, _)) = st.open.front() {
            drop(st);
            // SAFETY: an event recorded after an opened piece, which waits on nothing outside
            // this daemon, so this returns within the window's copy time. Only this thread
            // takes pieces off the front.
            unsafe { sys::cuEventSynchronize(ev as sys::CUevent) };
            let mut st = shared.state.lock().expect("pacer lock");
            let (ev, bytes) = st.open.pop_front().expect("front seen above");
            st.open_bytes -= bytes;
            st.events.push(ev);
            continue;
        }
        if st.stop && st.queue.is_empty() {
            return;
        }
        drop(if st.queue.is_empty() {
            shared.wake.wait(st).expect("pacer lock")
        } else {
            // Every queued copy waits on a worker's "slot free" event: look again shortly.
            shared.wake.wait_timeout(st, POLL).expect("pacer lock").0
        });
    }
}

#[cfg(test)]
mod tests {
    /// The gate compare the device uses (GEQ is cyclic), across the u32 wrap.
    #[test]
    fn gates_only_move_forward_across_the_wrap() {
        let later = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
        assert!(later(1, 0));
        assert!(later(0, u32::MAX), "0 follows u32::MAX");
        assert!(!later(u32::MAX, 0));
        assert!(!later(5, 5));
    }
}
