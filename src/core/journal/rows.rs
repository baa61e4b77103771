//! The rows of a model's tensor table, packed with postcard: v3, which the journal writes, and
//! v2, which it still reads.
//!
//! v3 writes each row against the one before it in its piece: the name as the count of bytes it
//! shares with the previous name and the rest (`model.layers.7.mlp.experts.12.w2` after
//! `..experts.11.w2` is 28 and `2.w2`), the offset as the gap after the previous row's range (0
//! where ranges follow each other), dtype and shape as a byte where they repeat, the CRC32C as 4
//! plain bytes: a mixture of experts' row takes 15 bytes, where v2 took 58. A piece is decoded
//! on its own, so its first row is written against nothing (an empty name ending at offset 0).

use safetensors::Dtype;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::core::table::TensorEntry;

/// A table row the journal can write: the daemon's own table entry.
pub trait AsTensorRecord: Sync {
    fn record(&self) -> TensorRecordOut<'_>;
}

/// A table row as the journal sees it, borrowing its name and shape. Serialized as it is, it
/// is a row of v2, which tests write to check that an upgrade still reads it.
#[derive(Debug, Serialize)]
pub struct TensorRecordOut<'a> {
    pub name: &'a str,
    #[serde(serialize_with = "dtype_name")]
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub offset: u64,
    pub len: u64,
    pub crc32c: u32,
}

/// A row of the table, as v2 wrote it. The layer is not kept: the next start derives it from
/// the name, as its own config says.
#[derive(Deserialize)]
struct RowV2 {
    pub name: String,
    #[serde(deserialize_with = "dtype_from_name")]
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub len: u64,
    pub crc32c: u32,
}

/// A row of the table, v3, as written: relative to the row before it in its piece (for the
/// first row, to an empty name ending at offset 0), whose dtype and shape it repeats in a byte
/// each. [`Row`] reads it back, field for field.
#[derive(Serialize)]
struct RowOut<'a> {
    /// Leading bytes of the name that are the previous row's, on a character boundary.
    shared: usize,
    /// The rest of the name.
    rest: &'a str,
    /// None: the previous row's.
    #[serde(serialize_with = "maybe_dtype_name")]
    dtype: Option<Dtype>,
    /// None: the previous row's.
    shape: Option<&'a [usize]>,
    /// Offset minus the previous row's end.
    gap: i64,
    len: u64,
    /// Little-endian: a CRC is as likely large as small, and a varint of one takes 5 bytes.
    crc32c: [u8; 4],
}

/// A row of the table, v3, as read.
#[derive(Deserialize)]
struct Row<'a> {
    shared: usize,
    rest: &'a str,
    #[serde(deserialize_with = "maybe_dtype_from_name")]
    dtype: Option<Dtype>,
    shape: Option<Vec<usize>>,
    gap: i64,
    len: u64,
    crc32c: [u8; 4],
}

/// Bytes at the start of `a` and `b` that are the same, ending on a character boundary.
fn shared_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    // Equal bytes up to `n`: a boundary of one is a boundary of the other.
    while !b.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// One piece of the table, v3.
pub(super) fn encode_piece<T: AsTensorRecord>(rows: &[T]) -> Vec<u8> {
    let out = Vec::with_capacity(rows.len() * 16);
    postcard::to_extend(&PieceOut(rows), out).expect("tensor records serialize")
}

/// A piece's rows, serialized as a tuple: postcard writes a tuple as its elements one after
/// another, with no length, so this is exactly the rows in a row. One serializer for the whole
/// piece, where one a row cost a third of the journal's time at 100k tensors.
struct PieceOut<'a, T>(&'a [T]);

