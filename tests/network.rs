//! The daemon's network edges against hostile-but-fair peers: who may call over TCP and the
//! Unix socket, and how many connections, idle or not, it will hold.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::workers::{LAYERS, fixture, prefetched, register};
use common::{DEADLINE, DaemonBuilder, Scratch, ckpt, run_cli};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    AttachWorkerRequest, CreatePoolRequest, GetInfoRequest, ModelState, RegisterModelRequest,
    WatchModelRequest,
};
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

async fn get_info_with(d: &common::Daemon, bearer: Option<&str>) -> Result<(), tonic::Status> {
    let channel = offloadd::client::connect_tcp(d.tcp.expect("tcp"))
        .await
        .expect("connect tcp");
    let auth = bearer.map(|t| MetadataValue::try_from(format!("Bearer {t}")).unwrap());
    let mut c = OffloadClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
        if let Some(v) = &auth {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    });
    c.get_info(GetInfoRequest {}).await.map(|_| ())
}

async fn health(channel: tonic::transport::Channel) -> ServingStatus {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health answers")
        .into_inner()
        .status()
}

#[tokio::test]
async fn tcp_calls_need_the_bearer_token_while_health_and_the_unix_socket_do_not() {
    let s = Scratch::new();
    let token_file = s.path("token");
    common::write(&token_file, &format!("{TOKEN}\n"));
    let d = DaemonBuilder::new(&s)
        .tcp()
        .set(&format!("server.auth_token_file={}", token_file.display()))
        .start()
        .await
        .unwrap();
    for (bearer, what) in [
        (None, "needs a bearer token"),
        (Some("nope-nope-nope-nope"), "wrong bearer token"),
    ] {
        let e = get_info_with(&d, bearer).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
        assert!(e.message().contains(what), "{}", e.message());
        assert!(!e.message().contains(TOKEN), "the token is never echoed");
    }
    get_info_with(&d, Some(TOKEN)).await.unwrap();
    let tcp = offloadd::client::connect_tcp(d.tcp.unwrap()).await.unwrap();
    assert_eq!(health(tcp).await, ServingStatus::Serving);
    d.client().await.get_info(GetInfoRequest {}).await.unwrap();
    // The refusals are logged with the peer and counted.
    let refused = d.wait_for_log(|v| v["message"] == "call refused").await;
    assert!(
        refused["peer"]
            .as_str()
            .unwrap()
            .starts_with("tcp 127.0.0.1:"),
        "{refused}"
    );
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn tcp_on_a_public_address_without_auth_is_refused_unless_insecure_is_explicit() {
    let s = Scratch::new();
    let file = s.path("offloadd.toml");
    common::write(&file, "[server]\ntcp_addr = \"0.0.0.0:50051\"\n");
    let (status, _, stderr) = run_cli(&["config", "check", file.to_str().unwrap()], &[]);
    assert!(!status.success());
    assert!(
        stderr.contains("server.auth_token_file") && stderr.contains("server.tcp_insecure"),
        "{stderr}"
    );
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .arg("--tcp-addr")
        .arg("0.0.0.0:0")
        .set("server.tcp_insecure=true")
        .start()
        .await
        .unwrap();
    let warned = d
        .wait_for_log(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("WITHOUT authentication"))
        })
        .await;
    assert!(warned.to_string().contains("0.0.0.0"), "{warned}");
    assert!(d.terminate().await.success());

    // A token file that is too short to be a secret stops startup with the reason.
    let s = Scratch::new();
    let token_file = s.path("token");
    common::write(&token_file, "short\n");
    match DaemonBuilder::new(&s)
        .tcp()
        .set(&format!("server.auth_token_file={}", token_file.display()))
        .try_start()
        .await
        .unwrap()
    {
        common::Started::Exited { status, stderr } => {
            assert!(!status.success());
            assert!(stderr.contains("at least 16"), "{stderr}");
        }
        common::Started::Ready(_) => panic!("started with a 5-character token"),
    }
}

