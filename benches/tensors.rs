//! Mixture-of-experts scale: checkpoints of 1k to 200k tensors of 4 KiB, registered, attached
//! and listed through the real daemon. RegisterModel is compared with the bound measured in the
//! same run on the same file: a parallel chunked `pread` of it into pre-faulted shared memory.
//! So is the load inside it (the model's `load_seconds`: reading and checksumming the bytes,
//! without parsing the header before or journaling the table after).
//! Per-tensor costs show whether each step grows linearly. GetModel is the whole table, read
//! page by page (10,000 tensors each).
//!
//! `cargo bench --bench tensors` (OFFLOADD_BENCH_TENSORS=1000,10000 picks the sizes).

mod common;

use std::time::Instant;

use offloadd::parts::HostRegion;
use offloadd::proto::{
    CreatePoolRequest, DeletePoolRequest, DetachWorkerRequest, RegisterModelRequest,
    UnregisterModelRequest,
};

const TENSOR_BYTES: usize = 4096;
const ROUNDS: usize = 2;

struct Row {
    n: usize,
    register: f64,
    load: f64,
    bound: f64,
    attach: f64,
    get_model: f64,
}

fn main() {
    let sizes: Vec<usize> = std::env::var("OFFLOADD_BENCH_TENSORS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000, 200_000]);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let work = tempfile::tempdir().unwrap();
    let shm = common::shm_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut child, channel) = rt.block_on(common::start_daemon(
        &work.path().join("offloadd.sock"),
        &shm.path().join("pools"),
        work.path(),
    ));
    let mut c = offloadd::client::offload(channel);
    let mut rows = Vec::new();
    for &n in &sizes {
        let path = work.path().join(format!("experts-{n}.safetensors"));
        common::write_moe_checkpoint(&path, n, TENSOR_BYTES);
        let bytes = std::fs::metadata(&path).unwrap().len();
        // The page cache is warm (just written): both sides read from it.
        let region = HostRegion::create(&shm.path().join("bound"), bytes).unwrap();
        region.prefault(threads).unwrap();
        let files = [path.clone()];
        let bound = (0..ROUNDS)
            .map(|_| common::pread_bound(&files, &region, threads))
            .fold(f64::MAX, f64::min);
        region.unlink().unwrap();
        drop(region);
        let row = rt.block_on(async {
            // Each tensor's range is rounded up to 256 bytes: 4 KiB tensors waste none.
            c.create_pool(CreatePoolRequest {
                name: "p".into(),
                device: "cpu".into(),
                size_bytes: (n * TENSOR_BYTES) as u64 + (1 << 20),
            })
            .await
            .unwrap();
            let mut register = f64::MAX;
            let mut load = f64::MAX;
            for round in 0..ROUNDS {
                if round > 0 {
                    c.unregister_model(UnregisterModelRequest { name: "m".into() })
                        .await
                        .unwrap();
                }
                let t = Instant::now();
                let m = c
                    .register_model(RegisterModelRequest {
                        name: "m".into(),
                        pool: "p".into(),
                        path: path.display().to_string(),
                        wait: true,
                        backend: None,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                register = register.min(t.elapsed().as_secs_f64());
                load = load.min(m.load_seconds);
            }
            let t = Instant::now();
            let lease = common::attach_all(&mut c, "m").await;
            let attach = t.elapsed().as_secs_f64();
            assert_eq!(lease.tensors.len(), n);
            c.detach_worker(DetachWorkerRequest {
                lease_id: lease.lease_id,
            })
            .await
            .unwrap();
            let t = Instant::now();
            let tensors = common::all_tensors(&mut c, "m").await;
            let get_model = t.elapsed().as_secs_f64();
            assert_eq!(tensors.len(), n);
            c.unregister_model(UnregisterModelRequest { name: "m".into() })
                .await
                .unwrap();
            c.delete_pool(DeletePoolRequest { name: "p".into() })
                .await
                .unwrap();
            Row {
                n,
                register,
                load,
                bound,
                attach,
                get_model,
            }
        });
        std::fs::remove_file(&path).unwrap();
        rows.push(row);
    }
    rt.block_on(child.kill()).unwrap();
    println!("tensors of {TENSOR_BYTES} bytes, {threads} threads, best of {ROUNDS}");
    println!(
        "{:>8} | {:>9} {:>8} {:>9} {:>6} | {:>9} {:>6} | {:>9} {:>8} | {:>9} {:>8}",
        "tensors",
        "register",
        "µs/t",
        "bound",
        "ratio",
        "load",
        "ratio",
        "attach",
        "µs/t",
        "GetModel",
        "µs/t"
    );
    for r in rows {
        let per = |s: f64| s / r.n as f64 * 1e6;
        println!(
            "{:>8} | {:>8.3}s {:>8.2} {:>8.3}s {:>6.2} | {:>8.3}s {:>6.2} | {:>8.3}s {:>8.2} | {:>8.3}s {:>8.2}",
            r.n,
            r.register,
            per(r.register),
            r.bound,
            r.bound / r.register,
            r.load,
            r.bound / r.load,
            r.attach,
            per(r.attach),
            r.get_model,
            per(r.get_model)
        );
    }
}
