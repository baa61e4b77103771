//! The one place where errors become gRPC statuses. Messages come from the errors themselves
//! and say what to do.

use tonic::{Code, Status};

use crate::core::alloc::AllocError;
use crate::core::leases::LeaseError;
use crate::core::models::ModelError;
use crate::core::pools::PoolError;
use crate::core::remote::RemoteKind;
use crate::device::DeviceError;
use crate::device::host::HostMemError;
use crate::service::ServiceError;

fn io_code(e: &std::io::Error) -> Code {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::ENOMEM | libc::EDQUOT) => Code::ResourceExhausted,
        Some(libc::EACCES | libc::EPERM) => Code::PermissionDenied,
        _ => Code::Internal,
    }
}

impl From<PoolError> for Status {
    fn from(e: PoolError) -> Self {
        status(pool_code(&e), e.to_string())
    }
}

fn pool_code(e: &PoolError) -> Code {
    match e {
        PoolError::InvalidName(_) | PoolError::UnknownDevice { .. } | PoolError::ZeroSize => {
            Code::InvalidArgument
        }
        PoolError::AlreadyExists(_) => Code::AlreadyExists,
        PoolError::OverBudget { .. }
        | PoolError::StaticsOverBudget { .. }
        | PoolError::NoSpace { .. }
        | PoolError::NotDurable { no_space: true, .. } => Code::ResourceExhausted,
        PoolError::NotDurable { .. } => Code::FailedPrecondition,
        PoolError::NotFound(_) => Code::NotFound,
        PoolError::DeviceFaulted { .. } => Code::Unavailable,
        PoolError::InUse { .. } => Code::FailedPrecondition,
        PoolError::HostMem {
            source: HostMemError::Io { source, .. },
            ..
        } => io_code(source),
        PoolError::HostMem { .. } | PoolError::Dir { .. } => Code::Internal,
    }
}

impl From<AllocError> for Status {
    fn from(e: AllocError) -> Self {
        status(alloc_code(&e), e.to_string())
    }
}

fn alloc_code(e: &AllocError) -> Code {
    match e {
        AllocError::Exhausted { .. } => Code::ResourceExhausted,
        AllocError::Retired => Code::FailedPrecondition,
        AllocError::BadAlign(_) => Code::InvalidArgument,
        AllocError::NotAllocated { .. } | AllocError::NotFree { .. } => Code::Internal,
    }
}

impl From<ModelError> for Status {
    fn from(e: ModelError) -> Self {
        if let ModelError::Alloc(a) = e {
            return Status::from(a);
        }
        status(model_code(&e), e.to_string())
    }
}

fn model_code(e: &ModelError) -> Code {
    use ModelError as E;
    match e {
        E::InvalidName(_)
        | E::RelativePath(_)
        | E::NoWeights(_)
        | E::BadIndex { .. }
        | E::TensorNotInShard { .. }
        | E::DuplicateTensor { .. }
        | E::BadFile { .. }
        | E::NotRegularFile { .. }
        | E::BadTensorSpec { .. }
        | E::OutsideTensors { .. }
        | E::Backend(_) => Code::InvalidArgument,
        E::NotPublisher(_) => Code::PermissionDenied,
        E::NotDurable { no_space: true, .. } => Code::ResourceExhausted,
        E::NotDurable { .. } => Code::FailedPrecondition,
        E::AlreadyExists(_) => Code::AlreadyExists,
        E::NotFound(_) | E::PoolNotFound(_) | E::PathNotFound(_) | E::MissingShard { .. } => {
            Code::NotFound
        }
        E::OutsideRoots { .. } | E::NoRoots => Code::PermissionDenied,
        E::PoolFull { .. } => Code::ResourceExhausted,
        // Transient: the evicted model's bytes return when the call holding it ends.
        E::EvictionPending { .. } => Code::Unavailable,
        E::InUse { .. } | E::WrongState { .. } => Code::FailedPrecondition,
        E::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => Code::NotFound,
            _ => io_code(source),
        },
        E::LoadFailed { remote: None, .. } => Code::Internal,
        E::LoadFailed {
            remote: Some(kind), ..
        } => remote_code(*kind),
        E::Cancelled(_) => Code::Aborted,
        E::Alloc(a) => alloc_code(a),
        E::Remote(r) => remote_code(r.kind()),
    }
}

fn remote_code(kind: RemoteKind) -> Code {
    match kind {
        RemoteKind::NotAllowed | RemoteKind::Denied => Code::PermissionDenied,
        RemoteKind::BadUrl | RemoteKind::Short => Code::InvalidArgument,
        RemoteKind::NotFound => Code::NotFound,
        // A version that changed under the load: retry once the upload is complete.
        RemoteKind::Changed | RemoteKind::Cancelled => Code::Aborted,
        RemoteKind::Unavailable => Code::Unavailable,
        RemoteKind::CredentialsFile => Code::FailedPrecondition,
    }
}

impl From<LeaseError> for Status {
    fn from(e: LeaseError) -> Self {
        let code = match &e {
            LeaseError::NotFound(_) => Code::NotFound,
            LeaseError::TooMany { .. }
            | LeaseError::StaticBudget(_)
            | LeaseError::ReplyTooLarge { .. } => Code::ResourceExhausted,
            LeaseError::Pool(p) => pool_code(p),
            LeaseError::Model(m) => model_code(m),
            LeaseError::NotReady { .. }
            | LeaseError::NotPrefetch(_)
            | LeaseError::OutOfService { .. } => Code::FailedPrecondition,
            LeaseError::LayerNotOffloaded { .. }
            | LeaseError::NoWorkerName
            | LeaseError::SlotFreeWithoutAsync => Code::InvalidArgument,
            LeaseError::TooManyConnections(_) => Code::ResourceExhausted,
            LeaseError::Device(d) => device_code(d),
        };
        status(code, e.to_string())
    }
}

fn device_code(d: &DeviceError) -> Code {
    match d {
        DeviceError::Gone(_) | DeviceError::Faulted { .. } => Code::Unavailable,
        DeviceError::Cuda { name, .. } if crate::device::cuda::is_sticky(name) => Code::Unavailable,
        DeviceError::Unsupported(_) => Code::FailedPrecondition,
        DeviceError::Cuda { name, .. } if name.contains("OUT_OF_MEMORY") => Code::ResourceExhausted,
        DeviceError::HostMem(crate::device::host::HostMemError::Io { source, .. }) => {
            io_code(source)
        }
        _ => Code::Internal,
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Pool(e) => e.into(),
            ServiceError::Model(e) => e.into(),
            ServiceError::Lease(e) => e.into(),
            e @ (ServiceError::Task(_) | ServiceError::FastConnection(_)) => {
                status(Code::Internal, e.to_string())
            }
        }
    }
}

/// The most bytes of a message sent back. Messages echo what the caller sent (a name, a path),
/// and an echoed 16 KiB name would push the answer past what HTTP/2 clients accept for
/// headers, so the client would see "Stream removed" instead of the error.
const MAX_MESSAGE: usize = 1024;

/// Every error's Status is made here, so every message is bounded.
fn status(code: Code, message: String) -> Status {
    Status::new(code, clip(message))
}

fn clip(mut message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let total = message.len();
    let mut cut = MAX_MESSAGE;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(&format!("… ({} more bytes cut)", total - cut));
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_clipped_on_a_char_boundary() {
        assert_eq!(clip("short".into()), "short");
        let long = "é".repeat(2000); // 4000 bytes, 2 per char
        let c = clip(long);
        assert!(c.starts_with(&"é".repeat(512)));
        assert!(c.ends_with("(2976 more bytes cut)"), "{c}");
    }
}
