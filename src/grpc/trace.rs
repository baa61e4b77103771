//! One tracing span per RPC, carrying the method, the gRPC status code and the latency.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Code;
use tower::{Layer, Service};
use tracing::Instrument;

use super::conn::{CallBody, ConnInfo};
use crate::metrics::Metrics;

/// Methods that change the daemon's state: logged at info with the caller's identity.
const MUTATING: &[&str] = &[
    "CreatePool",
    "DeletePool",
    "RegisterModel",
    "CreateModel",
    "CreateModelStream",
    "WriteModel",
    "SealModel",
    "UnregisterModel",
    "SetBackend",
    "AttachWorker",
    "DetachWorker",
];

/// Tower layer that wraps every call of the gRPC router: a span, a log line and the RPC metrics.
#[derive(Debug, Clone)]
pub struct RpcTraceLayer {
    pub metrics: Arc<Metrics>,
}

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcTrace {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for RpcTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let info = req.extensions().get::<ConnInfo>().cloned();
        let peer = info
            .as_ref()
            .map_or_else(String::new, |i| i.peer.to_string());
        let span = tracing::info_span!(
            "rpc",
            method = %method.as_str(),
            %peer,
            code = tracing::field::Empty,
            latency_us = tracing::field::Empty
        );
        // Counts the call (and a stream until its body ends) against the idle timeout.
        let guard = info.as_ref().map(ConnInfo::call);
        let mutating = method
            .rsplit('/')
            .next()
            .is_some_and(|m| MUTATING.contains(&m));
        // Take the instance that was polled ready, leave a fresh clone behind (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        let metrics = Arc::clone(&self.metrics);
        Box::pin(
            async move {
                let start = Instant::now();
                if mutating {
                    tracing::info!("rpc started");
                } else {
                    tracing::debug!("rpc started");
                }
                let result = fut.await;
                let code = match &result {
                    Ok(resp) => response_code(resp.headers()),
                    Err(_) => Code::Internal,
                };
                let latency = start.elapsed();
                metrics.rpc(&method, code, latency);
                let span = tracing::Span::current();
                span.record("code", tracing::field::debug(code));
                span.record("latency_us", latency.as_micros() as u64);
                if code == Code::Ok {
                    tracing::debug!("rpc done");
                } else {
                    tracing::info!("rpc failed");
                }
                result
                    .map(|resp| resp.map(|body| tonic::body::Body::new(CallBody::new(body, guard))))
            }
            .instrument(span),
        )
    }
}

/// An error answer carries `grpc-status` in its headers (trailers-only response); a successful one
/// carries it in trailers, after the body, which a span closed at the headers cannot see. A
/// stream that fails after it started is logged by its handler.
fn response_code(headers: &http::HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
        .unwrap_or(Code::Ok)
}
