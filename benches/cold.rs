//! Cold and warm RegisterModel of a large checkpoint through the real daemon, with the page
//! cache the load leaves behind. Cold: caches dropped before each side (needs root; the
//! benchmark says so and skips the cold half without it), against two bounds of the same disk
//! in the same rounds, alternated: `dd iflag=direct bs=16M` of the shards, and buffered
//! parallel `pread` into pre-faulted shared memory with the daemon's thread count (which
//! leaves the whole checkpoint cached, as a load must not). Warm: against the parallel `pread`
//! bound of `register`. Page-cache growth is the checkpoint's resident bytes after the load
//! (`mincore`).
//!
//! `cargo bench --bench cold` (OFFLOADD_BENCH_MODEL_MIB sets the size, default 4200;
//! OFFLOADD_BENCH_ROUNDS the cold rounds, default 3).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use offloadd::parts::HostRegion;
use offloadd::proto::{CreatePoolRequest, RegisterModelRequest, UnregisterModelRequest};

/// Writes back dirty pages and drops the page cache; false when not allowed (not root).
fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Bytes of `files` in the page cache (the daemon's own `mincore` helper).
fn resident(files: &[PathBuf]) -> u64 {
    let page = rustix::param::page_size() as u64;
    files
        .iter()
        .map(|f| {
            let bits = offloadd::parts::resident_pages(&std::fs::File::open(f).unwrap()).unwrap();
            bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * page
        })
        .sum()
}

fn dd_direct(files: &[PathBuf]) -> f64 {
    let t = Instant::now();
    for f in files {
        let out = std::process::Command::new("dd")
            .arg(format!("if={}", f.display()))
            .args(["of=/dev/null", "iflag=direct", "bs=16M"])
            .output()
            .expect("run dd");
        assert!(
            out.status.success(),
            "dd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    let mib: u64 = std::env::var("OFFLOADD_BENCH_MODEL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4200);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // On disk, not tmpfs: a cold read must come from a device.
    let work =
        tempfile::tempdir_in(std::env::var("OFFLOADD_BENCH_DIR").unwrap_or("/var/tmp".into()))
            .unwrap();
    let ckpt = work.path().join("llama");
    std::fs::create_dir_all(&ckpt).unwrap();
    let bytes = common::write_checkpoint(&ckpt, mib);
    let files = common::shards(&ckpt);
    let file_bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    let shm = common::shm_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut child, channel) = rt.block_on(common::start_daemon(
        &work.path().join("offloadd.sock"),
        &shm.path().join("pools"),
        work.path(),
    ));
    let mut c = offloadd::client::offload(channel);
    rt.block_on(c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: bytes + (64 << 20),
    }))
    .unwrap();
    let mut register = || {
        let t = Instant::now();
        rt.block_on(c.register_model(RegisterModelRequest {
            name: "m".into(),
            pool: "p".into(),
            path: ckpt.display().to_string(),
            wait: true,
            backend: None,
        }))
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        rt.block_on(c.unregister_model(UnregisterModelRequest { name: "m".into() }))
            .unwrap();
        secs
    };
    let gib = file_bytes as f64 / (1u64 << 30) as f64;
    let gbps = |s: f64| file_bytes as f64 / s / 1e9;
    println!(
        "checkpoint {gib:.2} GiB in {} shards, {threads} threads",
        files.len()
    );

    let region = HostRegion::create(&shm.path().join("bound"), file_bytes).unwrap();
    region.prefault(threads).unwrap();
    let rounds: usize = std::env::var("OFFLOADD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (me, daemon) = (std::process::id(), child.id().expect("running"));
    if drop_caches() {
        let (mut ratios, mut growth) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            let dd = dd_direct(&files);
            assert!(drop_caches());
            let cpu0 = common::cpu_time(me);
            let pread = common::pread_bound(&files, &region, threads);
            let pread_cpu = (common::cpu_time(me) - cpu0).as_secs_f64();
            assert!(drop_caches());
            let before = resident(&files);
            let cpu0 = common::cpu_time(daemon);
            let cold = register();
            let cold_cpu = (common::cpu_time(daemon) - cpu0).as_secs_f64();
            let grown = resident(&files).saturating_sub(before) as f64 * 100.0 / file_bytes as f64;
            assert!(drop_caches());
            let faster = dd.min(pread);
            println!(
                "round {round}: dd iflag=direct {:5.2} GB/s, buffered pread {:5.2} GB/s \
                 ({pread_cpu:.2} CPU-s), cold RegisterModel {:5.2} GB/s ({cold_cpu:.2} CPU-s): \
                 {:.2}x the faster bound; page cache grown by {grown:.2}% of the checkpoint",
                gbps(dd),
                gbps(pread),
                gbps(cold),
                faster / cold
            );
            ratios.push(faster / cold);
            growth.push(grown);
        }
        let (lo, mid, hi) = common::spread(&ratios);
        println!(
            "cold RegisterModel / the faster bound, min/median/max: {lo:.2} / {mid:.2} / {hi:.2} (target >= 0.9)"
        );
        let (_, _, most) = common::spread(&growth);
        println!(
            "page cache grown by a cold load, at most: {most:.2}% of the checkpoint (target <= 2%)"
        );
    } else {
        println!("cold: skipped, cannot drop the page cache (run as root to measure it)");
    }

    // Warm: the files are read once, so the load finds them cached, and must leave them so.
    for f in &files {
        std::io::copy(&mut std::fs::File::open(f).unwrap(), &mut std::io::sink()).unwrap();
    }
    let bound = (0..2)
        .map(|_| common::pread_bound(&files, &region, threads))
        .fold(f64::MAX, f64::min);
    region.unlink().unwrap();
    drop(region);
    let warm = (0..2).map(|_| register()).fold(f64::MAX, f64::min);
    let cached = resident(&files);
    println!(
        "bound: parallel pread from the cache    : {:6.2} GB/s",
        gbps(bound)
    );
    println!(
        "warm RegisterModel                      : {:6.2} GB/s  ratio {:.2} (target >= 0.8)",
        gbps(warm),
        bound / warm
    );
    println!(
        "checkpoint still cached after warm loads: {:6.2}%",
        cached as f64 * 100.0 / file_bytes as f64
    );
    rt.block_on(child.kill()).unwrap();
}
