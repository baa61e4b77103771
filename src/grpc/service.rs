//! `offloadd.v1.Offload`: thin handlers that call into `core` and convert the results.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::core::Node;
use crate::proto::{self, offload_server::Offload};

/// Service state shared by every connection.
#[derive(Debug, Clone)]
pub struct OffloadService {
    node: Arc<Node>,
}

impl OffloadService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Offload for OffloadService {
    #[tracing::instrument(skip_all)]
    async fn get_info(
        &self,
        _request: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::GetInfoResponse>, Status> {
        Ok(Response::new(convert::info(&self.node)))
    }
}
