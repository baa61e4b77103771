//! Devices: where pools are pinned for and where static buffers live. `cpu` is always present
//! (host shared memory stands in for device memory, pin = mlock); `cuda:N` appears when the
//! NVIDIA driver loads at run time. This layer knows nothing of models or protobuf.

pub mod cpu;
pub mod cuda;
pub mod host;
mod huge_pages;
mod slots;

pub use slots::{SlotLocks, SlotWrite};

use std::fmt;
use std::sync::Arc;

use thiserror::Error;

use host::HostRegion;

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

/// What a device can do with host memory right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// `Err` carries why pinning is impossible, in words an operator can act on.
    pub pin: Result<(), String>,
    /// The device reads pageable host memory through the host page tables (GH200/GB200).
    pub coherent: bool,
    /// The most bytes that could be pinned now; `u64::MAX` when unlimited.
    pub max_pinnable_bytes: u64,
    pub free_memory_bytes: Option<u64>,
}

/// Pinned host memory a device holds outside pools (the cuda staging ring), for GetInfo and the
/// host budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staging {
    /// Bytes the ring takes once made; 0 where copies from unpinned pools need none.
    pub bytes: u64,
    /// Whether it has been made (from then on it counts against pools.max_host_bytes).
    pub allocated: bool,
    /// Why it is needed or not, and the setting that changes it.
    pub reason: String,
}

/// Keeps memory pinned; unpins when dropped.
pub trait PinGuard: Send + Sync + fmt::Debug {}

/// One host-to-static copy: `len` bytes from `src_offset` in the pool to `dst_offset` in the
/// static buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub src_offset: u64,
    pub dst_offset: u64,
    pub len: u64,
}

/// An asynchronous copy into one slot.
pub struct AsyncCopy<'a> {
    pub src: &'a HostRegion,
    pub ops: &'a [CopyOp],
    pub src_pinned: bool,
    /// The slot, held for the copy.
    pub slot: &'a SlotWrite<'a>,
    /// The worker's "slot free" event handle, if it passed one.
    pub slot_free: Option<&'a [u8]>,
}

/// Static buffers of one lease, in the device's memory, shared with the worker's process.
/// Freed when dropped.
pub trait StaticBuffer: Send + Sync + fmt::Debug {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Shared-memory file the worker maps (cpu); None where the worker opens `ipc_handle`.
    fn path(&self) -> Option<&std::path::Path>;
    /// Moves the buffer's file to `to`, so another lease can take it over (cpu). Buffers a
    /// worker opens by IPC handle are not handed over.
    fn rename(&mut self, _to: &std::path::Path) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported(
            "only cpu static buffers are handed from one lease to the next".into(),
        ))
    }
    /// CUDA IPC memory handle (cuda); empty on cpu.
    fn ipc_handle(&self) -> Vec<u8>;
    /// Per slot, the IPC handle of the inter-process event recorded after each copy into that
    /// slot (cuda); empty on cpu.
    fn copy_done_events(&self) -> Vec<Vec<u8>> {
        Vec::new()
    }
    /// Enqueues the copies into `slot` and returns without waiting: the copy first waits on
    /// `slot_free` (an IPC event handle the worker recorded after its last read of the slot), and
    /// `copy_done_events()[slot]` is recorded when it completes. vLLM's fork/join across
    /// processes, with no RPC on the critical path.
    fn copy_from_async(&self, _req: AsyncCopy<'_>) -> Result<(), DeviceError> {
        Err(DeviceError::Unsupported(
            "asynchronous onload needs a cuda device (inter-process CUDA events)".into(),
        ))
    }
    /// Copies pool bytes into the buffer and returns once the copy is complete. `src_pinned` is
    /// the pool's pin decision as applied: an unpinned source is never treated as pinned.
    fn copy_from(
        &self,
        src: &HostRegion,
        ops: &[CopyOp],
        src_pinned: bool,
        slot: &SlotWrite<'_>,
    ) -> Result<(), DeviceError>;
}

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("mlock of {bytes} bytes failed: {source}")]
    Mlock { bytes: u64, source: std::io::Error },
    #[error("{device}: {call} failed: {name}")]
    Cuda {
        device: String,
        call: &'static str,
        /// The driver's error name, e.g. CUDA_ERROR_OUT_OF_MEMORY.
        name: String,
    },
    #[error("{0} is unavailable: its driver thread has stopped")]
    Gone(String),
    #[error(
        "{device} faulted earlier with {cause}; it is unusable until offloadd restarts (other devices keep serving)"
    )]
    Faulted { device: String, cause: String },
    #[error("static buffers: {0}")]
    HostMem(#[from] host::HostMemError),
    #[error("{0} does not support this yet")]
    Unsupported(String),
}

/// One device behind the shared policy. Implementations must be cheap to query: capabilities are
/// read on every pool creation and every GetInfo.
pub trait Device: Send + Sync + fmt::Debug {
    fn info(&self) -> &DeviceInfo;
    /// Why the device is unusable (a sticky CUDA error), if it is.
    fn fault(&self) -> Option<String> {
        None
    }
    /// Capabilities for pinning `bytes` more bytes.
    fn capabilities(&self, bytes: u64) -> Capabilities;
    /// Pins exactly the region (never rounded up). Called only when the policy said pin.
    fn pin(&self, region: &Arc<HostRegion>) -> Result<Box<dyn PinGuard>, DeviceError>;
    /// Allocates `len` bytes of static buffers for one lease. `path` names the shared-memory file
    /// where the device keeps them in host memory (cpu).
    fn alloc_static(
        &self,
        path: &std::path::Path,
        len: u64,
        slots: usize,
    ) -> Result<Box<dyn StaticBuffer>, DeviceError>;
    /// Bytes of `region` registered with the device, asked of the driver (cuda); None where the
    /// device has no such notion (cpu).
    /// The staging memory copies from unpinned pools use on this device.
    fn staging(&self) -> Staging {
        Staging {
            bytes: 0,
            allocated: false,
            reason: "host-to-host copies need no staging".into(),
        }
    }

    /// Makes the staging memory now, so it is counted when an unpinned pool is created rather
    /// than appearing at the first copy.
    fn prepare_staging(&self) -> Result<(), DeviceError> {
        Ok(())
    }

    fn registered_bytes(&self, _region: &HostRegion) -> Option<u64> {
        None
    }
}

/// The devices of this node, `cpu` first.
#[derive(Debug, Clone)]
pub struct Devices {
    devices: Vec<Arc<dyn Device>>,
}

impl Devices {
    pub fn new(devices: Vec<Arc<dyn Device>>) -> Self {
        Self { devices }
    }

    pub fn get(&self, id: &str) -> Option<&Arc<dyn Device>> {
        self.devices.iter().find(|d| d.info().id == id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Device>> {
        self.devices.iter()
    }

    pub fn ids(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.info().id.clone()).collect()
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}
