//! What the benchmarks share: starting the real daemon binary, connecting to it, and
//! measuring GetInfo latency from a prober of its own.

// Each benchmark compiles this module and uses its own subset of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use offloadd::parts::HostRegion;
use offloadd::proto::GetInfoRequest;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use tokio::io::AsyncBufReadExt;
use tokio::process::Child;
use tonic::transport::Channel;

/// A scratch directory for pool files (removed when dropped): in /dev/shm, or in the tmpfs
/// `OFFLOADD_BENCH_SHM` names (one mounted with `huge=always`, to measure huge pages).
pub fn shm_dir() -> tempfile::TempDir {
    let dir = std::env::var("OFFLOADD_BENCH_SHM").unwrap_or_else(|_| "/dev/shm".into());
    tempfile::Builder::new()
        .prefix("offloadd-bench-")
        .tempdir_in(&dir)
        .unwrap_or_else(|e| panic!("tempdir in {dir}: {e}"))
}

/// Starts `offloadd serve` on `uds` with pools under `pools_dir` and `roots` as model root, waits
/// for its ready line and connects. `BENCH_DAEMON_LOG` sets its log filter (default warn).
pub async fn start_daemon(uds: &Path, pools_dir: &Path, roots: &Path) -> (Child, Channel) {
    let (child, channel, _) = start_daemon_with(uds, pools_dir, roots, &[]).await;
    (child, channel)
}

/// As [`start_daemon`], with extra `serve` arguments; also returns the ready line (JSON).
pub async fn start_daemon_with(
    uds: &Path,
    pools_dir: &Path,
    roots: &Path,
    extra: &[&str],
) -> (Child, Channel, serde_json::Value) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_offloadd"));
    // The benchmarks' own knobs share the OFFLOADD_ prefix; the daemon would take them for
    // config keys and refuse to start.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("OFFLOADD_BENCH_")) {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .args(["serve", "--uds-path"])
        .arg(uds)
        .arg("--pools-dir")
        .arg(pools_dir)
        .arg("--set")
        .arg(format!("models.roots={}", roots.display()))
        .args(extra)
        .env(
            "OFFLOADD_LOG",
            std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start offloadd");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = lines
        .next_line()
        .await
        .expect("read ready line")
        .expect("ready line");
    let ready = serde_json::from_str(&ready).expect("ready line is JSON");
    let channel = offloadd::client::connect_uds(uds).await.expect("connect");
    (child, channel, ready)
}

/// CPU time `pid` has used, all its threads together, from the kernel's per-process clock.
pub fn cpu_time(pid: u32) -> Duration {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid out-pointer for the duration of the call.
    let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    assert_eq!(rc, 0, "clock_getcpuclockid: {rc}");
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; `clock` came from clock_getcpuclockid.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Min, median and max of a benchmark's per-round figures.
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// The `p` quantile of sorted latencies.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// The set of just `cpu`.
pub fn cpu_set(cpu: usize) -> rustix::thread::CpuSet {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    set
}

/// Keeps the calling thread on `cpu`.
pub fn pin_to(cpu: usize) {
    rustix::thread::sched_setaffinity(None, &cpu_set(cpu)).unwrap();
}

/// GetInfo every 5 ms from a thread, runtime and connection of its own (an operator's or a
/// probe's view) until `stop`, so its latency is the daemon's, not the queue of a saturated
/// load generator. On `cpu` when given. Returns the latencies, sorted.
pub fn prober(
    uds: PathBuf,
    stop: Arc<AtomicBool>,
    cpu: Option<usize>,
) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        if let Some(cpu) = cpu {
            pin_to(cpu);
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut c =
                    offloadd::client::offload(offloadd::client::connect_uds(&uds).await.unwrap());
                let mut lat = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let t = Instant::now();
                    c.get_info(GetInfoRequest {}).await.unwrap();
                    lat.push(t.elapsed());
                }
                lat.sort();
                lat
            })
    })
}

/// Writes a mixture-of-experts-shaped checkpoint to `path`: `n` tensors of `tensor_bytes` each,
/// named as a 1000-expert MoE names them.
pub fn write_moe_checkpoint(path: &Path, n: usize, tensor_bytes: usize) {
    let data: Vec<Vec<u8>> = (0..n)
        .map(|i| vec![(i % 251) as u8; tensor_bytes])
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                format!("model.layers.{}.mlp.experts.{}.w", i / 1000, i % 1000),
                TensorView::new(Dtype::U8, vec![tensor_bytes], d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// [`write_moe_checkpoint`] in `shards` files of `dir`, with the index that names each
/// tensor's file, as sharded checkpoints ship; returns the shards' paths.
pub fn write_moe_checkpoint_sharded(
    dir: &Path,
    n: usize,
    tensor_bytes: usize,
    shards: usize,
) -> Vec<std::path::PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let name = |i: usize| format!("model.layers.{}.mlp.experts.{}.w", i / 1000, i % 1000);
    let mut weight_map = serde_json::Map::new();
    let mut paths = Vec::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let tensors: Vec<usize> = (s * n / shards..(s + 1) * n / shards).collect();
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|&i| vec![(i % 251) as u8; tensor_bytes])
            .collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&data)
            .map(|(&i, d)| {
                (
                    name(i),
                    TensorView::new(Dtype::U8, vec![tensor_bytes], d).unwrap(),
                )
            })
            .collect();
        for (tensor, _) in &views {
            weight_map.insert(tensor.clone(), file.clone().into());
        }
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        paths.push(path);
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    paths
}

