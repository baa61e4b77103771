//! offloadd: a node-local daemon that keeps model weights in host pools under one shared pin
//! policy and serves them to inference workers in other processes.
//!
//! Layers point one way: [`grpc`] → [`core`] → [`device`].

// Every unsafe block says why it is sound; CI runs clippy with -D warnings.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod core;
pub mod daemon;
pub mod device;
pub mod fast;
pub mod grpc;
pub mod metrics;
pub mod proto;
pub mod telemetry;
pub mod vllm_env;

// The client side lives in its own crate, which workers link without the daemon.
pub use offloadd_client::{client, worker};
