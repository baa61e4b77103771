//! `offloadd.v1.Offload`: thin handlers that translate requests into service calls and the
//! answers back. No handler touches the core or a device itself.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::incoming;
use super::models::{self, ProgressStream};
use super::paging;
use super::tables::Tables;
use super::workers;
use crate::core::pools::NewPool;
use crate::device::cpu::CPU_DEVICE_ID;
use crate::metrics::Metrics;
use crate::proto::{self, Encoded, offload_server::Offload};
use crate::service::Service;

/// Service state shared by every connection.
#[derive(Debug, Clone)]
pub struct OffloadService {
    svc: Service,
    tables: Arc<Tables>,
}

impl OffloadService {
    pub fn new(svc: Service) -> Self {
        Self {
            tables: Arc::new(Tables::new(svc.metrics().table_cache_gauge())),
            svc,
        }
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(self.svc.metrics())
    }

    /// Binds fast-path connections on the Unix socket to leases.
    pub(super) fn fast_opener(&self) -> incoming::FastOpen {
        let svc = self.svc.clone();
        Arc::new(move |lease_id, conn| workers::FastFrames::open(&svc, lease_id, conn))
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
        Ok(Response::new(convert::info(self.svc.core())))
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
        let pool = self.svc.create_pool(req).await?;
        Ok(Response::new(convert::pool(&pool)))
    }

    #[tracing::instrument(skip_all, fields(pool = %request.get_ref().name))]
    async fn get_pool(&self, request: Request<proto::GetPoolRequest>) -> Reply<proto::Pool> {
        let pool = self.svc.pool(request.into_inner().name).await?;
        Ok(Response::new(convert::pool(&pool)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_pools(
        &self,
        _request: Request<proto::ListPoolsRequest>,
    ) -> Reply<proto::ListPoolsResponse> {
        let pools = self.svc.pools().await?.iter().map(convert::pool).collect();
        Ok(Response::new(proto::ListPoolsResponse { pools }))
    }

    #[tracing::instrument(skip_all, fields(pool = %request.get_ref().name))]
    async fn delete_pool(&self, request: Request<proto::DeletePoolRequest>) -> Reply<proto::Pool> {
        let name = request.into_inner().name;
        let reply = self.svc.delete_pool(name, convert::pool).await?;
        Ok(Response::new(reply))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name, pool = %request.get_ref().pool))]
    async fn register_model(
        &self,
        request: Request<proto::RegisterModelRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        Ok(Response::new(
            models::register(&self.svc, request.into_inner())
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
            &self.svc,
            &request.get_ref().name,
        )?))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn get_model(
        &self,
        request: Request<proto::GetModelRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        let r = request.into_inner();
        if !r.include_tensors {
            return Ok(Response::new(
                convert::model(&*self.svc.model(&r.name)?).into(),
            ));
        }
        let tables = Arc::clone(&self.tables);
        let reply = self
            .svc
            .render_model(r.name, move |model| {
                let start = match r.page_token.as_str() {
                    "" => 0,
                    t => paging::Scope::model(model).start_of(
                        t,
                        "next_page_token of the previous answer, or none for the first page",
                    )?,
                };
                Ok::<_, Status>(tables.model_page(model, paging::rows(start, r.page_size)))
            })
            .await?;
        Ok(Response::new(reply))
    }

    #[tracing::instrument(skip_all)]
    async fn list_models(
        &self,
        _request: Request<proto::ListModelsRequest>,
    ) -> Reply<proto::ListModelsResponse> {
        let models = self
            .svc
            .models()
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
        let model = self.svc.unregister(request.into_inner().name).await?;
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
            models::create(&self.svc, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(model = tracing::field::Empty))]
    async fn create_model_stream(
        &self,
        request: Request<tonic::Streaming<proto::CreateModelRequest>>,
    ) -> Reply<Encoded<proto::Model>> {
        Ok(Response::new(
            models::create_streamed(&self.svc, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn seal_model(
        &self,
        request: Request<proto::SealModelRequest>,
    ) -> Reply<Encoded<proto::Model>> {
        let r = request.into_inner();
        let model = self.svc.seal(r.name, r.publish_token).await?;
        Ok(Response::new(convert::model(&model).into()))
    }

    #[tracing::instrument(skip_all, fields(model = tracing::field::Empty))]
    async fn write_model(
        &self,
        request: Request<tonic::Streaming<proto::WriteModelRequest>>,
    ) -> Reply<proto::WriteModelResponse> {
        Ok(Response::new(
            models::write(&self.svc, request.into_inner()).await?,
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
        let model = self.svc.set_backend(r.model, backend).await?;
        Ok(Response::new(convert::model(&model).into()))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model, worker = %request.get_ref().worker_name))]
    async fn attach_worker(
        &self,
        request: Request<proto::AttachWorkerRequest>,
    ) -> Reply<Encoded<proto::Lease>> {
        Ok(Response::new(
            workers::attach(&self.svc, &self.tables, request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(lease = %request.get_ref().lease_id, page = %request.get_ref().page_token))]
    async fn get_lease_tensors(
        &self,
        request: Request<proto::GetLeaseTensorsRequest>,
    ) -> Reply<Encoded<proto::LeaseTensorPage>> {
        let page = workers::lease_page(&self.svc, &self.tables, request.into_inner()).await?;
        Ok(Response::new(page))
    }

    #[tracing::instrument(skip_all, fields(lease = %request.get_ref().lease_id))]
    async fn keep_alive(
        &self,
        request: Request<proto::KeepAliveRequest>,
    ) -> Reply<proto::KeepAliveResponse> {
        Ok(Response::new(workers::keep_alive(
            &self.svc,
            &request.get_ref().lease_id,
        )?))
    }

    #[tracing::instrument(skip_all, fields(lease = %request.get_ref().lease_id))]
    async fn detach_worker(
        &self,
        request: Request<proto::DetachWorkerRequest>,
    ) -> Reply<proto::DetachWorkerResponse> {
        self.svc.detach(request.into_inner().lease_id).await?;
        Ok(Response::new(proto::DetachWorkerResponse {}))
    }

    #[tracing::instrument(skip_all, fields(lease = %request.get_ref().lease_id, layer = request.get_ref().layer))]
    async fn onload_to_static(
        &self,
        request: Request<proto::OnloadToStaticRequest>,
    ) -> Reply<proto::OnloadToStaticResponse> {
        let reply = workers::onload(&self.svc, request.into_inner()).await?;
        Ok(Response::new(reply))
    }
}
