//! Domain types to protobuf. Only this module knows both.

use crate::core::Core;
use crate::core::pin_policy::PinDecision;
use crate::core::pool::Pool;
use crate::device::Device;
use crate::proto;

pub fn numa(node: Option<u32>) -> i32 {
    node.map_or(-1, |n| n as i32)
}

pub fn decision(d: &PinDecision) -> proto::PinDecision {
    proto::PinDecision {
        pin: d.pin,
        reason: d.reason.to_string(),
    }
}

pub fn device(core: &Core, d: &dyn Device) -> proto::Device {
    let info = d.info();
    let caps = d.capabilities(0);
    // For the "would get" decision use a pool that fits what may be pinned, so the answer
    // reflects the policy rather than an arbitrary size.
    let probe_bytes = caps.max_pinnable_bytes.clamp(1, u64::MAX);
    let a = info.attributes;
    proto::Device {
        id: info.id.clone(),
        kind: info.kind.to_string(),
        name: info.name.clone(),
        total_memory_bytes: info.total_memory_bytes,
        numa_node: numa(info.numa_node),
        capabilities: Some(proto::DeviceCapabilities {
            pin_available: caps.pin.is_ok(),
            pin_unavailable_reason: caps.pin.as_ref().err().cloned().unwrap_or_default(),
            coherent: caps.coherent,
            max_pinnable_bytes: caps.max_pinnable_bytes,
            host_register_supported: a.host_register_supported,
            pageable_memory_access: a.pageable_memory_access,
            integrated: a.integrated,
            unified_addressing: a.unified_addressing,
        }),
        pin_decision: Some(decision(&core.pools.decision_for(d, probe_bytes))),
    }
}

pub fn pool(p: &Pool) -> proto::Pool {
    proto::Pool {
        name: p.name.clone(),
        device: p.device.info().id.clone(),
        size_bytes: p.size_bytes,
        used_bytes: p.used_bytes(),
        pinned: p.pinned(),
        pin_reason: p.decision.reason.to_string(),
        path: p.path().display().to_string(),
        numa_node: numa(p.numa_node),
    }
}

pub fn info(core: &Core) -> proto::GetInfoResponse {
    let node = &core.node;
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
        devices: core
            .pools
            .devices()
            .iter()
            .map(|d| device(core, d.as_ref()))
            .collect(),
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
