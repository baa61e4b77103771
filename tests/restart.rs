//! A daemon restart loses nothing: pools and READY models come back from the journal in
//! `pools.dir` after SIGKILL or SIGTERM, verified; whatever does not match is dropped with the
//! reason (a journal that cannot be trusted: tests/journal_damage.rs). Real binary, real files.

mod common;

use std::collections::HashMap;

use common::Daemon;
use common::ckpt::{self, Tensor};
use common::restart::{
    Setup, assert_next_start_finds_no_journal, pool_files, recovery, refused, register,
    stopped_with_one_model,
};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    GetModelRequest, GetPoolRequest, ModelState, RegisterModelRequest, WatchModelRequest,
};
use rustix::process::Signal;
use tonic::Code;
use tonic::transport::Channel;

/// The model's WatchModel stream, each update within the test deadline.
struct Watch(tonic::Streaming<offloadd::proto::ModelProgress>);

impl Watch {
    async fn new(c: &mut OffloadClient<Channel>, name: &str) -> Self {
        let s = c
            .watch_model(WatchModelRequest { name: name.into() })
            .await
            .unwrap();
        Self(s.into_inner())
    }

    async fn next(&mut self) -> offloadd::proto::ModelProgress {
        tokio::time::timeout(common::DEADLINE, self.0.message())
            .await
            .expect("an update in time")
            .unwrap()
            .expect("the stream ends only after a final state")
    }
}

/// Follows WatchModel until the model is READY or FAILED; returns the last update.
async fn settle(c: &mut OffloadClient<Channel>, name: &str) -> offloadd::proto::ModelProgress {
    let mut w = Watch::new(c, name).await;
    loop {
        let p = w.next().await;
        if matches!(p.state(), ModelState::Ready | ModelState::Failed) {
            return p;
        }
    }
}

/// Waits until a load has copied some bytes but not all: a load in flight.
async fn until_partly_loaded(c: &mut OffloadClient<Channel>, name: &str) {
    let mut w = Watch::new(c, name).await;
    loop {
        let p = w.next().await;
        assert_eq!(p.state(), ModelState::Loading, "the load must still run");
        if p.loaded_bytes > 0 {
            return;
        }
    }
}

async fn kill(mut d: Daemon) {
    d.signal(Signal::KILL);
    d.child.wait().await.unwrap();
}

