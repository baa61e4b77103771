//! Connections on the Unix socket, routed by their first bytes: the onload fast path
//! ([`crate::fast::MAGIC`]) gets a thread of its own; everything else is HTTP/2 for tonic.

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::RecvFlags;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::workers::FastSession;
use crate::fast;

/// Binds a fast-path hello (lease id) on a connection to its lease.
pub type FastOpen =
    Arc<dyn Fn(&str, &StdUnixStream) -> Result<FastSession, fast::Reply> + Send + Sync>;

/// A client that has not sent four bytes by then is not one of ours (both protocols speak first).
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the returned stream is dropped (the gRPC server stopped). HTTP/2
/// connections come out of the stream untouched (the bytes were only peeked at).
pub fn route(listener: UnixListener, open: FastOpen) -> ReceiverStream<io::Result<UnixStream>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = tx.closed() => return,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                // tonic logs it and keeps serving, as with its own listener stream.
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let (tx, open) = (tx.clone(), Arc::clone(&open));
            tokio::spawn(async move {
                match tokio::time::timeout(SNIFF_TIMEOUT, first_bytes(&stream)).await {
                    Ok(Ok(magic)) if magic == fast::MAGIC => start_fast(stream, open),
                    Ok(Ok(_)) => {
                        let _ = tx.send(Ok(stream)).await;
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

/// Hands a fast-path connection to a blocking thread of its own.
fn start_fast(stream: UnixStream, open: FastOpen) {
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
