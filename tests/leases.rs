//! The lease contract through the real daemon: the prefetch tables, errors, refusals while
//! attached, re-planning, and the uva mode.

mod common;

use std::path::Path;

use common::workers::*;
use offloadd::proto::{
    AttachWorkerRequest, CreatePoolRequest, DetachWorkerRequest, OnloadToStaticRequest,
    SetBackendRequest, UnregisterModelRequest, UvaConfig, UvaMode,
};
use tonic::Code;

#[tokio::test]
async fn lease_table_matches_vllm_for_five_layers_step_two() {
    let mut f = fixture(|b| b).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let lease =
        f.c.attach_worker(AttachWorkerRequest {
            model: "m".into(),
            worker_name: "t".into(),
            ttl_ms: 60_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.offloaded_layers, [0, 1, 2, 3, 4]);
    assert_eq!(lease.prefetch_next, [2, 3, 4, 1, 0]);
    assert_eq!(lease.prefetch_slots, 2);
    assert_eq!(
        lease.segments[1].kind(),
        offloadd::proto::SegmentKind::Static
    );
    assert!(Path::new(&lease.segments[1].path).exists());
    // Same parameter in layers k and k+2 share a buffer; k and k+1 do not.
    let slot_of = |layer: u32| {
        lease
            .tensors
            .iter()
            .find(|t| t.layer == Some(layer) && t.name.ends_with("mlp.up_proj.weight"))
            .unwrap()
            .static_offset
    };
    assert_eq!(slot_of(0), slot_of(2));
    assert_ne!(slot_of(0), slot_of(1));

    // OnloadToStatic errors.
    let err =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: lease.lease_id.clone(),
            layer: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("[0, 1, 2, 3, 4]"),
        "{}",
        err.message()
    );
    let err =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: "nope".into(),
            layer: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let r =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: lease.lease_id.clone(),
            layer: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.slot, 1);
    assert!(r.bytes > 0);
    let err =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: lease.lease_id.clone(),
            layer: 3,
            async_copy: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("cuda"), "{}", err.message());
    let err =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: lease.lease_id.clone(),
            layer: 3,
            async_copy: false,
            slot_free_event: vec![0; 64],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(lease.copy_done_events.is_empty(), "no CUDA events on cpu");
    f.c.detach_worker(DetachWorkerRequest {
        lease_id: lease.lease_id.clone(),
    })
    .await
    .unwrap();
    assert!(
        !Path::new(&lease.segments[1].path).exists(),
        "static buffers freed on detach"
    );
    let err =
        f.c.detach_worker(DetachWorkerRequest {
            lease_id: lease.lease_id,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    register(&mut f.c, "u", &f.ckpt, uva(1)).await;
    let lease = attach(&mut f.c, "u", "t").await;
    let err =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: lease.lease_id,
            layer: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "uva model");
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn attached_models_cannot_be_unregistered_or_replanned() {
    let mut f = fixture(|b| b).await;
    register(
        &mut f.c,
        "m",
        &f.ckpt,
        Some(
            UvaConfig {
                cpu_offload_bytes: 1 << 20,
                params: vec![],
            }
            .into(),
        ),
    )
    .await;
    let mut w = WorkerProc::spawn(&f.d, "m", &["--hold", "--ttl-ms", "300"]);
    assert_eq!(w.next().await["event"], "attached");
    let err =
        f.c.unregister_model(UnregisterModelRequest { name: "m".into() })
            .await
            .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("detach"), "{}", err.message());
    let err =
        f.c.set_backend(SetBackendRequest {
            model: "m".into(),
            backend: Some(prefetch(1, 1, 1).into()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    w.child.kill().await.unwrap();
    drop(w);

    // Once the killed worker's lease has expired, switch uva -> prefetch and re-attach: the
    // plan changes without re-reading the checkpoint.
    let ended =
        f.d.wait_for_log(|v| v["message"] == "lease ended" && v["worker"] == "offloadd-worker")
            .await;
    assert_eq!(ended["reason"], "Expired");
    let reads_before = f.d.logs().matches("registering model").count();
    let m =
        f.c.set_backend(SetBackendRequest {
            model: "m".into(),
            backend: Some(prefetch(1, 1, 2).into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        m.backend.unwrap().kind,
        Some(offloadd::proto::backend::Kind::Prefetch(_))
    ));
    let done = WorkerProc::spawn(&f.d, "m", &["--passes", "2"])
        .finish()
        .await;
    assert_eq!(done["onloads"].as_u64().unwrap(), 2 + 2 * LAYERS as u64);
    assert_eq!(
        f.d.logs().matches("registering model").count(),
        reads_before,
        "no checkpoint re-read"
    );
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn getinfo_and_leases_report_the_uva_mode() {
    for (disable, want) in [(None, UvaMode::HostMapped), (Some("1"), UvaMode::CopyOnUse)] {
        let mut f = fixture(|b| match disable {
            Some(v) => b.env("VLLM_WEIGHT_OFFLOADING_DISABLE_UVA", v),
            None => b,
        })
        .await;
        let info =
            f.c.get_info(offloadd::proto::GetInfoRequest {})
                .await
                .unwrap()
                .into_inner();
        assert_eq!(info.devices[0].uva_mode(), want);
        register(&mut f.c, "m", &f.ckpt, uva(1)).await;
        let lease = attach(&mut f.c, "m", "w").await;
        assert_eq!(lease.uva_mode(), want);
        assert!(f.d.terminate().await.success());
    }
}

#[tokio::test]
async fn the_fast_path_onloads_on_the_same_socket_and_closes_with_the_lease() {
    use offloadd::worker::{Worker, WorkerError};
    let mut f = fixture(|b| b).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;

    // A worker process that onloads only over the fast path, verifying every slot.
    let done = WorkerProc::spawn(&f.d, "m", &["--passes", "3", "--fast"])
        .finish()
        .await;
    assert_eq!(done["onloads"].as_u64().unwrap(), 2 + 3 * LAYERS as u64);

    // The library, in this process: same bytes and same errors as the RPC.
    let mut w = Worker::attach(f.d.channel().await, "m", "lib", 0)
        .await
        .unwrap();
    assert!(matches!(w.onload_fast(3), Err(WorkerError::NoFastPath)));
    w.connect_fast(&f.d.uds).unwrap();
    let rpc = w.onload(3).await.unwrap();
    assert_eq!(w.onload_fast(3).unwrap(), rpc.bytes);
    let rpc_err =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: w.lease.lease_id.clone(),
            layer: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    match w.onload_fast(99) {
        Err(WorkerError::Rpc(s)) => {
            assert_eq!(s.code(), Code::InvalidArgument);
            assert_eq!(s.message(), rpc_err.message(), "the RPC's own message");
        }
        other => panic!("{other:?}"),
    }

    // Async requests (flags in the layer word) get exactly the RPC's answers: on the cpu device
    // an async copy is FAILED_PRECONDITION, a slot-free event without async INVALID_ARGUMENT.
    {
        use offloadd::fast::{EVENT_HANDLE, Request, client::FastClient};
        let mut raw = FastClient::connect(&f.d.uds, &w.lease.lease_id)
            .unwrap()
            .unwrap();
        for (async_copy, slot_free, code) in [
            (true, None, Code::FailedPrecondition),
            (true, Some([3u8; EVENT_HANDLE]), Code::FailedPrecondition),
            (false, Some([3u8; EVENT_HANDLE]), Code::InvalidArgument),
        ] {
            let rpc_err =
                f.c.onload_to_static(OnloadToStaticRequest {
                    lease_id: w.lease.lease_id.clone(),
                    layer: 3,
                    async_copy,
                    slot_free_event: slot_free.map(|h| h.to_vec()).unwrap_or_default(),
                })
                .await
                .unwrap_err();
            let reply = raw
                .request(&Request {
                    layer: 3,
                    async_copy,
                    slot_free,
                })
                .unwrap();
            assert_eq!(rpc_err.code(), code, "{}", rpc_err.message());
            assert_eq!(reply.to_status().code(), code);
            assert_eq!(reply.message, rpc_err.message(), "the RPC's own message");
        }
        // The connection still serves plain onloads after the refusals.
        assert_eq!(raw.onload(3).unwrap().bytes, rpc.bytes);
    }

    // A hello for a lease that does not exist is refused with the RPC's NOT_FOUND.
    let mut stranger = Worker::attach(f.d.channel().await, "m", "stranger", 0)
        .await
        .unwrap();
    stranger.lease.lease_id = "0123456789abcdef01234567".into();
    match stranger.connect_fast(&f.d.uds) {
        Err(WorkerError::Rpc(s)) => {
            assert_eq!(s.code(), Code::NotFound);
            assert!(s.message().contains("attach again"), "{}", s.message());
        }
        other => panic!("{other:?}"),
    }

    // A client speaking another version is told so, and connections that close before they
    // speak, or after two bytes, disturb nobody.
    {
        use std::io::Write;
        let mut raw = std::os::unix::net::UnixStream::connect(&f.d.uds).unwrap();
        raw.write_all(b"OFLD\x09\x00\x00\x00").unwrap();
        let reply = offloadd::fast::Reply::read_from(&raw).unwrap();
        assert_eq!(reply.code, Code::InvalidArgument as u32);
        assert!(reply.message.contains("version 9"), "{}", reply.message);
        drop(std::os::unix::net::UnixStream::connect(&f.d.uds).unwrap());
        let mut torn = std::os::unix::net::UnixStream::connect(&f.d.uds).unwrap();
        torn.write_all(b"OF").unwrap();
        drop(torn);
    }

    // Ending the lease closes its connections; gRPC on the same socket goes on.
    f.c.detach_worker(DetachWorkerRequest {
        lease_id: w.lease.lease_id.clone(),
    })
    .await
    .unwrap();
    assert!(
        matches!(w.onload_fast(3), Err(WorkerError::Fast(_))),
        "the connection is closed with the lease"
    );
    assert_eq!(attached_workers(&mut f.c, "m").await, 1);
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn python_speaks_the_fast_path_with_the_standard_library() {
    let mut f = fixture(|b| b).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let lease = attach(&mut f.c, "m", "py").await;
    let rpc =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: lease.lease_id.clone(),
            layer: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let out = tokio::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fast_client.py"))
        .arg("--uds")
        .arg(&f.d.uds)
        .args(["--lease", &lease.lease_id, "2", "99"])
        .output()
        .await
        .expect("python3 runs (CI installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["code"], 0);
    assert_eq!(lines[0]["bytes"], rpc.bytes);
    assert_eq!(lines[0]["slot"], rpc.slot);
    assert_eq!(lines[1]["code"], Code::InvalidArgument as i32);
    assert!(
        lines[1]["message"]
            .as_str()
            .unwrap()
            .contains("offloaded layers are"),
        "{}",
        lines[1]
    );
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn fast_path_connections_per_lease_are_bounded() {
    use offloadd::parts::MAX_FAST_CONNECTIONS;
    use offloadd::worker::{Worker, WorkerError};
    let f = fixture(|b| b).await;
    let mut c = f.c.clone();
    register(&mut c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let mut w = Worker::attach(f.d.channel().await, "m", "w", 0)
        .await
        .unwrap();
    let id = w.lease.lease_id.clone();
    let open: Vec<_> = (0..MAX_FAST_CONNECTIONS)
        .map(|_| {
            offloadd::fast::client::FastClient::connect(&f.d.uds, &id)
                .unwrap()
                .unwrap()
        })
        .collect();
    match w.connect_fast(&f.d.uds) {
        Err(WorkerError::Rpc(s)) => {
            assert_eq!(s.code(), Code::ResourceExhausted);
            assert!(s.message().contains("close one first"), "{}", s.message());
        }
        other => panic!("{other:?}"),
    }
    // A connection its worker closed is released by its thread; then there is room again.
    drop(open);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match w.connect_fast(&f.d.uds) {
            Ok(()) => break,
            Err(WorkerError::Rpc(s)) if s.code() == Code::ResourceExhausted => assert!(
                std::time::Instant::now() < deadline,
                "closed connections were never released"
            ),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(w.onload_fast(0).unwrap() > 0);
    assert!(f.d.terminate().await.success());
}

async fn try_attach(
    c: &mut offloadd::proto::offload_client::OffloadClient<tonic::transport::Channel>,
    worker: &str,
) -> Result<offloadd::proto::Lease, tonic::Status> {
    c.attach_worker(AttachWorkerRequest {
        model: "m".into(),
        worker_name: worker.into(),
        ttl_ms: 60_000,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

async fn detach(
    c: &mut offloadd::proto::offload_client::OffloadClient<tonic::transport::Channel>,
    lease: &offloadd::proto::Lease,
) {
    c.detach_worker(DetachWorkerRequest {
        lease_id: lease.lease_id.clone(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn leases_are_refused_past_the_per_model_and_total_limits() {
    let mut f = fixture(|b| b.set("leases.max_per_model=2").set("leases.max_total=3")).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    register(&mut f.c, "n", &f.ckpt, None).await;
    let a = try_attach(&mut f.c, "a").await.unwrap();
    let _b = try_attach(&mut f.c, "b").await.unwrap();
    let refused = try_attach(&mut f.c, "c").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused
            .message()
            .contains("model \"m\" already has 2 leases")
            && refused.message().contains("leases.max_per_model"),
        "{}",
        refused.message()
    );
    attach(&mut f.c, "n", "on-n").await;
    let total =
        f.c.attach_worker(AttachWorkerRequest {
            model: "n".into(),
            worker_name: "second-on-n".into(),
            ttl_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(total.code(), Code::ResourceExhausted);
    assert!(
        total.message().contains("leases.max_total"),
        "{}",
        total.message()
    );
    detach(&mut f.c, &a).await;
    try_attach(&mut f.c, "c")
        .await
        .expect("a detach makes room");
}

#[tokio::test]
async fn cpu_static_buffers_count_against_the_host_budget() {
    // The 8 MiB pool leaves 1 MiB of the budget for static buffers.
    let mut f = fixture(|b| b.set("pools.max_host_bytes=9437184")).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let mut granted = Vec::new();
    let refused = loop {
        match try_attach(&mut f.c, &format!("w{}", granted.len())).await {
            Ok(lease) => granted.push(lease),
            Err(e) => break e,
        }
        assert!(granted.len() < 100, "static buffers were never refused");
    };
    let each = granted[0].segments[1].size_bytes;
    assert!(!granted.is_empty() && granted.len() as u64 * each <= 1 << 20);
    assert!(
        (granted.len() as u64 + 1) * each > 1 << 20,
        "refused only when full"
    );
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("static buffers need")
            && refused.message().contains("pools.max_host_bytes"),
        "{}",
        refused.message()
    );
    for lease in &granted {
        detach(&mut f.c, lease).await;
    }
    try_attach(&mut f.c, "again")
        .await
        .expect("detaching returned the bytes");
}

fn files_with(dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_reattaching_worker_gets_the_ended_leases_buffers_and_a_pool_can_take_them_back() {
    let mut f = fixture(|b| b.set("pools.max_host_bytes=9437184")).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let dir = f.s.pools_dir();
    let first = try_attach(&mut f.c, "w").await.unwrap();
    let each = first.segments[1].size_bytes;
    detach(&mut f.c, &first).await;
    assert_eq!(
        files_with(&dir, "offloadd-static-"),
        ["offloadd-static-spare-0"],
        "the ended lease's buffers are kept, under a name no worker maps"
    );
    let second = try_attach(&mut f.c, "w").await.unwrap();
    assert_eq!(
        files_with(&dir, "offloadd-static-"),
        [format!("offloadd-static-{}", second.lease_id)],
        "the restarted worker got them back under its own lease's name"
    );
    detach(&mut f.c, &second).await;
    // A pool that needs the kept bytes gets them: 1 MiB of budget is left beside the first pool.
    f.c.create_pool(CreatePoolRequest {
        name: "q".into(),
        device: "cpu".into(),
        size_bytes: (1 << 20) - each + 4096,
    })
    .await
    .expect("the kept buffers are freed for a pool");
    assert!(files_with(&dir, "offloadd-static-").is_empty());
}
