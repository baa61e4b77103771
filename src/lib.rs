//! offloadd: a node-local daemon that keeps model weights in host pools under one shared pin
//! policy and serves them to inference workers in other processes.
//!
//! Layers point one way: `grpc` → `service` → `core` → `device`; all four are private. The crate's face is
//! what the binaries, the tests and the benchmarks use: the protocol, the client side (its own
//! crate), the typed configuration, [`run`], and the few building blocks in [`parts`].

// Every unsafe block says why it is sound; CI runs clippy with -D warnings.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod config;
mod core;
mod daemon;
mod device;
pub mod fast;
mod grpc;
mod metrics;
pub mod proto;
mod service;
mod telemetry;
pub mod vllm_env;

// The client side lives in its own crate, which workers link without the daemon.
pub use offloadd_client::{client, worker};

pub use daemon::{DaemonError, run};
pub use telemetry::init as init_telemetry;

/// Building blocks that the benchmarks measure on their own, outside a running daemon, and
/// constants the tests check against.
pub mod parts {
    pub use crate::core::journal::Journal;
    pub use crate::core::layers::layer_of;
    pub use crate::core::leases::MAX_FAST_CONNECTIONS;
    pub use crate::core::pools::{NewPool, Pools, PoolsParams};
    pub use crate::device::cpu::{CpuDevice, meminfo_bytes, parse_kib_field};
    pub use crate::device::host::{HostRegion, resident_pages};
    pub use crate::device::{Device, Devices};
}
