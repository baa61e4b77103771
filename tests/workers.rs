//! Workers in other processes: the reference worker binary attaches over the Unix socket, maps
//! the pool, onloads prefetch layers and verifies every byte, against the real daemon.

mod common;

use common::workers::*;
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    AttachWorkerRequest, DetachWorkerRequest, GetPoolRequest, OnloadToStaticRequest, Placement,
    UvaConfig, UvaMode,
};
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test]
async fn uva_worker_reads_weights_in_place_and_matches_the_checkpoint() {
    let mut f = fixture(|b| b).await;
    let uva = UvaConfig {
        cpu_offload_bytes: 100_000,
        params: vec![],
    };
    register(&mut f.c, "m", &f.ckpt, Some(uva.into())).await;
    let lease =
        f.c.attach_worker(AttachWorkerRequest {
            model: "m".into(),
            worker_name: "probe".into(),
            ttl_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.uva_mode(), UvaMode::HostMapped);
    assert_eq!(lease.ttl_ms, 10_000, "0 means the configured default");
    assert_eq!(lease.segments.len(), 1, "uva needs no static buffers");
    let uva_bytes: u64 = lease
        .tensors
        .iter()
        .filter(|t| t.placement() == Placement::Uva)
        .map(|t| t.length)
        .sum();
    assert!(
        (100_000..100_000 + 2 * 128 * 128 * 2).contains(&uva_bytes),
        "budget walk stops past the budget: {uva_bytes}"
    );
    assert!(
        lease
            .tensors
            .iter()
            .any(|t| t.placement() == Placement::Device)
    );
    f.c.detach_worker(DetachWorkerRequest {
        lease_id: lease.lease_id,
    })
    .await
    .unwrap();

    let done = WorkerProc::spawn(
        &f.d,
        "m",
        &["--passes", "2", "--checkpoint", f.ckpt.to_str().unwrap()],
    )
    .finish()
    .await;
    // embeddings, 9 tensors per layer, final norm, lm_head
    assert_eq!(
        done["checkpoint_tensors_matched"].as_u64().unwrap() as usize,
        1 + 9 * LAYERS as usize + 2
    );
    assert_eq!(done["onloads"], 0);
    assert_eq!(
        attached_workers(&mut f.c, "m").await,
        0,
        "detached at the end"
    );
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn prefetch_workers_verify_every_slot_over_several_passes() {
    // (group_size, num_in_group, prefetch_step): includes n % step != 0 (5 layers, step 2 and 3),
    // a step larger than n, and prefetch_step < num_in_group.
    let triples = [
        (1, 1, 1),
        (1, 1, 2),
        (1, 1, 3),
        (2, 1, 1),
        (2, 2, 2),
        (4, 3, 1),
        (1, 1, 8),
    ];
    let mut f = fixture(|b| b).await;
    for (i, (g, n, step)) in triples.into_iter().enumerate() {
        let name = format!("m{i}");
        register(&mut f.c, &name, &f.ckpt, prefetched(g, n, step)).await;
        let mut w = WorkerProc::spawn(
            &f.d,
            &name,
            &["--passes", "3", "--checkpoint", f.ckpt.to_str().unwrap()],
        );
        let attached = w.next().await;
        assert_eq!(attached["event"], "attached");
        let done = w.next().await;
        assert_eq!(done["event"], "done", "({g},{n},{step}): {done}");
        let offloaded = (0..LAYERS).filter(|l| l % g >= g - n).count() as u64;
        let slots = offloaded.min(step as u64);
        assert_eq!(
            done["onloads"].as_u64().unwrap(),
            slots + 3 * offloaded,
            "({g},{n},{step})"
        );
        assert!(w.child.wait().await.unwrap().success());
    }
    assert!(
        f.d.logs().contains("prefetch_step 1 < num_in_group 3"),
        "the wasteful triple was warned about"
    );
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn two_workers_share_one_host_copy() {
    let mut f = fixture(|b| b).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(2, 1, 1)).await;
    let used = |c: &mut OffloadClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.get_pool(GetPoolRequest { name: "p".into() })
                .await
                .unwrap()
                .into_inner()
                .used_bytes
        }
    };
    let before = used(&mut f.c).await;
    let mut a = WorkerProc::spawn(&f.d, "m", &["--hold"]);
    assert_eq!(a.next().await["event"], "attached");
    assert_eq!(
        used(&mut f.c).await,
        before,
        "attaching copies nothing into the pool"
    );
    let b = WorkerProc::spawn(&f.d, "m", &["--passes", "4"]);
    let c = WorkerProc::spawn(&f.d, "m", &["--passes", "4"]);
    let (db, dc) = tokio::join!(b.finish(), c.finish());
    assert!(
        db["tensors_verified"].as_u64().unwrap() > 0
            && dc["tensors_verified"].as_u64().unwrap() > 0
    );
    assert_eq!(
        used(&mut f.c).await,
        before,
        "one host copy for every worker"
    );
    assert_eq!(attached_workers(&mut f.c, "m").await, 1);
    a.child.kill().await.unwrap();
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn killed_worker_is_reaped_and_others_keep_going() {
    let mut f = fixture(|b| b).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    // A worker that holds a 300 ms lease, and one busy in its forward loop.
    let mut held = WorkerProc::spawn(
        &f.d,
        "m",
        &["--hold", "--ttl-ms", "300", "--name", "victim"],
    );
    let attached = held.next().await;
    let lease_id = attached["lease_id"].as_str().unwrap().to_string();
    let mut busy = WorkerProc::spawn(
        &f.d,
        "m",
        &[
            // Far more passes than it can finish before it is killed.
            "--passes",
            "100000000",
            "--name",
            "busy-victim",
            "--ttl-ms",
            "300",
            // Killed in the middle of a fast-path call, most likely: the daemon's thread for
            // that connection must just end.
            "--fast",
        ],
    );
    assert_eq!(busy.next().await["event"], "attached");
    let mut survivor = WorkerProc::spawn(&f.d, "m", &["--passes", "20", "--name", "survivor"]);
    assert_eq!(survivor.next().await["event"], "attached");
    assert_eq!(attached_workers(&mut f.c, "m").await, 3);

    held.child.kill().await.unwrap();
    busy.child.kill().await.unwrap();
    for name in ["victim", "busy-victim"] {
        let ended =
            f.d.wait_for_log(|v| v["message"] == "lease ended" && v["worker"] == name)
                .await;
        assert_eq!(ended["reason"], "Expired", "{ended}");
    }
    let err =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id,
            layer: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "the reaped lease is gone");
    let done = survivor.wait_done().await;
    assert_eq!(done["passes"], 20);
    let statics: Vec<String> = std::fs::read_dir(f.s.pools_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("offloadd-static-"))
        .collect();
    // Freed, or (at most two) kept for a re-attach under a name no worker maps.
    assert!(
        statics.len() <= 2
            && statics
                .iter()
                .all(|n| n.starts_with("offloadd-static-spare-")),
        "static buffers of reaped and detached leases are released: {statics:?}"
    );
    assert_eq!(attached_workers(&mut f.c, "m").await, 0);

    // A restarted worker attaches cleanly to the same model.
    let again = WorkerProc::spawn(
        &f.d,
        "m",
        &["--passes", "2", "--checkpoint", f.ckpt.to_str().unwrap()],
    )
    .finish()
    .await;
    assert_eq!(again["passes"], 2);
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn the_pin_decision_travels_to_the_worker() {
    for disable in [false, true] {
        let f = fixture(|b| {
            if disable {
                b.env("VLLM_WEIGHT_OFFLOADING_DISABLE_PIN_MEMORY", "1")
            } else {
                b
            }
        })
        .await;
        let mut c = f.c.clone();
        let uva = UvaConfig {
            cpu_offload_bytes: 200_000,
            params: vec![],
        };
        register(&mut c, "m", &f.ckpt, Some(uva.into())).await;
        let mut w = WorkerProc::spawn(&f.d, "m", &["--hold"]);
        let a = w.next().await;
        assert_eq!(a["pinned"], !disable);
        assert_eq!(a["locked_pool"], !disable);
        let locked = a["vm_lck_bytes"].as_u64().unwrap();
        assert_eq!(
            locked,
            a["locked_bytes"].as_u64().unwrap(),
            "VmLck is exactly what the worker says it locked"
        );
        if disable {
            assert_eq!(
                locked, 0,
                "the worker locks nothing when the decision is no"
            );
        } else {
            // The pages around its UVA tensors: at least the budget, less than the whole pool.
            assert!((200_000..8 << 20).contains(&locked), "locked {locked}");
        }
        w.child.kill().await.unwrap();
        assert!(f.d.terminate().await.success());
    }
}

/// A worker holding a lease lets go when its daemon dies (SIGKILL): within about its ttl it
/// exits non-zero, saying why, instead of keeping the dead daemon's shared memory mapped.
#[tokio::test]
async fn a_holding_worker_lets_go_when_its_daemon_dies() {
    let mut f = fixture(|b| b).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 1)).await;
    let mut w = WorkerProc::spawn(&f.d, "m", &["--hold", "--ttl-ms", "1000"]);
    let attached = w.next().await;
    assert_eq!(attached["event"], "attached", "{attached}");
    f.d.signal(rustix::process::Signal::KILL);
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), w.child.wait())
        .await
        .expect("the worker exits once its lease cannot be renewed")
        .unwrap();
    assert!(!status.success());
    let last = w.next().await;
    assert_eq!(last["event"], "error", "{last}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("was not renewed within its ttl"),
        "{last}"
    );
}

