//! RegisterModel throughput from the page cache, through the real daemon over its Unix socket,
//! against the bound measured in the same run: parallel chunked `pread` of the same shards into
//! pre-faulted shared memory with the same number of threads. Also times Python's safetensors
//! loader on the same files when `python3 -c "import safetensors.numpy"` works.
//!
//! `cargo bench --bench register` (OFFLOADD_BENCH_MODEL_MIB sets the size, default 1600).

mod common;

use std::path::PathBuf;

use std::time::Instant;

use offloadd::parts::HostRegion;
use offloadd::proto::{CreatePoolRequest, RegisterModelRequest, UnregisterModelRequest};

const ROUNDS: usize = 3;

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

    let shm = common::shm_dir();
    let region = HostRegion::create(&shm.path().join("bound"), file_bytes).unwrap();
    region.prefault(threads).unwrap();
    let bound = (0..ROUNDS)
        .map(|_| common::pread_bound(&files, &region, threads))
        .fold(f64::MAX, f64::min);
    drop(region);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let daemon_secs = rt.block_on(async {
        let uds = work.path().join("offloadd.sock");
        let (mut child, channel) =
            common::start_daemon(&uds, &shm.path().join("pools"), &ckpt).await;
        let mut c = offloadd::client::offload(channel);
        let pool_bytes = bytes + (64 << 20);
        c.create_pool(CreatePoolRequest {
            name: "p".into(),
            device: "cpu".into(),
            size_bytes: pool_bytes,
        })
        .await
        .unwrap();
        let mut best = f64::MAX;
        for _ in 0..ROUNDS {
            let t = Instant::now();
            c.register_model(RegisterModelRequest {
                name: "llama".into(),
                pool: "p".into(),
                path: ckpt.display().to_string(),
                wait: true,
                backend: None,
            })
            .await
            .unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            c.unregister_model(UnregisterModelRequest {
                name: "llama".into(),
            })
            .await
            .unwrap();
        }
        child.kill().await.unwrap();
        best
    });
    let python = python_load(&files);

    let gbps = |secs: f64| bytes as f64 / secs / 1e9;
    println!(
        "checkpoint {:.2} GiB in {} shards, {threads} threads, chunk {} MiB, best of {ROUNDS}",
        bytes as f64 / (1u64 << 30) as f64,
        files.len(),
        common::PREAD_CHUNK >> 20
    );
    println!(
        "bound: pread into pre-faulted shm : {:6.2} GB/s",
        gbps(bound)
    );
    println!(
        "RegisterModel (wait), over UDS    : {:6.2} GB/s",
        gbps(daemon_secs)
    );
    println!(
        "ratio RegisterModel/bound         : {:6.2} (target >= 0.8)",
        bound / daemon_secs
    );
    match python {
        Some(p) => {
            println!(
                "python safetensors.numpy.load_file: {:6.2} GB/s ({:.2} of bound)",
                gbps(p),
                bound / p
            );
            println!(
                "offloadd vs python                : {:6.2}x (target >= 3)",
                p / daemon_secs
            );
        }
        None => println!("python safetensors: skipped (pip install safetensors numpy to compare)"),
    }
}
