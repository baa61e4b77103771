//! Restart to every model READY, through the real daemon binary: a fresh RegisterModel of the
//! same checkpoint from the page cache is the bound, measured in the same run. Then the daemon
//! is SIGKILLed and started again over the same pool directory, with
//! `models.verify_on_adopt = "crc"` (every tensor's CRC32C checked) and with `"none"`.
//!
//! Each round reloads, then restarts twice, so a noisy neighbour hits both sides of a ratio;
//! ratios print as min / median / max, beside each side's CPU seconds.
//!
//! `cargo bench --bench restart` (OFFLOADD_BENCH_MODEL_MIB sets the size, default 4200: the
//! issue asks for at least 4 GiB). `OFFLOADD_BENCH_RESTART_TENSORS=100000` restarts a
//! mixture-of-experts-shaped model of that many 4 KiB tensors instead, where the journal's
//! table rather than the bytes is most of the work. OFFLOADD_BENCH_ROUNDS sets the rounds
//! (default 5).

mod common;

use std::time::Instant;

use offloadd::proto::{
    AttachWorkerRequest, CreatePoolRequest, DetachWorkerRequest, GetModelRequest, ModelState,
    RegisterModelRequest, UnregisterModelRequest, WatchModelRequest,
};
use tokio::process::Child;
use tonic::transport::Channel;

struct Paths {
    uds: std::path::PathBuf,
    pools: std::path::PathBuf,
    root: std::path::PathBuf,
}

async fn start(p: &Paths, verify: &str) -> (Child, Channel) {
    let (child, channel, _) = common::start_daemon_with(
        &p.uds,
        &p.pools,
        &p.root,
        &["--set", &format!("models.verify_on_adopt={verify}")],
    )
    .await;
    (child, channel)
}

async fn until_ready(channel: Channel, name: &str) {
    let mut c = offloadd::client::offload(channel);
    let mut s = c
        .watch_model(WatchModelRequest { name: name.into() })
        .await
        .expect("the model was adopted")
        .into_inner();
    while let Some(p) = s.message().await.unwrap() {
        match p.state() {
            ModelState::Ready => return,
            ModelState::Failed => panic!("adoption failed: {}", p.error),
            _ => {}
        }
    }
    panic!("watch ended before READY");
}

struct Restarted {
    ready: f64,
    /// The new daemon's CPU seconds, all threads, when the model is READY.
    cpu: f64,
    /// To the first AttachWorker answered: it also waits for the pool's pin.
    attached: f64,
}

/// One round: the reload (the bound), then a restart with each verification.
struct Round {
    fresh: f64,
    fresh_cpu: f64,
    crc: Restarted,
    none: Restarted,
}

