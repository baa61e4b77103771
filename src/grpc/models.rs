//! Model handlers: registration with its background load, progress streams, publication.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::Status;

use super::blocking::blocking;
use super::convert;
use crate::core::Core;
use crate::core::models::model::{Model, ModelState};
use crate::core::models::{
    ModelError, NewPublished, PendingLoad, PublishedTensor, RegisterRequest, wait_loaded,
};
use crate::proto;

pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<proto::ModelProgress, Status>> + Send>>;

/// Validates and allocates on a blocking thread, then loads in the background.
pub async fn register(
    core: &Arc<Core>,
    r: proto::RegisterModelRequest,
) -> Result<proto::Model, Status> {
    let req = RegisterRequest {
        name: r.name,
        pool: r.pool,
        path: PathBuf::from(r.path),
        backend: convert::backend_config(r.backend),
    };
    let pending = prepare(core, req).await?;
    let model = Arc::clone(pending.model());
    // Snapshot before the load starts, so `wait: false` always answers LOADING.
    let snapshot = convert::model(&model, false);
    spawn_load(core, pending);
    if !r.wait {
        return Ok(snapshot);
    }
    {
        wait_loaded(&model).await;
        let p = model.progress();
        if p.state == ModelState::Failed {
            let why = p.error.unwrap_or_default();
            return Err(if model.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                ModelError::Cancelled(model.name.clone())
            } else {
                ModelError::LoadFailed {
                    name: model.name.clone(),
                    why,
                }
            }
            .into());
        }
    }
    Ok(convert::model(&model, false))
}

/// Prepares a registration and starts its load; used by startup registration.
pub async fn start_load(core: &Arc<Core>, req: RegisterRequest) -> Result<Arc<Model>, Status> {
    let pending = prepare(core, req).await?;
    let model = Arc::clone(pending.model());
    spawn_load(core, pending);
    Ok(model)
}

async fn prepare(core: &Arc<Core>, req: RegisterRequest) -> Result<PendingLoad, Status> {
    blocking(core, move |c| c.models.prepare(&c.pools, &req)).await
}

fn spawn_load(core: &Arc<Core>, pending: PendingLoad) {
    let c = Arc::clone(core);
    tokio::task::spawn_blocking(move || c.models.load(pending));
}

/// Current progress, then every change, until READY or FAILED.
pub fn watch(core: &Core, name: &str) -> Result<ProgressStream, Status> {
    let model = core.models.get(name)?;
    let mut rx = model.progress.subscribe();
    drop(model);
    let (tx, out) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let p = rx.borrow_and_update().clone();
            let terminal = p.is_terminal();
            if tx.send(Ok(convert::progress(&p))).await.is_err() || terminal {
                break;
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)))
}

pub async fn create(
    core: &Arc<Core>,
    r: proto::CreateModelRequest,
) -> Result<proto::Model, Status> {
    let req = NewPublished {
        name: r.name,
        pool: r.pool,
        tensors: r
            .tensors
            .into_iter()
            .map(|t| PublishedTensor {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape.into_iter().map(|d| d as usize).collect(),
            })
            .collect(),
        backend: convert::backend_config(r.backend),
    };
    let model = blocking(core, move |c| c.models.create_published(&c.pools, &req)).await?;
    Ok(convert::model(&model, true))
}

pub async fn seal(core: &Arc<Core>, name: String) -> Result<proto::Model, Status> {
    let model = blocking(core, move |c| c.models.seal(&name)).await?;
    Ok(convert::model(&model, false))
}
