//! Models: checkpoints (or engine-published tensors) placed in a pool, with a tensor table.

mod cache;
mod durable;
pub mod header;
mod header_json;
mod index;
pub mod loader;
pub mod model;
mod placement;
mod published;
mod registry;
pub mod remote_source;
pub mod source;

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::core::alloc::AllocError;
use crate::core::backend::BackendError;

pub use published::{NewPublished, Publication, PublishedTensor};
pub use registry::{
    LoadEnded, Models, ModelsParams, PendingLoad, RegisterRequest, state_name, wait_loaded,
};
pub(in crate::core) use registry::{NewModel, check_name, new_model};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(
        "model name {0:?} is invalid: use 1-64 characters of [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidName(String),
    #[error("model {0:?} already exists; unregister it first or pick another name")]
    AlreadyExists(String),
    #[error("model {0:?} not found; ListModels shows the models")]
    NotFound(String),
    #[error("pool {0:?} not found; create it with CreatePool first")]
    PoolNotFound(String),
    #[error("{0}: no such file or directory")]
    PathNotFound(PathBuf),
    #[error("{0}: path must be absolute")]
    RelativePath(PathBuf),
    #[error(
        "{path} resolves to {resolved}, outside models.roots {roots:?}; move the checkpoint under a root or add its directory to models.roots"
    )]
    OutsideRoots {
        path: PathBuf,
        resolved: PathBuf,
        roots: Vec<PathBuf>,
    },
    #[error(
        "models.roots is empty, so no checkpoint may be read; set models.roots (e.g. OFFLOADD_MODELS__ROOTS=/models)"
    )]
    NoRoots,
    #[error(
        "{0}: no model.safetensors or model.safetensors.index.json in this directory; point path at a .safetensors file or a checkpoint directory"
    )]
    NoWeights(PathBuf),
    #[error("{path}: invalid index: {why}")]
    BadIndex { path: PathBuf, why: String },
    #[error("{index} names shard {shard}, which does not exist; the checkpoint is incomplete")]
    MissingShard { index: PathBuf, shard: PathBuf },
    #[error("{index} says tensor {tensor:?} is in {shard}, but that shard does not contain it")]
    TensorNotInShard {
        tensor: String,
        shard: PathBuf,
        index: PathBuf,
    },
    #[error("tensor {tensor:?} appears in both {first} and {second}")]
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path}: {}{why}", tensor.as_ref().map(|t| format!("tensor {t:?}: ")).unwrap_or_default())]
    BadFile {
        path: PathBuf,
        tensor: Option<String>,
        why: String,
    },
    #[error(
        "{path} is {kind}, not a regular file; point path at a .safetensors file or a checkpoint directory"
    )]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pool {pool:?} cannot hold model {model:?}: it needs {needed} bytes, the pool has {free} of {size} bytes free (largest free range {largest}); unregister models, use a larger pool, or set pools.evict_idle = true"
    )]
    PoolFull {
        pool: String,
        model: String,
        needed: u64,
        free: u64,
        largest: u64,
        size: u64,
    },
    #[error(
        "pool {pool:?} is full: model {evicted:?} was evicted to make room for {model:?}, but a call in flight still holds it; its bytes return when that call ends, so retry"
    )]
    EvictionPending {
        pool: String,
        model: String,
        evicted: String,
    },
    #[error("model {name:?} has {workers} attached worker(s); detach them first")]
    InUse { name: String, workers: usize },
    #[error("model {name:?} is {state}; {what}")]
    WrongState {
        name: String,
        state: &'static str,
        what: &'static str,
    },
    #[error("tensor {tensor:?}: {why}")]
    BadTensorSpec { tensor: String, why: String },
    #[error(
        "wrong publish_token for model {0:?}: only the caller whose CreateModel made it may write or seal it, with the token that answer carried"
    )]
    NotPublisher(String),
    #[error(
        "model {model:?}: {len} bytes at pool offset {offset} are not inside one of its tensors; write each tensor at TensorInfo.offset, no further than its length"
    )]
    OutsideTensors {
        model: String,
        offset: u64,
        len: u64,
    },
    #[error("{why}")]
    NotDurable { why: String, no_space: bool },
    #[error("loading model {name:?} failed: {why}")]
    LoadFailed {
        name: String,
        why: String,
        /// Set when the load read from object storage and that failed: what the store said.
        remote: Option<crate::core::remote::RemoteKind>,
    },
    #[error("loading model {0:?} was cancelled because it was unregistered")]
    Cancelled(String),
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("pool: {0}")]
    Alloc(AllocError),
    #[error(transparent)]
    Remote(#[from] crate::core::remote::RemoteError),
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