/// A table twice DeepSeek-V3's (200k tensors, an 18 MB lease) is far over gRPC's default 4 MiB:
/// the reference worker attaches anyway, in its own process, and verifies every tensor.
#[tokio::test]
async fn a_worker_attaches_to_a_200k_tensor_model() {
    const N: usize = 200_000;
    let mut f = moe_fixture(N).await;
    let done = WorkerProc::spawn(&f.d, "moe", &["--passes", "1"])
        .finish()
        .await;
    assert_eq!(done["tensors_verified"].as_u64().unwrap() as usize, N);

    // A plain client with gRPC's default 4 MiB limit (as grpcurl has) reads the same lease
    // page by page: AttachWorker answers the first 10,000 rows, GetLeaseTensors the rest.
    let lease =
        f.c.attach_worker(offloadd::proto::AttachWorkerRequest {
            model: "moe".into(),
            worker_name: "plain".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.tensors.len(), 10_000);
    let names: std::collections::HashSet<String> = common::pages::lease_rows(&mut f.c, &lease, 0)
        .await
        .into_iter()
        .map(|t| t.name)
        .collect();
    let page = |token: String| offloadd::proto::GetLeaseTensorsRequest {
        lease_id: lease.lease_id.clone(),
        page_size: 0,
        page_token: token,
    };
    assert_eq!(names.len(), N, "every row once");
    let e = f.c.get_lease_tensors(page("x".into())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    f.c.detach_worker(offloadd::proto::DetachWorkerRequest {
        lease_id: lease.lease_id.clone(),
    })
    .await
    .unwrap();
    let e = f.c.get_lease_tensors(page("0".into())).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "the lease has ended");
    assert!(f.d.terminate().await.success());
}

/// Onloads of one lease arrive on several threads at once (each fast-path connection has a
/// daemon thread of its own). Two layers that share the one static slot, onloaded at the same
/// moment from two connections, round after round, must leave the slot holding one layer
/// whole, never a mix of both.
#[tokio::test]
async fn concurrent_onloads_into_one_slot_leave_one_layer_whole() {
    use offloadd::fast::client::FastClient;
    use offloadd::worker::Worker;
    const ROUNDS: usize = 50;
    // Layers of about 30 MB, copied by more threads than this machine has CPUs, so that copies
    // overlap and the scheduler preempts them midway.
    let llama = common::ckpt::llama(3, 1024, 256);
    let mut f = fixture_of(&llama, "m.safetensors", 128 << 20, |b| b).await;
    // Every layer offloaded, one slot: layers 1 and 2 both land in slot 0.
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 1)).await;
    let w = Worker::attach(f.d.channel().await, "m", "race", 60_000)
        .await
        .unwrap();
    let layer = |l: u32| -> Vec<_> { w.layer_tensors(l, Placement::Prefetch).cloned().collect() };
    let (one, two) = (layer(1), layer(2));
    assert!(!one.is_empty() && one.len() == two.len());
    let whole = |ts: &[offloadd::proto::LeaseTensor]| {
        ts.iter()
            .all(|t| Worker::verify(t, &w.static_bytes(t).unwrap(), "slot").is_ok())
    };
    for round in 0..ROUNDS {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = [1u32, 2, 1, 2]
            .into_iter()
            .map(|l| {
                let (uds, id, barrier) =
                    (f.d.uds.clone(), w.lease.lease_id.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut c = FastClient::connect(&uds, &id).unwrap().unwrap();
                    barrier.wait();
                    assert_eq!(c.onload(l).unwrap().code, 0);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            whole(&one) || whole(&two),
            "round {round}: the slot holds parts of both layers"
        );
    }
    w.detach().await.unwrap();
    assert!(f.d.terminate().await.success());
}
