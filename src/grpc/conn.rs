//! Accepted connections: an idle timeout, accept errors that back off, and who the peer is
//! (SO_PEERCRED on the Unix socket, the address on TCP). Caps are the gate's (`gate.rs`).
//!
//! Why here and not in tonic: tonic serves whatever stream of connections it is given, without
//! limit, and keeps an HTTP/2 connection open for as long as the peer answers pings. A client
//! that opens connections and leaves them idle would hold every fd of the daemon.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

/// Who is at the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A Unix-socket peer's credentials at connect time.
    Unix {
        uid: u32,
        gid: u32,
        pid: i32,
    },
    /// The kernel could not say (should not happen on Linux).
    UnixUnknown,
    Tcp(SocketAddr),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Unix { uid, gid, pid } => write!(f, "uid={uid} gid={gid} pid={pid}"),
            Peer::UnixUnknown => f.write_str("unix peer (credentials unknown)"),
            Peer::Tcp(addr) => write!(f, "tcp {addr}"),
        }
    }
}

impl Peer {
    pub fn of_unix(fd: impl std::os::fd::AsFd) -> Self {
        match rustix::net::sockopt::socket_peercred(fd) {
            Ok(c) => Peer::Unix {
                uid: c.uid.as_raw(),
                gid: c.gid.as_raw(),
                pid: c.pid.as_raw_nonzero().get(),
            },
            Err(_) => Peer::UnixUnknown,
        }
    }
}

/// What one connection's calls and its reader share: calls in flight and when the last one
/// started or ended (milliseconds since the connection was accepted).
#[derive(Debug)]
pub(super) struct Activity {
    pub(super) opened: Instant,
    pub(super) in_flight: AtomicUsize,
    pub(super) last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// When the connection becomes idle-expired if nothing happens before, or None while a
    /// call is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| {
            self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
        })
    }
}

/// Request extension (tonic's connect info): the peer, and a handle that counts the call.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: Peer,
    pub(super) activity: Arc<Activity>,
}

impl ConnInfo {
    /// Marks a call in flight until the guard drops; a connection is never idle while it lasts.
    pub fn call(&self) -> CallGuard {
        self.activity.in_flight.fetch_add(1, Ordering::AcqRel);
        self.activity.touch();
        CallGuard(Arc::clone(&self.activity))
    }
}

pub struct CallGuard(Arc<Activity>);

/// A response body that keeps its call counted until the body ends: a stream (WatchModel)
/// is a call in flight for as long as it sends.
pub struct CallBody<B> {
    body: B,
    _guard: Option<CallGuard>,
}

impl<B> CallBody<B> {
    pub fn new(body: B, guard: Option<CallGuard>) -> Self {
        Self {
            body,
            _guard: guard,
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for CallBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted connection: holds its listener's permit and ends (EOF to hyper) once idle.
pub struct Conn<IO> {
    pub(super) io: IO,
    pub(super) info: ConnInfo,
    pub(super) idle: Option<(Duration, Pin<Box<Sleep>>)>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) listener: &'static str,
    pub(super) _admission: super::gate::Admission,
}

impl<IO> Connected for Conn<IO> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Poll::Ready(r) = Pin::new(&mut this.io).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        // Nothing to read: the moment to see whether the connection has been idle too long.
        // Bytes read do not count as activity (HTTP/2 pings would keep a silent client alive);
        // calls do.
        let Some((idle, sleep)) = &mut this.idle else {
            return Poll::Pending;
        };
        loop {
            let now = Instant::now();
            match this.info.activity.idle_deadline(*idle) {
                Some(deadline) if deadline <= now => {
                    tracing::debug!(listener = this.listener, peer = %this.info.peer, "closing idle connection");
                    this.metrics.connection_closed_idle(this.listener);
                    this.idle = None;
                    return Poll::Ready(Ok(())); // EOF: hyper closes the connection
                }
                Some(deadline) => sleep.as_mut().reset(deadline.into()),
                // A call is in flight; look again one idle period from now.
                None => sleep.as_mut().reset((now + *idle).into()),
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Sleeps after a failed accept, doubling up to a second: with no fds left (EMFILE) accept
/// fails at once, and retrying at once would spin a CPU while starving everyone else.
#[derive(Debug, Default)]
pub struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub async fn failed(&mut self, listener: &'static str, error: &io::Error) {
        let wait = self.next.unwrap_or(Self::FIRST);
        tracing::warn!(listener, %error, wait_ms = wait.as_millis() as u64, "accept failed; backing off");
        tokio::time::sleep(wait).await;
        self.next = Some((wait * 2).min(Self::MAX));
    }

    pub fn succeeded(&mut self) {
        self.next = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_only_with_no_call_in_flight() {
        let a = Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        };
        let idle = Duration::from_secs(5);
        assert_eq!(a.idle_deadline(idle), Some(a.opened + idle));
        let info = ConnInfo {
            peer: Peer::UnixUnknown,
            activity: Arc::new(a),
        };
        let guard = info.call();
        assert_eq!(info.activity.idle_deadline(idle), None);
        drop(guard);
        assert!(info.activity.idle_deadline(idle).unwrap() >= info.activity.opened + idle);
    }
}
