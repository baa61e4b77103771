//! Host memory regions backed by shared-memory files: the storage of pools and of cpu static
//! buffers. Workers in other processes map the same file by path.
//!
//! This is one of the few modules with `unsafe`: it owns a raw mapping.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HostMemError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("a region needs at least one byte")]
    Empty,
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> HostMemError {
    let path = path.to_path_buf();
    move |source| HostMemError::Io { path, op, source }
}

/// Which pages of a file are in the page cache now, one bit per page (`mincore` over a mapping
/// that is never read, so a concurrent truncation cannot fault this process).
pub fn resident_pages(file: &File) -> std::io::Result<Vec<u64>> {
    resident_pages_in(file, 0, file.metadata()?.len())
}

/// As [`resident_pages`], for the pages that hold `[offset, offset + len)`: bit `i` is the
/// page `offset / page_size() + i`.
pub fn resident_pages_in(file: &File, offset: u64, len: u64) -> std::io::Result<Vec<u64>> {
    let page = page_size() as u64;
    let first = offset / page;
    let pages = (offset + len).div_ceil(page).saturating_sub(first) as usize;
    let mut bits = vec![0u64; pages.div_ceil(64)];
    if pages == 0 {
        return Ok(bits);
    }
    let map_len = pages * page as usize;
    // SAFETY: a read-only shared mapping of the range's pages, never dereferenced: only handed
    // to mincore below, and unmapped before returning. Pages past the end of the file are
    // never touched, so mapping them is harmless.
    let map = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            map_len,
            ProtFlags::READ,
            MapFlags::SHARED,
            file,
            first * page,
        )
    }?;
    // A window of 1 GiB of pages at a time keeps the byte-per-page vector small.
    const WINDOW: usize = 1 << 30;
    let mut vec = vec![0u8; WINDOW.min(map_len) / page as usize];
    let mut result = Ok(());
    for start in (0..map_len).step_by(WINDOW) {
        let n = WINDOW.min(map_len - start);
        let np = n / page as usize;
        // SAFETY: `[start, start + n)` lies in the mapping; `vec` holds a byte for each of its
        // pages, as mincore requires.
        if unsafe { libc::mincore(map.cast::<u8>().add(start).cast(), n, vec.as_mut_ptr()) } != 0 {
            result = Err(std::io::Error::last_os_error());
            break;
        }
        for (i, &b) in vec[..np].iter().enumerate() {
            if b & 1 == 1 {
                let p = start / page as usize + i;
                bits[p / 64] |= 1 << (p % 64);
            }
        }
    }
    // SAFETY: the mapping made above, not used after this.
    let _ = unsafe { rustix::mm::munmap(map, map_len) };
    result.map(|()| bits)
}

/// How many pages of `[offset, offset + len)` are in the page cache now, counted by the kernel
/// with `cachestat(2)` (Linux 6.5 and later): no mapping and no byte per page, so a load can
/// ask it of every chunk. None where the kernel lacks the call or the file system refuses it;
/// [`resident_pages_in`] then answers.
pub fn cached_pages(file: &File, offset: u64, len: u64) -> Option<u64> {
    /// The call's number, the same on every architecture (the unified syscall table); the libc
    /// crate does not name it for x86_64 glibc yet.
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if len == 0 {
        return Some(0); // the call reads a length of 0 as "to the end of the file"
    }
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    use std::os::fd::AsRawFd;
    // SAFETY: the pointers are to live, properly laid-out structs for the call's duration, and
    // the descriptor is open (borrowed from `file`); flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    (rc == 0).then_some(stat.nr_cache)
}

/// Page size used to pre-fault and to describe locked memory.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// A shared, writable mapping of an exact-size file. Unmapped on drop; the file itself is
/// removed only by [`HostRegion::unlink`], so a crash leaves it for the next start to sweep.
#[derive(Debug)]
pub struct HostRegion {
    ptr: NonNull<u8>,
    len: usize,
    path: PathBuf,
    _file: File,
}

// SAFETY: the mapping is plain shared memory; concurrent access is coordinated by the owners of
// the ranges inside it (the allocator hands out disjoint ranges).
unsafe impl Send for HostRegion {}
// SAFETY: as above; `&HostRegion` only exposes raw pointers and copies into disjoint ranges.
unsafe impl Sync for HostRegion {}

