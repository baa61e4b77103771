//! A checkpoint in object storage, laid out as on disk: one `.safetensors` object, or a prefix
//! holding `model.safetensors.index.json` (sharded) or `model.safetensors`. Only headers are
//! read here, each with two ranged GETs (the 8-byte length, then the JSON), and every read is
//! pinned to the ETag its HEAD found.

use std::path::{Path, PathBuf};

use super::ModelError;
use super::header::{MAX_HEADER, ShardTensor, parse_header};
use super::index::{check_listed, parse_index};
use super::source::{INDEX_FILE, INDEX_LIMIT, SINGLE_FILE, unique_across};
use crate::core::remote::{Object, ObjectStamp, RemoteError, Remotes};

/// The shards of a remote checkpoint, validated, in a stable order.
#[derive(Debug)]
pub struct RemoteCheckpoint {
    pub url: String,
    pub shards: Vec<RemoteShard>,
}

/// One object of a remote checkpoint: where it is, which version was read, and its tensors.
#[derive(Debug)]
pub struct RemoteShard {
    pub object: Object,
    pub stamp: ObjectStamp,
    pub tensors: Vec<ShardTensor>,
}

/// Resolves `url` against `models.remotes` and reads its layout and headers. Blocking: it
/// waits on the remote runtime.
pub fn open(remotes: &Remotes, url: &str) -> Result<RemoteCheckpoint, ModelError> {
    let root = remotes.resolve(url)?;
    remotes.block_on(open_at(root))
}

async fn open_at(root: Object) -> Result<RemoteCheckpoint, ModelError> {
    let (shards, alone) = if root.is_file() {
        (vec![read_shard(root.clone()).await?], true)
    } else {
        let index = root.child(INDEX_FILE)?;
        match index.stamp().await {
            Ok(stamp) => open_sharded(&root, &index, &stamp).await?,
            Err(RemoteError::NotFound { .. }) => {
                let single = root.child(SINGLE_FILE)?;
                match read_shard(single).await {
                    Err(ModelError::Remote(RemoteError::NotFound { .. })) => {
                        return Err(RemoteError::NotFound {
                            url: root.url.clone(),
                            hint: ": neither model.safetensors.index.json nor model.safetensors is under this prefix; name a .safetensors object or a checkpoint prefix",
                        }
                        .into());
                    }
                    other => (vec![other?], true),
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    if !alone {
        let labels: Vec<PathBuf> = shards.iter().map(|s| label(&s.object.url)).collect();
        unique_across(
            labels
                .iter()
                .zip(&shards)
                .map(|(l, s)| (l.as_path(), s.tensors.as_slice())),
        )?;
    }
    Ok(RemoteCheckpoint {
        url: root.url.clone(),
        shards,
    })
}

async fn open_sharded(
    root: &Object,
    index: &Object,
    stamp: &ObjectStamp,
) -> Result<(Vec<RemoteShard>, bool), ModelError> {
    let index_label = label(&index.url);
    if stamp.size > INDEX_LIMIT {
        return Err(ModelError::BadIndex {
            path: index_label,
            why: format!("larger than {INDEX_LIMIT} bytes; not a checkpoint index"),
        });
    }
    let text = index.read_all(stamp).await?;
    let by_shard = parse_index(&text, &index_label)?;
    // The headers are read together: one round trip each, not one per shard in turn.
    let shards = by_shard.iter().map(|(file, listed)| {
        let index_label = &index_label;
        async move {
            let object = root.child(file)?;
            let shard = match read_shard(object.clone()).await {
                Err(ModelError::Remote(RemoteError::NotFound { .. })) => {
                    return Err(ModelError::MissingShard {
                        index: index_label.clone(),
                        shard: label(&object.url),
                    });
                }
                other => other?,
            };
            let alone = check_listed(listed, &shard.tensors, &label(&object.url), index_label)?;
            Ok((shard, alone))
        }
    });
    let (shards, alone): (Vec<_>, Vec<bool>) = futures_util::future::try_join_all(shards)
        .await?
        .into_iter()
        .unzip();
    Ok((shards, alone.into_iter().all(|a| a)))
}

/// Reads and validates one object's header, as [`super::header::read_shard`] does a file's.
async fn read_shard(object: Object) -> Result<RemoteShard, ModelError> {
    let stamp = object.stamp().await?;
    let bad = |why: String| ModelError::BadFile {
        path: label(&object.url),
        tensor: None,
        why,
    };
    if stamp.size < 8 {
        return Err(bad(format!(
            "{} bytes: too small for a safetensors header",
            stamp.size
        )));
    }
    let len = object.read_range(&stamp, 0..8).await?;
    let n = u64::from_le_bytes(len[..].try_into().expect("8 bytes asked for"));
    if n > MAX_HEADER {
        return Err(bad(format!(
            "its header claims {n} bytes, more than the format's {MAX_HEADER}"
        )));
    }
    if 8 + n > stamp.size {
        return Err(bad(format!(
            "its header claims {n} bytes, but the object has {}",
            stamp.size
        )));
    }
    let json = object.read_range(&stamp, 8..8 + n).await?;
    let mut head = Vec::with_capacity(8 + n as usize);
    head.extend_from_slice(&len);
    head.extend_from_slice(&json);
    let data_len = stamp.size - head.len() as u64;
    let tensors = parse_header(&mut head, data_len).map_err(|e| ModelError::BadFile {
        path: label(&object.url),
        tensor: e.tensor,
        why: e.why,
    })?;
    Ok(RemoteShard {
        object,
        stamp,
        tensors,
    })
}

/// A URL as the path-shaped name the checkpoint errors carry.
fn label(url: &str) -> PathBuf {
    Path::new(url).to_path_buf()
}