impl<T: AsTensorRecord> Serialize for PieceOut<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut piece = s.serialize_tuple(self.0.len())?;
        let (mut name, mut end, mut kind) = ("", 0u64, None);
        for t in self.0 {
            let r = t.record();
            let shared = shared_prefix(name, r.name);
            let same = kind == Some((r.dtype, r.shape));
            piece.serialize_element(&RowOut {
                shared,
                rest: &r.name[shared..],
                dtype: (!same).then_some(r.dtype),
                shape: (!same).then_some(r.shape),
                // Two's complement: a range below the previous one is a negative gap.
                gap: r.offset.wrapping_sub(end) as i64,
                len: r.len,
                crc32c: r.crc32c.to_le_bytes(),
            })?;
            (name, end, kind) = (
                r.name,
                r.offset.wrapping_add(r.len),
                Some((r.dtype, r.shape)),
            );
        }
        piece.end()
    }
}

/// One piece of the table as v2 wrote it: each row whole.
#[cfg(test)]
pub(super) fn encode_piece_v2<T: AsTensorRecord>(rows: &[T]) -> Vec<u8> {
    rows.iter().fold(Vec::new(), |out, t| {
        postcard::to_extend(&t.record(), out).expect("tensor records serialize")
    })
}

/// Exactly `rows` rows of v3, and nothing after them, onto `out`.
pub(super) fn decode_piece(
    mut bytes: &[u8],
    rows: usize,
    out: &mut Vec<TensorEntry>,
) -> Result<(), String> {
    let first = out.len();
    let mut end = 0u64;
    for i in 0..rows {
        let (t, rest) = postcard::take_from_bytes::<Row>(bytes)
            .map_err(|e| format!("row {i} of {rows}: {e}"))?;
        let prev = out[first..].last();
        let prev_name = prev.map_or("", |p| p.name.as_str());
        let Some(head) = prev_name.get(..t.shared) else {
            return Err(format!(
                "row {i} of {rows}: shares {} bytes of a {}-byte name",
                t.shared,
                prev_name.len()
            ));
        };
        let (dtype, shape) = match (t.dtype, t.shape, prev) {
            (Some(d), Some(s), _) => (d, s),
            (None, None, Some(p)) => (p.dtype, p.shape.clone()),
            _ => {
                return Err(format!(
                    "row {i} of {rows}: a dtype without a shape, or neither and no row before"
                ));
            }
        };
        let mut name = String::with_capacity(t.shared + t.rest.len());
        name.push_str(head);
        name.push_str(t.rest);
        // As the writer wrapped: whether the range fits its pool is adoption's to check.
        let offset = end.wrapping_add(t.gap as u64);
        end = offset.wrapping_add(t.len);
        out.push(TensorEntry {
            name,
            dtype,
            shape,
            offset,
            len: t.len,
            layer: None,
            crc32c: Some(u32::from_le_bytes(t.crc32c)),
        });
        bytes = rest;
    }
    if !bytes.is_empty() {
        return Err(format!("{} bytes after its {rows} rows", bytes.len()));
    }
    Ok(())
}

/// Exactly `rows` rows of v2, and nothing after them, onto `out`.
pub(super) fn decode_piece_v2(
    mut bytes: &[u8],
    rows: usize,
    out: &mut Vec<TensorEntry>,
) -> Result<(), String> {
    for i in 0..rows {
        let (t, rest) = postcard::take_from_bytes::<RowV2>(bytes)
            .map_err(|e| format!("row {i} of {rows}: {e}"))?;
        out.push(TensorEntry {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            offset: t.offset,
            len: t.len,
            layer: None,
            crc32c: Some(t.crc32c),
        });
        bytes = rest;
    }
    if !bytes.is_empty() {
        return Err(format!("{} bytes after its {rows} rows", bytes.len()));
    }
    Ok(())
}

/// By name, as safetensors headers spell it: a variant's index would change meaning if the
/// crate ever reordered its enum between the run that wrote the file and the one that reads it.
fn dtype_name<S: Serializer>(d: &Dtype, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(d)
}

fn maybe_dtype_name<S: Serializer>(d: &Option<Dtype>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&format_args!("{d}")),
        None => s.serialize_none(),
    }
}

