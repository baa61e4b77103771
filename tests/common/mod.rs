//! Test harness: starts the real `offloadd` binary as a child process with an isolated
//! environment, waits for its readiness line, and hands out real clients.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use offloadd::proto::offload_client::OffloadClient;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

pub mod ckpt;
pub mod pages;
pub mod restart;
pub mod s3;
pub mod tmpfs;
pub mod workers;

pub const BIN: &str = env!("CARGO_BIN_EXE_offloadd");

/// Upper bound for anything a test waits on; a hang fails the test instead of wedging CI.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A scratch area for one daemon: socket, pool directory and config file.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub shm: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            shm: tempfile::Builder::new()
                .prefix("offloadd-test-")
                .tempdir_in("/dev/shm")
                .expect("tempdir in /dev/shm"),
        }
    }
    pub fn uds(&self) -> PathBuf {
        self.dir.path().join("offloadd.sock")
    }
    pub fn pools_dir(&self) -> PathBuf {
        self.shm.path().join("pools")
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A directory for checkpoints, to be used as a model root.
    pub fn models(&self) -> PathBuf {
        let p = self.dir.path().join("models");
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

/// How to start one daemon.
pub struct DaemonBuilder<'a> {
    scratch: &'a Scratch,
    env: BTreeMap<String, String>,
    args: Vec<String>,
    tcp: bool,
    wrapper: Vec<String>,
}

impl<'a> DaemonBuilder<'a> {
    pub fn new(scratch: &'a Scratch) -> Self {
        let mut env = BTreeMap::new();
        env.insert("OFFLOADD_LOG".into(), "offloadd=debug,info".into());
        env.insert("OFFLOADD_LOG__FORMAT".into(), "json".into());
        env.insert("OFFLOADD_SERVER__DRAIN_TIMEOUT_MS".into(), "20000".into());
        Self {
            scratch,
            env,
            args: Vec::new(),
            tcp: false,
            wrapper: Vec::new(),
        }
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.insert(k.into(), v.into());
        self
    }
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }
    /// Sets `models.roots`.
    pub fn roots(self, roots: &[&Path]) -> Self {
        let joined: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        self.arg("--set")
            .arg(&format!("models.roots={}", joined.join(",")))
    }
    /// Any `--set KEY=VALUE`.
    pub fn set(self, kv: &str) -> Self {
        self.arg("--set").arg(kv)
    }
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
    /// Runs the daemon under another program, e.g. `capsh` to drop a capability.
    pub fn wrapper(mut self, argv: &[&str]) -> Self {
        self.wrapper = argv.iter().map(|s| s.to_string()).collect();
        self
    }

    fn command(&self) -> (Command, PathBuf) {
        let log = self.scratch.path(&format!("daemon-{}.log", rand_suffix()));
        let mut cmd = if self.wrapper.is_empty() {
            Command::new(BIN)
        } else {
            let mut c = Command::new(&self.wrapper[0]);
            c.args(&self.wrapper[1..]);
            c.arg(BIN);
            c
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&self.env)
            .arg("serve")
            .arg("--uds-path")
            .arg(self.scratch.uds())
            .arg("--pools-dir")
            .arg(self.scratch.pools_dir())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .kill_on_drop(true);
        if self.tcp {
            cmd.arg("--tcp-addr").arg("127.0.0.1:0");
        }
        (cmd, log)
    }

    /// Starts the daemon and waits for its readiness line.
    pub async fn start(self) -> Result<Daemon> {
        match self.try_start().await? {
            Started::Ready(d) => Ok(*d),
            Started::Exited { status, stderr } => {
                bail!("daemon exited before ready with {status}: {stderr}")
            }
        }
    }

    /// Starts the daemon; reports an early exit instead of failing.
    pub async fn try_start(self) -> Result<Started> {
        let (mut cmd, log) = self.command();
        let mut child = cmd.spawn().context("spawn offloadd")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let first = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .context("daemon did not become ready in time")??;
        let Some(line) = first else {
            let status = tokio::time::timeout(DEADLINE, child.wait()).await??;
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            return Ok(Started::Exited { status, stderr });
        };
        let ready: serde_json::Value = serde_json::from_str(&line).context("ready line")?;
        assert_eq!(ready["event"], "ready", "unexpected first line {line}");
        let tcp = ready["tcp"].as_str().map(|s| s.parse()).transpose()?;
        let metrics = ready["metrics"].as_str().map(|s| s.parse()).transpose()?;
        Ok(Started::Ready(Box::new(Daemon {
            child,
            uds: PathBuf::from(ready["uds"].as_str().expect("uds")),
            tcp,
            metrics,
            log,
        })))
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub enum Started {
    Ready(Box<Daemon>),
    Exited { status: ExitStatus, stderr: String },
}

/// A running daemon process.
pub struct Daemon {
    pub child: Child,
    pub uds: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    pub async fn channel(&self) -> Channel {
        offloadd::client::connect_uds(&self.uds)
            .await
            .expect("connect over the unix socket")
    }

    pub async fn client(&self) -> OffloadClient<Channel> {
        OffloadClient::new(self.channel().await)
    }

    pub async fn tcp_client(&self) -> OffloadClient<Channel> {
        let addr = self.tcp.expect("daemon started with tcp");
        OffloadClient::new(
            offloadd::client::connect_tcp(addr)
                .await
                .expect("connect tcp"),
        )
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).expect("pid");
        rustix::process::kill_process(pid, sig).expect("kill");
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("daemon exits after SIGTERM")
            .expect("wait")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a JSON log line satisfies `pred`, by following the log file. The daemon flushes
    /// each line as it logs, so this is synchronisation on an event, not on time.
    pub async fn wait_for_log(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut offset = 0usize;
        let file = std::fs::File::open(&self.log).expect("log");
        let mut reader = BufReader::new(file);
        let mut buf = String::new();
        loop {
            buf.clear();
            let n = reader.read_line(&mut buf).expect("read log");
            if n > 0 && buf.ends_with('\n') {
                offset += n;
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&buf) {
                    if pred(&v) {
                        return v;
                    }
                }
                continue;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "log line not seen within {DEADLINE:?} (read {offset} bytes)"
            );
            // At end of file: yield to let the daemon write more.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if n > 0 {
                // A partial line: rewind so it is re-read whole.
                use std::io::Seek;
                reader
                    .seek(std::io::SeekFrom::Start(offset as u64))
                    .expect("seek");
            }
        }
    }
}

