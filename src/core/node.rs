//! Facts about this daemon and node that GetInfo reports.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::vllm_env::VllmEnv;

/// Inputs discovered at startup, before the server is built.
#[derive(Debug, Clone)]
pub struct NodeParams {
    pub config: Config,
    pub vllm_env: VllmEnv,
    pub cuda_absent_reason: Option<String>,
    /// The TCP address actually bound, which differs from the configured one for port 0.
    pub tcp_bound: Option<SocketAddr>,
    /// The metrics address actually bound.
    pub metrics_bound: Option<SocketAddr>,
    /// Budget for all pools after the default was applied.
    pub max_host_bytes: u64,
}

/// Immutable node facts plus the start time.
#[derive(Debug)]
pub struct Node {
    pub params: NodeParams,
    started: Instant,
}

impl Node {
    pub fn new(params: NodeParams) -> Self {
        Self {
            params,
            started: Instant::now(),
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}
