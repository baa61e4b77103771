//! The onload fast path: OnloadToStatic as a small binary request/response on the daemon's own
//! Unix socket, beside gRPC.
//!
//! Why: an onload is on the critical path of every offloaded layer. Over gRPC each call costs
//! HTTP/2 framing, header compression and a task hand-off on both sides, and the daemon's one
//! event-loop thread is shared by every worker, so its wake-ups land on whichever CPU it last ran
//! on. Here each connection gets a daemon thread of its own that blocks on the socket: two small
//! writes per call, and the scheduler keeps each worker next to its thread. The copy and the
//! errors are exactly the RPC's (status codes and messages come from the same mapping).
//!
//! The daemon tells the two protocols apart by a connection's first four bytes: HTTP/2 starts
//! with `PRI `, this protocol with [`MAGIC`]. All integers are little-endian.
//!
//! | frame | direction | layout |
//! | --- | --- | --- |
//! | hello | worker → daemon, once | `OFLD`, u16 version (1), u16 length, lease id (UTF-8) |
//! | reply to hello | daemon → worker | a reply frame: code 0 once the lease is bound |
//! | request | worker → daemon | u32 model layer, or'd with [`ASYNC`] and [`SLOT_FREE`]; with `SLOT_FREE`, a 64-byte CUDA IPC event handle |
//! | reply | daemon → worker | u32 gRPC code (0 = OK), u32 slot, u64 bytes copied, u32 length, message (UTF-8) |
//!
//! A plain request is answered when the layer's copy into its static slot is complete, as with
//! `OnloadToStatic{async_copy: false}`. With `ASYNC` (cuda) it is answered once the copy is
//! enqueued, behind the worker's "slot free" event when `SLOT_FREE` sends one, exactly as
//! `OnloadToStatic{async_copy: true, slot_free_event}`: the flags ride in the layer word, whose
//! top bits no model uses, so a plain request is the same four bytes it always was. One request
//! at a time per connection. The daemon closes the connection when the lease ends; a hello that
//! names no live lease gets NOT_FOUND.

use std::io::{self, Read, Write};

use thiserror::Error;

/// First bytes of a fast-path connection. HTTP/2 connections start with `PRI `.
pub const MAGIC: [u8; 4] = *b"OFLD";
pub const VERSION: u16 = 1;
/// Lease ids are 24 hex characters; this only bounds what a confused client can make us read.
const MAX_LEASE_ID: usize = 256;
const MAX_MESSAGE: usize = 64 << 10;
const REPLY_HEADER: usize = 20;
/// Request flag: enqueue the copy and answer at once (the RPC's `async_copy`).
pub const ASYNC: u32 = 1 << 31;
/// Request flag: a CUDA IPC event handle follows the word (the RPC's `slot_free_event`).
pub const SLOT_FREE: u32 = 1 << 30;
/// Bytes of a CUDA IPC event handle (`CUipcEventHandle`).
pub const EVENT_HANDLE: usize = 64;

/// One onload request: the RPC's OnloadToStaticRequest without the lease id, which the
/// connection is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub layer: u32,
    pub async_copy: bool,
    pub slot_free: Option<[u8; EVENT_HANDLE]>,
}

impl Request {
    /// A synchronous onload of `layer`.
    pub fn sync(layer: u32) -> Self {
        Self {
            layer,
            async_copy: false,
            slot_free: None,
        }
    }
}

#[derive(Debug, Error)]
pub enum FastError {
    #[error("fast path: {0}")]
    Io(#[from] io::Error),
    #[error("fast path: connection does not start with the OFLD magic")]
    BadMagic,
    #[error("fast path: protocol version {0} is not supported (this daemon speaks {VERSION})")]
    BadVersion(u16),
    #[error("fast path: {what} of {len} bytes is over the limit of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("fast path: {0} is not UTF-8")]
    NotUtf8(&'static str),
}

/// The answer to a hello or a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// gRPC status code; 0 is OK.
    pub code: u32,
    pub slot: u32,
    pub bytes: u64,
    /// Empty on success; on failure, the same message the RPC would give.
    pub message: String,
}

impl Reply {
    pub fn ok(bytes: u64, slot: u32) -> Self {
        Self {
            code: 0,
            slot,
            bytes,
            message: String::new(),
        }
    }

