//! What creating, finding and deleting pools can fail with; `grpc::status` maps each to a code.

use std::path::PathBuf;

use thiserror::Error;

use crate::device::host::HostMemError;

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(
        "pool name {0:?} is invalid: use 1-64 characters of [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidName(String),
    #[error("pool {0:?} already exists; delete it first or pick another name")]
    AlreadyExists(String),
    #[error("unknown device {device:?}; this node has {known:?} (see GetInfo)")]
    UnknownDevice { device: String, known: Vec<String> },
    #[error("size_bytes must be greater than 0")]
    ZeroSize,
    #[error(
        "pool {name:?} needs {requested} bytes but only {available} of the {budget}-byte host budget are free ({committed} committed to other pools and leases); delete a pool or raise pools.max_host_bytes"
    )]
    OverBudget {
        name: String,
        requested: u64,
        committed: u64,
        available: u64,
        budget: u64,
    },
    #[error(
        "the lease's static buffers need {requested} bytes of host memory but only {available} of the {budget}-byte host budget are free ({committed} committed to pools and other leases); detach idle workers, use a smaller prefetch_step, or raise pools.max_host_bytes"
    )]
    StaticsOverBudget {
        requested: u64,
        committed: u64,
        available: u64,
        budget: u64,
    },
    #[error("pool {0:?} not found; ListPools shows the pools")]
    NotFound(String),
    #[error(
        "device {device} is unavailable: it faulted with {cause}; restart offloadd or use another device"
    )]
    DeviceFaulted { device: String, cause: String },
    #[error(
        "pool {name:?} is in use ({used_bytes} bytes hold model weights); unregister its models first"
    )]
    InUse { name: String, used_bytes: u64 },
    #[error("pool {name:?}: {source}")]
    HostMem { name: String, source: HostMemError },
    #[error("pools.dir {dir}: {message}")]
    Dir { dir: PathBuf, message: String },
    #[error(
        "pool {name:?} needs {requested} bytes but {dir} has {free} of {total} bytes free; delete pools or unregister models there, give pools.dir more room (the emptyDir's sizeLimit), or ask for less"
    )]
    NoSpace {
        name: String,
        dir: PathBuf,
        requested: u64,
        free: u64,
        total: u64,
    },
    #[error(
        "journal.required: pool {name:?} was not created, since its journal record cannot be written and it would not survive a restart: {why}; free space in pools.dir or unset journal.required"
    )]
    NotDurable {
        name: String,
        why: String,
        no_space: bool,
    },
}
