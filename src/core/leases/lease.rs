//! One worker lease: the model and plan it holds, its static buffers, the copies that onload
//! each offloaded layer, and its fast-path connections.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{LeaseError, MAX_FAST_CONNECTIONS};
use crate::core::backend::BackendConfig;
use crate::core::backend::access::UvaMode;
use crate::core::backend::plan::Plan;
use crate::core::models::model::{Model, TensorEntry};
use crate::core::pin_policy::PinDecision;
use crate::core::pools::HostReservation;
use crate::core::spares::Spares;
use crate::core::static_budget::StaticReservation;
use crate::device::{AsyncCopy, CopyOp, SlotLocks, SlotWrite, StaticBuffer};

#[derive(Debug, Default)]
pub(super) struct FastConnections {
    next: u64,
    open: HashMap<u64, UnixStream>,
}

/// Where one tensor's static copy lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticSlot {
    pub offset: u64,
}

#[derive(Debug)]
pub struct Lease {
    pub id: String,
    pub worker_name: String,
    pub model: Arc<Model>,
    pub ttl: Duration,
    pub backend: Option<BackendConfig>,
    pub pin: PinDecision,
    pub pinned: bool,
    pub uva_mode: UvaMode,
    /// The model's table, shared with it.
    pub tensors: Arc<Vec<TensorEntry>>,
    pub plan: Plan,
    /// Per tensor, its slot in `statics` (PREFETCH tensors only).
    pub static_slots: Vec<Option<StaticSlot>>,
    pub statics: Option<Box<dyn StaticBuffer>>,
    /// The host budget the cpu static buffers hold; handed on with them.
    pub host_reservation: Option<HostReservation>,
    /// End the lease when its last fast-path connection closes.
    pub end_with_fast_path: bool,
    /// This lease's share of leases.max_static_bytes_per_device, returned when it ends.
    pub(super) _device_reservation: Option<StaticReservation>,
    /// Where the static buffers go when the lease ends.
    pub(super) spares: Arc<Spares>,
    /// Open fast-path connections by number, shut down when the lease ends; None once ended.
    pub(super) connections: Mutex<Option<FastConnections>>,
    /// Per offloaded layer index k, the copies that onload it.
    pub(super) onload_ops: HashMap<u32, Vec<CopyOp>>,
    /// One writer per static slot at a time, whichever thread the onload came on.
    pub(super) slot_locks: SlotLocks,
    pub(super) expires: Mutex<Instant>,
}

impl Lease {
    pub fn renew(&self) -> Instant {
        let mut e = self.expires.lock().expect("lease lock");
        *e = Instant::now() + self.ttl;
        *e
    }

    pub fn expires(&self) -> Instant {
        *self.expires.lock().expect("lease lock")
    }

    /// Binds a fast-path connection to this lease (`conn` is a handle to the same socket) so
    /// that ending the lease closes it. Returns the number to release it with.
    pub fn add_connection(&self, conn: UnixStream) -> Result<u64, LeaseError> {
        let mut guard = self.connections.lock().expect("lease lock");
        let conns = guard
            .as_mut()
            .ok_or_else(|| LeaseError::NotFound(self.id.clone()))?;
        if conns.open.len() >= MAX_FAST_CONNECTIONS {
            return Err(LeaseError::TooManyConnections(self.id.clone()));
        }
        conns.next += 1;
        conns.open.insert(conns.next, conn);
        Ok(conns.next)
    }

    /// Forgets a connection its worker closed.
    pub fn remove_connection(&self, number: u64) {
        if let Some(conns) = self.connections.lock().expect("lease lock").as_mut() {
            conns.open.remove(&number);
        }
    }

    /// Fast-path connections open now.
    pub fn connection_count(&self) -> usize {
        self.connections
            .lock()
            .expect("lease lock")
            .as_ref()
            .map_or(0, |c| c.open.len())
    }

    /// Shuts down every fast-path connection: their threads see the end of the stream and the
    /// workers get an error on their next request, instead of a lease that answers NOT_FOUND.
    pub(super) fn close_connections(&self) {
        let taken = self.connections.lock().expect("lease lock").take();
        for conn in taken.into_iter().flat_map(|c| c.open.into_values()) {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Copies a model layer into its static slot and waits for it; returns the bytes copied and
    /// the slot. Blocking.
    pub fn onload(&self, layer: u32) -> Result<(u64, usize), LeaseError> {
        let (ops, statics, slot) = self.layer_ops(layer)?;
        let write = self.slot_write(slot);
        statics.copy_from(self.model.pool().region(), ops, self.pinned, &write)?;
        Ok((ops.iter().map(|o| o.len).sum(), slot))
    }

    /// Enqueues a layer's copy into its slot without waiting (cuda); see
    /// `StaticBuffer::copy_from_async`. Returns the bytes enqueued and the slot.
    pub fn onload_async(
        &self,
        layer: u32,
        slot_free: Option<&[u8]>,
    ) -> Result<(u64, usize), LeaseError> {
        let (ops, statics, slot) = self.layer_ops(layer)?;
        let write = self.slot_write(slot);
        statics.copy_from_async(AsyncCopy {
            src: self.model.pool().region(),
            ops,
            src_pinned: self.pinned,
            slot: &write,
            slot_free,
        })?;
        Ok((ops.iter().map(|o| o.len).sum(), slot))
    }

    /// Holds `slot` for one copy; onloads of this lease on other threads wait for it.
    fn slot_write(&self, slot: usize) -> SlotWrite<'_> {
        self.slot_locks
            .lock(slot)
            .expect("layer_ops gives slots of this lease's plan")
    }

    /// The copies, buffers and slot for an offloaded layer.
    fn layer_ops(&self, layer: u32) -> Result<(&[CopyOp], &dyn StaticBuffer, usize), LeaseError> {
        if let Some(why) = self.model.out_of_service() {
            return Err(LeaseError::OutOfService {
                model: self.model.name.clone(),
                why: why.to_string(),
            });
        }
        let Some(pf) = &self.plan.prefetch else {
            return Err(LeaseError::NotPrefetch(self.model.name.clone()));
        };
        let not_offloaded = || LeaseError::LayerNotOffloaded {
            model: self.model.name.clone(),
            layer,
            offloaded: pf.offloaded_layers.clone(),
        };
        let ops = self.onload_ops.get(&layer).ok_or_else(not_offloaded)?;
        let k = pf
            .offloaded_layers
            .iter()
            .position(|&l| l == layer)
            .ok_or_else(not_offloaded)?;
        let statics = self
            .statics
            .as_deref()
            .expect("prefetch leases have static buffers");
        Ok((ops, statics, k % pf.slots.max(1)))
    }

    pub fn onload_bytes(&self, layer: u32) -> u64 {
        self.onload_ops
            .get(&layer)
            .map_or(0, |ops| ops.iter().map(|o| o.len).sum())
    }
}

impl Drop for Lease {
    /// The static buffers go first (to be kept for the next attach, or freed), before the
    /// model's pool ranges can be reused: a copy into them must never outlive its source.
    fn drop(&mut self) {
        if let Some(statics) = self.statics.take() {
            self.spares.put(statics, self.host_reservation.take());
        }
    }
}
