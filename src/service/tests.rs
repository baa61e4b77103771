//! The service's orchestration, in-process: registration and its waiter, undo of leases whose
//! id never reaches a caller, onloads and their metrics, pools. A real core over real files
//! and shared memory (`core::testing`); only the transport is left out.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use super::{FastSession, OnloadRequest, Service, ServiceError};
use crate::core::backend::{BackendConfig, PrefetchConfig};
use crate::core::crc;
use crate::core::leases::{AttachRequest, LeaseError};
use crate::core::models::model::{Model, ModelState};
use crate::core::models::{ModelError, RegisterRequest};
use crate::core::pools::{NewPool, PoolError};
use crate::core::testing::{Fixture, Written};
use crate::metrics::Metrics;

struct Harness {
    f: Fixture,
    svc: Service,
}

/// A started core with one 8 MiB cpu pool "p".
async fn harness(tune: impl FnOnce(&mut crate::config::Config)) -> Harness {
    let f = Fixture::new();
    let mut config = f.config();
    tune(&mut config);
    let core = f.build(config).start().expect("start");
    let svc = Service::new(core, Arc::new(Metrics::new()));
    svc.create_pool(NewPool {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 8 << 20,
    })
    .await
    .expect("create pool");
    Harness { f, svc }
}

fn request(name: &str, path: PathBuf, backend: Option<BackendConfig>) -> RegisterRequest {
    RegisterRequest {
        name: name.into(),
        pool: "p".into(),
        path,
        backend,
    }
}

/// Every layer offloaded into one static slot.
fn prefetch() -> Option<BackendConfig> {
    Some(BackendConfig::Prefetch(PrefetchConfig {
        group_size: 1,
        num_in_group: 1,
        prefetch_step: 1,
        params: Vec::new(),
    }))
}

/// The pool holds each tensor's bytes where the table says.
fn assert_bytes_in_pool(model: &Model, written: &Written) {
    let tensors = model.tensors();
    assert_eq!(tensors.len(), written.len());
    for (name, data) in written {
        let t = tensors.iter().find(|t| &t.name == name).expect("tensor");
        let got = crc::CrcBuffer::default().checksum(model.pool().region(), t.offset, t.len);
        assert_eq!(got, crc::crc32c(data), "tensor {name}");
        assert_eq!(t.crc32c, Some(got), "tensor {name}: the table's checksum");
    }
}

fn used(h: &Harness) -> u64 {
    h.svc.core().pools.get("p").unwrap().used_bytes()
}

#[tokio::test]
async fn register_with_wait_answers_ready_with_the_checkpoints_bytes() {
    let h = harness(|_| {}).await;
    let (path, written) = h.f.checkpoint("m", 3, 1024);
    let (state, model) = h
        .svc
        .register(request("m", path, None), true, |m| {
            (m.state(), h.svc.model(&m.name).unwrap())
        })
        .await
        .unwrap();
    assert_eq!(state, ModelState::Ready);
    assert_bytes_in_pool(&model, &written);
    assert_eq!(used(&h), model.bytes);
}

#[tokio::test]
async fn register_without_wait_answers_before_the_load_starts() {
    let h = harness(|_| {}).await;
    let (path, written) = h.f.checkpoint("m", 2, 1024);
    let state = h
        .svc
        .register(request("m", path, None), false, |m| m.progress())
        .await
        .unwrap();
    assert_eq!(state.state, ModelState::Loading);
    assert_eq!(state.loaded_bytes, 0);
    let mut rx = h.svc.watch("m").unwrap();
    let p = rx.wait_for(|p| p.is_terminal()).await.unwrap().clone();
    assert_eq!(p.state, ModelState::Ready, "{:?}", p.error);
    assert_bytes_in_pool(&h.svc.model("m").unwrap(), &written);
}

#[tokio::test]
async fn a_refused_registration_leaves_nothing_behind() {
    let h = harness(|_| {}).await;
    let outside = h.f.dir.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    let err = h
        .svc
        .register(request("m", outside, None), true, |_| ())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ServiceError::Model(ModelError::OutsideRoots { .. })),
        "{err:?}"
    );
    assert!(h.svc.models().is_empty());
    assert_eq!(used(&h), 0);
}