impl HostRegion {
    /// Creates `path` (which must not exist) with exactly `len` bytes and maps it shared.
    ///
    /// Mode 0640 whatever the umask: workers of the file's group map it read-only, and only
    /// the daemon writes it (publishers send their bytes through WriteModel), so no party
    /// sharing the pool can change another's weights.
    pub fn create(path: &Path, len: u64) -> Result<Self, HostMemError> {
        use std::os::unix::fs::PermissionsExt as _;
        if len == 0 {
            return Err(HostMemError::Empty);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(path)
            .map_err(io(path, "create"))?;
        let region = (|| {
            file.set_permissions(std::fs::Permissions::from_mode(0o640))
                .map_err(io(path, "chmod"))?;
            file.set_len(len).map_err(io(path, "ftruncate"))?;
            Self::map(file, path, len as usize)
        })();
        if region.is_err() {
            let _ = std::fs::remove_file(path);
        }
        region
    }

    /// Like [`HostRegion::create`], with every byte given backing memory now (fallocate): a full
    /// filesystem fails here with ENOSPC, instead of with SIGBUS at the first write.
    pub fn create_backed(path: &Path, len: u64) -> Result<Self, HostMemError> {
        let region = Self::create(path, len)?;
        rustix::fs::fallocate(&region._file, rustix::fs::FallocateFlags::empty(), 0, len).map_err(
            |e| {
                let _ = std::fs::remove_file(path);
                HostMemError::Io {
                    path: path.to_path_buf(),
                    op: "fallocate",
                    source: e.into(),
                }
            },
        )?;
        Ok(region)
    }

    /// Maps an existing file (made by another process) shared and writable, for its whole length.
    /// A symbolic link is refused, not followed: the file must be the one at `path` itself, not
    /// one outside the directory that someone linked there.
    pub fn open(path: &Path) -> Result<Self, HostMemError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => std::io::Error::other(
                    "it is a symbolic link; offloadd maps only the pool files it made",
                ),
                _ => e,
            })
            .map_err(io(path, "open"))?;
        let len = file.metadata().map_err(io(path, "stat"))?.len();
        if len == 0 {
            return Err(HostMemError::Empty);
        }
        Self::map(file, path, len as usize)
    }

    fn map(file: File, path: &Path, len: usize) -> Result<Self, HostMemError> {
        // SAFETY: mapping a file we own, for its whole length, with no fixed address; the result
        // is checked and kept alive together with the file.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .map_err(|e| io(path, "mmap")(e.into()))?;
        super::huge_pages::advise(ptr as usize, len);
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            len,
            path: path.to_path_buf(),
            _file: file,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file (the mapping stays): a buffer handed from one lease to the next takes
    /// the new lease's file name, which is what its worker maps.
    pub fn rename(&mut self, to: &Path) -> Result<(), HostMemError> {
        std::fs::rename(&self.path, to).map_err(io(&self.path, "rename"))?;
        self.path = to.to_path_buf();
        Ok(())
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Prefers the given NUMA node for the pages not yet faulted in. Best effort: a failure is
    /// returned for logging, never fatal.
    pub fn bind_numa(&self, node: u32) -> std::io::Result<()> {
        const MPOL_PREFERRED: libc::c_long = 1;
        let mut mask = [0u64; 16];
        let bits = 64 * mask.len();
        if node as usize >= bits {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        mask[node as usize / 64] |= 1 << (node % 64);
        // SAFETY: mbind only changes the policy of our own mapping; the mask outlives the call
        // and `bits` matches its size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                self.ptr.as_ptr(),
                self.len,
                MPOL_PREFERRED,
                mask.as_ptr(),
                bits as libc::c_ulong + 1,
                0 as libc::c_uint,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Faults every page in, split across `threads`, so the first copy into the pool does not
    /// pay for page faults and the memory is really there before we report success.
    pub fn prefault(&self, threads: usize) -> std::io::Result<()> {
        let page = page_size();
        let pages = self.len.div_ceil(page);
        let threads = threads.clamp(1, pages.max(1));
        let per = pages.div_ceil(threads) * page;
        let base = self.ptr.as_ptr() as usize;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let start = i * per;
                    let len = per.min(self.len.saturating_sub(start));
                    s.spawn(move || populate(base + start, len, page))
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("prefault thread panicked"))
        })
    }

    /// Copies `src` into the region at `offset`. Panics if the range is out of bounds.
    ///
    /// # Safety
    /// The caller must own `offset..offset + src.len()` exclusively for the call: no other
    /// thread reads or writes it meanwhile (ranges come from the pool's allocator, and a
    /// lease's static slot is written only by its own onloads).
    pub unsafe fn write_at(&self, offset: usize, src: &[u8]) {
        assert!(
            offset
                .checked_add(src.len())
                .is_some_and(|end| end <= self.len),
            "write out of bounds"
        );
        // SAFETY: bounds checked above; the source is a separate allocation; the caller owns the
        // destination range (this function's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        }
    }

    /// Copies `len` bytes at `src_offset` of another region into this one at `offset`, without
    /// making a reference to either (both may be shared with other processes). Panics if either
    /// range is out of bounds.
    ///
    /// # Safety
    /// As [`HostRegion::write_at`] for the destination range. The source may be written
    /// meanwhile by anyone: that changes the bytes copied, not the copy's soundness.
    pub unsafe fn copy_from_region(
        &self,
        offset: usize,
        src: &HostRegion,
        src_offset: usize,
        len: usize,
    ) {
        let fits = |at: usize, size: usize| at.checked_add(len).is_some_and(|end| end <= size);
        assert!(fits(offset, self.len), "write out of bounds");
        assert!(fits(src_offset, src.len), "read out of bounds");
        let (to, from) = (
            self.ptr.as_ptr() as usize + offset,
            src.ptr.as_ptr() as usize + src_offset,
        );
        assert!(to + len <= from || from + len <= to, "overlapping copy");
        // SAFETY: both ranges are in bounds of live mappings and do not overlap (checked
        // above); the caller owns the destination range.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.ptr.as_ptr().add(src_offset),
                self.ptr.as_ptr().add(offset),
                len,
            )
        }
    }

    /// Reads `len` bytes of `file` at `file_offset` straight into the region at `offset` with
    /// `pread`, looping over short reads. Hitting end-of-file early is an error. Panics if the
    /// range is out of bounds.
    ///
    /// # Safety
    /// As [`HostRegion::write_at`]: the caller owns the range exclusively for the call (a
    /// loader owns the ranges it allocated until the model is ready).
    pub unsafe fn pread_from(
        &self,
        file: &File,
        file_offset: u64,
        offset: usize,
        len: usize,
    ) -> std::io::Result<()> {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "read into out of bounds"
        );
        let mut done = 0;
        while done < len {
            // SAFETY: the destination is inside our mapping (checked above) and the caller owns
            // this range exclusively while loading it (this function's contract).
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset + done), len - done)
            };
            match rustix::io::pread(file, dst, file_offset + done as u64) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("file ended {} bytes early", len - done),
                    ));
                }
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes at `offset` out of the region. Panics if out of bounds.
    ///
    /// Safe where [`HostRegion::slice`] is not: the bytes are copied through raw pointers and no
    /// reference to shared memory is ever made, so another process (or root) writing the file
    /// meanwhile changes only the values copied, as vm-memory's volatile reads allow.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        assert!(
            offset
                .checked_add(dst.len())
                .is_some_and(|end| end <= self.len),
            "read out of bounds"
        );
        // SAFETY: in bounds (checked above); the mapping lives as long as `self`; `dst` is our
        // own memory, distinct from the mapping; racing writers outside this process can change
        // the bytes read, not the validity of either range.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        }
    }

    /// A read-only view of `len` bytes at `offset`. Panics if the range is out of bounds.
    ///
    /// # Safety
    /// Nothing may write the range while the view lives: the range is a loaded (immutable)
    /// model's, or one the caller owns exclusively.
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "read out of bounds"
        );
        // SAFETY: in bounds; the mapping lives as long as `self`; no writer (the contract).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }

    /// Removes the file. Processes that mapped it keep their mapping until they unmap.
    pub fn unlink(&self) -> std::io::Result<()> {
        std::fs::remove_file(&self.path)
    }

    /// Inode of the open file (not of whatever now has its name): what the journal records to
    /// recognise the same pool at the next start.
    pub fn ino(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self._file.metadata()?.ino())
    }

    /// Bytes of the region mapped with huge pages now (see `device::huge_pages`). Reads
    /// /proc/self/smaps, whose cost grows with everything the process maps: blocking, and for a
    /// region just populated, not per request.
    pub fn huge_page_bytes(&self) -> std::io::Result<u64> {
        super::huge_pages::mapped_bytes(self.ptr.as_ptr() as usize, self.len)
    }

    /// Bytes of the file actually backed by memory (tmpfs allocates on first touch).
    pub fn resident_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(&self.path)?.blocks() * 512)
    }
}

