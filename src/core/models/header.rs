//! Reading and validating one safetensors file with the `safetensors` crate. The crate does the
//! parsing and the format checks; this module adds the file name, and the tensor name where the
//! crate's error does not carry one.

use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use super::ModelError;

/// One tensor of a shard, in file order.
#[derive(Debug, Clone)]
pub struct ShardTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute offset of the data in the file.
    pub file_offset: u64,
    pub len: u64,
}

/// A validated shard: its path, open file and tensors.
#[derive(Debug)]
pub struct Shard {
    pub path: PathBuf,
    pub file: File,
    pub tensors: Vec<ShardTensor>,
}

/// Opens and validates a safetensors file. The file is memory-mapped only while its header is
/// checked (the crate wants the whole buffer to verify the total length); no data is read.
pub fn read_shard(path: &Path) -> Result<Shard, ModelError> {
    let bad = |why: String, tensor: Option<String>| ModelError::BadFile {
        path: path.to_path_buf(),
        tensor,
        why,
    };
    let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    if len == 0 {
        return Err(bad(
            "the file is empty; it is not a safetensors checkpoint".into(),
            None,
        ));
    }
    // SAFETY: the file is opened read-only and we only read the header; if someone truncates it
    // underneath us we could fault, which is the accepted risk of mapping any file.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        let tensor = diagnose_tensor(&map, &e);
        bad(describe(&e), tensor)
    })?;
    let data_start = 8 + header_len as u64;
    let tensors = tensors_in_order(&metadata, data_start);
    Ok(Shard {
        path: path.to_path_buf(),
        file,
        tensors,
    })
}

fn tensors_in_order(metadata: &Metadata, data_start: u64) -> Vec<ShardTensor> {
    let infos = metadata.tensors();
    metadata
        .offset_keys()
        .into_iter()
        .map(|name| {
            let info = infos[&name];
            let (s, e) = info.data_offsets;
            ShardTensor {
                dtype: info.dtype,
                shape: info.shape.clone(),
                file_offset: data_start + s as u64,
                len: (e - s) as u64,
                name,
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

/// The crate reports some errors without the tensor; find it by re-reading the (already parsed
/// once) JSON header entry by entry.
fn diagnose_tensor(buf: &[u8], e: &SafeTensorError) -> Option<String> {
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
    let data_len = buf.len() - 8 - n;
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
