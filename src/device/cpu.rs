//! The `cpu` device: host memory stands in for device memory and pinning is `mlock`.

use std::sync::Arc;

use super::host::HostRegion;
use super::{
    Capabilities, CopyOp, CudaAttributes, Device, DeviceError, DeviceInfo, DeviceKind, PinGuard,
    SlotWrite, StaticBuffer,
};

pub const CPU_DEVICE_ID: &str = "cpu";

/// CAP_IPC_LOCK's bit in the capability sets.
const CAP_IPC_LOCK: u32 = 14;

#[derive(Debug)]
pub struct CpuDevice {
    info: DeviceInfo,
}

impl CpuDevice {
    pub fn new() -> Self {
        Self { info: info() }
    }
}

impl Default for CpuDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl Device for CpuDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn capabilities(&self, bytes: u64) -> Capabilities {
        let max = max_lockable_bytes();
        let pin = if bytes <= max.bytes {
            Ok(())
        } else {
            Err(format!(
                "mlock of {bytes} bytes exceeds what this process may lock ({}); grant CAP_IPC_LOCK or raise RLIMIT_MEMLOCK (ulimit -l)",
                max.why
            ))
        };
        Capabilities {
            pin,
            coherent: false,
            max_pinnable_bytes: max.bytes,
            free_memory_bytes: meminfo_bytes("MemAvailable"),
        }
    }

    fn pin(&self, region: &Arc<HostRegion>) -> Result<Box<dyn PinGuard>, DeviceError> {
        // mlock populates page tables holding the process's mmap lock; in one call over a
        // large pool that is a third of a second per 4 GiB during which no other thread of the
        // daemon can map memory (a new blocking thread's stack, a malloc arena), so RPCs stall.
        // Chunks let them in between.
        const CHUNK: usize = 64 << 20;
        let len = region.len();
        for start in (0..len).step_by(CHUNK) {
            let n = CHUNK.min(len - start);
            // SAFETY: a piece of our live mapping (CHUNK is page-aligned); unlocked by
            // `MlockGuard`, or right below on failure.
            if let Err(e) = unsafe { rustix::mm::mlock(region.as_ptr().add(start).cast(), n) } {
                // SAFETY: our live mapping; munlock of pages not locked is a no-op.
                let _ = unsafe { rustix::mm::munlock(region.as_ptr().cast(), len) };
                return Err(DeviceError::Mlock {
                    bytes: len as u64,
                    source: e.into(),
                });
            }
        }
        Ok(Box::new(MlockGuard {
            region: Arc::clone(region),
        }))
    }

    fn alloc_static(
        &self,
        path: &std::path::Path,
        len: u64,
        _slots: usize,
    ) -> Result<Box<dyn StaticBuffer>, DeviceError> {
        // Backed (fallocate) and pre-faulted before attach answers: a full pools.dir is a
        // RESOURCE_EXHAUSTED now rather than a SIGBUS at the first onload, the first copies do
        // not pay for page faults (single-threaded first-touch faults on tmpfs ran at a
        // twentieth of memcpy speed on the benchmark machine), and nothing keeps faulting a
        // lease's pages after it has ended.
        let region = HostRegion::create_backed(path, len.max(1))?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Err(source) = region.prefault(threads) {
            let _ = region.unlink(); // the error below is the one to report
            return Err(super::host::HostMemError::Io {
                path: path.to_path_buf(),
                op: "pre-fault",
                source,
            }
            .into());
        }
        Ok(Box::new(CpuStatic {
            region: Arc::new(region),
        }))
    }
}

/// On cpu the "device" is host shared memory: a file the worker maps, filled with memcpy.
#[derive(Debug)]
struct CpuStatic {
    region: Arc<HostRegion>,
}

impl StaticBuffer for CpuStatic {
    fn len(&self) -> u64 {
        self.region.len() as u64
    }

    fn path(&self) -> Option<&std::path::Path> {
        Some(self.region.path())
    }

    fn rename(&mut self, to: &std::path::Path) -> Result<(), DeviceError> {
        Arc::get_mut(&mut self.region)
            .ok_or_else(|| DeviceError::Unsupported("static buffer is still in use".into()))?
            .rename(to)?;
        Ok(())
    }