    pub fn error(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            slot: 0,
            bytes: 0,
            message: message.into(),
        }
    }

    /// The failure the RPC would have answered, as a reply.
    pub fn from_status(s: &tonic::Status) -> Self {
        Self::error(s.code() as u32, s.message())
    }

    /// A failed reply as the status the RPC would have returned.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(
            tonic::Code::from_i32(self.code as i32),
            self.message.clone(),
        )
    }

    /// Writes the frame with one write, so the peer wakes once.
    pub fn write_to(&self, mut w: impl Write) -> io::Result<()> {
        let msg = &self.message.as_bytes()[..self.message.len().min(MAX_MESSAGE)];
        let mut frame = Vec::with_capacity(REPLY_HEADER + msg.len());
        frame.extend_from_slice(&self.code.to_le_bytes());
        frame.extend_from_slice(&self.slot.to_le_bytes());
        frame.extend_from_slice(&self.bytes.to_le_bytes());
        frame.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        frame.extend_from_slice(msg);
        w.write_all(&frame)
    }

    pub fn read_from(mut r: impl Read) -> Result<Self, FastError> {
        let mut h = [0u8; REPLY_HEADER];
        r.read_exact(&mut h)?;
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let len = word(16) as usize;
        if len > MAX_MESSAGE {
            return Err(FastError::TooLong {
                what: "reply message",
                len,
                max: MAX_MESSAGE,
            });
        }
        let mut msg = vec![0u8; len];
        r.read_exact(&mut msg)?;
        Ok(Self {
            code: word(0),
            slot: word(4),
            bytes: u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
            message: String::from_utf8(msg).map_err(|_| FastError::NotUtf8("reply message"))?,
        })
    }
}

pub fn write_hello(mut w: impl Write, lease_id: &str) -> Result<(), FastError> {
    if lease_id.len() > MAX_LEASE_ID {
        return Err(FastError::TooLong {
            what: "lease id",
            len: lease_id.len(),
            max: MAX_LEASE_ID,
        });
    }
    let mut frame = Vec::with_capacity(8 + lease_id.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&VERSION.to_le_bytes());
    frame.extend_from_slice(&(lease_id.len() as u16).to_le_bytes());
    frame.extend_from_slice(lease_id.as_bytes());
    Ok(w.write_all(&frame)?)
}

/// Reads a hello; returns the lease id.
pub fn read_hello(mut r: impl Read) -> Result<String, FastError> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    if h[..4] != MAGIC {
        return Err(FastError::BadMagic);
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(FastError::BadVersion(version));
    }
    let len = u16::from_le_bytes([h[6], h[7]]) as usize;
    if len > MAX_LEASE_ID {
        return Err(FastError::TooLong {
            what: "lease id",
            len,
            max: MAX_LEASE_ID,
        });
    }
    let mut id = vec![0u8; len];
    r.read_exact(&mut id)?;
    String::from_utf8(id).map_err(|_| FastError::NotUtf8("lease id"))
}

/// Writes a request with one write. A layer that collides with the flag bits is refused here
/// rather than sent as a different request.
pub fn write_request(mut w: impl Write, req: &Request) -> io::Result<()> {
    if req.layer & (ASYNC | SLOT_FREE) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("layer {} is beyond what the fast path addresses", req.layer),
        ));
    }
    let mut word = req.layer;
    if req.async_copy {
        word |= ASYNC;
    }
    let mut frame = Vec::with_capacity(4 + EVENT_HANDLE);
    if let Some(handle) = &req.slot_free {
        word |= SLOT_FREE;
        frame.extend_from_slice(&word.to_le_bytes());
        frame.extend_from_slice(handle);
    } else {
        frame.extend_from_slice(&word.to_le_bytes());
    }
    w.write_all(&frame)
}

