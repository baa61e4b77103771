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
    ModelError, NewPublished, PendingLoad, PublishedTensor, RegisterRequest,
};
use crate::proto::{self, Encoded};

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
    let snapshot = convert::model(&model);
    spawn_load(core, pending);
    if !r.wait {
        return Ok(snapshot);
    }
    // Waited for without holding the model: its ranges go back to the pool with the last
    // holder, and an UnregisterModel during the load must find them freed when it returns,
    // not when this call next gets to run.
    let (mut done, progress) = (model.load_done.clone(), model.progress.subscribe());
    let (name, cancel) = (model.name.clone(), Arc::clone(&model.cancel));
    let model = Arc::downgrade(&model);
    let _ = done.wait_for(|done| *done).await;
    let p = progress.borrow().clone();
    if p.state == ModelState::Failed {
        return Err(if let Some(no_space) = p.journal_refused {
            ModelError::NotDurable {
                why: p.error.unwrap_or_default(),
                no_space,
            }
        } else if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            ModelError::Cancelled(name)
        } else {
            ModelError::LoadFailed {
                name,
                why: p.error.unwrap_or_default(),
            }
        }
        .into());
    }
    // READY, then unregistered before this answer: the registration did not last.
    let model = model.upgrade().ok_or(ModelError::Cancelled(name))?;
    Ok(convert::model(&model))
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
) -> Result<Encoded<proto::Model>, Status> {
    let backend = convert::backend_config(r.backend);
    let req = NewPublished {
        name: r.name,
        pool: r.pool,
        tensors: r.tensors.into_iter().map(published).collect(),
        backend,
    };
    create_published(core, req).await
}

/// Most tensors one CreateModelStream may describe: far above any checkpoint's, and a bound on
/// what a client can make the daemon hold before anything is allocated.
const MAX_STREAMED_SPECS: usize = 4_000_000;

/// Collects the stream's specs, then creates the model as [`create`] does.
pub async fn create_streamed(
    core: &Arc<Core>,
    mut stream: tonic::Streaming<proto::CreateModelRequest>,
) -> Result<Encoded<proto::Model>, Status> {
    let Some(first) = stream.message().await? else {
        return Err(Status::invalid_argument(
            "CreateModelStream got no message: send one naming the model, pool and backend, then the tensors",
        ));
    };
    tracing::Span::current().record("model", first.name.as_str());
    let mut req = NewPublished {
        name: first.name,
        pool: first.pool,
        tensors: first.tensors.into_iter().map(published).collect(),
        backend: convert::backend_config(first.backend),
    };
    while let Some(m) = stream.message().await? {
        let differs = |given: &str, first: &str| !given.is_empty() && given != first;
        if differs(&m.name, &req.name) || differs(&m.pool, &req.pool) || m.backend.is_some() {
            return Err(Status::invalid_argument(format!(
                "CreateModelStream: only the first message names the model, pool and backend (model {:?}, pool {:?}); a later one named model {:?}, pool {:?}{}",
                req.name,
                req.pool,
                m.name.chars().take(64).collect::<String>(),
                m.pool.chars().take(64).collect::<String>(),
                if m.backend.is_some() {
                    " and a backend"
                } else {
                    ""
                }
            )));
        }
        if req.tensors.len() + m.tensors.len() > MAX_STREAMED_SPECS {
            return Err(Status::resource_exhausted(format!(
                "CreateModelStream: more than {MAX_STREAMED_SPECS} tensors; nothing was created"
            )));
        }
        req.tensors.extend(m.tensors.into_iter().map(published));
    }
    create_published(core, req).await
}

fn published(t: proto::TensorSpec) -> PublishedTensor {
    PublishedTensor {
        name: t.name,
        dtype: t.dtype,
        shape: t.shape.into_iter().map(|d| d as usize).collect(),
    }
}

/// Allocates, then answers the first page of the table (a whole 100k-row table is over the
/// 4 MiB a default client accepts; GetModel pages the rest).
async fn create_published(
    core: &Arc<Core>,
    req: NewPublished,
) -> Result<Encoded<proto::Model>, Status> {
    let model = blocking(core, move |c| c.models.create_published(&c.pools, &req)).await?;
    let first = super::paging::rows(0, 0);
    tokio::task::spawn_blocking(move || {
        let mut reply = convert::model_page(&model, first);
        // The one answer that carries the token: the capability to write this publication.
        reply.publish_token = model
            .publication
            .as_ref()
            .map(|p| p.token().to_string())
            .unwrap_or_default();
        Encoded::new(&reply)
    })
    .await
    .map_err(super::status::join_error)
}

/// Puts each message's bytes into the publication's tensors, one message at a time on a
/// blocking thread (a copy of up to 16 MiB), so the router never waits on a copy.
pub async fn write(
    core: &Arc<Core>,
    mut stream: tonic::Streaming<proto::WriteModelRequest>,
) -> Result<proto::WriteModelResponse, Status> {
    let (mut name, mut token) = (String::new(), String::new());
    let mut written = 0u64;
    while let Some(m) = stream.message().await? {
        if name.is_empty() {
            if m.name.is_empty() {
                return Err(Status::invalid_argument(
                    "WriteModel: the first message names the model and carries its publish_token",
                ));
            }
            tracing::Span::current().record("model", m.name.as_str());
            (name, token) = (m.name, m.publish_token);
        } else if (!m.name.is_empty() && m.name != name)
            || (!m.publish_token.is_empty() && m.publish_token != token)
        {
            return Err(Status::invalid_argument(format!(
                "WriteModel: one call writes one model ({name:?}); a later message named another or another token"
            )));
        }
        let (n, t) = (name.clone(), token.clone());
        let len = m.data.len() as u64;
        blocking(core, move |c| {
            c.models.write_published(&n, &t, m.offset, &m.data)
        })
        .await?;
        written += len;
    }
    Ok(proto::WriteModelResponse {
        bytes_written: written,
    })
}

pub async fn seal(core: &Arc<Core>, r: proto::SealModelRequest) -> Result<proto::Model, Status> {
    let model = blocking(core, move |c| c.models.seal(&r.name, &r.publish_token)).await?;
    Ok(convert::model(&model))
}
