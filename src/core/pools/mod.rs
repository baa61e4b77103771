//! The pool registry: creates pools under the shared pin policy and the host-memory budget,
//! and owns the pool directory.

mod error;
mod files;

pub use error::PoolError;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::journal::{Journal, PoolRecord};
use super::pin_policy::{self, PinDecision, PinInputs};
use super::pool::{Pool, PoolParts};
use crate::config::{PinConfig, validate::is_valid_name};
use crate::device::host::{HostMemError, HostRegion};
use crate::device::{Device, Devices, PinGuard};
use crate::vllm_env::VllmEnv;

/// Pool files carry this prefix; startup sweeps only files with it or the static-buffer prefix.
pub const POOL_FILE_PREFIX: &str = "offloadd-pool-";
/// Leases' static-buffer files (cpu) carry this prefix; they live in the pool directory, whose
/// startup sweep removes them, so the name is the directory's to define.
pub const STATIC_FILE_PREFIX: &str = "offloadd-static-";
/// Names the daemon that holds the pool directory (its pid), for the message a second daemon
/// gets. The lock itself is the directory's, so deleting this file cannot break it.
const OWNER_FILE: &str = ".offloadd.lock";

/// How the registry is set up.
pub struct PoolsParams {
    pub dir: PathBuf,
    /// Where pools are recorded for the next start.
    pub journal: Journal,
    pub budget: u64,
    pub devices: Devices,
    pub env: VllmEnv,
    pub pin: PinConfig,
    pub prefault_threads: usize,
}

/// A request to create a pool.
#[derive(Debug, Clone)]
pub struct NewPool {
    pub name: String,
    pub device: String,
    pub size_bytes: u64,
}

#[derive(Default)]
struct Inner {
    pools: BTreeMap<String, Arc<Pool>>,
    /// Names and sizes of pools being created, so concurrent creations see each other.
    creating: HashMap<String, u64>,
    /// Host bytes held outside pools: the cpu static buffers of leases. Shared with each
    /// [`HostReservation`], which gives its bytes back when dropped.
    outside: Arc<AtomicU64>,
}

impl Inner {
    fn committed(&self) -> u64 {
        self.pools.values().map(|p| p.size_bytes).sum::<u64>()
            + self.creating.values().sum::<u64>()
            + self.outside.load(Ordering::Acquire)
    }
}

