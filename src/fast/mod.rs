//! The onload fast path on the daemon's side. The frames are the protocol crate's
//! (`offloadd_proto::fast`, re-exported here), the client is the client crate's; the serving
//! loop is the daemon's own.

pub use offloadd_client::fast_client as client;
pub use offloadd_proto::fast::*;

pub(crate) mod serve;
