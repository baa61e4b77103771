//! Worker handlers: leases and onload-to-static, over the RPC and the fast path.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Status;

use super::paging;
use super::tables::Tables;
use crate::core::leases::{AttachRequest, LeaseError};
use crate::fast;
use crate::metrics::Metrics;
use crate::proto::{self, Encoded};
use crate::service::{FastSession, OnloadRequest, Service, ServiceError};

pub async fn attach(
    svc: &Service,
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
    let tables = Arc::clone(tables);
    svc.attach(req, move |lease| {
        let reply = tables.lease(lease, page);
        // An answer the transport would refuse must not leave a lease behind.
        let size = reply.bytes().len();
        if size > proto::MAX_RESPONSE_BYTES {
            return Err(Status::from(ServiceError::from(
                LeaseError::ReplyTooLarge {
                    size,
                    max: proto::MAX_RESPONSE_BYTES,
                },
            )));
        }
        Ok(reply)
    })
    .await
}

pub fn keep_alive(svc: &Service, id: &str) -> Result<proto::KeepAliveResponse, Status> {
    let lease = svc.keep_alive(id)?;
    Ok(proto::KeepAliveResponse {
        expires_in_ms: lease
            .expires()
            .saturating_duration_since(Instant::now())
            .as_millis() as u64,
        model_out_of_service: lease.model.out_of_service().unwrap_or_default().to_string(),
    })
}

pub async fn onload(
    svc: &Service,
    r: proto::OnloadToStaticRequest,
) -> Result<proto::OnloadToStaticResponse, Status> {
    let req = OnloadRequest {
        layer: r.layer,
        async_copy: r.async_copy,
        slot_free: (!r.slot_free_event.is_empty()).then_some(r.slot_free_event),
    };
    let done = svc.onload(&r.lease_id, req).await?;
    Ok(proto::OnloadToStaticResponse {
        bytes: done.bytes,
        slot: done.slot,
        copy_micros: done.took.as_micros() as u64,
    })
}

/// GetLeaseTensors: a page of the table after AttachWorker's first.
pub async fn lease_page(
    svc: &Service,
    tables: &Arc<Tables>,
    r: proto::GetLeaseTensorsRequest,
) -> Result<Encoded<proto::LeaseTensorPage>, Status> {
    let tables = Arc::clone(tables);
    svc.render_lease(r.lease_id, move |lease| {
        let start = paging::Scope::lease(lease).start_of(
            &r.page_token,
            "Lease.next_page_token or the previous page's next_page_token",
        )?;
        Ok(tables.lease_page(lease, paging::rows(start, r.page_size)))
    })
    .await
}

/// The fast path's frames over a service session: the same statuses as the RPC, and the
/// per-code count the RPC gets from its trace layer.
pub struct FastFrames {
    session: FastSession,
    metrics: Arc<Metrics>,
}

impl FastFrames {
    /// Binds a connection's hello to its lease, or refuses with the RPC's status.
    pub fn open(svc: &Service, lease_id: &str, conn: &UnixStream) -> Result<Self, fast::Reply> {
        match FastSession::open(svc, lease_id, conn) {
            Ok(session) => Ok(Self {
                session,
                metrics: Arc::clone(svc.metrics()),
            }),
            Err(e) => Err(fast::Reply::from_status(&e.into())),
        }
    }
}

impl fast::serve::Session for FastFrames {
    fn onload(&mut self, req: fast::Request) -> fast::Reply {
        let layer = req.layer;
        let req = OnloadRequest {
            layer,
            async_copy: req.async_copy,
            slot_free: req.slot_free.map(|e| e.to_vec()),
        };
        match self.session.onload(&req) {
            Ok(done) => {
                self.metrics.fast_onload(tonic::Code::Ok);
                fast::Reply::ok(done.bytes, done.slot)
            }
            Err(e) => {
                let s = Status::from(e);
                self.metrics.fast_onload(s.code());
                tracing::info!(lease = %self.session.lease_id(), layer, code = ?s.code(), error = s.message(), "fast-path onload failed");
                fast::Reply::from_status(&s)
            }
        }
    }
}
