//! Models streamed from object storage: a real S3 server (s3s-fs) on 127.0.0.1, fixtures
//! uploaded through its API, the real daemon reading them over SigV4, and a TCP proxy between
//! them that drops connections, answers 503 and holds answers.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use common::ckpt::{self, Tensor};
use common::pages::model_rows;
use common::s3::{self, Fault, Proxy, S3Server};
use common::{Daemon, DaemonBuilder, Scratch, cpu_pool};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    GetModelRequest, GetPoolRequest, ModelState, RegisterModelRequest, UnregisterModelRequest,
    WatchModelRequest,
};
use tonic::Code;
use tonic::transport::Channel;

const POOL_BYTES: u64 = 256 << 20;

/// A server, a proxy in front of it, and the files a daemon needs to reach it through the proxy.
struct Env {
    s3: S3Server,
    proxy: Proxy,
    scratch: Scratch,
    creds: PathBuf,
    config: PathBuf,
}

impl Env {
    async fn new() -> Self {
        Self::with_timeout(10).await
    }

    /// With `models.fetch_timeout_secs` = `secs`.
    async fn with_timeout(secs: u64) -> Self {
        let s3 = S3Server::start().await;
        let proxy = Proxy::start(s3.addr).await;
        let scratch = Scratch::new();
        let creds = scratch.path("s3-credentials.toml");
        s3::write_credentials(&creds, s3::ACCESS_KEY, s3::SECRET_KEY);
        let config = scratch.path("offloadd.toml");
        std::fs::write(
            &config,
            format!(
                "[models]\nfetch_part_bytes = 262144\nfetch_retries = 4\nfetch_timeout_secs = {secs}\n\n{}",
                s3::remote_config(proxy.addr, "", &creds)
            ),
        )
        .unwrap();
        Self {
            s3,
            proxy,
            scratch,
            creds,
            config,
        }
    }

    fn daemon(&self) -> DaemonBuilder<'_> {
        DaemonBuilder::new(&self.scratch)
            .arg("--config")
            .arg(self.config.to_str().unwrap())
    }

    async fn start(&self) -> (Daemon, OffloadClient<Channel>) {
        let d = self.daemon().start().await.unwrap();
        let c = d.client().await;
        (d, c)
    }
}

fn register(name: &str, url: &str, wait: bool) -> RegisterModelRequest {
    RegisterModelRequest {
        name: name.into(),
        pool: "p".into(),
        path: url.into(),
        wait,
        backend: None,
    }
}

