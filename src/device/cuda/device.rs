//! A CUDA device behind the `Device` trait: pinning is `cuMemHostRegister` of exactly the pool.

use std::sync::Arc;

use cudarc::driver::sys;

use super::driver::DriverThread;
use crate::device::host::HostRegion;
use crate::device::{
    Capabilities, Device, DeviceError, DeviceInfo, PinGuard, Staging, StaticBuffer,
};

/// cuMemHostRegister flags: visible to every context (PORTABLE) and mapped into the device
/// address space (DEVICEMAP) so uva workers can get a device pointer.
const REGISTER_FLAGS: u32 = 0x01 | 0x02;

#[derive(Debug)]
pub struct CudaDevice {
    info: DeviceInfo,
    driver: Arc<DriverThread>,
    wsl: bool,
    /// Bytes of the staging ring where copies from unpinned pools need one; 0 where they read
    /// pageable memory directly.
    staging_bytes: u64,
    staging_reason: String,
}

/// How copies to the device are made (from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Copies {
    /// `pin.staging_bytes`: the pinned ring for copies from unpinned pools.
    pub staging_bytes: u64,
    /// `leases.copy_window_bytes`: 0 leaves asynchronous copies unpaced.
    pub window_bytes: u64,
}

impl CudaDevice {
    pub fn new(info: DeviceInfo, ordinal: i32, copies: Copies) -> std::io::Result<Self> {
        let coherent = info.attributes.pageable_memory_access_uses_host_page_tables;
        let (staging_bytes, staging_reason) = staging_plan(coherent, copies.staging_bytes);
        Ok(Self {
            info,
            driver: Arc::new(DriverThread::spawn(
                ordinal,
                (staging_bytes / 2).max(1) as usize,
                copies.window_bytes,
            )?),
            wsl: is_wsl(),
            staging_bytes,
            staging_reason,
        })
    }
}

/// How copies from unpinned pools reach the device: the pin policy covers this memory too. A
/// coherent GPU reads pageable memory at full speed, so it gets no pinned ring at all. Elsewhere a
/// pageable `cuMemcpyHtoD` is synchronous and runs at about an eighth of pinned bandwidth, so the
/// ring stays pinned even when the pool may not be, and says so; `pin.staging_bytes = 0` trades
/// that speed for no pinned memory.
pub fn staging_plan(coherent: bool, staging_bytes: u64) -> (u64, String) {
    if coherent {
        return (
            0,
            "coherent platform: copies from unpinned pools read pageable memory directly, no pinned staging".into(),
        );
    }
    if staging_bytes == 0 {
        return (
            0,
            "pin.staging_bytes = 0: copies from unpinned pools read pageable memory directly (synchronous, about 1/8 of pinned bandwidth), no pinned staging".into(),
        );
    }
    (
        staging_bytes,
        format!(
            "copies from unpinned pools go through a pinned ring of {staging_bytes} bytes, made with the first unpinned pool and counted in pools.max_host_bytes: it stays pinned even with VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY because pageable copies are synchronous and about 1/8 as fast; set pin.staging_bytes = 0 to pin nothing"
        ),
    )
}

/// vLLM's `is_pin_memory_available()` is false under WSL, where pinned memory is unreliable.
fn is_wsl() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.to_lowercase().contains("microsoft"))
        .unwrap_or(false)
}

