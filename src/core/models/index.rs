//! A sharded checkpoint's `model.safetensors.index.json`: which shard holds which tensors, and
//! whether each shard holds what the index lists for it.
//!
//! The weight map is read entry by entry, names borrowed from the text where they hold no
//! escapes, each shard's file name kept once. Read into a `BTreeMap<String, String>` and then
//! grouped by shard, the 8 MB index of a 100k-tensor checkpoint took 30-37 ms of one core (a
//! string compare per level of the tree for each of 100k inserts, and two strings allocated per
//! entry) while the other core waited.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

use super::ModelError;
use super::header::ShardTensor;

/// The shards an index names, in file-name order, each with the tensors it should hold.
pub(super) type ByShard<'a> = Vec<(String, Vec<Cow<'a, str>>)>;

#[derive(Deserialize)]
struct Index<'a> {
    #[serde(borrow)]
    weight_map: WeightMap<'a>,
}

/// A JSON string, borrowed from the text unless it holds escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// The weight map's entries in document order, each with its shard's number in `files`.
struct WeightMap<'a> {
    entries: Vec<(Cow<'a, str>, u32)>,
    files: Vec<Cow<'a, str>>,
    /// Whether the names strictly ascend, as `transformers` writes them (sorted keys): then
    /// they are unique, and the entries group as they are without a map of the names.
    ascending: bool,
}

impl<'de: 'a, 'a> Deserialize<'de> for WeightMap<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(WeightMapVisitor(PhantomData))
    }
}

struct WeightMapVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for WeightMapVisitor<'a> {
    type Value = WeightMap<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of tensor names to shard files")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WeightMap<'a>, A::Error> {
        let mut entries: Vec<(Cow<'a, str>, u32)> = Vec::new();
        let mut files: Vec<Cow<'a, str>> = Vec::new();
        let mut numbers: foldhash::HashMap<Cow<'a, str>, u32> = Default::default();
        let mut ascending = true;
        while let Some((Text(name), Text(file))) = map.next_entry::<Text<'de>, Text<'de>>()? {
            // Neighbouring entries mostly name the same shard: no lookup for those.
            let number = match entries.last() {
                Some(&(_, n)) if files[n as usize] == file => n,
                _ => *numbers.entry(file).or_insert_with_key(|file| {
                    files.push(file.clone());
                    (files.len() - 1) as u32
                }),
            };
            ascending &= entries.last().is_none_or(|(last, _)| *last < name);
            entries.push((name, number));
        }
        Ok(WeightMap {
            entries,
            files,
            ascending,
        })
    }
}

/// An index's shard files, each with the tensors it should hold. `index_path` names it in
/// errors (a file, or an object's URL). A name listed twice counts once, for the shard listed
/// last, as a JSON object read into a map has it.
pub(super) fn parse_index<'a>(
    text: &'a [u8],
    index_path: &Path,
) -> Result<ByShard<'a>, ModelError> {
    let bad = |why: String| ModelError::BadIndex {
        path: index_path.to_path_buf(),
        why,
    };
    let WeightMap {
        entries,
        files,
        ascending,
    } = serde_json::from_slice::<Index>(text)
        .map_err(|e| bad(e.to_string()))?
        .weight_map;
    if entries.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    let mut lists: Vec<Vec<Cow<'a, str>>> = files.iter().map(|_| Vec::new()).collect();
    if ascending {
        for (name, file) in entries {
            lists[file as usize].push(name);
        }
    } else {
        // The last of a name's entries stands; names in order within each list, as above.
        let last: BTreeMap<Cow<'a, str>, u32> = entries.into_iter().collect();
        for (name, file) in last {
            lists[file as usize].push(name);
        }
    }
    let mut by_shard: ByShard<'a> = files
        .into_iter()
        .zip(lists)
        .filter(|(_, names)| !names.is_empty())
        .map(|(file, names)| (file.into_owned(), names))
        .collect();
    by_shard.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(by_shard)
}

