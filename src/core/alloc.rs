//! Range allocator inside a pool: aligned first-fit over a free list that coalesces on free.
//! A model's ranges are taken as one run where one fits (`alloc_many`), so a BTreeMap of free
//! ranges is plenty even for a model of 100k tensors: it is split once per model.

use std::collections::BTreeMap;

use thiserror::Error;

/// Every range starts on this boundary at least: what GPU copies and vector loads want.
pub const MIN_ALIGN: u64 = 256;

/// A range handed out by the allocator: a token, not a pair of numbers. Only the allocator
/// makes one, it cannot be copied, and freeing it consumes it, so two holders of one range and
/// a double free are compile errors rather than a runtime check. `len` is what was asked for;
/// the block behind it is rounded up to `MIN_ALIGN`.
#[derive(Debug, PartialEq, Eq)]
pub struct Range {
    offset: u64,
    len: u64,
}

impl Range {
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn block(&self) -> u64 {
        block_len(self.len)
    }
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("no free range of {len} bytes (free {free} bytes, largest free range {largest} bytes)")]
    Exhausted { len: u64, free: u64, largest: u64 },
    #[error("alignment {0} is not a power of two")]
    BadAlign(u64),
    #[error("the pool is being deleted")]
    Retired,
    #[error("range {offset}+{len} was not allocated")]
    NotAllocated { offset: u64, len: u64 },
    #[error("range {offset}+{len} is not free (misaligned, out of bounds or taken)")]
    NotFree { offset: u64, len: u64 },
}

fn block_len(len: u64) -> u64 {
    len.max(1).div_ceil(MIN_ALIGN) * MIN_ALIGN
}

#[derive(Debug)]
pub struct RangeAllocator {
    size: u64,
    /// offset -> length of each free range; never two adjacent ones.
    free: BTreeMap<u64, u64>,
    used: u64,
}

impl RangeAllocator {
    pub fn new(size: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        Self {
            size,
            free,
            used: 0,
        }
    }

