//! Wires configuration, devices, core and server into a running daemon.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::config::Config;
use crate::core::backend::{BackendConfig, PrefetchConfig, UvaConfig};
use crate::core::models::RegisterRequest;
use crate::core::pools::{NewPool, PoolError};
use crate::core::{Core, CoreParams};
use crate::device::{Device, cpu, cuda};
use crate::grpc::auth::AuthPolicy;
use crate::grpc::{OffloadService, listen, server};
use crate::metrics::Metrics;
use crate::service::{Service, ServiceError};
use crate::vllm_env::VllmEnv;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Listen(#[from] listen::ListenError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Pools(#[from] PoolError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("pools.create: {0}")]
    StartupPool(ServiceError),
    #[error("models.register: model {name:?}: {message}")]
    StartupModel { name: String, message: String },
    #[error("server.auth_token_file {}: {reason}", path.display())]
    TokenFile { path: PathBuf, reason: String },
    #[error(transparent)]
    Tls(#[from] crate::grpc::tls::TlsError),
}

/// The server's connection limits and auth policy; reads the token file.
fn serve_options(config: &Config) -> Result<server::ServeOptions, DaemonError> {
    let s = &config.server;
    let token = match &s.auth_token_file {
        Some(path) => {
            let raw = std::fs::read_to_string(path).map_err(|e| DaemonError::TokenFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let token = raw.trim().to_string();
            if token.len() < 16 || token.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(DaemonError::TokenFile {
                    path: path.clone(),
                    reason: "the token must be at least 16 printable ASCII characters without spaces (e.g. `openssl rand -hex 32`)".into(),
                });
            }
            Some(token)
        }
        None => None,
    };
    let tls = match (&s.tls_cert_file, &s.tls_key_file) {
        (Some(cert), Some(key)) => Some(crate::grpc::tls::acceptor(&crate::grpc::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: s.tls_client_ca_file.clone(),
        })?),
        _ => None,
    };
    if let Some(addr) = s.unauthenticated_public_tcp() {
        tracing::warn!(%addr, "server.tcp_insecure: serving TCP on a non-loopback address WITHOUT authentication; anyone who reaches it controls this daemon");
    }
    if let Some(addr) = s.tcp_around_peer_checks() {
        tracing::warn!(%addr, "server.tcp_insecure: TCP callers are NOT checked against server.allowed_uids/allowed_gids; any local user who reaches this address controls this daemon");
    }
    let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
    Ok(server::ServeOptions {
        drain_timeout: Duration::from_millis(s.drain_timeout_ms),
        max_connections: s.max_connections,
        max_connections_per_peer: s.max_connections_per_peer,
        handshake_timeout: Duration::from_millis(s.handshake_timeout_ms),
        idle_timeout: ms(s.idle_timeout_ms),
        keepalive: ms(s.keepalive_ms),
        max_fast_connections: s.max_fast_connections,
        auth: AuthPolicy {
            token,
            allowed_uids: s.allowed_uids.clone(),
            allowed_gids: s.allowed_gids.clone(),
        },
        tls,
    })
}

/// Runs the daemon until SIGTERM or SIGINT, then drains and cleans up.
pub async fn run(config: Config, vllm_env: VllmEnv) -> Result<(), DaemonError> {
    // Installed before anything is announced, so a SIGTERM right after the ready line drains
    // instead of killing the process.
    let shutdown = shutdown_signal()?;
    let probe = tokio::task::spawn_blocking(cuda::probe)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    match &probe.absent_reason {
        Some(reason) => tracing::info!(%reason, "CUDA not available; serving the cpu device"),
        None => {
            for d in &probe.devices {
                tracing::info!(id = %d.id, name = %d.name, total_memory_bytes = d.total_memory_bytes, numa_node = ?d.numa_node, "found CUDA device");
            }
        }
    }
    let mut devices: Vec<Arc<dyn Device>> = vec![Arc::new(cpu::CpuDevice::new())];
    for (ordinal, info) in probe.devices.into_iter().enumerate() {
        devices.push(Arc::new(cuda::CudaDevice::new(
            info,
            ordinal as i32,
            cuda::Copies {
                staging_bytes: config.pin.staging_bytes,
                window_bytes: config.leases.copy_window_bytes,
            },
        )?));
    }

    // Before binding anything: a bad token file stops startup with nothing to clean up.
    let serve_options = serve_options(&config)?;
    let uds_path = config.server.uds_path.clone();
    let uds = listen::bind_uds(&uds_path)?;
    let socket = SocketFile::new(uds_path.clone())?;
    let tcp = match config.server.tcp_addr {
        Some(addr) => Some(listen::bind_tcp(addr).await?),
        None => None,
    };
    let tcp_bound = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
    let metrics_listener = match config.metrics.addr {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let metrics_bound = metrics_listener
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?;
    let startup_pools = config.pools.create.clone();
    let startup_models = config.models.register.clone();
    let keep_on_exit = config.pools.keep_on_exit;
    let params = CoreParams {
        config,
        vllm_env,
        devices,
        cuda_absent_reason: probe.absent_reason,
        tcp_bound,
        metrics_bound,
    };
    // Adopting maps and faults every pool file and reads the journal: off the runtime, like
    // every other blocking step.
    let core = tokio::task::spawn_blocking(move || Core::build(params))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?
        .start()?;
    let metrics = Arc::new(Metrics::new());
    let svc = Service::new(Arc::clone(&core), Arc::clone(&metrics));
    create_startup_pools(&svc, startup_pools).await?;
    register_startup_models(&svc, startup_models).await?;
    tracing::info!(uds = %uds_path.display(), tcp = ?tcp_bound, "offloadd serving");
    announce_ready(&uds_path, tcp_bound, metrics_bound);

    let metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(crate::metrics::serve(
            listener,
            Arc::clone(&metrics),
            Arc::clone(&core),
        ))
    });
    let listeners = server::Listeners { uds, tcp };
    server::serve(OffloadService::new(svc), listeners, shutdown, serve_options).await?;
    core.models.cancel_all();
    if let Some(task) = metrics_task {
        task.abort();
    }
    drop(socket);
    let released = core.pools.remove_files_at_exit(keep_on_exit);
    if keep_on_exit {
        tracing::info!(
            released_bytes = released,
            kept_bytes = core.pools.committed(),
            "offloadd stopped; pools and journal kept for the next start (pools.keep_on_exit)"
        );
    } else {
        if let Err(e) = core.pools.journal().clear() {
            tracing::warn!(error = %e, "cannot remove the journal");
        }
        tracing::info!(
            released_bytes = released,
            "offloadd stopped; pool and static files removed"
        );
    }
    Ok(())
}

