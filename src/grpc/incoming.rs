//! The accept loops. On the Unix socket, connections are routed by their first bytes: the onload
//! fast path ([`crate::fast::MAGIC`]) gets a thread of its own; everything else is HTTP/2 for
//! tonic. Every connection passes its listener's [`Gate`] first.

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::RecvFlags;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::AuthPolicy;
use super::conn::{Backoff, Conn, Gate, Peer};
use super::tls::TcpIo;
use super::workers::FastSession;
use crate::fast;
use crate::metrics::Metrics;

/// Binds a fast-path hello (lease id) on a connection to its lease.
pub type FastOpen =
    Arc<dyn Fn(&str, &StdUnixStream) -> Result<FastSession, fast::Reply> + Send + Sync>;

/// A client that has not sent four bytes by then is not one of ours (both protocols speak first).
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// What the Unix socket's fast-path connections need besides the socket.
#[derive(Clone)]
pub struct FastPath {
    pub open: FastOpen,
    /// One permit per fast-path connection (each holds a thread), across all leases.
    pub threads: Arc<Semaphore>,
    pub max_threads: usize,
    pub policy: Arc<AuthPolicy>,
    pub metrics: Arc<Metrics>,
}

/// Accepts Unix-socket connections until the returned stream is dropped (the gRPC server
/// stopped). HTTP/2 connections come out of the stream untouched (the bytes were only peeked).
pub fn unix(
    listener: UnixListener,
    gate: Gate,
    fast: FastPath,
) -> ReceiverStream<io::Result<Conn<UnixStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        while let Some((stream, _)) = accept("uds", || listener.accept(), &tx, &mut backoff).await {
            let peer = Peer::of_unix(&stream);
            let Some(permit) = gate.admit(&peer) else {
                continue; // dropped: closed at once
            };
            let (tx, gate, fast) = (tx.clone(), gate.clone(), fast.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(SNIFF_TIMEOUT, first_bytes(&stream)).await {
                    Ok(Ok(magic)) if magic == fast::MAGIC => {
                        drop(permit); // fast-path connections count against their own cap
                        admit_fast(stream, &peer, &fast).await;
                    }
                    Ok(Ok(_)) => {
                        let _ = tx.send(Ok(gate.wrap(stream, peer, permit))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "connection closed before it spoke"),
                    Err(_) => tracing::debug!(
                        timeout_s = SNIFF_TIMEOUT.as_secs(),
                        "connection did not send four bytes in time; closed"
                    ),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts TCP connections until the returned stream is dropped; with `tls`, each connection
/// completes its handshake (on its own task, within the sniff timeout) before tonic sees it.
pub fn tcp(
    listener: TcpListener,
    gate: Gate,
    tls: Option<TlsAcceptor>,
) -> ReceiverStream<io::Result<Conn<TcpIo>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut backoff = Backoff::default();
        while let Some((stream, addr)) =
            accept("tcp", || listener.accept(), &tx, &mut backoff).await
        {
            let peer = Peer::Tcp(addr);
            let Some(permit) = gate.admit(&peer) else {
                continue;
            };
            // Small request/response frames: Nagle would add up to 40 ms to each.
            let _ = stream.set_nodelay(true);
            let Some(tls) = tls.clone() else {
                if tx
                    .send(Ok(gate.wrap(TcpIo::Plain(stream), peer, permit)))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            };
            let (tx, gate) = (tx.clone(), gate.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(SNIFF_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let _ = tx
                            .send(Ok(gate.wrap(TcpIo::Tls(Box::new(s)), peer, permit)))
                            .await;
                    }
                    // A plaintext client, an untrusted or missing client certificate: the
                    // client sees the TLS alert; the daemon notes it and goes on.
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed; connection closed")
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake did not finish in time; closed")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The next accepted connection of a listener, backing off after each failure; None once the
/// gRPC server dropped its end of `tx` (it stopped).
async fn accept<T, C, F>(
    listener: &'static str,
    mut next: impl FnMut() -> F,
    tx: &mpsc::Sender<io::Result<C>>,
    backoff: &mut Backoff,
) -> Option<T>
where
    F: std::future::Future<Output = io::Result<T>>,
{
    loop {
        let accepted = tokio::select! {
            r = next() => r,
            () = tx.closed() => return None,
        };
        match accepted {
            Ok(a) => {
                backoff.succeeded();
                return Some(a);
            }
            Err(e) => backoff.failed(listener, &e).await,
        }
    }
}

/// Peeks at the first four bytes without consuming them.
async fn first_bytes(stream: &UnixStream) -> io::Result<[u8; 4]> {
    let mut head = [0u8; 4];
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let (n, _) =
                rustix::net::recv(stream, &mut head, RecvFlags::PEEK | RecvFlags::DONTWAIT)?;
            match n {
                n if n >= head.len() => Ok(()),
                // The peer hung up: what it sent is all there will be. (tokio never clears
                // read-closed readiness, so waiting again would spin.)
                _ if n == 0 || ready.is_read_closed() => Err(io::ErrorKind::UnexpectedEof.into()),
                // Fewer than four so far: wait for the next arrival, as if nothing had come.
                _ => Err(io::ErrorKind::WouldBlock.into()),
            }
        });
        match peeked {
            Ok(()) => return Ok(head),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Starts a fast-path connection on a thread of its own, or refuses it with a reply frame: a
/// peer the policy does not allow, or no thread left under `server.max_fast_connections`.
async fn admit_fast(stream: UnixStream, peer: &Peer, fast: &FastPath) {
    if let Err(status) = fast.policy.check_unix_peer(peer) {
        fast.metrics.auth_denied("uds");
        tracing::warn!(%peer, error = status.message(), "fast-path connection refused");
        return refuse(stream, fast::Reply::from_status(&status)).await;
    }
    let Ok(permit) = Arc::clone(&fast.threads).try_acquire_owned() else {
        fast.metrics.connection_refused("fast");
        let msg = format!(
            "the daemon serves {} onload fast-path connections already (server.max_fast_connections); close idle ones or use the OnloadToStatic RPC",
            fast.max_threads
        );
        tracing::warn!(%peer, "{msg}");
        return refuse(
            stream,
            fast::Reply::from_status(&tonic::Status::resource_exhausted(msg)),
        )
        .await;
    };
    start_fast(stream, Arc::clone(&fast.open), permit);
}

/// Reads the hello (so the worker's write does not fail) and answers it with `reply`, without a
/// thread: refusals happen exactly when threads are scarce.
async fn refuse(mut stream: UnixStream, reply: fast::Reply) {
    let read_hello = async {
        let mut head = [0u8; 8];
        stream.read_exact(&mut head).await?;
        let len = u16::from_le_bytes([head[6], head[7]]) as usize;
        let mut id = vec![0u8; len];
        stream.read_exact(&mut id).await?;
        let mut frame = Vec::new();
        reply.write_to(&mut frame)?;
        stream.write_all(&frame).await
    };
    if let Ok(Err(e)) = tokio::time::timeout(fast::serve::HELLO_TIMEOUT, read_hello).await {
        tracing::debug!(error = %e, "refused fast-path connection closed early");
    }
}

/// Hands a fast-path connection to a blocking thread of its own, which holds `permit`.
fn start_fast(stream: UnixStream, open: FastOpen, permit: OwnedSemaphorePermit) {
    let stream = match stream.into_std().and_then(|s| {
        s.set_nonblocking(false)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over a fast-path connection");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("onload-fast".into())
        .spawn(move || {
            let _permit = permit;
            let served = fast::serve::serve(stream, fast::serve::HELLO_TIMEOUT, |id, conn| {
                open(id, conn)
            });
            if let Err(e) = served {
                tracing::debug!(error = %e, "fast-path connection ended with an error");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a fast-path thread; connection closed");
    }
}
