//! `offloadd.v1.Offload`: thin handlers that call into `core` and convert the results.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::blocking::blocking;
use super::convert;
use super::incoming;
use super::models::{self, ProgressStream};
use super::paging;
use super::tables::Tables;
use super::workers;
use crate::core::Core;
use crate::core::pools::NewPool;
use crate::device::cpu::CPU_DEVICE_ID;
use crate::metrics::Metrics;
use crate::proto::{self, Encoded, offload_server::Offload};

/// Service state shared by every connection.
#[derive(Debug, Clone)]
pub struct OffloadService {
    core: Arc<Core>,
    metrics: Arc<Metrics>,
    tables: Arc<Tables>,
}

impl OffloadService {
    pub fn new(core: Arc<Core>, metrics: Arc<Metrics>) -> Self {
        Self {
            core,
            tables: Arc::new(Tables::new(metrics.table_cache_gauge())),
            metrics,
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Binds fast-path connections on the Unix socket to leases.
    pub(super) fn fast_opener(&self) -> incoming::FastOpen {
        let (core, metrics) = (Arc::clone(&self.core), self.metrics());
        Arc::new(move |lease_id, conn| {
            workers::FastSession::open(&core, Arc::clone(&metrics), lease_id, conn)
        })
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
        let pool = blocking(&self.core, move |core| core.pools.create(&req)).await?;
        Ok(Response::new(convert::pool(&pool)))
    }

    #[tracing::instrument(skip_all, fields(pool = %request.get_ref().name))]
    async fn get_pool(&self, request: Request<proto::GetPoolRequest>) -> Reply<proto::Pool> {
        // convert::pool asks the driver how much of a cuda pool is registered.
        let name = request.into_inner().name;
        let pool = blocking(&self.core, move |c| {
            c.pools.get(&name).map(|p| convert::pool(&p))
        })
        .await?;
        Ok(Response::new(pool))
    }

    #[tracing::instrument(skip_all)]
    async fn list_pools(
        &self,
        _request: Request<proto::ListPoolsRequest>,
    ) -> Reply<proto::ListPoolsResponse> {
        let pools = blocking(&self.core, |c| {
            Ok::<_, Status>(c.pools.list().iter().map(|p| convert::pool(p)).collect())
        })
        .await?;
        Ok(Response::new(proto::ListPoolsResponse { pools }))
    }

    #[tracing::instrument(skip_all, fields(pool = %request.get_ref().name))]
    async fn delete_pool(&self, request: Request<proto::DeletePoolRequest>) -> Reply<proto::Pool> {
        let name = request.into_inner().name;
        // Dropping the pool unpins (possibly a driver call) and unmaps: keep it off the runtime.
        let reply = blocking(&self.core, move |core| {
            let pool = core.pools.delete(&name)?;
            let reply = convert::pool(&pool);
            drop(pool);
            Ok::<_, Status>(reply)
        })
        .await?;
        Ok(Response::new(reply))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name, pool = %request.get_ref().pool))]
    async fn register_model(
        &self,
        request: Request<proto::RegisterModelRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        Ok(Response::new(
            models::register(&self.core, request.into_inner())
                .await?
                .into(),
        ))
    }

