//! Big tensor tables must not stall the control plane (issue #15): GetInfo latency from a prober
//! every 5 ms while one client loops GetModel with the tensors of a 100k-tensor model and
//! another loops AttachWorker / DetachWorker on it (a 100k-row lease each time), against the
//! same prober on the idle daemon in the same run.
//!
//! `cargo bench --bench tables` (`TABLES_SECONDS`, default 20).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use offloadd::proto::{CreatePoolRequest, DetachWorkerRequest, RegisterModelRequest};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const TENSORS: usize = 100_000;

async fn probe_for(uds: &std::path::Path, length: Duration) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let p = common::prober(uds.to_path_buf(), stop.clone());
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    p.join().unwrap()
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("TABLES_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let data: Vec<[u8; 4]> = (0..TENSORS as u32).map(|i| i.to_le_bytes()).collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                format!("model.layers.{}.mlp.experts.{}.w", i / 1000, i % 1000),
                TensorView::new(Dtype::U8, vec![4], d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("moe.safetensors")).unwrap();
    let uds = dir.path().join("offloadd.sock");
    let (_child, channel) = common::start_daemon(&uds, shm.path(), dir.path()).await;
    let mut c = offloadd::client::offload(channel.clone());
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 64 << 20,
    })
    .await
    .unwrap();
    c.register_model(RegisterModelRequest {
        name: "moe".into(),
        pool: "p".into(),
        path: dir.path().join("moe.safetensors").display().to_string(),
        wait: true,
        backend: None,
    })
    .await
    .unwrap();

    let idle = probe_for(&uds, Duration::from_secs(seconds / 4)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (tables, leases) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let getter = {
        let (stop, n, mut c) = (stop.clone(), tables.clone(), c.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // The whole table, page by page, as a client reads it.
                let tensors = common::all_tensors(&mut c, "moe").await;
                assert_eq!(tensors.len(), TENSORS);
                n.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let attacher = {
        let (stop, n) = (stop.clone(), leases.clone());
        let mut c = offloadd::client::offload(offloadd::client::connect_uds(&uds).await.unwrap());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let lease = common::attach_all(&mut c, "moe").await;
                c.detach_worker(DetachWorkerRequest {
                    lease_id: lease.lease_id,
                })
                .await
                .unwrap();
                n.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let loaded = probe_for(&uds, Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    getter.await.unwrap();
    attacher.await.unwrap();
    println!(
        "{TENSORS}-tensor model, {seconds} s: {} GetModel with tensors and {} attach/detach ({:.1} tables/s)",
        tables.load(Ordering::Relaxed),
        leases.load(Ordering::Relaxed),
        (tables.load(Ordering::Relaxed) + leases.load(Ordering::Relaxed)) as f64 / seconds as f64
    );
    println!(
        "GetInfo from a 5 ms prober: idle p50 {:?} p99 {:?}; under the table load p50 {:?} p99 {:?} (target p99 <= 2 ms)",
        common::pct(&idle, 0.5),
        common::pct(&idle, 0.99),
        common::pct(&loaded, 0.5),
        common::pct(&loaded, 0.99),
    );
}
