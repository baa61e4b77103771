//! Worker handlers: leases and onload-to-static.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

use super::blocking::blocking_or_undo;
use super::paging;
use super::status::join_error;
use super::tables::Tables;
use crate::core::Core;
use crate::core::leases::{AttachRequest, Lease, LeaseError};
use crate::device::DeviceKind;
use crate::fast;
use crate::metrics::Metrics;
use crate::proto::{self, Encoded};

/// Layers at most this large are copied on the async runtime (about 10 µs) when the device is
/// the cpu: a thread hop costs more than the copy. Larger ones, and every cuda copy (which waits
/// for the stream behind other leases' copies), go to a blocking thread, so no copy delays other
/// workers' calls.
const INLINE_COPY_BYTES: u64 = 64 << 10;

pub async fn attach(
    core: &Arc<Core>,
    tables: &Arc<Tables>,
    r: proto::AttachWorkerRequest,
) -> Result<Encoded<proto::Lease>, Status> {
    let req = AttachRequest {
        model: r.model,
        worker_name: r.worker_name,
        ttl: (r.ttl_ms > 0).then(|| Duration::from_millis(r.ttl_ms)),
        end_with_fast_path: r.end_with_fast_path,
    };
    let page = paging::rows(0, r.page_size);
    // The lease's table is encoded on the blocking thread too: the first lease of a model
    // with a backend encodes the whole table. That can outlast the caller; a lease whose id
    // never reaches it ends at once rather than holding on for its whole ttl.
    let tables = Arc::clone(tables);
    let (lease, reply) = blocking_or_undo(
        core,
        move |c| {
            c.leases.attach(&c.models, &c.pools, &req).map(|l| {
                let reply = tables.lease(&l, page);
                (l, reply)
            })
        },
        |c, (lease, _)| {
            let _ = c.leases.undelivered(&lease.id);
        },
    )
    .await?;
    // An answer the transport would refuse must not leave a lease behind for its whole ttl.
    let size = reply.bytes().len();
    if size > proto::MAX_RESPONSE_BYTES {
        let _ = core.leases.undelivered(&lease.id);
        return Err(LeaseError::ReplyTooLarge {
            size,
            max: proto::MAX_RESPONSE_BYTES,
        }
        .into());
    }
    Ok(reply)
}

pub fn keep_alive(core: &Core, id: &str) -> Result<proto::KeepAliveResponse, Status> {
    let lease = core.leases.keep_alive(id)?;
    Ok(proto::KeepAliveResponse {
        expires_in_ms: lease
            .expires()
            .saturating_duration_since(Instant::now())
            .as_millis() as u64,
        model_out_of_service: lease.model.out_of_service().unwrap_or_default().to_string(),
    })
}

pub async fn onload(
    core: &Core,
    r: proto::OnloadToStaticRequest,
) -> Result<proto::OnloadToStaticResponse, Status> {
    let lease = core.leases.get(&r.lease_id)?;
    let layer = r.layer;
    let started = Instant::now();
    let slot_free = (!r.slot_free_event.is_empty()).then_some(r.slot_free_event);
    let run = move |l: &Lease| onload_on(l, layer, r.async_copy, slot_free.as_deref());
    let on_cpu = lease.model.pool().device.info().kind == DeviceKind::Cpu;
    let (bytes, slot) = if on_cpu && lease.onload_bytes(layer) <= INLINE_COPY_BYTES {
        run(&lease)?
    } else {
        let l = Arc::clone(&lease);
        tokio::task::spawn_blocking(move || run(&l))
            .await
            .map_err(join_error)??
    };
    let slot = slot as u32;
    Ok(proto::OnloadToStaticResponse {
        bytes,
        slot,
        copy_micros: started.elapsed().as_micros() as u64,
    })
}

/// One onload, as the RPC and the fast path both ask for it. Returns the bytes and the slot.
fn onload_on(
    l: &Lease,
    layer: u32,
    async_copy: bool,
    slot_free: Option<&[u8]>,
) -> Result<(u64, usize), LeaseError> {
    match (async_copy, slot_free) {
        (true, free) => l.onload_async(layer, free),
        (false, None) => l.onload(layer),
        (false, Some(_)) => Err(LeaseError::SlotFreeWithoutAsync),
    }
}

/// A fast-path connection bound to a lease: the same copy and errors as [`onload`].
pub struct FastSession {
    lease: Arc<Lease>,
    number: u64,
    metrics: Arc<Metrics>,
    leases: Arc<crate::core::leases::Leases>,
}

impl FastSession {
    /// Binds a connection's hello to its lease, or refuses with the RPC's status.
    pub fn open(
        core: &Core,
        metrics: Arc<Metrics>,
        lease_id: &str,
        conn: &UnixStream,
    ) -> Result<Self, fast::Reply> {
        let refuse = |s: Status| fast::Reply::from_status(&s);
        let lease = core.leases.get(lease_id).map_err(|e| refuse(e.into()))?;
        let handle = conn.try_clone().map_err(|e| {
            refuse(Status::internal(format!(
                "cannot keep a handle to the connection: {e}"
            )))
        })?;
        let number = lease.add_connection(handle).map_err(|e| refuse(e.into()))?;
        tracing::debug!(lease = %lease.id, worker = %lease.worker_name, "fast-path connection bound");
        Ok(Self {
            lease,
            number,
            metrics,
            leases: Arc::clone(&core.leases),
        })
    }
}

impl fast::serve::Session for FastSession {
    fn onload(&mut self, req: fast::Request) -> fast::Reply {
        let started = Instant::now();
        let layer = req.layer;
        let slot_free = req
            .slot_free
            .as_ref()
            .map(<[u8; fast::EVENT_HANDLE]>::as_slice);
        match onload_on(&self.lease, layer, req.async_copy, slot_free) {
            Ok((bytes, slot)) => {
                self.metrics.onload(bytes, started.elapsed());
                self.metrics.fast_onload(tonic::Code::Ok);
                fast::Reply::ok(bytes, slot as u32)
            }
            Err(e) => {
                let s = Status::from(e);
                self.metrics.fast_onload(s.code());
                tracing::info!(lease = %self.lease.id, layer, code = ?s.code(), error = s.message(), "fast-path onload failed");
                fast::Reply::from_status(&s)
            }
        }
    }
}

impl Drop for FastSession {
    fn drop(&mut self) {
        self.lease.remove_connection(self.number);
        // On the connection's own thread, so freeing statics blocks nobody else.
        self.leases.fast_path_closed(&self.lease);
    }
}

/// GetLeaseTensors: a page of the table after AttachWorker's first. Blocking (the first page
/// asked for may encode the whole table).
pub fn lease_page(
    core: &Core,
    tables: &Tables,
    r: &proto::GetLeaseTensorsRequest,
) -> Result<Encoded<proto::LeaseTensorPage>, Status> {
    let lease = core.leases.get(&r.lease_id)?;
    let start = paging::Scope::lease(&lease).start_of(
        &r.page_token,
        "Lease.next_page_token or the previous page's next_page_token",
    )?;
    Ok(tables.lease_page(&lease, paging::rows(start, r.page_size)))
}
