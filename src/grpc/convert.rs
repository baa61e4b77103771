//! Domain types to protobuf. Only this module knows both.

use crate::core::Core;
use crate::core::backend::plan::{Placement, dtype_name};
use crate::core::backend::{BackendConfig, PrefetchConfig, UvaConfig};
use crate::core::leases::Lease;
use crate::core::models::model::{
    Model, ModelSource, ModelState, Progress, TensorEntry, contiguous_strides,
};
use crate::core::pin_policy::PinDecision;
use crate::core::recovery::{JournalOutcome, Report};
use crate::device::Device;
use crate::proto;
use crate::service::PoolView;

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
    let would = core.pools.decision_for(d, probe_bytes);
    let staging = d.staging();
    proto::Device {
        id: info.id.clone(),
        kind: info.kind.to_string(),
        name: info.name.clone(),
        total_memory_bytes: info.total_memory_bytes,
        numa_node: info.numa_node,
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
        pin_decision: Some(decision(&would)),
        fault: d.fault().unwrap_or_default(),
        uva_mode: uva_mode(crate::core::backend::access::uva_mode(
            info,
            would.pin,
            core.node.params.vllm_env.disable_uva,
        )) as i32,
        staging: Some(proto::DeviceStaging {
            bytes: staging.bytes,
            allocated: staging.allocated,
            reason: staging.reason,
        }),
    }
}

pub fn pool(v: &PoolView) -> proto::Pool {
    let p = &v.pool;
    proto::Pool {
        name: p.name.clone(),
        device: p.device.info().id.clone(),
        size_bytes: p.size_bytes,
        used_bytes: p.used_bytes(),
        pinned: p.pinned(),
        pin_reason: match p.pin_pending() {
            true => format!(
                "{} (pinning the adopted pool in the background)",
                p.decision().reason
            ),
            false => p.decision().reason.to_string(),
        },
        path: p.path().display().to_string(),
        numa_node: p.numa_node,
        registered_bytes: v.registered_bytes,
        adopted: p.previously_pinned.is_some(),
        previously_pinned: p.previously_pinned,
        durable: p.not_durable().is_none(),
        not_durable_reason: p.not_durable().unwrap_or_default(),
        huge_page_bytes: p.huge_page_bytes(),
    }
}

fn recovery(r: Report) -> proto::Recovery {
    let (journal, journal_error) = match r.journal {
        JournalOutcome::Absent => ("absent", String::new()),
        JournalOutcome::Applied => ("applied", String::new()),
        JournalOutcome::Discarded(why) => ("discarded", why),
    };
    proto::Recovery {
        journal: journal.to_string(),
        journal_error,
        pools_adopted: r.pools_adopted,
        models_adopted: r.models_adopted,
        dropped: r
            .dropped
            .into_iter()
            .map(|d| proto::RecoveryDrop {
                kind: d.kind.to_string(),
                name: d.name,
                reason: d.reason,
            })
            .collect(),
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
            metrics_addr: p.metrics_bound.map(|a| a.to_string()).unwrap_or_default(),
        }),
        recovery: Some(recovery(core.recovery.snapshot())),
        durability: Some(durability(core)),
        scrub: Some(proto::Scrub {
            bytes_per_second: core.scrub.bytes_per_second,
            bytes_checked: core.scrub.bytes_checked(),
            passes: core.scrub.passes(),
            out_of_service: core.scrub.out_of_service(),
        }),
    }
}

fn durability(core: &Core) -> proto::Durability {
    let journal = core.pools.journal();
    let d = journal.durability();
    let pools = match d.pools() {
        Some(_) => core
            .pools
            .list()
            .iter()
            .map(|p| format!("pool {}", p.name))
            .collect(),
        None => Vec::new(),
    };
    proto::Durability {
        journal_required: journal.required(),
        journal_write_failures: d.failures(),
        last_failure: d.last_failure().unwrap_or_default(),
        not_durable: pools
            .into_iter()
            .chain(d.models().into_iter().map(|m| format!("model {m}")))
            .collect(),
    }
}

