//! The common case of a safetensors header, parsed in one pass: each entry goes straight into a
//! list, in the crate's own types. The crate's `Metadata` reads the header through a flattened
//! map, which serde buffers whole before building a hash map of the names; at 100k tensors that
//! was most of a registration's time. This path only ever accepts; anything it does not accept
//! goes to the crate, whose error is the one reported, so both always agree on what is valid
//! (a property test holds them to it).
//!
//! A long header is parsed in pieces, one per core: at 100k tensors (10 MB of JSON) the parse
//! took a third of a registration on one core while the others waited. Pieces are cut at
//! commas that look like the end of an entry, and a cut is trusted only when the parse proves
//! it one (see [`members_in_pieces`]); otherwise the header is parsed whole.

use std::collections::HashMap;
use std::fmt;

use safetensors::Dtype;
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};

use super::header::ShardTensor;

/// Headers shorter than this many bytes per core are parsed whole: a piece costs a hand-over to
/// another thread and a second list to join, which pay off only for long ones.
const PIECE_BYTES: usize = 1 << 20;

/// The shortest entry, `"a":{"dtype":"U8","shape":[],"data_offsets":[0,0]},`, is 50 bytes;
/// entries with real names, 80 to 120. Lists are sized from the text at this many bytes an
/// entry: capacity never written is never faulted in.
const ENTRY_BYTES: usize = 64;

/// One entry as the crate's `TensorInfo` reads it (unknown fields ignored, as there).
#[derive(Deserialize)]
struct Info {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// The members of a header object (or of a piece of one): its tensors in document order,
/// offsets relative to the data section, and whether `__metadata__` was among them.
struct Members {
    tensors: Vec<ShardTensor>,
    metadata: bool,
    /// Whether the names strictly ascend, as writers that sort them list them: then they are
    /// unique without a set of them, which cost 2.5 ms at 100k tensors.
    ascending: bool,
}

/// Reads [`Members`] into a list of a capacity guessed from the text's length: serde_json
/// cannot say how many members a map holds, and growing the list by doubling copied it into
/// fresh memory, twice the list's size at 100k tensors. `None` where the crate might disagree.
struct MembersVisitor<'a> {
    capacity: usize,
    /// For a piece that ends at a cut, where its members go when the text runs out before a
    /// next member's name begins: the parse then ends in that error, not with the members.
    open_end: Option<&'a mut Option<Members>>,
}

/// A member's name, noting that one began: a map asks for a name only once it has seen one
/// coming, so the text running out before that is between two members.
struct Name<'a>(&'a mut bool);

impl<'de> DeserializeSeed<'de> for Name<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        *self.0 = true;
        String::deserialize(d)
    }
}

impl<'de> Visitor<'de> for MembersVisitor<'_> {
    type Value = Option<Members>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Members>, A::Error> {
        let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(self.capacity));
        let mut metadata = false;
        let mut ascending = true;
        loop {
            let mut began = false;
            let name = match map.next_key_seed(Name(&mut began)) {
                Ok(Some(name)) => name,
                Ok(None) => break,
                Err(e) => {
                    if let Some(out) = self.open_end.filter(|_| !began) {
                        *out = Some(Members {
                            tensors,
                            metadata,
                            ascending,
                        });
                    }
                    return Err(e);
                }
            };
            if name == "__metadata__" {
                // The crate refuses a second one as a duplicate field.
                if metadata {
                    return Ok(None);
                }
                metadata = true;
                map.next_value::<Option<HashMap<String, String>>>()?;
                continue;
            }
            // Each entry is built in its final form as it is read: a second pass over 100k
            // entries cost more than the checks.
            match tensor(name, map.next_value::<Info>()?) {
                Some(t) => {
                    ascending &= tensors.last().is_none_or(|p: &ShardTensor| p.name < t.name);
                    tensors.push(t);
                }
                None => return Ok(None),
            }
        }
        Ok(Some(Members {
            tensors,
            metadata,
            ascending,
        }))
    }
}

/// An entry whose span is exactly its shape times its dtype size; `offset` is relative to the
/// data section until [`parse`] places it.
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
        offset: s as u64,
        len: (e - s) as u64,
        layer: None,
        crc32c: None,
    })
}

/// The members of `json`, one whole JSON object (and nothing after it but white space).
fn members(json: &str, capacity: usize) -> Option<Members> {
    let mut de = serde_json::Deserializer::from_str(json);
    let members = de
        .deserialize_map(MembersVisitor {
            capacity,
            open_end: None,
        })
        .ok()?;
    de.end().ok()?;
    members
}

/// The members of `text`, an object's beginning that ends where a next member would: the text
/// must run out after a member's value and before the next one's name. A member's value ends
/// where the text does, since a cut follows a `}`: nothing but a name could begin after it.
fn members_before_cut(text: &str, capacity: usize) -> Option<Members> {
    let mut out = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let visitor = MembersVisitor {
        capacity,
        open_end: Some(&mut out),
    };
    match de.deserialize_map(visitor) {
        // Whole: the header's object would end before the cut's comma.
        Ok(_) => None,
        Err(e) if e.classify() == serde_json::error::Category::Eof => {
            out.filter(|m| m.metadata || !m.tensors.is_empty())
        }
        Err(_) => None,
    }
}

