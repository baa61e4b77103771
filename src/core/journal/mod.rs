//! The journal: what the next start needs to adopt this run's pools and models instead of
//! throwing them away. It lives in `pools.dir`, beside the pool files it describes, because a
//! memory-backed `emptyDir` keeps both across a container restart and loses both on a reboot.
//!
//! One file for the pools and one per READY model, so that finishing a load writes only that
//! model's table. Each file is framed as `offloadd-journal v<N> crc32c=<hex> len=<bytes>\n`
//! followed by its body: JSON for the pools (v1), a JSON line and a packed table for a model
//! (v3, see `model.rs`; v2 is still read). Each is replaced atomically (write, fsync, rename,
//! fsync the directory). Nothing on the attach or onload path writes it.

mod durability;
mod model;
mod rows;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crc_fast::{CrcAlgorithm::Crc32Iscsi, Digest};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use self::durability::{Durability, free_bytes, no_space};
pub use self::model::{FileStamp, ModelRecord, ModelRecordOut, SourceRecord};
pub use self::rows::{AsTensorRecord, TensorRecordOut};
use super::crc::crc32c;

/// The directory inside `pools.dir`; its prefix keeps it clear of the operator's own files.
pub const JOURNAL_DIR: &str = "offloadd-journal";
/// The formats this binary writes and reads, one per kind of file: a newer or older one is
/// refused by name. A model written in another format is dropped alone; its pool stays.
const POOLS_VERSION: u32 = 1;
const MODEL_VERSION: u32 = 3;
/// The oldest model format this binary still reads: v2 differs from v3 only in how a table row
/// is packed, so an upgrade adopts what the offloadd before it left.
const MODEL_OLDEST: u32 = 2;
const MAGIC: &str = "offloadd-journal";
const POOLS_FILE: &str = "pools.json";
const MODEL_PREFIX: &str = "model-";
/// Kept from v1, when the whole file was JSON, although only its first line is now: an older
/// offloadd started after a rollback must find a newer file, refuse it by version and remove it.
/// A file it did not list would outlive the rollback and be adopted by the next upgrade, over
/// ranges the older daemon may have given to other models meanwhile.
const MODEL_SUFFIX: &str = ".json";

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
        "{path}: journal format v{found}, this offloadd reads {}; what it describes is discarded and rebuilt",
        versions(*.oldest, *.want)
    )]
    Version {
        path: PathBuf,
        found: u32,
        /// The format this offloadd writes, the newest it reads.
        want: u32,
        /// The oldest format it reads.
        oldest: u32,
    },
    #[error("{path}: truncated: the header promises {want} bytes, the file has {got}")]
    Truncated { path: PathBuf, want: u64, got: u64 },
    #[error(
        "{path}: checksum mismatch (crc32c {got:08x}, header says {want:08x}): the file is corrupt"
    )]
    Checksum { path: PathBuf, want: u32, got: u32 },
    #[error("{path}: {why}")]
    Parse { path: PathBuf, why: String },
}

/// `v3`, or `v2 to v3`.
fn versions(oldest: u32, newest: u32) -> String {
    if oldest == newest {
        format!("v{newest}")
    } else {
        format!("v{oldest} to v{newest}")
    }
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
    /// journal.required: a pool or model whose record cannot be written is refused.
    required: bool,
    durability: std::sync::Arc<Durability>,
}