/// RegisterModel, CreateModel and SetBackend carry the same `Backend` message; one with no kind
/// set means no backend, as an absent one does.
pub fn backend_config(b: Option<proto::Backend>) -> Option<BackendConfig> {
    match b?.kind? {
        proto::backend::Kind::Uva(u) => Some(BackendConfig::Uva(uva(u))),
        proto::backend::Kind::Prefetch(p) => Some(BackendConfig::Prefetch(prefetch(p))),
    }
}

fn uva(u: proto::UvaConfig) -> UvaConfig {
    UvaConfig {
        cpu_offload_bytes: u.cpu_offload_bytes,
        params: u.params,
    }
}

fn prefetch(p: proto::PrefetchConfig) -> PrefetchConfig {
    PrefetchConfig {
        group_size: p.group_size,
        num_in_group: p.num_in_group,
        prefetch_step: p.prefetch_step,
        params: p.params,
    }
}

pub fn backend(b: &BackendConfig) -> proto::Backend {
    let kind = match b.clone() {
        BackendConfig::Uva(u) => proto::backend::Kind::Uva(proto::UvaConfig {
            cpu_offload_bytes: u.cpu_offload_bytes,
            params: u.params,
        }),
        BackendConfig::Prefetch(p) => proto::backend::Kind::Prefetch(proto::PrefetchConfig {
            group_size: p.group_size,
            num_in_group: p.num_in_group,
            prefetch_step: p.prefetch_step,
            params: p.params,
        }),
    };
    proto::Backend { kind: Some(kind) }
}

pub fn model_state(s: ModelState) -> proto::ModelState {
    match s {
        ModelState::Loading => proto::ModelState::Loading,
        ModelState::Ready => proto::ModelState::Ready,
        ModelState::Failed => proto::ModelState::Failed,
        ModelState::AwaitingSeal => proto::ModelState::AwaitingSeal,
    }
}

pub fn progress(p: &Progress) -> proto::ModelProgress {
    proto::ModelProgress {
        state: model_state(p.state) as i32,
        loaded_bytes: p.loaded_bytes,
        bytes: p.total_bytes,
        error: p.error.clone().unwrap_or_default(),
    }
}

pub fn tensor(t: &TensorEntry) -> proto::TensorInfo {
    proto::TensorInfo {
        name: t.name.clone(),
        dtype: dtype_name(t.dtype),
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        strides: contiguous_strides(&t.shape)
            .into_iter()
            .map(|d| d as u64)
            .collect(),
        offset: t.offset,
        length: t.len,
        layer: t.layer,
        crc32c: t.crc32c.unwrap_or(0),
    }
}

/// A model with the rows `rows` of its table (fitted to it and to the page limit:
/// [`super::paging::fit`]) and the token of the next page.
pub fn model_page(m: &Model, rows: std::ops::Range<usize>) -> proto::Model {
    let mut reply = model_with(m, Some(rows.clone()));
    let rows = rows.start.min(reply.tensor_count as usize)..rows.end;
    let size = |i: usize| {
        let len = prost::Message::encoded_len(&reply.tensors[i - rows.start]);
        prost::encoding::key_len(super::tables::MODEL_TENSORS)
            + prost::encoding::encoded_len_varint(len as u64)
            + len
    };
    let (fitted, next) = super::paging::fit(rows.clone(), reply.tensor_count as usize, size);
    reply.tensors.truncate(fitted.len());
    reply.next_page_token = super::paging::Scope::model(m).token(next);
    reply
}

/// A model without its table (GetModel with include_tensors pages it: [`model_page`]).
pub fn model(m: &Model) -> proto::Model {
    model_with(m, None)
}

