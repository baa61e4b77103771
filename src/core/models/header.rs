//! Reading and validating one safetensors file with the `safetensors` crate. The crate does the
//! parsing and the format checks; this module adds the file name, and the tensor name where the
//! crate's error does not carry one.
//!
//! Only regular files are opened, without blocking (a FIFO under the roots would otherwise hang
//! the call), and the header is read into memory rather than mapped: a file truncated by someone
//! else while it is parsed gives an error naming it, never a SIGBUS in the daemon.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crc_fast::{CrcAlgorithm::Crc32Iscsi, Digest};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{SafeTensorError, SafeTensors};

use super::ModelError;
use crate::core::journal::FileStamp;

/// One tensor of a shard, in file order: a row of the model's table whose `offset` is, until
/// the model is placed in its pool, where its bytes lie in the file (`layer` and `crc32c` not
/// yet known). The table is built in place from the shards' lists: a copy of 100k rows into
/// fresh memory was a twelfth of a registration.
pub type ShardTensor = crate::core::table::TensorEntry;

/// A validated shard: its path, open file and tensors.
#[derive(Debug)]
pub struct Shard {
    pub path: PathBuf,
    pub file: File,
    pub tensors: Vec<ShardTensor>,
    /// Size, modification time and header checksum, for the journal.
    pub stamp: FileStamp,
}

/// The most header bytes the safetensors format allows (the crate's own limit).
pub(super) const MAX_HEADER: u64 = 100_000_000;

/// Opens a regular file for reading without blocking; FIFOs, devices, sockets and directories
/// are refused with what they are. `path` was confined to one of `roots` by name; the open
/// itself resolves it beneath that root (openat2 RESOLVE_BENEATH), so a symlink swapped in
/// after the check cannot lead out of the roots.
pub fn open_regular(path: &Path, roots: &[PathBuf]) -> Result<File, ModelError> {
    let file = open_beneath(path, roots)?;
    let kind = file
        .metadata()
        .map_err(|e| ModelError::io(path, e))?
        .file_type();
    let what = if kind.is_file() {
        return Ok(file);
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a file"
    };
    Err(ModelError::NotRegularFile {
        path: path.to_path_buf(),
        kind: what,
    })
}

fn open_beneath(path: &Path, roots: &[PathBuf]) -> Result<File, ModelError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let outside = || ModelError::OutsideRoots {
        path: path.to_path_buf(),
        resolved: path.to_path_buf(),
        roots: roots.to_vec(),
    };
    let (root, rel) = roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .find_map(|r| Some((r.clone(), path.strip_prefix(&r).ok()?.to_path_buf())))
        .ok_or_else(outside)?;
    let dir = rustix::fs::open(
        &root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ModelError::io(&root, e.into()))?;
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        &rel
    };
    match rustix::fs::openat2(
        &dir,
        rel,
        flags,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => Ok(File::from(fd)),
        Err(rustix::io::Errno::XDEV) => Err(outside()),
        // open(2) answers ENXIO for a socket (and a device with no driver): say what it is.
        Err(rustix::io::Errno::NXIO) => {
            use rustix::fs::{AtFlags, FileType};
            let kind = rustix::fs::statat(&dir, rel, AtFlags::empty())
                .map(|st| FileType::from_raw_mode(st.st_mode));
            Err(match kind {
                Ok(FileType::Socket) => ModelError::NotRegularFile {
                    path: path.to_path_buf(),
                    kind: "a socket",
                },
                Ok(FileType::CharacterDevice | FileType::BlockDevice) => {
                    ModelError::NotRegularFile {
                        path: path.to_path_buf(),
                        kind: "a device",
                    }
                }
                _ => ModelError::io(path, rustix::io::Errno::NXIO.into()),
            })
        }
        // Kernels before 5.6: the name-based check above is all there is.
        Err(rustix::io::Errno::NOSYS) => OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| ModelError::io(path, e)),
        Err(e) => Err(ModelError::io(path, e.into())),
    }
}

