//! One host weight pool: an exact-size shared-memory file, its pin decision and its ranges.

use crate::core::journal::Durability;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use super::alloc::{AllocError, Range, RangeAllocator};
use super::pin_policy::PinDecision;
use crate::device::host::HostRegion;
use crate::device::{Device, PinGuard};

/// A pool. Dropping it unpins (the guard goes first) and unmaps; the file is unlinked by the
/// registry when the pool is deleted.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub device: Arc<dyn Device>,
    pub size_bytes: u64,
    pub numa_node: Option<u32>,
    /// Set when the pool was adopted from the journal at this start: whether it was pinned in
    /// the run that made it.
    pub previously_pinned: Option<bool>,
    /// The decision applied (including a failed attempt to pin) and its guard. Declared before
    /// `region` so it is dropped (unpinned) before the mapping goes away.
    pin: Mutex<PinState>,
    /// Signalled when a pin still in progress (an adopted pool's) has settled.
    pin_settled: Condvar,
    /// The longest lease ttl granted on this pool, in this run or (adopted) the one before.
    max_lease_ttl_ms: AtomicU64,
    region: Arc<HostRegion>,
    /// Bytes mapped with huge pages, measured once the pool is populated: at creation, or for
    /// an adopted pool once its pin has been applied. Unset until then (or ever, for an adopted
    /// pool that is not pinned: nothing populates its mapping).
    huge_page_bytes: OnceLock<u64>,
    alloc: Mutex<AllocState>,
    /// What failed to reach the journal, shared by every pool and model of the daemon.
    durability: Arc<Durability>,
}

#[derive(Debug)]
struct AllocState {
    ranges: RangeAllocator,
    /// Set when the pool is deleted, under the same lock as allocation, so a model can never
    /// place weights in a pool that is going away.
    retired: bool,
}

#[derive(Debug)]
struct PinState {
    decision: PinDecision,
    guard: Option<Box<dyn PinGuard>>,
    /// The decision is to pin and the pin is still being applied.
    pending: bool,
}

/// What `Pool::new` is built from.
pub struct PoolParts {
    pub name: String,
    pub device: Arc<dyn Device>,
    pub decision: PinDecision,
    pub numa_node: Option<u32>,
    pub previously_pinned: Option<bool>,
    pub pin: Option<Box<dyn PinGuard>>,
    /// The decision is to pin, and the caller applies it later with [`Pool::settle_pin`].
    pub pin_pending: bool,
    /// Adopted pools: the longest lease ttl the journal recorded.
    pub max_lease_ttl_ms: u64,
    pub region: Arc<HostRegion>,
    pub durability: Arc<Durability>,
}

impl Pool {
    pub fn new(p: PoolParts) -> Self {
        let size = p.region.len() as u64;
        Self {
            name: p.name,
            device: p.device,
            size_bytes: size,
            numa_node: p.numa_node,
            previously_pinned: p.previously_pinned,
            pin: Mutex::new(PinState {
                decision: p.decision,
                guard: p.pin,
                pending: p.pin_pending,
            }),
            pin_settled: Condvar::new(),
            max_lease_ttl_ms: AtomicU64::new(p.max_lease_ttl_ms),
            region: p.region,
            huge_page_bytes: OnceLock::new(),
            alloc: Mutex::new(AllocState {
                ranges: RangeAllocator::new(size),
                retired: false,
            }),
            durability: p.durability,
        }
    }

    /// Why this pool would not survive a restart (its journal write failed); None when it
    /// would.
    pub fn not_durable(&self) -> Option<String> {
        self.durability.pools()
    }

    /// Why the named model of this pool would not survive a restart; None when it would.
    pub fn model_not_durable(&self, model: &str) -> Option<String> {
        self.durability.model(model)
    }

    /// Bytes of the pool mapped with huge pages, once measured.
    pub fn huge_page_bytes(&self) -> Option<u64> {
        self.huge_page_bytes.get().copied()
    }

    /// Measures the huge pages of the pool, once populated: just created, or adopted and
    /// pinned. Blocking: reads /proc/self/smaps.
    pub fn measure_huge_pages(&self) {
        match self.region.huge_page_bytes() {
            Ok(bytes) => {
                tracing::info!(pool = %self.name, huge_page_bytes = bytes, "huge pages measured");
                let _ = self.huge_page_bytes.set(bytes);
            }
            Err(e) => {
                tracing::warn!(pool = %self.name, error = %e, "cannot read /proc/self/smaps; the pool's huge pages stay unreported")
            }
        }
    }

    /// Whether the pool is pinned now.
    pub fn pinned(&self) -> bool {
        self.pin_state().guard.is_some()
    }

    /// The pin decision as applied (a pin still in progress counts as decided).
    pub fn decision(&self) -> PinDecision {
        self.pin_state().decision.clone()
    }

    /// Whether the pin of an adopted pool is still being applied.
    pub fn pin_pending(&self) -> bool {
        self.pin_state().pending
    }

    /// Blocks until a pin in progress has settled (at once otherwise): leases plan their copies
    /// on whether the pool is pinned, so they wait for the answer.
    pub fn wait_pin_settled(&self) {
        let st = self.pin_state();
        let _settled = self
            .pin_settled
            .wait_while(st, |s| s.pending)
            .expect("pool pin lock");
    }