/// Where to cut `json` into up to `pieces` pieces: at the first comma after each share of it
/// that sits between a `}` and a `"`, as the comma after an entry does. Such a comma may also
/// lie in a string; [`members_in_pieces`] tells.
fn cuts(json: &[u8], pieces: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut from = 0;
    for k in 1..pieces {
        let target = (json.len() / pieces * k).max(from);
        let Some(at) = json[target..].windows(3).position(|w| w == b"},\"") else {
            break;
        };
        let comma = target + at + 1;
        cuts.push(comma);
        from = comma + 1;
    }
    cuts
}

/// The members of `json` parsed in parallel, a piece between each two `cuts`; `None` unless
/// every piece parses and the crate would agree with each.
///
/// Each piece is parsed as an object of its own, where it lies: all but the first opened with
/// `{` written over the comma before them (and the comma put back after), all but the last
/// ending where the text runs out between two members ([`members_before_cut`]). That proves
/// each cut a comma between two members of the header's object, by induction from the first:
/// the parse before the cut stands between two members there, and the text after it begins
/// with a name (`"`), as a member after a comma must. Their members, one piece after another,
/// are then exactly the header's.
fn members_in_pieces(json: &mut [u8], cuts: &[usize]) -> Option<Members> {
    let len = json.len();
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut rest = json;
    let mut at = 0;
    for &cut in cuts {
        let (piece, after) = rest.split_at_mut(cut - at);
        pieces.push(piece);
        rest = after;
        at = cut;
    }
    pieces.push(rest);
    let mut found: Vec<Option<Members>> = pieces.iter().map(|_| None).collect();
    let (first, others) = pieces.split_first_mut().expect("one piece at least");
    let (first_found, others_found) = found.split_first_mut().expect("as many");
    let last = others.len();
    rayon::in_place_scope(|s| {
        for (i, (piece, found)) in others.iter_mut().zip(others_found).enumerate() {
            s.spawn(move |_| *found = later_piece(piece, i + 1 == last));
        }
        // The first piece is parsed on this thread, the others on the pool's. So the list every
        // entry joins comes from this thread's heap, as what is built from it next does, and
        // it has room for every entry: the others join it in place.
        *first_found = std::str::from_utf8(first)
            .ok()
            .and_then(|text| members_before_cut(text, len / ENTRY_BYTES));
    });
    let mut found = found.into_iter();
    let mut all = found.next().flatten()?;
    for piece in found {
        let piece = piece?;
        // A second __metadata__, as within one piece.
        if all.metadata && piece.metadata {
            return None;
        }
        all.metadata |= piece.metadata;
        all.ascending &= piece.ascending
            && all
                .tensors
                .last()
                .zip(piece.tensors.first())
                .is_none_or(|(a, b)| a.name < b.name);
        all.tensors.extend(piece.tensors);
    }
    Some(all)
}

/// The members of a piece after the first: `piece` begins with the comma of its cut, which is
/// a `{` while it is parsed.
fn later_piece(piece: &mut [u8], last: bool) -> Option<Members> {
    piece[0] = b'{';
    let found = std::str::from_utf8(piece).ok().and_then(|text| {
        let capacity = text.len() / ENTRY_BYTES;
        if last {
            members(text, capacity)
        } else {
            members_before_cut(text, capacity)
        }
    });
    piece[0] = b',';
    found
}

/// The tensors of `json` (the header after its 8-byte length) in file order, when they are
/// exactly what the crate would accept: names unique, spans back to back from 0, each exactly
/// its shape times its dtype size. `None` otherwise (or for JSON it cannot read, or that is not
/// UTF-8), so the caller asks the crate, for its precise error. `data_start` is where the data
/// section begins. `json` is written to while it is parsed, and is as it was on return.
pub fn parse(json: &mut [u8], data_start: u64) -> Option<(Vec<ShardTensor>, u64)> {
    let pieces = rayon::current_num_threads().min(json.len() / PIECE_BYTES);
    parse_in(json, data_start, pieces)
}

