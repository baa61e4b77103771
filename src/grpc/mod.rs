//! The gRPC face of the daemon: service implementation, proto conversion, the single mapping of
//! errors to `tonic::Status`, listeners and the server lifecycle.

mod convert;
pub mod listen;
pub mod server;
mod service;
mod status;
mod trace;

pub use service::OffloadService;