/// Reads a small metadata file (an index) through [`open_regular`], refusing one over `limit`.
pub fn read_small(path: &Path, limit: u64, roots: &[PathBuf]) -> Result<Vec<u8>, ModelError> {
    let file = open_regular(path, roots)?;
    // Sized from the file's length: through `take`, `read_to_end` no longer knows it and grew
    // the buffer by doubling, copying and faulting in each new one: 15-50 ms for the 8 MB
    // index of a 100k-tensor checkpoint.
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut text = Vec::with_capacity(len.min(limit) as usize + 1);
    file.take(limit + 1)
        .read_to_end(&mut text)
        .map_err(|e| ModelError::io(path, e))?;
    if text.len() as u64 > limit {
        return Err(ModelError::BadIndex {
            path: path.to_path_buf(),
            why: format!("larger than {limit} bytes; not a checkpoint index"),
        });
    }
    Ok(text)
}

/// Opens and validates a safetensors file (confined to `roots`), reading its header only.
pub fn read_shard(path: &Path, roots: &[PathBuf]) -> Result<Shard, ModelError> {
    let bad = |why: String, tensor: Option<String>| ModelError::BadFile {
        path: path.to_path_buf(),
        tensor,
        why,
    };
    let file = open_regular(path, roots)?;
    let meta = file.metadata().map_err(|e| ModelError::io(path, e))?;
    let len = meta.len();
    if len == 0 {
        return Err(bad(
            "the file is empty; it is not a safetensors checkpoint".into(),
            None,
        ));
    }
    let mut head = read_head_uncached(&file, path, len)?;
    let data_len = len - head.len() as u64;
    let tensors = parse_header(&mut head, data_len).map_err(|e| bad(e.why, e.tensor))?;
    Ok(Shard {
        path: path.to_path_buf(),
        file,
        tensors,
        stamp: FileStamp {
            path: path.to_path_buf(),
            size: len,
            mtime_ns: mtime_ns(&meta),
            header_crc32c: crate::core::crc::crc32c(&head),
        },
    })
}

/// [`read_head`] for a registration, which leaves in the page cache nothing it brought in (see
/// `cache`): without readahead, which would bring in the first tensors before the load probes
/// them (8 MiB of them on some virtual disks), and dropping the header's pages if they were
/// not cached. Readahead is restored for the load.
fn read_head_uncached(file: &File, path: &Path, len: u64) -> Result<Vec<u8>, ModelError> {
    use rustix::fs::{Advice, fadvise};
    let _ = fadvise(file, 0, None, Advice::Random);
    // The length prefix's page, then the rest once the length is known: probed before read.
    let prefix = super::cache::probe(file, 0, 8.min(len));
    let mut n = [0u8; 8];
    let rest = read_at(file, path, &mut n, 0).map(|()| {
        let n = u64::from_le_bytes(n).min(len - 8.min(len));
        (n, super::cache::probe(file, 8, n))
    });
    let head = read_head(file, path, len);
    let _ = fadvise(file, 0, None, Advice::Normal);
    if let Ok((n, rest)) = rest {
        rest.drop_behind(file, 8, n);
    }
    prefix.drop_behind(file, 0, 8.min(len));
    head
}

/// Modification time in nanoseconds since the epoch, as the journal records it.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec()
}

/// The 8-byte length and the JSON header of a shard of `len` bytes, checked against the
/// format's limits before anything large is read.
fn read_head(file: &File, path: &Path, len: u64) -> Result<Vec<u8>, ModelError> {
    let mut head = vec![0u8; head_len(file, path, len)? as usize];
    read_at(file, path, &mut head, 0)?;
    Ok(head)
}

/// The bytes of a shard's length prefix and header together, checked against the format's
/// limits.
fn head_len(file: &File, path: &Path, len: u64) -> Result<u64, ModelError> {
    let bad = |e: SafeTensorError| ModelError::BadFile {
        path: path.to_path_buf(),
        tensor: None,
        why: describe(&e),
    };
    let mut n = [0u8; 8];
    if len < 8 {
        return Err(bad(SafeTensorError::HeaderTooSmall));
    }
    read_at(file, path, &mut n, 0)?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER {
        return Err(bad(SafeTensorError::HeaderTooLarge));
    }
    if 8 + n > len {
        return Err(bad(SafeTensorError::InvalidHeaderLength));
    }
    Ok(8 + n)
}

