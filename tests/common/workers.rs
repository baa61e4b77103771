//! Helpers for tests that run worker processes against the daemon.

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::{DEADLINE, Daemon, DaemonBuilder, Scratch, ckpt};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    AttachWorkerRequest, Backend, CreatePoolRequest, DetachWorkerRequest, GetModelRequest,
    GetPoolRequest, OnloadToStaticRequest, Placement, PrefetchConfig, RegisterModelRequest,
    SetBackendRequest, UnregisterModelRequest, UvaConfig, UvaMode,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tonic::Code;
use tonic::transport::Channel;

pub const WORKER: &str = env!("CARGO_BIN_EXE_offloadd-worker");
pub const LAYERS: u32 = 5;

pub struct Fixture {
    pub s: Scratch,
    pub d: Daemon,
    pub c: OffloadClient<Channel>,
    pub ckpt: PathBuf,
}

pub async fn fixture(builder: impl FnOnce(DaemonBuilder<'_>) -> DaemonBuilder<'_>) -> Fixture {
    let llama = ckpt::llama(LAYERS, 128, 256);
    fixture_of(&llama, "m.safetensors", 8 << 20, builder).await
}

/// A daemon serving a mixture-of-experts checkpoint of `n` 4-byte tensors, registered as `moe`
/// in a 64 MiB pool `p` (each tensor takes 256 bytes of it: room for 200k and more).
pub async fn moe_fixture(n: usize) -> Fixture {
    let mut f = fixture_of(&ckpt::experts(n), "moe.safetensors", 64 << 20, |b| b).await;
    register(&mut f.c, "moe", &f.ckpt, None).await;
    f
}

/// A daemon with `tensors` written to `file` under its roots and an empty cpu pool `p`.
pub async fn fixture_of(
    tensors: &[ckpt::Tensor],
    file: &str,
    pool_bytes: u64,
    builder: impl FnOnce(DaemonBuilder<'_>) -> DaemonBuilder<'_>,
) -> Fixture {
    let s = Scratch::new();
    let root = s.models();
    let ckpt = root.join(file);
    ckpt::write_file(&ckpt, tensors);
    let d = builder(DaemonBuilder::new(&s).roots(&[&root]))
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: pool_bytes,
    })
    .await
    .unwrap();
    Fixture { s, d, c, ckpt }
}

pub async fn register(
    c: &mut OffloadClient<Channel>,
    name: &str,
    path: &Path,
    backend: Option<Backend>,
) {
    c.register_model(RegisterModelRequest {
        name: name.into(),
        pool: "p".into(),
        path: path.display().to_string(),
        wait: true,
        backend,
    })
    .await
    .unwrap();
}

pub fn prefetch(g: u32, n: u32, step: u32) -> PrefetchConfig {
    PrefetchConfig {
        group_size: g,
        num_in_group: n,
        prefetch_step: step,
        params: vec![],
    }
}

pub struct WorkerProc {
    pub child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    pub fn spawn(d: &Daemon, model: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(WORKER)
            .arg("--uds")
            .arg(&d.uds)
            .args(["--model", model])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    pub async fn next(&mut self) -> Value {
        let line = tokio::time::timeout(DEADLINE, self.lines.next_line())
            .await
            .expect("worker output in time")
            .unwrap();
        serde_json::from_str(&line.expect("worker printed a line")).unwrap()
    }

    /// Runs to completion; returns the "done" line.
    pub async fn finish(mut self) -> Value {
        let attached = self.next().await;
        assert_eq!(attached["event"], "attached", "{attached}");
        self.wait_done().await
    }

    /// After "attached" was read: waits for "done" and a clean exit.
    pub async fn wait_done(mut self) -> Value {
        let done = self.next().await;
        assert_eq!(done["event"], "done", "{done}");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        done
    }
}

pub async fn attached_workers(c: &mut OffloadClient<Channel>, model: &str) -> u32 {
    c.get_model(GetModelRequest {
        name: model.into(),
        include_tensors: false,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .attached_workers
}

/// A prefetch backend for RegisterModel, as `uva` is for uva.
pub fn prefetched(g: u32, n: u32, step: u32) -> Option<Backend> {
    Some(prefetch(g, n, step).into())
}

/// A uva backend with the given budget and no parameter filter.
pub fn uva(cpu_offload_bytes: u64) -> Option<Backend> {
    Some(
        UvaConfig {
            cpu_offload_bytes,
            params: vec![],
        }
        .into(),
    )
}

/// Attaches as `worker` with the default ttl.
pub async fn attach(
    c: &mut OffloadClient<Channel>,
    model: &str,
    worker: &str,
) -> offloadd::proto::Lease {
    c.attach_worker(AttachWorkerRequest {
        model: model.into(),
        worker_name: worker.into(),
        ttl_ms: 0,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}
