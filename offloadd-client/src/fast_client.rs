//! The worker's side: a blocking connection bound to one lease.

use std::os::unix::net::UnixStream;
use std::path::Path;

use offloadd_proto::fast::{FastError, Reply, Request, write_hello, write_request};

#[derive(Debug)]
pub struct FastClient {
    stream: UnixStream,
}

impl FastClient {
    /// Connects to the daemon's Unix socket and binds the connection to `lease_id`. A refusal
    /// (unknown lease, too many connections) comes back as the reply, with its code and message.
    pub fn connect(socket: &Path, lease_id: &str) -> Result<Result<Self, Reply>, FastError> {
        let stream = UnixStream::connect(socket)?;
        write_hello(&stream, lease_id)?;
        let reply = Reply::read_from(&stream)?;
        Ok(if reply.code == 0 {
            Ok(Self { stream })
        } else {
            Err(reply)
        })
    }

    /// Onloads a model layer into its static slot; returns when the copy is complete. `&mut`:
    /// one request at a time per connection.
    pub fn onload(&mut self, layer: u32) -> Result<Reply, FastError> {
        self.request(&Request::sync(layer))
    }

    /// Sends any request (e.g. an async copy behind a slot-free event) and reads its reply.
    pub fn request(&mut self, req: &Request) -> Result<Reply, FastError> {
        write_request(&self.stream, req)?;
        Reply::read_from(&self.stream)
    }
}