impl Journal {
    pub fn new(pools_dir: &Path, required: bool) -> Self {
        Self {
            dir: pools_dir.join(JOURNAL_DIR),
            required,
            durability: Default::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn required(&self) -> bool {
        self.required
    }

    /// What failed to reach the journal in this run.
    pub fn durability(&self) -> &Durability {
        &self.durability
    }

    /// The same, shared, for pools to answer whether they are durable.
    pub fn durability_handle(&self) -> std::sync::Arc<Durability> {
        std::sync::Arc::clone(&self.durability)
    }

    /// A failed write, with the filesystem's free bytes when it ran out of them.
    pub fn describe(&self, e: &JournalError) -> String {
        durability::describe(e, self.dir.parent().unwrap_or(&self.dir))
    }

    /// Reads everything. `Ok(None)`: there is no journal (a first start, or the last run kept
    /// nothing). An unreadable pools file fails the whole journal, since every model refers to it.
    pub fn read(&self) -> Result<Option<Contents>, JournalError> {
        let pools_path = self.dir.join(POOLS_FILE);
        let pools: PoolsFile = match read_framed(&pools_path, POOLS_VERSION..=POOLS_VERSION)? {
            Some((_, body)) => parse(&pools_path, &body)?,
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
            if !(name.starts_with(MODEL_PREFIX) && name.ends_with(MODEL_SUFFIX)) {
                continue;
            }
            let path = entry.path();
            let read = read_framed(&path, MODEL_OLDEST..=MODEL_VERSION).and_then(|body| {
                body.map(|(version, b)| model::decode(&path, version, &b))
                    .transpose()
            });
            match read {
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
        let written = self.write(POOLS_FILE, POOLS_VERSION, &[&body]);
        self.durability
            .pools_written(written.as_ref().map(|_| ()).map_err(|e| self.describe(e)));
        written
    }

    pub fn write_model<T: AsTensorRecord>(
        &self,
        model: &ModelRecordOut<'_, T>,
    ) -> Result<(), JournalError> {
        let parts = model::encode(model);
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let written = self.write(&model_file(model.name), MODEL_VERSION, &parts);
        self.durability.model_written(
            model.name,
            written.as_ref().map(|_| ()).map_err(|e| self.describe(e)),
        );
        written
    }

    pub fn remove_model(&self, name: &str) -> Result<(), JournalError> {
        self.durability.model_removed(name);
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
    fn write(&self, file: &str, version: u32, body: &[&[u8]]) -> Result<(), JournalError> {
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
        let head = format!("{MAGIC} v{version} crc32c={crc:08x} len={len}\n");
        let tmp = self.dir.join(format!(".tmp-{file}"));
        let dest = self.dir.join(file);
        let written = (|| {
            let mut f = create_group_readable(&tmp)?;
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

/// Creates (or truncates) `path` as mode 0640, whatever the umask or an older file's mode: what
/// the daemon keeps in `pools.dir` beside the pools (checkpoint paths, tensor tables, its pid) is
/// its business and its group's (like the pools, 0640), not every local user's.
pub fn create_group_readable(path: &Path) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
    Ok(f)
}

fn model_file(name: &str) -> String {
    // Model names are [A-Za-z0-9._-] and never start with '.', so they are safe file names.
    format!("{MODEL_PREFIX}{name}{MODEL_SUFFIX}")
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, body: &[u8]) -> Result<T, JournalError> {
    serde_json::from_slice(body).map_err(|e| JournalError::Parse {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// The body of a framed file in format `want`, checked against its header; `None` when the file
/// does not exist.
fn read_framed(
    path: &Path,
    versions: std::ops::RangeInclusive<u32>,
) -> Result<Option<(u32, Vec<u8>)>, JournalError> {
    let mut raw = match std::fs::read(path) {
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
    if !versions.contains(&found) {
        return Err(JournalError::Version {
            path: path.to_path_buf(),
            found,
            want: *versions.end(),
            oldest: *versions.start(),
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
    // The body stays in the buffer it was read into: a copy of a big table cost more (in page
    // faults on the new buffer) than moving it down over the frame's line.
    raw.drain(..=nl);
    Ok(Some((found, raw)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::TensorEntry;
    use safetensors::Dtype;

    fn model(name: &str) -> ModelRecord {
        ModelRecord {
            name: name.into(),
            pool: "p".into(),
            source: SourceRecord::Published,
            backend: None,
            tensors: vec![TensorEntry {
                name: "w".into(),
                dtype: Dtype::BF16,
                shape: vec![2, 3],
                offset: 256,
                len: 12,
                layer: None,
                crc32c: Some(7),
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
    fn round_trips_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path(), false);
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
        let j = Journal::new(dir.path(), false);
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
        assert!(matches!(
            err,
            JournalError::Version {
                found: 7,
                want: 1,
                ..
            }
        ));
        assert!(err.to_string().contains("v7"), "{err}");

        std::fs::write(&path, b"{}").unwrap();
        assert!(matches!(j.read(), Err(JournalError::NotJournal { .. })));
    }

    #[test]
    fn a_bad_model_file_spares_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path(), false);
        j.write_pools(vec![pool()]).unwrap();
        j.write_model(&model("a").out()).unwrap();
        j.write_model(&model("b").out()).unwrap();
        std::fs::write(j.dir().join(model_file("a")), b"garbage").unwrap();
        let got = j.read().unwrap().unwrap();
        assert_eq!(got.models, vec![model("b")]);
        assert_eq!(got.bad_models.len(), 1);
    }

    /// An upgrade from the offloadd that wrote v2 adopts what it left.
    #[test]
    fn a_model_file_of_v2_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path(), false);
        j.write_pools(vec![pool()]).unwrap();
        j.write_model(&model("b").out()).unwrap();
        let parts = model::encode_v2(&model("a").out());
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        j.write(&model_file("a"), 2, &parts).unwrap();
        let got = j.read().unwrap().unwrap();
        assert!(got.bad_models.is_empty(), "{:?}", got.bad_models);
        assert_eq!(got.models, vec![model("a"), model("b")]);
    }

    /// What an older offloadd left: reported by name and version, the other models kept.
    #[test]
    fn a_model_file_in_the_json_format_of_v1_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path(), false);
        j.write_pools(vec![pool()]).unwrap();
        j.write_model(&model("b").out()).unwrap();
        let body =
            br#"{"name":"a","pool":"p","source":{"kind":"published"},"backend":null,"tensors":[]}"#;
        // Framed as every journal file is, by the same writer, only with v1's number.
        j.write(&model_file("a"), 1, &[body]).unwrap();
        let got = j.read().unwrap().unwrap();
        assert_eq!(got.models, vec![model("b")]);
        let [err] = &got.bad_models[..] else {
            panic!("{:?}", got.bad_models)
        };
        assert!(err.path().ends_with("model-a.json"), "{err}");
        assert!(
            err.to_string()
                .contains("journal format v1, this offloadd reads v2 to v3"),
            "{err}"
        );
    }
}
