//! Placement of each tensor under a backend, following vLLM's offloaders exactly:
//! `uva.py` for the byte budget walk and `prefetch.py` for layer selection, static-buffer keys
//! and the next-layer-to-prefetch table.

use std::collections::BTreeMap;

use safetensors::Dtype;

use super::config::{BackendConfig, PrefetchConfig, UvaConfig};
use crate::core::layers::name_within_layer;
use crate::core::table::TensorEntry;

/// Where a worker finds a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Copied once into the worker's own device memory.
    Device,
    /// Left in host memory; the device reads it in place.
    Uva,
    /// Copied into a static buffer slot before its layer runs.
    Prefetch { key: usize, slot: usize },
}

/// Static buffers are shared by offloaded layers whose tensors have the same key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct StaticKey {
    pub name: String,
    /// vLLM keys by shape and stride too; every tensor is contiguous, so the shape says both.
    pub shape: Vec<usize>,
    pub dtype: String,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchPlan {
    /// Model layer index of offloaded layer k, k = 0..n.
    pub offloaded_layers: Vec<u32>,
    /// Static slots in use: min(prefetch_step, n).
    pub slots: usize,
    pub keys: Vec<StaticKey>,
    /// Model layer to prefetch once offloaded layer k has run.
    pub next: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One entry per tensor, in the model's tensor order.
    pub placements: Vec<Placement>,
    pub prefetch: Option<PrefetchPlan>,
}

impl Plan {
    /// No backend: every tensor goes to the device.
    pub fn all_device(n: usize) -> Self {
        Self {
            placements: vec![Placement::Device; n],
            prefetch: None,
        }
    }
}

/// vLLM's parameter filter: whole dotted segments, `.{p}.` inside `.{name}.`.
pub fn param_matches(params: &[String], name_in_layer: &str) -> bool {
    params.is_empty() || {
        let dotted = format!(".{name_in_layer}.");
        params.iter().any(|p| dotted.contains(&format!(".{p}.")))
    }
}

/// The next-prefetch table for `n` offloaded layers and `step` slots, by offloaded index: after
/// layer k runs its slot (k % step) is free and layer k + step takes it; past the end, the slot
/// goes to the next pass's layer that uses it (k % step), never to a layer that a layer still to
/// run in this pass needs (vLLM #54975).
pub fn next_table(n: usize, step: usize) -> Vec<usize> {
    (0..n)
        .map(|k| if k + step < n { k + step } else { k % step })
        .collect()
}

pub fn plan(config: Option<&BackendConfig>, tensors: &[TensorEntry]) -> Plan {
    match config {
        None => Plan::all_device(tensors.len()),
        Some(BackendConfig::Uva(u)) => plan_uva(u, tensors),
        Some(BackendConfig::Prefetch(p)) => plan_prefetch(p, tensors),
    }
}

/// Layer tensors in layer order, in table order within a layer. vLLM walks a layer's
/// `named_parameters()`, i.e. module definition order; a model published with CreateModel lists
/// its tensors in that order, so the budget walk crosses the same parameter vLLM's would. A
/// checkpoint's table is in the file's order.
fn layer_order(tensors: &[TensorEntry]) -> Vec<(usize, u32)> {
    let mut order: Vec<(usize, u32)> = tensors
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.layer.map(|l| (i, l)))
        .collect();
    order.sort_by_key(|&(_, layer)| layer); // stable: keeps table order within a layer
    order
}

fn plan_uva(cfg: &UvaConfig, tensors: &[TensorEntry]) -> Plan {
    let mut placements = vec![Placement::Device; tensors.len()];
    let mut total = 0u64;
    for (i, layer) in layer_order(tensors) {
        // vLLM checks the budget before each parameter, so the last one placed may cross it.
        if total >= cfg.cpu_offload_bytes {
            break;
        }
        if !param_matches(&cfg.params, name_within_layer(&tensors[i].name, layer)) {
            continue;
        }
        placements[i] = Placement::Uva;
        total += tensors[i].len;
    }
    Plan {
        placements,
        prefetch: None,
    }
}

