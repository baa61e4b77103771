//! Workers: leases and onload-to-static.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::hop::{blocking, blocking_or_undo};
use super::{Service, ServiceError};
use crate::core::leases::{AttachRequest, Lease, LeaseError};
use crate::device::DeviceKind;
use crate::metrics::Metrics;

/// Layers at most this large are copied on the async runtime (about 10 µs) when the device is
/// the cpu: a thread hop costs more than the copy. Larger ones, and every cuda copy (which
/// waits for the stream behind other leases' copies), go to a blocking thread, so no copy
/// delays other workers' calls.
const INLINE_COPY_BYTES: u64 = 64 << 10;

/// One onload, as the RPC and the fast path both ask for it.
#[derive(Debug, Clone)]
pub struct OnloadRequest {
    pub layer: u32,
    /// Enqueue the copy and answer at once; the worker orders its reads after the copy's event.
    pub async_copy: bool,
    /// An IPC event the worker records when it is done reading the slot being overwritten.
    pub slot_free: Option<Vec<u8>>,
}

/// What an onload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Onloaded {
    pub bytes: u64,
    pub slot: u32,
    pub took: Duration,
}

impl Service {
    /// Grants a lease and renders the answer on the same blocking thread (the first lease of a
    /// model with a backend encodes the whole table). The lease ends at once, rather than
    /// holding statics and a slot for its whole ttl, when its id cannot reach the caller:
    /// `render` refused it (an answer the transport would not carry), or the caller went away
    /// while it was being made.
    pub async fn attach<R, E>(
        &self,
        req: AttachRequest,
        render: impl FnOnce(&Arc<Lease>) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<ServiceError> + Send + 'static,
    {
        let (_, reply) = blocking_or_undo(
            &self.core,
            move |c| {
                let lease = c
                    .leases
                    .attach(&c.models, &c.pools, &req)
                    .map_err(|e| E::from(e.into()))?;
                match render(&lease) {
                    Ok(reply) => Ok((lease.id.clone(), reply)),
                    Err(e) => {
                        let _ = c.leases.undelivered(&lease.id);
                        Err(e)
                    }
                }
            },
            |c, (id, _)| {
                let _ = c.leases.undelivered(&id);
            },
        )
        .await?;
        Ok(reply)
    }

    /// Renders a lease on a blocking thread (a page of its table may encode the whole table).
    pub async fn render_lease<R, E>(
        &self,
        id: String,
        render: impl FnOnce(&Arc<Lease>) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<ServiceError> + Send + 'static,
    {
        blocking(&self.core, move |c| {
            let lease = c.leases.get(&id).map_err(|e| E::from(e.into()))?;
            render(&lease)
        })
        .await
    }

    /// Renews a lease: a lookup and a clock read, no blocking.
    pub fn keep_alive(&self, id: &str) -> Result<Arc<Lease>, ServiceError> {
        Ok(self.core.leases.keep_alive(id)?)
    }

    /// Ends a lease. Off the runtime: it may free cuda static buffers (a stream sync and
    /// driver calls).
    pub async fn detach(&self, id: String) -> Result<(), ServiceError> {
        blocking(&self.core, move |c| {
            c.leases.detach(&id).map_err(ServiceError::from)
        })
        .await
    }

    /// Copies one layer into the lease's static buffers and counts it in the onload metrics.
    pub async fn onload(&self, id: &str, req: OnloadRequest) -> Result<Onloaded, ServiceError> {
        let lease = self.core.leases.get(id)?;
        let started = Instant::now();
        let on_cpu = lease.model.pool().device.info().kind == DeviceKind::Cpu;
        let (bytes, slot) = if on_cpu && lease.onload_bytes(req.layer) <= INLINE_COPY_BYTES {
            onload_on(&lease, &req)?
        } else {
            tokio::task::spawn_blocking(move || onload_on(&lease, &req)).await??
        };
        Ok(counted(&self.metrics, started, (bytes, slot)))
    }
}

/// An onload that ended well, counted in the onload metrics.
pub(super) fn counted(
    metrics: &Metrics,
    started: Instant,
    (bytes, slot): (u64, usize),
) -> Onloaded {
    let done = Onloaded {
        bytes,
        slot: slot as u32,
        took: started.elapsed(),
    };
    metrics.onload(done.bytes, done.took);
    done
}

/// One onload on the caller's thread. Returns the bytes and the slot.
pub(super) fn onload_on(l: &Lease, req: &OnloadRequest) -> Result<(u64, usize), LeaseError> {
    match (req.async_copy, req.slot_free.as_deref()) {
        (true, free) => l.onload_async(req.layer, free),
        (false, None) => l.onload(req.layer),
        (false, Some(_)) => Err(LeaseError::SlotFreeWithoutAsync),
    }
}
