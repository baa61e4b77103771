//! The one place where errors become gRPC statuses. Messages come from the errors themselves
//! and say what to do.

use tonic::{Code, Status};

use crate::core::alloc::AllocError;
use crate::core::pools::PoolError;
use crate::device::host::HostMemError;

fn io_code(e: &std::io::Error) -> Code {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::ENOMEM | libc::EDQUOT) => Code::ResourceExhausted,
        Some(libc::EACCES | libc::EPERM) => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

impl From<PoolError> for Status {
    fn from(e: PoolError) -> Self {
        let code = match &e {
            PoolError::InvalidName(_) | PoolError::UnknownDevice { .. } | PoolError::ZeroSize => {
                Code::InvalidArgument
            }
            PoolError::AlreadyExists(_) => Code::AlreadyExists,
            PoolError::OverBudget { .. } => Code::ResourceExhausted,
            PoolError::NotFound(_) => Code::NotFound,
            PoolError::InUse { .. } => Code::FailedPrecondition,
            PoolError::HostMem {
                source: HostMemError::Io { source, .. },
                ..
            } => io_code(source),
            PoolError::HostMem { .. } | PoolError::Dir { .. } => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<AllocError> for Status {
    fn from(e: AllocError) -> Self {
        let code = match &e {
            AllocError::Exhausted { .. } => Code::ResourceExhausted,
            AllocError::Retired => Code::FailedPrecondition,
            AllocError::BadAlign(_) => Code::InvalidArgument,
            AllocError::NotAllocated { .. } => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// A blocking task that panicked or was cancelled: the daemon stays up, the caller learns.
pub fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("internal task failed: {e}"))
}
