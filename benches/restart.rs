//! Restart to every model READY, through the real daemon binary: a fresh RegisterModel of the
//! same checkpoint from the page cache is the bound, measured in the same run. Then the daemon
//! is SIGKILLed and started again over the same pool directory, with
//! `models.verify_on_adopt = "crc"` (every tensor's CRC32C checked) and with `"none"`.
//!
//! `cargo bench --bench restart` (OFFLOADD_BENCH_MODEL_MIB sets the size, default 4200: the
//! issue asks for at least 4 GiB). `OFFLOADD_BENCH_RESTART_TENSORS=100000` restarts a
//! mixture-of-experts-shaped model of that many 4 KiB tensors instead, where the journal's
//! table rather than the bytes is most of the work.

mod common;

use std::time::Instant;

use offloadd::proto::{
    AttachWorkerRequest, CreatePoolRequest, DetachWorkerRequest, GetModelRequest, ModelState,
    RegisterModelRequest, UnregisterModelRequest, WatchModelRequest,
};
use tokio::process::Child;
use tonic::transport::Channel;

const ROUNDS: usize = 3;

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
    /// To the first AttachWorker answered: it also waits for the pool's pin.
    attached: f64,
}

/// SIGKILL, then the time from spawning a new daemon to the model being READY again, and to a
/// worker's lease.
async fn restart(mut child: Child, p: &Paths, verify: &str) -> (Restarted, Child) {
    child.kill().await.unwrap();
    let t = Instant::now();
    let (child, channel) = start(p, verify).await;
    until_ready(channel.clone(), "llama").await;
    let ready = t.elapsed().as_secs_f64();
    let mut c = offloadd::client::offload(channel);
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
    (Restarted { ready, attached }, child)
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
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (fresh, crc, none) = rt.block_on(async {
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
        // Round 0 warms the page cache; the best of the others is the bound.
        let mut fresh = f64::MAX;
        for round in 0..=ROUNDS {
            if round > 0 {
                c.unregister_model(UnregisterModelRequest {
                    name: "llama".into(),
                })
                .await
                .unwrap();
            }
            let t = Instant::now();
            c.register_model(register.clone()).await.unwrap();
            if round > 0 {
                fresh = fresh.min(t.elapsed().as_secs_f64());
            }
        }
        let best = |a: Restarted, b: &Restarted| Restarted {
            ready: a.ready.min(b.ready),
            attached: a.attached.min(b.attached),
        };
        let worst = || Restarted {
            ready: f64::MAX,
            attached: f64::MAX,
        };
        let (mut crc, mut none) = (worst(), worst());
        for _ in 0..ROUNDS {
            let (r, next) = restart(child, &p, "crc").await;
            crc = best(crc, &r);
            let (r, next) = restart(next, &p, "none").await;
            none = best(none, &r);
            child = next;
        }
        child.kill().await.unwrap();
        (fresh, crc, none)
    });
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let shape = tensors.map_or(String::new(), |n| format!(", {n} tensors of 4 KiB"));
    println!("model {gib:.2} GiB{shape}, best of {ROUNDS}; restart = SIGKILL, spawn, model READY");
    println!("bound: fresh RegisterModel from the page cache : {fresh:7.3} s");
    println!(
        "restart to READY, verify_on_adopt = crc        : {:7.3} s  ratio {:.2} (bound/restart; >1 is faster than reloading)",
        crc.ready,
        fresh / crc.ready
    );
    println!(
        "restart to READY, verify_on_adopt = none       : {:7.3} s  (goal < 1 s at any size)",
        none.ready
    );
    println!(
        "restart to first lease (waits for the re-pin)  : {:7.3} s crc, {:.3} s none",
        crc.attached, none.attached
    );
}
