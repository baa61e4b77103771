//! What a service call can fail with: the domain's own errors, and a blocking task that
//! panicked. `grpc::status` is the one place these become gRPC statuses.

use thiserror::Error;

use crate::core::leases::LeaseError;
use crate::core::models::ModelError;
use crate::core::pools::PoolError;

#[derive(Debug, Error)]
pub enum ServiceError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The fast path could not keep a handle to bind a connection to its lease.
    #[error("cannot keep a handle to the fast-path connection: {0}")]
    FastConnection(std::io::Error),
    /// A blocking task panicked or was cancelled: the daemon stays up, the caller learns.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl From<tokio::task::JoinError> for ServiceError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Task(e.to_string())
    }
}
