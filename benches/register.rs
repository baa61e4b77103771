//! RegisterModel throughput from the page cache, through the real daemon over its Unix socket,
//! against the bound measured in the same run: parallel chunked `pread` of the same shards into
//! pre-faulted shared memory with the same number of threads, and the same with each piece
//! checksummed (CRC32C) as it lands, the least a load that verifies its bytes can spend. They
//! alternate round by round,
//! so drift on a shared host hits both alike; each round prints the ratio and the CPU seconds
//! each side spent (the bench process's own clock for the bound, the daemon's for the load), and
//! the fixed cost of a register: its wall time less the load the daemon timed (`load_seconds`).
//! Also times Python's safetensors loader on the same files when `python3 -c "import
//! safetensors.numpy"` works.
//!
//! `cargo bench --bench register` (OFFLOADD_BENCH_MODEL_MIB sets the size, default 1700;
//! OFFLOADD_BENCH_ROUNDS the rounds, default 8).

mod common;

use std::path::PathBuf;

use std::time::Instant;

use offloadd::parts::HostRegion;
use offloadd::proto::{CreatePoolRequest, RegisterModelRequest, UnregisterModelRequest};

/// One round's figures.
struct Round {
    bound: f64,
    secs: f64,
    /// Daemon CPU seconds over the bound's.
    cpu: f64,
    rest_ms: f64,
    crc_ratio: f64,
    crc_cpu: f64,
}

fn python_load(files: &[PathBuf]) -> Option<f64> {
    let script = "import sys,time\nfrom safetensors.numpy import load_file\nt=time.perf_counter()\nfor f in sys.argv[1:]: load_file(f)\nprint(time.perf_counter()-t)";
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(files)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "python: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

fn main() {
    let mib: u64 = std::env::var("OFFLOADD_BENCH_MODEL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1700);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let work = tempfile::tempdir().unwrap();
    let ckpt = work.path().join("llama");
    std::fs::create_dir_all(&ckpt).unwrap();
    let bytes = common::write_checkpoint(&ckpt, mib);
    let files = common::shards(&ckpt);
    let file_bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    // Warm the page cache so both sides read from it.
    for f in &files {
        std::io::copy(&mut std::fs::File::open(f).unwrap(), &mut std::io::sink()).unwrap();
    }

    let rounds: usize = std::env::var("OFFLOADD_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let shm = common::shm_dir();
    let region = HostRegion::create(&shm.path().join("bound"), file_bytes).unwrap();
    region.prefault(threads).unwrap();
    let me = std::process::id();
    let gbps = |secs: f64| bytes as f64 / secs / 1e9;
    println!(
        "checkpoint {:.2} GiB in {} shards, {threads} threads, chunk {} MiB, {rounds} rounds",
        bytes as f64 / (1u64 << 30) as f64,
        files.len(),
        common::PREAD_CHUNK >> 20
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let rounds = rt.block_on(async {
        let uds = work.path().join("offloadd.sock");
        let (mut child, channel) =
            common::start_daemon(&uds, &shm.path().join("pools"), &ckpt).await;
        let pid = child.id().expect("running");
        let mut c = offloadd::client::offload(channel);
        let pool_bytes = bytes + (64 << 20);
        c.create_pool(CreatePoolRequest {
            name: "p".into(),
            device: "cpu".into(),
            size_bytes: pool_bytes,
        })
        .await
        .unwrap();
        let mut out = Vec::new();
        for round in 1..=rounds {
            let cpu0 = common::cpu_time(me);
            let bound = common::pread_bound(&files, &region, threads);
            let bound_cpu = (common::cpu_time(me) - cpu0).as_secs_f64();
            let cpu0 = common::cpu_time(me);
            let crc_bound = common::pread_bound_with(&files, &region, threads, true);
            let crc_cpu = (common::cpu_time(me) - cpu0).as_secs_f64();

            let cpu0 = common::cpu_time(pid);
            let t = Instant::now();
            let model = c
                .register_model(RegisterModelRequest {
                    name: "llama".into(),
                    pool: "p".into(),
                    path: ckpt.display().to_string(),
                    wait: true,
                    backend: None,
                })
                .await
                .unwrap()
                .into_inner();
            let secs = t.elapsed().as_secs_f64();
            let cpu = (common::cpu_time(pid) - cpu0).as_secs_f64();
            c.unregister_model(UnregisterModelRequest {
                name: "llama".into(),
            })
            .await
            .unwrap();
            let rest_ms = (secs - model.load_seconds) * 1e3;
            println!(
                "round {round}: bound {:5.2} GB/s ({bound_cpu:.2} CPU-s), with CRC32C {:5.2} GB/s \
                 ({crc_cpu:.2} CPU-s), RegisterModel {:5.2} GB/s ({cpu:.2} CPU-s; load {:.3} s, \
                 the rest {rest_ms:.1} ms): ratio {:.2} / {:.2} with CRC, CPU {:.2}x / {:.2}x",
                gbps(bound),
                gbps(crc_bound),
                gbps(secs),
                model.load_seconds,
                bound / secs,
                crc_bound / secs,
                cpu / bound_cpu,
                cpu / crc_cpu
            );
            out.push(Round {
                bound,
                secs,
                cpu: cpu / bound_cpu,
                rest_ms,
                crc_ratio: crc_bound / secs,
                crc_cpu: cpu / crc_cpu,
            });
        }
        child.kill().await.unwrap();
        out
    });
    drop(region);
    let python = python_load(&files);

    let column = |f: fn(&Round) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
    let report = |what: &str, values: Vec<f64>| {
        let (lo, mid, hi) = common::spread(&values);
        println!("{what}, min/median/max: {lo:.2} / {mid:.2} / {hi:.2}");
    };
    report(
        "ratio RegisterModel/bound (target >= 0.9)",
        column(|r| r.bound / r.secs),
    );
    report(
        "ratio RegisterModel/bound with CRC32C",
        column(|r| r.crc_ratio),
    );
    report(
        "CPU seconds daemon/bound (target <= 1.1)",
        column(|r| r.cpu),
    );
    report(
        "CPU seconds daemon/bound with CRC32C",
        column(|r| r.crc_cpu),
    );
    report(
        "fixed cost (RegisterModel less its load), ms",
        column(|r| r.rest_ms),
    );
    let bound = column(|r| r.bound).into_iter().fold(f64::MAX, f64::min);
    let daemon_secs = column(|r| r.secs).into_iter().fold(f64::MAX, f64::min);
    match python {
        Some(p) => {
            println!(
                "python safetensors.numpy.load_file: {:6.2} GB/s ({:.2} of the best bound)",
                gbps(p),
                bound / p
            );
            println!(
                "offloadd (best round) vs python   : {:6.2}x (target >= 3)",
                p / daemon_secs
            );
        }
        None => println!("python safetensors: skipped (pip install safetensors numpy to compare)"),
    }
}
