//! What the benchmarks share: starting the real daemon binary and connecting to it.

use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncBufReadExt;
use tokio::process::Child;
use tonic::transport::Channel;

/// Starts `offloadd serve` on `uds` with pools under `pools_dir` and `roots` as model root, waits
/// for its ready line and connects. `BENCH_DAEMON_LOG` sets its log filter (default warn).
#[allow(dead_code)] // benches/load.rs needs extra arguments and calls start_daemon_with
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
