//! Backends: how a model's weights are used by workers. `uva` leaves weights in host memory for
//! the device to read in place; `prefetch` copies selected layers into static device buffers
//! ahead of use. The rules follow vLLM's `vllm/model_executor/offloader/` exactly.

pub mod access;
mod config;
pub mod plan;

pub use config::{BackendConfig, BackendError, PrefetchConfig, UvaConfig};
