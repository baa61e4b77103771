//! Mixture-of-experts scale: checkpoints of 1k to 200k tensors of 4 KiB, registered, attached
//! and listed through the real daemon. RegisterModel is compared with the bound measured in the
//! same run on the same file: a parallel chunked `pread` of it into pre-faulted shared memory.
//! So is the load inside it (the model's `load_seconds`: reading and checksumming the bytes,
//! without parsing the header before or journaling the table after).
//! Per-tensor costs show whether each step grows linearly. GetModel is the whole table, read
//! page by page (10,000 tensors each).
//!
//! Bound and RegisterModel alternate over several rounds, and each ratio is printed as min /
//! median / max, beside the CPU seconds each side spent (median). Each round also prints the
//! daemon's minor page faults during RegisterModel: on a VM that hands free memory back to its
//! host, memory the daemon touches for the first time is slow, and a round that faults shows why
//! it was slow.
//!
//! `cargo bench --bench tensors` (OFFLOADD_BENCH_TENSORS=1000,10000 picks the sizes,
//! OFFLOADD_BENCH_ROUNDS the rounds, default 5; OFFLOADD_BENCH_SHARDS=64 spreads the tensors
//! over that many files behind an index, as a sharded checkpoint ships them).

mod common;

use std::time::Instant;

use offloadd::parts::HostRegion;
use offloadd::proto::{
    CreatePoolRequest, DeletePoolRequest, DetachWorkerRequest, RegisterModelRequest,
    UnregisterModelRequest,
};

const TENSOR_BYTES: usize = 4096;

/// One round's figures: the bounds and the registration, measured back to back.
struct Round {
    bound: f64,
    crc_bound: f64,
    bound_cpu: f64,
    register: f64,
    register_cpu: f64,
    load: f64,
}

struct Row {
    n: usize,
    rounds: Vec<Round>,
    attach: f64,
    get_model: f64,
}

fn main() {
    let sizes: Vec<usize> = std::env::var("OFFLOADD_BENCH_TENSORS")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().parse().unwrap()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000, 200_000]);
    let rounds: usize = std::env::var("OFFLOADD_BENCH_ROUNDS")
        .ok()
        .map_or(5, |v| v.parse().unwrap());
    let shards: usize = std::env::var("OFFLOADD_BENCH_SHARDS")
        .ok()
        .map_or(1, |v| v.parse().unwrap());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let me = std::process::id();
    let work = tempfile::tempdir().unwrap();
    let shm = common::shm_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut child, channel) = rt.block_on(common::start_daemon(
        &work.path().join("offloadd.sock"),
        &shm.path().join("pools"),
        work.path(),
    ));
    let pid = child.id().unwrap();
    let mut c = offloadd::client::offload(channel);
    let mut rows = Vec::new();
    for &n in &sizes {
        let (path, files) = if shards > 1 {
            let dir = work.path().join(format!("experts-{n}"));
            let files = common::write_moe_checkpoint_sharded(&dir, n, TENSOR_BYTES, shards);
            (dir, files)
        } else {
            let path = work.path().join(format!("experts-{n}.safetensors"));
            common::write_moe_checkpoint(&path, n, TENSOR_BYTES);
            (path.clone(), vec![path])
        };
        let bytes: u64 = files
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .sum();
        // The page cache is warm (just written): both sides read from it.
        let region = HostRegion::create(&shm.path().join("bound"), bytes).unwrap();
        region.prefault(threads).unwrap();
        let row = rt.block_on(async {
            // Each tensor's range is rounded up to 256 bytes: 4 KiB tensors waste none.
            c.create_pool(CreatePoolRequest {
                name: "p".into(),
                device: "cpu".into(),
                size_bytes: (n * TENSOR_BYTES) as u64 + (1 << 20),
            })
            .await
            .unwrap();
            // Bound and contender alternate, so a noisy neighbour hits both sides of a ratio.
            let mut measured = Vec::new();
            for _ in 0..rounds {
                let cpu0 = common::cpu_time(me);
                let bound = common::pread_bound(&files, &region, threads);
                let bound_cpu = (common::cpu_time(me) - cpu0).as_secs_f64();
                let crc_bound = common::pread_bound_with(&files, &region, threads, true);
                let cpu0 = common::cpu_time(pid);
                let faults0 = common::minor_faults(pid);
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
                let register = t.elapsed().as_secs_f64();
                let register_cpu = (common::cpu_time(pid) - cpu0).as_secs_f64();
                let faults = common::minor_faults(pid) - faults0;
                println!(
                    "{n} tensors, round {}: bound {bound:.3} s ({bound_cpu:.3} CPU-s), with CRC32C \
                     {crc_bound:.3} s; RegisterModel {register:.3} s ({register_cpu:.3} CPU-s), \
                     its load {:.3} s, {faults} page faults",
                    measured.len() + 1,
                    m.load_seconds
                );
                measured.push(Round {
                    bound,
                    crc_bound,
                    bound_cpu,
                    register,
                    register_cpu,
                    load: m.load_seconds,
                });
                if measured.len() < rounds {
                    c.unregister_model(UnregisterModelRequest { name: "m".into() })
                        .await
                        .unwrap();
                }
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
                rounds: measured,
                attach,
                get_model,
            }
        });
        region.unlink().unwrap();
        drop(region);
        if shards > 1 {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
        rows.push(row);
    }
    rt.block_on(child.kill()).unwrap();
    println!(
        "tensors of {TENSOR_BYTES} bytes, {threads} threads, {rounds} rounds of bound then \
         RegisterModel; ratios are bound / daemon, min / median / max"
    );
    println!(
        "{:>8} | {:>8} {:>18} {:>18} {:>18} | {:>15} | {:>8} {:>6} | {:>8} {:>6}",
        "tensors",
        "register",
        "vs pread",
        "vs pread+CRC",
        "load vs pread",
        "CPU-s bound/us",
        "attach",
        "µs/t",
        "GetModel",
        "µs/t"
    );
    for r in rows {
        let per = |s: f64| s / r.n as f64 * 1e6;
        let ratio = |f: &dyn Fn(&Round) -> f64| {
            let (lo, mid, hi) = common::spread(&r.rounds.iter().map(f).collect::<Vec<_>>());
            format!("{lo:.2} / {mid:.2} / {hi:.2}")
        };
        let median = |f: &dyn Fn(&Round) -> f64| {
            common::spread(&r.rounds.iter().map(f).collect::<Vec<_>>()).1
        };
        println!(
            "{:>8} | {:>7.3}s {:>18} {:>18} {:>18} | {:>6.3} / {:>6.3} | {:>7.3}s {:>6.2} | {:>7.3}s {:>6.2}",
            r.n,
            median(&|x| x.register),
            ratio(&|x| x.bound / x.register),
            ratio(&|x| x.crc_bound / x.register),
            ratio(&|x| x.bound / x.load),
            median(&|x| x.bound_cpu),
            median(&|x| x.register_cpu),
            r.attach,
            per(r.attach),
            r.get_model,
            per(r.get_model)
        );
    }
}
