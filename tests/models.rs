//! Model registration through the real daemon: good checkpoints land byte-exact in the pool,
//! bad ones are refused precisely and leave nothing behind.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::ckpt::{self, Tensor};
use common::{DaemonBuilder, Scratch};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    DeletePoolRequest, GetInfoRequest, GetModelRequest, GetPoolRequest, ListModelsRequest,
    ModelState, UnregisterModelRequest, WatchModelRequest,
};
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

async fn used(c: &mut OffloadClient<Channel>, pool: &str) -> u64 {
    c.get_pool(GetPoolRequest { name: pool.into() })
        .await
        .unwrap()
        .into_inner()
        .used_bytes
}

/// Every tensor's bytes in the pool file equal the checkpoint's, with the right metadata.
async fn verify_in_pool(c: &mut OffloadClient<Channel>, model: &str, tensors: &[Tensor]) {
    let m = c
        .get_model(GetModelRequest {
            name: model.into(),
            include_tensors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state(), ModelState::Ready);
    assert_eq!(m.tensor_count as usize, tensors.len());
    assert_eq!(m.loaded_bytes, m.bytes);
    assert!(
        m.load_seconds > 0.0,
        "a model loaded from a checkpoint says how long its bytes took"
    );
    let p = c
        .get_pool(GetPoolRequest {
            name: m.pool.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let file = std::fs::File::open(&p.path).unwrap();
    for want in tensors {
        let got = m
            .tensors
            .iter()
            .find(|t| t.name == want.name)
            .unwrap_or_else(|| panic!("{} missing", want.name));
        assert_eq!(got.offset % 256, 0, "{} aligned", got.name);
        assert_eq!(got.length as usize, want.data.len());
        assert_eq!(got.dtype, format!("{:?}", want.dtype));
        assert_eq!(
            got.shape,
            want.shape.iter().map(|&d| d as u64).collect::<Vec<_>>()
        );
        let mut buf = vec![0u8; want.data.len()];
        file.read_exact_at(&mut buf, got.offset).unwrap();
        assert!(buf == want.data, "bytes of {} differ", got.name);
        assert_eq!(
            got.crc32c,
            crc32c::crc32c(&want.data),
            "checksum of {}",
            got.name
        );
        let layer = offloadd::parts::layer_of(&want.name, &[]);
        assert_eq!(got.layer, layer);
    }
}

#[tokio::test]
async fn registers_single_file_sharded_and_directory_checkpoints() {
    let s = Scratch::new();
    let root = s.models();
    let tensors = ckpt::llama(4, 64, 128);
    ckpt::write_file(&root.join("single.safetensors"), &tensors);
    ckpt::write_sharded(&root.join("sharded"), &tensors, 3);
    std::fs::create_dir_all(root.join("dir")).unwrap();
    ckpt::write_file(&root.join("dir/model.safetensors"), &tensors);

    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .set("models.chunk_bytes=4096")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 16 * MIB).await;
    for (name, path) in [
        ("single", root.join("single.safetensors")),
        ("sharded", root.join("sharded")),
        ("dir", root.join("dir")),
    ] {
        let asked = std::time::Instant::now();
        let m = c
            .register_model(common::registration(name, "p", &path, true))
            .await
            .unwrap()
            .into_inner();
        let answered = asked.elapsed().as_secs_f64();
        assert_eq!(m.state(), ModelState::Ready, "{name}");
        assert!(
            m.load_seconds > 0.0 && m.load_seconds < answered,
            "{name}: loaded in {} s, answered in {answered} s",
            m.load_seconds
        );
        assert_eq!(m.path, path.canonicalize().unwrap().display().to_string());
        verify_in_pool(&mut c, name, &tensors).await;
    }
    let list = c
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["dir", "sharded", "single"]
    );
    assert!(
        list.models.iter().all(|m| m.tensors.is_empty()),
        "ListModels omits tensor tables"
    );

    // The pool holds three copies, each tensor rounded up to 256 bytes, and no more.
    let per_model: u64 = tensors
        .iter()
        .map(|t| (t.data.len() as u64).max(1).div_ceil(256) * 256)
        .sum();
    assert_eq!(used(&mut c, "p").await, 3 * per_model);
    for name in ["dir", "sharded", "single"] {
        c.unregister_model(UnregisterModelRequest { name: name.into() })
            .await
            .unwrap();
    }
    assert_eq!(used(&mut c, "p").await, 0, "unregister frees every range");
    assert!(d.terminate().await.success());
}

/// Small tensors are read in batches: straight into the pool when their sizes keep the pool's
/// 256-byte alignment (they then lie in the pool as in the file), through a buffer otherwise.
#[tokio::test]
async fn small_tensors_land_byte_exact_whether_or_not_they_keep_the_pools_alignment() {
    let s = Scratch::new();
    let root = s.models();
    let tensor = |i: usize, len: usize| Tensor {
        name: format!("model.layers.{i}.w"),
        dtype: safetensors::Dtype::U8,
        shape: vec![len],
        data: ckpt::bytes(len, i as u64),
    };
    // 300 KiB of 256-byte multiples: more than one checksum run (256 KiB) in one batch.
    let aligned: Vec<Tensor> = (0..150).map(|i| tensor(i, 256 * (1 + i % 16))).collect();
    let ragged: Vec<Tensor> = (0..150).map(|i| tensor(i, 1 + 37 * i)).collect();
    ckpt::write_file(&root.join("aligned.safetensors"), &aligned);
    ckpt::write_file(&root.join("ragged.safetensors"), &ragged);
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 16 * MIB).await;
    for (name, tensors) in [("aligned", &aligned), ("ragged", &ragged)] {
        let path = root.join(format!("{name}.safetensors"));
        c.register_model(common::registration(name, "p", &path, true))
            .await
            .unwrap();
        verify_in_pool(&mut c, name, tensors).await;
    }
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn no_wait_answers_loading_and_watch_streams_progress_to_ready() {
    let s = Scratch::new();
    let root = s.models();
    let tensors = ckpt::llama(8, 256, 512);
    ckpt::write_file(&root.join("m.safetensors"), &tensors);
    // Throttled so the load is observably in progress.
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .set("models.chunk_bytes=65536")
        .set("models.max_load_bytes_per_sec=8388608")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 32 * MIB).await;
    let m = c
        .register_model(common::registration(
            "m",
            "p",
            &root.join("m.safetensors"),
            false,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state(), ModelState::Loading);
    assert_eq!(m.loaded_bytes, 0);
    let mut stream = c
        .watch_model(WatchModelRequest { name: "m".into() })
        .await
        .unwrap()
        .into_inner();
    let mut last = 0;
    let mut updates = 0;
    let mut final_state = ModelState::Loading;
    while let Some(p) = stream.message().await.unwrap() {
        assert!(p.loaded_bytes >= last, "progress never goes back");
        assert_eq!(p.bytes, m.bytes);
        last = p.loaded_bytes;
        updates += 1;
        final_state = p.state();
    }
    assert_eq!(final_state, ModelState::Ready);
    assert_eq!(last, m.bytes);
    assert!(updates > 2, "saw intermediate progress ({updates} updates)");
    verify_in_pool(&mut c, "m", &tensors).await;
    assert!(d.logs().contains("model ready"));
    assert!(
        d.logs()
            .contains(r#""message":"loading","model":"m","percent":50"#),
        "progress log lines: {}",
        d.logs()
    );
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn unregister_during_a_load_cancels_it_and_frees_its_ranges() {
    let s = Scratch::new();
    let root = s.models();
    ckpt::write_file(&root.join("m.safetensors"), &ckpt::llama(8, 512, 1024));
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .set("models.chunk_bytes=65536")
        .set("models.max_load_bytes_per_sec=1048576")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 64 * MIB).await;
    // wait: true, in the background: it must end with ABORTED once unregistered.
    let mut c2 = c.clone();
    let path = root.join("m.safetensors");
    let waiter = tokio::spawn(async move {
        c2.register_model(common::registration("m", "p", &path, true))
            .await
    });
    let mut stream = loop {
        // The model appears once its ranges are allocated.
        if let Ok(s) = c.watch_model(WatchModelRequest { name: "m".into() }).await {
            break s.into_inner();
        }
        tokio::task::yield_now().await;
    };
    // Wait until bytes are actually flowing.
    loop {
        let p = stream.message().await.unwrap().unwrap();
        assert_eq!(p.state(), ModelState::Loading);
        if p.loaded_bytes > 0 {
            break;
        }
    }
    assert!(used(&mut c, "p").await > 0);
    c.unregister_model(UnregisterModelRequest { name: "m".into() })
        .await
        .unwrap();
    assert_eq!(
        used(&mut c, "p").await,
        0,
        "ranges freed when UnregisterModel returns"
    );
    let err = waiter.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let err = c
        .get_model(GetModelRequest {
            name: "m".into(),
            include_tensors: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(d.terminate().await.success());
}

/// The scrubber re-reads READY models in the background; it must never be what keeps an
/// unregistered model's ranges from returning to the pool (it once held every model it meant to
/// read for its whole pass).
#[tokio::test]
async fn unregister_frees_ranges_while_the_scrubber_is_mid_pass() {
    let s = Scratch::new();
    let root = s.models();
    ckpt::write_file(&root.join("m.safetensors"), &ckpt::llama(2, 256, 512));
    // 64 KiB/s: a pass over these models takes tens of seconds.
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .set("models.scrub_bytes_per_second=65536")
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 16 * MIB).await;
    let path = root.join("m.safetensors");
    for name in ["a", "b"] {
        c.register_model(common::registration(name, "p", &path, true))
            .await
            .unwrap();
    }
    let started = std::time::Instant::now();
    while c
        .get_info(GetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .scrub
        .is_none_or(|s| s.bytes_checked == 0 || s.passes > 0)
    {
        assert!(
            started.elapsed() < common::DEADLINE,
            "the scrubber never started"
        );
        tokio::task::yield_now().await;
    }
    for name in ["a", "b"] {
        c.unregister_model(UnregisterModelRequest { name: name.into() })
            .await
            .unwrap();
    }
    assert_eq!(
        used(&mut c, "p").await,
        0,
        "ranges freed when UnregisterModel returns"
    );
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn deleting_a_pool_with_a_model_is_refused() {
    let s = Scratch::new();
    let root = s.models();
    ckpt::write_file(&root.join("m.safetensors"), &ckpt::llama(2, 64, 64));
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 4 * MIB).await;
    c.register_model(common::registration(
        "m",
        "p",
        &root.join("m.safetensors"),
        true,
    ))
    .await
    .unwrap();
    let err = c
        .delete_pool(DeletePoolRequest { name: "p".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("unregister"), "{}", err.message());
    c.unregister_model(UnregisterModelRequest { name: "m".into() })
        .await
        .unwrap();
    c.delete_pool(DeletePoolRequest { name: "p".into() })
        .await
        .unwrap();
    assert!(d.terminate().await.success());
}

#[tokio::test]
async fn full_pool_evicts_idle_models_only_when_allowed() {
    let s = Scratch::new();
    let root = s.models();
    let tensors = ckpt::llama(2, 256, 256);
    ckpt::write_file(&root.join("m.safetensors"), &tensors);
    let size: u64 = tensors
        .iter()
        .map(|t| (t.data.len() as u64).div_ceil(256) * 256)
        .sum();
    let path = root.join("m.safetensors");

    for evict in [false, true] {
        let s2 = Scratch::new();
        let d = DaemonBuilder::new(&s2)
            .roots(&[&root])
            .set(&format!("pools.evict_idle={evict}"))
            .start()
            .await
            .unwrap();
        let mut c = d.client().await;
        // Room for exactly one copy.
        common::cpu_pool(&mut c, "p", size + 1024).await;
        c.register_model(common::registration("a", "p", &path, true))
            .await
            .unwrap();
        c.register_model(common::registration("b", "p", &path, true))
            .await
            .map(|_| ())
            .unwrap_or_else(|e| {
                assert!(!evict, "eviction was allowed: {e:?}");
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(
                    e.message().contains(&size.to_string()) && e.message().contains("evict_idle"),
                    "{}",
                    e.message()
                );
            });
        let names: Vec<String> = c
            .list_models(ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, if evict { vec!["b"] } else { vec!["a"] });
        if evict {
            assert!(d.logs().contains("evicted idle model"));
        }
        assert!(d.terminate().await.success());
    }
}

#[tokio::test]
async fn models_declared_in_toml_register_at_startup() {
    let s = Scratch::new();
    let root = s.models();
    let tensors = ckpt::llama(2, 64, 64);
    ckpt::write_file(&root.join("m.safetensors"), &tensors);
    let cfg = s.path("offloadd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[models]\nroots = [\"{root}\"]\n[[pools.create]]\nname = \"p\"\nsize_bytes = 4194304\n[[models.register]]\nname = \"boot\"\npool = \"p\"\npath = \"{root}/m.safetensors\"\n[models.register.prefetch]\ngroup_size = 2\nnum_in_group = 1\nprefetch_step = 1\n",
            root = root.display()
        ),
    )
    .unwrap();
    let d = DaemonBuilder::new(&s)
        .arg("--config")
        .arg(cfg.to_str().unwrap())
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    let mut stream = c
        .watch_model(WatchModelRequest {
            name: "boot".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(p) = stream.message().await.unwrap() {
        last = Some(p.state());
    }
    assert_eq!(last, Some(ModelState::Ready));
    verify_in_pool(&mut c, "boot", &tensors).await;
    let m = c
        .get_model(GetModelRequest {
            name: "boot".into(),
            include_tensors: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        m.backend.unwrap().kind,
        Some(offloadd::proto::backend::Kind::Prefetch(_))
    ));
    c.get_info(GetInfoRequest {}).await.unwrap();
    assert!(d.terminate().await.success());
}

/// 200k tensors in one shard behind an index (a mixture-of-experts layout): every index entry is
/// checked against the shard's table, which must not cost a scan of the shard per entry.
#[tokio::test]
async fn an_indexed_shard_of_200k_tensors_registers() {
    const N: usize = 200_000;
    let s = Scratch::new();
    let dir = s.models().join("moe");
    let tensors = ckpt::experts(N);
    ckpt::write_sharded(&dir, &tensors, 1);
    let d = DaemonBuilder::new(&s)
        .roots(&[&s.models()])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 64 * MIB).await;
    let started = std::time::Instant::now();
    let m = c
        .register_model(common::registration("moe", "p", &dir, true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state(), ModelState::Ready);
    assert_eq!(m.tensor_count as usize, N);
    eprintln!(
        "200k-tensor indexed shard registered in {:?}",
        started.elapsed()
    );
    // A table this large has its layers found across the cores, in tasks of thousands of rows:
    // a page of 20k rows spans several tasks, and each row has the layer of its own name.
    let page = c
        .get_model(GetModelRequest {
            name: "moe".into(),
            include_tensors: true,
            page_size: 20_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.tensors.len(), 20_000);
    for t in &page.tensors {
        let layer = t.name["model.layers.".len()..].split('.').next().unwrap();
        assert_eq!(t.layer, Some(layer.parse().unwrap()), "{}", t.name);
    }
    assert!(d.terminate().await.success());
}

/// Bytes of a file in the page cache (`mincore` over a mapping that is never read).
fn cached_bytes(path: &Path) -> u64 {
    let bits = offloadd::parts::resident_pages(&std::fs::File::open(path).unwrap()).unwrap();
    let pages: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
    pages * rustix::param::page_size() as u64
}

#[tokio::test]
async fn a_cold_load_leaves_no_second_copy_in_the_page_cache_and_a_warm_one_stays_cached() {
    let s = Scratch::new();
    let root = s.models();
    let (cold, warm) = (root.join("cold.safetensors"), root.join("warm.safetensors"));
    ckpt::write_file(&cold, &ckpt::llama(4, 256, 512));
    ckpt::write_file(&warm, &ckpt::llama(4, 256, 512));
    // Evict the cold file, as after a reboot: written back, then dropped (no root needed).
    let f = std::fs::File::open(&cold).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let len = f.metadata().unwrap().len();
    if cached_bytes(&cold) > len / 2 {
        eprintln!(
            "SKIPPED: {} keeps its pages cached after POSIX_FADV_DONTNEED (tmpfs?); set TMPDIR to a disk",
            cold.display()
        );
        return;
    }
    std::fs::read(&warm).unwrap();
    let warm_before = cached_bytes(&warm);
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 32 << 20).await;
    c.register_model(common::registration("cold", "p", &cold, true))
        .await
        .unwrap();
    c.register_model(common::registration("warm", "p", &warm, true))
        .await
        .unwrap();
    // What the load read from disk is dropped behind it (a page shared with the header, read
    // before the load, may stay); what was cached before stays cached.
    let left = cached_bytes(&cold);
    assert!(
        left <= 2 * 4096,
        "{left} of {len} bytes of the cold checkpoint stayed cached"
    );
    assert_eq!(
        cached_bytes(&warm),
        warm_before,
        "the warm checkpoint stays cached"
    );
    assert!(d.terminate().await.success());
}
