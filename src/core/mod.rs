//! The daemon's domain logic: what it knows about the node, its pools, models and leases.
//! It speaks in domain types; `grpc` translates them to protobuf.

pub mod alloc;
pub mod backend;
mod build;
pub mod crc;
pub mod journal;
pub mod layers;
pub mod leases;
pub mod models;
mod node;
pub mod pin_policy;
pub mod pool;
pub mod pools;
pub mod recovery;
pub mod remote;
pub mod scrub;
mod secret;
pub mod spares;
pub mod static_budget;
pub mod table;
#[cfg(test)]
pub(crate) mod testing;

pub use build::CoreParams;
pub use node::{Node, NodeParams};

/// Everything the service needs, shared by all connections.
#[derive(Debug)]
pub struct Core {
    pub node: Node,
    pub pools: pools::Pools,
    pub models: models::Models,
    pub leases: std::sync::Arc<leases::Leases>,
    /// What this start brought back from the journal.
    pub recovery: recovery::Recovery,
    /// The background checksum scrubber's settings and counts.
    pub scrub: scrub::ScrubStats,
}