/// An UnregisterModel during a waited-for load: the waiter learns it was cancelled, and the
/// pool's bytes are back when the unregister returns, not when the waiter next runs.
#[tokio::test]
async fn unregister_during_a_waited_load_cancels_it_and_frees_the_pool() {
    // 64 KiB/s against 2.1 MiB: the load lasts half a minute unless cancelled.
    let h = harness(|c| c.models.max_load_bytes_per_sec = 64 << 10).await;
    let (path, _) = h.f.checkpoint("m", 4, 64 << 10);
    let svc = h.svc.clone();
    let waiter =
        tokio::spawn(async move { svc.register(request("m", path, None), true, |_| ()).await });
    let mut rx = loop {
        // The waiter registers on another task; the watch exists once the model does.
        match h.svc.watch("m") {
            Ok(rx) => break rx,
            Err(_) => tokio::task::yield_now().await,
        }
    };
    rx.wait_for(|p| p.loaded_bytes > 0).await.unwrap();
    let removed = h.svc.unregister("m".into()).await.unwrap();
    assert_eq!(Arc::strong_count(&removed), 1, "no waiter holds the model");
    drop(removed);
    assert_eq!(used(&h), 0, "the ranges are back when unregister returns");
    let err = waiter.await.unwrap().unwrap_err();
    assert!(
        matches!(err, ServiceError::Model(ModelError::Cancelled(_))),
        "{err:?}"
    );
}

fn attach_request(model: &str) -> AttachRequest {
    AttachRequest {
        model: model.into(),
        worker_name: "w".into(),
        ttl: None,
        end_with_fast_path: false,
    }
}

async fn ready(h: &Harness, name: &str, layers: u32) -> Written {
    let (path, written) = h.f.checkpoint(name, layers, 1024);
    h.svc
        .register(request(name, path, prefetch()), true, |_| ())
        .await
        .unwrap();
    written
}

#[tokio::test]
async fn a_lease_whose_answer_is_refused_ends_at_once() {
    let h = harness(|_| {}).await;
    ready(&h, "m", 2).await;
    let err = h
        .svc
        .attach(attach_request("m"), |_| {
            Err::<(), _>(ServiceError::from(LeaseError::ReplyTooLarge {
                size: 9,
                max: 1,
            }))
        })
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ServiceError::Lease(LeaseError::ReplyTooLarge { .. })
    ));
    assert_eq!(h.svc.core().leases.count(), 0);
    assert_eq!(h.svc.model("m").unwrap().attached_workers(), 0);
}

/// Dropped once the undo has run: the answer is handed to it, and dropped after it.
#[derive(Debug)]
struct Dropped(mpsc::Sender<()>);

impl Drop for Dropped {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// A caller that goes away while its lease is being made (a deadline, a cancel) must not leave
/// the lease holding statics for its whole ttl.
#[tokio::test]
async fn a_lease_made_for_a_caller_that_went_away_ends() {
    let h = harness(|_| {}).await;
    ready(&h, "m", 2).await;
    let (entered_tx, entered) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let (dropped_tx, dropped) = mpsc::channel();
    let svc = h.svc.clone();
    let call = tokio::spawn(async move {
        svc.attach(attach_request("m"), move |_| {
            entered_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            Ok::<_, ServiceError>(Dropped(dropped_tx))
        })
        .await
    });
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(
        h.svc.core().leases.count(),
        1,
        "the lease exists while made"
    );
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    go.send(()).unwrap();
    tokio::task::spawn_blocking(move || dropped.recv_timeout(Duration::from_secs(30)).unwrap())
        .await
        .unwrap();
    assert_eq!(h.svc.core().leases.count(), 0, "undone");
    assert_eq!(h.svc.model("m").unwrap().attached_workers(), 0);
}

#[tokio::test]
async fn onload_copies_the_layer_and_counts_it_for_rpc_and_fast_path() {
    let h = harness(|_| {}).await;
    let written = ready(&h, "m", 3).await;
    let lease = h
        .svc
        .attach(attach_request("m"), |l| {
            Ok::<_, ServiceError>(Arc::clone(l))
        })
        .await
        .unwrap();
    let req = |layer| OnloadRequest {
        layer,
        async_copy: false,
        slot_free: None,
    };
    let done = h.svc.onload(&lease.id, req(1)).await.unwrap();
    let layer_bytes: Vec<&Vec<u8>> = written
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.1."))
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        done.bytes,
        layer_bytes.iter().map(|d| d.len() as u64).sum::<u64>()
    );
    let file = std::fs::read(lease.statics.as_ref().unwrap().path().unwrap()).unwrap();
    for d in layer_bytes {
        assert!(
            file.windows(d.len()).any(|w| w == d.as_slice()),
            "the static slot holds the layer"
        );
    }