#[tokio::test]
async fn unix_peers_outside_the_allowed_uids_are_refused_by_rpc_and_fast_path() {
    let me = rustix::process::getuid().as_raw();
    let other = me.wrapping_add(4242);
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .set(&format!("server.allowed_uids={other}"))
        .start()
        .await
        .unwrap();
    let e = d
        .client()
        .await
        .get_info(GetInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains(&format!("uid={me}")) && e.message().contains("server.allowed_uids"),
        "{}",
        e.message()
    );
    assert_eq!(health(d.channel().await).await, ServingStatus::Serving);
    match offloadd::fast::client::FastClient::connect(&d.uds, "0123456789abcdef01234567").unwrap() {
        Err(reply) => assert_eq!(reply.to_status().code(), Code::PermissionDenied),
        Ok(_) => panic!("a refused peer was bound"),
    }
    assert!(d.terminate().await.success());

    // Allowed by uid: served as usual.
    let mut f = fixture(|b| b.set(&format!("server.allowed_uids={other},{me}"))).await;
    f.c.get_info(GetInfoRequest {}).await.unwrap();
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    assert!(f.d.terminate().await.success());
}

/// With `allowed_uids`, an unauthenticated TCP listener let any local user around it over
/// loopback (uid 65534 created a pool and detached root's lease). Now it refuses to start,
/// loopback included, unless `tcp_insecure` says so, and then it warns.
#[tokio::test]
async fn allowed_uids_with_unauthenticated_tcp_is_refused_unless_insecure_is_explicit() {
    let me = rustix::process::getuid().as_raw();
    let s = Scratch::new();
    let common::Started::Exited { status, stderr } = DaemonBuilder::new(&s)
        .tcp()
        .set(&format!("server.allowed_uids={me}"))
        .try_start()
        .await
        .unwrap()
    else {
        panic!("started with allowed_uids and an unauthenticated TCP listener");
    };
    assert!(!status.success());
    assert!(
        stderr.contains("around them") && stderr.contains("server.tcp_insecure"),
        "{stderr}"
    );
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .tcp()
        .set(&format!("server.allowed_uids={me}"))
        .set("server.tcp_insecure=true")
        .start()
        .await
        .unwrap();
    d.wait_for_log(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("NOT checked against server.allowed_uids"))
    })
    .await;
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_the_other_listener_answers() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .tcp()
        .set("server.max_connections=4")
        .set("metrics.addr=127.0.0.1:0")
        .start()
        .await
        .unwrap();
    let addr = d.tcp.unwrap();
    // Four silent connections take every slot of the TCP listener...
    let held: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    // ...so a fifth is closed on arrival instead of waiting in the backlog.
    let mut fifth = std::net::TcpStream::connect(addr).unwrap();
    fifth.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(fifth.read(&mut buf).unwrap(), 0, "closed by the daemon");
    // The Unix socket has its own cap: health and calls go on.
    assert_eq!(health(d.channel().await).await, ServingStatus::Serving);
    d.client().await.get_info(GetInfoRequest {}).await.unwrap();
    let body = scrape(&d).await;
    assert!(
        body.contains("offloadd_connections_refused_total{listener=\"tcp\"} 1"),
        "{body}"
    );
    // Closing the silent ones frees their slots (the daemon sees each end as it happens).
    drop(held);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match get_info_with(&d, None).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e; // a slot not yet released: the daemon is still reading its EOF
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("TCP never served again: {e}"),
        }
    }
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn idle_connections_are_closed_but_never_during_a_call_or_a_stream() {
    let s = Scratch::new();
    let root = s.models();
    ckpt::write_file(&root.join("m.safetensors"), &ckpt::llama(8, 256, 512));
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .tcp()
        .set("server.idle_timeout_ms=400")
        .set("models.chunk_bytes=65536")
        .set("models.max_load_bytes_per_sec=1048576")
        .set("metrics.addr=127.0.0.1:0")
        .start()
        .await
        .unwrap();
    // A connection silent after its HTTP/2 preface (the handshake) is closed after the idle
    // timeout.
    let started = Instant::now();
    let mut silent = std::net::TcpStream::connect(d.tcp.unwrap()).unwrap();
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    // It reads the daemon's HTTP/2 settings, then the end of the stream.
    silent
        .read_to_end(&mut Vec::new())
        .expect("closed, not timed out");
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "{:?}",
        started.elapsed()
    );
    let closed = |body: &str| {
        common::try_sample(
            body,
            "offloadd_connections_closed_idle_total{listener=\"tcp\"}",
        )
        .unwrap_or(0.0)
    };
    assert_eq!(closed(&scrape(&d).await), 1.0);

    // A load throttled to take several idle periods, watched over TCP: the stream is a call in
    // flight from start to end, so its connection is never idle.
    let channel = offloadd::client::connect_tcp(d.tcp.unwrap()).await.unwrap();
    let mut c = OffloadClient::new(channel);
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 32 << 20,
    })
    .await
    .unwrap();
    let load_started = Instant::now();
    c.register_model(RegisterModelRequest {
        name: "m".into(),
        pool: "p".into(),
        path: root.join("m.safetensors").display().to_string(),
        wait: false,
        backend: None,
    })
    .await
    .unwrap();
    let mut stream = c
        .watch_model(WatchModelRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner();
    let mut last = ModelState::Loading;
    while let Some(p) = stream.message().await.expect("the watch is never cut") {
        last = p.state();
    }
    assert_eq!(last, ModelState::Ready);
    assert!(
        load_started.elapsed() > Duration::from_millis(1200),
        "the load lasted {:?}, not several idle periods",
        load_started.elapsed()
    );
    assert_eq!(
        closed(&scrape(&d).await),
        1.0,
        "the watching connection was never closed"
    );
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn fast_path_connections_are_capped_across_leases() {
    use offloadd::fast::client::FastClient;
    let mut f = fixture(|b| b.set("server.max_fast_connections=2")).await;
    register(&mut f.c, "m", &f.ckpt, prefetched(1, 1, 2)).await;
    let mut ids = Vec::new();
    for w in ["a", "b"] {
        let lease =
            f.c.attach_worker(AttachWorkerRequest {
                model: "m".into(),
                worker_name: w.into(),
                ttl_ms: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(lease.lease_id);
    }
    let first = FastClient::connect(&f.d.uds, &ids[0]).unwrap().unwrap();
    let _second = FastClient::connect(&f.d.uds, &ids[1]).unwrap().unwrap();
    match FastClient::connect(&f.d.uds, &ids[0]).unwrap() {
        Err(reply) => {
            assert_eq!(reply.to_status().code(), Code::ResourceExhausted);
            assert!(
                reply.message.contains("server.max_fast_connections"),
                "{}",
                reply.message
            );
        }
        Ok(_) => panic!("a third fast-path connection was bound"),
    }
    // Ending one frees its thread for the next.
    drop(first);
    let deadline = Instant::now() + DEADLINE;
    let mut third = loop {
        match FastClient::connect(&f.d.uds, &ids[0]).unwrap() {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => tokio::task::yield_now().await,
            Err(r) => panic!("never freed: {}", r.message),
        }
    };
    assert!(third.onload(0).unwrap().bytes > 0 || LAYERS == 0);
    assert!(f.d.terminate().await.success());
}

async fn scrape(d: &common::Daemon) -> String {
    common::scrape(d.metrics.expect("metrics")).await
}

/// CPU seconds the process has used (user + system), from /proc.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split(' ').collect();
    // Fields 14 and 15 of stat (utime, stime), counted from the state field as index 0.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / rustix::param::clock_ticks_per_second() as f64
}

#[tokio::test]
async fn out_of_fds_the_accept_loop_backs_off_instead_of_spinning() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s)
        .wrapper(&["prlimit", "--nofile=64:64", "--"])
        .start()
        .await
        .unwrap();
    // Silent connections until the daemon has no fd left to accept with (each is held for the
    // 10 s the daemon waits for a first byte).
    let held: Vec<_> = (0..120)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.uds).unwrap())
        .collect();
    d.wait_for_log(|v| v["message"] == "accept failed; backing off")
        .await;
    let before = cpu_seconds(d.pid());
    let window = Instant::now();
    // A measuring interval, not synchronisation: how much CPU the daemon burns while stuck.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds(d.pid()) - before;
    let share = used / window.elapsed().as_secs_f64();
    assert!(
        share < 0.3,
        "the daemon used {:.0}% of a CPU while out of fds",
        share * 100.0
    );
    // Once the connections end, it serves again.
    drop(held);
    d.client().await.get_info(GetInfoRequest {}).await.unwrap();
    assert!(d.terminate().await.success());
}
