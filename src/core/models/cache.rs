//! What a load leaves in the page cache: nothing it brought in. A cold load must not leave a
//! second copy of the checkpoint in host memory beside the pool, while pages someone else had
//! cached (a warm cache) stay. So each range is probed just before it is first read, and the
//! pages that were not cached then are dropped once read.
//!
//! Probes cost O(ranges): `cachestat(2)` answers "none" or "all" for a whole range without a
//! byte per page, and only a partly cached range asks `mincore` for its pages. They are taken
//! ahead of the readers ([`Lookahead`]), because the kernel's readahead (8 MiB on some virtual
//! disks) brings in the start of the next range while the one before it is read: probed after
//! that, those pages would look cached by someone else and stay.

use std::fs::File;
use std::num::NonZeroU64;
use std::sync::{Mutex, OnceLock};

use crate::device::host::{cached_pages, page_size, resident_pages_in};

/// How far past the end of the range a reader starts that the ranges after it are probed: more
/// than the kernel's largest readahead window on the disks we have seen (8 MiB).
const MARGIN: u64 = 32 << 20;

/// The page-cache state of a range's pages just before the load read them.
#[derive(Debug)]
enum Before {
    /// None was cached: drop them all once read.
    Uncached,
    /// All were, or it could not be told: drop none.
    Keep,
    /// Some were: one bit per page from the range's first page; drop the others.
    Partly(Vec<u64>),
}

/// A probed range of one file.
#[derive(Debug)]
pub struct Probe {
    first_page: u64,
    before: Before,
}

/// Probes the pages holding `[offset, offset + len)` of `file`.
pub fn probe(file: &File, offset: u64, len: u64) -> Probe {
    let page = page_size() as u64;
    let first_page = offset / page;
    let pages = (offset + len).div_ceil(page) - first_page;
    let span = (first_page * page, pages * page);
    let before = match cached_pages(file, span.0, span.1) {
        Some(0) => Before::Uncached,
        Some(n) if n >= pages => Before::Keep,
        _ => match resident_pages_in(file, span.0, span.1) {
            Ok(bits) if bits.iter().all(|&w| w == 0) => Before::Uncached,
            Ok(bits) => Before::Partly(bits),
            Err(_) => Before::Keep,
        },
    };
    Probe { first_page, before }
}

impl Probe {
    /// Drops the pages of `[offset, offset + len)` (inside the probed range) that were not
    /// cached when it was probed. Advice only: a failure leaves pages cached, which costs
    /// memory, not correctness.
    pub fn drop_behind(&self, file: &File, offset: u64, len: u64) {
        for (first, pages) in self.uncached_runs(offset, len) {
            drop_pages(file, first, pages);
        }
    }

    /// Runs of pages of `[offset, offset + len)` that were not cached when probed: (first
    /// page, pages).
    fn uncached_runs(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let page = page_size() as u64;
        let (first, last) = (offset / page, (offset + len).div_ceil(page));
        let was_cached = |p: u64| match &self.before {
            Before::Uncached => false,
            Before::Keep => true,
            Before::Partly(bits) => {
                let i = p - self.first_page;
                bits.get((i / 64) as usize)
                    .is_none_or(|w| w >> (i % 64) & 1 == 1)
            }
        };
        let mut runs = Vec::new();
        let mut p = first;
        while p < last {
            if was_cached(p) {
                p += 1;
                continue;
            }
            let run = p;
            while p < last && !was_cached(p) {
                p += 1;
            }
            runs.push((run, p - run));
        }
        runs
    }
}

fn drop_pages(file: &File, first: u64, pages: u64) {
    let page = page_size() as u64;
    if let Some(n) = NonZeroU64::new(pages * page) {
        let _ = rustix::fs::fadvise(file, first * page, Some(n), rustix::fs::Advice::DontNeed);
    }
}

/// A range a load reads: (index of its file, offset, length).
pub type Range = (usize, u64, u64);

/// Probes of a load's ranges, taken in order and ahead of the readers: before a reader starts a
/// range, every range of the same file that begins within [`MARGIN`] past its end is probed.
pub struct Lookahead<'a> {
    files: &'a [File],
    ranges: &'a [Range],
    probes: Vec<OnceLock<Probe>>,
    /// The first range not probed yet.
    frontier: Mutex<usize>,
}

impl<'a> Lookahead<'a> {
    pub fn new(files: &'a [File], ranges: &'a [Range]) -> Self {
        Self {
            files,
            ranges,
            probes: ranges.iter().map(|_| OnceLock::new()).collect(),
            frontier: Mutex::new(0),
        }
    }

    /// Called before range `i` is read (ranges are handed out in order): probes it and those
    /// the readahead of reading it could reach.
    pub fn before_reading(&self, i: usize) {
        let (file, offset, len) = self.ranges[i];
        let mut f = self.frontier.lock().expect("lookahead lock");
        while let Some(&(g_file, g_offset, g_len)) = self.ranges.get(*f) {
            if *f > i && (g_file != file || g_offset >= offset + len + MARGIN) {
                break;
            }
            let _ = self.probes[*f].set(probe(&self.files[g_file], g_offset, g_len));
            *f += 1;
        }
    }

