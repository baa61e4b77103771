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
use super::conn::{Backoff, Conn, Peer};
use super::gate::{Admission, Gate};
use super::tls::TcpIo;
use super::workers::FastFrames;
use crate::fast;
use crate::metrics::Metrics;

/// Binds a fast-path hello (lease id) on a connection to its lease.
pub type FastOpen =
    Arc<dyn Fn(&str, &StdUnixStream) -> Result<FastFrames, fast::Reply> + Send + Sync>;

/// What every HTTP/2 client sends first (RFC 9113 §3.4): a connection has spoken once it has.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
            let Some(admission) = gate.admit(&peer) else {
                continue; // dropped: closed at once
            };
            let (tx, gate, fast) = (tx.clone(), gate.clone(), fast.clone());
            tokio::spawn(async move {
                // Both protocols speak first; one that has not within the deadline is closed,
                // so silent connections hold their places for seconds, not minutes.
                let deadline = gate.handshake_timeout();
                match tokio::time::timeout(deadline, first_bytes(&stream)).await {
                    Ok(Ok(magic)) if magic == fast::MAGIC => {
                        admit_fast(stream, &peer, &fast, admission, deadline).await;
                    }
                    Ok(Ok(_)) => match tokio::time::timeout(deadline, preface(&stream)).await {
                        Ok(Ok(())) => {
                            let _ = tx.send(Ok(gate.wrap(stream, peer, admission))).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "not an HTTP/2 client; closed")
                        }
                        Err(_) => silent(&peer, deadline),
                    },
                    Ok(Err(e)) => tracing::debug!(error = %e, "connection closed before it spoke"),
                    Err(_) => silent(&peer, deadline),
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
            let Some(admission) = gate.admit(&peer) else {
                continue;
            };
            // Small request/response frames: Nagle would add up to 40 ms to each.
            let _ = stream.set_nodelay(true);
            let (tx, gate, tls) = (tx.clone(), gate.clone(), tls.clone());
            tokio::spawn(async move {
                let deadline = gate.handshake_timeout();
                let Some(tls) = tls else {
                    match tokio::time::timeout(deadline, preface(&stream)).await {
                        Ok(Ok(())) => {
                            let io = TcpIo::Plain(stream);
                            let _ = tx.send(Ok(gate.wrap(io, peer, admission))).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "not an HTTP/2 client; closed")
                        }
                        Err(_) => silent(&peer, deadline),
                    }
                    return;
                };
                match tokio::time::timeout(deadline, tls.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let io = TcpIo::Tls(Box::new(s));
                        let _ = tx.send(Ok(gate.wrap(io, peer, admission))).await;
                    }
                    // A plaintext client, an untrusted or missing client certificate: the
                    // client sees the TLS alert; the daemon notes it and goes on.
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed; connection closed")
                    }
                    Err(_) => silent(&peer, deadline),
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

fn silent(peer: &Peer, deadline: Duration) {
    tracing::debug!(%peer, timeout_ms = deadline.as_millis() as u64, "connection did not finish its handshake in time (server.handshake_timeout_ms); closed");
}

/// Peeks at the first four bytes without consuming them.
async fn first_bytes(stream: &UnixStream) -> io::Result<[u8; 4]> {
    let mut head = [0u8; 4];
    peek(stream, &mut head).await?;
    Ok(head)
}

/// Waits, without consuming anything, until the peer has sent the whole HTTP/2 preface.
async fn preface<S: Peek>(stream: &S) -> io::Result<()> {
    let mut head = [0u8; H2_PREFACE.len()];
    peek(stream, &mut head).await?;
    match &head == H2_PREFACE {
        true => Ok(()),
        false => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the first bytes are not the HTTP/2 preface",
        )),
    }
}

/// A tokio socket whose pending bytes can be peeked at: the Unix and TCP streams.
trait Peek: std::os::fd::AsFd {
    fn ready(
        &self,
        interest: Interest,
    ) -> impl std::future::Future<Output = io::Result<tokio::io::Ready>> + Send;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

impl Peek for UnixStream {
    fn ready(
        &self,
        interest: Interest,
    ) -> impl std::future::Future<Output = io::Result<tokio::io::Ready>> + Send {
        UnixStream::ready(self, interest)
    }
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        UnixStream::try_io(self, interest, f)
    }
}

impl Peek for tokio::net::TcpStream {
    fn ready(
        &self,
        interest: Interest,
    ) -> impl std::future::Future<Output = io::Result<tokio::io::Ready>> + Send {
        tokio::net::TcpStream::ready(self, interest)
    }
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        tokio::net::TcpStream::try_io(self, interest, f)
    }
}

/// Fills `head` with the first bytes the peer sent, leaving them to be read.
async fn peek<S: Peek>(stream: &S, head: &mut [u8]) -> io::Result<()> {
    loop {
        let ready = stream.ready(Interest::READABLE).await?;
        let peeked = stream.try_io(Interest::READABLE, || {
            let (n, _) =
                rustix::net::recv(stream, &mut *head, RecvFlags::PEEK | RecvFlags::DONTWAIT)?;
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
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Starts a fast-path connection on a thread of its own, or refuses it with a reply frame: a
/// peer the policy does not allow, or no thread left under `server.max_fast_connections`.
async fn admit_fast(
    stream: UnixStream,
    peer: &Peer,
    fast: &FastPath,
    mut admission: Admission,
    hello_timeout: Duration,
) {
    if let Err(status) = fast.policy.check_unix_peer(peer) {
        fast.metrics.auth_denied("uds");
        tracing::warn!(%peer, error = status.message(), "fast-path connection refused");
        return refuse(stream, fast::Reply::from_status(&status), hello_timeout).await;
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
            hello_timeout,
        )
        .await;
    };
    // Fast-path connections count against their own cap, and still against their peer's.
    admission.leave_listener_cap();
    start_fast(
        stream,
        Arc::clone(&fast.open),
        (permit, admission),
        hello_timeout,
    );
}

/// Reads the hello (so the worker's write does not fail) and answers it with `reply`, without a
/// thread: refusals happen exactly when threads are scarce.
async fn refuse(mut stream: UnixStream, reply: fast::Reply, hello_timeout: Duration) {
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
    if let Ok(Err(e)) = tokio::time::timeout(hello_timeout, read_hello).await {
        tracing::debug!(error = %e, "refused fast-path connection closed early");
    }
}

/// Hands a fast-path connection to a blocking thread of its own, which holds its places.
fn start_fast(
    stream: UnixStream,
    open: FastOpen,
    places: (OwnedSemaphorePermit, Admission),
    hello_timeout: Duration,
) {
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
            let _places = places;
            let served = fast::serve::serve(stream, hello_timeout, |id, conn| open(id, conn));
            if let Err(e) = served {
                tracing::debug!(error = %e, "fast-path connection ended with an error");
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a fast-path thread; connection closed");
    }
}
