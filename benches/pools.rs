//! Pool creation (create + pre-fault + pin) against a plain memset of freshly mapped memory of
//! the same size, in the same run; and host memory used per pool byte.
//!
//! `cargo bench --bench pools` (OFFLOADD_BENCH_POOL_MIB sets the size, default 1024).

use std::sync::Arc;
use std::time::Instant;

use offloadd::config::PinConfig;
use offloadd::parts::{CpuDevice, meminfo_bytes};
use offloadd::parts::{Device, Devices};
use offloadd::parts::{NewPool, Pools, PoolsParams};
use offloadd::vllm_env::VllmEnv;

const ROUNDS: usize = 3;

fn main() {
    let mib: u64 = std::env::var("OFFLOADD_BENCH_POOL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let dir = tempfile::Builder::new()
        .prefix("offloadd-bench-")
        .tempdir_in("/dev/shm")
        .expect("tempdir in /dev/shm");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let devices: Vec<Arc<dyn Device>> = vec![Arc::new(CpuDevice::new())];
    let pools = Pools::open(PoolsParams {
        dir: dir.path().to_path_buf(),
        journal: offloadd::parts::Journal::new(dir.path(), false),
        budget: u64::MAX,
        devices: Devices::new(devices),
        env: VllmEnv::default(),
        pin: PinConfig::default(),
        prefault_threads: 0,
    })
    .expect("open pools");

    let mut memset_best = f64::MAX;
    let mut par_memset_best = f64::MAX;
    let mut create_best = f64::MAX;
    let mut pinned = false;
    let mut used_per_byte = 0.0;
    for round in 0..ROUNDS {
        // Baseline: fresh anonymous memory, filled once (page faults included), single thread,
        // as `torch.empty(...).zero_()` or a naive loader would.
        let t = Instant::now();
        let mut v: Vec<u8> = Vec::with_capacity(size as usize);
        v.resize(size as usize, 0xA5);
        std::hint::black_box(&v);
        memset_best = memset_best.min(t.elapsed().as_secs_f64());
        drop(v);
        // The bound: the same, filled by every CPU in parallel chunks.
        let t = Instant::now();
        let mut v: Vec<u8> = Vec::with_capacity(size as usize);
        let spare = v.spare_capacity_mut();
        let chunk = spare.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for part in spare.chunks_mut(chunk) {
                s.spawn(move || part.fill(std::mem::MaybeUninit::new(0xA5)));
            }
        });
        // SAFETY: every byte of the capacity was written just above.
        unsafe { v.set_len(size as usize) };
        std::hint::black_box(&v);
        par_memset_best = par_memset_best.min(t.elapsed().as_secs_f64());
        drop(v);

        let shmem_before = meminfo_bytes("Shmem").unwrap_or(0);
        let t = Instant::now();
        let pool = pools
            .create(&NewPool {
                name: format!("bench{round}"),
                device: "cpu".into(),
                size_bytes: size,
            })
            .expect("create pool");
        create_best = create_best.min(t.elapsed().as_secs_f64());
        let shmem_after = meminfo_bytes("Shmem").unwrap_or(0);
        let resident = pool.region().resident_bytes().expect("stat");
        pinned = pool.pinned();
        used_per_byte = (resident as f64 / size as f64)
            .max(shmem_after.saturating_sub(shmem_before) as f64 / size as f64);
        drop(pool);
        pools.delete(&format!("bench{round}")).expect("delete");
    }
    let gbps = |secs: f64| size as f64 / secs / 1e9;
    println!("pool size {mib} MiB, {threads} threads, pinned={pinned}, best of {ROUNDS}");
    println!(
        "memset of fresh memory      : {:6.2} GB/s",
        gbps(memset_best)
    );
    println!(
        "CreatePool (create+fault+pin): {:6.2} GB/s",
        gbps(create_best)
    );
    println!(
        "ratio create/memset          : {:6.2}",
        memset_best / create_best
    );
    println!(
        "parallel memset ({threads} threads)  : {:6.2} GB/s; ratio create/parallel memset {:.2} (target >= 0.5 at 8 GiB)",
        gbps(par_memset_best),
        par_memset_best / create_best
    );
    println!("host bytes used per pool byte: {used_per_byte:.4} (target <= 1.01)");
}
