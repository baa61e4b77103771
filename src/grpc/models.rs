//! Model handlers: translate requests and streams into service calls and answers back.

use std::path::PathBuf;
use std::pin::Pin;

use tokio_stream::Stream;
use tonic::Status;

use super::convert;
use crate::core::models::{NewPublished, PublishedTensor, RegisterRequest};
use crate::proto::{self, Encoded};
use crate::service::Service;

pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<proto::ModelProgress, Status>> + Send>>;

pub async fn register(
    svc: &Service,
    r: proto::RegisterModelRequest,
) -> Result<proto::Model, Status> {
    let req = RegisterRequest {
        name: r.name,
        pool: r.pool,
        path: PathBuf::from(r.path),
        backend: convert::backend_config(r.backend),
    };
    Ok(svc.register(req, r.wait, convert::model).await?)
}

/// Current progress, then every change, until READY or FAILED.
pub fn watch(svc: &Service, name: &str) -> Result<ProgressStream, Status> {
    let mut rx = svc.watch(name)?;
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
    svc: &Service,
    r: proto::CreateModelRequest,
) -> Result<Encoded<proto::Model>, Status> {
    let backend = convert::backend_config(r.backend);
    let req = NewPublished {
        name: r.name,
        pool: r.pool,
        tensors: r.tensors.into_iter().map(published).collect(),
        backend,
    };
    create_published(svc, req).await
}

/// Most tensors one CreateModelStream may describe: far above any checkpoint's, and a bound on
/// what a client can make the daemon hold before anything is allocated.
const MAX_STREAMED_SPECS: usize = 4_000_000;

/// Collects the stream's specs, then creates the model as [`create`] does.
pub async fn create_streamed(
    svc: &Service,
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
    create_published(svc, req).await
}

fn published(t: proto::TensorSpec) -> PublishedTensor {
    PublishedTensor {
        name: t.name,
        dtype: t.dtype,
        shape: t.shape.into_iter().map(|d| d as usize).collect(),
    }
}

/// Answers the first page of the table (a whole 100k-row table is over the 4 MiB a default
/// client accepts; GetModel pages the rest), with the one copy of the publish token.
async fn create_published(
    svc: &Service,
    req: NewPublished,
) -> Result<Encoded<proto::Model>, Status> {
    let first = super::paging::rows(0, 0);
    let reply = svc
        .create_published(req, move |model, token| {
            let mut reply = convert::model_page(model, first);
            reply.publish_token = token.to_string();
            Encoded::new(&reply)
        })
        .await?;
    Ok(reply)
}

/// Hands each message's bytes to the service, one message at a time, so a stream holds at most
/// one message of memory.
pub async fn write(
    svc: &Service,
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
        let len = m.data.len() as u64;
        svc.write_published(name.clone(), token.clone(), m.offset, m.data)
            .await?;
        written += len;
    }
    Ok(proto::WriteModelResponse {
        bytes_written: written,
    })
}
