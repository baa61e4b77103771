//! The journal: what the next start needs to adopt this run's pools and models instead of
//! throwing them away. It lives in `pools.dir`, beside the pool files it describes, because a
//! memory-backed `emptyDir` keeps both across a container restart and loses both on a reboot.
//!
//! One file for the pools and one per READY model, so that finishing a load writes only that
//! model's table. Each file is framed as `offloadd-journal v<N> crc32c=<hex> len=<bytes>\n`
//! followed by a JSON body, and is replaced atomically (write, fsync, rename, fsync the
//! directory). Nothing on the attach or onload path writes it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crc_fast::{CrcAlgorithm::Crc32Iscsi, Digest};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::backend::BackendConfig;
use super::models::loader::crc32c;

/// The directory inside `pools.dir`; its prefix keeps it clear of the operator's own files.
pub const JOURNAL_DIR: &str = "offloadd-journal";
/// The format this binary writes and reads. A newer or older one is refused by name.
pub const VERSION: u32 = 1;
const MAGIC: &str = "offloadd-journal";
const POOLS_FILE: &str = "pools.json";
const MODEL_PREFIX: &str = "model-";
const SUFFIX: &str = ".json";

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an offloadd journal file (no `{MAGIC} v<N>` header line)")]
    NotJournal { path: PathBuf },
    #[error(
        "{path}: journal format v{found}, this offloadd reads v{VERSION}; the pools it describes are discarded and rebuilt"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated: the header promises {want} bytes, the file has {got}")]
    Truncated { path: PathBuf, want: u64, got: u64 },
    #[error(
        "{path}: checksum mismatch (crc32c {got:08x}, header says {want:08x}): the file is corrupt"
    )]
    Checksum { path: PathBuf, want: u32, got: u32 },
    #[error("{path}: {why}")]
    Parse { path: PathBuf, why: String },
}

impl JournalError {
    /// The journal file at fault.
    pub fn path(&self) -> &Path {
        match self {
            JournalError::Io { path, .. }
            | JournalError::NotJournal { path }
            | JournalError::Version { path, .. }
            | JournalError::Truncated { path, .. }
            | JournalError::Checksum { path, .. }
            | JournalError::Parse { path, .. } => path,
        }
    }
}

/// A pool as the journal knows it: enough to find its file again and tell it is the same one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRecord {
    pub name: String,
    pub device: String,
    pub size_bytes: u64,
    /// Inode of the pool file: a file of the same name made by anyone else is not ours.
    pub ino: u64,
    /// Whether the pool was pinned, so a start that decides otherwise can say so.
    pub pinned: bool,
    /// The longest lease ttl granted on the pool's models: workers of the old daemon may read
    /// its pool in place for that long after a crash, so ranges of models that are not adopted
    /// stay reserved that long before anything else may take them.
    #[serde(default)]
    pub max_lease_ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolsFile {
    pools: Vec<PoolRecord>,
}

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRecord {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub len: u64,
    pub layer: Option<u32>,
    pub crc32c: u32,
}

/// A READY model: where its bytes are and what they must checksum to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRecord {
    pub name: String,
    pub pool: String,
    pub source: SourceRecord,
    pub backend: Option<BackendConfig>,
    pub tensors: Vec<TensorRecord>,
}

/// What [`Journal::write_model`] writes: a [`ModelRecord`] that borrows its parts, so journaling
/// a 100k-tensor model copies none of its table. Written exactly as the record serializes.
#[derive(Debug, Serialize)]
pub struct ModelRecordOut<'a, T: AsTensorRecord> {
    pub name: &'a str,
    pub pool: &'a str,
    pub source: &'a SourceRecord,
    pub backend: Option<&'a BackendConfig>,
    /// Written last, by [`Journal::write_model`], in parallel.
    #[serde(skip)]
    pub tensors: &'a [T],
}

/// A table row the journal can write: the daemon's own table entry (and, in tests, a
/// [`TensorRecord`]).
pub trait AsTensorRecord: Sync {
    fn record(&self) -> TensorRecordOut<'_>;
}

/// Only the tests write records they read back: the daemon writes from its own table.
#[cfg(test)]
impl AsTensorRecord for TensorRecord {
    fn record(&self) -> TensorRecordOut<'_> {
        TensorRecordOut {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            offset: self.offset,
            len: self.len,
            layer: self.layer,
            crc32c: self.crc32c,
        }
    }
}

/// A [`TensorRecord`] that borrows its name and shape.
#[derive(Debug, Serialize)]
pub struct TensorRecordOut<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub offset: u64,
    pub len: u64,
    pub layer: Option<u32>,
    pub crc32c: u32,
}

#[cfg(test)]
impl ModelRecord {
    /// This record, to write.
    pub fn out(&self) -> ModelRecordOut<'_, TensorRecord> {
        ModelRecordOut {
            name: &self.name,
            pool: &self.pool,
            source: &self.source,
            backend: self.backend.as_ref(),
            tensors: &self.tensors,
        }
    }
}

