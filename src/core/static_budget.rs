//! The per-device budget of static buffers (`leases.max_static_bytes_per_device`): cuda static
//! buffers take GPU memory beside the inference engine's, which no host budget sees.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::leases::LeaseError;

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
    ) -> Result<StaticReservation, LeaseError> {
        let mut used = self.used.lock().expect("device statics lock");
        let now = used.get(device).copied().unwrap_or(0);
        if now.saturating_add(bytes) > max {
            return Err(LeaseError::StaticBudget {
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