/// [`parse`] in up to `pieces` pieces.
pub(super) fn parse_in(
    json: &mut [u8],
    data_start: u64,
    pieces: usize,
) -> Option<(Vec<ShardTensor>, u64)> {
    let cuts = cuts(json, pieces);
    // Cuts the parse does not prove (a `},"` inside a name, say) cost a second parse, whole.
    let in_pieces = (!cuts.is_empty())
        .then(|| members_in_pieces(json, &cuts))
        .flatten();
    let Members {
        mut tensors,
        ascending,
        ..
    } = match in_pieces {
        Some(m) => m,
        None => members(std::str::from_utf8(json).ok()?, json.len() / ENTRY_BYTES)?,
    };
    // The crate keeps the last of duplicate names, which then leaves a gap or not: let it decide.
    if !ascending {
        let mut names =
            foldhash::HashSet::with_capacity_and_hasher(tensors.len(), Default::default());
        if !tensors.iter().all(|t| names.insert(t.name.as_str())) {
            return None;
        }
    }
    // Equal offsets only for empty tensors, which sort by their end as the crate's do. Writers
    // list the entries in file order, which needs no sort and so no sort's scratch list.
    let key = |t: &ShardTensor| (t.offset, t.offset + t.len);
    if !tensors.is_sorted_by_key(key) {
        tensors.sort_by_key(key);
    }
    let mut end = 0;
    for t in &mut tensors {
        if t.offset != end {
            return None;
        }
        end += t.len;
        t.offset += data_start;
    }
    Some((tensors, end))
}

#[cfg(test)]
mod tests {
    use super::{members, members_in_pieces, parse, parse_in};

    fn header(json: &str) -> Option<Vec<String>> {
        parse(&mut json.as_bytes().to_vec(), 0)
            .map(|(t, _)| t.into_iter().map(|t| t.name).collect())
    }

    #[test]
    fn entries_come_back_in_file_order_whatever_the_document_order() {
        let json = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},
                       "__metadata__":{"format":"pt"},
                       "a":{"dtype":"U8","shape":[4],"data_offsets":[0,4],"extra":1}}"#;
        assert_eq!(header(json), Some(vec!["a".into(), "b".into()]));
        assert_eq!(parse(&mut json.as_bytes().to_vec(), 100).unwrap().1, 12);
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

    /// A header whose names and metadata hold `},"`, where a cut looks right and is not.
    fn deceptive() -> String {
        let mut json = String::from(r#"{"__metadata__":{"k":"},\"x","j":"},"},"#);
        let mut at = 0;
        for i in 0..40 {
            let name = if i % 3 == 0 {
                format!("w{i}}},")
            } else {
                format!("w{i}")
            };
            json += &format!(
                r#"{}:{{"dtype":"U8","shape":[{i}],"data_offsets":[{at},{}]}},"#,
                serde_json::to_string(&name).unwrap(),
                at + i
            );
            at += i;
        }
        json.pop();
        json.push('}');
        json
    }

    #[test]
    fn a_cut_is_trusted_only_where_it_separates_two_entries() {
        let json = deceptive();
        let whole: Vec<String> = members(&json, 0)
            .unwrap()
            .tensors
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(whole.len(), 40);
        let (mut trusted, mut refused) = (0, 0);
        let mut bytes = json.clone().into_bytes();
        for c in (1..json.len() - 1).filter(|&c| &json[c - 1..c + 2] == "},\"") {
            let found = members_in_pieces(&mut bytes, &[c]);
            assert_eq!(bytes, json.as_bytes(), "the header is left as it was");
            match found {
                Some(m) => {
                    let names: Vec<String> = m.tensors.into_iter().map(|t| t.name).collect();
                    assert_eq!(names, whole, "cut at {c}");
                    trusted += 1;
                }
                None => refused += 1,
            }
        }
        // The comma after each member but the last is a true cut (__metadata__ and 40 entries);
        // a name or metadata value ending in `},` makes a false one.
        assert_eq!(trusted, 40);
        assert_eq!(refused, 14 + 1);
    }

    #[test]
    fn any_number_of_pieces_gives_the_whole_parse() {
        let json = deceptive();
        let mut bytes = json.clone().into_bytes();
        let whole = parse_in(&mut bytes, 8, 1).unwrap();
        for pieces in 2..=64 {
            let found = parse_in(&mut bytes, 8, pieces);
            assert_eq!(found.as_ref(), Some(&whole), "{pieces} pieces");
            assert_eq!(bytes, json.as_bytes(), "the header is left as it was");
        }
        // Names that ascend but for one repeated, wherever the cuts fall.
        let mut at = 0;
        let entries: Vec<String> = ["a", "b", "c", "c", "d", "e", "f", "g"]
            .iter()
            .map(|name| {
                at += 1;
                format!(
                    r#""{name}":{{"dtype":"U8","shape":[1],"data_offsets":[{},{at}]}}"#,
                    at - 1
                )
            })
            .collect();
        let mut repeated = format!("{{{}}}", entries.join(",")).into_bytes();
        for pieces in 1..=8 {
            assert_eq!(parse_in(&mut repeated, 8, pieces), None, "{pieces} pieces");
        }
        // A second __metadata__ in another piece is refused as in one.
        let twice = json.replacen(r#""w1":"#, r#""__metadata__":{},"w1":"#, 1);
        let mut twice = twice.into_bytes();
        assert_eq!(parse_in(&mut twice, 8, 1), None);
        for pieces in 2..=64 {
            assert_eq!(parse_in(&mut twice, 8, pieces), None, "{pieces} pieces");
        }
    }
}
