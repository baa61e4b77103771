//! Worker leases: what a worker in another process holds while it uses a model. A lease pins
//! the model (it cannot be unregistered or re-planned), owns the prefetch static buffers, and
//! ends on DetachWorker or when its time-to-live passes without a KeepAlive.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::Notify;

use super::alloc::MIN_ALIGN;
use super::backend::access::uva_mode;
use super::backend::plan::{self, Placement};
use super::models::model::Model;
use super::models::{ModelError, Models};
use super::pools::{PoolError, Pools, STATIC_FILE_PREFIX};
use super::spares::Spares;
use super::static_budget::{DeviceStatics, OverStaticBudget};
use crate::device::{CopyOp, DeviceError, DeviceKind, SlotLocks};

mod lease;

use lease::FastConnections;
pub use lease::{Lease, StaticSlot};

/// Fast-path connections one lease may hold at once (a worker needs one; the bound stops a
/// client that reconnects in a loop from tying up daemon threads).
pub const MAX_FAST_CONNECTIONS: usize = 8;

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("lease {0:?} not found (expired or detached); attach again")]
    NotFound(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model {name:?} is {state}; wait for READY (WatchModel) before attaching")]
    NotReady { name: String, state: &'static str },
    #[error(
        "model {0:?} has no prefetch backend; OnloadToStatic needs one (SetBackend with prefetch)"
    )]
    NotPrefetch(String),
    #[error(
        "layer {layer} of model {model:?} is not offloaded; offloaded layers are {offloaded:?}"
    )]
    LayerNotOffloaded {
        model: String,
        layer: u32,
        offloaded: Vec<u32>,
    },
    #[error(
        "model {model:?} is out of service: {why}; nothing is served from it: detach and register it again"
    )]
    OutOfService { model: String, why: String },
    #[error("worker_name must not be empty")]
    NoWorkerName,
    #[error("slot_free_event is only used with async_copy = true")]
    SlotFreeWithoutAsync,
    #[error(
        "lease {0:?} already has {MAX_FAST_CONNECTIONS} fast-path connections; close one first"
    )]
    TooManyConnections(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    StaticBudget(#[from] OverStaticBudget),
    #[error(
        "the lease's tensor table is {size} bytes, over the {max} bytes an answer may carry; the lease was not kept"
    )]
    ReplyTooLarge { size: usize, max: usize },
    #[error(
        "{scope} already has {count} leases, the most {setting} allows; detach idle workers (DetachWorker) or raise {setting}"
    )]
    TooMany {
        scope: String,
        count: usize,
        setting: &'static str,
    },
}

/// Why a lease ended, for the log.
#[derive(Debug, Clone, Copy)]
pub enum EndReason {
    Detached,
    Expired,
    /// Its last fast-path connection closed (`end_with_fast_path`).
    FastPathClosed,
    /// Its AttachWorker answer could not be given: the caller went away (past its deadline,
    /// cancelled, disconnected) or the answer was too large to send.
    Undelivered,
}

pub struct LeasesParams {
    pub default_ttl: Duration,
    pub max_per_model: usize,
    pub max_total: usize,
    pub max_static_bytes_per_device: Option<u64>,
    pub static_dir: PathBuf,
    pub disable_uva: bool,
}

pub struct Leases {
    params: LeasesParams,
    spares: Arc<Spares>,
    device_statics: Arc<DeviceStatics>,
    map: Mutex<HashMap<String, Arc<Lease>>>,
    /// Serializes attaches, so the limits are checked and the new lease inserted as one step.
    attaching: Mutex<()>,
    changed: Notify,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").finish_non_exhaustive()
    }
}

/// What a worker asks for.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub model: String,
    pub worker_name: String,
    pub ttl: Option<Duration>,
    /// End the lease when its last fast-path connection closes.
    pub end_with_fast_path: bool,
}

impl Leases {
    pub fn new(params: LeasesParams) -> Self {
        Self {
            spares: Arc::new(Spares::new(params.static_dir.clone())),
            device_statics: Arc::default(),
            params,
            map: Mutex::new(HashMap::new()),
            attaching: Mutex::new(()),
            changed: Notify::new(),
        }
    }

