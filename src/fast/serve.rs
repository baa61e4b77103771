//! The daemon's side of one fast-path connection, run on a thread of its own.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::{FastError, Reply, Request, read_hello, read_request};

/// What a bound connection answers requests with (the lease, for the daemon).
pub trait Session {
    fn onload(&mut self, req: Request) -> Reply;
}

/// Serves one connection until the worker closes it or the daemon shuts it down (the lease
/// ended). The hello must come within `hello_timeout` (server.handshake_timeout_ms): until it
/// is bound to a lease nothing else would end it, so a stalled client must not hold a thread. `open` binds the hello's lease id to a session, or refuses with the reply to send.
/// Blocking.
pub fn serve<S: Session>(
    stream: UnixStream,
    hello_timeout: Duration,
    open: impl FnOnce(&str, &UnixStream) -> Result<S, Reply>,
) -> Result<(), FastError> {
    stream.set_read_timeout(Some(hello_timeout))?;
    let lease_id = match read_hello(&stream) {
        Ok(id) => id,
        Err(FastError::Io(e)) => return Err(e.into()),
        Err(e) => {
            // Tell a confused client what is wrong before closing.
            let _ = Reply::from_status(&tonic::Status::invalid_argument(e.to_string()))
                .write_to(&stream);
            return Err(e);
        }
    };
    let mut session = match open(&lease_id, &stream) {
        Ok(s) => s,
        Err(refused) => return Ok(refused.write_to(&stream)?),
    };
    // Bound: the lease now closes the connection when it ends; a worker may sit between layers
    // for as long as it likes.
    stream.set_read_timeout(None)?;
    Reply::ok(0, 0).write_to(&stream)?;
    while let Some(req) = read_request(&stream)? {
        session.onload(req).write_to(&stream)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::fast::Request;

    const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
    use crate::fast::{read_request, write_hello, write_request};

    struct Echo;
    impl Session for Echo {
        fn onload(&mut self, req: Request) -> Reply {
            Reply::ok(u64::from(req.layer) * 10, req.layer % 2)
        }
    }

    #[test]
    fn a_bound_connection_answers_in_order_until_closed() {
        let (daemon, worker) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            serve(daemon, HELLO_TIMEOUT, |id, _| {
                assert_eq!(id, "lease");
                Ok(Echo)
            })
        });
        write_hello(&worker, "lease").unwrap();
        assert_eq!(Reply::read_from(&worker).unwrap().code, 0);
        // Two requests written before reading either: answered in order.
        write_request(&worker, &Request::sync(3)).unwrap();
        write_request(&worker, &Request::sync(4)).unwrap();
        assert_eq!(Reply::read_from(&worker).unwrap(), Reply::ok(30, 1));
        assert_eq!(Reply::read_from(&worker).unwrap(), Reply::ok(40, 0));
        drop(worker);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn a_refused_hello_gets_the_reply_and_the_connection_ends() {
        let (daemon, worker) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            serve(daemon, HELLO_TIMEOUT, |_, _| {
                Err::<Echo, _>(Reply::error(5, "no such lease"))
            })
        });
        write_hello(&worker, "gone").unwrap();
        assert_eq!(
            Reply::read_from(&worker).unwrap(),
            Reply::error(5, "no such lease")
        );
        server.join().unwrap().unwrap();
        assert_eq!(read_request(&worker).unwrap(), None, "closed by the daemon");
    }

    #[test]
    fn a_stalled_hello_times_out_instead_of_holding_the_thread() {
        let (daemon, mut worker) = UnixStream::pair().unwrap();
        worker.write_all(b"OFLD").unwrap();
        let err = serve(daemon, Duration::from_millis(50), |_, _| Ok(Echo)).unwrap_err();
        assert!(
            matches!(&err, FastError::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
            "{err:?}"
        );
    }
}
