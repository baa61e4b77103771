//! Generated protobuf and gRPC code for `offloadd.v1`, and the few helpers around it.

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    tonic::include_proto!("offloadd.v1");

    /// The server side of `offloadd.v1.Offload`: it answers tensor tables as [`super::Encoded`]
    /// messages (see build.rs).
    pub mod server {
        include!(concat!(env!("OUT_DIR"), "/server/offloadd.v1.rs"));
    }
}
pub use generated::server::offload_server;
pub use generated::*;

mod encoded;
pub use encoded::Encoded;

/// Largest request the daemon accepts: requests are names, paths and tensor specs; CreateModel
/// of a 100k-tensor MoE checkpoint is the largest, a few MiB. Bigger ones are refused before
/// they are buffered.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Largest answer: the tensor tables of such checkpoints (GetModel, AttachWorker; 9.2 MB at
/// 100k tensors). Our clients accept this much; gRPC's default of 4 MiB would not.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Descriptor set for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("offloadd_descriptor");

/// Build provenance captured by build.rs.
pub mod build_info {
    pub const GIT_SHA: &str = env!("BUILD_INFO_GIT_SHA");
    pub const TARGET: &str = env!("BUILD_INFO_TARGET");
    pub const PROFILE: &str = env!("BUILD_INFO_PROFILE");
}

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