    // The fast path: the same copy, counted in the same metric, and its connection ends with
    // the session.
    let (conn, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut session = FastSession::open(&h.svc, &lease.id, &conn).unwrap();
    assert_eq!(lease.connection_count(), 1);
    let fast = session.onload(&req(2)).unwrap();
    assert_eq!(fast.bytes, done.bytes);
    drop(session);
    assert_eq!(lease.connection_count(), 0);
    let text = h.svc.metrics().render(h.svc.core());
    let counted = text
        .lines()
        .find(|l| l.starts_with("offloadd_onload_bytes_total"))
        .expect("onload bytes metric");
    assert!(
        counted.ends_with(&format!(" {}", done.bytes + fast.bytes)),
        "{counted}"
    );

    let err = h
        .svc
        .onload(
            &lease.id,
            OnloadRequest {
                layer: 1,
                async_copy: false,
                slot_free: Some(vec![0; 64]),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ServiceError::Lease(LeaseError::SlotFreeWithoutAsync)
    ));
    h.svc.detach(lease.id.clone()).await.unwrap();
    let err = FastSession::open(&h.svc, &lease.id, &conn).unwrap_err();
    assert!(matches!(err, ServiceError::Lease(LeaseError::NotFound(_))));
}

#[tokio::test]
async fn pools_are_refused_while_used_and_deleted_when_idle() {
    let h = harness(|_| {}).await;
    let view = h.svc.pool("p".into()).await.unwrap();
    assert_eq!((view.pool.size_bytes, view.registered_bytes), (8 << 20, 0));
    ready(&h, "m", 1).await;
    let err = h.svc.delete_pool("p".into(), |_| ()).await.unwrap_err();
    assert!(
        matches!(err, ServiceError::Pool(PoolError::InUse { .. })),
        "{err:?}"
    );
    h.svc.unregister("m".into()).await.unwrap();
    let size = h
        .svc
        .delete_pool("p".into(), |v| v.pool.size_bytes)
        .await
        .unwrap();
    assert_eq!(size, 8 << 20);
    assert!(h.svc.pools().await.unwrap().is_empty());
    assert_eq!(h.svc.core().pools.committed(), 0);
}

async fn lease(
    h: &Harness,
    req: AttachRequest,
) -> Result<Arc<crate::core::leases::Lease>, ServiceError> {
    h.svc
        .attach(req, |l| Ok::<_, ServiceError>(Arc::clone(l)))
        .await
}

#[tokio::test]
async fn an_expired_lease_is_reaped_and_a_renewed_one_is_not() {
    let h = harness(|_| {}).await;
    ready(&h, "m", 1).await;
    let ttl = Duration::from_secs(5);
    let short = lease(
        &h,
        AttachRequest {
            ttl: Some(ttl),
            ..attach_request("m")
        },
    )
    .await
    .unwrap();
    let long = lease(
        &h,
        AttachRequest {
            ttl: Some(ttl * 4),
            ..attach_request("m")
        },
    )
    .await
    .unwrap();
    let leases = &h.svc.core().leases;
    // The reaper's clock, moved past the short lease's end: no waiting for real time.
    leases.reap(std::time::Instant::now() + ttl * 2);
    assert!(matches!(
        h.svc.keep_alive(&short.id).unwrap_err(),
        ServiceError::Lease(LeaseError::NotFound(_))
    ));
    assert_eq!(h.svc.keep_alive(&long.id).unwrap().id, long.id);
    assert_eq!(h.svc.model("m").unwrap().attached_workers(), 1);
}

#[tokio::test]
async fn a_lease_tied_to_the_fast_path_ends_with_its_last_connection() {
    let h = harness(|_| {}).await;
    ready(&h, "m", 1).await;
    let l = lease(
        &h,
        AttachRequest {
            end_with_fast_path: true,
            ..attach_request("m")
        },
    )
    .await
    .unwrap();
    let (a, _pa) = std::os::unix::net::UnixStream::pair().unwrap();
    let (b, _pb) = std::os::unix::net::UnixStream::pair().unwrap();
    let first = FastSession::open(&h.svc, &l.id, &a).unwrap();
    let second = FastSession::open(&h.svc, &l.id, &b).unwrap();
    drop(first);
    assert_eq!(
        h.svc.core().leases.count(),
        1,
        "one connection is still open"
    );
    drop(second);
    assert_eq!(h.svc.core().leases.count(), 0);
    assert_eq!(h.svc.model("m").unwrap().attached_workers(), 0);
}

#[tokio::test]
async fn leases_past_the_per_model_cap_are_refused_and_hold_nothing() {
    let h = harness(|c| c.leases.max_per_model = 1).await;
    ready(&h, "m", 1).await;
    lease(&h, attach_request("m")).await.unwrap();
    let err = lease(&h, attach_request("m")).await.unwrap_err();
    assert!(
        matches!(err, ServiceError::Lease(LeaseError::TooMany { .. })),
        "{err:?}"
    );
    assert_eq!(h.svc.core().leases.count(), 1);
    assert_eq!(h.svc.model("m").unwrap().attached_workers(), 1);
}