/// CRC32C of a shard's header (length prefix included), read from an open file: what
/// [`FileStamp::header_crc32c`] recorded at registration. Streamed through a small buffer: a
/// restart checks every shard's, and at 100k tensors a header is megabytes that a fresh
/// buffer would fault in page by page.
pub fn header_crc(file: &File, path: &Path, size: u64) -> Result<u32, ModelError> {
    const PIECE: u64 = 64 << 10;
    let len = head_len(file, path, size)?;
    let mut buf = vec![0u8; PIECE.min(len) as usize];
    let mut digest = Digest::new(Crc32Iscsi);
    let mut at = 0;
    while at < len {
        let piece = &mut buf[..(len - at).min(PIECE) as usize];
        read_at(file, path, piece, at)?;
        digest.update(piece);
        at += piece.len() as u64;
    }
    Ok(digest.finalize() as u32)
}

/// Why a header was refused, and the tensor at fault when one is.
#[derive(Debug)]
pub struct HeaderProblem {
    pub why: String,
    pub tensor: Option<String>,
}

/// Parses a header: `head` is the 8-byte length and the JSON, `data_len` the bytes after it in
/// the file. Pure (no I/O), so it is tested on arbitrary input. On success every tensor lies
/// inside the data section, in file order, without gaps or overlaps, and its span is exactly
/// its shape times its dtype size. `head` is written to while a long header is parsed in
/// pieces (see `header_json`), and is as it was on return.
pub fn parse_header(head: &mut [u8], data_len: u64) -> Result<Vec<ShardTensor>, HeaderProblem> {
    let problem = |why: String, tensor: Option<String>| HeaderProblem { why, tensor };
    // The one-pass parser takes the common case; what it declines, the crate judges:
    // deserializing `Metadata` runs its validation (`Metadata::new`), and only a header that
    // fails that goes through `read_metadata`, for the crate's precise error.
    let prefix_matches = head.get(..8).is_some_and(|n| {
        u64::from_le_bytes(n.try_into().expect("8 bytes")) == head.len() as u64 - 8
    });
    let data_start = head.len() as u64;
    if prefix_matches
        && let Some((tensors, end)) = super::header_json::parse(&mut head[8..], data_start)
        && end == data_len
    {
        return Ok(tensors);
    }
    let head: &[u8] = head;
    let json = head
        .get(8..)
        .filter(|_| prefix_matches)
        .and_then(|json| std::str::from_utf8(json).ok());
    let parsed = json.and_then(|json| serde_json::from_str::<Metadata>(json).ok());
    // The crate checks the header against a buffer; given the header alone it can only
    // disagree about where the data ends, which is checked below against the file's length.
    let metadata = match parsed.map_or_else(|| SafeTensors::read_metadata(head).map(|(_, m)| m), Ok)
    {
        Ok(m) => m,
        Err(SafeTensorError::MetadataIncompleteBuffer) => {
            serde_json::from_slice::<Metadata>(&head[8..])
                .map_err(|e| problem(format!("header is not valid safetensors JSON: {e}"), None))?
        }
        Err(e) => {
            let tensor = diagnose_tensor(head, data_len, &e);
            return Err(problem(describe(&e), tensor));
        }
    };
    // Validated: contiguous from 0 in offset order, so the last tensor's end is the data's.
    let end = metadata.data_len() as u64;
    if end != data_len {
        let e = SafeTensorError::MetadataIncompleteBuffer;
        return Err(problem(describe(&e), diagnose_tensor(head, data_len, &e)));
    }
    Ok(tensors_in_order(&metadata, head.len() as u64))
}

fn tensors_in_order(metadata: &Metadata, data_start: u64) -> Vec<ShardTensor> {
    metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let info = metadata.info(&name).expect("a key of this metadata");
            let (s, e) = info.data_offsets;
            ShardTensor {
                dtype: info.dtype,
                shape: info.shape.clone(),
                offset: data_start + s as u64,
                len: (e - s) as u64,
                name,
                layer: None,
                crc32c: None,
            }
        })
        .collect()
}

fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => "file shorter than the 8-byte header length; not a safetensors file".into(),
        SafeTensorError::HeaderTooLarge => "header length is over the 100 MB limit; the file is corrupt or not safetensors".into(),
        SafeTensorError::InvalidHeaderLength => "header length points beyond the end of the file; the file is truncated or corrupt".into(),
        SafeTensorError::InvalidHeader(_) => "header is not valid UTF-8".into(),
        SafeTensorError::InvalidHeaderDeserialization(j) => format!("header is not valid safetensors JSON: {j}"),
        SafeTensorError::MetadataIncompleteBuffer => "tensor data does not end where the file ends (truncated file, trailing bytes, or a span out of bounds)".into(),
        SafeTensorError::InvalidOffset(t) => format!("tensor {t:?} has data offsets that overlap, leave a gap, or run backwards"),
        SafeTensorError::TensorInvalidInfo => "a tensor's shape × dtype size does not match its byte span".into(),
        SafeTensorError::ValidationOverflow => "a tensor's shape overflows when multiplied out".into(),
        SafeTensorError::MisalignedSlice => "a tensor's size is not a whole number of bytes".into(),
        other => other.to_string(),
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; a file that shrank meanwhile is named.
fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), ModelError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ModelError::BadFile {
                path: path.to_path_buf(),
                tensor: None,
                why: "the file changed (shrank) while its header was read; register it again once it is complete".into(),
            }
        } else {
            ModelError::io(path, e)
        }
    })
}