/// Every tensor of the model has the CRC32C of the fixture's bytes (an independent crc32c).
async fn assert_byte_equal(c: &mut OffloadClient<Channel>, name: &str, tensors: &[Tensor]) {
    let first = c
        .get_model(GetModelRequest {
            name: name.into(),
            include_tensors: true,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.state(), ModelState::Ready);
    let rows = model_rows(c, first, 0).await;
    assert_eq!(rows.len(), tensors.len());
    let want: HashMap<&str, &Tensor> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    for r in rows {
        let t = want[r.name.as_str()];
        assert_eq!(r.length, t.data.len() as u64, "{}", r.name);
        assert_eq!(r.crc32c, crc32c::crc32c(&t.data), "{}", r.name);
    }
}

/// Follows WatchModel until the model is READY.
async fn settle_ready(c: &mut OffloadClient<Channel>, name: &str) {
    let mut w = c
        .watch_model(WatchModelRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner();
    loop {
        let p = tokio::time::timeout(common::DEADLINE, w.message())
            .await
            .expect("an update in time")
            .unwrap()
            .expect("a final state");
        match p.state() {
            ModelState::Ready => return,
            ModelState::Loading => continue,
            s => panic!("{name}: {s:?}: {}", p.error),
        }
    }
}

async fn used_bytes(c: &mut OffloadClient<Channel>) -> u64 {
    c.get_pool(GetPoolRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner()
        .used_bytes
}

#[tokio::test]
async fn sharded_and_100k_tensor_checkpoints_stream_from_s3_byte_equal() {
    let env = Env::new().await;
    let llama = ckpt::llama(4, 256, 2048);
    let dir = env.scratch.models().join("llama");
    ckpt::write_sharded(&dir, &llama, 3);
    env.s3.put_dir("llama", &dir).await;
    let experts = ckpt::experts(100_000);
    let file = env.scratch.models().join("experts.safetensors");
    ckpt::write_file(&file, &experts);
    env.s3.put_file("moe/experts.safetensors", &file).await;

    let (d, mut c) = env.start().await;
    cpu_pool(&mut c, "p", POOL_BYTES).await;
    let m = c
        .register_model(register("llama", "s3://models/llama/", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.path, "s3://models/llama/");
    assert_eq!(m.source_objects.len(), 3, "one per shard: {m:?}");
    for o in &m.source_objects {
        assert!(o.url.starts_with("s3://models/llama/model-0000"), "{o:?}");
        assert!(!o.etag.is_empty() && o.size > 0 && o.last_modified_unix_ms > 0);
    }
    assert_byte_equal(&mut c, "llama", &llama).await;

    let m = c
        .register_model(register("moe", "s3://models/moe/experts.safetensors", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.tensor_count, 100_000);
    assert_byte_equal(&mut c, "moe", &experts).await;
    assert!(!d.logs().contains(s3::SECRET_KEY));
}

#[tokio::test]
async fn refusals_name_the_object_and_never_the_secret() {
    let env = Env::new().await;
    let tensors = ckpt::llama(1, 64, 128);
    let file = env.scratch.models().join("m.safetensors");
    ckpt::write_file(&file, &tensors);
    env.s3.put_file("one/m.safetensors", &file).await;
    // The index lists the last tensor in the second shard, and the first holds it as well.
    let twice = env.scratch.models().join("twice");
    ckpt::write_sharded(&twice, &tensors, 2);
    let mut first = tensors[..tensors.len().div_ceil(2)].to_vec();
    first.push(tensors.last().unwrap().clone());
    ckpt::write_file(&twice.join("model-00001-of-00002.safetensors"), &first);
    env.s3.put_dir("twice", &twice).await;
    let (d, mut c) = env.start().await;
    cpu_pool(&mut c, "p", POOL_BYTES).await;

    let refused = |code: Code, url: &'static str| {
        let mut c = c.clone();
        async move {
            let e = c
                .register_model(register("m", url, true))
                .await
                .expect_err(url);
            assert_eq!(e.code(), code, "{url}: {}", e.message());
            assert!(!e.message().contains(s3::SECRET_KEY), "{}", e.message());
            e.message().to_string()
        }
    };
    let why = refused(Code::NotFound, "s3://models/one/missing.safetensors").await;
    assert!(why.contains("s3://models/one/missing.safetensors"), "{why}");
    let why = refused(Code::NotFound, "s3://models/empty/").await;
    assert!(why.contains("model.safetensors.index.json"), "{why}");
    let why = refused(Code::PermissionDenied, "s3://other-bucket/m.safetensors").await;
    assert!(why.contains("models.remotes"), "{why}");
    refused(
        Code::InvalidArgument,
        "s3://AKIA:x@models/one/m.safetensors",
    )
    .await;
    refused(
        Code::InvalidArgument,
        "s3://models/one/../one/m.safetensors",
    )
    .await;

    // The credentials file is read at each registration: a rotated, wrong secret is refused by
    // the server, and the answer names the bucket and key.
    s3::write_credentials(&env.creds, s3::ACCESS_KEY, "not-the-secret");
    let why = refused(Code::PermissionDenied, "s3://models/one/m.safetensors").await;
    assert!(
        why.contains("\"models\"") && why.contains("one/m.safetensors"),
        "{why}"
    );
    s3::write_credentials(&env.creds, s3::ACCESS_KEY, s3::SECRET_KEY);
    let why = refused(Code::InvalidArgument, "s3://models/twice/").await;
    for part in [
        tensors.last().unwrap().name.as_str(),
        "twice/model-00001-of-00002.safetensors",
        "twice/model-00002-of-00002.safetensors",
    ] {
        assert!(why.contains(part), "{part}: {why}");
    }
    assert_eq!(used_bytes(&mut c).await, 0, "nothing half-registered");

    c.register_model(register("m", "s3://models/one/m.safetensors", true))
        .await
        .unwrap();
    assert_byte_equal(&mut c, "m", &tensors).await;
    assert!(!d.logs().contains(s3::SECRET_KEY));
}

#[tokio::test]
async fn dropped_connections_stalls_and_503_bursts_are_retried_to_a_correct_model() {
    // A stalled answer ends only by the fetch timeout: 2 s keeps the test short.
    let env = Env::with_timeout(2).await;
    let tensors = ckpt::llama(2, 256, 1024);
    let file = env.scratch.models().join("m.safetensors");
    ckpt::write_file(&file, &tensors);
    env.s3.put_file("m.safetensors", &file).await;
    let (_d, mut c) = env.start().await;
    cpu_pool(&mut c, "p", POOL_BYTES).await;

    let faults = [
        // Connections cut 100 KB into an answer: each 256 KiB part breaks off mid-body.
        (
            "dropped",
            Fault::DropAfter {
                after: 100_000,
                connections: 6,
            },
        ),
        ("throttled", Fault::ServiceUnavailable { requests: 3 }),
        // Answers that stop 100 KB in and stay open: timed out, then fetched again.
        (
            "stalled",
            Fault::StallAfter {
                after: 100_000,
                connections: 2,
            },
        ),
    ];
    for (name, fault) in faults {
        env.proxy.set(fault).await;
        c.register_model(register(name, "s3://models/m.safetensors", true))
            .await
            .unwrap();
        assert_byte_equal(&mut c, name, &tensors).await;
    }
}

#[tokio::test]
async fn an_object_changed_during_the_load_fails_cleanly() {
    let env = Env::new().await;
    let tensors = ckpt::llama(2, 256, 1024);
    let file = env.scratch.models().join("m.safetensors");
    ckpt::write_file(&file, &tensors);
    env.s3.put_file("m.safetensors", &file).await;
    // One part at a time, so that parts are still to be asked for once the object changed
    // (a part already streaming keeps reading the version it started with).
    let d = env
        .daemon()
        .env("OFFLOADD_MODELS__FETCH_CONCURRENCY", "1")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    cpu_pool(&mut c, "p", POOL_BYTES).await;

    // Past the header reads and into the first parts, the answers wait.
    env.proxy.set(Fault::HoldAfter { after: 600_000 }).await;
    let load = {
        let mut c = c.clone();
        tokio::spawn(async move {
            c.register_model(register("m", "s3://models/m.safetensors", true))
                .await
        })
    };
    env.proxy.until_holding().await;
    // A new upload of the object: the ETag changes under the load.
    let mut changed = std::fs::read(&file).unwrap();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    env.s3.put("m.safetensors", changed).await;
    env.proxy.release();
    let e = load.await.unwrap().expect_err("a changed object");
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());
    assert!(
        e.message().contains("changed while it was read"),
        "{}",
        e.message()
    );
    assert_eq!(used_bytes(&mut c).await, 0, "its ranges are freed");
    assert!(!d.logs().contains(s3::SECRET_KEY));

    // Registered again, the new version loads, with its new ETag.
    let m = c
        .register_model(register("m", "s3://models/m.safetensors", true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state(), ModelState::Ready);
}

#[tokio::test]
async fn unregister_cancels_a_remote_load_and_frees_its_ranges() {
    let env = Env::new().await;
    let tensors = ckpt::llama(2, 256, 1024);
    let file = env.scratch.models().join("m.safetensors");
    ckpt::write_file(&file, &tensors);
    env.s3.put_file("m.safetensors", &file).await;
    let (_d, mut c) = env.start().await;
    cpu_pool(&mut c, "p", POOL_BYTES).await;
    env.proxy.set(Fault::HoldAfter { after: 600_000 }).await;
    c.register_model(register("m", "s3://models/m.safetensors", false))
        .await
        .unwrap();
    env.proxy.until_holding().await;
    assert!(used_bytes(&mut c).await > 0);
    c.unregister_model(UnregisterModelRequest { name: "m".into() })
        .await
        .unwrap();
    assert_eq!(used_bytes(&mut c).await, 0);
    env.proxy.release();
}

#[tokio::test]
async fn sigkill_mid_load_then_restart_adopts_what_was_ready_without_a_get() {
    let env = Env::new().await;
    let tensors = ckpt::llama(2, 256, 1024);
    let file = env.scratch.models().join("m.safetensors");
    ckpt::write_file(&file, &tensors);
    env.s3.put_file("m.safetensors", &file).await;
    let (d, mut c) = env.start().await;
    cpu_pool(&mut c, "p", POOL_BYTES).await;
    c.register_model(register("ready", "s3://models/m.safetensors", true))
        .await
        .unwrap();
    let ready_bytes = used_bytes(&mut c).await;
    let before = env.proxy.down_bytes.load(Ordering::Relaxed);
    env.proxy
        .set(Fault::HoldAfter {
            after: before + 600_000,
        })
        .await;
    c.register_model(register("loading", "s3://models/m.safetensors", false))
        .await
        .unwrap();
    env.proxy.until_holding().await;
    let mut d = d;
    d.signal(rustix::process::Signal::KILL);
    d.child.wait().await.unwrap();
    env.proxy.release();

    let connections = env.proxy.connections.load(Ordering::Relaxed);
    let (d, mut c) = env.start().await;
    let m = c
        .get_model(GetModelRequest {
            name: "ready".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(m.adopted);
    assert_eq!(m.path, "s3://models/m.safetensors");
    assert_eq!(m.source_objects.len(), 1);
    settle_ready(&mut c, "ready").await;
    assert_byte_equal(&mut c, "ready", &tensors).await;
    let e = c
        .get_model(GetModelRequest {
            name: "loading".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "a load that never finished is not adopted"
    );
    assert_eq!(used_bytes(&mut c).await, ready_bytes);
    assert_eq!(
        env.proxy.connections.load(Ordering::Relaxed),
        connections,
        "the restart asked the store for nothing"
    );
    drop(d);
}

/// The same URL registered again after its object changed is a new version: its own ETag and
/// bytes, while the model registered before keeps serving the version it read.
#[tokio::test]
async fn a_changed_object_registers_as_a_new_version_beside_the_old_one() {
    let env = Env::new().await;
    let url = "s3://models/ver/model.safetensors";
    let (old, new) = (ckpt::llama(2, 128, 512), ckpt::llama(3, 128, 512));
    for (name, tensors) in [("old", &old), ("new", &new)] {
        let file = env.scratch.models().join(format!("{name}.safetensors"));
        ckpt::write_file(&file, tensors);
    }
    env.s3
        .put_file(
            "ver/model.safetensors",
            &env.scratch.models().join("old.safetensors"),
        )
        .await;
    let (d, mut c) = env.start().await;
    cpu_pool(&mut c, "p", POOL_BYTES).await;
    let v1 = c
        .register_model(register("v1", url, true))
        .await
        .unwrap()
        .into_inner();
    env.s3
        .put_file(
            "ver/model.safetensors",
            &env.scratch.models().join("new.safetensors"),
        )
        .await;
    let v2 = c
        .register_model(register("v2", url, true))
        .await
        .unwrap()
        .into_inner();
    let etag = |m: &offloadd::proto::Model| m.source_objects[0].etag.clone();
    assert_ne!(etag(&v1), etag(&v2), "a changed object has a new ETag");
    assert_byte_equal(&mut c, "v1", &old).await;
    assert_byte_equal(&mut c, "v2", &new).await;
    let again = c
        .get_model(GetModelRequest {
            name: "v1".into(),
            include_tensors: false,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        etag(&again),
        etag(&v1),
        "v1 still names the version it read"
    );
    assert!(d.terminate().await.success());
}
