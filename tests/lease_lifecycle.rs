//! How leases end and what they may hold: the per-device static budget, the files a SIGTERM
//! leaves (no static buffer), leases tied to their fast-path connection, and an attach whose
//! caller gave up.

mod common;

use std::path::Path;

use common::workers::*;
use offloadd::proto::{AttachWorkerRequest, DetachWorkerRequest};
use tonic::Code;

#[tokio::test]
async fn static_buffers_per_device_are_budgeted_and_returned_on_detach() {
    // One lease's static buffers, measured on a daemon without the limit.
    let mut f = fixture(|b| b).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let one = attach(&mut f.c, "m", "probe").await.segments[1].size_bytes;
    assert!(f.d.terminate().await.success());

    // Room for one and a half: the second lease is refused with the numbers, and fits again
    // once the first is detached.
    let limit = one + one / 2;
    let mut f = fixture(|b| b.set(&format!("leases.max_static_bytes_per_device={limit}"))).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let first = attach(&mut f.c, "m", "first").await;
    let e =
        f.c.attach_worker(AttachWorkerRequest {
            model: "m".into(),
            worker_name: "second".into(),
            ttl_ms: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    for part in [
        "device cpu",
        &one.to_string(),
        &limit.to_string(),
        "leases.max_static_bytes_per_device",
    ] {
        assert!(e.message().contains(part), "{part:?} in {}", e.message());
    }
    f.c.detach_worker(DetachWorkerRequest {
        lease_id: first.lease_id,
    })
    .await
    .unwrap();
    attach(&mut f.c, "m", "second").await;
    assert!(f.d.terminate().await.success());
}

#[tokio::test]
async fn sigterm_keeps_pools_and_journal_but_no_static_file() {
    let mut f = fixture(|b| b).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    attach(&mut f.c, "m", "w").await;
    let ours = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("offloadd-"))
            .collect()
    };
    let before = ours(&f.s.pools_dir());
    assert!(
        before.iter().any(|n| n.starts_with("offloadd-pool-"))
            && before.iter().any(|n| n.starts_with("offloadd-static-")),
        "{before:?}"
    );
    assert!(f.d.terminate().await.success());
    // Leases never survive a restart, so static buffers would only hold host memory; the pool
    // and the journal stay for the next start to adopt (pools.keep_on_exit, the default).
    let mut after = ours(&f.s.pools_dir());
    after.sort();
    assert_eq!(after, vec!["offloadd-journal", "offloadd-pool-p"]);
}

#[tokio::test]
async fn a_lease_tied_to_the_fast_path_ends_when_its_connection_closes() {
    use offloadd::fast::client::FastClient;
    let mut f = fixture(|b| b.set("metrics.addr=127.0.0.1:0")).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let attach_tied = |tied: bool, name: &str| AttachWorkerRequest {
        model: "m".into(),
        worker_name: name.into(),
        ttl_ms: 600_000,
        end_with_fast_path: tied,
        page_size: 0,
    };
    let tied =
        f.c.attach_worker(attach_tied(true, "tied"))
            .await
            .unwrap()
            .into_inner();
    let untied =
        f.c.attach_worker(attach_tied(false, "untied"))
            .await
            .unwrap()
            .into_inner();
    // Two connections: the lease lives while either is open.
    let mut a = FastClient::connect(&f.d.uds, &tied.lease_id)
        .unwrap()
        .unwrap();
    let b = FastClient::connect(&f.d.uds, &tied.lease_id)
        .unwrap()
        .unwrap();
    let u = FastClient::connect(&f.d.uds, &untied.lease_id)
        .unwrap()
        .unwrap();
    drop(b);
    assert!(
        a.onload(0).unwrap().bytes > 0,
        "still served with one connection open"
    );
    let started = std::time::Instant::now();
    drop(a); // the worker process died: its socket closes
    let ended =
        f.d.wait_for_log(|v| v["message"] == "lease ended" && v["worker"] == "tied")
            .await;
    assert_eq!(ended["reason"], "FastPathClosed");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "not the 600 s ttl"
    );
    assert_eq!(attached_workers(&mut f.c, "m").await, 1);
    // A lease that did not ask for it outlives its connection: once the daemon has seen every
    // connection close (the fast_connections gauge), it still answers.
    drop(u);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while fast_connections(f.d.metrics.unwrap()).await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "connections never closed"
        );
        tokio::task::yield_now().await;
    }
    f.c.keep_alive(offloadd::proto::KeepAliveRequest {
        lease_id: untied.lease_id,
    })
    .await
    .unwrap();
    let e =
        f.c.keep_alive(offloadd::proto::KeepAliveRequest {
            lease_id: tied.lease_id,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(f.d.terminate().await.success());
}

async fn fast_connections(addr: std::net::SocketAddr) -> f64 {
    common::sample(&common::scrape(addr).await, "offloadd_fast_connections ")
}

/// A caller that gives up on AttachWorker (its deadline passes while the daemon builds the
/// first lease table of a 200k-tensor model) never learns the lease's id, so it could neither
/// use nor detach it. The lease ends as soon as it is made, instead of holding the model for
/// its 600 s ttl and blocking SetBackend.
#[tokio::test]
async fn an_attach_whose_caller_gave_up_leaves_no_lease() {
    let mut f = moe_fixture(200_000).await;

    let mut impatient = tonic::Request::new(AttachWorkerRequest {
        model: "moe".into(),
        worker_name: "impatient".into(),
        ttl_ms: 600_000,
        ..Default::default()
    });
    // Long enough for the daemon to have taken the call on a busy machine, and a quarter of
    // the 370 ms that building this lease table takes in a debug build.
    impatient.set_timeout(std::time::Duration::from_millis(100));
    let e = f.c.attach_worker(impatient).await.unwrap_err();
    // The client's own timer or the daemon's (grpc-timeout), whichever fires first.
    assert!(
        matches!(e.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{e:?}"
    );
    let ended =
        f.d.wait_for_log(|v| v["message"] == "lease ended" && v["worker"] == "impatient")
            .await;
    assert_eq!(ended["reason"], "Undelivered");
    assert_eq!(attached_workers(&mut f.c, "moe").await, 0);
    f.c.set_backend(offloadd::proto::SetBackendRequest {
        model: "moe".into(),
        backend: Some(offloadd::proto::UvaConfig::default().into()),
    })
    .await
    .unwrap();
    // A caller that waits gets its lease, and the table built meanwhile.
    let lease = attach(&mut f.c, "moe", "patient").await;
    assert_eq!(lease.tensors.len(), 10_000);
    assert!(f.d.terminate().await.success());
}