/// The crate reports some errors without the tensor; find it by re-reading the (already parsed
/// once) JSON header entry by entry. `buf` is the length and the header; `data_len` the bytes
/// after it in the file.
fn diagnose_tensor(buf: &[u8], data_len: u64, e: &SafeTensorError) -> Option<String> {
    if let SafeTensorError::InvalidOffset(t) = e {
        return Some(t.clone());
    }
    if !matches!(
        e,
        SafeTensorError::TensorInvalidInfo
            | SafeTensorError::ValidationOverflow
            | SafeTensorError::MisalignedSlice
            | SafeTensorError::InvalidHeaderDeserialization(_)
            | SafeTensorError::MetadataIncompleteBuffer
    ) {
        return None;
    }
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(buf.get(8..8 + n)?).ok()?;
    let data_len = usize::try_from(data_len).ok()?;
    header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .find_map(|(name, v)| {
            let Ok(info) = serde_json::from_value::<TensorInfo>(v) else {
                return Some(name);
            };
            let elems = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bytes = elems
                .and_then(|n| n.checked_mul(info.dtype.bitsize()))
                .map(|b| b.div_ceil(8));
            let (s, e) = info.data_offsets;
            let wrong = bytes != Some(e.wrapping_sub(s)) || e < s || e > data_len;
            wrong.then_some(name)
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A valid header for `specs` (dtype, shape), laid out back to back; returns it with the
    /// data length.
    fn valid(specs: &[(&str, Vec<usize>)]) -> (Vec<u8>, u64) {
        let mut json = serde_json::Map::new();
        let mut at = 0usize;
        for (i, (dtype, shape)) in specs.iter().enumerate() {
            let size = match *dtype {
                "F32" | "I32" => 4,
                "F16" | "BF16" => 2,
                _ => 1,
            };
            let n = shape.iter().product::<usize>() * size;
            json.insert(
                format!("model.layers.{i}.w"),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}),
            );
            at += n;
        }
        json.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let text = serde_json::to_vec(&json).unwrap();
        let mut head = (text.len() as u64).to_le_bytes().to_vec();
        head.extend_from_slice(&text);
        (head, at as u64)
    }

    #[test]
    fn the_streamed_header_checksum_is_the_checksum_of_the_header() {
        // Larger than one streamed piece, with data after it that must not count.
        let specs: Vec<_> = (0..3000).map(|_| ("U8", vec![3])).collect();
        let (head, data) = valid(&specs);
        assert!(head.len() > 64 << 10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut bytes = head.clone();
        bytes.resize(head.len() + data as usize, 7);
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let crc = header_crc(&file, &path, bytes.len() as u64).unwrap();
        assert_eq!(crc, crate::core::crc::crc32c(&head));
        assert_ne!(crc, crate::core::crc::crc32c(&bytes));
    }

    fn check_invariants(tensors: &[ShardTensor], head_len: u64, data_len: u64) {
        let mut at = head_len;
        for t in tensors {
            assert_eq!(t.offset, at, "{}: no gap, no overlap", t.name);
            let elems: u64 = t.shape.iter().map(|&d| d as u64).product();
            assert_eq!(t.len * 8, elems * t.dtype.bitsize() as u64, "{}", t.name);
            at += t.len;
        }
        assert!(at <= head_len + data_len);
    }

    fn specs() -> impl Strategy<Value = Vec<(&'static str, Vec<usize>)>> {
        prop::collection::vec(
            (
                prop::sample::select(vec!["F32", "F16", "BF16", "I32", "U8", "I8"]),
                prop::collection::vec(0usize..9, 0..4),
            ),
            0..6,
        )
    }

    proptest! {
        // PROPTEST_CASES raises the count for a long run (docs/reliability.md).
        // Failures are kept beside this file (header.proptest-regressions), not in a folder
        // at the top of the repository.
        #![proptest_config(ProptestConfig {
            failure_persistence: Some(Box::new(
                proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions")
            )),
            ..ProptestConfig::with_cases(
                std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512)
            )
        })]

        #[test]
        fn valid_headers_parse_with_their_invariants(specs in specs()) {
            let (mut head, data_len) = valid(&specs);
            let tensors = parse_header(&mut head, data_len).unwrap();
            prop_assert_eq!(tensors.len(), specs.len());
            check_invariants(&tensors, head.len() as u64, data_len);
        }

        #[test]
        fn mutated_headers_never_panic_and_never_lie(
            specs in specs(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
            data_delta in -3i64..3,
        ) {
            let (mut head, data_len) = valid(&specs);
            for (at, byte) in flips {
                let i = at.index(head.len());
                head[i] = byte;
            }
            if truncate {
                head.truncate(cut.index(head.len() + 1));
            }
            let data_len = data_len.saturating_add_signed(data_delta);
            if let Ok(tensors) = parse_header(&mut head, data_len) {
                check_invariants(&tensors, head.len() as u64, data_len);
            }
        }

        #[test]
        fn the_one_pass_parser_accepts_only_what_the_crate_accepts(
            specs in specs(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let (mut head, _) = valid(&specs);
            let untouched = flips.is_empty();
            for (at, byte) in flips {
                let i = 8 + at.index(head.len() - 8);
                head[i] = byte;
            }
            let Ok(json) = std::str::from_utf8(&head[8..]) else { return Ok(()) };
            let mut bytes = json.as_bytes().to_vec();
            let fast = super::super::header_json::parse(&mut bytes, 8);
            // A valid header never falls through to the crate's slower path.
            prop_assert!(!untouched || fast.is_some());
            // Parsed in pieces, wherever the cuts fall, it reads the same, and is left as it was.
            for pieces in 1..=5 {
                prop_assert_eq!(&super::super::header_json::parse_in(&mut bytes, 8, pieces), &fast);
                prop_assert_eq!(&bytes[..], json.as_bytes());
            }
            if let Some((fast, end)) = fast {
                let m: Metadata = serde_json::from_str(json).expect("the crate accepts it too");
                prop_assert_eq!(end, m.data_len() as u64);
                let mut slow = tensors_in_order(&m, 8);
                // Empty tensors share an offset; the crate orders those by its hash map's
                // iteration order, the one-pass parser by document order.
                let mut fast = fast;
                fast.sort_by(|a, b| (a.offset, a.len, &a.name).cmp(&(b.offset, b.len, &b.name)));
                slow.sort_by(|a, b| (a.offset, a.len, &a.name).cmp(&(b.offset, b.len, &b.name)));
                prop_assert_eq!(fast.len(), slow.len());
                for (f, s) in fast.iter().zip(&slow) {
                    prop_assert_eq!(
                        (&f.name, f.dtype, &f.shape, f.offset, f.len),
                        (&s.name, s.dtype, &s.shape, s.offset, s.len)
                    );
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(mut head in prop::collection::vec(any::<u8>(), 0..300), data_len in any::<u64>()) {
            if let Ok(tensors) = parse_header(&mut head, data_len) {
                check_invariants(&tensors, head.len() as u64, data_len);
            }
        }
    }
}