fn model_with(m: &Model, table: Option<std::ops::Range<usize>>) -> proto::Model {
    let p = m.progress();
    let not_durable = m.pool().model_not_durable(&m.name);
    let tensors = m.tensors();
    proto::Model {
        name: m.name.clone(),
        pool: m.pool().name.clone(),
        path: match &m.source {
            ModelSource::Checkpoint { path, .. } => path.display().to_string(),
            ModelSource::Published => String::new(),
            ModelSource::Remote { url, .. } => url.clone(),
        },
        source_objects: match &m.source {
            ModelSource::Remote { objects, .. } => objects
                .iter()
                .map(|o| proto::SourceObject {
                    url: o.url.clone(),
                    size: o.size,
                    etag: o.etag.clone(),
                    last_modified_unix_ms: o.last_modified_ms,
                })
                .collect(),
            _ => Vec::new(),
        },
        state: model_state(p.state) as i32,
        bytes: m.bytes,
        tensor_count: tensors.len() as u64,
        loaded_bytes: p.loaded_bytes,
        backend: m.backend().as_ref().map(backend),
        attached_workers: m.attached_workers() as u32,
        error: p.error.unwrap_or_default(),
        tensors: match table {
            Some(r) => tensors[r.start.min(tensors.len())..r.end.min(tensors.len())]
                .iter()
                .map(tensor)
                .collect(),
            None => Vec::new(),
        },
        adopted: m.adopted,
        next_page_token: String::new(),
        load_seconds: p.load_time.map_or(0.0, |t| t.as_secs_f64()),
        publish_token: String::new(),
        // Only what is (or is meant to be) recorded can be durable: READY models.
        durable: p.state == ModelState::Ready && not_durable.is_none(),
        not_durable_reason: match p.state {
            ModelState::Ready => not_durable.unwrap_or_default(),
            _ => String::new(),
        },
    }
}

pub fn uva_mode(m: crate::core::backend::access::UvaMode) -> proto::UvaMode {
    use crate::core::backend::access::UvaMode as M;
    match m {
        M::HostMapped => proto::UvaMode::HostMapped,
        M::Registered => proto::UvaMode::Registered,
        M::Pageable => proto::UvaMode::Pageable,
        M::CopyOnUse => proto::UvaMode::CopyOnUse,
    }
}

/// A lease without its table (pages of it come from `tables`).
pub fn lease(l: &Lease) -> proto::Lease {
    let pool = l.model.pool();
    let device = pool.device.info().id.clone();
    let mut segments = vec![proto::Segment {
        path: pool.path().display().to_string(),
        size_bytes: pool.size_bytes,
        kind: proto::SegmentKind::Pool as i32,
        device: device.clone(),
        ipc_handle: Vec::new(),
    }];
    if let Some(s) = &l.statics {
        segments.push(proto::Segment {
            path: s
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            size_bytes: s.len(),
            kind: proto::SegmentKind::Static as i32,
            device: device.clone(),
            ipc_handle: s.ipc_handle(),
        });
    }
    let pf = l.plan.prefetch.as_ref();
    proto::Lease {
        lease_id: l.id.clone(),
        ttl_ms: l.ttl.as_millis() as u64,
        pinned: l.pinned,
        pin_reason: l.pin.reason.to_string(),
        backend: l.backend.as_ref().map(backend),
        segments,
        tensors: Vec::new(),
        prefetch_next: pf.map(|p| p.next.clone()).unwrap_or_default(),
        offloaded_layers: pf.map(|p| p.offloaded_layers.clone()).unwrap_or_default(),
        prefetch_slots: pf.map_or(0, |p| p.slots as u32),
        uva_mode: uva_mode(l.uva_mode) as i32,
        model: l.model.name.clone(),
        copy_done_events: l
            .statics
            .as_ref()
            .map(|s| s.copy_done_events())
            .unwrap_or_default(),
        next_page_token: String::new(),
    }
}

/// Every row of a lease's table, in order.
pub fn lease_tensors(l: &Lease) -> impl ExactSizeIterator<Item = proto::LeaseTensor> + '_ {
    // The static buffers, when the lease has them, are always its second segment.
    let static_segment = l.statics.as_ref().map(|_| 1u32);
    l.tensors
        .iter()
        .zip(&l.plan.placements)
        .zip(&l.static_slots)
        .map(move |((t, p), slot)| {
            let info = tensor(t);
            proto::LeaseTensor {
                placement: match p {
                    Placement::Device => proto::Placement::Device,
                    Placement::Uva => proto::Placement::Uva,
                    Placement::Prefetch { .. } => proto::Placement::Prefetch,
                } as i32,
                segment: 0,
                offset: t.offset,
                length: t.len,
                static_segment: slot.and(static_segment),
                static_offset: slot.map_or(0, |s| s.offset),
                name: info.name,
                dtype: info.dtype,
                shape: info.shape,
                strides: info.strides,
                layer: info.layer,
                crc32c: info.crc32c,
            }
        })
}
