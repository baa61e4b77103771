//! Domain types to protobuf. Only this module knows both.

use crate::core::Node;
use crate::device::DeviceInfo;
use crate::proto;

pub fn device(d: &DeviceInfo) -> proto::Device {
    proto::Device {
        id: d.id.clone(),
        kind: d.kind.to_string(),
        name: d.name.clone(),
        total_memory_bytes: d.total_memory_bytes,
        numa_node: numa(d.numa_node),
    }
}

pub fn numa(node: Option<u32>) -> i32 {
    node.map_or(-1, |n| n as i32)
}

pub fn info(node: &Node) -> proto::GetInfoResponse {
    let p = &node.params;
    let c = &p.config;
    proto::GetInfoResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        build: Some(proto::BuildInfo {
            git_sha: proto::build_info::GIT_SHA.to_string(),
            target: proto::build_info::TARGET.to_string(),
            profile: proto::build_info::PROFILE.to_string(),
        }),
        uptime_ms: node.uptime().as_millis() as u64,
        devices: p.devices.iter().map(device).collect(),
        cuda_absent_reason: p.cuda_absent_reason.clone().unwrap_or_default(),
        vllm_env: Some(proto::VllmEnv {
            disable_pin_memory: p.vllm_env.disable_pin_memory,
            disable_uva: p.vllm_env.disable_uva,
        }),
        config: Some(proto::ConfigSummary {
            uds_path: c.server.uds_path.display().to_string(),
            tcp_addr: p.tcp_bound.map(|a| a.to_string()).unwrap_or_default(),
            pools_dir: c.pools.dir.display().to_string(),
            max_host_bytes: p.max_host_bytes,
            model_roots: c
                .models
                .roots
                .iter()
                .map(|r| r.display().to_string())
                .collect(),
            metrics_addr: c.metrics.addr.map(|a| a.to_string()).unwrap_or_default(),
        }),
    }
}