    /// Drops what range `i` brought in; called once it is read.
    pub fn after_reading(&self, i: usize) {
        let (file, offset, len) = self.ranges[i];
        if let Some(p) = self.probes[i].get() {
            p.drop_behind(&self.files[file], offset, len);
        }
    }

    /// Drops again what every range brought in, in runs that cross the ranges' boundaries:
    /// the readahead of one reader can land in a range another reader has finished and dropped
    /// already, and the kernel drops a large folio (2 MiB on this VM's ext4) only when the
    /// advice covers all of it, which no range does where it straddles two.
    pub fn finish(&self) {
        let mut runs: Vec<(usize, u64, u64)> = Vec::new();
        for (i, &(file, offset, len)) in self.ranges.iter().enumerate() {
            if let Some(p) = self.probes[i].get() {
                runs.extend(
                    p.uncached_runs(offset, len)
                        .into_iter()
                        .map(|(first, n)| (file, first, first + n)),
                );
            }
        }
        runs.sort_unstable();
        let mut merged: Option<(usize, u64, u64)> = None;
        for (file, start, end) in runs {
            match &mut merged {
                Some((f, _, e)) if *f == file && start <= *e => *e = (*e).max(end),
                _ => {
                    if let Some((f, s, e)) = merged.replace((file, start, end)) {
                        drop_pages(&self.files[f], s, e - s);
                    }
                }
            }
        }
        if let Some((f, s, e)) = merged {
            drop_pages(&self.files[f], s, e - s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    /// A file written through the page cache and then dropped from it: none of it cached.
    /// None, said out loud, where $TMPDIR keeps pages after POSIX_FADV_DONTNEED (tmpfs).
    fn cold_file(pages: usize) -> Option<(tempfile::NamedTempFile, u64)> {
        let page = page_size() as u64;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; pages * page as usize]).unwrap();
        f.as_file().sync_all().unwrap();
        let _ = rustix::fs::fadvise(f.as_file(), 0, None, rustix::fs::Advice::DontNeed);
        if cached(f.as_file(), page, pages as u64).contains(&true) {
            eprintln!(
                "SKIPPED: {} keeps its pages cached after POSIX_FADV_DONTNEED (tmpfs?); set TMPDIR to a disk",
                f.path().display()
            );
            return None;
        }
        Some((f, page))
    }

    fn cached(file: &File, page: u64, pages: u64) -> Vec<bool> {
        let bits = resident_pages_in(file, 0, pages * page).unwrap();
        (0..pages)
            .map(|p| bits[(p / 64) as usize] >> (p % 64) & 1 == 1)
            .collect()
    }

    /// Of a file whose page 1 someone else had cached, a load of pages 0..4 leaves exactly
    /// page 1 cached; a range probed as all cached is left as it is.
    #[test]
    fn drops_what_the_load_brought_in_and_keeps_what_was_there() {
        let Some((f, page)) = cold_file(4) else {
            return;
        };
        let file = f.as_file();
        let mut buf = vec![0u8; page as usize];
        // Someone else's read of page 1, without readahead.
        rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Random).unwrap();
        file.read_exact_at(&mut buf, page).unwrap();
        assert_eq!(cached(file, page, 4), [false, true, false, false]);
        let ranges = [(0usize, 0u64, 4 * page)];
        let files = [file.try_clone().unwrap()];
        let ahead = Lookahead::new(&files, &ranges);
        ahead.before_reading(0);
        let mut all = vec![0u8; 4 * page as usize];
        file.read_exact_at(&mut all, 0).unwrap();
        ahead.after_reading(0);
        assert_eq!(cached(file, page, 4), [false, true, false, false]);

        let warm = probe(file, page, page);
        file.read_exact_at(&mut buf, page).unwrap();
        warm.drop_behind(file, page, page);
        assert!(
            cached(file, page, 4)[1],
            "a page cached before the read stays"
        );
    }

    /// A range is probed before the reader of the range before it starts, so pages its
    /// readahead brings in are still dropped.
    #[test]
    fn ranges_within_the_margin_are_probed_before_the_previous_one_is_read() {
        let Some((f, page)) = cold_file(8) else {
            return;
        };
        let file = f.as_file();
        let ranges = [(0usize, 0u64, 4 * page), (0, 4 * page, 4 * page)];
        let files = [file.try_clone().unwrap()];
        let ahead = Lookahead::new(&files, &ranges);
        ahead.before_reading(0);
        // The readahead of range 0, played by a read of range 1's first page.
        let mut buf = vec![0u8; page as usize];
        file.read_exact_at(&mut buf, 4 * page).unwrap();
        ahead.before_reading(1);
        let mut all = vec![0u8; 8 * page as usize];
        file.read_exact_at(&mut all, 0).unwrap();
        ahead.finish();
        assert_eq!(cached(file, page, 8), [false; 8]);
    }
}
