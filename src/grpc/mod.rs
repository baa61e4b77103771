//! The gRPC face of the daemon: service implementation, proto conversion, the single mapping of
//! errors to `tonic::Status`, listeners and the server lifecycle.

pub mod auth;
mod conn;
mod convert;
mod gate;
mod incoming;
pub mod listen;
mod models;
mod paging;
mod reflection;
pub mod server;
mod service;
mod status;
mod tables;
pub mod tls;
mod trace;
mod workers;

pub use service::OffloadService;
