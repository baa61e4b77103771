//! Read-only mappings of the segments a lease names. One of the few modules with `unsafe`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A read-only shared mapping of a pool or static-buffer file.
#[derive(Debug)]
pub struct SegmentMap {
    map: memmap2::Mmap,
    path: std::path::PathBuf,
    /// Identity of the mapped file, to tell whether a path still names it.
    dev_ino: (u64, u64),
    /// The locked byte range, if any.
    locked: Option<(u64, u64)>,
}

impl SegmentMap {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: a read-only shared mapping of a file the daemon owns. The daemon writes static
        // slots while we may read them; the protocol (OnloadToStatic answers after the copy)
        // orders those accesses, and torn reads would be caught by the CRC checks.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let meta = file.metadata()?;
        Ok(Self {
            map,
            path: path.to_path_buf(),
            dev_ino: (meta.dev(), meta.ino()),
            locked: None,
        })
    }

    /// Whether `path` is the file this maps, at the same size: a daemon that adopted the pool
    /// after a restart serves the very same file, and the mapping stays valid.
    pub fn is_same_file(&self, path: &Path) -> bool {
        path == self.path
            && std::fs::metadata(path).is_ok_and(|m| {
                (m.dev(), m.ino()) == self.dev_ino && m.len() == self.map.len() as u64
            })
    }

    pub fn bytes(&self, offset: u64, len: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        self.map.get(start..end)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Pins `[offset, offset + len)` of this process's view, widened to whole pages (mlock: the
    /// cpu device's pinning, as cuMemHostRegister is cuda's). Only called when the lease's shared
    /// decision says pin. Returns the bytes locked.
    pub fn lock(&mut self, offset: u64, len: u64) -> std::io::Result<u64> {
        let page = rustix::param::page_size() as u64;
        let start = offset / page * page;
        let end = (offset + len)
            .div_ceil(page)
            .saturating_mul(page)
            .min(self.map.len() as u64);
        if end <= start || self.locked.is_some() {
            return Ok(0);
        }
        // SAFETY: the range lies inside our live mapping; unlocked in Drop before it is unmapped.
        unsafe {
            rustix::mm::mlock(
                self.map.as_ptr().add(start as usize) as *mut _,
                (end - start) as usize,
            )
        }?;
        self.locked = Some((start, end));
        Ok(end - start)
    }

    pub fn is_locked(&self) -> bool {
        self.locked.is_some()
    }
}

impl Drop for SegmentMap {
    fn drop(&mut self) {
        if let Some((start, end)) = self.locked {
            // SAFETY: the range we locked, still mapped (the Mmap drops after this).
            let _ = unsafe {
                rustix::mm::munlock(
                    self.map.as_ptr().add(start as usize) as *mut _,
                    (end - start) as usize,
                )
            };
        }
    }
}
