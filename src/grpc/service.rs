//! `offloadd.v1.Offload`: thin handlers that call into `core` and convert the results.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::status::join_error;
use crate::core::Core;
use crate::core::pools::NewPool;
use crate::device::cpu::CPU_DEVICE_ID;
use crate::proto::{self, offload_server::Offload};

/// Service state shared by every connection.
#[derive(Debug, Clone)]
pub struct OffloadService {
    core: Arc<Core>,
}

impl OffloadService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }

    /// Runs blocking core work (page faults, mlock, driver calls) off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Core) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let core = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(join_error)?
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Offload for OffloadService {
    #[tracing::instrument(skip_all)]
    async fn get_info(
        &self,
        _request: Request<proto::GetInfoRequest>,
    ) -> Reply<proto::GetInfoResponse> {
        Ok(Response::new(convert::info(&self.core)))
    }

    #[tracing::instrument(skip_all, fields(pool = %request.get_ref().name))]
    async fn create_pool(&self, request: Request<proto::CreatePoolRequest>) -> Reply<proto::Pool> {
        let r = request.into_inner();
        let req = NewPool {
            name: r.name,
            device: if r.device.is_empty() {
                CPU_DEVICE_ID.to_string()
            } else {
                r.device
            },
            size_bytes: r.size_bytes,
        };
        let pool = self
            .blocking(move |core| Ok(core.pools.create(&req)?))
            .await?;
        Ok(Response::new(convert::pool(&pool)))
    }

    #[tracing::instrument(skip_all, fields(pool = %request.get_ref().name))]
    async fn get_pool(&self, request: Request<proto::GetPoolRequest>) -> Reply<proto::Pool> {
        let pool = self.core.pools.get(&request.get_ref().name)?;
        Ok(Response::new(convert::pool(&pool)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_pools(
        &self,
        _request: Request<proto::ListPoolsRequest>,
    ) -> Reply<proto::ListPoolsResponse> {
        let pools = self
            .core
            .pools
            .list()
            .iter()
            .map(|p| convert::pool(p))
            .collect();
        Ok(Response::new(proto::ListPoolsResponse { pools }))
    }

    #[tracing::instrument(skip_all, fields(pool = %request.get_ref().name))]
    async fn delete_pool(&self, request: Request<proto::DeletePoolRequest>) -> Reply<proto::Pool> {
        let name = request.into_inner().name;
        // Dropping the pool unpins (possibly a driver call) and unmaps: keep it off the runtime.
        let reply = self
            .blocking(move |core| {
                let pool = core.pools.delete(&name)?;
                let reply = convert::pool(&pool);
                drop(pool);
                Ok(reply)
            })
            .await?;
        Ok(Response::new(reply))
    }
}
