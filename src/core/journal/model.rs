//! A READY model's journal file, format v3: the record as one line of JSON, then its tensor
//! table packed with postcard, in pieces of a fixed number of rows. The pieces are written on
//! every core, but read on one: decoded on the pool's threads, 100k rows took longer (each
//! thread's rows went into a fresh allocator arena, faulted in page by page).
//!
//! The table is nearly all of the file. As JSON (v1) it was 13 MB at 100k tensors; writing it
//! took about 20 ms of every such registration, and reading it back 60 ms of the next start,
//! longer than loading the checkpoint again. Packed row by row (v2, still read) it was 5 MB;
//! packed each against the row before it (v3, see `rows.rs`), 1.4 MB. The JSON line keeps what
//! an operator may want to read (`head -c 1000`): the model, its pool, its source files and its
//! backend.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::JournalError;
use super::rows::{self, AsTensorRecord};
use crate::core::backend::BackendConfig;
use crate::core::table::TensorEntry;

/// What a checkpoint shard looked like when it was loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStamp {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i64,
    /// CRC32C of the safetensors header (length prefix included): catches a rewrite that kept
    /// the size and the modification time.
    pub header_crc32c: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum SourceRecord {
    Checkpoint {
        path: PathBuf,
        files: Vec<FileStamp>,
    },
    Published,
    /// Streamed from object storage: the URL and each object's version.
    Remote {
        url: String,
        objects: Vec<crate::core::remote::ObjectStamp>,
    },
}

/// A READY model: where its bytes are and what they must checksum to. Its table is read
/// straight into the daemon's own rows, each with its checksum and without a layer (the start
/// that reads it derives that from the name): at 100k tensors a second copy of the table cost
/// a restart more, in page faults on it, than decoding did.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRecord {
    pub name: String,
    pub pool: String,
    pub source: SourceRecord,
    pub backend: Option<BackendConfig>,
    pub tensors: Vec<TensorEntry>,
}

/// What [`super::Journal::write_model`] writes: a [`ModelRecord`] that borrows its parts, so
/// journaling a 100k-tensor model copies none of its table.
#[derive(Debug)]
pub struct ModelRecordOut<'a, T: AsTensorRecord> {
    pub name: &'a str,
    pub pool: &'a str,
    pub source: &'a SourceRecord,
    pub backend: Option<&'a BackendConfig>,
    pub tensors: &'a [T],
}

/// Rows per piece of the table; the last piece has the rest.
const ROWS_PER_PIECE: usize = 8192;

/// The JSON line, as written.
#[derive(Serialize)]
struct HeadOut<'a> {
    name: &'a str,
    pool: &'a str,
    source: &'a SourceRecord,
    backend: Option<&'a BackendConfig>,
    /// Rows that follow the line.
    tensors: usize,
    rows_per_piece: usize,
    /// Bytes of each piece, in order.
    pieces: Vec<usize>,
}

/// The JSON line, as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadIn {
    name: String,
    pool: String,
    source: SourceRecord,
    backend: Option<BackendConfig>,
    tensors: usize,
    rows_per_piece: usize,
    pieces: Vec<usize>,
}

#[cfg(test)]
impl ModelRecord {
    /// This record, to write.
    pub fn out(&self) -> ModelRecordOut<'_, TensorEntry> {
        ModelRecordOut {
            name: &self.name,
            pool: &self.pool,
            source: &self.source,
            backend: self.backend.as_ref(),
            tensors: &self.tensors,
        }
    }
}

/// The file's body in consecutive parts: the JSON line, then each piece of the table.
pub(super) fn encode<T: AsTensorRecord>(m: &ModelRecordOut<'_, T>) -> Vec<Vec<u8>> {
    encode_with(m, rows::encode_piece)
}

/// The body the offloadd before v3 wrote: each row packed whole.
#[cfg(test)]
pub(super) fn encode_v2<T: AsTensorRecord>(m: &ModelRecordOut<'_, T>) -> Vec<Vec<u8>> {
    encode_with(m, rows::encode_piece_v2)
}

/// The body with each piece of the table packed by `piece`.
fn encode_with<T: AsTensorRecord>(
    m: &ModelRecordOut<'_, T>,
    piece: fn(&[T]) -> Vec<u8>,
) -> Vec<Vec<u8>> {
    let pieces: Vec<Vec<u8>> = m.tensors.par_chunks(ROWS_PER_PIECE).map(piece).collect();
    let mut head = serde_json::to_vec(&HeadOut {
        name: m.name,
        pool: m.pool,
        source: m.source,
        backend: m.backend,
        tensors: m.tensors.len(),
        rows_per_piece: ROWS_PER_PIECE,
        pieces: pieces.iter().map(Vec::len).collect(),
    })
    .expect("model records serialize");
    // Compact JSON escapes every newline inside its strings, so this one ends the line.
    head.push(b'\n');
    let mut parts = Vec::with_capacity(pieces.len() + 1);
    parts.push(head);
    parts.extend(pieces);
    parts
}

