//! The common case of a safetensors header, parsed in one pass: each entry goes straight into a
//! list, in the crate's own types. The crate's `Metadata` reads the header through a flattened
//! map, which serde buffers whole before building a hash map of the names; at 100k tensors that
//! was most of a registration's time. This path only ever accepts; anything it does not accept
//! goes to the crate, whose error is the one reported, so both always agree on what is valid
//! (a property test holds them to it).

use std::collections::HashMap;
use std::fmt;

use safetensors::Dtype;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};

use super::header::ShardTensor;

/// One entry as the crate's `TensorInfo` reads it (unknown fields ignored, as there).
#[derive(Deserialize)]
struct Info {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// The header's tensors in document order, offsets relative to the data section; `None` where
/// the crate might disagree.
struct Entries(Option<Vec<ShardTensor>>);

/// Reads [`Entries`] into a list of a capacity guessed from the header's length: serde_json
/// cannot say how many entries a map holds, and growing the list by doubling copied it into
/// fresh memory, twice the list's size at 100k tensors.
struct EntriesVisitor {
    capacity: usize,
}

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(self.capacity));
        let mut metadata_seen = false;
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                // The crate refuses a second one as a duplicate field.
                if metadata_seen {
                    return Ok(Entries(None));
                }
                metadata_seen = true;
                map.next_value::<Option<HashMap<String, String>>>()?;
                continue;
            }
            // Each entry is built in its final form as it is read: a second pass over 100k
            // entries cost more than the checks.
            match tensor(name, map.next_value::<Info>()?) {
                Some(t) => entries.push(t),
                None => return Ok(Entries(None)),
            }
        }
        Ok(Entries(Some(entries)))
    }
}

/// An entry whose span is exactly its shape times its dtype size; `file_offset` is relative to
/// the data section until [`parse`] places it.
fn tensor(name: String, info: Info) -> Option<ShardTensor> {
    let (s, e) = info.data_offsets;
    let bits = info
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))?
        .checked_mul(info.dtype.bitsize())?;
    if e < s || bits % 8 != 0 || e - s != bits / 8 {
        return None;
    }
    Some(ShardTensor {
        name,
        dtype: info.dtype,
        shape: info.shape,
        file_offset: s as u64,
        len: (e - s) as u64,
    })
}

/// The tensors of `json` (the header after its 8-byte length) in file order, when they are
/// exactly what the crate would accept: names unique, spans back to back from 0, each exactly
/// its shape times its dtype size. `None` otherwise (or for JSON it cannot read), so the caller
/// asks the crate, for its precise error. `data_start` is where the data section begins.
pub fn parse(json: &str, data_start: u64) -> Option<(Vec<ShardTensor>, u64)> {
    use serde::Deserializer;
    // The shortest entry, `"a":{"dtype":"U8","shape":[],"data_offsets":[0,0]},`, is 50 bytes;
    // entries with real names, 80 to 120. Capacity never written is never faulted in.
    let visitor = EntriesVisitor {
        capacity: json.len() / 64,
    };
    let mut de = serde_json::Deserializer::from_str(json);
    let Entries(entries) = de.deserialize_map(visitor).ok()?;
    de.end().ok()?;
    let mut tensors = entries?;
    // The crate keeps the last of duplicate names, which then leaves a gap or not: let it decide.
    let mut names = foldhash::HashSet::with_capacity_and_hasher(tensors.len(), Default::default());
    if !tensors.iter().all(|t| names.insert(t.name.as_str())) {
        return None;
    }
    drop(names);
    // Equal offsets only for empty tensors, which sort by their end as the crate's do. Writers
    // list the entries in file order, which needs no sort and so no sort's scratch list.
    let key = |t: &ShardTensor| (t.file_offset, t.file_offset + t.len);
    if !tensors.is_sorted_by_key(key) {
        tensors.sort_by_key(key);
    }
    let mut end = 0;
    for t in &mut tensors {
        if t.file_offset != end {
            return None;
        }
        end += t.len;
        t.file_offset += data_start;
    }
    Some((tensors, end))
}

#[cfg(test)]
mod tests {
    use super::parse;

    fn header(json: &str) -> Option<Vec<String>> {
        parse(json, 0).map(|(t, _)| t.into_iter().map(|t| t.name).collect())
    }

    #[test]
    fn entries_come_back_in_file_order_whatever_the_document_order() {
        let json = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},
                       "__metadata__":{"format":"pt"},
                       "a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"extra":1}}"#;
        assert_eq!(header(json), Some(vec!["a".into(), "b".into()]));
        assert_eq!(parse(json, 100).unwrap().1, 12);
    }

    #[test]
    fn what_only_the_crate_can_judge_is_left_to_it() {
        for json in [
            // a duplicate name, a second __metadata__, a gap, an overlap, a wrong size,
            // a part byte, an overflowing shape, not an object
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            r#"{"__metadata__":{},"__metadata__":{},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[1,5]}}"#,
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,4]}}"#,
            r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"F32","shape":[18446744073709551615,2],"data_offsets":[0,4]}}"#,
            r#"[1,2]"#,
        ] {
            assert_eq!(header(json), None, "{json}");
        }
    }
}
