//! The `cpu` device: host memory described from /proc and /sys.

use super::{CudaAttributes, DeviceInfo, DeviceKind};

pub const CPU_DEVICE_ID: &str = "cpu";

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
    parse_meminfo(&text, field)
}

fn parse_meminfo(text: &str, field: &str) -> Option<u64> {
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
    #[test]
    fn parses_meminfo_fields_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemAvailable:    1024 kB\n";
        assert_eq!(
            super::parse_meminfo(text, "MemTotal"),
            Some(24_576_000 * 1024)
        );
        assert_eq!(
            super::parse_meminfo(text, "MemAvailable"),
            Some(1024 * 1024)
        );
        assert_eq!(super::parse_meminfo(text, "Mem"), None);
    }
}
