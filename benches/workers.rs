//! Worker-facing figures, each against a bound measured in the same run:
//! - attach → first tensor byte readable (1 GiB model) vs reading the checkpoint from the page
//!   cache;
//! - OnloadToStatic throughput on cpu vs single-thread memcpy between shared-memory regions;
//! - OnloadToStatic round trip over the Unix socket for a 4 KiB layer, 1 and 32 concurrent
//!   workers (p50, p99), over the fast path and over gRPC, against a bare ping-pong of two
//!   threads on a Unix socket pair (what the kernel and the machine's wake-ups cost alone).
//!
//! `cargo bench --bench workers`

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use offloadd::parts::HostRegion;
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    AttachWorkerRequest, CreatePoolRequest, DetachWorkerRequest, OnloadToStaticRequest,
    PrefetchConfig, RegisterModelRequest,
};
use offloadd::worker::Worker;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use tonic::transport::Channel;

const BIG_LAYER: usize = 64 << 20;
const BIG_LAYERS: usize = 17; // 1.06 GiB
const RTT_CALLS: usize = 2000;
/// A worker onloads once per offloaded layer; 5 ms is a layer of a large model at small batch.
const PACE: Duration = Duration::from_millis(5);

fn write(path: &Path, layers: usize, per_layer: usize) {
    let data: Vec<Vec<u8>> = (0..layers).map(|l| vec![l as u8; per_layer]).collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(l, d)| {
            (
                format!("model.layers.{l}.mlp.w"),
                TensorView::new(Dtype::U8, vec![per_layer], d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Round trips of `workers` concurrent workers, each on its own connection. With `pace`, each
/// worker issues one call per period, as a worker does once per layer between compute; without,
/// they call back to back (saturation: latency then measures queueing, not the call).
async fn rtt(
    uds: &Path,
    workers: usize,
    pace: Option<Duration>,
    fast: bool,
) -> (Duration, Duration) {
    // Each worker on its own thread with a current-thread runtime, like a worker process:
    // a multi-thread client runtime adds its own cross-thread hand-offs to every call.
    let mut tasks = Vec::new();
    for i in 0..workers {
        let uds = uds.to_path_buf();
        tasks.push(std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let channel = offloadd::client::connect_uds(&uds).await.unwrap();
                    let mut c = OffloadClient::new(channel.clone());
                    let mut w = Worker::attach(channel, "small", &format!("w{i}"), 60_000)
                        .await
                        .unwrap();
                    if fast {
                        w.connect_fast(&uds).unwrap();
                    }
                    let lease = w.lease.clone();
                    let n = lease.offloaded_layers.len() as u32;
                    let mut times = Vec::with_capacity(RTT_CALLS / workers.max(1) + 1);
                    let mut tick = pace.map(|p| {
                        let mut i = tokio::time::interval(p);
                        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        i
                    });
                    for k in 0..(RTT_CALLS / workers).max(200) {
                        if let Some(t) = tick.as_mut() {
                            t.tick().await;
                        }
                        let t = Instant::now();
                        if fast {
                            w.onload_fast(k as u32 % n).unwrap();
                        } else {
                            c.onload_to_static(OnloadToStaticRequest {
                                lease_id: lease.lease_id.clone(),
                                layer: k as u32 % n,
                                ..Default::default()
                            })
                            .await
                            .unwrap();
                        }
                        times.push(t.elapsed());
                    }
                    c.detach_worker(DetachWorkerRequest {
                        lease_id: lease.lease_id,
                    })
                    .await
                    .unwrap();
                    times
                })
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(
            tokio::task::spawn_blocking(move || t.join().unwrap())
                .await
                .unwrap(),
        );
    }
    all.sort();
    (common::pct(&all, 0.5), common::pct(&all, 0.99))
}

/// Round trips of 8 bytes between two threads over a Unix socket pair, blocking reads, with the
/// two threads on the given CPUs: the floor any request/response over a Unix socket pays on this
/// machine. Where the scheduler puts a worker and the daemon's thread is its choice, so both
/// floors are measured: same CPU, and across CPUs (a wake-up is then an inter-processor
/// interrupt).
fn ping_pong(cpus: (usize, usize)) -> (Duration, Duration) {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        common::pin_to(cpus.1);
        let mut buf = [0u8; 8];
        while b.read_exact(&mut buf).is_ok() {
            b.write_all(&buf).unwrap();
        }
    });
    let mut times = Vec::with_capacity(RTT_CALLS);
    let mut buf = [0u8; 8];
    let caller = std::thread::spawn(move || {
        common::pin_to(cpus.0);
        for _ in 0..RTT_CALLS {
            let t = Instant::now();
            a.write_all(&buf).unwrap();
            a.read_exact(&mut buf).unwrap();
            times.push(t.elapsed());
        }
        times
    });
    let mut times = caller.join().unwrap();
    echo.join().unwrap();
    times.sort();
    (common::pct(&times, 0.5), common::pct(&times, 0.99))
}

fn main() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("models");
    std::fs::create_dir_all(&root).unwrap();
    let big = root.join("big.safetensors");
    write(&big, BIG_LAYERS, BIG_LAYER);
    write(&root.join("small.safetensors"), 16, 4096);
    let big_bytes = std::fs::metadata(&big).unwrap().len();

    // Bound 1: read the whole checkpoint from the page cache (warm it first).
    std::io::copy(
        &mut std::fs::File::open(&big).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();
    let t = Instant::now();
    let bytes = std::fs::read(&big).unwrap();
    let read_secs = t.elapsed().as_secs_f64();
    drop(bytes);

    // Bound 2: single-thread memcpy of one layer between pre-faulted shared-memory regions.
    let shm = common::shm_dir();
    let a = HostRegion::create(&shm.path().join("a"), BIG_LAYER as u64).unwrap();
    let b = HostRegion::create(&shm.path().join("b"), BIG_LAYER as u64).unwrap();
    a.prefault(1).unwrap();
    b.prefault(1).unwrap();
    let memcpy = (0..5)
        .map(|_| {
            let t = Instant::now();
            // SAFETY: two regions of this thread's own; nothing else touches them.
            unsafe { b.write_at(0, a.slice(0, BIG_LAYER)) };
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    drop((a, b));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let uds = work.path().join("offloadd.sock");
        let (mut child, channel) =
            common::start_daemon(&uds, &shm.path().join("pools"), &root).await;
        let mut c = OffloadClient::new(channel.clone());
        c.create_pool(CreatePoolRequest {
            name: "p".into(),
            device: "cpu".into(),
            size_bytes: big_bytes + (8 << 20),
        })
        .await
        .unwrap();
        let pf = |step| {
            Some(
                PrefetchConfig {
                    group_size: 1,
                    num_in_group: 1,
                    prefetch_step: step,
                    params: vec![],
                }
                .into(),
            )
        };
        for (name, file) in [("big", "big.safetensors"), ("small", "small.safetensors")] {
            c.register_model(RegisterModelRequest {
                name: name.into(),
                pool: "p".into(),
                path: root.join(file).display().to_string(),
                wait: true,
                backend: pf(1),
            })
            .await
            .unwrap();
        }

        // 1. attach -> first byte readable.
        let mut attach_best = f64::MAX;
        let mut attach_first = 0.0;
        for i in 0..5 {
            let t = Instant::now();
            let w = Worker::attach(channel.clone(), "big", "bench", 0)
                .await
                .unwrap();
            let first = w.tensors().iter().find(|t| t.length > 0).unwrap();
            std::hint::black_box(w.host_bytes(first).unwrap()[0]);
            // The first attach allocates and faults the lease's static buffers; later ones,
            // like a restarted worker's, get the ended lease's back.
            if i == 0 {
                attach_first = t.elapsed().as_secs_f64();
            }
            attach_best = attach_best.min(t.elapsed().as_secs_f64());
            w.detach().await.unwrap();
        }

        // 2. OnloadToStatic throughput for 64 MiB layers.
        let lease = c
            .attach_worker(AttachWorkerRequest {
                model: "big".into(),
                worker_name: "bw".into(),
                ttl_ms: 60_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Two passes over every layer, as in two forward passes; the second is the steady state
        // (slots reused), the first includes the slot's first touch right after attach.
        let pass = |c: &mut OffloadClient<Channel>, lease_id: String| {
            let mut c = c.clone();
            async move {
                let t = Instant::now();
                let mut moved = 0;
                for layer in 0..BIG_LAYERS as u32 {
                    moved += c
                        .onload_to_static(OnloadToStaticRequest {
                            lease_id: lease_id.clone(),
                            layer,
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .bytes;
                }
                (moved, t.elapsed().as_secs_f64())
            }
        };
        let (_, first_secs) = pass(&mut c, lease.lease_id.clone()).await;
        let (moved, onload_secs) = pass(&mut c, lease.lease_id.clone()).await;
        c.detach_worker(DetachWorkerRequest {
            lease_id: lease.lease_id,
        })
        .await
        .unwrap();

        // 3. Round trips.
        let one = rtt(&uds, 1, None, false).await;
        let paced = rtt(&uds, 32, Some(PACE), false).await;
        let many = rtt(&uds, 32, None, false).await;
        let fast_one = rtt(&uds, 1, None, true).await;
        let fast_paced = rtt(&uds, 32, Some(PACE), true).await;
        let fast_many = rtt(&uds, 32, None, true).await;
        let last_cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
        let floor_same = ping_pong((0, 0));
        let floor_cross = ping_pong((0, last_cpu));
        child.kill().await.unwrap();

        let gbps = |b: f64, s: f64| b / s / 1e9;
        println!(
            "attach -> first byte, {:.2} GiB model : {:8.3} ms (re-attach, as a restarted worker)",
            big_bytes as f64 / (1u64 << 30) as f64,
            attach_best * 1e3
        );
        println!(
            "first attach (allocates its statics): {:8.3} ms",
            attach_first * 1e3
        );
        println!(
            "read checkpoint from page cache    : {:8.3} ms",
            read_secs * 1e3
        );
        println!(
            "ratio (read / attach)              : {:8.0}x (target >= 100x; first attach {:.0}x)",
            read_secs / attach_best,
            read_secs / attach_first
        );
        println!(
            "memcpy shm->shm, 1 thread          : {:8.2} GB/s",
            gbps(BIG_LAYER as f64, memcpy)
        );
        println!(
            "OnloadToStatic, 64 MiB, 1st pass   : {:8.2} GB/s (right after attach)",
            gbps(moved as f64, first_secs)
        );
        println!(
            "OnloadToStatic, 64 MiB, steady     : {:8.2} GB/s",
            gbps(moved as f64, onload_secs)
        );
        println!(
            "ratio onload / memcpy              : {:8.2} (target >= 0.8)",
            memcpy / (onload_secs / (moved as f64 / BIG_LAYER as f64))
        );
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let row = |what: &str, (p50, p99): (Duration, Duration)| {
            println!("{what:<58}: p50 {:7.1} us  p99 {:7.1} us", us(p50), us(p99));
        };
        println!("round trips, 4 KiB layer (targets p50 <= 100 us, p99 <= 1 ms):");
        row(
            "  bare ping-pong, Unix socket pair, threads on one CPU",
            floor_same,
        );
        row(
            "  bare ping-pong, Unix socket pair, threads on two CPUs",
            floor_cross,
        );
        row("  fast path, 1 worker", fast_one);
        row(
            &format!("  fast path, 32 workers, one call per {PACE:?} each"),
            fast_paced,
        );
        row(
            "  fast path, 32 workers back to back (saturated)",
            fast_many,
        );
        row("  gRPC OnloadToStatic, 1 worker", one);
        row(
            &format!("  gRPC OnloadToStatic, 32 workers, one call per {PACE:?} each"),
            paced,
        );
        row(
            "  gRPC OnloadToStatic, 32 workers back to back (saturated)",
            many,
        );
        println!(
            "fast path 1 worker p50 / ping-pong p50     : {:8.2} of one CPU, {:.2} of two",
            us(fast_one.0) / us(floor_same.0),
            us(fast_one.0) / us(floor_cross.0)
        );
    });
}
