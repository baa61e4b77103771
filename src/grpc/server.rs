//! Serves the router on every listener and runs the shutdown sequence: health goes
//! NOT_SERVING, listeners stop accepting, in-flight calls drain up to a deadline.

use std::future::Future;
use std::time::Duration;

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use super::OffloadService;
use super::auth::{AuthLayer, AuthPolicy};
use super::gate::{Gate, Limits};
use super::incoming;
use super::reflection;
use super::trace::RpcTraceLayer;
use crate::proto::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, offload_server::OffloadServer};

/// The name health checks use for the whole daemon, besides the per-service name.
const OVERALL: &str = "";

/// How long a keepalive ping may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How connections are admitted, kept and checked (the `server.*` settings).
pub struct ServeOptions {
    pub drain_timeout: Duration,
    /// Per listener.
    pub max_connections: usize,
    /// Per peer (uid or address) on each listener; 0 for none.
    pub max_connections_per_peer: usize,
    /// Time a new connection has to speak.
    pub handshake_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 ping interval: finds peers that vanished without closing (a killed pod).
    pub keepalive: Option<Duration>,
    pub max_fast_connections: usize,
    pub auth: AuthPolicy,
    /// TLS for the TCP listener (the Unix socket never uses it).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the control plane's file descriptor set: {0}")]
    Descriptor(#[from] prost::DecodeError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The sockets to serve on, bound before serving so that bind errors stop startup.
pub struct Listeners {
    pub uds: UnixListener,
    pub tcp: Option<TcpListener>,
}

/// Serves until `shutdown` resolves, then drains for at most `drain_timeout`.
pub async fn serve(
    service: OffloadService,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    opts: ServeOptions,
) -> Result<(), ServerError> {
    let drain_timeout = opts.drain_timeout;
    let metrics = service.metrics();
    let policy = std::sync::Arc::new(opts.auth);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<OffloadServer<OffloadService>>()
        .await;
    health_reporter
        .set_service_status(OVERALL, ServingStatus::Serving)
        .await;

    // grpcurl 1.8 and Python's reflection client only speak v1alpha; newer tools prefer v1.
    let offload_descriptor = reflection::offload_descriptor()?;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(offload_descriptor.clone())
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(offload_descriptor)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let router = Server::builder()
        .http2_keepalive_interval(opts.keepalive)
        .http2_keepalive_timeout(opts.keepalive.map(|_| KEEPALIVE_TIMEOUT))
        // Outermost: refused calls are traced and counted too.
        .layer(RpcTraceLayer {
            metrics: std::sync::Arc::clone(&metrics),
        })
        .layer(AuthLayer {
            policy: std::sync::Arc::clone(&policy),
            metrics: std::sync::Arc::clone(&metrics),
        })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            OffloadServer::new(service.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
        );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut servers = tokio::task::JoinSet::new();
    let gate = |listener| {
        Gate::new(
            Limits {
                listener,
                max_connections: opts.max_connections,
                max_per_peer: opts.max_connections_per_peer,
                handshake_timeout: opts.handshake_timeout,
                idle_timeout: opts.idle_timeout,
            },
            std::sync::Arc::clone(&metrics),
        )
    };
    let fast = incoming::FastPath {
        open: service.fast_opener(),
        threads: std::sync::Arc::new(Semaphore::new(opts.max_fast_connections)),
        max_threads: opts.max_fast_connections,
        policy,
        metrics: std::sync::Arc::clone(&metrics),
    };
    servers.spawn(router.clone().serve_with_incoming_shutdown(
        incoming::unix(listeners.uds, gate("uds"), fast),
        stopped(stop_rx.clone()),
    ));
    if let Some(tcp) = listeners.tcp {
        servers.spawn(router.serve_with_incoming_shutdown(
            incoming::tcp(tcp, gate("tcp"), opts.tls.clone()),
            stopped(stop_rx.clone()),
        ));
    }

    tokio::select! {
        () = shutdown => {}
        // A server that ends on its own has failed; surface that instead of hanging.
        Some(res) = servers.join_next() => {
            return match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(join) => std::panic::resume_unwind(join.into_panic()),
            };
        }
    }

    tracing::info!(
        drain_timeout_ms = drain_timeout.as_millis() as u64,
        "shutting down: health NOT_SERVING, draining in-flight calls"
    );
    health_reporter
        .set_not_serving::<OffloadServer<OffloadService>>()
        .await;
    health_reporter
        .set_service_status(OVERALL, ServingStatus::NotServing)
        .await;
    let _ = stop_tx.send(true);

    let drain = async {
        while let Some(res) = servers.join_next().await {
            if let Ok(Err(e)) = res {
                tracing::warn!(error = %e, "listener ended with an error while draining");
            }
        }
    };
    if tokio::time::timeout(drain_timeout, drain).await.is_err() {
        tracing::warn!("drain timeout passed with calls still open; closing them");
        servers.abort_all();
    }
    Ok(())
}
