//! Transparent huge pages for host regions: asked for on every mapping, and measured.
//!
//! A pool of 4 KiB pages costs one page-table entry, one fault and one lock per 4 KiB: pinning
//! 400 MB of resident shared memory took 50 ms on the benchmark machine, and a restart pays it
//! again for every adopted pool, beside mapping every page anew to verify it. With 2 MiB pages
//! the same pin took 0.3 ms. tmpfs gives a file huge pages when it is mounted with
//! `huge=always` or `huge=within_size`, or with `huge=advise` for mappings that ask with
//! `MADV_HUGEPAGE`, which is why every region asks; /dev/shm is usually mounted without, and
//! then asking changes nothing.

/// Asks the kernel to back `[addr, addr + len)` with huge pages where the filesystem allows it.
/// Kernels without transparent huge pages refuse with EINVAL; the region then stays on small
/// pages, which is only slower.
pub(super) fn advise(addr: usize, len: usize) {
    // SAFETY: the range is a live mapping of the caller's; MADV_HUGEPAGE changes how it is
    // backed, never its contents.
    unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
}

/// Bytes of `[start, start + len)` mapped with huge pages now, from this process's
/// /proc/self/smaps (its PMD-mapped shared-memory and file pages). The kernel walks the page
/// tables of every mapping to write that file, so this is for a region just populated, on a
/// blocking thread, not for every request.
pub(super) fn mapped_bytes(start: usize, len: usize) -> std::io::Result<u64> {
    use std::io::BufRead;
    // Line by line: read whole, the file (megabytes for a daemon with many mappings) cost more
    // in growing its buffer than the kernel spent writing it, on the core a restart's
    // verification needs.
    let mut smaps =
        std::io::BufReader::with_capacity(64 << 10, std::fs::File::open("/proc/self/smaps")?);
    let mut sum = InRange::new(start, start + len);
    let mut line = String::new();
    while smaps.read_line(&mut line)? > 0 {
        sum.line(&line);
        line.clear();
    }
    Ok(sum.bytes())
}

/// The `ShmemPmdMapped` and `FilePmdMapped` of the mappings of `smaps` inside `[start, end)`
/// (a region's mapping may have been split, by mbind for instance).
#[cfg(test)]
fn in_range(smaps: &str, start: usize, end: usize) -> u64 {
    let mut sum = InRange::new(start, end);
    smaps.lines().for_each(|l| sum.line(l));
    sum.bytes()
}

/// The huge pages of the mappings inside `[start, end)`, summed over smaps' lines in order.
struct InRange {
    start: usize,
    end: usize,
    inside: bool,
    kib: u64,
}

impl InRange {
    fn new(start: usize, end: usize) -> Self {
        Self {
            start,
            end,
            inside: false,
            kib: 0,
        }
    }

    fn line(&mut self, line: &str) {
        if let Some((from, to)) = mapping(line) {
            self.inside = from >= self.start && to <= self.end;
            return;
        }
        if !self.inside {
            return;
        }
        let Some((key, value)) = line.split_once(':') else {
            return;
        };
        if key == "ShmemPmdMapped" || key == "FilePmdMapped" {
            self.kib += value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }

    fn bytes(&self) -> u64 {
        self.kib * 1024
    }
}

/// The address range of a mapping's first line (`7f01c0000000-7f01c4000000 rw-s ...`); None
/// for the field lines under it.
fn mapping(line: &str) -> Option<(usize, usize)> {
    let (range, _) = line.split_once(' ')?;
    let (from, to) = range.split_once('-')?;
    Some((
        usize::from_str_radix(from, 16).ok()?,
        usize::from_str_radix(to, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f7db1600000-7f7db3600000 rw-s 00000000 00:29 3                          /mnt/huge/pool-a
Size:              32768 kB
Rss:               32768 kB
ShmemPmdMapped:    32768 kB
FilePmdMapped:         0 kB
THPeligible:           1
7f7db3600000-7f7db5600000 rw-s 02000000 00:29 3                          /mnt/huge/pool-a
Size:              32768 kB
ShmemPmdMapped:    30720 kB
FilePmdMapped:         0 kB
7f7db5600000-7f7db5700000 rw-s 00000000 00:1b 27622                      /dev/shm/other
ShmemPmdMapped:     2048 kB
";

    #[test]
    fn sums_the_huge_pages_of_the_mappings_inside_the_region_only() {
        let start = 0x7f7d_b160_0000;
        let end = 0x7f7d_b560_0000;
        assert_eq!(in_range(SMAPS, start, end), (32768 + 30720) * 1024);
        assert_eq!(in_range(SMAPS, start, 0x7f7d_b360_0000), 32768 * 1024);
        assert_eq!(in_range(SMAPS, 0x1000, 0x2000), 0);
    }

    #[test]
    fn the_running_kernels_smaps_parses() {
        // The parser against the running kernel's format: a mapping of ours is listed, and a
        // range holding none of our mappings counts nothing.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let first = smaps.lines().find_map(mapping).expect("a mapping");
        assert!(first.0 < first.1);
        assert_eq!(in_range(&smaps, 0, 0x1000), 0);
        assert_eq!(mapped_bytes(0, 0x1000).unwrap(), 0);
    }
}
