//! Isolation between the parties that share a daemon (issue 25), each through the real daemon:
//! a publisher reaches only its own bytes and only until it seals; the scrubber finds bytes
//! changed behind the daemon's back; a full `pools.dir` is told in the answer; one uid holding
//! its maximum of silent connections leaves the socket to the others.
//!
//! The other parties run as uid 65534 (nobody) in the daemon's group, through `setpriv`, as an
//! engine in the pool files' group would. Those tests need root and skip, saying why, without it.

mod common;

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tmpfs::Tmpfs;
use common::workers::{LAYERS, attach, fixture, prefetched, register};
use common::{DEADLINE, DaemonBuilder, Scratch, ckpt, sample, scrape};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    CreateModelRequest, GetInfoRequest, GetModelRequest, GetPoolRequest, KeepAliveRequest,
    ModelState, OnloadToStaticRequest, SealModelRequest, TensorSpec, WatchModelRequest,
    WriteModelRequest,
};
use tonic::Code;
use tonic::transport::Channel;

const ENGINE_UID: &str = "65534";

/// Whether this process can run commands as another uid; prints why not when it cannot.
fn can_switch_uid(test: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    let setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !(root && setpriv) {
        eprintln!("SKIPPED {test}: needs root and setpriv(1) to run a party as uid {ENGINE_UID}");
    }
    root && setpriv
}

/// Runs `sh -c script` as uid/gid 65534 with the daemon's group (0) as a supplementary group.
fn as_engine(script: &str) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid", ENGINE_UID, "--regid", ENGINE_UID, "--groups", "0", "--", "sh", "-c", script,
        ])
        .output()
        .expect("setpriv")
}