    /// Grants a lease: plans the model's backend and allocates the static buffers. Blocking.
    pub fn attach(
        &self,
        models: &Models,
        pools: &Pools,
        req: &AttachRequest,
    ) -> Result<Arc<Lease>, LeaseError> {
        if req.worker_name.is_empty() {
            return Err(LeaseError::NoWorkerName);
        }
        // An adopted pool may still be pinning: wait for it here, not under the attach lock,
        // so attaches to other pools go on meanwhile.
        if let Ok(m) = models.get(&req.model) {
            m.pool().wait_pin_settled();
        }
        let _one_at_a_time = self.attaching.lock().expect("attach lock");
        self.check_limits(&req.model)?;
        let model = models.attach(&req.model, |m| {
            let state = m.state();
            (state != super::models::model::ModelState::Ready).then(|| LeaseError::NotReady {
                name: m.name.clone(),
                state: super::models::state_name(state),
            })
        })?;
        match self.build(model.clone(), pools, req) {
            Ok(lease) => {
                if model.pool().note_lease_ttl(lease.ttl) {
                    let _ = pools.write_journal();
                }
                let lease = Arc::new(lease);
                self.map
                    .lock()
                    .expect("leases lock")
                    .insert(lease.id.clone(), Arc::clone(&lease));
                self.changed.notify_one();
                tracing::info!(lease = %lease.id, worker = %lease.worker_name, model = %model.name, ttl_ms = lease.ttl.as_millis() as u64, "worker attached");
                Ok(lease)
            }
            Err(e) => {
                model.attached.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// Refuses a lease over leases.max_total or leases.max_per_model: each lease holds static
    /// buffers, files and threads, so an unbounded number would exhaust the node.
    fn check_limits(&self, model: &str) -> Result<(), LeaseError> {
        let map = self.map.lock().expect("leases lock");
        if map.len() >= self.params.max_total {
            return Err(LeaseError::TooMany {
                scope: "the daemon".into(),
                count: map.len(),
                setting: "leases.max_total",
            });
        }
        let on_model = map.values().filter(|l| l.model.name == model).count();
        if on_model >= self.params.max_per_model {
            return Err(LeaseError::TooMany {
                scope: format!("model {model:?}"),
                count: on_model,
                setting: "leases.max_per_model",
            });
        }
        Ok(())
    }

    fn build(
        &self,
        model: Arc<Model>,
        pools: &Pools,
        req: &AttachRequest,
    ) -> Result<Lease, LeaseError> {
        let backend = model.backend();
        let tensors = model.tensors();
        let plan = plan::plan(backend.as_ref(), &tensors);
        let pool = model.pool();
        let id = new_lease_id();
        let mut static_slots = vec![None; tensors.len()];
        let mut onload_ops: HashMap<u32, Vec<CopyOp>> = HashMap::new();
        let mut statics = None;
        let mut host_reservation = None;
        let mut device_reservation = None;
        if let Some(pf) = &plan.prefetch {
            // Layout: slot-major, each (key, slot) buffer 256-byte aligned.
            let mut key_offsets = Vec::with_capacity(pf.keys.len());
            let mut slot_len = 0u64;
            for k in &pf.keys {
                key_offsets.push(slot_len);
                slot_len += k.len.max(1).div_ceil(MIN_ALIGN) * MIN_ALIGN;
            }
            let total = slot_len * pf.slots as u64;
            for (i, p) in plan.placements.iter().enumerate() {
                if let Placement::Prefetch { key, slot } = *p {
                    let offset = slot as u64 * slot_len + key_offsets[key];
                    static_slots[i] = Some(StaticSlot { offset });
                    let layer = tensors[i].layer.expect("prefetch tensors have a layer");
                    onload_ops.entry(layer).or_default().push(CopyOp {
                        src_offset: tensors[i].offset,
                        dst_offset: offset,
                        len: tensors[i].len,
                    });
                }
            }
            let path = self
                .params
                .static_dir
                .join(format!("{STATIC_FILE_PREFIX}{id}"));
            let cpu = pool.device.info().kind == DeviceKind::Cpu;
            if let Some(max) = self.params.max_static_bytes_per_device {
                device_reservation = Some(self.device_statics.reserve(
                    &pool.device.info().id,
                    total,
                    max,
                )?);
            }
            if let Some((kept, reservation)) = cpu.then(|| self.spares.take(total, &path)).flatten()
            {
                statics = Some(kept);
                host_reservation = reservation;
            } else {
                // cpu static buffers are host memory: they count against pools.max_host_bytes.
                if cpu {
                    host_reservation = Some(pools.reserve_host(total)?);
                }
                statics = Some(pool.device.alloc_static(&path, total, pf.slots)?);
            }
        }
        let pinned = pool.pinned();
        let ttl = req.ttl.unwrap_or(self.params.default_ttl);
        Ok(Lease {
            ttl,
            worker_name: req.worker_name.clone(),
            backend,
            pin: pool.decision(),
            pinned,
            uva_mode: uva_mode(pool.device.info(), pinned, self.params.disable_uva),
            static_slots,
            statics,
            host_reservation,
            _device_reservation: device_reservation,
            end_with_fast_path: req.end_with_fast_path,
            spares: Arc::clone(&self.spares),
            connections: Mutex::new(Some(FastConnections::default())),
            onload_ops,
            slot_locks: SlotLocks::new(plan.prefetch.as_ref().map_or(0, |pf| pf.slots.max(1))),
            expires: Mutex::new(Instant::now() + ttl),
            tensors,
            plan,
            model,
            id,
        })
    }

    /// The buffers kept for re-attaching workers; the pools' reclaimer frees them.
    pub fn spares(&self) -> Arc<Spares> {
        Arc::clone(&self.spares)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Lease>, LeaseError> {
        self.map
            .lock()
            .expect("leases lock")
            .get(id)
            .cloned()
            .ok_or_else(|| LeaseError::NotFound(id.to_string()))
    }

    pub fn keep_alive(&self, id: &str) -> Result<Arc<Lease>, LeaseError> {
        let lease = self.get(id)?;
        lease.renew();
        self.changed.notify_one();
        Ok(lease)
    }

    pub fn detach(&self, id: &str) -> Result<(), LeaseError> {
        self.end_now(id, EndReason::Detached)
    }

    /// Ends a lease whose id never reached its worker, which therefore can neither use nor
    /// detach it: left alone it would hold its static buffers, and block SetBackend, for its
    /// whole ttl.
    pub fn undelivered(&self, id: &str) -> Result<(), LeaseError> {
        self.end_now(id, EndReason::Undelivered)
    }

    fn end_now(&self, id: &str, why: EndReason) -> Result<(), LeaseError> {
        let lease = self
            .map
            .lock()
            .expect("leases lock")
            .remove(id)
            .ok_or_else(|| LeaseError::NotFound(id.to_string()))?;
        end(lease, why);
        Ok(())
    }

    /// A fast-path connection of `lease` closed: ends the lease if it asked for that and no
    /// other fast-path connection is open. Blocking (freeing cuda statics).
    pub fn fast_path_closed(&self, lease: &Lease) {
        if !lease.end_with_fast_path || lease.connection_count() > 0 {
            return;
        }
        let mut map = self.map.lock().expect("leases lock");
        // Only the same lease: its id may not be in the map any more (detached meanwhile).
        if map
            .get(&lease.id)
            .is_some_and(|l| std::ptr::eq(&**l, lease))
        {
            let ended = map.remove(&lease.id).expect("checked above");
            drop(map);
            end(ended, EndReason::FastPathClosed);
            self.changed.notify_one();
        }
    }

    /// Ends every lease whose time-to-live has passed; returns when the next one is due.
    pub fn reap(&self, now: Instant) -> Option<Instant> {
        let expired: Vec<Arc<Lease>> = {
            let mut map = self.map.lock().expect("leases lock");
            let ids: Vec<String> = map
                .values()
                .filter(|l| l.expires() <= now)
                .map(|l| l.id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for lease in expired {
            end(lease, EndReason::Expired);
        }
        self.map
            .lock()
            .expect("leases lock")
            .values()
            .map(|l| l.expires())
            .min()
    }

    /// Reaps expired leases until the daemon stops. Sleeps until the next expiry, and wakes
    /// early when a lease is added or renewed.
    pub async fn run_reaper(self: Arc<Self>) {
        loop {
            // Ending a lease frees its static buffers, which on cuda synchronises a stream and
            // calls the driver: not on the async runtime's thread.
            let me = Arc::clone(&self);
            let next = tokio::task::spawn_blocking(move || me.reap(Instant::now()))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            let wait = next.map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.changed.notified() => {}
            }
        }
    }

    pub fn count(&self) -> usize {
        self.map.lock().expect("leases lock").len()
    }

    /// Fast-path connections open over all leases.
    pub fn fast_connections(&self) -> usize {
        self.map
            .lock()
            .expect("leases lock")
            .values()
            .map(|l| l.connection_count())
            .sum()
    }
}

fn end(lease: Arc<Lease>, why: EndReason) {
    lease.close_connections();
    lease.model.attached.fetch_sub(1, Ordering::AcqRel);
    lease.model.touch();
    tracing::info!(lease = %lease.id, worker = %lease.worker_name, model = %lease.model.name, reason = ?why, "lease ended");
    // Static buffers are freed with the last reference (an onload in flight may still hold it).
}

fn new_lease_id() -> String {
    let mut b = [0u8; 12];
    if rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
