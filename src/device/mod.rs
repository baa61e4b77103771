//! Devices: where pools are pinned for and where static buffers live. `cpu` is always present
//! (host shared memory stands in for device memory, pin = mlock); `cuda:N` appears when the
//! NVIDIA driver loads at run time. This layer knows nothing of models or protobuf.

pub mod cpu;
pub mod cuda;

use std::fmt;

/// Which implementation backs a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// What a device is, as discovered at startup.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N`.
    pub id: String,
    pub kind: DeviceKind,
    /// Marketing name for GPUs, the CPU model for `cpu`.
    pub name: String,
    pub total_memory_bytes: u64,
    /// NUMA node the device is attached to, where the platform says.
    pub numa_node: Option<u32>,
    pub attributes: CudaAttributes,
}

/// Driver attributes that decide how host memory may be used. All false for `cpu`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaAttributes {
    pub host_register_supported: bool,
    pub pageable_memory_access: bool,
    /// The device reads pageable memory through the host's page tables (GH200/GB200): "coherent".
    pub pageable_memory_access_uses_host_page_tables: bool,
    pub integrated: bool,
    pub unified_addressing: bool,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}
