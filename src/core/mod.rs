//! The daemon's domain logic: what it knows about the node, its pools, models and leases.
//! It speaks in domain types; `grpc` translates them to protobuf.

mod node;

pub use node::{Node, NodeParams};