    type WatchModelStream = ProgressStream;

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn watch_model(
        &self,
        request: Request<proto::WatchModelRequest>,
    ) -> Reply<Self::WatchModelStream> {
        Ok(Response::new(models::watch(
            &self.core,
            &request.get_ref().name,
        )?))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn get_model(
        &self,
        request: Request<proto::GetModelRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        let r = request.into_inner();
        let model = self.core.models.get(&r.name)?;
        if !r.include_tensors {
            return Ok(Response::new(convert::model(&model).into()));
        }
        let start = match r.page_token.as_str() {
            "" => 0,
            t => paging::Scope::model(&model).start_of(
                t,
                "next_page_token of the previous answer, or none for the first page",
            )?,
        };
        let rows = paging::rows(start, r.page_size);
        // A page of many tensors takes milliseconds to build and to encode: not on the runtime's
        // thread, where every other call waits behind it.
        let tables = Arc::clone(&self.tables);
        let reply = tokio::task::spawn_blocking(move || tables.model_page(&model, rows))
            .await
            .map_err(super::status::join_error)?;
        Ok(Response::new(reply))
    }

    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        _request: Request<proto::ListModelsRequest>,
    ) -> Reply<proto::ListModelsResponse> {
        let models = self
            .core
            .models
            .list()
            .iter()
            .map(|m| convert::model(m))
            .collect();
        Ok(Response::new(proto::ListModelsResponse { models }))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn unregister_model(
        &self,
        request: Request<proto::UnregisterModelRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        let model = self.core.models.unregister(&request.get_ref().name).await?;
        self.tables.forget(&model.name);
        let reply = convert::model(&model).into();
        // The last reference frees the pool ranges; dropping it is cheap (no driver calls).
        drop(model);
        Ok(Response::new(reply))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name, pool = %request.get_ref().pool))]
    async fn create_model(
        &self,
        request: Request<proto::CreateModelRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        Ok(Response::new(
            models::create(&self.core, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(model = tracing::field::Empty))]
    async fn create_model_stream(
        &self,
        request: Request<tonic::Streaming<proto::CreateModelRequest>>,
    ) -> Reply<Encoded<proto::Model>> {
        Ok(Response::new(
            models::create_streamed(&self.core, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn seal_model(
        &self,
        request: Request<proto::SealModelRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        Ok(Response::new(
            models::seal(&self.core, request.into_inner()).await?.into(),
        ))
    }

    #[tracing::instrument(skip_all, fields(model = tracing::field::Empty))]
    async fn write_model(
        &self,
        request: Request<tonic::Streaming<proto::WriteModelRequest>>,
    ) -> Reply<proto::WriteModelResponse> {
        Ok(Response::new(
            models::write(&self.core, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn set_backend(
        &self,
        request: Request<proto::SetBackendRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        let r = request.into_inner();
        let backend = convert::backend_config(r.backend).ok_or_else(|| {
            Status::invalid_argument(
                "SetBackend needs a backend: set backend.uva or backend.prefetch",
            )
        })?;
        // Off the runtime: it rewrites the model's journal record, its whole tensor table.
        let model = blocking(&self.core, move |c| c.models.set_backend(&r.model, backend)).await?;
        Ok(Response::new(convert::model(&model).into()))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model, worker = %request.get_ref().worker_name))]
    async fn attach_worker(
        &self,
        request: Request<proto::AttachWorkerRequest>,
    ) -> Reply<Encoded<proto::Lease>> {
        Ok(Response::new(
            workers::attach(&self.core, &self.tables, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(lease = %request.get_ref().lease_id, page = %request.get_ref().page_token))]
    async fn get_lease_tensors(
        &self,
        request: Request<proto::GetLeaseTensorsRequest>,
    ) -> Reply<Encoded<proto::LeaseTensorPage>> {
        let r = request.into_inner();
        let tables = Arc::clone(&self.tables);
        let page = blocking(&self.core, move |c| workers::lease_page(c, &tables, &r)).await?;
        Ok(Response::new(page))
    }

    #[tracing::instrument(skip_all, fields(lease = %request.get_ref().lease_id))]
    async fn keep_alive(
        &self,
        request: Request<proto::KeepAliveRequest>,
    ) -> Reply<proto::KeepAliveResponse> {
        Ok(Response::new(workers::keep_alive(
            &self.core,
            &request.get_ref().lease_id,
        )?))
    }

    #[tracing::instrument(skip_all, fields(lease = %request.get_ref().lease_id))]
    async fn detach_worker(
        &self,
        request: Request<proto::DetachWorkerRequest>,
    ) -> Reply<proto::DetachWorkerResponse> {
        // Ending the lease may free cuda static buffers (a stream sync and driver calls).
        let id = request.into_inner().lease_id;
        blocking(&self.core, move |c| c.leases.detach(&id)).await?;
        Ok(Response::new(proto::DetachWorkerResponse {}))
    }

    #[tracing::instrument(skip_all, fields(lease = %request.get_ref().lease_id, layer = request.get_ref().layer))]
    async fn onload_to_static(
        &self,
        request: Request<proto::OnloadToStaticRequest>,
    ) -> Reply<proto::OnloadToStaticResponse> {
        let reply = workers::onload(&self.core, request.into_inner()).await?;
        self.metrics.onload(
            reply.bytes,
            std::time::Duration::from_micros(reply.copy_micros),
        );
        Ok(Response::new(reply))
    }
}
