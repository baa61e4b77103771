//! Compiles the daemon's side of the control-plane proto (the server trait; messages and client
//! are the `offloadd-proto` crate's) and records build provenance. `protoc` comes from
//! `protoc-bin-vendored` so a fresh machine needs no system protobuf compiler; `PROTOC` still
//! wins for packagers who bring their own.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    // Rebuild the provenance when HEAD moves: HEAD itself changes on checkout, the branch's ref
    // file on commit.
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            if std::path::Path::new(".git").join(r).exists() {
                println!("cargo:rerun-if-changed=.git/{r}");
            }
        }
    }
    println!("cargo:rustc-env=BUILD_INFO_GIT_SHA={}", git_sha());
    println!(
        "cargo:rustc-env=BUILD_INFO_TARGET={}",
        std::env::var("TARGET")?
    );
    println!(
        "cargo:rustc-env=BUILD_INFO_PROFILE={}",
        std::env::var("PROFILE")?
    );
    println!("cargo:rerun-if-env-changed=PROTOC");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    // The server trait alone, over the protocol crate's messages, except that the answers
    // carrying tensor tables are bytes encoded beforehand: a 10,000-row page takes milliseconds
    // to encode, and tonic encodes on the runtime thread that every other call waits on.
    let server_dir = out_dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    let mut server = tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server_dir)
        .extern_path(".offloadd.v1", "::offloadd_proto");
    for message in ["Model", "Lease", "LeaseTensorPage"] {
        server = server.extern_path(
            format!(".offloadd.v1.{message}"),
            format!("crate::proto::Encoded<::offloadd_proto::{message}>"),
        );
    }
    server.compile_with_config(config, &["proto/offloadd/v1/offloadd.proto"], &["proto"])?;
    Ok(())
}

/// Build provenance for GetInfo; a source tarball without git still builds.
fn git_sha() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}
