//! Mixed load against hostile neighbours (issue #13's benchmark): 32 clients for 60 s
//! (GetInfo, ListPools, GetModel, attach → onloads → detach, keep-alives) over the Unix socket,
//! while 1,000 idle HTTP/2 connections are held open over TCP and a lease flood (attach without
//! detach) is refused. Prints GetInfo p50/p99 under load against the same call on the idle
//! daemon, the daemon's RSS and open fds before and after, and whether it survived.
//!
//! `cargo bench --bench load` (`LOAD_SECONDS`, default 60, split over `LOAD_ROUNDS`, default 2;
//! `LOAD_SET=KEY=VALUE` for one daemon setting).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    AttachWorkerRequest, Backend, CreatePoolRequest, DetachWorkerRequest, GetInfoRequest,
    GetModelRequest, KeepAliveRequest, ListPoolsRequest, OnloadToStaticRequest, PrefetchConfig,
    RegisterModelRequest, backend,
};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use tonic::Code;
use tonic::transport::Channel;

const CLIENTS: usize = 32;
const IDLE_CONNECTIONS: usize = 1000;
const LAYERS: usize = 8;

fn write_model(path: &Path) {
    let data: Vec<Vec<u8>> = (0..LAYERS).map(|l| vec![l as u8; 64 << 10]).collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(l, d)| {
            (
                format!("model.layers.{l}.mlp.w"),
                TensorView::new(Dtype::U8, vec![d.len()], d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

async fn get_info_latencies(c: &mut OffloadClient<Channel>, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.get_info(GetInfoRequest {}).await.unwrap();
        out.push(t.elapsed());
    }
    out.sort();
    out
}

/// One client's mix until `stop`; returns its GetInfo latencies.
async fn client(channel: Channel, i: usize, stop: Arc<AtomicBool>) -> Vec<Duration> {
    let mut c = OffloadClient::new(channel);
    let mut lat = Vec::new();
    let mut k = i;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        match k % 5 {
            0 | 1 => {
                let t = Instant::now();
                c.get_info(GetInfoRequest {}).await.unwrap();
                lat.push(t.elapsed());
            }
            2 => {
                c.list_pools(ListPoolsRequest {}).await.unwrap();
            }
            3 => {
                c.get_model(GetModelRequest {
                    name: "m".into(),
                    include_tensors: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
            _ => {
                // A worker's life: attach, onload every layer, renew, detach. Refused while the
                // flood holds every lease: that is the point of the limit.
                let lease = match c
                    .attach_worker(AttachWorkerRequest {
                        model: "m".into(),
                        worker_name: format!("client-{i}"),
                        ttl_ms: 5_000,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(l) => l.into_inner(),
                    Err(e) if e.code() == Code::ResourceExhausted => continue,
                    Err(e) => panic!("attach: {e}"),
                };
                for layer in lease.offloaded_layers.iter().copied() {
                    c.onload_to_static(OnloadToStaticRequest {
                        lease_id: lease.lease_id.clone(),
                        layer,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
                c.keep_alive(KeepAliveRequest {
                    lease_id: lease.lease_id.clone(),
                })
                .await
                .unwrap();
                c.detach_worker(DetachWorkerRequest {
                    lease_id: lease.lease_id,
                })
                .await
                .unwrap();
            }
        }
    }
    lat
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    write_model(&dir.path().join("m.safetensors"));
    // LOAD_SET=KEY=VALUE adds one daemon setting, e.g. server.worker_threads=2.
    let extra_set = std::env::var("LOAD_SET").ok();
    let mut args = vec![
        "--tcp-addr",
        "127.0.0.1:0",
        "--set",
        "leases.max_per_model=48",
    ];
    if let Some(kv) = &extra_set {
        args.extend(["--set", kv.as_str()]);
    }
    let (mut child, channel, ready) = common::start_daemon_with(
        &dir.path().join("offloadd.sock"),
        shm.path(),
        dir.path(),
        &args,
    )
    .await;
    let pid = child.id().unwrap();
    let tcp: std::net::SocketAddr = ready["tcp"].as_str().unwrap().parse().unwrap();
    let mut c = OffloadClient::new(channel.clone());
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 16 << 20,
    })
    .await
    .unwrap();
    c.register_model(RegisterModelRequest {
        name: "m".into(),
        pool: "p".into(),
        path: dir.path().join("m.safetensors").display().to_string(),
        wait: true,
        backend: Some(Backend {
            kind: Some(backend::Kind::Prefetch(PrefetchConfig {
                group_size: 1,
                num_in_group: 1,
                prefetch_step: 2,
                params: vec![],
            })),
        }),
    })
    .await
    .unwrap();
    // Warm up (allocator, thread pools), then the idle baseline.
    get_info_latencies(&mut c, 500).await;
    let idle = get_info_latencies(&mut c, 2000).await;
    let (rss0, fds0) = (rss_kib(pid), fds(pid));

    // Two rounds of half the time each: memory that grows from one round to the next is a
    // leak; memory the allocator keeps after the first round is not.
    let uds = dir.path().join("offloadd.sock");
    let n_rounds: u64 = std::env::var("LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let mut rounds = Vec::new();
    for round in 1..=n_rounds {
        let r = load_round(&uds, tcp, &mut c, Duration::from_secs(seconds / n_rounds)).await;
        let (rss, open) = (rss_kib(pid), fds(pid));
        println!(
            "round {round}: {CLIENTS} clients over the Unix socket for {:.0} s, {} idle TCP connections held ({} refused at server.max_connections), lease flood {} granted / {} refused",
            r.elapsed.as_secs_f64(),
            r.idle_held,
            IDLE_CONNECTIONS - r.idle_held,
            r.flood_granted,
            r.flood_refused,
        );
        println!(
            "  GetInfo from a 5 ms prober under load: {} calls, p50 {:?}, p99 {:?} (target p99 <= 5 ms); from the 32 saturating clients themselves: p50 {:?}, p99 {:?}",
            r.probe.len(),
            common::pct(&r.probe, 0.50),
            common::pct(&r.probe, 0.99),
            common::pct(&r.clients, 0.50),
            common::pct(&r.clients, 0.99),
        );
        println!(
            "  after the round (idle connections closed, flood leases expired): RSS {rss} KiB, {open} open fds"
        );
        rounds.push((rss, open));
    }
    let after = get_info_latencies(&mut c, 2000).await;
    let alive = child.try_wait().unwrap().is_none();
    println!(
        "idle daemon GetInfo p50 {:?}, p99 {:?}; after the load p50 {:?}, p99 {:?}",
        common::pct(&idle, 0.50),
        common::pct(&idle, 0.99),
        common::pct(&after, 0.50),
        common::pct(&after, 0.99),
    );
    let last = rounds.last().unwrap();
    println!(
        "daemon RSS {rss0} KiB before, {:?} KiB after each round (last / first = {:.3}); open fds {fds0} before, {:?} after each round",
        rounds.iter().map(|r| r.0).collect::<Vec<_>>(),
        last.0 as f64 / rounds[0].0 as f64,
        rounds.iter().map(|r| r.1).collect::<Vec<_>>(),
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().await.unwrap();
    println!(
        "daemon exit after SIGTERM: {status} (zero crashes: {})",
        alive && status.success()
    );
}

struct Round {
    elapsed: Duration,
    idle_held: usize,
    flood_granted: u64,
    flood_refused: u64,
    probe: Vec<Duration>,
    clients: Vec<Duration>,
}

/// One round: idle connections, the flood, the clients and the prober; then everything let go
/// and the daemon given time to reap.
async fn load_round(
    uds: &Path,
    tcp: std::net::SocketAddr,
    c: &mut OffloadClient<Channel>,
    length: Duration,
) -> Round {
    // 1,000 idle HTTP/2 connections over TCP, each handshaked by one call, then silent.
    let mut held = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        // Bounded: a connection the daemon closes at its cap can leave tonic's client waiting.
        let handshaked = tokio::time::timeout(Duration::from_secs(2), async {
            let ch = offloadd::client::connect_tcp(tcp).await.ok()?;
            OffloadClient::new(ch.clone())
                .get_info(GetInfoRequest {})
                .await
                .ok()?;
            Some(ch)
        })
        .await;
        if let Ok(Some(ch)) = handshaked {
            held.push(ch);
        }
    }
    let idle_held = held.len();
    let stop = Arc::new(AtomicBool::new(false));
    // The lease flood: attach without ever detaching, as fast as the daemon answers.
    let flood_refused = Arc::new(AtomicU64::new(0));
    let flood_granted = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, refused, granted) = (stop.clone(), flood_refused.clone(), flood_granted.clone());
        let mut fc = OffloadClient::new(offloadd::client::connect_uds(uds).await.unwrap());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match fc
                    .attach_worker(AttachWorkerRequest {
                        model: "m".into(),
                        worker_name: "flood".into(),
                        ttl_ms: 2_000,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => granted.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.code() == Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => panic!("flood: {e}"),
                };
            }
        })
    };
    let started = Instant::now();
    let probe = common::prober(uds.to_path_buf(), stop.clone(), None);
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let ch = offloadd::client::connect_uds(uds).await.unwrap();
        tasks.push(tokio::spawn(client(ch, i, stop.clone())));
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    let mut clients: Vec<Duration> = Vec::new();
    for t in tasks {
        clients.extend(t.await.unwrap());
    }
    flood.await.unwrap();
    let probe = probe.join().unwrap();
    let elapsed = started.elapsed();
    clients.sort();
    drop(held);
    // The flood's leases expire after their 2 s ttl.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let attached = c
            .get_model(GetModelRequest {
                name: "m".into(),
                include_tensors: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .attached_workers;
        if attached == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Round {
        elapsed,
        idle_held,
        flood_granted: flood_granted.load(Ordering::Relaxed),
        flood_refused: flood_refused.load(Ordering::Relaxed),
        probe,
        clients,
    }
}