/// MADV_POPULATE_WRITE (Linux 5.14) faults a range in one call; older kernels get a write to each
/// page of the byte already there, so the fallback keeps whatever the file holds, fresh or not.
fn populate(addr: usize, len: usize, page: usize) -> std::io::Result<()> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the range lies inside our live shared mapping.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    touch(addr, len, page);
    Ok(())
}

/// Writes each page's first byte back as read: faults the page in (writable, as the pool's
/// copies need) on kernels without MADV_POPULATE_WRITE.
fn touch(addr: usize, len: usize, page: usize) {
    let mut off = 0;
    while off < len {
        let p = (addr + off) as *mut u8;
        // SAFETY: in bounds of our live mapping; the byte read is written back unchanged, so no
        // content is lost (regions are prefaulted while being made, before anyone else writes).
        unsafe { std::ptr::write_volatile(p, std::ptr::read_volatile(p)) };
        off += page;
    }
}

impl Drop for HostRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; no reference into it outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefault_fallback_keeps_what_the_file_holds() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let page = page_size();
        let region = HostRegion::create(&dir.path().join("r"), 3 * page as u64).unwrap();
        let pattern: Vec<u8> = (0..region.len).map(|i| (i % 251) as u8 + 1).collect();
        // SAFETY: this test owns the region alone.
        unsafe { region.write_at(0, &pattern) };
        touch(region.ptr.as_ptr() as usize, region.len, page);
        let mut back = vec![0u8; region.len];
        region.read_at(0, &mut back);
        assert_eq!(back, pattern);
    }
}