/// Refuses a shard that lacks a tensor the index places in it; says whether it holds those
/// alone (all of them, each once, so as many names means no others).
pub(super) fn check_listed(
    listed: &[Cow<'_, str>],
    shard: &[ShardTensor],
    shard_path: &Path,
    index_path: &Path,
) -> Result<bool, ModelError> {
    // One set per shard: a scan per index entry was quadratic (6.9 s at 100k tensors).
    let held: foldhash::HashSet<&str> = shard.iter().map(|st| st.name.as_str()).collect();
    match listed.iter().find(|t| !held.contains(t.as_ref())) {
        None => Ok(shard.len() == listed.len()),
        Some(t) => Err(ModelError::TensorNotInShard {
            tensor: t.to_string(),
            shard: shard_path.to_path_buf(),
            index: index_path.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::parse_index;

    fn shards(json: &str) -> Vec<(String, Vec<String>)> {
        parse_index(json.as_bytes(), Path::new("index.json"))
            .unwrap()
            .into_iter()
            .map(|(file, names)| (file, names.into_iter().map(|n| n.into_owned()).collect()))
            .collect()
    }

    fn owned(groups: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        groups
            .iter()
            .map(|(f, n)| (f.to_string(), n.iter().map(|n| n.to_string()).collect()))
            .collect()
    }

    #[test]
    fn shards_come_in_file_name_order_with_their_names_in_order() {
        let json = r#"{"metadata": {"total_size": 8}, "weight_map": {
            "a": "2.safetensors", "b": "1.safetensors", "c": "2.safetensors",
            "d\u0065": "1.safetensors"}}"#;
        assert_eq!(
            shards(json),
            owned(&[
                ("1.safetensors", &["b", "de"]),
                ("2.safetensors", &["a", "c"])
            ])
        );
    }

    #[test]
    fn unsorted_names_and_a_name_listed_twice_read_as_a_map_does() {
        // `x` is listed for 1 and then for 2: it is 2's alone, and 1 keeps only `a`.
        let json = r#"{"weight_map": {"x": "1.safetensors", "b": "2.safetensors",
            "a": "1.safetensors", "x": "2.safetensors"}}"#;
        assert_eq!(
            shards(json),
            owned(&[("1.safetensors", &["a"]), ("2.safetensors", &["b", "x"])])
        );
        // A shard whose every name went to another is not among the shards.
        let json = r#"{"weight_map": {"x": "1.safetensors", "x": "2.safetensors"}}"#;
        assert_eq!(shards(json), owned(&[("2.safetensors", &["x"])]));
    }

    /// A weight map's text with `entries` in this order, duplicates kept (as no map would keep
    /// them); each name's characters written as `\u` escapes where `escaped` says so.
    fn index_text(entries: &[(String, u8, bool)]) -> String {
        let members: Vec<String> = entries
            .iter()
            .map(|(name, file, escaped)| {
                let name = if *escaped {
                    name.encode_utf16()
                        .map(|u| format!("\\u{u:04x}"))
                        .collect::<String>()
                } else {
                    let quoted = serde_json::to_string(name).unwrap();
                    quoted[1..quoted.len() - 1].to_string()
                };
                format!("\"{name}\": \"{file}.safetensors\"")
            })
            .collect();
        format!(
            r#"{{"metadata": {{}}, "weight_map": {{{}}}}}"#,
            members.join(", ")
        )
    }

    proptest::proptest! {
        // As header.rs's: PROPTEST_CASES for a long run, failures kept beside this file.
        #![proptest_config(proptest::prelude::ProptestConfig {
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions")
            )),
            ..proptest::prelude::ProptestConfig::with_cases(
                std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
            )
        })]

        /// The visitor reads a weight map as the map it replaced did (`BTreeMap<String,
        /// String>`, the last of a name's entries standing), then grouped by shard: whatever
        /// the order, repeats and escapes, and whether the names happen to ascend.
        #[test]
        fn any_weight_map_groups_as_a_map_of_it_would(
            entries in proptest::collection::vec(
                ("[a-c\"\\\\é😀\n.0-9]{0,4}", 0u8..4, proptest::bool::ANY),
                1..24,
            ),
            sort in proptest::bool::ANY,
        ) {
            let mut entries = entries;
            if sort {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                entries.dedup_by(|a, b| a.0 == b.0);
            }
            let text = index_text(&entries);
            #[derive(serde::Deserialize)]
            struct MapIndex {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let map: MapIndex = serde_json::from_str(&text).unwrap();
            let mut expected: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (name, file) in map.weight_map {
                expected.entry(file).or_default().push(name);
            }
            let expected: Vec<(String, Vec<String>)> = expected.into_iter().collect();
            proptest::prop_assert_eq!(shards(&text), expected);
        }
    }

    #[test]
    fn an_empty_or_malformed_weight_map_is_refused_with_why() {
        for (json, why) in [
            (r#"{"weight_map": {}}"#, "weight_map is empty"),
            (r#"{"metadata": {}}"#, "missing field `weight_map`"),
            (r#"{"weight_map": {"a": 1}}"#, "invalid type: integer `1`"),
            (r#"{"weight_map": ["a"]}"#, "invalid type: sequence"),
        ] {
            let e = parse_index(json.as_bytes(), Path::new("index.json")).unwrap_err();
            assert!(e.to_string().contains(why), "{json}: {e}");
        }
    }
}
