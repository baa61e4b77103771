//! Discovers CUDA devices without creating a context on any of them: a context costs hundreds of
//! MiB of GPU memory, and a sidecar must not take that from GPUs it never uses.

use std::panic::{AssertUnwindSafe, catch_unwind};

use cudarc::driver::result;
use cudarc::driver::sys::{self, CUdevice_attribute as Attr};

use crate::device::{CudaAttributes, DeviceInfo, DeviceKind};

/// Result of looking for the driver and its devices.
#[derive(Debug, Clone, Default)]
pub struct CudaProbe {
    pub devices: Vec<DeviceInfo>,
    /// Why no CUDA device is offered, when none is; shown by GetInfo and logged.
    pub absent_reason: Option<String>,
}

impl CudaProbe {
    fn absent(reason: impl Into<String>) -> Self {
        Self {
            devices: Vec::new(),
            absent_reason: Some(reason.into()),
        }
    }
}

/// Loads libcuda if it is there and lists its devices. Never panics: cudarc panics on a missing
/// library or symbol, so the whole probe runs under `catch_unwind`.
pub fn probe() -> CudaProbe {
    // SAFETY: only tries to dlopen libcuda; no driver function is called.
    if !unsafe { sys::is_culib_present() } {
        return CudaProbe::absent("NVIDIA driver library libcuda.so not found");
    }
    match catch_unwind(AssertUnwindSafe(probe_driver)) {
        Ok(Ok(devices)) if devices.is_empty() => CudaProbe::absent("driver loaded, no CUDA device"),
        Ok(Ok(devices)) => CudaProbe {
            devices,
            absent_reason: None,
        },
        Ok(Err(reason)) => CudaProbe::absent(reason),
        Err(_) => CudaProbe::absent("libcuda is missing a required symbol (driver too old?)"),
    }
}

/// Driver errors are reported by their raw code: formatting them calls back into libcuda, which
/// may be the thing that is broken.
fn probe_driver() -> Result<Vec<DeviceInfo>, String> {
    result::init().map_err(|e| format!("cuInit failed with CUresult {}", e.0 as i32))?;
    let count = result::device::get_count()
        .map_err(|e| format!("cuDeviceGetCount failed with CUresult {}", e.0 as i32))?;
    (0..count)
        .map(|ordinal| describe(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}")))
        .collect()
}

fn describe(ordinal: i32) -> Result<DeviceInfo, String> {
    let code = |e: result::DriverError| format!("CUresult {}", e.0 as i32);
    let dev = result::device::get(ordinal).map_err(code)?;
    let name = result::device::get_name(dev).map_err(code)?;
    // SAFETY: `dev` was just returned by cuDeviceGet.
    let total = unsafe { result::device::total_mem(dev) }.map_err(code)?;
    // SAFETY: as above; attributes are plain integer queries.
    let attr = |a: Attr| unsafe { result::device::get_attribute(dev, a) }.map(|v| v != 0);
    let attributes = CudaAttributes {
        host_register_supported: attr(Attr::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED)
            .map_err(code)?,
        pageable_memory_access: attr(Attr::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS)
            .map_err(code)?,
        pageable_memory_access_uses_host_page_tables: attr(
            Attr::CU_DEVICE_ATTRIBUTE_PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES,
        )
        .map_err(code)?,
        integrated: attr(Attr::CU_DEVICE_ATTRIBUTE_INTEGRATED).map_err(code)?,
        unified_addressing: attr(Attr::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING).map_err(code)?,
    };
    Ok(DeviceInfo {
        id: format!("cuda:{ordinal}"),
        kind: DeviceKind::Cuda,
        name,
        total_memory_bytes: total as u64,
        numa_node: pci_bus_id(dev).and_then(|bus| numa_node_of(&bus)),
        attributes,
    })
}

fn pci_bus_id(dev: sys::CUdevice) -> Option<String> {
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: the buffer is writable for its whole length, which is what we pass.
    let rc = unsafe { sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev) };
    if rc != sys::CUresult::CUDA_SUCCESS {
        return None;
    }
    // SAFETY: the driver NUL-terminates the id within the buffer on success.
    let id = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(id.to_string_lossy().to_lowercase())
}

/// The driver spells the PCI domain with eight digits (`00000000:3b:00.0`), sysfs with four.
/// sysfs reports -1 when the platform has no NUMA information.
fn numa_node_of(pci_bus_id: &str) -> Option<u32> {
    let (domain, rest) = pci_bus_id.split_once(':')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    let path = format!("/sys/bus/pci/devices/{domain:04x}:{rest}/numa_node");
    let text = std::fs::read_to_string(path).ok()?;
    text.trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}