fn plan_prefetch(cfg: &PrefetchConfig, tensors: &[TensorEntry]) -> Plan {
    let g = cfg.group_size;
    let selected = |layer: u32| layer % g >= g - cfg.num_in_group;
    // layer -> matching tensors
    let mut by_layer: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, layer) in layer_order(tensors) {
        if selected(layer) && param_matches(&cfg.params, name_within_layer(&tensors[i].name, layer))
        {
            by_layer.entry(layer).or_default().push(i);
        }
    }
    let offloaded_layers: Vec<u32> = by_layer.keys().copied().collect();
    let n = offloaded_layers.len();
    let step = cfg.prefetch_step as usize;
    let mut keys: BTreeMap<StaticKey, usize> = BTreeMap::new();
    let mut placements = vec![Placement::Device; tensors.len()];
    for (k, members) in by_layer.values().enumerate() {
        for &i in members {
            let t = &tensors[i];
            let key = StaticKey {
                name: name_within_layer(&t.name, t.layer.expect("layer tensors only")).to_string(),
                shape: t.shape.clone(),
                dtype: dtype_name(t.dtype),
                len: t.len,
            };
            let next_id = keys.len();
            let key = *keys.entry(key).or_insert(next_id);
            placements[i] = Placement::Prefetch {
                key,
                slot: k % step,
            };
        }
    }
    let mut key_list: Vec<(StaticKey, usize)> = keys.into_iter().collect();
    key_list.sort_by_key(|(_, id)| *id);
    let next = next_table(n, step)
        .into_iter()
        .map(|k| offloaded_layers[k])
        .collect();
    Plan {
        placements,
        prefetch: Some(PrefetchPlan {
            slots: step.min(n),
            offloaded_layers,
            keys: key_list.into_iter().map(|(k, _)| k).collect(),
            next,
        }),
    }
}