async fn pool(c: &mut OffloadClient<Channel>, name: &str) -> offloadd::proto::Pool {
    c.get_pool(GetPoolRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn table(c: &mut OffloadClient<Channel>, name: &str) -> offloadd::proto::Model {
    c.get_model(GetModelRequest {
        name: name.into(),
        include_tensors: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Bytes the allocator holds for a model: every tensor rounded up to 256.
fn blocks(m: &offloadd::proto::Model) -> u64 {
    m.tensors
        .iter()
        .map(|t| t.length.max(1).div_ceil(256) * 256)
        .sum()
}

/// Reads the pool file itself, as an independent reader would, and compares every tensor of
/// the model with the checkpoint's bytes.
fn assert_pool_holds(pool_path: &str, m: &offloadd::proto::Model, want: &[Tensor]) {
    let pool = std::fs::read(pool_path).unwrap();
    let want: HashMap<&str, &Tensor> = want.iter().map(|t| (t.name.as_str(), t)).collect();
    assert_eq!(m.tensors.len(), want.len());
    for t in &m.tensors {
        let got = &pool[t.offset as usize..(t.offset + t.length) as usize];
        assert!(
            got == want[t.name.as_str()].data,
            "tensor {} differs",
            t.name
        );
    }
}

/// The crash (or stop) case: A is READY, B is mid-load when the daemon goes. The next start
/// brings A back, verified, with its bytes where they were; B is gone and its ranges free.
async fn survives(signal: Signal) {
    let st = Setup::new();
    let a_tensors = ckpt::llama(4, 128, 256);
    let a = st.checkpoint("a", &a_tensors);
    // About 20 MB read at 4 MiB/s in 1 MiB chunks: seconds of LOADING to stop it in.
    let b = st.checkpoint("b", &ckpt::llama(4, 512, 1024));
    let d = st
        .daemon()
        .set("models.max_load_bytes_per_sec=4194304")
        .set("models.chunk_bytes=1048576")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 64 << 20).await;
    register(&mut c, "a", "p", &a, false).await;
    assert_eq!(settle(&mut c, "a").await.state(), ModelState::Ready);
    register(&mut c, "b", "p", &b, false).await;
    until_partly_loaded(&mut c, "b").await;
    match signal {
        Signal::KILL => kill(d).await,
        _ => assert!(d.terminate().await.success()),
    }

    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    let r = recovery(&mut c).await;
    assert_eq!(r.journal, "applied", "{r:?}");
    assert_eq!(r.pools_adopted, vec!["p"]);
    assert_eq!(r.models_adopted, vec!["a"]);
    assert!(r.dropped.is_empty(), "{r:?}");
    assert_eq!(settle(&mut c, "a").await.state(), ModelState::Ready);
    let m = table(&mut c, "a").await;
    assert!(m.adopted);
    assert_eq!(
        m.load_seconds, 0.0,
        "nothing was read from the checkpoint at this start"
    );
    let e = refused(&mut c, "b").await;
    assert_eq!(e.code(), Code::NotFound, "the partial load is gone");
    // An attach waits for the adopted pool's pin (applied in the background) to settle; then
    // the pool is pinned as it was, on the same machine and settings.
    common::workers::attach(&mut c, "a", "w").await;
    let p = pool(&mut c, "p").await;
    assert!(p.adopted);
    assert_eq!(p.previously_pinned, Some(p.pinned), "{p:?}");
    assert_eq!(p.used_bytes, blocks(&m), "exactly A's ranges are taken");
    assert_pool_holds(&p.path, &m, &a_tensors);
    // B's ranges are free: it loads again.
    register(&mut c, "b", "p", &b, true).await;
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn sigkill_during_a_load_keeps_ready_models_and_drops_the_partial_one() {
    survives(Signal::KILL).await;
}

#[tokio::test]
async fn sigterm_during_a_load_keeps_ready_models_and_drops_the_partial_one() {
    survives(Signal::TERM).await;
}

#[tokio::test]
async fn a_pool_changed_while_down_drops_its_model_and_spares_the_others() {
    let st = Setup::new();
    let a = st.checkpoint("a", &ckpt::llama(3, 128, 256));
    let keep_tensors = ckpt::llama(2, 64, 128);
    let keep = st.checkpoint("keep", &keep_tensors);
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 8 << 20).await;
    register(&mut c, "a", "p", &a, true).await;
    register(&mut c, "keep", "p", &keep, true).await;
    let victim = table(&mut c, "a").await.tensors[2].clone();
    let pool_path = pool(&mut c, "p").await.path;
    kill(d).await;

    // One byte of one of A's tensors changes while no daemon runs.
    let mut raw = std::fs::read(&pool_path).unwrap();
    raw[victim.offset as usize] ^= 0x5a;
    std::fs::write(&pool_path, &raw).unwrap();

    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    // Verification runs after the ready line; its verdict is logged (and kept in GetInfo).
    let dropped = d
        .wait_for_log(|v| v["message"] == "dropped from the journal" && v["name"] == "a")
        .await;
    let why = dropped["reason"].as_str().unwrap().to_string();
    for part in [
        victim.name.as_str(),
        "crc32c",
        "changed while offloadd was down",
    ] {
        assert!(why.contains(part), "{part:?} in {why}");
    }
    assert_eq!(settle(&mut c, "keep").await.state(), ModelState::Ready);
    let e = refused(&mut c, "a").await;
    assert_eq!(e.code(), Code::NotFound);
    let r = recovery(&mut c).await;
    assert_eq!(r.models_adopted, vec!["keep"]);
    assert_eq!(r.dropped.len(), 1, "{r:?}");
    assert_eq!(
        (r.dropped[0].kind.as_str(), r.dropped[0].name.as_str()),
        ("model", "a")
    );
    assert_eq!(r.dropped[0].reason, why);
    let kept = table(&mut c, "keep").await;
    let p = pool(&mut c, "p").await;
    assert_eq!(p.used_bytes, blocks(&kept), "A's ranges are free again");
    assert_pool_holds(&p.path, &kept, &keep_tensors);
    // A registers again, and is what survives the next restart.
    register(&mut c, "a", "p", &a, true).await;
    kill(d).await;
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    assert_eq!(settle(&mut c, "a").await.state(), ModelState::Ready);
    assert_eq!(recovery(&mut c).await.models_adopted, vec!["a", "keep"]);
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn a_checkpoint_changed_while_down_drops_its_model() {
    let st = Setup::new();
    let (_, path) = stopped_with_one_model(&st).await;
    // Same tensors, new bytes: the pool copy is stale.
    ckpt::write_file(&path, &ckpt::llama(3, 128, 300));
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    let r = recovery(&mut c).await;
    assert_eq!(r.pools_adopted, vec!["p"]);
    assert!(r.models_adopted.is_empty(), "{r:?}");
    assert_eq!(r.dropped.len(), 1);
    let why = &r.dropped[0].reason;
    assert!(
        why.contains(&path.display().to_string()) && why.contains("changed since it was loaded"),
        "{why}"
    );
    assert_eq!(pool(&mut c, "p").await.used_bytes, 0);
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn verify_none_trusts_the_journal_and_is_ready_at_once() {
    let st = Setup::new();
    let (tensors, _) = stopped_with_one_model(&st).await;
    let d = st
        .daemon()
        .set("models.verify_on_adopt=none")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    // READY before any stream: GetModel right after the ready line.
    let m = table(&mut c, "a").await;
    assert_eq!(m.state(), ModelState::Ready);
    assert_eq!(m.loaded_bytes, m.bytes);
    assert_pool_holds(&pool(&mut c, "p").await.path, &m, &tensors);
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn keep_on_exit_false_leaves_nothing_and_the_next_start_is_clean() {
    let st = Setup::new();
    let tensors = ckpt::llama(2, 64, 128);
    let path = st.checkpoint("a", &tensors);
    let d = st
        .daemon()
        .set("pools.keep_on_exit=false")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 8 << 20).await;
    register(&mut c, "a", "p", &path, true).await;
    assert!(st.journal().exists());
    assert!(d.terminate().await.success());
    assert_eq!(pool_files(&st), Vec::<String>::new());
    assert!(!st.journal().exists());
    assert_next_start_finds_no_journal(&st).await;
}

#[tokio::test]
async fn config_declared_pools_and_models_are_adopted_not_rebuilt() {
    let st = Setup::new();
    let tensors = ckpt::llama(2, 64, 128);
    let path = st.checkpoint("a", &tensors);
    let config = st.s.path("offloadd.toml");
    common::write(
        &config,
        &format!(
            "[[pools.create]]\nname = \"p\"\nsize_bytes = 8388608\n\n[[models.register]]\nname = \"a\"\npool = \"p\"\npath = \"{}\"\n",
            path.display()
        ),
    );
    let start = || st.daemon().arg("--config").arg(config.to_str().unwrap());
    let d = start().start().await.unwrap();
    let mut c = d.client().await;
    assert_eq!(settle(&mut c, "a").await.state(), ModelState::Ready);
    assert!(!table(&mut c, "a").await.adopted);
    kill(d).await;

    let d = start().start().await.unwrap();
    let mut c = d.client().await;
    let m = table(&mut c, "a").await;
    assert!(
        m.adopted,
        "the config's model is the adopted one, not a reload"
    );
    assert_eq!(
        m.state(),
        ModelState::Ready,
        "startup waited for its verification"
    );
    assert!(
        !d.logs().contains("registering model"),
        "nothing was read again"
    );
    assert_pool_holds(&pool(&mut c, "p").await.path, &m, &tensors);
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn a_worker_verifying_every_byte_carries_on_across_a_daemon_sigkill() {
    use common::workers::{WorkerProc, prefetched};
    let st = Setup::new();
    let path = st.checkpoint("m", &ckpt::llama(5, 128, 256));
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 8 << 20).await;
    c.register_model(RegisterModelRequest {
        name: "m".into(),
        pool: "p".into(),
        path: path.display().to_string(),
        wait: true,
        backend: prefetched(1, 1, 2),
    })
    .await
    .unwrap();
    // Pool tensors read in place and prefetched layers onloaded over the fast path, each
    // checked against its CRC32C, pass after pass.
    let mut w = WorkerProc::spawn(
        &d,
        "m",
        &[
            "--fast",
            "--reattach",
            "60",
            "--passes",
            "1000000",
            "--ttl-ms",
            "2000",
        ],
    );
    let attached = w.next().await;
    assert_eq!(attached["event"], "attached", "{attached}");
    for n in 1..=3 {
        assert_eq!(w.next().await["n"], n);
    }
    kill(d).await;
    let d = st.daemon().start().await.unwrap();

    // The worker notices, attaches again once the model is verified, and goes on verifying.
    let reattached = loop {
        let line = w.next().await;
        match line["event"].as_str() {
            Some("pass") | Some("lease_lost") => continue,
            Some("reattached") => break line,
            _ => panic!("worker: {line}"),
        }
    };
    assert_eq!(
        reattached["kept_pool_mapping"], true,
        "the adopted pool is the same file: {reattached}"
    );
    assert!(reattached["pause_ms"].as_f64().unwrap() > 0.0);
    assert_ne!(reattached["lease_id"], attached["lease_id"]);
    for _ in 0..3 {
        let line = w.next().await;
        assert_eq!(line["event"], "pass", "{line}");
    }
    let mut c = d.client().await;
    assert_eq!(common::workers::attached_workers(&mut c, "m").await, 1);
    w.child.kill().await.unwrap();
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn ranges_of_a_model_not_adopted_stay_reserved_for_the_old_workers_ttl() {
    let st = Setup::new();
    let tensors = ckpt::llama(3, 128, 256);
    let path = st.checkpoint("a", &tensors);
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 8 << 20).await;
    register(&mut c, "a", "p", &path, true).await;
    let before = table(&mut c, "a").await;
    // A worker reads A in place under a 1.5 s lease when the daemon dies.
    let ttl_ms = 1500;
    c.attach_worker(offloadd::proto::AttachWorkerRequest {
        model: "a".into(),
        worker_name: "old".into(),
        ttl_ms,
        ..Default::default()
    })
    .await
    .unwrap();
    kill(d).await;
    // A is not adopted (its checkpoint changed), but that worker may read its ranges until its
    // next renewal tells it the lease is gone: nothing else may land there for a whole ttl.
    ckpt::write_file(&path, &ckpt::llama(3, 128, 300));
    let started = std::time::Instant::now();
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    assert!(recovery(&mut c).await.models_adopted.is_empty());
    assert_eq!(pool(&mut c, "p").await.used_bytes, blocks(&before), "held");
    d.wait_for_log(|v| v["message"] == "ranges of a model that was not adopted are free again")
        .await;
    assert!(started.elapsed().as_millis() >= u128::from(ttl_ms));
    assert_eq!(pool(&mut c, "p").await.used_bytes, 0, "free after the ttl");
    assert!(d.terminate().await.success());
}

/// The journal holds checkpoint paths and tensor tables: the daemon's and its group's business,
/// not every local user's (it was 0644).
#[tokio::test]
async fn journal_files_are_not_readable_by_other_users() {
    use std::os::unix::fs::PermissionsExt as _;
    let st = Setup::new();
    stopped_with_one_model(&st).await;
    let files: Vec<_> = std::fs::read_dir(st.journal())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 2, "a pools file and a model file: {files:?}");
    for path in files {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{}", path.display());
    }
}

/// A pool file replaced by a symbolic link to a file outside `pools.dir` (the same bytes, even
/// the same inode) is not adopted through the link: the pool is dropped with the reason, and
/// the file it pointed to is left as it was.
#[tokio::test]
async fn a_pool_file_replaced_by_a_symlink_is_not_adopted() {
    let st = Setup::new();
    stopped_with_one_model(&st).await;
    let [file] = pool_files(&st).try_into().expect("one pool file");
    let inside = st.s.pools_dir().join(&file);
    let outside = st.s.shm.path().join("elsewhere"); // beside pools.dir, on the same filesystem
    std::fs::rename(&inside, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &inside).unwrap();
    let before = std::fs::read(&outside).unwrap();
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    let r = recovery(&mut c).await;
    assert!(r.pools_adopted.is_empty(), "{r:?}");
    let pool = r
        .dropped
        .iter()
        .find(|x| x.kind == "pool")
        .expect("the pool is dropped");
    assert!(pool.reason.contains("symbolic link"), "{r:?}");
    assert!(d.terminate().await.success());
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        before,
        "the linked file is untouched"
    );
}
