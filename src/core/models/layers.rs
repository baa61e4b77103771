//! Layer index from a tensor name, e.g. `model.layers.12.mlp.up_proj.weight` → 12.

/// Patterns that cover Llama-style, GPT-2-style and multimodal checkpoints. Each is a dotted
/// prefix that must be followed by the layer number and a dot.
pub const DEFAULT_LAYER_PATTERNS: &[&str] = &[
    "model.language_model.layers.",
    "model.layers.",
    "transformer.h.",
    "layers.",
];

/// Returns the layer of `name` under the first pattern that matches at a segment boundary, or
/// None for tensors outside the layer stack (embeddings, final norm, lm_head).
pub fn layer_of(name: &str, patterns: &[String]) -> Option<u32> {
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

/// Everything after the layer prefix: the name of a parameter within its layer, which is what
/// prefetch static buffers are keyed by.
pub fn name_within_layer(name: &str, layer: u32) -> &str {
    let needle = format!(".{layer}.");
    match name.find(&needle) {
        Some(pos) => &name[pos + needle.len()..],
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Vec<String> {
        DEFAULT_LAYER_PATTERNS
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn finds_layers_in_common_layouts() {
        let p = defaults();
        let cases = [
            ("model.layers.0.self_attn.q_proj.weight", Some(0)),
            ("model.layers.31.mlp.experts.w2_weight", Some(31)),
            ("layers.7.attention.wq.weight", Some(7)),
            ("transformer.h.11.attn.c_attn.weight", Some(11)),
            (
                "model.language_model.layers.3.mlp.gate_proj.weight",
                Some(3),
            ),
            ("model.embed_tokens.weight", None),
            ("model.norm.weight", None),
            ("lm_head.weight", None),
            ("model.layers.x.weight", None),
            ("model.layers.5", None),
            ("model.mylayers.5.weight", None),
        ];
        for (name, want) in cases {
            assert_eq!(layer_of(name, &p), want, "{name}");
        }
    }

    #[test]
    fn patterns_are_configurable() {
        let p = vec!["blocks.".to_string()];
        assert_eq!(layer_of("vision.blocks.4.attn.qkv", &p), Some(4));
        assert_eq!(layer_of("model.layers.4.attn.qkv", &p), None);
    }

    #[test]
    fn name_within_layer_strips_the_prefix() {
        assert_eq!(
            name_within_layer("model.layers.12.mlp.up_proj.weight", 12),
            "mlp.up_proj.weight"
        );
    }
}
