//! What the benchmarks share: starting the real daemon binary, connecting to it, and
//! measuring GetInfo latency from a prober of its own.

// Each benchmark compiles this module and uses its own subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use offloadd::proto::GetInfoRequest;
use tokio::io::AsyncBufReadExt;
use tokio::process::Child;
use tonic::transport::Channel;

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
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_offloadd"))
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

/// The `p` quantile of sorted latencies.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// GetInfo every 5 ms from a thread, runtime and connection of its own (an operator's or a
/// probe's view) until `stop`, so its latency is the daemon's, not the queue of a saturated
/// load generator. Returns the latencies, sorted.
pub fn prober(uds: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
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
