//! The service layer: every operation the daemon offers, as gRPC, the fast path and startup
//! all ask for it. It is the one place that
//! - hops from the async runtime to blocking threads (`hop`), so no caller can stall the
//!   runtime by calling the core inline;
//! - undoes what a caller that went away would leave behind (a lease whose id never reached
//!   it, one whose answer the transport refused);
//! - records the onload metrics, for the RPC and the fast path alike.
//!
//! Its callers translate requests and answers; they never lock a model or call a device.
//! Answers are rendered by the caller's closures on the same blocking thread that made them,
//! because encoding a 100k-row table costs milliseconds the runtime must not spend.

mod error;
mod fast;
mod hop;
mod models;
mod pools;
#[cfg(test)]
mod tests;
mod workers;

use std::sync::Arc;

pub use error::ServiceError;
pub use fast::FastSession;
pub use pools::PoolView;
pub use workers::OnloadRequest;

use crate::core::Core;
use crate::metrics::Metrics;

/// The daemon's operations over one shared [`Core`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Service {
    core: Arc<Core>,
    metrics: Arc<Metrics>,
}

impl Service {
    pub fn new(core: Arc<Core>, metrics: Arc<Metrics>) -> Self {
        Self { core, metrics }
    }

    /// What the node knows, for answers that read it whole (GetInfo, the metrics page). Its
    /// reads take no blocking locks and make no driver calls.
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
