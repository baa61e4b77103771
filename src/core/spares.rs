//! Static buffers of ended leases, kept for the next attach of the same size: a worker that
//! restarts gets its slots back at once instead of waiting while 64 MiB or more is allocated and
//! faulted again. Only cpu buffers (files the worker maps by name) are kept; each keeps its
//! host-budget reservation, so the budget still counts every byte, and a pool or lease that
//! needs the room frees them first ([`Spares::clear`], the pools' reclaimer).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::pools::HostReservation;
use super::pools::STATIC_FILE_PREFIX;
use crate::device::StaticBuffer;

/// Enough for the workers of a node restarting one after another; more would only hold memory.
const MAX_SPARES: usize = 2;

struct Spare {
    statics: Box<dyn StaticBuffer>,
    reservation: Option<HostReservation>,
}

pub struct Spares {
    dir: PathBuf,
    kept: Mutex<Vec<Spare>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spares").finish_non_exhaustive()
    }
}

impl Spares {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            kept: Mutex::new(Vec::new()),
            next: AtomicU64::new(0),
        }
    }

    /// Keeps an ended lease's buffer (renamed so no worker finds it under its old name); a
    /// buffer that cannot be handed over is dropped, which frees it.
    pub fn put(&self, mut statics: Box<dyn StaticBuffer>, reservation: Option<HostReservation>) {
        if statics.path().is_none() {
            return;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let name = self.dir.join(format!("{STATIC_FILE_PREFIX}spare-{n}"));
        if statics.rename(&name).is_err() {
            return;
        }
        let evicted = {
            let mut kept = self.kept.lock().expect("spares lock");
            kept.push(Spare {
                statics,
                reservation,
            });
            (kept.len() > MAX_SPARES).then(|| kept.remove(0))
        };
        // Freed (unmapped, unlinked) outside the lock, as in `clear`.
        drop(evicted);
    }

    /// A kept buffer of exactly `len` bytes, renamed to `path`, with its reservation.
    pub fn take(
        &self,
        len: u64,
        path: &Path,
    ) -> Option<(Box<dyn StaticBuffer>, Option<HostReservation>)> {
        let mut spare = {
            let mut kept = self.kept.lock().expect("spares lock");
            let i = kept.iter().position(|s| s.statics.len() == len)?;
            kept.remove(i)
        };
        spare.statics.rename(path).ok()?;
        Some((spare.statics, spare.reservation))
    }

    /// Frees every kept buffer; their bytes return to the host budget.
    pub fn clear(&self) {
        let freed = std::mem::take(&mut *self.kept.lock().expect("spares lock"));
        drop(freed);
    }
}
