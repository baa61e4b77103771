//! A fast-path connection bound to a lease: the same copy, errors and metrics as the RPC.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use super::workers::{OnloadRequest, Onloaded, counted, onload_on};
use super::{Service, ServiceError};
use crate::core::leases::{Lease, Leases};
use crate::metrics::Metrics;

/// Lives as long as the connection, on the connection's own thread: its onloads block that
/// thread and no other.
#[derive(Debug)]
pub struct FastSession {
    lease: Arc<Lease>,
    number: u64,
    metrics: Arc<Metrics>,
    leases: Arc<Leases>,
}

impl FastSession {
    /// Binds a connection's hello to its lease: the lease closes the connection when it ends.
    pub fn open(svc: &Service, lease_id: &str, conn: &UnixStream) -> Result<Self, ServiceError> {
        let lease = svc.core.leases.get(lease_id)?;
        let handle = conn.try_clone().map_err(ServiceError::FastConnection)?;
        let number = lease.add_connection(handle)?;
        tracing::debug!(lease = %lease.id, worker = %lease.worker_name, "fast-path connection bound");
        Ok(Self {
            lease,
            number,
            metrics: Arc::clone(&svc.metrics),
            leases: Arc::clone(&svc.core.leases),
        })
    }

    pub fn lease_id(&self) -> &str {
        &self.lease.id
    }

    /// Blocking: copies on this connection's thread.
    pub fn onload(&mut self, req: &OnloadRequest) -> Result<Onloaded, ServiceError> {
        let started = Instant::now();
        let done = onload_on(&self.lease, req)?;
        Ok(counted(&self.metrics, started, done))
    }
}

impl Drop for FastSession {
    fn drop(&mut self) {
        self.lease.remove_connection(self.number);
        // On the connection's own thread, so freeing statics blocks nobody else.
        self.leases.fast_path_closed(&self.lease);
    }
}
