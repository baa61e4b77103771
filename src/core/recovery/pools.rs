//! Pools across a restart: mapping the files an earlier run left, when they are the ones the
//! journal describes, under the pin policy as it stands now.

use std::sync::Arc;

use crate::config::validate::is_valid_name;
use crate::core::journal::PoolRecord;
use crate::core::pin_policy::PinDecision;
use crate::core::pool::{Pool, PoolParts};
use crate::core::pools::{Pools, bind_to_device_node};
use crate::device::host::HostRegion;

/// Maps a pool file an earlier run left, if it is the one the journal describes, and decides
/// its pin as the policy stands now; the pin itself is returned, to run once the journal is
/// applied. Returns why not otherwise; the caller drops the record.
pub(super) fn adopt(
    pools: &Pools,
    rec: &PoolRecord,
) -> Result<(Arc<Pool>, Option<PendingPin>), String> {
    if !is_valid_name(&rec.name) || rec.size_bytes == 0 {
        return Err("the journal's record is invalid".into());
    }
    let device = pools
        .devices()
        .get(&rec.device)
        .cloned()
        .ok_or_else(|| format!("device {} is not on this node now", rec.device))?;
    if let Some(cause) = device.fault() {
        return Err(format!("device {} faulted: {cause}", rec.device));
    }
    let path = pools.pool_path(&rec.name);
    let region = HostRegion::open(&path).map_err(|e| e.to_string())?;
    let ino = region.ino().map_err(|e| e.to_string())?;
    if ino != rec.ino || region.len() as u64 != rec.size_bytes {
        return Err(format!(
            "{} is not the file the journal recorded (inode {ino}, {} bytes; expected inode {}, {} bytes)",
            path.display(),
            region.len(),
            rec.ino,
            rec.size_bytes
        ));
    }
    let region = Arc::new(region);
    let numa_node = bind_to_device_node(&rec.name, device.as_ref(), &region);
    let decision = pools.decision_for(device.as_ref(), rec.size_bytes);
    if decision.pin != rec.pinned {
        tracing::warn!(pool = %rec.name, was_pinned = rec.pinned, pin = decision.pin, reason = %decision.reason, "the pin decision changed since the pool was created");
    }
    let pool = Arc::new(Pool::new(PoolParts {
        durability: pools.journal().durability_handle(),
        name: rec.name.clone(),
        device,
        decision: decision.clone(),
        numa_node,
        previously_pinned: Some(rec.pinned),
        pin: None,
        pin_pending: decision.pin,
        max_lease_ttl_ms: rec.max_lease_ttl_ms,
        region,
    }));
    pools.admit(&pool)?;
    tracing::info!(pool = %rec.name, device = %rec.device, size_bytes = rec.size_bytes, pin = decision.pin, "pool adopted from the journal");
    let pin = decision.pin.then(|| PendingPin(Arc::clone(&pool)));
    Ok((pool, pin))
}

/// An adopted pool's pin, still to run. Pinning re-faults and locks every page (0.1 s per GiB
/// of 4 KiB pages on the benchmark machine; about 1 ms per GiB of 2 MiB pages, see
/// `device::huge_pages`) and holds the process's memory map while it does, so every large
/// allocation of the start would wait for it (adopting a 100k-tensor model took 51 ms beside
/// it, 17 ms without): it runs once the journal is applied, in the background, beside the
/// verifications. AttachWorker waits for it, since a lease's copies depend on whether the pool
/// is pinned. After the verifications instead, a 4 GiB model was READY 0.15 s sooner but its
/// first lease came 0.1 s later on the 2-core benchmark machine; a lease is what an engine
/// waits for.
pub struct PendingPin(Arc<Pool>);

impl PendingPin {
    /// Pins the pool and settles its pin decision. Blocking: runs on a thread of its own.
    pub fn run(self) {
        let pool = self.0;
        let started = std::time::Instant::now();
        let pinned = pool.device.pin(pool.region());
        // The pin has mapped every page (a failed one may have stopped part way). Measured
        // before the pin settles, so a lease that waited for it sees the figure.
        pool.measure_huge_pages();
        match pinned {
            Ok(guard) => {
                tracing::info!(pool = %pool.name, secs = started.elapsed().as_secs_f64(), "adopted pool pinned");
                // The decision the pool was adopted with, now applied.
                pool.settle_pin(pool.decision(), Some(guard));
            }
            Err(e) => {
                tracing::warn!(pool = %pool.name, error = %e, "pinning the adopted pool failed; it stays unpinned");
                pool.settle_pin(PinDecision::failed(e), None);
            }
        }
    }
}