pub fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, layer: Option<u32>, len: u64) -> TensorEntry {
        let shape = vec![len as usize / 2];
        TensorEntry {
            name: name.into(),
            dtype: Dtype::BF16,
            shape,
            offset: 0,
            len,
            layer,
            crc32c: None,
        }
    }

    /// Names of the tensors a plan places as UVA, in table order.
    fn uva_names<'a>(ts: &'a [TensorEntry], plan: &Plan) -> Vec<&'a str> {
        ts.iter()
            .zip(&plan.placements)
            .filter(|(_, p)| **p == Placement::Uva)
            .map(|(t, _)| t.name.as_str())
            .collect()
    }

    fn llama(layers: u32) -> Vec<TensorEntry> {
        let mut v = vec![t("model.embed_tokens.weight", None, 64)];
        for l in 0..layers {
            for p in [
                "mlp.down_proj.weight",
                "mlp.up_proj.weight",
                "self_attn.q_proj.weight",
            ] {
                v.push(t(&format!("model.layers.{l}.{p}"), Some(l), 16));
            }
        }
        v.push(t("lm_head.weight", None, 64));
        v
    }

    #[test]
    fn segment_matching_is_by_whole_dotted_segments() {
        let p = |s: &str| vec![s.to_string()];
        assert!(param_matches(
            &p("experts.w2_weight"),
            "mlp.experts.w2_weight"
        ));
        assert!(!param_matches(
            &p("experts.w2_weight"),
            "mlp.experts.w2_weight_scale"
        ));
        assert!(!param_matches(&p("w2"), "mlp.experts.w2_weight"));
        assert!(param_matches(&p("mlp"), "mlp.up_proj.weight"));
        assert!(!param_matches(&p("lp"), "mlp.up_proj.weight"));
        assert!(param_matches(&[], "anything"));
    }

    #[test]
    fn next_table_never_overwrites_a_slot_still_needed() {
        let cases: &[(usize, usize, &[usize])] = &[
            (5, 2, &[2, 3, 4, 1, 0]),
            (4, 2, &[2, 3, 0, 1]),
            (6, 3, &[3, 4, 5, 0, 1, 2]),
            (7, 3, &[3, 4, 5, 6, 1, 2, 0]),
            (3, 1, &[1, 2, 0]),
            (2, 4, &[0, 1]),
            (1, 1, &[0]),
        ];
        for &(n, step, want) in cases {
            let table = next_table(n, step);
            assert_eq!(table, want, "n={n} step={step}");
            // Invariant: the layer prefetched after k runs takes slot k % step, and no layer that
            // runs between k and that layer (cyclically, into the next pass) uses the slot.
            for (k, &next) in table.iter().enumerate() {
                assert_eq!(next % step, k % step, "n={n} step={step} k={k}");
                let between: Vec<usize> = if next > k {
                    (k + 1..next).collect()
                } else {
                    (k + 1..n).chain(0..next).collect()
                };
                assert!(
                    between.iter().all(|l| l % step != k % step),
                    "n={n} step={step} k={k} next={next}"
                );
            }
        }
    }

    #[test]
    fn uva_walks_layers_in_order_and_may_half_place_a_layer() {
        let ts = llama(3);
        // 40 bytes: layer 0 (3 × 16 = 48) crosses the budget on its third tensor, so layer 0
        // is whole, and nothing of layer 1 is placed because the total reached the budget.
        let plan = plan_uva(
            &UvaConfig {
                cpu_offload_bytes: 40,
                params: vec![],
            },
            &ts,
        );
        let uva = uva_names(&ts, &plan);
        assert_eq!(
            uva,
            [
                "model.layers.0.mlp.down_proj.weight",
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.0.self_attn.q_proj.weight"
            ]
        );
        // 20 bytes: layer 0 ends half placed (two of three tensors).
        let plan = plan_uva(
            &UvaConfig {
                cpu_offload_bytes: 20,
                params: vec![],
            },
            &ts,
        );
        assert_eq!(
            plan.placements
                .iter()
                .filter(|p| **p == Placement::Uva)
                .count(),
            2
        );
        // Embeddings and lm_head never move.
        assert_eq!(plan.placements[0], Placement::Device);
        assert_eq!(*plan.placements.last().unwrap(), Placement::Device);
    }

    #[test]
    fn uva_walks_a_layer_in_table_order_as_vllm_walks_named_parameters() {
        // Module order, not name order: qkv before o_proj before the MLP, as CreateModel lists
        // a vLLM model's parameters.
        let ts: Vec<TensorEntry> = [
            "self_attn.qkv_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.down_proj.weight",
        ]
        .iter()
        .map(|p| t(&format!("model.layers.0.{p}"), Some(0), 16))
        .collect();
        let plan = plan_uva(
            &UvaConfig {
                cpu_offload_bytes: 20,
                params: vec![],
            },
            &ts,
        );
        assert_eq!(
            uva_names(&ts, &plan),
            [
                "model.layers.0.self_attn.qkv_proj.weight",
                "model.layers.0.self_attn.o_proj.weight"
            ]
        );
    }

    #[test]
    fn uva_params_filter_skips_non_matching() {
        let ts = llama(3);
        let plan = plan_uva(
            &UvaConfig {
                cpu_offload_bytes: 1 << 20,
                params: vec!["mlp.up_proj".into()],
            },
            &ts,
        );
        let uva = uva_names(&ts, &plan);
        assert_eq!(
            uva,
            [
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.1.mlp.up_proj.weight",
                "model.layers.2.mlp.up_proj.weight"
            ]
        );
    }

    #[test]
    fn prefetch_selects_the_last_layers_of_each_group() {
        // (layers, group_size, num_in_group) -> offloaded layers
        let cases: &[(u32, u32, u32, &[u32])] = &[
            (8, 4, 1, &[3, 7]),
            (8, 4, 2, &[2, 3, 6, 7]),
            (6, 1, 1, &[0, 1, 2, 3, 4, 5]),
            (5, 2, 1, &[1, 3]),
            (7, 3, 3, &[0, 1, 2, 3, 4, 5, 6]),
        ];
        for &(layers, g, n, want) in cases {
            let cfg = PrefetchConfig {
                group_size: g,
                num_in_group: n,
                prefetch_step: 1,
                params: vec![],
            };
            let plan = plan_prefetch(&cfg, &llama(layers));
            assert_eq!(plan.prefetch.unwrap().offloaded_layers, want, "g={g} n={n}");
        }
    }

    #[test]
    fn prefetch_keys_slots_and_next_in_model_layers() {
        let ts = llama(5);
        let cfg = PrefetchConfig {
            group_size: 1,
            num_in_group: 1,
            prefetch_step: 2,
            params: vec!["mlp".into()],
        };
        let plan = plan_prefetch(&cfg, &ts);
        let pf = plan.prefetch.clone().unwrap();
        assert_eq!(pf.offloaded_layers, [0, 1, 2, 3, 4]);
        assert_eq!(pf.next, [2, 3, 4, 1, 0]);
        assert_eq!(pf.slots, 2);
        // Two matching parameters per layer share two keys across layers.
        assert_eq!(
            pf.keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["mlp.down_proj.weight", "mlp.up_proj.weight"]
        );
        for (t, p) in ts.iter().zip(&plan.placements) {
            match (t.layer, t.name.contains(".mlp.")) {
                (Some(l), true) => assert!(
                    matches!(p, Placement::Prefetch { slot, .. } if *slot == l as usize % 2),
                    "{}",
                    t.name
                ),
                _ => assert_eq!(*p, Placement::Device, "{}", t.name),
            }
        }
    }

    #[test]
    fn prefetch_skips_selected_layers_without_matching_params() {
        let mut ts = llama(4);
        ts.retain(|t| !(t.layer == Some(3) && t.name.contains("mlp")));
        let cfg = PrefetchConfig {
            group_size: 2,
            num_in_group: 1,
            prefetch_step: 1,
            params: vec!["mlp".into()],
        };
        let pf = plan_prefetch(&cfg, &ts).prefetch.unwrap();
        assert_eq!(
            pf.offloaded_layers,
            [1],
            "layer 3 is selected by position but has no mlp"
        );
    }
}
