//! TLS on the TCP listener, through the real daemon and a real rustls client: server-only TLS
//! (with the bearer token riding inside), mutual TLS that authenticates by itself, and the
//! refusals an operator meets: plaintext against TLS, a missing or foreign client certificate,
//! half a configuration, an unreadable key.

mod common;

use std::path::PathBuf;

use common::{DaemonBuilder, Scratch, Started};
use offloadd::client::{TlsClientFiles, connect_tls};
use offloadd::proto::GetInfoRequest;
use offloadd::proto::offload_client::OffloadClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::metadata::MetadataValue;

/// A CA, a server certificate for localhost signed by it, a client certificate signed by it,
/// and a client certificate from another CA; PEM files in the scratch dir.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    stranger: (PathBuf, PathBuf),
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(params, key))
}

fn leaf(
    s: &Scratch,
    name: &str,
    sans: &[&str],
    issuer: &Issuer<'_, KeyPair>,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    let (c, k) = (
        s.path(&format!("{name}.pem")),
        s.path(&format!("{name}.key")),
    );
    common::write(&c, &cert.pem());
    common::write(&k, &key.serialize_pem());
    (c, k)
}

fn pki(s: &Scratch) -> Pki {
    let (ca_pem, issuer) = ca("offloadd test CA");
    let (_, other) = ca("someone else's CA");
    let ca = s.path("ca.pem");
    common::write(&ca, &ca_pem);
    Pki {
        ca,
        server: leaf(s, "server", &["localhost", "127.0.0.1"], &issuer),
        client: leaf(s, "client", &["worker"], &issuer),
        stranger: leaf(s, "stranger", &["worker"], &other),
    }
}

fn tls_settings<'a>(b: DaemonBuilder<'a>, p: &Pki) -> DaemonBuilder<'a> {
    b.set(&format!("server.tls_cert_file={}", p.server.0.display()))
        .set(&format!("server.tls_key_file={}", p.server.1.display()))
}

async fn get_info(
    d: &common::Daemon,
    files: &TlsClientFiles,
    token: Option<&str>,
) -> Result<(), String> {
    let channel = connect_tls(d.tcp.unwrap(), "localhost", files)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut req = tonic::Request::new(GetInfoRequest {});
    if let Some(t) = token {
        let v: MetadataValue<_> = format!("Bearer {t}").parse().unwrap();
        req.metadata_mut().insert("authorization", v);
    }
    OffloadClient::new(channel)
        .get_info(req)
        .await
        .map(|_| ())
        .map_err(|e| format!("{:?}: {}", e.code(), e.message()))
}

#[tokio::test]
async fn server_tls_carries_the_token_and_refuses_plaintext() {
    const TOKEN: &str = "0123456789abcdef0123456789abcdef";
    let s = Scratch::new();
    let p = pki(&s);
    let token_file = s.path("token");
    common::write(&token_file, TOKEN);
    let d = tls_settings(DaemonBuilder::new(&s).tcp(), &p)
        .set(&format!("server.auth_token_file={}", token_file.display()))
        .start()
        .await
        .unwrap();
    let trust = TlsClientFiles {
        ca: p.ca.clone(),
        identity: None,
    };
    get_info(&d, &trust, Some(TOKEN)).await.unwrap();
    let e = get_info(&d, &trust, None).await.unwrap_err();
    assert!(
        e.contains("Unauthenticated") && e.contains("bearer token"),
        "{e}"
    );
    // A plaintext client gets nowhere, and the daemon goes on serving.
    let plain = offloadd::client::connect_tcp(d.tcp.unwrap()).await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => OffloadClient::new(ch)
            .get_info(GetInfoRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "plaintext against the TLS listener");
    // A client that does not trust the daemon's CA refuses it.
    let wrong_trust = TlsClientFiles {
        ca: p.stranger.0.clone(),
        identity: None,
    };
    assert!(get_info(&d, &wrong_trust, Some(TOKEN)).await.is_err());
    // The Unix socket is untouched: no TLS, no token; exec probes ask health there.
    d.client().await.get_info(GetInfoRequest {}).await.unwrap();
    let probe = |uds: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_offloadd"))
            .args(["health", "--uds-path"])
            .arg(uds)
            .output()
            .unwrap()
    };
    let ok = probe(&d.uds);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "SERVING");
    let gone = probe(&s.path("nobody.sock"));
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("nobody.sock"));
    get_info(&d, &trust, Some(TOKEN)).await.unwrap();
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn mutual_tls_authenticates_on_a_public_address_without_a_token() {
    let s = Scratch::new();
    let p = pki(&s);
    // 0.0.0.0 with client certificates and no token: authenticated, so startup allows it.
    let d = tls_settings(DaemonBuilder::new(&s), &p)
        .set("server.tcp_addr=0.0.0.0:0")
        .set(&format!("server.tls_client_ca_file={}", p.ca.display()))
        .start()
        .await
        .unwrap();
    let with = |identity: Option<&(PathBuf, PathBuf)>| TlsClientFiles {
        ca: p.ca.clone(),
        identity: identity.cloned(),
    };
    get_info(&d, &with(Some(&p.client)), None).await.unwrap();
    for (who, files) in [
        ("no client certificate", with(None)),
        ("a certificate from another CA", with(Some(&p.stranger))),
    ] {
        assert!(
            get_info(&d, &files, None).await.is_err(),
            "{who} must be refused"
        );
    }
    d.wait_for_log(|v| v["message"] == "TLS handshake failed; connection closed")
        .await;
    get_info(&d, &with(Some(&p.client)), None).await.unwrap();
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn broken_tls_settings_stop_startup_naming_the_setting() {
    let s = Scratch::new();
    let p = pki(&s);
    let garbage = s.path("garbage.key");
    common::write(&garbage, "not a key\n");
    for (sets, want) in [
        (
            vec![format!("server.tls_cert_file={}", p.server.0.display())],
            "server.tls_key_file go together",
        ),
        (
            vec![format!("server.tls_client_ca_file={}", p.ca.display())],
            "needs TLS",
        ),
        (
            vec![
                format!("server.tls_cert_file={}", p.server.0.display()),
                format!("server.tls_key_file={}", garbage.display()),
            ],
            "server.tls_key_file",
        ),
        (
            vec![
                format!("server.tls_cert_file={}", s.path("missing.pem").display()),
                format!("server.tls_key_file={}", p.server.1.display()),
            ],
            "missing.pem",
        ),
    ] {
        let mut b = DaemonBuilder::new(&s).tcp();
        for kv in &sets {
            b = b.set(kv);
        }
        let Started::Exited { status, stderr } = b.try_start().await.unwrap() else {
            panic!("{sets:?} must stop startup");
        };
        assert_ne!(status.code(), Some(0));
        assert!(stderr.contains(want), "{sets:?}: {stderr}");
    }
}