    /// Bytes in allocated blocks (including alignment padding inside blocks).
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// Allocates `len` bytes aligned to `align` (at least `MIN_ALIGN`).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<Range, AllocError> {
        if !align.is_power_of_two() {
            return Err(AllocError::BadAlign(align));
        }
        let align = align.max(MIN_ALIGN);
        let need = block_len(len);
        let found = self.free.iter().find_map(|(&start, &flen)| {
            let aligned = start.checked_next_multiple_of(align)?;
            let pad = aligned - start;
            (flen >= pad.checked_add(need)?).then_some((start, flen, aligned))
        });
        let Some((start, flen, aligned)) = found else {
            return Err(AllocError::Exhausted {
                len,
                free: self.size - self.used,
                largest: self.largest_free(),
            });
        };
        self.free.remove(&start);
        if aligned > start {
            self.free.insert(start, aligned - start);
        }
        let end = aligned + need;
        if end < start + flen {
            self.free.insert(end, start + flen - end);
        }
        self.used += need;
        Ok(Range {
            offset: aligned,
            len,
        })
    }

    /// [`Self::alloc`] for each of `lens`, in order, onto `out`: back to back in the first free
    /// range that holds them all, with one split of the free map, since a split per tensor was
    /// a twentieth of registering 100k of them; else one by one, each where it first fits. On
    /// error, `out` holds the ranges already taken, for the caller to give back.
    pub fn alloc_many(
        &mut self,
        lens: &[u64],
        align: u64,
        out: &mut Vec<Range>,
    ) -> Result<(), AllocError> {
        // Blocks are multiples of MIN_ALIGN, so back to back each is aligned as the first only
        // when no more is asked.
        let total = lens
            .iter()
            .try_fold(0u64, |sum, &len| sum.checked_add(block_len(len)));
        if align <= MIN_ALIGN
            && lens.len() > 1
            && let Some(run) = total.and_then(|total| self.alloc(total, align).ok())
        {
            let mut at = run.offset;
            out.extend(lens.iter().map(|&len| {
                let r = Range { offset: at, len };
                at += r.block();
                r
            }));
            return Ok(());
        }
        for &len in lens {
            out.push(self.alloc(len, align)?);
        }
        Ok(())
    }

    /// Takes exactly `[offset, offset + len)` (its block), as a journal recorded it: the range
    /// must be `MIN_ALIGN`-aligned and wholly free.
    pub fn claim(&mut self, offset: u64, len: u64) -> Result<Range, AllocError> {
        let need = block_len(len);
        let not_free = AllocError::NotFree { offset, len };
        if offset % MIN_ALIGN != 0 {
            return Err(not_free);
        }
        let end = offset.checked_add(need).ok_or(not_free.clone())?;
        let (&start, &flen) = self
            .free
            .range(..=offset)
            .next_back()
            .ok_or(not_free.clone())?;
        if start + flen < end {
            return Err(not_free);
        }
        self.free.remove(&start);
        if offset > start {
            self.free.insert(start, offset - start);
        }
        if end < start + flen {
            self.free.insert(end, start + flen - end);
        }
        self.used += need;
        Ok(Range { offset, len })
    }

    /// [`Self::claim`] for each span, in order, onto `out`; one claim per run of spans that lie
    /// end to end (as a journal's tensors do), since splitting the free map once per tensor
    /// was a fifth of adopting a 100k-tensor model. On error, `out` holds the ranges already
    /// taken, for the caller to give back.
    pub fn claim_many(
        &mut self,
        spans: &[(u64, u64)],
        out: &mut Vec<Range>,
    ) -> Result<(), AllocError> {
        let mut rest = spans;
        while let Some(&(first, _)) = rest.first() {
            // The run: spans each starting where the previous one's block ends.
            let mut end = first;
            let n = rest
                .iter()
                .take_while(|&&(offset, len)| {
                    let next = offset == end;
                    end = offset.saturating_add(block_len(len));
                    next
                })
                .count();
            let (run, after) = rest.split_at(n);
            let (last_offset, last_len) = run[n - 1];
            let run_len = last_offset.saturating_add(block_len(last_len)) - first;
            if n > 1 && self.claim(first, run_len).is_ok() {
                out.extend(run.iter().map(|&(offset, len)| Range { offset, len }));
            } else {
                // One span, or a run that cannot be taken whole: span by span, so the error
                // names the very range that is not free.
                for &(offset, len) in run {
                    out.push(self.claim(offset, len)?);
                }
            }
            rest = after;
        }
        Ok(())
    }

    /// Returns a range, merging it with free neighbours.
    pub fn free(&mut self, r: Range) -> Result<(), AllocError> {
        let not_allocated = AllocError::NotAllocated {
            offset: r.offset,
            len: r.len,
        };
        let (mut start, mut len) = (r.offset, r.block());
        if start + len > self.size {
            return Err(not_allocated);
        }
        // Reject a range that overlaps anything already free (double free).
        if let Some((&ps, &pl)) = self.free.range(..=start).next_back() {
            if ps + pl > start {
                return Err(not_allocated);
            }
        }
        if let Some((&ns, _)) = self.free.range(start..).next() {
            if ns < start + len {
                return Err(not_allocated);
            }
        }
        self.used -= len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(nl) = self.free.remove(&(start + len)) {
            len += nl;
        }
        self.free.insert(start, len);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_aligned_and_disjoint() {
        let mut a = RangeAllocator::new(1 << 20);
        let mut got = Vec::new();
        for len in [1, 255, 256, 257, 1000, 4096, 0] {
            let r = a.alloc(len, 1).unwrap();
            assert_eq!(r.offset % MIN_ALIGN, 0);
            assert_eq!(r.len, len);
            got.push(r);
        }
        let big = a.alloc(10, 4096).unwrap();
        assert_eq!(big.offset % 4096, 0);
        got.push(big);
        got.sort_by_key(|r| r.offset);
        for w in got.windows(2) {
            assert!(w[0].offset + w[0].block() <= w[1].offset, "{w:?} overlap");
        }
    }

    #[test]
    fn many_ranges_go_back_to_back_where_they_fit_and_one_by_one_where_not() {
        let mut a = RangeAllocator::new(8 * MIN_ALIGN);
        // Holes of 2 and 3 blocks, then 1 block free at the end.
        let taken: Vec<_> = (0..8).map(|_| a.alloc(1, 1).unwrap()).collect();
        let mut taken: Vec<_> = taken.into_iter().map(Some).collect();
        for i in [0, 1, 3, 4, 5, 7] {
            a.free(taken[i].take().unwrap()).unwrap();
        }
        // Three blocks fit only the second hole, back to back.
        let mut out = Vec::new();
        a.alloc_many(&[1, 256, 200], 1, &mut out).unwrap();
        let at: Vec<_> = out.iter().map(|r| (r.offset, r.len)).collect();
        assert_eq!(at, [(768, 1), (1024, 256), (1280, 200)]);
        // Four blocks fit no hole whole (2 and 1 are left): one by one, first fit each.
        let mut more = Vec::new();
        assert!(matches!(
            a.alloc_many(&[1, 1, 1, 1], 1, &mut more),
            Err(AllocError::Exhausted { .. })
        ));
        let at: Vec<_> = more.iter().map(|r| r.offset).collect();
        assert_eq!(at, [0, 256, 1792]);
        for r in out
            .into_iter()
            .chain(more)
            .chain(taken.into_iter().flatten())
        {
            a.free(r).unwrap();
        }
        assert_eq!((a.used(), a.largest_free()), (0, 8 * MIN_ALIGN));
    }

    #[test]
    fn free_coalesces_back_to_one_range() {
        let mut a = RangeAllocator::new(4096);
        let mut rs: Vec<_> = (0..16).map(|_| Some(a.alloc(256, 256).unwrap())).collect();
        assert_eq!(a.used(), 4096);
        // Free in an order that exercises merging with the left, the right and both sides.
        for i in [1, 3, 2, 0, 15, 13, 14, 4, 6, 5, 8, 7, 10, 9, 12, 11] {
            a.free(rs[i].take().unwrap()).unwrap();
        }
        assert_eq!(a.used(), 0);
        assert_eq!(a.free.len(), 1);
        assert_eq!(a.largest_free(), 4096);
    }

    #[test]
    fn fragmentation_is_reported_and_healed() {
        let mut a = RangeAllocator::new(8 * 256);
        let (even, mut odd): (Vec<_>, Vec<_>) = (0..8)
            .map(|_| a.alloc(256, 1).unwrap())
            .partition(|r| r.offset / 256 % 2 == 0);
        for r in even {
            a.free(r).unwrap();
        }
        // Half the pool is free, but no two free blocks touch.
        let err = a.alloc(512, 1).unwrap_err();
        assert_eq!(
            err,
            AllocError::Exhausted {
                len: 512,
                free: 1024,
                largest: 256
            }
        );
        a.free(odd.remove(0)).unwrap();
        let r = a.alloc(512, 1).unwrap();
        assert_eq!(r.offset, 0);
    }

    #[test]
    fn exhaustion_and_exact_fit() {
        let mut a = RangeAllocator::new(1024);
        let r = a.alloc(1024, 1).unwrap();
        assert!(matches!(
            a.alloc(1, 1),
            Err(AllocError::Exhausted { free: 0, .. })
        ));
        a.free(r).unwrap();
        assert!(a.alloc(1025, 1).is_err());
        assert!(a.alloc(1024, 1).is_ok());
    }

    #[test]
    fn alignment_padding_is_returned_to_the_free_list() {
        let mut a = RangeAllocator::new(8192);
        let first = a.alloc(256, 1).unwrap();
        let aligned = a.alloc(256, 4096).unwrap();
        assert_eq!(aligned.offset, 4096);
        // The gap between 256 and 4096 is still usable.
        let gap = a.alloc(3840, 1).unwrap();
        assert_eq!(gap.offset, 256);
        a.free(first).unwrap();
        a.free(aligned).unwrap();
        a.free(gap).unwrap();
        assert_eq!(a.largest_free(), 8192);
    }

    #[test]
    fn claim_takes_exact_ranges_once() {
        let mut a = RangeAllocator::new(8192);
        let mid = a.claim(1024, 300).unwrap();
        assert_eq!(a.used(), 512);
        assert!(
            a.claim(1280, 1).is_err(),
            "inside the block of the first claim"
        );
        assert!(a.claim(768, 257).is_err(), "overlaps its start");
        assert!(a.claim(100, 1).is_err(), "misaligned");
        assert!(a.claim(8192 - 256, 257).is_err(), "past the end");
        let first = a.claim(0, 1024).unwrap();
        let last = a.claim(8192 - 256, 256).unwrap();
        // What is left is still allocatable, and everything frees back to one range.
        let rest = a.alloc(8192 - 256 - 1536, 1).unwrap();
        assert_eq!(rest.offset, 1536);
        for r in [mid, first, last, rest] {
            a.free(r).unwrap();
        }
        assert_eq!(a.largest_free(), 8192);
    }

    #[test]
    fn claim_many_takes_runs_whole_and_names_the_range_not_free() {
        // Two runs end to end (a zero-length tensor still takes a block), then a lone span.
        let spans = [
            (0, 256),
            (256, 300),
            (768, 0),
            (1024, 1),
            (2048, 256),
            (4096, 10),
        ];
        let mut a = RangeAllocator::new(8192);
        let mut out = Vec::new();
        a.claim_many(&spans, &mut out).unwrap();
        let got: Vec<(u64, u64)> = out.iter().map(|r| (r.offset, r.len)).collect();
        assert_eq!(got, spans);
        assert_eq!(a.used(), 256 + 512 + 256 + 256 + 256 + 256);
        assert!(a.claim(512, 1).is_err(), "inside the second span's block");
        assert_eq!(a.alloc(2048, 1).unwrap().offset, 4096 + 256);

        // A run that overlaps a taken range: the error names the first span not free, and the
        // spans before it are handed back to be given back.
        let mut b = RangeAllocator::new(8192);
        let taken = b.claim(512, 1).unwrap();
        let mut out = Vec::new();
        let err = b.claim_many(&[(0, 256), (256, 256), (512, 256), (768, 256)], &mut out);
        assert_eq!(
            err,
            Err(AllocError::NotFree {
                offset: 512,
                len: 256
            })
        );
        assert_eq!(out.len(), 2);
        for r in out.into_iter().chain([taken]) {
            b.free(r).unwrap();
        }
        assert_eq!((b.used(), b.largest_free()), (0, 8192));
    }

    #[test]
    fn double_free_and_foreign_ranges_are_rejected() {
        let mut a = RangeAllocator::new(4096);
        let r = a.alloc(256, 1).unwrap();
        let (offset, len) = (r.offset, r.len);
        a.free(r).unwrap();
        // Freeing a token twice does not compile; forge one to check the allocator anyway.
        assert!(a.free(Range { offset, len }).is_err());
        assert!(
            a.free(Range {
                offset: 4096,
                len: 256
            })
            .is_err()
        );
        assert!(matches!(a.alloc(1, 3), Err(AllocError::BadAlign(3))));
        assert_eq!(a.used(), 0);
    }
}
