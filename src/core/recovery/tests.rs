//! Restarts in-process: a first core records pools and models, is dropped as a killed daemon
//! would leave them (files and journal in place), and a second core over the same directory
//! adopts, verifies, or drops them with the reason GetInfo shows.

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use super::JournalOutcome;
use crate::config::{Config, PoolSpec, VerifyOnAdopt};
use crate::core::Core;
use crate::core::crc;
use crate::core::journal::JOURNAL_DIR;
use crate::core::models::model::ModelState;
use crate::core::models::{RegisterRequest, wait_loaded};
use crate::core::pools::NewPool;
use crate::core::testing::{Fixture, Written};
use crate::metrics::Metrics;
use crate::service::Service;

/// A first run: pool "p" with model "m" READY. Returns what the checkpoint holds and the pool
/// file; the core is gone when this returns, its files and journal left behind.
async fn first_run(f: &Fixture, config: Config) -> (Written, std::path::PathBuf) {
    let svc = Service::new(
        f.build(config).start().expect("start"),
        Arc::new(Metrics::new()),
    );
    let pool = svc
        .create_pool(NewPool {
            name: "p".into(),
            device: "cpu".into(),
            size_bytes: 4 << 20,
        })
        .await
        .unwrap();
    let (path, written) = f.checkpoint("m", 3, 4096);
    let req = RegisterRequest {
        name: "m".into(),
        pool: "p".into(),
        path,
        backend: None,
    };
    svc.register(req, true, |_| ()).await.unwrap();
    (written, pool.pool.path().to_path_buf())
}

fn assert_bytes(core: &Core, written: &Written) {
    let model = core.models.get("m").expect("model adopted");
    for (name, data) in written {
        let t = model
            .tensors()
            .iter()
            .find(|t| &t.name == name)
            .cloned()
            .unwrap();
        assert_eq!(
            crc::CrcBuffer::default().checksum(model.pool().region(), t.offset, t.len),
            crc::crc32c(data),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_restart_adopts_pools_and_models_and_verifies_every_tensor() {
    let f = Fixture::new();
    let (written, _) = first_run(&f, f.config()).await;
    let built = f.build(f.config());
    let core = Arc::clone(built.core());
    let report = core.recovery.snapshot();
    assert_eq!(report.journal, JournalOutcome::Applied);
    assert_eq!(report.pools_adopted, ["p"]);
    assert_eq!(report.models_adopted, ["m"]);
    assert!(report.dropped.is_empty(), "{:?}", report.dropped);
    let model = core.models.get("m").unwrap();
    assert!(model.adopted);
    assert_eq!(model.state(), ModelState::Loading, "verified before READY");
    built.start().unwrap();
    wait_loaded(&model).await;
    assert_eq!(model.state(), ModelState::Ready);
    assert_bytes(&core, &written);
}

#[tokio::test]
async fn an_adopted_pool_is_pinned_once_started_not_while_the_journal_is_applied() {
    let f = Fixture::new();
    let (written, _) = first_run(&f, f.config()).await;
    let built = f.build(f.config());
    let core = Arc::clone(built.core());
    let pool = core.pools.get("p").unwrap();
    if !pool.decision().pin {
        eprintln!(
            "skipped: this process may not pin ({})",
            pool.decision().reason
        );
        return;
    }
    assert!(
        pool.pin_pending() && !pool.pinned(),
        "nothing is pinned before start"
    );
    let model = core.models.get("m").unwrap();
    built.start().unwrap();
    let settling = Arc::clone(&pool);
    tokio::task::spawn_blocking(move || settling.wait_pin_settled())
        .await
        .unwrap();
    assert!(pool.pinned());
    wait_loaded(&model).await;
    assert_eq!(model.state(), ModelState::Ready);
    assert_bytes(&core, &written);
}

#[tokio::test]
async fn without_verification_an_adopted_model_is_ready_at_once() {
    let f = Fixture::new();
    let (written, _) = first_run(&f, f.config()).await;
    let mut config = f.config();
    config.models.verify_on_adopt = VerifyOnAdopt::None;
    let built = f.build(config);
    let model = built.core().models.get("m").unwrap();
    assert_eq!(model.state(), ModelState::Ready);
    assert_bytes(built.core(), &written);
}

#[tokio::test]
async fn a_byte_changed_while_down_drops_the_model_and_names_the_tensor() {
    let f = Fixture::new();
    let (written, pool_file) = first_run(&f, f.config()).await;
    // Which tensor sits at the pool's first byte, as the first run placed it.
    let first = {
        let built = f.build(Config {
            models: crate::config::ModelsConfig {
                verify_on_adopt: VerifyOnAdopt::None,
                ..f.config().models
            },
            ..f.config()
        });
        let m = built.core().models.get("m").unwrap();
        let t = m
            .tensors()
            .iter()
            .min_by_key(|t| t.offset)
            .cloned()
            .unwrap();
        (t.name, t.offset)
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&pool_file)
        .unwrap();
    file.seek(SeekFrom::Start(first.1)).unwrap();
    let original = written.iter().find(|(n, _)| *n == first.0).unwrap().1[0];
    file.write_all(&[!original]).unwrap();
    drop(file);

    let built = f.build(f.config());
    let core = Arc::clone(built.core());
    let model = core.models.get("m").unwrap();
    built.start().unwrap();
    wait_loaded(&model).await;
    assert_eq!(model.state(), ModelState::Failed);
    assert!(core.models.get("m").is_err(), "no longer registered");
    let report = core.recovery.snapshot();
    assert!(report.models_adopted.is_empty());
    let dropped = &report.dropped[0];
    assert_eq!((dropped.kind, dropped.name.as_str()), ("model", "m"));
    assert!(dropped.reason.contains(&first.0), "{}", dropped.reason);
    drop((model, core));
    // The journal forgot it: a third start has nothing to adopt.
    let third = f.build(f.config());
    assert!(third.core().recovery.snapshot().models_adopted.is_empty());
}

#[tokio::test]
async fn a_pool_the_config_now_declares_otherwise_is_rebuilt_with_its_models_dropped() {
    let f = Fixture::new();
    first_run(&f, f.config()).await;
    let mut config = f.config();
    config.pools.create = vec![PoolSpec {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 8 << 20,
    }];
    let built = f.build(config);
    let report = built.core().recovery.snapshot();
    assert!(report.pools_adopted.is_empty());
    let reasons: Vec<_> = report
        .dropped
        .iter()
        .map(|d| format!("{} {}: {}", d.kind, d.name, d.reason))
        .collect();
    assert!(
        reasons[0].starts_with("pool p: pools.create now declares it as 8388608 bytes"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("model m: its pool \"p\" was not adopted"),
        "{reasons:?}"
    );
    assert!(built.core().pools.list().is_empty());
    assert_eq!(built.core().pools.committed(), 0);
}

#[tokio::test]
async fn an_unreadable_journal_is_discarded_and_the_files_swept() {
    let f = Fixture::new();
    let (_, pool_file) = first_run(&f, f.config()).await;
    let journal = f.config().pools.dir.join(JOURNAL_DIR).join("pools.json");
    std::fs::write(&journal, b"{ not json").unwrap();
    let built = f.build(f.config());
    let report = built.core().recovery.snapshot();
    assert!(
        matches!(report.journal, JournalOutcome::Discarded(ref why) if !why.is_empty()),
        "{:?}",
        report.journal
    );
    assert!(built.core().pools.list().is_empty());
    assert!(
        !pool_file.exists(),
        "the pool file an earlier run left is removed"
    );
}
