//! Every kind of bad registration, against one running daemon: a precise status, a message that
//! names the file (and tensor), nothing registered, the pool's used bytes exactly as before, and
//! the daemon still serving.

mod common;

use std::path::{Path, PathBuf};

use common::ckpt;
use common::{DaemonBuilder, Scratch};
use offloadd::proto::{
    CreatePoolRequest, GetInfoRequest, GetPoolRequest, ListModelsRequest, RegisterModelRequest,
};
use tonic::Code;

struct Case {
    what: &'static str,
    path: PathBuf,
    name: &'static str,
    pool: &'static str,
    code: Code,
    /// Substrings the message must contain.
    mentions: Vec<String>,
}

fn build_cases(root: &Path, outside: &Path) -> Vec<Case> {
    let good = ckpt::llama(2, 64, 64);
    let p = |n: &str| root.join(n);
    let case = |what, path: PathBuf, code, extra: &[&str]| {
        let mut mentions = vec![path.display().to_string()];
        mentions.extend(extra.iter().map(|s| s.to_string()));
        Case {
            what,
            path,
            name: "m",
            pool: "p",
            code,
            mentions,
        }
    };
    let mut cases = Vec::new();

    ckpt::write_file(&p("truncated.safetensors"), &good);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p("truncated.safetensors"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 10).unwrap();
    cases.push(case(
        "truncated file",
        p("truncated.safetensors"),
        Code::InvalidArgument,
        &["tensor \"", "truncated"],
    ));

    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":1}");
    std::fs::write(p("hdrlen.safetensors"), bytes).unwrap();
    cases.push(case(
        "header length beyond end of file",
        p("hdrlen.safetensors"),
        Code::InvalidArgument,
        &["beyond the end"],
    ));

    ckpt::raw(&p("notjson.safetensors"), "this is not json", 0);
    cases.push(case(
        "header not JSON",
        p("notjson.safetensors"),
        Code::InvalidArgument,
        &["JSON"],
    ));

    let mut bytes = 200_000_000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b' '; 64]);
    std::fs::write(p("huge.safetensors"), bytes).unwrap();
    cases.push(case(
        "header over 100 MB",
        p("huge.safetensors"),
        Code::InvalidArgument,
        &["100 MB"],
    ));

    ckpt::raw(
        &p("dtype.safetensors"),
        r#"{"a.weight":{"dtype":"F128","shape":[2],"data_offsets":[0,32]}}"#,
        32,
    );
    cases.push(case(
        "unknown dtype",
        p("dtype.safetensors"),
        Code::InvalidArgument,
        &["a.weight", "F128"],
    ));

    ckpt::raw(
        &p("shape.safetensors"),
        r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        8,
    );
    cases.push(case(
        "shape x dtype != span",
        p("shape.safetensors"),
        Code::InvalidArgument,
        &["\"w\"", "shape"],
    ));

    ckpt::raw(
        &p("neg.safetensors"),
        r#"{"neg":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,8]}}"#,
        8,
    );
    cases.push(case(
        "negative dimension",
        p("neg.safetensors"),
        Code::InvalidArgument,
        &["\"neg\""],
    ));

    ckpt::raw(
        &p("ovf.safetensors"),
        r#"{"ovf":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
        8,
    );
    cases.push(case(
        "overflowing dimensions",
        p("ovf.safetensors"),
        Code::InvalidArgument,
        &["\"ovf\"", "overflow"],
    ));

    ckpt::raw(
        &p("overlap.safetensors"),
        r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}"#,
        12,
    );
    cases.push(case(
        "overlapping spans",
        p("overlap.safetensors"),
        Code::InvalidArgument,
        &["\"b\"", "overlap"],
    ));

    ckpt::raw(
        &p("oob.safetensors"),
        r#"{"oob":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#,
        4,
    );
    cases.push(case(
        "span out of bounds",
        p("oob.safetensors"),
        Code::InvalidArgument,
        &["\"oob\""],
    ));

    std::fs::write(p("empty.safetensors"), b"").unwrap();
    cases.push(case(
        "empty file",
        p("empty.safetensors"),
        Code::InvalidArgument,
        &["empty"],
    ));

    std::fs::create_dir_all(p("noweights")).unwrap();
    std::fs::write(p("noweights/config.json"), "{}").unwrap();
    cases.push(case(
        "directory with no weights",
        p("noweights"),
        Code::InvalidArgument,
        &["model.safetensors.index.json"],
    ));

    ckpt::write_sharded(&p("missing"), &good, 2);
    std::fs::remove_file(p("missing/model-00002-of-00002.safetensors")).unwrap();
    cases.push(case(
        "index names a missing shard",
        p("missing"),
        Code::NotFound,
        &["model-00002-of-00002.safetensors"],
    ));

    ckpt::write_sharded(&p("lacks"), &good, 2);
    let index_path = p("lacks/model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.layers.9.ghost.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    cases.push(case(
        "index names a tensor its shard lacks",
        p("lacks"),
        Code::InvalidArgument,
        &[
            "model.layers.9.ghost.weight",
            "model-00001-of-00002.safetensors",
        ],
    ));

    // The index lists the last tensor in the second shard, and the first holds it as well:
    // every listed name is where the index says, but one shard holds more than its list.
    ckpt::write_sharded(&p("twice"), &good, 2);
    let mut first = good[..good.len().div_ceil(2)].to_vec();
    first.push(good.last().unwrap().clone());
    ckpt::write_file(&p("twice/model-00001-of-00002.safetensors"), &first);
    cases.push(case(
        "a tensor held by two shards",
        p("twice"),
        Code::InvalidArgument,
        &[
            &good.last().unwrap().name,
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ],
    ));

    ckpt::write_file(&outside.join("elsewhere.safetensors"), &good);
    cases.push(case(
        "path outside the roots",
        outside.join("elsewhere.safetensors"),
        Code::PermissionDenied,
        &["models.roots"],
    ));

    std::os::unix::fs::symlink(
        outside.join("elsewhere.safetensors"),
        p("escape.safetensors"),
    )
    .unwrap();
    cases.push(case(
        "symlink escaping the roots",
        p("escape.safetensors"),
        Code::PermissionDenied,
        &["elsewhere.safetensors", "models.roots"],
    ));

    ckpt::write_file(&p("good.safetensors"), &good);
    let mut dup = case(
        "duplicate name",
        p("good.safetensors"),
        Code::AlreadyExists,
        &[],
    );
    dup.name = "taken";
    dup.mentions = vec!["\"taken\"".into()];
    cases.push(dup);

    ckpt::write_file(&p("big.safetensors"), &ckpt::llama(4, 512, 512));
    let mut small = case(
        "pool too small",
        p("big.safetensors"),
        Code::ResourceExhausted,
        &[],
    );
    small.pool = "small";
    // An empty pool: all of it is free, whatever ranges the refused model took on the way.
    small.mentions = vec![
        "\"small\"".into(),
        "needs".into(),
        "the pool has 1048576 of 1048576 bytes free".into(),
    ];
    cases.push(small);

    let mut nopool = case("unknown pool", p("good.safetensors"), Code::NotFound, &[]);
    nopool.pool = "nosuchpool";
    nopool.mentions = vec!["nosuchpool".into(), "CreatePool".into()];
    cases.push(nopool);

    cases.push(case(
        "path that does not exist",
        p("nope.safetensors"),
        Code::NotFound,
        &[],
    ));
    // Files that are not regular files are refused at once, never opened for a blocking read.
    mkfifo(&p("fifo.safetensors"));
    cases.push(case(
        "a FIFO",
        p("fifo.safetensors"),
        Code::InvalidArgument,
        &["is a FIFO, not a regular file"],
    ));
    // open(2) of a socket fails with ENXIO, which was answered INTERNAL "No such device or address".
    drop(std::os::unix::net::UnixListener::bind(p("sock.safetensors")).unwrap());
    cases.push(case(
        "a Unix socket",
        p("sock.safetensors"),
        Code::InvalidArgument,
        &["is a socket, not a regular file"],
    ));
    std::fs::create_dir_all(p("fifodir")).unwrap();
    mkfifo(&p("fifodir/model.safetensors"));
    cases.push(case(
        "a directory whose model.safetensors is a FIFO",
        p("fifodir"),
        Code::InvalidArgument,
        &["model.safetensors is a FIFO"],
    ));
    std::fs::create_dir_all(p("fifoindex")).unwrap();
    mkfifo(&p("fifoindex/model.safetensors.index.json"));
    cases.push(case(
        "a FIFO as the index",
        p("fifoindex"),
        Code::InvalidArgument,
        &["index.json is a FIFO"],
    ));
    std::fs::create_dir_all(p("dirshard/shard.safetensors")).unwrap();
    std::fs::write(
        p("dirshard/model.safetensors.index.json"),
        r#"{"weight_map":{"w":"shard.safetensors"}}"#,
    )
    .unwrap();
    cases.push(case(
        "a directory named as a shard",
        p("dirshard"),
        Code::InvalidArgument,
        &["shard.safetensors is a directory"],
    ));
    cases
}

fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfifo {}", path.display());
}

#[tokio::test]
async fn bad_registrations_are_refused_precisely_and_leave_nothing() {
    let s = Scratch::new();
    let root = s.models();
    let outside = s.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let cases = build_cases(&root, &outside);
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    for (name, size) in [("p", 8u64 << 20), ("small", 1 << 20)] {
        c.create_pool(CreatePoolRequest {
            name: name.into(),
            device: "cpu".into(),
            size_bytes: size,
        })
        .await
        .unwrap();
    }
    let taken = RegisterModelRequest {
        name: "taken".into(),
        pool: "p".into(),
        path: root.join("good.safetensors").display().to_string(),
        wait: true,
        backend: None,
    };
    c.register_model(taken).await.unwrap();

    for case in &cases {
        let used_before: Vec<u64> = futures_used(&mut c).await;
        for wait in [true, false] {
            let req = RegisterModelRequest {
                name: case.name.into(),
                pool: case.pool.into(),
                path: case.path.display().to_string(),
                wait,
                backend: None,
            };
            let err = c.register_model(req).await.expect_err(case.what);
            assert_eq!(err.code(), case.code, "{}: {}", case.what, err.message());
            for m in &case.mentions {
                assert!(
                    err.message().contains(m.as_str()),
                    "{}: message {:?} should mention {m:?}",
                    case.what,
                    err.message()
                );
            }
            let models: Vec<String> = c
                .list_models(ListModelsRequest {})
                .await
                .unwrap()
                .into_inner()
                .models
                .into_iter()
                .map(|m| m.name)
                .collect();
            assert_eq!(models, ["taken"], "{}: nothing registered", case.what);
            assert_eq!(
                futures_used(&mut c).await,
                used_before,
                "{}: pool bytes unchanged",
                case.what
            );
        }
    }
    // Still serving everyone.
    c.get_info(GetInfoRequest {}).await.unwrap();
    assert!(d.terminate().await.success());
}

