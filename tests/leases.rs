//! The lease contract through the real daemon: the prefetch tables, errors, refusals while
//! attached, re-planning, and the uva mode.

mod common;

use std::path::Path;

use common::workers::*;
use offloadd::proto::{
    AttachWorkerRequest, DetachWorkerRequest, OnloadToStaticRequest, SetBackendRequest,
    UnregisterModelRequest, UvaConfig, UvaMode, register_model_request, set_backend_request,
};
use tonic::Code;

#[tokio::test]
async fn lease_table_matches_vllm_for_five_layers_step_two() {
    let mut f = fixture(|b| b).await;
    register(
        &mut f.c,
        "m",
        &f.ckpt,
        Some(register_model_request::Backend::Prefetch(prefetch(1, 1, 2))),
    )
    .await;
    let lease =
        f.c.attach_worker(AttachWorkerRequest {
            model: "m".into(),
            worker_name: "t".into(),
            ttl_ms: 60_000,
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
            .find(|t| t.layer == layer as i32 && t.name.ends_with("mlp.up_proj.weight"))
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
        Some(register_model_request::Backend::Uva(UvaConfig {
            cpu_offload_bytes: 1 << 20,
            params: vec![],
        })),
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
            backend: Some(set_backend_request::Backend::Prefetch(prefetch(1, 1, 1))),
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
            backend: Some(set_backend_request::Backend::Prefetch(prefetch(1, 1, 2))),
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
async fn the_doorbell_onloads_without_an_rpc_and_closes_with_the_lease() {
    let mut f = fixture(|b| b).await;
    register(
        &mut f.c,
        "m",
        &f.ckpt,
        Some(register_model_request::Backend::Prefetch(prefetch(1, 1, 2))),
    )
    .await;

    // A worker process that onloads only through the doorbell, verifying every slot.
    let done = WorkerProc::spawn(&f.d, "m", &["--passes", "3", "--doorbell"])
        .finish()
        .await;
    assert_eq!(done["onloads"].as_u64().unwrap(), 2 + 3 * LAYERS as u64);

    // The library, in this process: errors come back as status codes; the page goes with the lease.
    let w = offloadd::worker::Worker::attach(f.d.channel().await, "m", "lib", 0)
        .await
        .unwrap();
    assert!(w.has_doorbell());
    let page = w
        .lease
        .segments
        .iter()
        .find(|s| s.kind() == offloadd::proto::SegmentKind::Doorbell)
        .unwrap()
        .path
        .clone();
    assert!(Path::new(&page).exists());
    assert!(w.onload_doorbell(3).unwrap() > 0);
    match w.onload_doorbell(99) {
        Err(offloadd::worker::WorkerError::Rpc(s)) => assert_eq!(s.code(), Code::InvalidArgument),
        other => panic!("{other:?}"),
    }
    f.c.detach_worker(DetachWorkerRequest {
        lease_id: w.lease.lease_id.clone(),
    })
    .await
    .unwrap();
    assert!(matches!(
        w.onload_doorbell(3),
        Err(offloadd::worker::WorkerError::DoorbellClosed)
    ));
    assert!(
        !Path::new(&page).exists(),
        "doorbell page removed with the lease"
    );
    assert!(f.d.terminate().await.success());
}
