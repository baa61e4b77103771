//! Big tensor tables must not stall the control plane (issue #15): GetInfo latency from a prober
//! every 5 ms while one client loops GetModel with the tensors of a 100k-tensor model and
//! another loops AttachWorker / DetachWorker on it (a 100k-row lease each time), against the
//! same prober on the idle daemon in the same run, and against the scheduler's own floor: the
//! same prober while plain busy loops, which never touch the daemon, hold every CPU.
//!
//! `cargo bench --bench tables` (`TABLES_SECONDS`, default 20).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use offloadd::proto::{CreatePoolRequest, DetachWorkerRequest, RegisterModelRequest};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

const TENSORS: usize = 100_000;

async fn probe_for(uds: &std::path::Path, cpu: Option<usize>, length: Duration) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let p = common::prober(uds.to_path_buf(), stop.clone(), cpu);
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    p.join().unwrap()
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::var("TABLES_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let data: Vec<[u8; 4]> = (0..TENSORS as u32).map(|i| i.to_le_bytes()).collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                format!("model.layers.{}.mlp.experts.{}.w", i / 1000, i % 1000),
                TensorView::new(Dtype::U8, vec![4], d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("moe.safetensors")).unwrap();
    let uds = dir.path().join("offloadd.sock");
    let (child, channel) = common::start_daemon(&uds, shm.path(), dir.path()).await;
    let mut c = offloadd::client::offload(channel.clone());
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 64 << 20,
    })
    .await
    .unwrap();
    c.register_model(RegisterModelRequest {
        name: "moe".into(),
        pool: "p".into(),
        path: dir.path().join("moe.safetensors").display().to_string(),
        wait: true,
        backend: None,
    })
    .await
    .unwrap();

    // First everything floats over the machine's cores, the load's clients included: on a
    // 2-core machine they take most of both decoding 100k-row tables, and GetInfo waits for
    // the scheduler (a full 4 ms tick when both cores are busy). Then the load's clients get
    // a core of their own, as workers on other cores of a node would, and the daemon and the
    // prober share the rest: what is left is the daemon's own effect on a cheap call.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut placements = vec![Placement::Shared];
    if cpus >= 2 {
        placements.push(Placement::Split { daemon: 0, load: 1 });
    } else {
        println!("one CPU: the load cannot have a core of its own; shared only");
    }
    for placement in placements {
        if let Placement::Split { daemon, .. } = placement {
            pin_process(child.id().expect("daemon running"), daemon);
        }
        let prober_cpu = placement.daemon_cpu();
        let idle = probe_for(&uds, prober_cpu, Duration::from_secs(seconds / 4)).await;
        // When the load shares the daemon's cores, the floor is what any process gets from the
        // scheduler on CPUs that are all busy, whoever keeps them busy.
        let floor = match placement {
            Placement::Shared => {
                let burn = Burn::start(cpus);
                let floor = probe_for(&uds, prober_cpu, Duration::from_secs(seconds / 2)).await;
                burn.stop();
                Some(common::pct(&floor, 0.99))
            }
            Placement::Split { .. } => None,
        };
        let load = Load::start(&uds, placement.load_cpu());
        let loaded = probe_for(&uds, prober_cpu, Duration::from_secs(seconds)).await;
        let (tables, leases) = load.stop().await;
        let p99 = common::pct(&loaded, 0.99);
        let against_floor = floor.map_or(String::new(), |f| {
            format!(
                "; with {cpus} busy loops and no load, p99 {f:?}: the load's p99 is {:.2}x that floor",
                p99.as_secs_f64() / f.as_secs_f64()
            )
        });
        println!(
            "{placement}: {tables} GetModel with tensors and {leases} attach/detach in {seconds} s ({:.1} tables/s); GetInfo idle p50 {:?} p99 {:?}; under the load p50 {:?} p99 {p99:?} = {:.1}x idle p99 (target p99 <= 2 ms){against_floor}",
            (tables + leases) as f64 / seconds as f64,
            common::pct(&idle, 0.5),
            common::pct(&idle, 0.99),
            common::pct(&loaded, 0.5),
            p99.as_secs_f64() / common::pct(&idle, 0.99).as_secs_f64(),
        );
    }
}

/// Threads that spin until stopped, one per CPU, and never call the daemon.
struct Burn {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Burn {
    fn start(threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Placement {
    Shared,
    Split { daemon: usize, load: usize },
}

impl Placement {
    fn daemon_cpu(self) -> Option<usize> {
        match self {
            Placement::Shared => None,
            Placement::Split { daemon, .. } => Some(daemon),
        }
    }

    fn load_cpu(self) -> Option<usize> {
        match self {
            Placement::Shared => None,
            Placement::Split { load, .. } => Some(load),
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Shared => write!(f, "daemon, prober and load clients on every CPU"),
            Placement::Split { daemon, load } => write!(
                f,
                "daemon and prober on CPU {daemon}, load clients on CPU {load}"
            ),
        }
    }
}

/// Every thread of process `pid` onto `cpu` (threads it starts later inherit it).
fn pin_process(pid: u32, cpu: usize) {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i32 = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
        rustix::thread::sched_setaffinity(
            rustix::process::Pid::from_raw(tid),
            &common::cpu_set(cpu),
        )
        .unwrap();
    }
}

/// One client reading the whole table page by page in a loop, another attaching (reading every
/// page of the lease's table) and detaching, on their own runtime, on `cpu` if given.
struct Load {
    runtime: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tables: Arc<AtomicU64>,
    leases: Arc<AtomicU64>,
}

impl Load {
    fn start(uds: &std::path::Path, cpu: Option<usize>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                if let Some(cpu) = cpu {
                    common::pin_to(cpu);
                }
            })
            .build()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tables, leases) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let connect = || {
            let uds = uds.to_path_buf();
            async move { offloadd::client::offload(offloadd::client::connect_uds(&uds).await.unwrap()) }
        };
        // Connected from inside the runtime, so the connections' own tasks run there too.
        let getter = {
            let (stop, n, connect) = (stop.clone(), tables.clone(), connect());
            runtime.spawn(async move {
                let mut c = connect.await;
                while !stop.load(Ordering::Relaxed) {
                    // The whole table, page by page, as a client reads it.
                    let tensors = common::all_tensors(&mut c, "moe").await;
                    assert_eq!(tensors.len(), TENSORS);
                    n.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let attacher = {
            let (stop, n, connect) = (stop.clone(), leases.clone(), connect());
            runtime.spawn(async move {
                let mut c = connect.await;
                while !stop.load(Ordering::Relaxed) {
                    let lease = common::attach_all(&mut c, "moe").await;
                    c.detach_worker(DetachWorkerRequest {
                        lease_id: lease.lease_id,
                    })
                    .await
                    .unwrap();
                    n.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Self {
            runtime,
            stop,
            tasks: vec![getter, attacher],
            tables,
            leases,
        }
    }

    /// Stops both loops; returns how many tables and leases they read.
    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.runtime.shutdown_background();
        (
            self.tables.load(Ordering::Relaxed),
            self.leases.load(Ordering::Relaxed),
        )
    }
}
