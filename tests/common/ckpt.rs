//! Checkpoint fixtures written with the `safetensors` crate, plus raw files for bad input.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Deterministic bytes, different per seed.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn t(name: String, dtype: Dtype, shape: Vec<usize>, seed: u64) -> Tensor {
    let elems: usize = shape.iter().product();
    let len = elems * dtype.bitsize() / 8;
    Tensor {
        name,
        dtype,
        shape,
        data: bytes(len, seed),
    }
}

/// A mixture-of-experts-sized table: `n` tensors of 4 bytes (the index as u32), 1,000 experts
/// per layer.
pub fn experts(n: usize) -> Vec<Tensor> {
    (0..n)
        .map(|i| Tensor {
            name: format!("model.layers.{}.mlp.experts.{}.w", i / 1000, i % 1000),
            dtype: Dtype::U8,
            shape: vec![4],
            data: (i as u32).to_le_bytes().to_vec(),
        })
        .collect()
}

/// A Llama-shaped model: embeddings, `layers` decoder layers, final norm and lm_head.
pub fn llama(layers: u32, hidden: usize, vocab: usize) -> Vec<Tensor> {
    let mut v = vec![t(
        "model.embed_tokens.weight".into(),
        Dtype::BF16,
        vec![vocab, hidden],
        1,
    )];
    let mut seed = 2;
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        for (name, dtype, shape) in [
            (p("input_layernorm.weight"), Dtype::BF16, vec![hidden]),
            (
                p("self_attn.q_proj.weight"),
                Dtype::BF16,
                vec![hidden, hidden],
            ),
            (
                p("self_attn.k_proj.weight"),
                Dtype::BF16,
                vec![hidden / 4, hidden],
            ),
            (
                p("self_attn.v_proj.weight"),
                Dtype::BF16,
                vec![hidden / 4, hidden],
            ),
            (
                p("self_attn.o_proj.weight"),
                Dtype::BF16,
                vec![hidden, hidden],
            ),
            (
                p("post_attention_layernorm.weight"),
                Dtype::BF16,
                vec![hidden],
            ),
            (
                p("mlp.gate_proj.weight"),
                Dtype::F8_E4M3,
                vec![2 * hidden, hidden],
            ),
            (
                p("mlp.up_proj.weight"),
                Dtype::F8_E4M3,
                vec![2 * hidden, hidden],
            ),
            (
                p("mlp.down_proj.weight"),
                Dtype::F8_E5M2,
                vec![hidden, 2 * hidden],
            ),
        ] {
            v.push(t(name, dtype, shape, seed));
            seed += 1;
        }
    }
    v.push(t(
        "model.norm.weight".into(),
        Dtype::F32,
        vec![hidden],
        seed,
    ));
    v.push(t(
        "lm_head.weight".into(),
        Dtype::BF16,
        vec![vocab, hidden],
        seed + 1,
    ));
    v
}

pub fn write_file(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.data).expect("valid tensor"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// Writes `shards` files and `model.safetensors.index.json` into `dir`.
pub fn write_sharded(dir: &Path, tensors: &[Tensor], shards: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = HashMap::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        write_file(&dir.join(&file), chunk);
        for t in chunk {
            weight_map.insert(t.name.clone(), file.clone());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A file with a literal header and data, for malformed checkpoints.
pub fn raw(path: &Path, header: &str, data_len: usize) {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend(bytes(data_len, 99));
    std::fs::write(path, out).unwrap();
}
