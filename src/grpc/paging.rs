//! Tensor tables a page at a time (GetModel, AttachWorker, GetLeaseTensors): a table of 100k
//! tensors is 6–9 MB, over the 4 MiB that gRPC clients and grpcurl accept by default.

use std::ops::Range;

use tonic::Status;

/// Rows per page unless asked otherwise: under 2 MB.
pub const DEFAULT_ROWS: usize = 10_000;

/// The rows a request asks for: `size` of them (0: the default) from `start`.
pub fn rows(start: usize, size: u32) -> Range<usize> {
    let size = match size {
        0 => DEFAULT_ROWS,
        n => n as usize,
    };
    start..start.saturating_add(size)
}

/// The first row of a page, from a token this daemon gave; `what_to_pass` tells the caller
/// which token it should have sent.
pub fn start_of(token: &str, what_to_pass: &str) -> Result<usize, Status> {
    token.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "page_token {:?} is not one this daemon gave; pass {what_to_pass}",
            token.chars().take(64).collect::<String>()
        ))
    })
}

/// `rows` clamped to a table of `len`, and the token of the next page (empty on the last).
pub fn clamp(rows: Range<usize>, len: usize) -> (Range<usize>, String) {
    let (start, end) = (rows.start.min(len), rows.end.min(len));
    let next = if end < len {
        end.to_string()
    } else {
        String::new()
    };
    (start..end, next)
}