/// Host bytes a lease holds against pools.max_host_bytes (its cpu static buffers); returned to
/// the budget when dropped.
#[derive(Debug)]
pub struct HostReservation {
    outside: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for HostReservation {
    fn drop(&mut self) {
        self.outside.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Frees host memory held for later use (the static buffers kept for re-attaching workers).
pub type Reclaimer = Box<dyn Fn() + Send + Sync>;

pub struct Pools {
    params: PoolsParams,
    inner: Mutex<Inner>,
    /// Orders journal writes: each writes a snapshot taken after its own change.
    journal_lock: Mutex<()>,
    reclaim: Mutex<Option<Reclaimer>>,
    _lock: File,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pools")
            .field("dir", &self.params.dir)
            .finish_non_exhaustive()
    }
}

/// Writes this process's pid, mode 0640 as the journal (an older offloadd left it 0644).
fn write_owner(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = super::journal::create_group_readable(path)?;
    writeln!(f, "{}", std::process::id())
}

impl Pools {
    /// Takes ownership of the pool directory: locks it. Files an earlier run left are adopted
    /// ([`Pools::adopt`]) or removed ([`Pools::sweep`]) next.
    pub fn open(params: PoolsParams) -> Result<Self, PoolError> {
        let dir = params.dir.clone();
        let fail = |message: String| PoolError::Dir {
            dir: dir.clone(),
            message,
        };
        std::fs::create_dir_all(&dir).map_err(|e| fail(format!("cannot create: {e}")))?;
        // flock on the directory itself, held for the daemon's life. A lock on a file inside it
        // ended for newcomers when someone deleted the file: a second daemon made a new one,
        // locked it, and adopted and overwrote pools the first still served.
        let lock = File::open(&dir).map_err(|e| fail(format!("cannot open: {e}")))?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            let owner = std::fs::read_to_string(dir.join(OWNER_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map_or_else(
                    || "another offloadd".to_string(),
                    |pid| format!("another offloadd (pid {pid})"),
                );
            return Err(fail(format!(
                "{owner} is using this directory; give each daemon its own pools.dir"
            )));
        }
        write_owner(&dir.join(OWNER_FILE))
            .map_err(|e| fail(format!("cannot write {OWNER_FILE}: {e}")))?;
        Ok(Self {
            params,
            inner: Mutex::new(Inner::default()),
            journal_lock: Mutex::new(()),
            reclaim: Mutex::new(None),
            _lock: lock,
        })
    }

    pub fn budget(&self) -> u64 {
        self.params.budget
    }

    /// Called when the budget is short, before refusing: whatever it frees is tried again.
    pub fn set_reclaimer(&self, reclaimer: Reclaimer) {
        *self.reclaim.lock().expect("reclaim lock") = Some(reclaimer);
    }

    fn reclaim(&self) {
        if let Some(f) = &*self.reclaim.lock().expect("reclaim lock") {
            f();
        }
    }

    /// Reserves host bytes outside any pool (a lease's cpu static buffers) against the same
    /// budget as pools, under the same lock, so the two cannot overcommit it together.
    pub fn reserve_host(&self, bytes: u64) -> Result<HostReservation, PoolError> {
        self.try_reserve_host(bytes).or_else(|_| {
            self.reclaim();
            self.try_reserve_host(bytes)
        })
    }

    fn try_reserve_host(&self, bytes: u64) -> Result<HostReservation, PoolError> {
        let inner = self.inner.lock().expect("pools lock");
        let committed = inner.committed() + self.staging_held();
        let available = self.params.budget.saturating_sub(committed);
        if bytes > available {
            return Err(PoolError::StaticsOverBudget {
                requested: bytes,
                committed,
                available,
                budget: self.params.budget,
            });
        }
        inner.outside.fetch_add(bytes, Ordering::AcqRel);
        Ok(HostReservation {
            outside: Arc::clone(&inner.outside),
            bytes,
        })
    }

    pub fn devices(&self) -> &Devices {
        &self.params.devices
    }

    /// The decision a new pool of `bytes` on `device` would get now.
    pub fn decision_for(&self, device: &dyn Device, bytes: u64) -> PinDecision {
        let caps = device.capabilities(bytes);
        pin_policy::decide(PinInputs {
            capabilities: &caps,
            env: &self.params.env,
            config: &self.params.pin,
        })
    }

    /// Creates, pre-faults, NUMA-binds and (per the policy) pins a pool. Blocking: run it off the
    /// async runtime.
    pub fn create(&self, req: &NewPool) -> Result<Arc<Pool>, PoolError> {
        if !is_valid_name(&req.name) {
            return Err(PoolError::InvalidName(req.name.clone()));
        }
        if req.size_bytes == 0 {
            return Err(PoolError::ZeroSize);
        }
        let device = self
            .params
            .devices
            .get(&req.device)
            .cloned()
            .ok_or_else(|| PoolError::UnknownDevice {
                device: req.device.clone(),
                known: self.params.devices.ids(),
            })?;
        if let Some(cause) = device.fault() {
            return Err(PoolError::DeviceFaulted {
                device: req.device.clone(),
                cause,
            });
        }
        // An unpinned pool on a device that stages its copies brings the pinned staging ring
        // with it: the budget sees both, and the ring is made now, not at the first copy.
        let staging = device.staging();
        // The policy is asked only where a ring could still be made (build asks it again).
        let staging_bytes = if staging.bytes == 0
            || staging.allocated
            || self.decision_for(device.as_ref(), req.size_bytes).pin
        {
            0
        } else {
            staging.bytes
        };
        let needed = req.size_bytes.saturating_add(staging_bytes);
        if self.params.budget.saturating_sub(self.committed()) < needed {
            self.reclaim();
        }
        {
            let mut inner = self.inner.lock().expect("pools lock");
            if inner.pools.contains_key(&req.name) || inner.creating.contains_key(&req.name) {
                return Err(PoolError::AlreadyExists(req.name.clone()));
            }
            let committed = inner.committed() + self.staging_held();
            let available = self.params.budget.saturating_sub(committed);
            if needed > available {
                return Err(PoolError::OverBudget {
                    name: req.name.clone(),
                    requested: needed,
                    committed,
                    available,
                    budget: self.params.budget,
                });
            }
            inner.creating.insert(req.name.clone(), needed);
        }
        let built = self
            .check_space(req)
            .and_then(|()| self.build(req, Arc::clone(&device)))
            .map_err(|e| match e {
                // A filesystem filled meanwhile fails the pre-fault (EFAULT on tmpfs): say so.
                PoolError::HostMem { .. } => self.check_space(req).err().unwrap_or(e),
                e => e,
            });
        if built.as_ref().is_ok_and(|p| !p.pinned()) && staging_bytes > 0 {
            if let Err(e) = device.prepare_staging() {
                tracing::warn!(device = %req.device, error = %e, "staging ring not made; the first copy from an unpinned pool tries again");
            }
        }
        let mut inner = self.inner.lock().expect("pools lock");
        inner.creating.remove(&req.name);
        let pool = Arc::new(built?);
        inner.pools.insert(req.name.clone(), Arc::clone(&pool));
        drop(inner);
        if let Err(e) = self.write_journal() {
            if self.params.journal.required() {
                self.inner
                    .lock()
                    .expect("pools lock")
                    .pools
                    .remove(&req.name);
                if let Err(e) = pool.region().unlink() {
                    tracing::warn!(pool = %req.name, error = %e, "cannot remove pool file");
                }
                // Written again without the pool: a record of it must not outlive the refusal.
                let _ = self.write_journal();
                return Err(PoolError::NotDurable {
                    name: req.name.clone(),
                    why: self.params.journal.describe(&e),
                    no_space: super::journal::no_space(&e),
                });
            }
        }
        Ok(pool)
    }

    /// Refuses a pool the filesystem of pools.dir has no room for, with the figures, instead of
    /// failing in the pre-fault with a bare EFAULT.
    fn check_space(&self, req: &NewPool) -> Result<(), PoolError> {
        match super::journal::free_bytes(&self.params.dir) {
            Some((free, total)) if free < req.size_bytes => Err(PoolError::NoSpace {
                name: req.name.clone(),
                dir: self.params.dir.clone(),
                requested: req.size_bytes,
                free,
                total,
            }),
            _ => Ok(()),
        }
    }

    fn build(&self, req: &NewPool, device: Arc<dyn Device>) -> Result<Pool, PoolError> {
        let host = |source| PoolError::HostMem {
            name: req.name.clone(),
            source,
        };
        let path = self.pool_path(&req.name);
        let region = Arc::new(HostRegion::create(&path, req.size_bytes).map_err(host)?);
        let numa_node = bind_to_device_node(&req.name, device.as_ref(), &region);
        let threads = match self.params.prefault_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        if let Err(e) = region.prefault(threads) {
            let _ = region.unlink();
            return Err(host(HostMemError::Io {
                path,
                op: "pre-fault",
                source: e,
            }));
        }
        let (decision, pin) = self.pin_per_policy(&req.name, device.as_ref(), &region);
        tracing::info!(
            pool = %req.name,
            device = %req.device,
            size_bytes = req.size_bytes,
            pinned = decision.pin,
            pin_reason = %decision.reason,
            numa_node = ?numa_node,
            "pool created"
        );
        let pool = Pool::new(PoolParts {
            durability: self.params.journal.durability_handle(),
            name: req.name.clone(),
            device,
            decision,
            numa_node,
            previously_pinned: None,
            pin,
            pin_pending: false,
            max_lease_ttl_ms: 0,
            region,
        });
        pool.measure_huge_pages();
        Ok(pool)
    }

    pub(in crate::core) fn pool_path(&self, name: &str) -> PathBuf {
        self.params.dir.join(format!("{POOL_FILE_PREFIX}{name}"))
    }

    /// The shared pin policy, applied to one pool's memory now; a failed pin leaves it unpinned
    /// with the error as the reason.
    fn pin_per_policy(
        &self,
        name: &str,
        device: &dyn Device,
        region: &Arc<HostRegion>,
    ) -> (PinDecision, Option<Box<dyn PinGuard>>) {
        let decision = self.decision_for(device, region.len() as u64);
        if !decision.pin {
            return (decision, None);
        }
        match device.pin(region) {
            Ok(guard) => (decision, Some(guard)),
            Err(e) => {
                tracing::warn!(pool = name, error = %e, "pinning failed; the pool stays unpinned");
                (PinDecision::failed(e), None)
            }
        }
    }

    pub fn get(&self, name: &str) -> Result<Arc<Pool>, PoolError> {
        let inner = self.inner.lock().expect("pools lock");
        inner
            .pools
            .get(name)
            .cloned()
            .ok_or_else(|| PoolError::NotFound(name.to_string()))
    }

    pub fn list(&self) -> Vec<Arc<Pool>> {
        self.inner
            .lock()
            .expect("pools lock")
            .pools
            .values()
            .cloned()
            .collect()
    }

    /// Host bytes promised: pools (existing and being created), leases' cpu static buffers and
    /// the devices' pinned staging rings.
    pub fn committed(&self) -> u64 {
        self.inner.lock().expect("pools lock").committed() + self.staging_held()
    }

    /// Pinned staging memory the devices have made (it lives as long as the daemon).
    fn staging_held(&self) -> u64 {
        self.params
            .devices
            .iter()
            .map(|d| d.staging())
            .filter(|s| s.allocated)
            .map(|s| s.bytes)
            .sum()
    }

    /// Removes an unused pool and its file. The memory is released when the last reference to
    /// the pool (e.g. an RPC still reading it) goes away.
    pub fn delete(&self, name: &str) -> Result<Arc<Pool>, PoolError> {
        let mut inner = self.inner.lock().expect("pools lock");
        let pool = inner
            .pools
            .get(name)
            .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
        if let Err(used_bytes) = pool.retire() {
            return Err(PoolError::InUse {
                name: name.to_string(),
                used_bytes,
            });
        }
        let pool = inner.pools.remove(name).expect("checked above");
        if let Err(e) = pool.region().unlink() {
            tracing::warn!(pool = name, error = %e, "cannot remove pool file");
        }
        tracing::info!(pool = name, "pool deleted");
        drop(inner);
        let _ = self.write_journal();
        Ok(pool)
    }

    /// Admits a pool an earlier run left (`core::recovery`), if its bytes fit the budget and
    /// its name is free. Returns why not otherwise.
    pub(in crate::core) fn admit(&self, pool: &Arc<Pool>) -> Result<(), String> {
        let mut inner = self.inner.lock().expect("pools lock");
        let available = self
            .params
            .budget
            .saturating_sub(inner.committed() + self.staging_held());
        if pool.size_bytes > available {
            return Err(format!(
                "{} bytes do not fit the {} bytes left of pools.max_host_bytes ({})",
                pool.size_bytes, available, self.params.budget
            ));
        }
        if inner.pools.contains_key(&pool.name) {
            return Err("a pool of that name exists already".into());
        }
        inner.pools.insert(pool.name.clone(), Arc::clone(pool));
        Ok(())
    }

    /// Where pools and models are recorded for the next start.
    pub fn journal(&self) -> &Journal {
        &self.params.journal
    }

    /// Records every pool for the next start. A failure is logged and reported (each pool's
    /// `durable`, GetInfo, metrics): the pools keep working, and the next start rebuilds
    /// instead of adopting. It is returned for CreatePool to refuse under journal.required.
    pub fn write_journal(&self) -> Result<(), super::journal::JournalError> {
        let _order = self.journal_lock.lock().expect("journal lock");
        let records = self
            .list()
            .iter()
            .filter_map(|p| {
                let ino = p.region().ino().ok()?;
                Some(PoolRecord {
                    name: p.name.clone(),
                    device: p.device.info().id.clone(),
                    size_bytes: p.size_bytes,
                    ino,
                    pinned: p.decision().pin,
                    max_lease_ttl_ms: p.max_lease_ttl().as_millis() as u64,
                })
            })
            .collect();
        let written = self.params.journal.write_pools(records);
        if let Err(e) = &written {
            let why = self.params.journal.describe(e);
            tracing::error!(error = %why, "cannot write the journal; pools will not survive a restart");
        }
        written
    }
}

/// Binds a pool's memory to its device's NUMA node, where the device has one; a failure is
/// logged (the pool works, only farther from the device). Returns the node.
pub(in crate::core) fn bind_to_device_node(
    pool: &str,
    device: &dyn Device,
    region: &HostRegion,
) -> Option<u32> {
    let node = device.info().numa_node?;
    if let Err(e) = region.bind_numa(node) {
        tracing::warn!(pool, node, error = %e, "cannot bind pool to its device's NUMA node");
    }
    Some(node)
}