async fn futures_used(
    c: &mut offloadd::proto::offload_client::OffloadClient<tonic::transport::Channel>,
) -> Vec<u64> {
    let mut out = Vec::new();
    for p in ["p", "small"] {
        out.push(
            c.get_pool(GetPoolRequest { name: p.into() })
                .await
                .unwrap()
                .into_inner()
                .used_bytes,
        );
    }
    out
}

/// A checkpoint rewritten and truncated by someone else while it is registered, over and over:
/// every registration ends OK or with a status naming the file, the daemon never dies (the
/// header is read, not mapped, so truncation cannot SIGBUS it), and no pool bytes leak.
#[tokio::test]
async fn a_checkpoint_truncated_during_registration_never_kills_the_daemon() {
    let s = Scratch::new();
    let root = s.models();
    let path = root.join("racy.safetensors");
    let good = ckpt::llama(2, 64, 64);
    ckpt::write_file(&path, &good);
    let full = std::fs::read(&path).unwrap();
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 8 << 20,
    })
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path, full) = (stop.clone(), path.clone(), full.clone());
        std::thread::spawn(move || {
            let mut cut = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::write(&path, &full).unwrap();
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                cut = (cut + 7919) % full.len();
                f.set_len(cut as u64).unwrap();
            }
        })
    };
    let mut outcomes = std::collections::BTreeMap::new();
    for i in 0..400 {
        let req = RegisterModelRequest {
            name: format!("m{i}"),
            pool: "p".into(),
            path: path.display().to_string(),
            wait: true,
            backend: None,
        };
        let code = match c.register_model(req).await {
            Ok(_) => {
                c.unregister_model(offloadd::proto::UnregisterModelRequest {
                    name: format!("m{i}"),
                })
                .await
                .unwrap();
                Code::Ok
            }
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::InvalidArgument | Code::Internal),
                    "{:?}: {}",
                    e.code(),
                    e.message()
                );
                assert!(e.message().contains("racy.safetensors"), "{}", e.message());
                e.code()
            }
        };
        *outcomes.entry(format!("{code:?}")).or_insert(0) += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(outcomes.len() > 1, "the race was exercised: {outcomes:?}");
    let pool = c
        .get_pool(GetPoolRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pool.used_bytes, 0, "no pool bytes leaked: {outcomes:?}");
    c.get_info(GetInfoRequest {}).await.unwrap();
    assert!(d.terminate().await.success());
}