    /// Records the outcome of a pin applied after construction.
    pub fn settle_pin(&self, decision: PinDecision, guard: Option<Box<dyn PinGuard>>) {
        let mut st = self.pin_state();
        *st = PinState {
            decision,
            guard,
            pending: false,
        };
        self.pin_settled.notify_all();
    }

    pub fn max_lease_ttl(&self) -> Duration {
        Duration::from_millis(self.max_lease_ttl_ms.load(Ordering::Acquire))
    }

    /// Records a lease's ttl; true when it is the longest so far (the journal then needs it).
    pub fn note_lease_ttl(&self, ttl: Duration) -> bool {
        let ms = ttl.as_millis() as u64;
        self.max_lease_ttl_ms.fetch_max(ms, Ordering::AcqRel) < ms
    }

    /// Keeps ranges a worker of the daemon before a restart may still read in place (its lease
    /// ended with that daemon, but it learns so only at its next renewal, within its ttl) out
    /// of reach of new models until the longest ttl granted has passed since `since`.
    pub fn quarantine<T: Send + 'static>(&self, held: T, since: Instant) {
        let until = since + self.max_lease_ttl();
        if Instant::now() >= until {
            return;
        }
        let name = self.name.clone();
        std::thread::spawn(move || {
            // A deadline, not synchronisation: nothing signals that stale workers are gone.
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
            tracing::info!(pool = %name, "ranges of a model that was not adopted are free again");
            drop(held);
        });
    }

    fn pin_state(&self) -> MutexGuard<'_, PinState> {
        self.pin.lock().expect("pool pin lock")
    }

    pub fn path(&self) -> &Path {
        self.region.path()
    }

    pub fn region(&self) -> &Arc<HostRegion> {
        &self.region
    }

    pub fn used_bytes(&self) -> u64 {
        self.state().ranges.used()
    }

    /// Bytes of the largest range that could be allocated now.
    pub fn largest_free(&self) -> u64 {
        self.state().ranges.largest_free()
    }

    /// Allocates ranges for `lens` all at once, or none of them.
    pub fn alloc_all(self: &Arc<Self>, lens: &[u64], align: u64) -> Result<Allocation, AllocError> {
        self.take_all(lens.len(), |ranges, out| {
            ranges.alloc_many(lens, align, out)
        })
    }

    /// Takes the exact ranges `(offset, len)` a journal recorded, all or none.
    pub fn claim_all(self: &Arc<Self>, spans: &[(u64, u64)]) -> Result<Allocation, AllocError> {
        self.take_all(spans.len(), |ranges, out| ranges.claim_many(spans, out))
    }

    /// Takes `n` ranges under one lock (`take` pushes them onto the list it is given), giving
    /// back those taken if one fails, so a model never holds part of its ranges; refused once
    /// the pool is retired.
    fn take_all(
        self: &Arc<Self>,
        n: usize,
        take: impl FnOnce(&mut RangeAllocator, &mut Vec<Range>) -> Result<(), AllocError>,
    ) -> Result<Allocation, AllocError> {
        let mut st = self.state();
        if st.retired {
            return Err(AllocError::Retired);
        }
        let mut out = Vec::with_capacity(n);
        if let Err(e) = take(&mut st.ranges, &mut out) {
            for r in out {
                st.ranges.free(r).expect("just taken");
            }
            // The error counted the pool after this call's own earlier ranges (0 bytes free,
            // when they had filled it); report the pool as the caller finds it.
            return Err(match e {
                AllocError::Exhausted { len, .. } => AllocError::Exhausted {
                    len,
                    free: st.ranges.size() - st.ranges.used(),
                    largest: st.ranges.largest_free(),
                },
                e => e,
            });
        }
        Ok(Allocation {
            pool: Arc::clone(self),
            ranges: out,
        })
    }

    /// Returns an allocation's ranges: only its drop calls this.
    fn free_all(&self, ranges: Vec<Range>) {
        let mut st = self.state();
        for r in ranges {
            if let Err(e) = st.ranges.free(r) {
                tracing::error!(pool = %self.name, error = %e, "freeing a range twice; this is a bug");
            }
        }
    }

    /// Marks the pool as going away if nothing is allocated in it; returns the used bytes if
    /// something is.
    pub fn retire(&self) -> Result<(), u64> {
        let mut st = self.state();
        match st.ranges.used() {
            0 => {
                st.retired = true;
                Ok(())
            }
            used => Err(used),
        }
    }

    fn state(&self) -> MutexGuard<'_, AllocState> {
        self.alloc.lock().expect("pool allocator lock")
    }
}

/// Ranges owned in a pool, as only its allocator hands them out. Given back when the last
/// holder drops them, so a model's bytes can never leak, whichever path removes it, and no
/// range can be freed twice or written by someone who does not hold it.
#[derive(Debug)]
pub struct Allocation {
    pool: Arc<Pool>,
    ranges: Vec<Range>,
}

impl Allocation {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn ranges(&self) -> &[Range] {
        &self.ranges
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.pool.free_all(std::mem::take(&mut self.ranges));
    }
}
