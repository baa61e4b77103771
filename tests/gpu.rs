//! The GPU end-to-end check as a test: ignored by default, with the reason shown by every
//! `cargo test`. On a GPU machine, `cargo test --test gpu -- --ignored` runs tests/gpu/check.sh
//! (which builds release binaries into .gpu-carry/ if needed) and fails if there is no GPU.

#[test]
#[ignore = "needs an NVIDIA GPU and its driver: run `cargo test --test gpu -- --ignored` or `bash tests/gpu/check.sh` on a GPU machine"]
fn cuda_data_plane_end_to_end() {
    let gpu = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        gpu,
        "this test was asked for explicitly but there is no NVIDIA GPU here (nvidia-smi -L failed)"
    );
    let root = env!("CARGO_MANIFEST_DIR");
    let status = std::process::Command::new("bash")
        .arg(format!("{root}/tests/gpu/check.sh"))
        .current_dir(root)
        .status()
        .expect("run tests/gpu/check.sh");
    assert!(status.success(), "tests/gpu/check.sh failed: {status}");
}