/// Pools declared in the config (`[[pools.create]]`); any failure stops startup, since the
/// operator asked for exactly these pools.
async fn create_startup_pools(
    svc: &Service,
    specs: Vec<crate::config::PoolSpec>,
) -> Result<(), DaemonError> {
    for spec in specs {
        if svc.core().pools.get(&spec.name).is_ok() {
            // Adopted from the journal with the same device and size (a mismatch is not adopted).
            continue;
        }
        let req = NewPool {
            name: spec.name,
            device: spec.device,
            size_bytes: spec.size_bytes,
        };
        svc.create_pool(req)
            .await
            .map_err(DaemonError::StartupPool)?;
    }
    Ok(())
}

/// Models declared in the config (`[[models.register]]`): validated and allocated before the
/// daemon reports ready (a bad entry stops startup); the bytes load in the background, visible
/// through WatchModel.
async fn register_startup_models(
    svc: &Service,
    specs: Vec<crate::config::ModelSpec>,
) -> Result<(), DaemonError> {
    for spec in specs {
        let backend = match (spec.uva, spec.prefetch) {
            (Some(u), _) => Some(BackendConfig::Uva(UvaConfig {
                cpu_offload_bytes: u.cpu_offload_bytes,
                params: u.params,
            })),
            (None, Some(p)) => Some(BackendConfig::Prefetch(PrefetchConfig {
                group_size: p.group_size,
                num_in_group: p.num_in_group,
                prefetch_step: p.prefetch_step,
                params: p.params,
            })),
            (None, None) => None,
        };
        let core = svc.core();
        if let Ok(model) = core.models.get(&spec.name) {
            // Adopted from the journal from the same checkpoint and pool; wait for its
            // verification, which either makes it READY or drops it (then load it afresh).
            crate::core::models::wait_loaded(&model).await;
            if core
                .models
                .get(&spec.name)
                .is_ok_and(|m| Arc::ptr_eq(&m, &model))
            {
                if let Some(b) = backend.filter(|b| model.backend().as_ref() != Some(b)) {
                    core.models.set_backend(&spec.name, b).map_err(|e| {
                        DaemonError::StartupModel {
                            name: spec.name.clone(),
                            message: e.to_string(),
                        }
                    })?;
                }
                continue;
            }
        }
        let req = RegisterRequest {
            name: spec.name.clone(),
            pool: spec.pool,
            path: spec.path,
            backend,
        };
        svc.start_load(req)
            .await
            .map_err(|e| DaemonError::StartupModel {
                name: spec.name,
                message: e.to_string(),
            })?;
    }
    Ok(())
}

/// One JSON line on stdout once every listener is bound, so supervisors and tests can wait for
/// readiness (and learn an ephemeral TCP port) without polling.
fn announce_ready(
    uds: &Path,
    tcp: Option<std::net::SocketAddr>,
    metrics: Option<std::net::SocketAddr>,
) {
    use std::io::Write;
    let line = serde_json::json!({
        "event": "ready",
        "uds": uds.display().to_string(),
        "tcp": tcp.map(|a| a.to_string()),
        "metrics": metrics.map(|a| a.to_string()),
        "pid": std::process::id(),
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}

/// Removes the socket file on exit, unless another process has since put its own there.
struct SocketFile {
    path: PathBuf,
    ino: u64,
}

impl SocketFile {
    fn new(path: PathBuf) -> std::io::Result<Self> {
        let ino = std::fs::symlink_metadata(&path)?.ino();
        Ok(Self { path, ino })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