/// Runs `offloadd` with arguments and an explicit environment; returns (status, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let out = std::process::Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run offloadd");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

/// The daemon's Prometheus text, fetched over real HTTP from `metrics.addr`.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("response");
    out
}

/// The value of the sample whose line starts with `prefix` (metric name and labels), if the
/// family has one yet (a counter appears once first incremented).
pub fn try_sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The value of the sample whose line starts with `prefix`; panics, showing the scrape, if
/// there is none.
pub fn sample(body: &str, prefix: &str) -> f64 {
    try_sample(body, prefix).unwrap_or_else(|| panic!("no sample {prefix} in:\n{body}"))
}

/// Creates a pool on the cpu device; panics with the daemon's status on failure.
/// A RegisterModel request with no backend.
pub fn registration(
    name: &str,
    pool: &str,
    path: &Path,
    wait: bool,
) -> offloadd::proto::RegisterModelRequest {
    offloadd::proto::RegisterModelRequest {
        name: name.into(),
        pool: pool.into(),
        path: path.display().to_string(),
        wait,
        backend: None,
    }
}

pub async fn cpu_pool(c: &mut OffloadClient<Channel>, name: &str, size: u64) {
    c.create_pool(offloadd::proto::CreatePoolRequest {
        name: name.into(),
        device: "cpu".into(),
        size_bytes: size,
    })
    .await
    .unwrap();
}