/// A name under the roots swapped between a regular file and a symlink that leads outside them,
/// thousands of times while it is registered: the outside file is never loaded (the open
/// resolves beneath the root, whatever the name pointed to when it was checked).
#[tokio::test]
async fn swapping_a_symlink_during_registration_never_escapes_the_roots() {
    let s = Scratch::new();
    let root = s.models();
    let outside = s.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = |name: &str| ckpt::Tensor {
        name: name.into(),
        dtype: safetensors::Dtype::U8,
        shape: vec![64],
        data: vec![7; 64],
    };
    ckpt::write_file(&outside.join("secret.safetensors"), &[secret("secret")]);
    ckpt::write_file(&root.join("inside.safetensors"), &[secret("inside")]);
    let swap = root.join("swap.safetensors");
    std::fs::copy(root.join("inside.safetensors"), &swap).unwrap();
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    c.create_pool(CreatePoolRequest {
        name: "p".into(),
        device: "cpu".into(),
        size_bytes: 1 << 20,
    })
    .await
    .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, root, swap) = (stop.clone(), root.clone(), swap.clone());
        let target = outside.join("secret.safetensors");
        std::thread::spawn(move || {
            let (link, file) = (root.join(".link"), root.join(".file"));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&target, &link).unwrap();
                std::fs::rename(&link, &swap).unwrap();
                std::fs::copy(root.join("inside.safetensors"), &file).unwrap();
                std::fs::rename(&file, &swap).unwrap();
            }
        })
    };
    let (mut loaded, mut refused) = (0, 0);
    for i in 0..3000 {
        let name = format!("m{i}");
        let r = c
            .register_model(RegisterModelRequest {
                name: name.clone(),
                pool: "p".into(),
                path: swap.display().to_string(),
                wait: true,
                backend: None,
            })
            .await;
        match r {
            Ok(_) => {
                let m = c
                    .get_model(offloadd::proto::GetModelRequest {
                        name: name.clone(),
                        include_tensors: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let names: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
                assert_eq!(
                    names,
                    ["inside"],
                    "registration {i} loaded a file outside the roots"
                );
                c.unregister_model(offloadd::proto::UnregisterModelRequest { name })
                    .await
                    .unwrap();
                loaded += 1;
            }
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::PermissionDenied | Code::NotFound),
                    "{:?}: {}",
                    e.code(),
                    e.message()
                );
                refused += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        loaded > 0 && refused > 0,
        "the race was exercised: {loaded} loaded, {refused} refused"
    );
    assert!(d.terminate().await.success());
}
