//! The client side of offloadd, for workers and tools: channels to the daemon ([`client`]), the
//! onload fast path ([`fast_client`]) and the reference worker library ([`worker`]). It links
//! none of the daemon's server-side dependencies.

// Every unsafe block says why it is sound; CI runs clippy with -D warnings.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod client;
pub mod fast_client;
pub mod worker;

pub use offloadd_proto as proto;
