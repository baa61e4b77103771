//! The `/metrics` HTTP endpoint (HTTP/1.1 through hyper), off unless `metrics.addr` is set.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpListener;

use super::Metrics;
use crate::core::Core;

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

type Body = http_body_util::Full<bytes::Bytes>;

/// Serves `/metrics` on `listener` until the task is aborted (at shutdown).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, core: Arc<Core>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                continue;
            }
        };
        let (metrics, core) = (Arc::clone(&metrics), Arc::clone(&core));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (metrics, core) = (Arc::clone(&metrics), Arc::clone(&core));
                async move { Ok::<_, Infallible>(respond(&req, &metrics, &core)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn respond(req: &Request<Incoming>, metrics: &Metrics, core: &Core) -> Response<Body> {
    if req.uri().path() != "/metrics" {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from("see /metrics\n"))
            .expect("static response");
    }
    Response::builder()
        .header(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Body::from(metrics.render(core)))
        .expect("static response")
}

/// Binds the metrics listener.
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}
