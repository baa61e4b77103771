//! The daemon's side of one fast-path connection, run on a thread of its own.

use std::os::unix::net::UnixStream;

use super::{FastError, Reply, read_hello, read_request};

/// What a bound connection answers requests with (the lease, for the daemon).
pub trait Session {
    fn onload(&mut self, layer: u32) -> Reply;
}

/// gRPC's INVALID_ARGUMENT, for a hello this protocol cannot read.
const INVALID_ARGUMENT: u32 = 3;

/// Serves one connection until the worker closes it or the daemon shuts it down (the lease
/// ended). `open` binds the hello's lease id to a session, or refuses with the reply to send.
/// Blocking.
pub fn serve<S: Session>(
    stream: UnixStream,
    open: impl FnOnce(&str, &UnixStream) -> Result<S, Reply>,
) -> Result<(), FastError> {
    let lease_id = match read_hello(&stream) {
        Ok(id) => id,
        Err(FastError::Io(e)) => return Err(e.into()),
        Err(e) => {
            // Tell a confused client what is wrong before closing.
            let _ = Reply::error(INVALID_ARGUMENT, e.to_string()).write_to(&stream);
            return Err(e);
        }
    };
    let mut session = match open(&lease_id, &stream) {
        Ok(s) => s,
        Err(refused) => return Ok(refused.write_to(&stream)?),
    };
    Reply::ok(0, 0).write_to(&stream)?;
    while let Some(layer) = read_request(&stream)? {
        session.onload(layer).write_to(&stream)?;
    }
    Ok(())
}