/// Reads a request; None when the peer closed the connection between requests.
pub fn read_request(mut r: impl Read) -> io::Result<Option<Request>> {
    let mut b = [0u8; 4];
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let word = u32::from_le_bytes(b);
    let slot_free = if word & SLOT_FREE != 0 {
        let mut handle = [0u8; EVENT_HANDLE];
        r.read_exact(&mut handle)?;
        Some(handle)
    } else {
        None
    };
    Ok(Some(Request {
        layer: word & !(ASYNC | SLOT_FREE),
        async_copy: word & ASYNC != 0,
        slot_free,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        write_hello(&mut buf, "0123456789abcdef01234567").unwrap();
        assert_eq!(&buf[..4], b"OFLD");
        assert_eq!(read_hello(&buf[..]).unwrap(), "0123456789abcdef01234567");

        let reply = Reply::error(5, "lease \"x\" not found");
        let mut buf = Vec::new();
        reply.write_to(&mut buf).unwrap();
        assert_eq!(buf.len(), REPLY_HEADER + reply.message.len());
        assert_eq!(Reply::read_from(&buf[..]).unwrap(), reply);

        let mut buf = Vec::new();
        write_request(&mut buf, &Request::sync(7)).unwrap();
        assert_eq!(
            buf,
            7u32.to_le_bytes(),
            "a plain request is the layer alone"
        );
        assert_eq!(read_request(&buf[..]).unwrap(), Some(Request::sync(7)));
        assert_eq!(read_request(&[][..]).unwrap(), None);
        assert!(
            read_request(&buf[..2]).is_err(),
            "a torn request is an error, not a close"
        );
    }

    #[test]
    fn async_requests_carry_their_flags_and_event() {
        for req in [
            Request {
                layer: 5,
                async_copy: true,
                slot_free: None,
            },
            Request {
                layer: 6,
                async_copy: true,
                slot_free: Some([7; EVENT_HANDLE]),
            },
            // Refused by the daemon as the RPC refuses it, so it must arrive as sent.
            Request {
                layer: 0,
                async_copy: false,
                slot_free: Some([1; EVENT_HANDLE]),
            },
        ] {
            let mut buf = Vec::new();
            write_request(&mut buf, &req).unwrap();
            assert_eq!(buf.len(), 4 + req.slot_free.map_or(0, |_| EVENT_HANDLE));
            assert_eq!(read_request(&buf[..]).unwrap(), Some(req.clone()));
            assert!(
                read_request(&buf[..buf.len() - 1]).is_err(),
                "a torn request is an error"
            );
        }
        let err = write_request(Vec::new(), &Request::sync(ASYNC | 3)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn bad_hellos_are_named() {
        assert!(matches!(
            read_hello(&b"PRI * HTTP/2.0"[..]),
            Err(FastError::BadMagic)
        ));
        let mut v2 = b"OFLD".to_vec();
        v2.extend_from_slice(&2u16.to_le_bytes());
        v2.extend_from_slice(&0u16.to_le_bytes());
        assert!(matches!(read_hello(&v2[..]), Err(FastError::BadVersion(2))));
        let mut long = b"OFLD".to_vec();
        long.extend_from_slice(&1u16.to_le_bytes());
        long.extend_from_slice(&1000u16.to_le_bytes());
        assert!(matches!(
            read_hello(&long[..]),
            Err(FastError::TooLong { len: 1000, .. })
        ));
        assert!(write_hello(Vec::new(), &"x".repeat(300)).is_err());
    }

    mod props {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(
                std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
            ))]

            #[test]
            fn requests_round_trip(layer in 0u32..SLOT_FREE, async_copy in any::<bool>(), handle in prop::option::of(prop::array::uniform32(any::<u8>()))) {
                let slot_free = handle.map(|h| {
                    let mut full = [0u8; EVENT_HANDLE];
                    full[..32].copy_from_slice(&h);
                    full
                });
                let req = Request { layer, async_copy, slot_free };
                let mut buf = Vec::new();
                write_request(&mut buf, &req).unwrap();
                prop_assert_eq!(read_request(&buf[..]).unwrap(), Some(req));
            }

            #[test]
            fn replies_round_trip(code in any::<u32>(), slot in any::<u32>(), bytes in any::<u64>(), message in ".{0,200}") {
                let reply = Reply { code, slot, bytes, message };
                let mut buf = Vec::new();
                reply.write_to(&mut buf).unwrap();
                prop_assert_eq!(Reply::read_from(&buf[..]).unwrap(), reply);
            }

            #[test]
            fn arbitrary_bytes_never_panic_a_reader(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
                let _ = read_hello(&bytes[..]);
                let _ = read_request(&bytes[..]);
                let _ = Reply::read_from(&bytes[..]);
            }
        }
    }
}
