//! The one place where errors become gRPC statuses. Messages come from the errors themselves
//! and say what to do.

use tonic::{Code, Status};

use crate::core::alloc::AllocError;
use crate::core::models::ModelError;
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

impl From<ModelError> for Status {
    fn from(e: ModelError) -> Self {
        use ModelError as E;
        let code = match &e {
            E::InvalidName(_)
            | E::RelativePath(_)
            | E::NoWeights(_)
            | E::BadIndex { .. }
            | E::TensorNotInShard { .. }
            | E::DuplicateTensor { .. }
            | E::BadFile { .. }
            | E::BadTensorSpec { .. }
            | E::Backend(_) => Code::InvalidArgument,
            E::AlreadyExists(_) => Code::AlreadyExists,
            E::NotFound(_) | E::PoolNotFound(_) | E::PathNotFound(_) | E::MissingShard { .. } => {
                Code::NotFound
            }
            E::OutsideRoots { .. } | E::NoRoots => Code::PermissionDenied,
            E::PoolFull { .. } => Code::ResourceExhausted,
            E::InUse { .. } | E::WrongState { .. } => Code::FailedPrecondition,
            E::Io { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Code::NotFound,
                _ => io_code(source),
            },
            E::LoadFailed { .. } => Code::Internal,
            E::Cancelled(_) => Code::Aborted,
            E::Alloc(a) => return Status::from(a.clone()),
        };
        Status::new(code, e.to_string())
    }
}

/// A blocking task that panicked or was cancelled: the daemon stays up, the caller learns.
pub fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("internal task failed: {e}"))
}
