//! A corpus of hostile WriteModel calls against the real daemon (issue 25's classes, beside
//! `corpus.rs`'s mutated checkpoints): streams of one to three messages aimed at two open
//! publications, a sealed one, a model registered from a checkpoint and names that do not exist,
//! with right, wrong, empty, truncated and each other's tokens, offsets at and around every
//! tensor's edges, in the gaps between tensors, past the pool and near `u64::MAX`, and lengths
//! from 0 to one past a tensor. Half-way one publication seals.
//!
//! An oracle says what each message must get: the exact gRPC code, or acceptance only when the
//! model is the caller's open publication and the bytes lie inside one of its tensors. Every
//! accepted write is applied to a shadow copy of the whole pool file; at the end the pool file
//! is byte for byte the shadow (no other model's bytes, no gap, nothing after a seal changed),
//! each seal's checksums are of the shadow, and the daemon still serves.

mod common;

use std::os::unix::fs::FileExt;

use common::{DaemonBuilder, Scratch, ckpt};
use offloadd::proto::offload_client::OffloadClient;
use offloadd::proto::{
    CreateModelRequest, GetInfoRequest, GetModelRequest, GetPoolRequest, ModelState,
    SealModelRequest, TensorSpec, WriteModelRequest,
};
use tonic::Code;
use tonic::transport::Channel;

/// Streams per run; OFFLOADD_CORPUS_CASES raises it for a long run.
fn cases() -> usize {
    std::env::var("OFFLOADD_CORPUS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

/// xorshift64*: deterministic, so a failing case number reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, of: &'a [T]) -> &'a T {
        &of[self.below(of.len() as u64) as usize]
    }
}

/// What the oracle knows of a model a message may name.
struct Target {
    name: String,
    /// The publication's token; None for a model registered from a checkpoint.
    token: Option<String>,
    /// Its tensors' (pool offset, length).
    ranges: Vec<(u64, u64)>,
    sealed: bool,
}

impl Target {
    fn inside(&self, offset: u64, len: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(o, l)| o <= offset && offset.checked_add(len).is_some_and(|e| e <= o + l))
    }
}

async fn publish(c: &mut OffloadClient<Channel>, name: &str, lens: &[u64]) -> Target {
    let m = c
        .create_model(CreateModelRequest {
            name: name.into(),
            pool: "p".into(),
            tensors: lens
                .iter()
                .enumerate()
                .map(|(i, &len)| TensorSpec {
                    name: format!("model.layers.{i}.w"),
                    dtype: "U8".into(),
                    shape: vec![len],
                })
                .collect(),
            backend: None,
        })
        .await
        .unwrap()
        .into_inner();
    Target {
        name: name.into(),
        token: Some(m.publish_token.clone()),
        ranges: m.tensors.iter().map(|t| (t.offset, t.length)).collect(),
        sealed: false,
    }
}

