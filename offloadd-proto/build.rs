//! Compiles the control-plane proto (the workspace's `proto/`) into messages and the client.
//! `protoc` comes from `protoc-bin-vendored` so a fresh machine needs no system protobuf
//! compiler; `PROTOC` still wins for packagers who bring their own.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=../proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .build_server(false)
        // Channels are the client crate's business; the generated client is generic over them.
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("offloadd_descriptor.bin"))
        .compile_with_config(
            config,
            &["../proto/offloadd/v1/offloadd.proto"],
            &["../proto"],
        )?;
    Ok(())
}