fn maybe_dtype_from_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Dtype>, D::Error> {
    #[derive(Deserialize)]
    struct Named(#[serde(deserialize_with = "dtype_from_name")] Dtype);
    Ok(Option::<Named>::deserialize(d)?.map(|Named(d)| d))
}

fn dtype_from_name<'de, D: Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
    let name = <&str>::deserialize(d)?;
    Dtype::deserialize(serde::de::value::BorrowedStrDeserializer::<D::Error>::new(
        name,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mixture of experts' table: names that differ in their last characters, ranges end to
    /// end, checksums of every size.
    fn experts(n: usize) -> Vec<TensorEntry> {
        (0..n)
            .map(|i| TensorEntry {
                name: format!(
                    "model.layers.{}.mlp.experts.{}.w{}",
                    i / 384,
                    i / 3 % 128,
                    i % 3
                ),
                dtype: Dtype::BF16,
                shape: vec![2048, 768],
                offset: (i as u64) << 22,
                len: 1 << 22,
                layer: None,
                crc32c: Some((i as u32).wrapping_mul(0x9e37_79b9)),
            })
            .collect()
    }

    fn round_trip(rows: &[TensorEntry]) -> Vec<TensorEntry> {
        let mut out = Vec::new();
        decode_piece(&encode_piece(rows), rows.len(), &mut out).unwrap();
        out
    }

    #[test]
    fn each_row_is_packed_against_the_one_before() {
        let rows = experts(8192);
        let v3 = encode_piece(&rows).len();
        let v2 = encode_piece_v2(&rows).len();
        assert_eq!(round_trip(&rows), rows);
        // v2 spent 58 bytes on each of these rows, 32 of them on its name.
        assert!(v3 <= 16 * rows.len(), "{v3} bytes for {} rows", rows.len());
        assert!(v3 * 3 <= v2, "v3 {v3} bytes, v2 {v2}");
        let mut read = Vec::new();
        decode_piece_v2(&encode_piece_v2(&rows), rows.len(), &mut read).unwrap();
        assert_eq!(read, rows, "v2 still reads");
    }

    #[test]
    fn names_share_whole_characters_only() {
        // 'é' and 'è' share their first byte, which alone is no character.
        assert_eq!(shared_prefix("layer.é", "layer.è"), 6);
        assert_eq!(shared_prefix("é", "è"), 0);
        assert_eq!(shared_prefix("ab", "abc"), 2);
        let rows: Vec<TensorEntry> = ["layer.é", "layer.è", "layer.èa", "", "x", "layer.é"]
            .iter()
            .enumerate()
            .map(|(i, name)| TensorEntry {
                name: name.to_string(),
                dtype: [Dtype::U8, Dtype::U8, Dtype::F16][i % 3],
                shape: vec![1 + i / 2],
                // Not in order: a range below the one before it is a negative gap.
                offset: [512, 256, 0, 768, 4096, 1024][i],
                len: 1,
                layer: None,
                crc32c: Some(u32::MAX - i as u32),
            })
            .collect();
        assert_eq!(round_trip(&rows), rows);
    }

    #[test]
    fn a_row_that_shares_more_than_the_name_before_it_is_refused() {
        let rows = experts(2);
        let mut piece = encode_piece(&rows);
        // The second row's first byte is its count of shared bytes (30, one varint byte).
        let second = encode_piece(&rows[..1]).len();
        assert_eq!(piece[second], 30, "{piece:?}");
        piece[second] = 100;
        let err = decode_piece(&piece, 2, &mut Vec::new()).unwrap_err();
        assert!(
            err.contains("row 1 of 2: shares 100 bytes of a 31-byte name"),
            "{err}"
        );
    }

    #[test]
    fn a_first_row_that_repeats_the_one_before_is_refused() {
        // Alone in its piece, a row has no dtype or shape before it to repeat.
        let row = RowOut {
            shared: 0,
            rest: "a",
            dtype: None,
            shape: None,
            gap: 0,
            len: 1,
            crc32c: [0; 4],
        };
        let piece = postcard::to_extend(&row, Vec::new()).unwrap();
        let err = decode_piece(&piece, 1, &mut Vec::new()).unwrap_err();
        assert!(err.contains("row 0 of 1: a dtype without a shape"), "{err}");
    }
}