/// SIGKILL, then the time from spawning a new daemon to the model being READY again, and to a
/// worker's lease; the new daemon and a channel to it.
async fn restart(mut child: Child, p: &Paths, verify: &str) -> (Restarted, Child, Channel) {
    child.kill().await.unwrap();
    let t = Instant::now();
    let (child, channel) = start(p, verify).await;
    until_ready(channel.clone(), "llama").await;
    let ready = t.elapsed().as_secs_f64();
    let cpu = common::cpu_time(child.id().unwrap()).as_secs_f64();
    let mut c = offloadd::client::offload(channel.clone());
    let lease = c
        .attach_worker(AttachWorkerRequest {
            model: "llama".into(),
            worker_name: "bench".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let attached = t.elapsed().as_secs_f64();
    c.detach_worker(DetachWorkerRequest {
        lease_id: lease.lease_id,
    })
    .await
    .unwrap();
    let m = c
        .get_model(GetModelRequest {
            name: "llama".into(),
            include_tensors: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(m.adopted, "the model must come back adopted, not reloaded");
    (
        Restarted {
            ready,
            cpu,
            attached,
        },
        child,
        channel,
    )
}

fn main() {
    let mib: u64 = std::env::var("OFFLOADD_BENCH_MODEL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4200);
    let scratch = tempfile::tempdir().unwrap();
    let shm = common::shm_dir();
    let p = Paths {
        uds: scratch.path().join("offloadd.sock"),
        pools: shm.path().join("pools"),
        root: scratch.path().join("models"),
    };
    let tensors: Option<usize> = std::env::var("OFFLOADD_BENCH_RESTART_TENSORS")
        .ok()
        .and_then(|v| v.parse().ok());
    let ckpt = p.root.join("llama");
    std::fs::create_dir_all(&ckpt).unwrap();
    let bytes = match tensors {
        Some(n) => {
            common::write_moe_checkpoint(&ckpt.join("model.safetensors"), n, 4096);
            n as u64 * 4096
        }
        None => common::write_checkpoint(&ckpt, mib),
    };
    let rounds: usize = std::env::var("OFFLOADD_BENCH_ROUNDS")
        .ok()
        .map_or(5, |v| v.parse().unwrap());
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let shape = tensors.map_or(String::new(), |n| format!(", {n} tensors of 4 KiB"));
    println!(
        "model {gib:.2} GiB{shape}; {rounds} rounds of: a fresh RegisterModel from the page cache \
         (the bound), then restarts (SIGKILL, spawn, model READY) with verify_on_adopt = crc and \
         = none"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let measured = rt.block_on(async {
        let (mut child, channel) = start(&p, "crc").await;
        let mut c = offloadd::client::offload(channel);
        c.create_pool(CreatePoolRequest {
            name: "p".into(),
            device: "cpu".into(),
            size_bytes: bytes + (64 << 20),
        })
        .await
        .unwrap();
        let register = RegisterModelRequest {
            name: "llama".into(),
            pool: "p".into(),
            path: ckpt.display().to_string(),
            wait: true,
            backend: None,
        };
        // The first registration warms the page cache and is not counted.
        c.register_model(register.clone()).await.unwrap();
        // Bound and restarts alternate, so a noisy neighbour hits both sides of a ratio.
        let mut measured = Vec::new();
        for round in 1..=rounds {
            c.unregister_model(UnregisterModelRequest {
                name: "llama".into(),
            })
            .await
            .unwrap();
            let pid = child.id().unwrap();
            let cpu0 = common::cpu_time(pid);
            let t = Instant::now();
            c.register_model(register.clone()).await.unwrap();
            let fresh = t.elapsed().as_secs_f64();
            let fresh_cpu = (common::cpu_time(pid) - cpu0).as_secs_f64();
            let (crc, next, _) = restart(child, &p, "crc").await;
            let (none, next, channel) = restart(next, &p, "none").await;
            println!(
                "round {round}: reload {fresh:.3} s ({fresh_cpu:.3} CPU-s); restart to READY with \
                 crc {:.3} s ({:.3} CPU-s), none {:.3} s ({:.3} CPU-s); to the first lease \
                 {:.3} s crc, {:.3} s none",
                crc.ready, crc.cpu, none.ready, none.cpu, crc.attached, none.attached
            );
            measured.push(Round {
                fresh,
                fresh_cpu,
                crc,
                none,
            });
            child = next;
            c = offloadd::client::offload(channel);
        }
        child.kill().await.unwrap();
        measured
    });
    let median =
        |f: &dyn Fn(&Round) -> f64| common::spread(&measured.iter().map(f).collect::<Vec<_>>()).1;
    let ratio = |f: &dyn Fn(&Round) -> f64| {
        let (lo, mid, hi) = common::spread(&measured.iter().map(f).collect::<Vec<_>>());
        format!("{lo:.2} / {mid:.2} / {hi:.2}")
    };
    println!(
        "bound: fresh RegisterModel from the page cache : {:7.3} s ({:.3} CPU-s), median",
        median(&|m| m.fresh),
        median(&|m| m.fresh_cpu)
    );
    println!(
        "restart to READY, verify_on_adopt = crc        : {:7.3} s ({:.3} CPU-s); reload / restart, \
         min / median / max: {} (>1 is faster than reloading)",
        median(&|m| m.crc.ready),
        median(&|m| m.crc.cpu),
        ratio(&|m| m.fresh / m.crc.ready)
    );
    println!(
        "restart to READY, verify_on_adopt = none       : {:7.3} s ({:.3} CPU-s); reload / restart: {}",
        median(&|m| m.none.ready),
        median(&|m| m.none.cpu),
        ratio(&|m| m.fresh / m.none.ready)
    );
    println!(
        "restart to first lease (waits for the re-pin)  : {:7.3} s crc, {:.3} s none (medians)",
        median(&|m| m.crc.attached),
        median(&|m| m.none.attached)
    );
}