async fn table(c: &mut OffloadClient<Channel>, name: &str) -> Vec<(u64, u64, u32)> {
    let m = c
        .get_model(GetModelRequest {
            name: name.into(),
            include_tensors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state(), ModelState::Ready, "{name}: {}", m.error);
    m.tensors
        .iter()
        .map(|t| (t.offset, t.length, t.crc32c))
        .collect()
}

async fn seal(c: &mut OffloadClient<Channel>, t: &mut Target) {
    c.seal_model(SealModelRequest {
        name: t.name.clone(),
        publish_token: t.token.clone().unwrap(),
    })
    .await
    .unwrap();
    t.sealed = true;
}

/// The code a message must get, or None when it must be written.
fn oracle(targets: &[Target], name: &str, token: &str, offset: u64, len: u64) -> Option<Code> {
    let Some(t) = targets.iter().find(|t| t.name == name) else {
        return Some(Code::NotFound);
    };
    let Some(own) = &t.token else {
        return Some(Code::FailedPrecondition);
    };
    if own != token {
        return Some(Code::PermissionDenied);
    }
    if !t.inside(offset, len) {
        return Some(Code::InvalidArgument);
    }
    t.sealed.then_some(Code::FailedPrecondition)
}

/// A message aimed somewhere a publisher might aim: each target's tensor edges and insides, the
/// gaps between tensors, the pool's end and beyond.
/// Mostly at the named model's own tensors, as a publisher filling its tensors would.
fn aim(rng: &mut Rng, targets: &[Target], named: &str, pool: u64) -> (u64, u64) {
    let t = match targets.iter().find(|t| t.name == named) {
        Some(t) if rng.below(3) > 0 => t,
        _ => rng.pick(targets),
    };
    let &(o, l) = rng.pick(&t.ranges);
    let offset = match rng.below(10) {
        0 => o.wrapping_sub(1),
        1 => o + l,
        2 => o + l - 1,
        3 | 4 => o + rng.below(l),
        5 => rng.below(pool),
        6 => pool - rng.below(4),
        7 => u64::MAX - rng.below(8),
        _ => o,
    };
    let room = (o + l).saturating_sub(offset);
    let len = match rng.below(6) {
        0 => 0,
        1 => 1,
        2 => room,
        3 => room + 1,
        4 => rng.below(room + 1),
        _ => rng.below(l + 64),
    };
    (offset, len.min(64 << 10))
}

#[tokio::test]
async fn hostile_writes_touch_only_the_callers_own_open_tensors() {
    let s = Scratch::new();
    let root = s.models();
    let ckpt_path = root.join("r.safetensors");
    ckpt::write_file(&ckpt_path, &ckpt::llama(1, 16, 32));
    let d = DaemonBuilder::new(&s)
        .roots(&[&root])
        .start()
        .await
        .unwrap();
    let mut c = d.client().await;
    common::cpu_pool(&mut c, "p", 1 << 20).await;
    let pool = c
        .get_pool(GetPoolRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner();

    // A model registered from a checkpoint, one published and sealed, two open publications.
    c.register_model(common::registration("r", "p", &ckpt_path, true))
        .await
        .unwrap();
    let r = Target {
        name: "r".into(),
        token: None,
        ranges: table(&mut c, "r")
            .await
            .iter()
            .map(|&(o, l, _)| (o, l))
            .collect(),
        sealed: true,
    };
    let mut v = publish(&mut c, "v", &[2048]).await;
    let fill = ckpt::bytes(2048, 7);
    let (vo, vt) = (v.ranges[0].0, v.token.clone().unwrap());
    c.write_model(tokio_stream::iter([WriteModelRequest {
        name: "v".into(),
        publish_token: vt,
        offset: vo,
        data: fill,
    }]))
    .await
    .unwrap();
    seal(&mut c, &mut v).await;
    let b = publish(&mut c, "b", &[3000, 4096, 13]).await;
    let cc = publish(&mut c, "c", &[512, 77]).await;
    let mut targets = vec![r, v, b, cc];

    let file = std::fs::File::open(&pool.path).unwrap();
    let mut shadow = vec![0u8; pool.size_bytes as usize];
    file.read_exact_at(&mut shadow, 0).unwrap();
    let tokens: Vec<String> = targets.iter().filter_map(|t| t.token.clone()).collect();

    let mut rng = Rng(0x5eed_0f25);
    let n = cases();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for case in 0..n {
        if case == n / 2 {
            seal(&mut c, &mut targets[2]).await;
        }
        // The stream: the first message names a model and a token, later ones mostly repeat
        // them, leave them empty, or (a hostile client) switch.
        let first_name = match rng.below(10) {
            0 => String::new(),
            1 => "nope".to_string(),
            2..=4 => rng.pick(&targets).name.clone(),
            _ => rng.pick(&targets[2..]).name.clone(),
        };
        let mut msgs = vec![];
        for i in 0..1 + rng.below(3) {
            let token = match rng.below(10) {
                0 => String::new(),
                1 => format!("{:032x}", rng.next()),
                2 => {
                    let t = rng.pick(&tokens);
                    t[..t.len() - 1].to_string()
                }
                3 => rng.pick(&tokens).clone(),
                _ => targets
                    .iter()
                    .find(|t| t.name == first_name)
                    .and_then(|t| t.token.clone())
                    .unwrap_or_default(),
            };
            let name = if i == 0 || rng.below(8) == 0 {
                first_name.clone()
            } else if rng.below(3) == 0 {
                rng.pick(&targets).name.clone()
            } else {
                String::new()
            };
            let (offset, len) = aim(&mut rng, &targets, &first_name, pool.size_bytes);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            msgs.push(WriteModelRequest {
                name,
                publish_token: token,
                offset,
                data,
            });
        }
        // What the daemon must do with each message, in order, until the first refusal.
        let (stream_name, stream_token) = (msgs[0].name.clone(), msgs[0].publish_token.clone());
        let mut want = None;
        let mut accepted = vec![];
        for (i, m) in msgs.iter().enumerate() {
            let switched = i > 0
                && ((!m.name.is_empty() && m.name != stream_name)
                    || (!m.publish_token.is_empty() && m.publish_token != stream_token));
            let verdict = if i == 0 && m.name.is_empty() || switched {
                Some(Code::InvalidArgument)
            } else {
                oracle(
                    &targets,
                    &stream_name,
                    &stream_token,
                    m.offset,
                    m.data.len() as u64,
                )
            };
            match verdict {
                Some(code) => {
                    want = Some(code);
                    break;
                }
                None => accepted.push(i),
            }
        }
        let got = c.write_model(tokio_stream::iter(msgs.clone())).await;
        let outcome = match (&got, want) {
            (Ok(r), None) => {
                let n: u64 = msgs.iter().map(|m| m.data.len() as u64).sum();
                assert_eq!(r.get_ref().bytes_written, n, "case {case}");
                "written".to_string()
            }
            (Err(e), Some(code)) => {
                assert_eq!(e.code(), code, "case {case}: {msgs:?}: {}", e.message());
                assert!(
                    !e.message().is_empty() && e.message().len() <= 1024,
                    "case {case}: {}",
                    e.message()
                );
                format!("{code:?}")
            }
            _ => panic!("case {case}: {msgs:?}: got {got:?}, the oracle says {want:?}"),
        };
        *outcomes.entry(outcome).or_default() += 1;
        for i in accepted {
            let m = &msgs[i];
            let at = m.offset as usize;
            shadow[at..at + m.data.len()].copy_from_slice(&m.data);
        }
    }
    seal(&mut c, &mut targets[3]).await;
    eprintln!("{n} hostile WriteModel streams: {outcomes:?}");
    for code in [
        "written",
        "InvalidArgument",
        "PermissionDenied",
        "FailedPrecondition",
        "NotFound",
    ] {
        assert!(
            outcomes.contains_key(code),
            "the corpus exercises {code}: {outcomes:?}"
        );
    }

    // The pool is exactly the accepted writes over what was there, and every checksum the
    // daemon trusts is of those bytes.
    let mut now = vec![0u8; shadow.len()];
    file.read_exact_at(&mut now, 0).unwrap();
    let first_diff = now.iter().zip(&shadow).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "pool bytes differ from the accepted writes"
    );
    for t in &targets {
        for (o, l, crc) in table(&mut c, &t.name).await {
            let want = crc32c::crc32c(&shadow[o as usize..(o + l) as usize]);
            assert_eq!(crc, want, "{} at {o}", t.name);
        }
    }
    c.get_info(GetInfoRequest {}).await.unwrap();
    assert!(d.terminate().await.success());
}
