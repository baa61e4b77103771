//! An in-process core over a temporary directory and the cpu device, with small real
//! checkpoints: what the orchestration's unit tests (service, recovery) build on. Real files,
//! real shared memory and mlock; only the server and the transport are left out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::{Dtype, TensorView};

use super::build::Built;
use super::{Core, CoreParams};
use crate::config::Config;
use crate::device::cpu::CpuDevice;

/// A checkpoint's tensors as written: name and bytes.
pub type Written = Vec<(String, Vec<u8>)>;

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Pools under the temp dir, checkpoints from its `models/`, a 64 MiB budget, no scrubber.
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.pools.dir = self.dir.path().join("pools");
        c.pools.max_host_bytes = Some(64 << 20);
        c.models.roots = vec![self.models()];
        c.models.scrub_bytes_per_second = 0;
        c
    }

    pub fn models(&self) -> PathBuf {
        self.dir.path().join("models")
    }

    /// Builds a core with only the cpu device. Blocking.
    pub fn build(&self, config: Config) -> Built {
        Core::build(CoreParams {
            config,
            vllm_env: Default::default(),
            devices: vec![Arc::new(CpuDevice::new())],
            cuda_absent_reason: Some("unit test".into()),
            tcp_bound: None,
            metrics_bound: None,
        })
        .expect("build the core")
    }

    /// Writes `models/<name>/model.safetensors`: `layers` decoder layers of two F32 tensors of
    /// `elems` elements each, and an lm_head; every tensor's bytes differ.
    pub fn checkpoint(&self, name: &str, layers: u32, elems: usize) -> (PathBuf, Written) {
        let dir = self.models().join(name);
        std::fs::create_dir_all(&dir).expect("checkpoint dir");
        let mut written = Vec::new();
        let mut seed = 0u32;
        let mut tensor = |name: String| {
            seed += 1;
            let data: Vec<u8> = (0..elems as u32)
                .flat_map(|i| (seed.wrapping_mul(2_654_435_761) ^ i).to_le_bytes())
                .collect();
            written.push((name, data));
        };
        for l in 0..layers {
            tensor(format!("model.layers.{l}.mlp.up_proj.weight"));
            tensor(format!("model.layers.{l}.mlp.down_proj.weight"));
        }
        tensor("lm_head.weight".into());
        write(&dir.join("model.safetensors"), &written, elems);
        (dir, written)
    }
}

fn write(path: &Path, tensors: &Written, elems: usize) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, data)| {
            let view = TensorView::new(Dtype::F32, vec![elems], data).expect("valid tensor");
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}
