//! A corpus of mutated checkpoints, registered one after another with the real daemon: byte
//! flips in the length and the JSON, truncations, trailing bytes, dtype / shape / offset edits,
//! duplicate keys, shapes whose product overflows u64, `__metadata__` abuse and index variants.
//! Every case must end READY or with a precise status (never INTERNAL, never a crash or a
//! hang), and leave the pool exactly as empty as it was.

mod common;

use std::path::{Path, PathBuf};

use common::{DaemonBuilder, Scratch};
use offloadd::proto::{
    CreatePoolRequest, GetInfoRequest, GetPoolRequest, RegisterModelRequest, UnregisterModelRequest,
};
use serde_json::{Value, json};
use tonic::Code;

/// Cases per run; OFFLOADD_CORPUS_CASES raises it for a long run.
fn cases() -> usize {
    std::env::var("OFFLOADD_CORPUS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2400)
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
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The valid checkpoint every case starts from: its JSON header and its data.
fn base() -> (Value, Vec<u8>) {
    let header = json!({
        "__metadata__": {"format": "pt"},
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
        "model.layers.0.mlp.up_proj.weight": {"dtype": "F16", "shape": [8, 8], "data_offsets": [128, 256]},
        "model.layers.1.mlp.up_proj.weight": {"dtype": "BF16", "shape": [8, 8], "data_offsets": [256, 384]},
    });
    let data = (0..384u32).map(|i| (i * 7 + 3) as u8).collect();
    (header, data)
}

fn file_bytes(json_text: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (json_text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json_text);
    out.extend_from_slice(data);
    out
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "I8", "U8", "I64", "F64", "BOOL", "F8_E4M3", "Q4", "f32", "",
];
const TENSORS: &[&str] = &[
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
];

/// One mutated checkpoint: the path to register (a file, or a directory with an index).
fn mutate(rng: &mut Rng, dir: &Path, case: usize) -> PathBuf {
    let (mut header, data) = base();
    let path = dir.join(format!("case-{case}.safetensors"));
    let tensor = TENSORS[rng.below(TENSORS.len())];
    let bytes = match case % 12 {
        // Byte flips in the 8-byte length.
        0 => {
            let mut b = file_bytes(header.to_string().as_bytes(), &data);
            let i = rng.below(8);
            b[i] ^= 1 << rng.below(8);
            b
        }
        // Byte flips in the JSON.
        1 => {
            let text = header.to_string();
            let mut b = file_bytes(text.as_bytes(), &data);
            for _ in 0..1 + rng.below(4) {
                let i = 8 + rng.below(text.len());
                b[i] = rng.next() as u8;
            }
            b
        }
        // Truncated anywhere.
        2 => {
            let mut b = file_bytes(header.to_string().as_bytes(), &data);
            b.truncate(rng.below(b.len()));
            b
        }
        // Trailing bytes.
        3 => {
            let mut b = file_bytes(header.to_string().as_bytes(), &data);
            b.extend((0..1 + rng.below(64)).map(|_| rng.next() as u8));
            b
        }
        // dtype edits.
        4 => {
            header[tensor]["dtype"] = json!(DTYPES[rng.below(DTYPES.len())]);
            file_bytes(header.to_string().as_bytes(), &data)
        }
        // Shape edits, including products that overflow u64 and zero dimensions.
        5 => {
            let shape = match rng.below(6) {
                0 => json!([1u64 << 40, 1u64 << 40]),
                1 => json!([u64::MAX, 2]),
                2 => json!([0, 8]),
                3 => json!([]),
                4 => json!([8, 8, 1]),
                _ => json!([rng.below(64), rng.below(64)]),
            };
            header[tensor]["shape"] = shape;
            file_bytes(header.to_string().as_bytes(), &data)
        }
        // Offset edits: out of the file, backwards, overlapping, gaps, enormous.
        6 => {
            let (s, e) = match rng.below(6) {
                0 => (0, 1u64 << 62),
                1 => (384, 256),
                2 => (64, 192),
                3 => (130, 258),
                4 => (u64::MAX - 1, u64::MAX),
                _ => (rng.below(400) as u64, rng.below(400) as u64),
            };
            header[tensor]["data_offsets"] = json!([s, e]);
            file_bytes(header.to_string().as_bytes(), &data)
        }
        // Duplicate keys (serde keeps one; the file's bytes may then not add up).
        7 => {
            let text = header.to_string();
            let dup = format!(
                "{{\"{tensor}\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[0,{}]}},",
                rng.below(400),
                rng.below(400)
            );
            let text = text.replacen('{', &dup, 1);
            file_bytes(text.as_bytes(), &data)
        }
        // __metadata__ abuse.
        8 => {
            header["__metadata__"] = match rng.below(5) {
                0 => json!({"format": 7}),
                1 => json!(["pt"]),
                2 => json!({"nested": {"a": "b"}}),
                3 => json!({"big": "x".repeat(100_000)}),
                _ => json!(null),
            };
            file_bytes(header.to_string().as_bytes(), &data)
        }
        // A header length of zero, of exactly the file, or past it; non-UTF-8 JSON.
        9 => {
            let text = header.to_string();
            let mut b = file_bytes(text.as_bytes(), &data);
            let len = b.len() as u64;
            match rng.below(4) {
                0 => b[..8].copy_from_slice(&0u64.to_le_bytes()),
                1 => b[..8].copy_from_slice(&(len - 8).to_le_bytes()),
                2 => b[..8].copy_from_slice(&(len * 2).to_le_bytes()),
                _ => b[8 + rng.below(text.len())] = 0xff,
            }
            b
        }
        // Index variants: a directory with model.safetensors.index.json.
        10 => return index_variant(rng, dir, case, &header, &data),
        // Tensor entries that are not tensors.
        _ => {
            header[tensor] = match rng.below(4) {
                0 => json!("not a tensor"),
                1 => json!({"dtype": "F32", "shape": [4, 8]}),
                2 => json!({"dtype": "F32", "shape": [4, 8], "data_offsets": [0]}),
                _ => json!({"dtype": "F32", "shape": "4x8", "data_offsets": [0, 128]}),
            };
            file_bytes(header.to_string().as_bytes(), &data)
        }
    };
    std::fs::write(&path, bytes).unwrap();
    path
}

fn index_variant(rng: &mut Rng, dir: &Path, case: usize, header: &Value, data: &[u8]) -> PathBuf {
    let d = dir.join(format!("case-{case}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("shard-1.safetensors"),
        file_bytes(header.to_string().as_bytes(), data),
    )
    .unwrap();
    let mut map = serde_json::Map::new();
    for t in TENSORS {
        map.insert(t.to_string(), json!("shard-1.safetensors"));
    }
    let index = match rng.below(8) {
        0 => json!({"weight_map": map}),
        1 => {
            map.insert(TENSORS[0].into(), json!("missing.safetensors"));
            json!({"weight_map": map})
        }
        2 => {
            map.insert(TENSORS[1].into(), json!("../../etc/passwd"));
            json!({"weight_map": map})
        }
        3 => json!({"weight_map": ["shard-1.safetensors"]}),
        4 => json!({"metadata": {}}),
        5 => {
            map.insert("model.layers.9.absent".into(), json!("shard-1.safetensors"));
            json!({"weight_map": map})
        }
        6 => {
            std::fs::create_dir_all(d.join("dir.safetensors")).unwrap();
            map.insert(TENSORS[2].into(), json!("dir.safetensors"));
            json!({"weight_map": map})
        }
        _ => json!({"weight_map": {TENSORS[0]: "/etc/hostname"}}),
    };
    let text = if rng.below(10) == 0 {
        "{\"weight_map\": {".to_string() // truncated JSON
    } else {
        index.to_string()
    };
    std::fs::write(d.join("model.safetensors.index.json"), text).unwrap();
    d
}

#[tokio::test]
async fn mutated_checkpoints_end_ready_or_with_a_precise_status() {
    let s = Scratch::new();
    let root = s.models();
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
    let mut rng = Rng(0x0ff1_0add);
    let (mut ready, mut refused) = (0, std::collections::BTreeMap::<String, usize>::new());
    let n = cases();
    for case in 0..n {
        let path = mutate(&mut rng, &root, case);
        let r = c
            .register_model(RegisterModelRequest {
                name: "c".into(),
                pool: "p".into(),
                path: path.display().to_string(),
                wait: true,
                backend: None,
            })
            .await;
        match r {
            Ok(m) => {
                assert_eq!(m.into_inner().loaded_bytes, 384, "case {case}: {path:?}");
                ready += 1;
                c.unregister_model(UnregisterModelRequest { name: "c".into() })
                    .await
                    .unwrap();
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.code(),
                        Code::InvalidArgument | Code::NotFound | Code::PermissionDenied
                    ),
                    "case {case} ({path:?}): {:?} {}",
                    e.code(),
                    e.message()
                );
                // It names the file at fault, or the path that left the roots.
                assert!(
                    e.message().contains("case-") || e.message().contains("models.roots"),
                    "case {case}: the message names the file: {}",
                    e.message()
                );
                *refused.entry(format!("{:?}", e.code())).or_default() += 1;
            }
        }
        let used = c
            .get_pool(GetPoolRequest { name: "p".into() })
            .await
            .unwrap()
            .into_inner()
            .used_bytes;
        assert_eq!(used, 0, "case {case} ({path:?}) left {used} bytes behind");
    }
    eprintln!("{n} mutated checkpoints: {ready} ready, refused {refused:?}");
    assert!(
        ready > 0 && !refused.is_empty(),
        "the corpus exercises both outcomes"
    );
    c.get_info(GetInfoRequest {}).await.unwrap();
    assert!(d.terminate().await.success());
}
