//! A journal the next start cannot trust, through the real binary: a damaged or foreign pools
//! file means a clean start with the reason; a model file in another format drops that model
//! alone.

mod common;

use common::restart::{
    Setup, assert_next_start_finds_no_journal, pool_files, recovery, refused, register,
    stopped_with_one_model,
};
use offloadd::proto::ListPoolsRequest;
use tonic::Code;

/// A journal the next start cannot trust: a clean start, the reason in GetInfo and the log,
/// and nothing left of what it described.
async fn assert_clean_start(st: &Setup, reason: &str) {
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    let r = recovery(&mut c).await;
    assert_eq!(r.journal, "discarded");
    assert!(r.journal_error.contains(reason), "{reason:?} in {r:?}");
    assert!(r.pools_adopted.is_empty() && r.models_adopted.is_empty());
    let pools = c
        .list_pools(ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(pools.pools.is_empty());
    assert_eq!(
        pool_files(st),
        Vec::<String>::new(),
        "the old pool file is removed"
    );
    let logged = d.logs();
    assert!(
        logged.contains("the journal is unusable") && logged.contains(reason),
        "{logged}"
    );
    // The start after that one finds no journal at all.
    assert!(d.terminate().await.success());
    assert_next_start_finds_no_journal(st).await;
}

#[tokio::test]
async fn a_journal_from_another_version_is_a_clean_start_naming_both_versions() {
    let st = Setup::new();
    stopped_with_one_model(&st).await;
    // What an upgrade to a binary with another journal format would find.
    let path = st.journal().join("pools.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("offloadd-journal v1 "), "{text}");
    std::fs::write(&path, text.replacen(" v1 ", " v2 ", 1)).unwrap();
    assert_clean_start(&st, "journal format v2, this offloadd reads v1").await;
}

#[tokio::test]
async fn a_truncated_journal_is_a_clean_start() {
    let st = Setup::new();
    stopped_with_one_model(&st).await;
    let path = st.journal().join("pools.json");
    let raw = std::fs::read(&path).unwrap();
    std::fs::write(&path, &raw[..raw.len() / 2 + 40]).unwrap();
    assert_clean_start(&st, "truncated").await;
}

#[tokio::test]
async fn a_bit_flipped_journal_is_a_clean_start() {
    let st = Setup::new();
    stopped_with_one_model(&st).await;
    let path = st.journal().join("pools.json");
    let mut raw = std::fs::read(&path).unwrap();
    // A digit of the pool's size: still valid JSON, caught by the checksum.
    let at = raw.len() - 1 - raw.iter().rev().position(|b| b.is_ascii_digit()).unwrap();
    raw[at] = if raw[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&path, &raw).unwrap();
    assert_clean_start(&st, "checksum mismatch").await;
}

/// A model file in another journal format (left by an older or newer offloadd) drops that model
/// alone: its pool is adopted, the reason names both versions, and the model can be registered
/// again at once.
#[tokio::test]
async fn a_model_file_from_another_version_drops_that_model_alone() {
    let st = Setup::new();
    let (_, path) = stopped_with_one_model(&st).await;
    let file = st.journal().join("model-a.json");
    let raw = std::fs::read(&file).unwrap();
    assert!(raw.starts_with(b"offloadd-journal v3 "), "a v3 model file");
    std::fs::write(&file, [b"offloadd-journal v1 ", &raw[20..]].concat()).unwrap();
    let d = st.daemon().start().await.unwrap();
    let mut c = d.client().await;
    let r = recovery(&mut c).await;
    assert_eq!(r.journal, "applied", "{r:?}");
    assert_eq!(r.pools_adopted, vec!["p"]);
    assert!(r.models_adopted.is_empty(), "{r:?}");
    assert_eq!(r.dropped.len(), 1, "{r:?}");
    assert_eq!(r.dropped[0].kind, "model");
    assert!(
        r.dropped[0]
            .reason
            .contains("journal format v1, this offloadd reads v2 to v3"),
        "{r:?}"
    );
    assert!(!file.exists(), "the unreadable file is removed");
    assert_eq!(refused(&mut c, "a").await.code(), Code::NotFound);
    register(&mut c, "a", "p", &path, true).await;
    assert!(d.terminate().await.success());
}
