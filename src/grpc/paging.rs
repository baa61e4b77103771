//! Tensor tables a page at a time (GetModel, AttachWorker, GetLeaseTensors): a table of 100k
//! tensors is 6–9 MB, over the 4 MiB that gRPC clients and grpcurl accept by default.

use std::ops::Range;

use tonic::Status;

/// Rows per page unless asked otherwise: under 2 MB at the names checkpoints use.
pub const DEFAULT_ROWS: usize = 10_000;

/// The most bytes of rows one answer carries, whatever was asked: with the message's other
/// fields it stays within the 4 MiB that gRPC clients and grpcurl accept by default, even when
/// long tensor names make 10,000 rows larger than that.
pub const MAX_PAGE_BYTES: usize = 3 << 20;

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

/// `rows` clamped to a table of `len` and ended before its rows, `size(i)` bytes each as
/// encoded in the answer, pass [`MAX_PAGE_BYTES`] (a page has at least one row); and the token
/// of the next page, empty on the last.
pub fn fit(
    rows: Range<usize>,
    len: usize,
    mut size: impl FnMut(usize) -> usize,
) -> (Range<usize>, String) {
    let (start, mut end) = (rows.start.min(len), rows.end.min(len));
    let mut bytes = 0;
    for i in start..end {
        bytes += size(i);
        if bytes > MAX_PAGE_BYTES && i > start {
            end = i;
            break;
        }
    }
    let next = if end < len {
        end.to_string()
    } else {
        String::new()
    };
    (start..end, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_ends_at_what_was_asked_or_the_table() {
        assert_eq!(fit(rows(0, 0), 25_000, |_| 90), (0..10_000, "10000".into()));
        assert_eq!(
            fit(rows(20_000, 0), 25_000, |_| 90),
            (20_000..25_000, String::new())
        );
        assert_eq!(
            fit(rows(30_000, 5), 25_000, |_| 90),
            (25_000..25_000, String::new())
        );
    }

    #[test]
    fn a_page_of_long_rows_ends_before_the_byte_limit() {
        let row = 1000;
        let (page, next) = fit(rows(7, 10_000), 20_000, |_| row);
        assert_eq!(page, 7..7 + MAX_PAGE_BYTES / row);
        assert_eq!(next, (7 + MAX_PAGE_BYTES / row).to_string());
        // A row larger than the limit still goes, alone: the table can always be read.
        assert_eq!(
            fit(rows(0, 0), 3, |_| MAX_PAGE_BYTES + 1),
            (0..1, "1".into())
        );
    }
}
