//! How a uva worker reaches host memory, decided from the pool's pin decision, the device and
//! `VLLM_WEIGHT_OFFLOADING_DISABLE_UVA`. Like the pin decision, it is computed by the daemon and
//! handed to the worker, so every process follows the same rule.

use crate::device::{DeviceInfo, DeviceKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UvaMode {
    /// cpu device: map the pool file read-only and read in place.
    HostMapped,
    /// cuda, pool pinned: register the worker's own mapping (cuMemHostRegister) and use the
    /// device pointer.
    Registered,
    /// cuda on a coherent platform, pool not pinned: the GPU reads pageable memory directly.
    Pageable,
    /// No in-place access (UVA disabled, or not pinned on a non-coherent GPU): copy on use, as
    /// vLLM falls back to.
    CopyOnUse,
}

pub fn uva_mode(device: &DeviceInfo, pinned: bool, disable_uva: bool) -> UvaMode {
    if disable_uva {
        return UvaMode::CopyOnUse;
    }
    match device.kind {
        DeviceKind::Cpu => UvaMode::HostMapped,
        DeviceKind::Cuda if pinned => UvaMode::Registered,
        DeviceKind::Cuda
            if device
                .attributes
                .pageable_memory_access_uses_host_page_tables =>
        {
            UvaMode::Pageable
        }
        DeviceKind::Cuda => UvaMode::CopyOnUse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::CudaAttributes;

    fn dev(kind: DeviceKind, coherent: bool) -> DeviceInfo {
        DeviceInfo {
            id: "x".into(),
            kind,
            name: String::new(),
            total_memory_bytes: 0,
            numa_node: None,
            attributes: CudaAttributes {
                pageable_memory_access_uses_host_page_tables: coherent,
                ..Default::default()
            },
        }
    }

    #[test]
    fn every_combination() {
        use DeviceKind::*;
        use UvaMode::*;
        let table = [
            ((Cpu, false, false, false), HostMapped),
            ((Cpu, true, false, false), HostMapped),
            ((Cpu, true, false, true), CopyOnUse),
            ((Cuda, false, true, false), Registered),
            ((Cuda, true, true, false), Registered),
            ((Cuda, true, false, false), Pageable),
            ((Cuda, false, false, false), CopyOnUse),
            ((Cuda, true, true, true), CopyOnUse),
        ];
        for ((kind, coherent, pinned, disable), want) in table {
            assert_eq!(
                uva_mode(&dev(kind, coherent), pinned, disable),
                want,
                "{kind:?} {coherent} {pinned} {disable}"
            );
        }
    }
}