    fn ipc_handle(&self) -> Vec<u8> {
        Vec::new()
    }

    fn copy_from(
        &self,
        src: &HostRegion,
        ops: &[CopyOp],
        _src_pinned: bool,
        _slot: &SlotWrite<'_>,
    ) -> Result<(), DeviceError> {
        for op in ops {
            // SAFETY: the destination is the slot `_slot` holds (the lease's ops for a slot
            // write only that slot), so no other thread writes it meanwhile; the source is read
            // through raw pointers, never borrowed, so a writer outside the daemon can change
            // only the bytes copied (which the scrubber then finds).
            unsafe {
                self.region.copy_from_region(
                    op.dst_offset as usize,
                    src,
                    op.src_offset as usize,
                    op.len as usize,
                );
            }
        }
        Ok(())
    }
}

impl Drop for CpuStatic {
    fn drop(&mut self) {
        let _ = self.region.unlink();
    }
}

#[derive(Debug)]
struct MlockGuard {
    region: Arc<HostRegion>,
}

impl PinGuard for MlockGuard {}

impl Drop for MlockGuard {
    fn drop(&mut self) {
        // SAFETY: unlocking the range we locked; the region is still mapped (we hold it).
        let _ = unsafe { rustix::mm::munlock(self.region.as_ptr().cast(), self.region.len()) };
    }
}

struct Lockable {
    bytes: u64,
    why: String,
}

/// With CAP_IPC_LOCK the limit does not apply; otherwise RLIMIT_MEMLOCK minus what this process
/// has locked already (VmLck).
fn max_lockable_bytes() -> Lockable {
    // Capabilities are fixed for the process's life (the daemon never calls capset), and
    // /proc/self/status is the most expensive read of a GetInfo: read it once for them.
    static CAP_LOCK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let cap = *CAP_LOCK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        has_capability(&status, CAP_IPC_LOCK)
    });
    if cap {
        return Lockable {
            bytes: u64::MAX,
            why: "CAP_IPC_LOCK".into(),
        };
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Memlock).current;
    let Some(limit) = limit else {
        return Lockable {
            bytes: u64::MAX,
            why: "RLIMIT_MEMLOCK unlimited".into(),
        };
    };
    let locked = parse_kib_field(&status, "VmLck").unwrap_or(0);
    Lockable {
        bytes: limit.saturating_sub(locked),
        why: format!("RLIMIT_MEMLOCK {limit} bytes, {locked} already locked, no CAP_IPC_LOCK"),
    }
}

fn has_capability(status: &str, bit: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// Describes the host. Memory comes from /proc/meminfo; the NUMA node is left open because host
/// memory for `cpu` pools may come from any node.
pub fn info() -> DeviceInfo {
    DeviceInfo {
        id: CPU_DEVICE_ID.to_string(),
        kind: DeviceKind::Cpu,
        name: cpu_model().unwrap_or_else(|| "host".to_string()),
        total_memory_bytes: meminfo_bytes("MemTotal").unwrap_or(0),
        numa_node: None,
        attributes: CudaAttributes::default(),
    }
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// Reads one `/proc/meminfo` field in bytes.
pub fn meminfo_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kib_field(&text, field)
}

/// Parses `Name:   1234 kB` lines as found in `/proc/meminfo` and `/proc/<pid>/status`.
pub fn parse_kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, rest) = line.split_once(':')?;
        if name != field {
            return None;
        }
        let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kib_fields_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(parse_kib_field(text, "MemTotal"), Some(24_576_000 * 1024));
        assert_eq!(parse_kib_field(text, "MemAvailable"), Some(1024 * 1024));
        assert_eq!(parse_kib_field(text, "Mem"), None);
    }

    #[test]
    fn reads_cap_ipc_lock_from_capeff() {
        assert!(has_capability("CapEff:\t000001fffeffffff\n", CAP_IPC_LOCK));
        assert!(!has_capability("CapEff:\t0000000000000000\n", CAP_IPC_LOCK));
        assert!(!has_capability("CapEff:\t000001fffeffbfff\n", CAP_IPC_LOCK));
    }
}
