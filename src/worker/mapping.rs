//! Read-only mappings of the segments a lease names. One of the few modules with `unsafe`.

use std::fs::File;
use std::path::Path;

/// A read-only shared mapping of a pool or static-buffer file.
#[derive(Debug)]
pub struct SegmentMap {
    map: memmap2::Mmap,
    locked: bool,
}

impl SegmentMap {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: a read-only shared mapping of a file the daemon owns. The daemon writes static
        // slots while we may read them; the protocol (OnloadToStatic answers after the copy)
        // orders those accesses, and torn reads would be caught by the CRC checks.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        Ok(Self { map, locked: false })
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

    /// Pins this process's view of the segment (mlock, the cpu device's pinning). Only called
    /// when the lease's shared decision says pin.
    pub fn lock(&mut self) -> std::io::Result<()> {
        // SAFETY: locking exactly our live mapping; unlocked in Drop before it is unmapped.
        unsafe { rustix::mm::mlock(self.map.as_ptr() as *mut _, self.map.len()) }?;
        self.locked = true;
        Ok(())
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Drop for SegmentMap {
    fn drop(&mut self) {
        if self.locked {
            // SAFETY: the range we locked, still mapped (the Mmap drops after this).
            let _ = unsafe { rustix::mm::munlock(self.map.as_ptr() as *mut _, self.map.len()) };
        }
    }
}