/// What a start found in the journal.
#[derive(Debug, Default)]
pub struct Contents {
    pub pools: Vec<PoolRecord>,
    pub models: Vec<ModelRecord>,
    /// Model files that could not be read, with why; the rest of the journal still counts.
    pub bad_models: Vec<JournalError>,
}

#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn new(pools_dir: &Path) -> Self {
        Self {
            dir: pools_dir.join(JOURNAL_DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads everything. `Ok(None)`: there is no journal (a first start, or the last run kept
    /// nothing). An unreadable pools file fails the whole journal, since every model refers to it.
    pub fn read(&self) -> Result<Option<Contents>, JournalError> {
        let pools_path = self.dir.join(POOLS_FILE);
        let pools: PoolsFile = match read_framed(&pools_path)? {
            Some(body) => parse(&pools_path, &body)?,
            None => return Ok(None),
        };
        let mut out = Contents {
            pools: pools.pools,
            ..Contents::default()
        };
        let entries = std::fs::read_dir(&self.dir).map_err(|source| JournalError::Io {
            path: self.dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(MODEL_PREFIX) && name.ends_with(SUFFIX)) {
                continue;
            }
            let path = entry.path();
            match read_framed(&path).and_then(|body| body.map(|b| parse(&path, &b)).transpose()) {
                Ok(Some(m)) => out.models.push(m),
                Ok(None) => {} // removed since the listing
                Err(e) => out.bad_models.push(e),
            }
        }
        out.models.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Some(out))
    }

    pub fn write_pools(&self, pools: Vec<PoolRecord>) -> Result<(), JournalError> {
        let body = serde_json::to_vec(&PoolsFile { pools }).expect("pool records serialize");
        self.write(POOLS_FILE, &[&body])
    }

    pub fn write_model<T: AsTensorRecord>(
        &self,
        model: &ModelRecordOut<'_, T>,
    ) -> Result<(), JournalError> {
        let parts = model_body(model);
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        self.write(&model_file(model.name), &parts)
    }

    pub fn remove_model(&self, name: &str) -> Result<(), JournalError> {
        let path = self.dir.join(model_file(name));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(JournalError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Removes the journal: the next start adopts nothing.
    pub fn clear(&self) -> Result<(), JournalError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(JournalError::Io {
                path: self.dir.clone(),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Writes a body given in consecutive parts, so a big one is never joined in memory.
    fn write(&self, file: &str, body: &[&[u8]]) -> Result<(), JournalError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let crc = body
            .iter()
            .fold(Digest::new(Crc32Iscsi), |mut d, part| {
                d.update(part);
                d
            })
            .finalize() as u32;
        let len: usize = body.iter().map(|p| p.len()).sum();
        let head = format!("{MAGIC} v{VERSION} crc32c={crc:08x} len={len}\n");
        let tmp = self.dir.join(format!(".tmp-{file}"));
        let dest = self.dir.join(file);
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(head.as_bytes())?;
            for part in body {
                f.write_all(part)?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &dest)?;
            File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io(&dest))
    }
}

/// A model record's JSON, in consecutive parts. The table is most of it (13 MB at 100k tensors,
/// 20 ms on one thread), so its rows are written in parallel pieces, which go to the file as
/// they are.
fn model_body<T: AsTensorRecord>(model: &ModelRecordOut<'_, T>) -> Vec<Vec<u8>> {
    use rayon::prelude::*;
    const ROWS_PER_PIECE: usize = 8192;
    let mut head = serde_json::to_vec(model).expect("model records serialize");
    // Every field but the table, as an object: reopened to append the table as its last field.
    assert_eq!(head.pop(), Some(b'}'), "a record serializes as an object");
    head.extend_from_slice(b",\"tensors\":[");
    let pieces = model
        .tensors
        .par_chunks(ROWS_PER_PIECE)
        .enumerate()
        .map(|(k, rows)| {
            let mut out = Vec::with_capacity(rows.len() * 128 + 1);
            for (i, t) in rows.iter().enumerate() {
                if k > 0 || i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut out, &t.record()).expect("tensor records serialize");
            }
            out
        });
    let mut parts = vec![head];
    parts.par_extend(pieces);
    parts.push(b"]}".to_vec());
    parts
}

fn model_file(name: &str) -> String {
    // Model names are [A-Za-z0-9._-] and never start with '.', so they are safe file names.
    format!("{MODEL_PREFIX}{name}{SUFFIX}")
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, body: &[u8]) -> Result<T, JournalError> {
    serde_json::from_slice(body).map_err(|e| JournalError::Parse {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// The body of a framed file, checked against its header; `None` when the file does not exist.
fn read_framed(path: &Path) -> Result<Option<Vec<u8>>, JournalError> {
    let raw = match std::fs::read(path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(JournalError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let not_journal = || JournalError::NotJournal {
        path: path.to_path_buf(),
    };
    let nl = raw
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(not_journal)?;
    let head = std::str::from_utf8(&raw[..nl]).map_err(|_| not_journal())?;
    let mut words = head.split(' ');
    if words.next() != Some(MAGIC) {
        return Err(not_journal());
    }
    let found: u32 = words
        .next()
        .and_then(|v| v.strip_prefix('v'))
        .and_then(|v| v.parse().ok())
        .ok_or_else(not_journal)?;
    if found != VERSION {
        return Err(JournalError::Version {
            path: path.to_path_buf(),
            found,
        });
    }
    let field = |w: Option<&str>, key: &str| w.and_then(|w| w.strip_prefix(key)).map(str::to_owned);
    let want_crc = field(words.next(), "crc32c=")
        .and_then(|v| u32::from_str_radix(&v, 16).ok())
        .ok_or_else(not_journal)?;
    let want_len: u64 = field(words.next(), "len=")
        .and_then(|v| v.parse().ok())
        .ok_or_else(not_journal)?;
    let body = &raw[nl + 1..];
    if body.len() as u64 != want_len {
        return Err(JournalError::Truncated {
            path: path.to_path_buf(),
            want: want_len,
            got: body.len() as u64,
        });
    }
    let got = crc32c(body);
    if got != want_crc {
        return Err(JournalError::Checksum {
            path: path.to_path_buf(),
            want: want_crc,
            got,
        });
    }
    Ok(Some(body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str) -> ModelRecord {
        ModelRecord {
            name: name.into(),
            pool: "p".into(),
            source: SourceRecord::Published,
            backend: None,
            tensors: vec![TensorRecord {
                name: "w".into(),
                dtype: Dtype::BF16,
                shape: vec![2, 3],
                offset: 256,
                len: 12,
                layer: Some(0),
                crc32c: 7,
            }],
        }
    }

    fn pool() -> PoolRecord {
        PoolRecord {
            name: "p".into(),
            device: "cpu".into(),
            size_bytes: 4096,
            ino: 42,
            pinned: false,
            max_lease_ttl_ms: 0,
        }
    }

    #[test]
    fn a_model_is_written_as_its_record_serializes_whatever_the_number_of_pieces() {
        for n in [0, 1, 8191, 8192, 8193, 20_000] {
            let mut m = model("big");
            m.backend = Some(BackendConfig::Uva(super::super::backend::UvaConfig {
                cpu_offload_bytes: 1,
                params: vec!["lm_head".into()],
            }));
            let row = m.tensors[0].clone();
            m.tensors = (0..n)
                .map(|i| TensorRecord {
                    name: format!("model.layers.{i}.\"w\""),
                    offset: 256 * i as u64,
                    crc32c: i as u32,
                    ..row.clone()
                })
                .collect();
            assert_eq!(
                String::from_utf8(model_body(&m.out()).concat()).unwrap(),
                serde_json::to_string(&m).unwrap(),
                "{n} tensors"
            );
        }
    }

    #[test]
    fn round_trips_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        assert!(j.read().unwrap().is_none());
        j.write_pools(vec![pool()]).unwrap();
        j.write_model(&model("a").out()).unwrap();
        j.write_model(&model("b").out()).unwrap();
        let got = j.read().unwrap().unwrap();
        assert_eq!(got.pools, vec![pool()]);
        assert_eq!(got.models, vec![model("a"), model("b")]);
        j.remove_model("a").unwrap();
        j.remove_model("a").unwrap();
        assert_eq!(j.read().unwrap().unwrap().models, vec![model("b")]);
        j.clear().unwrap();
        assert!(j.read().unwrap().is_none());
    }

    #[test]
    fn every_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.write_pools(vec![pool()]).unwrap();
        let path = j.dir().join(POOLS_FILE);
        let good = std::fs::read(&path).unwrap();

        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert!(matches!(j.read(), Err(JournalError::Truncated { .. })));

        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        std::fs::write(&path, &flipped).unwrap();
        assert!(matches!(j.read(), Err(JournalError::Checksum { .. })));

        let newer = String::from_utf8(good.clone())
            .unwrap()
            .replacen(" v1 ", " v7 ", 1);
        std::fs::write(&path, newer).unwrap();
        let err = j.read().unwrap_err();
        assert!(matches!(err, JournalError::Version { found: 7, .. }));
        assert!(err.to_string().contains("v7"), "{err}");

        std::fs::write(&path, b"{}").unwrap();
        assert!(matches!(j.read(), Err(JournalError::NotJournal { .. })));
    }

    #[test]
    fn a_bad_model_file_spares_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        j.write_pools(vec![pool()]).unwrap();
        j.write_model(&model("a").out()).unwrap();
        j.write_model(&model("b").out()).unwrap();
        std::fs::write(j.dir().join(model_file("a")), b"garbage").unwrap();
        let got = j.read().unwrap().unwrap();
        assert_eq!(got.models, vec![model("b")]);
        assert_eq!(got.bad_models.len(), 1);
    }
}