/// Lets other uids reach the daemon's files by path, as a shared emptyDir does.
fn open_to_others(s: &Scratch) {
    for dir in [s.dir.path(), s.shm.path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
}

async fn publish_one(
    c: &mut OffloadClient<Channel>,
    name: &str,
    len: u64,
) -> offloadd::proto::Model {
    c.create_model(CreateModelRequest {
        name: name.into(),
        pool: "p".into(),
        tensors: vec![TensorSpec {
            name: "w".into(),
            dtype: "U8".into(),
            shape: vec![len],
        }],
        backend: None,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn write_one(
    c: &mut OffloadClient<Channel>,
    name: &str,
    token: &str,
    offset: u64,
    data: &[u8],
) -> Result<u64, tonic::Status> {
    c.write_model(tokio_stream::iter([WriteModelRequest {
        name: name.into(),
        publish_token: token.into(),
        offset,
        data: data.to_vec(),
    }]))
    .await
    .map(|r| r.into_inner().bytes_written)
}

/// A publisher wrote "EVIL" through the pool file into another READY model's range, and into
/// its own after SealModel; both stayed READY with their old checksums. Now pool files are
/// 0640 (the daemon alone writes them) and WriteModel reaches only the caller's own tensors,
/// only until its seal.
#[tokio::test]
async fn a_publisher_writes_only_its_own_bytes_and_only_until_it_seals() {
    if !can_switch_uid("a_publisher_writes_only_its_own_bytes") {
        return;
    }
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    open_to_others(&s);
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 1 << 20).await;
    let pool = c
        .get_pool(GetPoolRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner();

    // Model a, published and sealed by its owner.
    let a = publish_one(&mut c, "a", 4096).await;
    let a_bytes = ckpt::bytes(4096, 1);
    let a_off = a.tensors[0].offset;
    write_one(&mut c, "a", &a.publish_token, a_off, &a_bytes)
        .await
        .unwrap();
    c.seal_model(SealModelRequest {
        name: "a".into(),
        publish_token: a.publish_token.clone(),
    })
    .await
    .unwrap();

    // Another engine, in the pool file's group, cannot write the pool file...
    let meta = std::fs::metadata(&pool.path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640, "{}", pool.path);
    let evil = as_engine(&format!(
        "printf EVIL | dd of={} bs=1 seek={a_off} conv=notrunc status=none",
        pool.path
    ));
    assert!(!evil.status.success(), "the engine wrote the pool file");
    assert!(
        String::from_utf8_lossy(&evil.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&evil.stderr)
    );
    // ...but reads it, as workers map it (read-only).
    let read = as_engine(&format!(
        "dd if={} bs=1 skip={a_off} count=16 status=none",
        pool.path
    ));
    assert!(read.status.success(), "{read:?}");
    assert_eq!(read.stdout, a_bytes[..16]);

    // Its own publication, b, reaches only b's tensor.
    let b = publish_one(&mut c, "b", 4096).await;
    let b_off = b.tensors[0].offset;
    let e = write_one(&mut c, "b", &b.publish_token, a_off, b"EVIL")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("not inside one of its tensors"),
        "{e:?}"
    );
    let e = write_one(&mut c, "b", &b.publish_token, b_off + 4094, b"EVIL")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::InvalidArgument,
        "past its tensor's end: {e:?}"
    );
    // Its token is not a's.
    let e = write_one(&mut c, "a", &b.publish_token, a_off, b"EVIL")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .seal_model(SealModelRequest {
            name: "b".into(),
            publish_token: "0".repeat(32),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Until it seals; not after.
    let b_bytes = ckpt::bytes(4096, 2);
    assert_eq!(
        write_one(&mut c, "b", &b.publish_token, b_off, &b_bytes)
            .await
            .unwrap(),
        4096
    );
    c.seal_model(SealModelRequest {
        name: "b".into(),
        publish_token: b.publish_token.clone(),
    })
    .await
    .unwrap();
    let e = write_one(&mut c, "b", &b.publish_token, b_off, b"EVIL")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("sealed"), "{e:?}");

    // Every byte is what its owner wrote, and the checksums say so.
    let file = std::fs::File::open(&pool.path).unwrap();
    for (name, off, bytes) in [("a", a_off, &a_bytes), ("b", b_off, &b_bytes)] {
        let mut now = vec![0u8; bytes.len()];
        file.read_exact_at(&mut now, off).unwrap();
        assert_eq!(&now, bytes, "{name}'s bytes");
        let m = c
            .get_model(GetModelRequest {
                name: name.into(),
                include_tensors: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(m.state(), ModelState::Ready);
        assert_eq!(m.tensors[0].crc32c, crc32c::crc32c(bytes));
    }
    assert!(d.terminate().await.success());
}

/// Bytes changed behind the daemon's back (root writing the pool file in /dev/shm) were served
/// until the next restart. The scrubber finds them and takes the model out of service.
#[tokio::test]
async fn the_scrubber_takes_a_model_whose_bytes_changed_out_of_service() {
    let mut f = fixture(|b| {
        b.set("models.scrub_bytes_per_second=1073741824")
            .set("metrics.addr=127.0.0.1:0")
    })
    .await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let lease = attach(&mut f.c, "m", "w").await;
    let m =
        f.c.get_model(GetModelRequest {
            name: "m".into(),
            include_tensors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let victim = m.tensors.last().unwrap().clone();
    let pool =
        f.c.get_pool(GetPoolRequest { name: "p".into() })
            .await
            .unwrap()
            .into_inner();
    // Root flips one byte in the pool file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pool.path)
        .unwrap();
    let at = victim.offset + victim.length / 2;
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[!b[0]], at).unwrap();

    f.d.wait_for_log(|v| v["message"] == "model taken out of service")
        .await;
    let got =
        f.c.get_model(GetModelRequest {
            name: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), ModelState::Failed);
    assert!(
        got.error.contains("out of service") && got.error.contains(&victim.name),
        "{}",
        got.error
    );
    let mut watch =
        f.c.watch_model(WatchModelRequest { name: "m".into() })
            .await
            .unwrap()
            .into_inner();
    let p = watch.message().await.unwrap().unwrap();
    assert_eq!(p.state(), ModelState::Failed);
    assert!(p.error.contains(&victim.name), "{}", p.error);
    // The lease learns it at its next keep-alive; nothing more is served from the model.
    let k =
        f.c.keep_alive(KeepAliveRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(k.model_out_of_service.contains(&victim.name), "{k:?}");
    let e =
        f.c.onload_to_static(OnloadToStaticRequest {
            lease_id: lease.lease_id.clone(),
            layer: LAYERS - 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e =
        f.c.attach_worker(offloadd::proto::AttachWorkerRequest {
            model: "m".into(),
            worker_name: "late".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let info = f.c.get_info(GetInfoRequest {}).await.unwrap().into_inner();
    let scrub = info.scrub.unwrap();
    assert_eq!(scrub.out_of_service, vec!["m".to_string()]);
    assert!(scrub.bytes_checked > 0);
    let body = scrape(f.d.metrics.unwrap()).await;
    assert_eq!(sample(&body, "offloadd_models_out_of_service "), 1.0);
    assert_eq!(
        sample(
            &body,
            "offloadd_model_state{model=\"m\",pool=\"p\",state=\"FAILED\"}"
        ),
        1.0
    );
    assert!(f.d.terminate().await.success());
}

/// With `pools.dir` full, RegisterModel answered READY and only the log said the model would
/// not survive a restart; CreatePool answered INTERNAL "pre-fault: Bad address". Now the
/// answer says so, with the figures, and journal.required refuses.
#[tokio::test]
async fn a_full_pools_dir_is_told_in_the_answer_and_refused_when_required() {
    for required in [false, true] {
        let s = Scratch::new();
        let Some(fs) = Tmpfs::mount(&s.pools_dir(), 8 << 20, "a_full_pools_dir") else {
            return;
        };
        let root = s.models();
        let ckpt = root.join("m.safetensors");
        ckpt::write_file(&ckpt, &ckpt::llama(2, 64, 128));
        let d = DaemonBuilder::new(&s)
            .roots(&[&root])
            .set(&format!("journal.required={required}"))
            .set("metrics.addr=127.0.0.1:0")
            .start()
            .await
            .unwrap();
        let mut c = d.client().await;
        // Larger than the filesystem: refused with the figures, not EFAULT.
        let e = c
            .create_pool(offloadd::proto::CreatePoolRequest {
                name: "big".into(),
                device: "cpu".into(),
                size_bytes: 16 << 20,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("bytes free"), "{}", e.message());
        common::cpu_pool(&mut c, "p", 4 << 20).await;
        fs.fill();
        let r = c
            .register_model(common::registration("m", "p", &ckpt, true))
            .await;
        let info = c.get_info(GetInfoRequest {}).await.unwrap().into_inner();
        let durability = info.durability.unwrap();
        assert!(durability.journal_write_failures >= 1);
        assert!(
            durability.last_failure.contains("bytes free"),
            "{}",
            durability.last_failure
        );
        let used = c
            .get_pool(GetPoolRequest { name: "p".into() })
            .await
            .unwrap()
            .into_inner()
            .used_bytes;
        if required {
            let e = r.unwrap_err();
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert!(
                e.message().contains("journal.required") && e.message().contains("bytes free"),
                "{}",
                e.message()
            );
            assert_eq!(used, 0, "nothing half-registered");
            let e = c
                .get_model(GetModelRequest {
                    name: "m".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::NotFound);
        } else {
            let m = r.unwrap().into_inner();
            assert_eq!(m.state(), ModelState::Ready);
            assert!(!m.durable);
            assert!(
                m.not_durable_reason.contains("No space left")
                    && m.not_durable_reason.contains("bytes free"),
                "{}",
                m.not_durable_reason
            );
            assert!(durability.not_durable.contains(&"model m".to_string()));
            let body = scrape(d.metrics.unwrap()).await;
            assert!(sample(&body, "offloadd_not_durable ") >= 1.0);
            assert!(sample(&body, "offloadd_journal_write_failures ") >= 1.0);
        }
        assert!(d.terminate().await.success());
    }
}

/// 512 silent connections made a listener refuse every new caller with UNAVAILABLE for about
/// 10 s per wave. Now one uid holds at most server.max_connections_per_peer of them, and
/// another uid's calls answer as fast as when idle. (Held silent for the whole measurement:
/// the handshake deadline is the next test's.)
#[tokio::test]
async fn silent_connections_of_one_uid_leave_the_socket_to_the_others() {
    // The system's interpreter: one under root's home (pyenv) is out of uid 65534's reach.
    const PYTHON: &str = "/usr/bin/python3";
    if !can_switch_uid("silent_connections_of_one_uid") {
        return;
    }
    if !Path::new(PYTHON).exists() {
        eprintln!("SKIPPED silent_connections_of_one_uid: no {PYTHON} to hold the connections");
        return;
    }
    const SILENT: usize = 512;
    const CALLS: usize = 300;
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .set("server.handshake_timeout_ms=600000")
        .set("metrics.addr=127.0.0.1:0")
        .start()
        .await
        .unwrap();
    open_to_others(&s);
    let mut c = d.client().await;
    let p99 = |c: &mut OffloadClient<Channel>| {
        let mut c = c.clone();
        async move {
            let mut took = Vec::with_capacity(CALLS);
            for _ in 0..CALLS {
                let t = Instant::now();
                c.get_info(GetInfoRequest {}).await.expect("GetInfo");
                took.push(t.elapsed());
            }
            took.sort();
            took[CALLS * 99 / 100]
        }
    };
    let idle = p99(&mut c).await;

    let script = format!(
        "import socket, sys\n\
         held = []\n\
         for _ in range({SILENT}):\n\
         \x20   s = socket.socket(socket.AF_UNIX)\n\
         \x20   s.connect({:?})\n\
         \x20   held.append(s)\n\
         print('ready', flush=True)\n\
         sys.stdin.read()\n",
        s.uds().display().to_string()
    );
    let mut flood = Command::new("setpriv")
        .args([
            "--reuid", ENGINE_UID, "--regid", ENGINE_UID, "--groups", "0",
        ])
        .args(["--", PYTHON, "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 as uid 65534");
    let mut line = String::new();
    std::io::BufReader::new(flood.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    // Every one of them admitted or refused by the daemon, not waiting in the backlog.
    let deadline = Instant::now() + DEADLINE;
    let refused = SILENT as f64 - 128.0;
    loop {
        let body = scrape(d.metrics.unwrap()).await;
        let n = common::try_sample(
            &body,
            "offloadd_connections_refused_peer_total{listener=\"uds\"}",
        );
        if n == Some(refused) {
            break;
        }
        assert!(Instant::now() < deadline, "refused {n:?} of {SILENT}");
        tokio::task::yield_now().await;
    }
    let loaded = p99(&mut c).await;
    // Within 2× idle. The floor keeps scheduler jitter out of it: the other tests of this
    // binary run beside it on 2 cores, and a 2 ms floor failed at 4.02 ms against 4 ms. What
    // the test guards against, a listener held by the flood, costs the handshake deadline
    // (seconds) or a refused call, far above it. The latency itself is benchmarked by
    // `cargo bench --bench scrub`'s GetInfo p99.
    let bound = 2 * idle.max(Duration::from_millis(10));
    eprintln!(
        "GetInfo p99: idle {idle:?}, with {SILENT} silent connections of another uid {loaded:?}"
    );
    assert!(
        loaded <= bound,
        "GetInfo p99 {loaded:?} with {SILENT} silent connections of uid {ENGINE_UID}, idle {idle:?}"
    );
    drop(flood.stdin.take());
    assert!(flood.wait().unwrap().success());
    assert!(d.terminate().await.success());
}

/// A connection that does not speak within server.handshake_timeout_ms is closed, on the Unix
/// socket and on TCP alike, so silent connections hold their places for that long only.
#[tokio::test]
async fn connections_that_do_not_speak_are_closed_at_the_handshake_deadline() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .tcp()
        .set("server.handshake_timeout_ms=300")
        .start()
        .await
        .unwrap();
    let mut uds = std::os::unix::net::UnixStream::connect(s.uds()).unwrap();
    let mut tcp = std::net::TcpStream::connect(d.tcp.unwrap()).unwrap();
    uds.set_read_timeout(Some(DEADLINE)).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    // Half a preface, then nothing.
    tcp.write_all(b"PRI * HTTP/2.0").unwrap();
    let started = Instant::now();
    // Closed: an end of stream, or a reset where the daemon left the half preface unread.
    let closed = |r: std::io::Result<usize>| {
        matches!(r, Ok(0)) || r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
    };
    assert!(closed(uds.read(&mut [0u8; 1])), "unix socket not closed");
    assert!(closed(tcp.read(&mut [0u8; 1])), "tcp not closed");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Callers that speak are served as usual.
    d.client().await.get_info(GetInfoRequest {}).await.unwrap();
    d.tcp_client()
        .await
        .get_info(GetInfoRequest {})
        .await
        .unwrap();
    assert!(d.terminate().await.success());
}
