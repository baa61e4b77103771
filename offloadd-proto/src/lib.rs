//! The offloadd protocol, for the daemon and its clients alike: the `offloadd.v1` messages and
//! gRPC client generated from `proto/`, the message size limits both sides use, and the frames
//! of the onload fast path ([`fast`]). No transport and no server: those live in the client and
//! daemon crates.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("offloadd.v1");
}
pub use generated::*;

pub mod fast;

/// Largest request the daemon accepts: requests are names, paths and tensor specs; CreateModel
/// of a 100k-tensor MoE checkpoint is the largest, a few MiB. Bigger ones are refused before
/// they are buffered.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest answer: the tensor tables of such checkpoints (GetModel, AttachWorker; 9.2 MB at
/// 100k tensors). Our clients accept this much; gRPC's default of 4 MiB would not.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Descriptor set for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("offloadd_descriptor");

/// Clients name a backend by its settings: `Some(prefetch_config.into())`.
impl From<UvaConfig> for Backend {
    fn from(u: UvaConfig) -> Self {
        Backend {
            kind: Some(backend::Kind::Uva(u)),
        }
    }
}

impl From<PrefetchConfig> for Backend {
    fn from(p: PrefetchConfig) -> Self {
        Backend {
            kind: Some(backend::Kind::Prefetch(p)),
        }
    }
}
