//! The daemon foundation, exercised through the real binary: configuration precedence, vLLM
//! variables, sockets, health, reflection and graceful shutdown.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

use common::{DaemonBuilder, Scratch, Started, run_cli, write};
use offloadd::proto::GetInfoRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn printed(stdout: &str) -> toml::Table {
    stdout.parse().expect("config print emits TOML")
}

#[test]
fn config_precedence_defaults_file_env_flags() {
    let s = Scratch::new();
    let file = s.path("offloadd.toml");
    write(
        &file,
        "[server]\nuds_path = \"/file/sock\"\ndrain_timeout_ms = 111\n[leases]\ndefault_ttl_ms = 222\n[models]\nroots = [\"/file/root\"]\n",
    );
    let file = file.to_str().unwrap();

    // Defaults only.
    let (st, out, err) = run_cli(&["config", "print"], &[]);
    assert!(st.success(), "{err}");
    let t = printed(&out);
    assert_eq!(
        t["server"]["uds_path"].as_str(),
        Some(offloadd::config::DEFAULT_UDS_PATH)
    );
    assert_eq!(t["leases"]["default_ttl_ms"].as_integer(), Some(10_000));

    // File over defaults, via --config and via OFFLOADD_CONFIG.
    for (args, env) in [
        (vec!["--config", file, "config", "print"], vec![]),
        (vec!["config", "print"], vec![("OFFLOADD_CONFIG", file)]),
    ] {
        let (st, out, err) = run_cli(&args, &env);
        assert!(st.success(), "{err}");
        let t = printed(&out);
        assert_eq!(t["server"]["uds_path"].as_str(), Some("/file/sock"));
        assert_eq!(t["server"]["drain_timeout_ms"].as_integer(), Some(111));
        assert_eq!(t["leases"]["default_ttl_ms"].as_integer(), Some(222));
    }

    // Environment over file; lists are comma-separated.
    let env = [
        ("OFFLOADD_CONFIG", file),
        ("OFFLOADD_SERVER__UDS_PATH", "/env/sock"),
        ("OFFLOADD_SERVER__DRAIN_TIMEOUT_MS", "333"),
        ("OFFLOADD_MODELS__ROOTS", "/env/a,/env/b"),
    ];
    let (st, out, err) = run_cli(&["config", "print"], &env);
    assert!(st.success(), "{err}");
    let t = printed(&out);
    assert_eq!(t["server"]["uds_path"].as_str(), Some("/env/sock"));
    assert_eq!(t["server"]["drain_timeout_ms"].as_integer(), Some(333));
    assert_eq!(
        t["leases"]["default_ttl_ms"].as_integer(),
        Some(222),
        "file value kept"
    );
    let roots: Vec<_> = t["models"]["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(roots, ["/env/a", "/env/b"]);

    // Flags over environment.
    let (st, out, err) = run_cli(
        &[
            "config",
            "print",
            "--uds-path",
            "/flag/sock",
            "--set",
            "server.drain_timeout_ms=444",
        ],
        &env,
    );
    assert!(st.success(), "{err}");
    let t = printed(&out);
    assert_eq!(t["server"]["uds_path"].as_str(), Some("/flag/sock"));
    assert_eq!(t["server"]["drain_timeout_ms"].as_integer(), Some(444));
    assert_eq!(t["leases"]["default_ttl_ms"].as_integer(), Some(222));
}

#[test]
fn unknown_keys_are_rejected_and_named() {
    let s = Scratch::new();
    let file = s.path("bad.toml");
    for (text, key) in [
        ("[server]\nuds_pth = \"/x\"\n", "uds_pth"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        (
            "[[pools.create]]\nname = \"a\"\nsize_bytes = 4096\nsize = 1\n",
            "size",
        ),
    ] {
        write(&file, text);
        let (st, _, err) = run_cli(&["config", "check", file.to_str().unwrap()], &[]);
        assert_eq!(st.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains(&format!("`{key}`")),
            "error should name {key}: {err}"
        );
    }
    let (st, _, err) = run_cli(&["config", "print"], &[("OFFLOADD_SERVER__BOGUS", "1")]);
    assert_eq!(st.code(), Some(2));
    assert!(err.contains("`bogus`"), "{err}");

    write(&file, "[server]\ntcp_addr = \"127.0.0.1:7000\"\n");
    let (st, out, err) = run_cli(&["config", "check", file.to_str().unwrap()], &[]);
    assert!(st.success(), "{err}");
    assert!(out.contains("ok"));
}

#[test]
fn config_check_reports_invalid_values() {
    let s = Scratch::new();
    let file = s.path("bad.toml");
    write(&file, "[pools]\ndir = \"relative/dir\"\n");
    let (st, _, err) = run_cli(&["config", "check", file.to_str().unwrap()], &[]);
    assert_eq!(st.code(), Some(2));
    assert!(
        err.contains("pools.dir") && err.contains("absolute"),
        "{err}"
    );
    write(&file, "[pin]\nstaging_bytes = 1000\n");
    let (st, _, err) = run_cli(&["config", "check", file.to_str().unwrap()], &[]);
    assert_eq!(st.code(), Some(2));
    assert!(err.contains("pin.staging_bytes = 1000"), "{err}");
    write(&file, "[leases]\ncopy_window_bytes = 4096\n");
    let (st, _, err) = run_cli(&["config", "check", file.to_str().unwrap()], &[]);
    assert_eq!(st.code(), Some(2));
    assert!(err.contains("leases.copy_window_bytes = 4096"), "{err}");
    write(&file, "[pin]\nstaging_bytes = 0\n");
    let (st, _, err) = run_cli(&["config", "check", file.to_str().unwrap()], &[]);
    assert!(st.success(), "0 turns staging off: {err}");
    let (st, _, err) = run_cli(&["config", "check", "/nonexistent/offloadd.toml"], &[]);
    assert_eq!(st.code(), Some(2));
    assert!(err.contains("/nonexistent/offloadd.toml"), "{err}");
}

#[tokio::test]
async fn vllm_variables_are_parsed_as_vllm_does() {
    const PIN: &str = offloadd::vllm_env::DISABLE_PIN_MEMORY;
    const UVA: &str = offloadd::vllm_env::DISABLE_UVA;
    // (value or unset, parsed) for accepted forms.
    let accepted: [(Option<&str>, bool); 4] = [
        (None, false),
        (Some("0"), false),
        (Some("1"), true),
        (Some("2"), true),
    ];
    for (value, want) in accepted {
        let s = Scratch::new();
        let mut b = DaemonBuilder::new(&s);
        if let Some(v) = value {
            b = b.env(PIN, v).env(UVA, v);
        }
        let d = b.start().await.unwrap();
        let info = d
            .client()
            .await
            .get_info(GetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        let env = info.vllm_env.unwrap();
        assert_eq!(
            (env.disable_pin_memory, env.disable_uva),
            (want, want),
            "value {value:?}"
        );
        // Host-to-host copies need no pinned staging, whatever the variable says.
        let staging = info.devices[0].staging.clone().unwrap();
        assert_eq!((staging.bytes, staging.allocated), (0, false));
        assert!(staging.reason.contains("no staging"), "{staging:?}");
        assert!(d.terminate().await.success());
    }
    for var in [PIN, UVA] {
        for bad in ["true", "", "yes"] {
            let s = Scratch::new();
            let started = DaemonBuilder::new(&s)
                .env(var, bad)
                .try_start()
                .await
                .unwrap();
            let Started::Exited { status, stderr } = started else {
                panic!("{var}={bad:?} must stop startup");
            };
            assert_eq!(status.code(), Some(2), "{stderr}");
            assert!(
                stderr.contains(var) && stderr.contains(&format!("{bad:?}")),
                "{stderr}"
            );
            assert!(!s.uds().exists(), "nothing is bound on a refused start");
        }
    }
}

#[tokio::test]
async fn serves_getinfo_health_and_reflection_on_uds_and_tcp() {
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).tcp().start().await.unwrap();

    let meta = std::fs::symlink_metadata(&d.uds).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    for mut client in [d.client().await, d.tcp_client().await] {
        let info = client
            .get_info(GetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.devices[0].id, "cpu");
        assert!(info.devices[0].total_memory_bytes > 0);
        let cfg = info.config.unwrap();
        assert_eq!(cfg.uds_path, d.uds.display().to_string());
        assert_eq!(cfg.tcp_addr, d.tcp.unwrap().to_string());
        if info.devices.len() == 1 {
            assert!(
                !info.cuda_absent_reason.is_empty(),
                "absence of CUDA is explained"
            );
        }
    }

    let mut health = HealthClient::new(d.channel().await);
    for service in ["", "offloadd.v1.Offload"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status(), ServingStatus::Serving, "service {service:?}");
    }

    assert!(
        list_services_v1(&d)
            .await
            .contains(&"offloadd.v1.Offload".to_string())
    );
    assert!(
        list_services_v1alpha(&d)
            .await
            .contains(&"offloadd.v1.Offload".to_string())
    );

    let status = d.terminate().await;
    assert!(status.success());
    assert!(!s.uds().exists(), "socket removed on exit");
}

async fn list_services_v1(d: &common::Daemon) -> Vec<String> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut c = ServerReflectionClient::new(d.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    match resp.message_response.unwrap() {
        MessageResponse::ListServicesResponse(l) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected {other:?}"),
    }
}

async fn list_services_v1alpha(d: &common::Daemon) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut c = ServerReflectionClient::new(d.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    match resp.message_response.unwrap() {
        MessageResponse::ListServicesResponse(l) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn second_daemon_on_a_live_socket_is_refused() {
    let s = Scratch::new();
    let first = DaemonBuilder::new(&s).start().await.unwrap();
    let Started::Exited { status, stderr } = DaemonBuilder::new(&s).try_start().await.unwrap()
    else {
        panic!("second daemon must not start");
    };
    assert!(!status.success());
    assert!(stderr.contains("already serving"), "{stderr}");
    // The first keeps serving on its socket.
    let info = first
        .client()
        .await
        .get_info(GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.devices[0].id, "cpu");
    assert!(first.terminate().await.success());
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let s = Scratch::new();
    // A socket file with nobody listening, as a crashed daemon leaves behind.
    drop(std::os::unix::net::UnixListener::bind(s.uds()).unwrap());
    assert!(s.uds().exists());
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    d.client().await.get_info(GetInfoRequest {}).await.unwrap();
    assert!(d.logs().contains("stale socket"));
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_not_clobbered() {
    let s = Scratch::new();
    write(&s.uds(), "precious");
    let Started::Exited { status, stderr } = DaemonBuilder::new(&s).try_start().await.unwrap()
    else {
        panic!("must refuse");
    };
    assert!(!status.success());
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(s.uds()).unwrap(), "precious");
}

/// SIGTERM while a call is in flight: the call still completes, health turns NOT_SERVING, the
/// process exits 0 and the socket is gone. The call is held in flight by sending its request
/// headers but withholding the request message until after the signal.
#[tokio::test]
async fn sigterm_drains_in_flight_calls() {
    use tokio_stream::wrappers::ReceiverStream;
    let s = Scratch::new();
    let d = DaemonBuilder::new(&s).start().await.unwrap();
    let channel = d.channel().await;

    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let (tx, rx) = tokio::sync::mpsc::channel::<offloadd::proto::GetInfoRequest>(1);
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let call = tokio::spawn(async move {
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/offloadd.v1.Offload/GetInfo");
        let codec =
            tonic_prost::ProstCodec::<GetInfoRequest, offloadd::proto::GetInfoResponse>::default();
        grpc.client_streaming(tonic::Request::new(ReceiverStream::new(rx)), path, codec)
            .await
    });
    d.wait_for_log(|v| {
        v["message"] == "rpc started" && v["span"]["method"] == "/offloadd.v1.Offload/GetInfo"
    })
    .await;

    d.signal(rustix::process::Signal::TERM);
    let update = watch.message().await.unwrap().unwrap();
    assert_eq!(update.status(), ServingStatus::NotServing);

    tx.send(GetInfoRequest {}).await.unwrap();
    drop(tx);
    let resp = call
        .await
        .unwrap()
        .expect("in-flight call completes during drain");
    assert_eq!(resp.into_inner().version, env!("CARGO_PKG_VERSION"));
    drop(watch);
    drop(channel);

    let mut d = d;
    let status = tokio::time::timeout(common::DEADLINE, d.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(!s.uds().exists(), "socket removed");
}