impl Device for CudaDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn fault(&self) -> Option<String> {
        self.driver.fault()
    }

    fn capabilities(&self, _bytes: u64) -> Capabilities {
        let pin = if self.wsl {
            Err("running under WSL, where vLLM does not pin host memory".to_string())
        } else if !self.info.attributes.host_register_supported {
            Err(format!(
                "{} does not support cuMemHostRegister (CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED = 0)",
                self.info.id
            ))
        } else {
            Ok(())
        };
        Capabilities {
            max_pinnable_bytes: if pin.is_ok() { u64::MAX } else { 0 },
            pin,
            coherent: self
                .info
                .attributes
                .pageable_memory_access_uses_host_page_tables,
            // Free memory needs a context; GetInfo must not create one on an unused GPU.
            free_memory_bytes: None,
        }
    }

    fn pin(&self, region: &Arc<HostRegion>) -> Result<Box<dyn PinGuard>, DeviceError> {
        let addr = region.as_ptr() as usize;
        let len = region.len();
        let id = self.info.id.clone();
        self.driver.run_checked(move |st| {
            st.context()?;
            // SAFETY: registers exactly our live mapping; `CudaPin` keeps it mapped until it
            // has been unregistered.
            let rc = unsafe { sys::cuMemHostRegister_v2(addr as *mut _, len, REGISTER_FLAGS) };
            match rc.result() {
                Ok(()) => Ok(()),
                Err(e) => Err(DeviceError::Cuda {
                    device: id,
                    call: "cuMemHostRegister",
                    name: super::error_name(e),
                }),
            }
        })?;
        Ok(Box::new(CudaPin {
            region: Arc::clone(region),
            driver: Arc::clone(&self.driver),
        }))
    }

    fn alloc_static(
        &self,
        _path: &std::path::Path,
        len: u64,
        slots: usize,
    ) -> Result<Box<dyn StaticBuffer>, DeviceError> {
        let id = self.info.id.clone();
        let a = self
            .driver
            .run_checked(move |st| super::statics::alloc(st, &id, len, slots))?;
        Ok(Box::new(super::statics::CudaStatic::new(
            a,
            super::statics::StaticParts {
                id: self.info.id.clone(),
                len,
                direct_pageable: self.staging_bytes == 0,
                driver: Arc::clone(&self.driver),
            },
        )))
    }

    fn staging(&self) -> Staging {
        Staging {
            bytes: self.staging_bytes,
            allocated: self.driver.has_staging(),
            reason: self.staging_reason.clone(),
        }
    }

    fn prepare_staging(&self) -> Result<(), DeviceError> {
        if self.staging_bytes == 0 || self.driver.has_staging() {
            return Ok(());
        }
        self.driver.run_checked(|st| st.staging().map(|_| ()))
    }

    fn registered_bytes(&self, region: &HostRegion) -> Option<u64> {
        let addr = region.as_ptr() as usize;
        self.driver
            .run(move |st| {
                st.context().ok()?;
                let mut dptr: sys::CUdeviceptr = 0;
                // SAFETY: a query on our own mapping; fails (not registered) without side effects.
                let rc = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, addr as *mut _, 0) };
                if rc != sys::CUresult::CUDA_SUCCESS {
                    return Some(0);
                }
                let (mut base, mut size) = (0, 0usize);
                // SAFETY: out-pointers to locals; `dptr` came from the driver.
                let rc = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, dptr) };
                (rc == sys::CUresult::CUDA_SUCCESS).then_some(size as u64)
            })
            .ok()
            .flatten()
    }
}

#[derive(Debug)]
struct CudaPin {
    region: Arc<HostRegion>,
    driver: Arc<DriverThread>,
}

impl PinGuard for CudaPin {}

impl Drop for CudaPin {
    fn drop(&mut self) {
        let addr = self.region.as_ptr() as usize;
        let res = self.driver.run(move |_| {
            // SAFETY: unregisters the pointer registered in `pin`; still mapped (we hold it).
            unsafe { sys::cuMemHostUnregister(addr as *mut _) }.result()
        });
        if !matches!(res, Ok(Ok(()))) {
            tracing::warn!(path = %self.region.path().display(), "cuMemHostUnregister failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::staging_plan;

    #[test]
    fn staging_follows_the_platform_and_the_setting() {
        let (bytes, why) = staging_plan(true, 128 << 20);
        assert_eq!(bytes, 0, "coherent: no pinned ring");
        assert!(why.contains("coherent"), "{why}");
        let (bytes, why) = staging_plan(false, 0);
        assert_eq!(bytes, 0);
        assert!(why.contains("pin.staging_bytes = 0"), "{why}");
        let (bytes, why) = staging_plan(false, 128 << 20);
        assert_eq!(bytes, 128 << 20);
        assert!(
            why.contains("VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY")
                && why.contains("pin.staging_bytes = 0"),
            "{why}"
        );
    }
}
