//! Generated protobuf and gRPC code for `offloadd.v1`.

#![allow(missing_docs)]
#![allow(clippy::all, clippy::pedantic)]

tonic::include_proto!("offloadd.v1");

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
