//! What the benchmarks share: starting the real daemon binary and connecting to it.

use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncBufReadExt;
use tokio::process::Child;
use tonic::transport::Channel;

/// Starts `offloadd serve` on `uds` with pools under `pools_dir` and `roots` as model root, waits
/// for its ready line and connects. `BENCH_DAEMON_LOG` sets its log filter (default warn).
pub async fn start_daemon(uds: &Path, pools_dir: &Path, roots: &Path) -> (Child, Channel) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_offloadd"))
        .args(["serve", "--uds-path"])
        .arg(uds)
        .arg("--pools-dir")
        .arg(pools_dir)
        .arg("--set")
        .arg(format!("models.roots={}", roots.display()))
        .env(
            "OFFLOADD_LOG",
            std::env::var("BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start offloadd");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    lines
        .next_line()
        .await
        .expect("read ready line")
        .expect("ready line");
    let channel = offloadd::client::connect_uds(uds).await.expect("connect");
    (child, channel)
}
