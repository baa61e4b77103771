//! Layer index from a tensor name, e.g. `model.layers.12.mlp.up_proj.weight` → 12.
//!
//! By default the index is the first all-digit dotted segment, as vLLM's `extract_layer_index`
//! takes it, so every layout a model zoo uses is found without configuration: Llama's
//! `model.layers.N`, GPT-2's `transformer.h.N`, BERT's `encoder.layer.N`, MPT's
//! `transformer.blocks.N`. `models.layer_patterns` overrides that for checkpoints whose first
//! number is not the layer (e.g. a vision tower listed before the decoder).

/// Returns the layer of `name`, or None for tensors outside the layer stack (embeddings, final
/// norm, lm_head). With no patterns, the first all-digit segment decides; with patterns, the
/// first pattern that matches at a segment boundary and is followed by a number and a dot.
pub fn layer_of(name: &str, patterns: &[String]) -> Option<u32> {
    if patterns.is_empty() {
        return first_numeric_segment(name);
    }
    patterns.iter().find_map(|p| {
        let mut from = 0;
        while let Some(pos) = name[from..].find(p.as_str()) {
            let start = from + pos;
            from = start + 1;
            if start != 0 && !name[..start].ends_with('.') {
                continue;
            }
            let rest = &name[start + p.len()..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 0 && rest[digits..].starts_with('.') {
                if let Ok(n) = rest[..digits].parse() {
                    return Some(n);
                }
            }
        }
        None
    })
}

/// vLLM's rule. The last segment is the parameter's own name (`weight`, `bias`), never a layer,
/// so a name that is only a number after its module (`model.norm.0`) still counts: PyTorch
/// names `nn.Sequential` children that way.
fn first_numeric_segment(name: &str) -> Option<u32> {
    // Split as bytes: `str::split` searched for each dot as a char, and at 100k tensors that
    // was a tenth of adopting a model after a restart.
    let digits = name
        .as_bytes()
        .split(|&b| b == b'.')
        .find(|s| !s.is_empty() && s.iter().all(u8::is_ascii_digit))?;
    // All ASCII digits, so valid UTF-8; too many of them for a u32 is no layer, as before.
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Everything after the layer number: the name of a parameter within its layer, which is what
/// prefetch static buffers are keyed by.
pub fn name_within_layer(name: &str, layer: u32) -> &str {
    let needle = format!("{layer}.");
    let mut from = 0;
    while let Some(pos) = name[from..].find(&needle) {
        let start = from + pos;
        if start == 0 || name.as_bytes()[start - 1] == b'.' {
            return &name[start + needle.len()..];
        }
        from = start + 1;
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_numeric_segment_finds_every_common_layout() {
        let cases = [
            ("model.layers.0.self_attn.q_proj.weight", Some(0)),
            ("model.layers.31.mlp.experts.7.w2_weight", Some(31)),
            ("layers.7.attention.wq.weight", Some(7)),
            ("transformer.h.11.attn.c_attn.weight", Some(11)),
            ("encoder.layer.5.attention.self.query.weight", Some(5)),
            ("bert.encoder.layer.11.output.dense.bias", Some(11)),
            ("transformer.blocks.23.ffn.up_proj.weight", Some(23)),
            (
                "model.language_model.layers.3.mlp.gate_proj.weight",
                Some(3),
            ),
            ("model.embed_tokens.weight", None),
            ("embeddings.position_embeddings.weight", None),
            ("model.norm.weight", None),
            ("lm_head.weight", None),
            ("model.layers.x.weight", None),
            ("model.layers1.weight", None),
            ("model.layers.-1.weight", None),
        ];
        for (name, want) in cases {
            assert_eq!(layer_of(name, &[]), want, "{name}");
        }
    }

    #[test]
    fn patterns_override_the_default() {
        let p = vec!["blocks.".to_string()];
        assert_eq!(layer_of("vision.blocks.4.attn.qkv", &p), Some(4));
        assert_eq!(layer_of("model.layers.4.attn.qkv", &p), None);
        // A vision tower numbered before the decoder: the pattern picks the decoder's number.
        let p = vec!["model.layers.".to_string()];
        assert_eq!(
            layer_of("model.vision.0.model.layers.9.mlp.weight", &p),
            Some(9)
        );
        assert_eq!(layer_of("model.mylayers.5.weight", &p), None);
        assert_eq!(layer_of("model.layers.5", &p), None);
    }

    #[test]
    fn name_within_layer_strips_the_prefix() {
        assert_eq!(
            name_within_layer("model.layers.12.mlp.up_proj.weight", 12),
            "mlp.up_proj.weight"
        );
        assert_eq!(
            name_within_layer("encoder.layer.2.attention.self.query.weight", 2),
            "attention.self.query.weight"
        );
        assert_eq!(name_within_layer("12.mlp.weight", 12), "mlp.weight");
        // "112." is not layer 12.
        assert_eq!(name_within_layer("h.112.12.w", 12), "w");
    }
}
