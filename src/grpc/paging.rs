//! Tensor tables a page at a time (GetModel, AttachWorker, GetLeaseTensors): a table of 100k
//! tensors is 6–9 MB, over the 4 MiB that gRPC clients and grpcurl accept by default.

use std::hash::{BuildHasher, RandomState};
use std::ops::Range;
use std::sync::OnceLock;

use tonic::Status;

use crate::core::leases::Lease;
use crate::core::models::model::Model;

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

/// Which table a token belongs to. A token is bound to it: one from another model or lease, or
/// from this model's earlier registration, is refused rather than read as a row number there.
pub struct Scope(String);

impl Scope {
    /// This registration of the model (its place in this daemon's memory, with its name).
    pub fn model(m: &Model) -> Self {
        Self(format!("model {} {:p}", m.name, std::ptr::from_ref(m)))
    }

    pub fn lease(l: &Lease) -> Self {
        Self(format!("lease {}", l.id))
    }

    /// The token for the page that starts at `next` (empty: no next page). Opaque to callers:
    /// the row and a keyed hash of the row and the scope, under a key drawn at start, so a
    /// token can be neither made up nor carried to another table or another run.
    pub fn token(&self, next: Option<usize>) -> String {
        next.map_or_else(String::new, |row| format!("{row:x}.{:016x}", self.tag(row)))
    }

    fn tag(&self, row: usize) -> u64 {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        KEY.get_or_init(RandomState::new).hash_one((&self.0, row))
    }

    /// The first row of a page, from a token this daemon gave for this table; `what_to_pass`
    /// tells the caller which token it should have sent.
    pub fn start_of(&self, token: &str, what_to_pass: &str) -> Result<usize, Status> {
        token
            .split_once('.')
            .and_then(|(row, tag)| {
                let row = usize::from_str_radix(row, 16).ok()?;
                (u64::from_str_radix(tag, 16).ok()? == self.tag(row)).then_some(row)
            })
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "page_token {:?} is not one this daemon gave for this table (tokens are bound to \
                     the model or lease they came from, and end with a restart); pass {what_to_pass}",
                    token.chars().take(64).collect::<String>()
                ))
            })
    }
}

/// `rows` clamped to a table of `len` and ended before its rows, `size(i)` bytes each as
/// encoded in the answer, pass [`MAX_PAGE_BYTES`] (a page has at least one row); and the first
/// row of the next page, None on the last.
pub fn fit(
    rows: Range<usize>,
    len: usize,
    mut size: impl FnMut(usize) -> usize,
) -> (Range<usize>, Option<usize>) {
    let (start, mut end) = (rows.start.min(len), rows.end.min(len));
    let mut bytes = 0;
    for i in start..end {
        bytes += size(i);
        if bytes > MAX_PAGE_BYTES && i > start {
            end = i;
            break;
        }
    }
    (start..end, (end < len).then_some(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_ends_at_what_was_asked_or_the_table() {
        assert_eq!(fit(rows(0, 0), 25_000, |_| 90), (0..10_000, Some(10_000)));
        assert_eq!(fit(rows(20_000, 0), 25_000, |_| 90), (20_000..25_000, None));
        assert_eq!(fit(rows(30_000, 5), 25_000, |_| 90), (25_000..25_000, None));
    }

    #[test]
    fn a_page_of_long_rows_ends_before_the_byte_limit() {
        let row = 1000;
        let (page, next) = fit(rows(7, 10_000), 20_000, |_| row);
        assert_eq!(page, 7..7 + MAX_PAGE_BYTES / row);
        assert_eq!(next, Some(7 + MAX_PAGE_BYTES / row));
        // A row larger than the limit still goes, alone: the table can always be read.
        assert_eq!(fit(rows(0, 0), 3, |_| MAX_PAGE_BYTES + 1), (0..1, Some(1)));
    }

    #[test]
    fn a_token_reads_back_in_its_own_table_only() {
        let (a, b) = (Scope("lease a".into()), Scope("lease b".into()));
        assert_eq!(a.token(None), "");
        let t = a.token(Some(10_000));
        assert_eq!(a.start_of(&t, "x").unwrap(), 10_000);
        assert!(b.start_of(&t, "x").is_err(), "another table's token");
        for forged in ["10000", "2710", "2710.0000000000000000", "ten", ""] {
            assert!(a.start_of(forged, "x").is_err(), "{forged:?}");
        }
        let (row, tag) = t.split_once('.').unwrap();
        let moved = format!("{:x}.{tag}", usize::from_str_radix(row, 16).unwrap() + 1);
        assert!(
            a.start_of(&moved, "x").is_err(),
            "a row moved under the same tag"
        );
    }
}
