//! The per-device budget of static buffers (`leases.max_static_bytes_per_device`): cuda static
//! buffers take GPU memory beside the inference engine's, which no host budget sees.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A lease's static buffers would pass the device's budget.
#[derive(Debug, Error)]
#[error(
    "device {device} has {used} bytes of static buffers in live leases; this lease needs {needed} more, over leases.max_static_bytes_per_device = {max}; detach idle workers (DetachWorker), lower prefetch_step, or raise the limit"
)]
pub struct OverStaticBudget {
    pub device: String,
    pub used: u64,
    pub needed: u64,
    pub max: u64,
}

/// Static-buffer bytes of live leases per device, against leases.max_static_bytes_per_device.
#[derive(Debug, Default)]
pub struct DeviceStatics {
    used: Mutex<HashMap<String, u64>>,
}

/// A lease's bytes in [`DeviceStatics`]; given back on drop.
#[derive(Debug)]
pub struct StaticReservation {
    ledger: Arc<DeviceStatics>,
    device: String,
    bytes: u64,
}

impl DeviceStatics {
    pub fn reserve(
        self: &Arc<Self>,
        device: &str,
        bytes: u64,
        max: u64,
    ) -> Result<StaticReservation, OverStaticBudget> {
        let mut used = self.used.lock().expect("device statics lock");
        let now = used.get(device).copied().unwrap_or(0);
        if now.saturating_add(bytes) > max {
            return Err(OverStaticBudget {
                device: device.to_string(),
                used: now,
                needed: bytes,
                max,
            });
        }
        *used.entry(device.to_string()).or_default() += bytes;
        Ok(StaticReservation {
            ledger: Arc::clone(self),
            device: device.to_string(),
            bytes,
        })
    }
}

impl Drop for StaticReservation {
    fn drop(&mut self) {
        let mut used = self.ledger.used.lock().expect("device statics lock");
        if let Some(v) = used.get_mut(&self.device) {
            *v = v.saturating_sub(self.bytes);
        }
    }
}