/// The record in a body that [`encode`] wrote (and whose checksum held), in format `version`:
/// 3, or 2 as the offloadd before wrote it, so that an upgrade adopts what it left.
pub(super) fn decode(path: &Path, version: u32, body: &[u8]) -> Result<ModelRecord, JournalError> {
    let bad = |why: String| JournalError::Parse {
        path: path.to_path_buf(),
        why,
    };
    let nl = body
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| bad("no record line before the table".into()))?;
    let head: HeadIn = serde_json::from_slice(&body[..nl]).map_err(|e| bad(e.to_string()))?;
    let table = &body[nl + 1..];
    let per = head.rows_per_piece;
    if per == 0 || head.pieces.len() != head.tensors.div_ceil(per) {
        return Err(bad(format!(
            "{} pieces of {per} rows cannot hold its {} tensors",
            head.pieces.len(),
            head.tensors
        )));
    }
    if head
        .pieces
        .iter()
        .try_fold(0usize, |a, &n| a.checked_add(n))
        != Some(table.len())
    {
        return Err(bad(format!(
            "the pieces do not add up to the table's {} bytes",
            table.len()
        )));
    }
    // A row takes at least 7 bytes: a count the table could not hold is not believed.
    let mut tensors = Vec::with_capacity(head.tensors.min(table.len() / 7));
    let mut at = 0;
    for (k, &len) in head.pieces.iter().enumerate() {
        let rows = per.min(head.tensors - k * per);
        let piece = &table[at..at + len];
        match version {
            2 => rows::decode_piece_v2(piece, rows, &mut tensors),
            _ => rows::decode_piece(piece, rows, &mut tensors),
        }
        .map_err(|why| bad(format!("piece {k}: {why}")))?;
        at += len;
    }
    Ok(ModelRecord {
        name: head.name,
        pool: head.pool,
        source: head.source,
        backend: head.backend,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::backend::UvaConfig;
    use safetensors::Dtype;

    fn record(n: usize) -> ModelRecord {
        let dtypes = [
            Dtype::BF16,
            Dtype::F32,
            Dtype::U8,
            Dtype::F8_E4M3,
            Dtype::I64,
        ];
        ModelRecord {
            name: "big".into(),
            pool: "p".into(),
            source: SourceRecord::Checkpoint {
                path: "/models/m".into(),
                files: vec![FileStamp {
                    path: "/models/m/a\nb.safetensors".into(),
                    size: 1 << 40,
                    mtime_ns: -5,
                    header_crc32c: u32::MAX,
                }],
            },
            backend: Some(BackendConfig::Uva(UvaConfig {
                cpu_offload_bytes: 1,
                params: vec!["lm_head".into()],
            })),
            tensors: (0..n)
                .map(|i| TensorEntry {
                    name: format!("model.layers.{i}.\"w\"\n"),
                    dtype: dtypes[i % dtypes.len()],
                    shape: vec![i; i % 4],
                    offset: 256 * i as u64,
                    len: u64::MAX - i as u64,
                    layer: None,
                    crc32c: Some(i as u32),
                })
                .collect(),
        }
    }

    #[test]
    fn a_record_comes_back_as_it_was_written() {
        for n in [0, 1, ROWS_PER_PIECE, ROWS_PER_PIECE + 1, 20_000] {
            let m = record(n);
            let body = encode(&m.out()).concat();
            assert_eq!(decode(Path::new("x"), 3, &body).unwrap(), m, "{n} tensors");
        }
    }

    #[test]
    fn a_v2_table_is_still_read() {
        for n in [0, 1, ROWS_PER_PIECE + 1] {
            let m = record(n);
            let body = encode_v2(&m.out()).concat();
            assert_eq!(decode(Path::new("x"), 2, &body).unwrap(), m, "{n} tensors");
            assert!(
                decode(Path::new("x"), 3, &body).is_err() || n == 0,
                "v2 rows are not v3's"
            );
        }
    }

    #[test]
    fn the_first_line_is_json_an_operator_can_read() {
        let body = encode(&record(3).out()).concat();
        let line = &body[..body.iter().position(|&b| b == b'\n').unwrap()];
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["name"], "big");
        assert_eq!(v["source"]["files"][0]["size"], 1u64 << 40);
        assert_eq!(v["tensors"], 3);
    }

    #[test]
    fn a_table_that_does_not_match_its_head_is_refused() {
        let m = record(ROWS_PER_PIECE + 5);
        let parts = encode(&m.out());
        assert_eq!(parts.len(), 3, "a head and two pieces");
        let (head, table) = (&parts[0], parts[1..].concat());
        let decoded = |head: &[u8], table: &[u8]| {
            decode(Path::new("x"), 3, &[head, table].concat())
                .unwrap_err()
                .to_string()
        };
        let short = decoded(head, &table[..table.len() - 1]);
        assert!(short.contains("do not add up"), "{short}");
        // Right lengths, wrong rows: the last piece's first byte pulled into the first.
        let text = String::from_utf8(head.clone()).unwrap();
        let (a, b) = (parts[1].len(), parts[2].len());
        let shifted = text.replacen(&format!("[{a},{b}]"), &format!("[{},{}]", a + 1, b - 1), 1);
        let err = decoded(shifted.as_bytes(), &table);
        assert!(
            err.contains("piece 0: 1 bytes after its 8192 rows"),
            "{err}"
        );
        let fewer = text.replacen(
            &format!("\"tensors\":{}", m.tensors.len()),
            "\"tensors\":3",
            1,
        );
        let err = decoded(fewer.as_bytes(), &table);
        assert!(
            err.contains("2 pieces of 8192 rows cannot hold its 3 tensors"),
            "{err}"
        );
        // A count no table could hold is an error, not an allocation.
        let huge = text
            .replacen(
                &format!("\"tensors\":{}", m.tensors.len()),
                &format!("\"tensors\":{}", usize::MAX / 2),
                1,
            )
            .replacen(
                "\"rows_per_piece\":8192",
                &format!("\"rows_per_piece\":{}", usize::MAX / 2),
                1,
            )
            .replacen(&format!("[{a},{b}]"), &format!("[{}]", a + b), 1);
        let err = decoded(huge.as_bytes(), &table);
        assert!(err.contains("piece 0: row 8197 of"), "{err}");
        let unknown = text.replacen('{', "{\"extra\":1,", 1);
        assert!(decode(Path::new("x"), 3, &[unknown.as_bytes(), &table].concat()).is_err());
    }
}
