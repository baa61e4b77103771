//! What the restart tests share: a scratch setup with a models root, a model registered and
//! the daemon stopped, and what the next start reports.

use std::path::{Path, PathBuf};

use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{GetInfoRequest, GetModelRequest, RegisterModelRequest};
use tonic::transport::Channel;

use super::ckpt::{self, Tensor};
use super::{DaemonBuilder, Scratch};

pub const JOURNAL: &str = "offloadd-journal";

pub struct Setup {
    pub s: Scratch,
    pub root: PathBuf,
}

impl Setup {
    pub fn new() -> Self {
        let s = Scratch::new();
        let root = s.models();
        Self { s, root }
    }

    pub fn checkpoint(&self, name: &str, tensors: &[Tensor]) -> PathBuf {
        let path = self.root.join(format!("{name}.safetensors"));
        ckpt::write_file(&path, tensors);
        path
    }

    pub fn daemon(&self) -> DaemonBuilder<'_> {
        DaemonBuilder::new(&self.s).roots(&[&self.root])
    }

    pub fn journal(&self) -> PathBuf {
        self.s.pools_dir().join(JOURNAL)
    }
}

pub async fn register(
    c: &mut OffloadClient<Channel>,
    name: &str,
    pool: &str,
    path: &Path,
    wait: bool,
) {
    c.register_model(RegisterModelRequest {
        name: name.into(),
        pool: pool.into(),
        path: path.display().to_string(),
        wait,
        backend: None,
    })
    .await
    .unwrap();
}

pub async fn recovery(c: &mut OffloadClient<Channel>) -> offloadd::proto::Recovery {
    c.get_info(GetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .recovery
        .unwrap()
}

/// GetModel's refusal for a model that must not be there.
pub async fn refused(c: &mut OffloadClient<Channel>, name: &str) -> tonic::Status {
    c.get_model(GetModelRequest {
        name: name.into(),
        ..Default::default()
    })
    .await
    .unwrap_err()
}

/// One READY model in pool "p", then a clean stop: the state every damage test starts from.
pub async fn stopped_with_one_model(st: &Setup) -> (Vec<Tensor>, PathBuf) {
    let tensors = ckpt::llama(3, 128, 256);
    let path = st.checkpoint("a", &tensors);
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    super::cpu_pool(&mut c, "p", 8 << 20).await;
    register(&mut c, "a", "p", &path, true).await;
    assert!(d.terminate().await.success());
    (tensors, path)
}

pub fn pool_files(st: &Setup) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(st.s.pools_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("offloadd-pool-"))
        .collect();
    v.sort();
    v
}

pub async fn assert_next_start_finds_no_journal(st: &Setup) {
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    assert_eq!(recovery(&mut c).await.journal, "absent");
    assert!(d.terminate().await.success());
}