/// Writes a Llama-shaped checkpoint (hidden 2048, F16 so numpy can load it too) of about `mib` MiB in 4 shards.
pub fn write_checkpoint(dir: &Path, mib: u64) -> u64 {
    let hidden = 2048usize;
    let per_layer = [
        ("input_layernorm.weight", vec![hidden]),
        ("self_attn.q_proj.weight", vec![hidden, hidden]),
        ("self_attn.k_proj.weight", vec![hidden / 4, hidden]),
        ("self_attn.v_proj.weight", vec![hidden / 4, hidden]),
        ("self_attn.o_proj.weight", vec![hidden, hidden]),
        ("post_attention_layernorm.weight", vec![hidden]),
        ("mlp.gate_proj.weight", vec![4 * hidden, hidden]),
        ("mlp.up_proj.weight", vec![4 * hidden, hidden]),
        ("mlp.down_proj.weight", vec![hidden, 4 * hidden]),
    ];
    let layer_bytes: u64 = per_layer
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 2)
        .sum();
    let layers = ((mib << 20) / layer_bytes).max(1) as usize;
    let shards = 4;
    let per_shard = layers.div_ceil(shards);
    let mut weight_map = HashMap::new();
    let mut total = 0;
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for l in s * per_shard..((s + 1) * per_shard).min(layers) {
            for (i, (p, shape)) in per_layer.iter().enumerate() {
                let n: usize = shape.iter().product::<usize>() * 2;
                let fill = (l * 31 + i) as u8;
                owned.push((
                    format!("model.layers.{l}.{p}"),
                    shape.clone(),
                    vec![fill; n],
                ));
            }
        }
        let views: Vec<(String, TensorView<'_>)> = owned
            .iter()
            .map(|(n, s, d)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F16, s.clone(), d).unwrap(),
                )
            })
            .collect();
        for (n, _, d) in &owned {
            weight_map.insert(n.clone(), file.clone());
            total += d.len() as u64;
        }
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    total
}

/// Bytes per `pread` of the bound, as the daemon's default `models.chunk_bytes`.
pub const PREAD_CHUNK: u64 = 16 << 20;

/// The bound: every byte of every shard pread into pre-faulted shared memory, `threads` wide.
pub fn pread_bound(files: &[PathBuf], region: &HostRegion, threads: usize) -> f64 {
    pread_bound_with(files, region, threads, false)
}

/// Bytes pread and then checksummed at a time by the checksumming bound: small enough that the
/// CRC reads them back from the CPU cache.
const CRC_PIECE: u64 = 256 << 10;

/// As [`pread_bound`]; with `crc`, each piece is also checksummed (CRC32C, the daemon's crate at
/// the CPU's best instructions) while it is in the CPU cache: the least a load that verifies
/// its bytes can spend.
pub fn pread_bound_with(files: &[PathBuf], region: &HostRegion, threads: usize, crc: bool) -> f64 {
    let opened: Vec<std::fs::File> = files
        .iter()
        .map(|f| std::fs::File::open(f).unwrap())
        .collect();
    let mut work = Vec::new();
    let mut dst = 0u64;
    for (fi, f) in opened.iter().enumerate() {
        let len = f.metadata().unwrap().len();
        let mut off = 0;
        while off < len {
            let n = PREAD_CHUNK.min(len - off);
            work.push((fi, off, dst, n));
            off += n;
            dst += n;
        }
    }
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some(&(fi, off, dst, n)) = work.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    if !crc {
                        // SAFETY: each work item is a distinct destination range, taken by one
                        // thread (the shared counter hands each index out once).
                        unsafe { region.pread_from(&opened[fi], off, dst as usize, n as usize) }
                            .unwrap();
                        continue;
                    }
                    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
                    let mut done = 0;
                    while done < n {
                        let k = CRC_PIECE.min(n - done);
                        let at = (dst + done) as usize;
                        // SAFETY: as above; this thread has just written the piece.
                        unsafe {
                            region
                                .pread_from(&opened[fi], off + done, at, k as usize)
                                .unwrap();
                            digest.update(region.slice(at, k as usize));
                        }
                        done += k;
                    }
                    std::hint::black_box(digest.finalize());
                }
            });
        }
    });
    t.elapsed().as_secs_f64()
}

/// Every tensor of a model's table, following GetModel's pages.
pub async fn all_tensors(
    c: &mut offloadd::proto::offload_client::OffloadClient<Channel>,
    name: &str,
) -> Vec<offloadd::proto::TensorInfo> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let m = c
            .get_model(offloadd::proto::GetModelRequest {
                name: name.into(),
                include_tensors: true,
                page_size: 0,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(m.tensors);
        if m.next_page_token.is_empty() {
            return out;
        }
        token = m.next_page_token;
    }
}

/// The `.safetensors` files of a checkpoint directory, in name order.
pub fn shards(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

/// AttachWorker and the rest of the lease's table, page by page, as a worker reads it.
pub async fn attach_all(
    c: &mut offloadd::proto::offload_client::OffloadClient<Channel>,
    model: &str,
) -> offloadd::proto::Lease {
    let request = offloadd::proto::AttachWorkerRequest {
        model: model.into(),
        worker_name: "bench".into(),
        ..Default::default()
    };
    offloadd::worker::attach_lease(c, &request).await.unwrap()
}

/// Minor page faults of `pid` so far, all its threads together (`/proc/PID/stat`).
pub fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; minflt is the tenth field overall.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(7).unwrap().parse().unwrap()
}
