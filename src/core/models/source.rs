//! Where a checkpoint lives: a `.safetensors` file, a directory with
//! `model.safetensors.index.json` (sharded), or a directory holding `model.safetensors`.
//! Every path, shards included, must resolve (symlinks followed) inside `models.roots`.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::ModelError;
use super::header::{Shard, ShardTensor, read_shard, read_small};
use super::index::{check_listed, parse_index};

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";
/// A sharded index lists tensor names and shard files: megabytes even for 100k tensors.
pub(super) const INDEX_LIMIT: u64 = 256 << 20;

/// The shards of a checkpoint, validated, in a stable order.
#[derive(Debug)]
pub struct Checkpoint {
    /// The canonical path the operator named.
    pub path: PathBuf,
    pub shards: Vec<Shard>,
}

/// Confines `path` to the roots: both sides canonicalized, so `..` and symlinks that leave the
/// roots are refused.
pub fn confine(path: &Path, roots: &[PathBuf]) -> Result<PathBuf, ModelError> {
    if roots.is_empty() {
        return Err(ModelError::NoRoots);
    }
    let canonical = match path.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelError::PathNotFound(path.to_path_buf()));
        }
        Err(e) => return Err(ModelError::io(path, e)),
    };
    let inside = roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|root| canonical.starts_with(&root));
    if inside {
        Ok(canonical)
    } else {
        Err(ModelError::OutsideRoots {
            path: path.to_path_buf(),
            resolved: canonical,
            roots: roots.to_vec(),
        })
    }
}

/// Resolves and validates a checkpoint. Reads headers only.
pub fn open(path: &Path, roots: &[PathBuf]) -> Result<Checkpoint, ModelError> {
    if !path.is_absolute() {
        return Err(ModelError::RelativePath(path.to_path_buf()));
    }
    let path = confine(path, roots)?;
    let (shards, alone) = if path.is_dir() {
        let index = path.join(INDEX_FILE);
        let single = path.join(SINGLE_FILE);
        if index.exists() {
            open_sharded(&confine(&index, roots)?, roots)?
        } else if single.exists() {
            (vec![read_shard(&confine(&single, roots)?, roots)?], true)
        } else {
            return Err(ModelError::NoWeights(path));
        }
    } else {
        (vec![read_shard(&path, roots)?], true)
    };
    if !alone {
        unique_across(
            shards
                .iter()
                .map(|s| (s.path.as_path(), s.tensors.as_slice())),
        )?;
    }
    Ok(Checkpoint { path, shards })
}

/// Refuses a tensor name held by two shards. Each shard's names are unique already (its header
/// is a JSON object), so one shard needs no check: at 100k tensors, the set cost 20 ms. Nor do
/// shards that each hold their index's list alone ([`super::index::check_listed`]): the index
/// is a map, which lists a name once, so their names differ (the check cost 4-9 ms at 100k in
/// 64 shards).
pub(super) fn unique_across<'a>(
    shards: impl ExactSizeIterator<Item = (&'a Path, &'a [ShardTensor])> + Clone,
) -> Result<(), ModelError> {
    if shards.len() < 2 {
        return Ok(());
    }
    let names = shards.clone().map(|(_, t)| t.len()).sum();
    let mut seen = foldhash::HashMap::with_capacity_and_hasher(names, Default::default());
    for (path, tensors) in shards {
        for t in tensors {
            if let Some(first) = seen.insert(t.name.as_str(), path) {
                return Err(ModelError::DuplicateTensor {
                    tensor: t.name.clone(),
                    first: first.to_path_buf(),
                    second: path.to_path_buf(),
                });
            }
        }
    }
    Ok(())
}

/// The shards an index names, each checked to hold the tensors it lists for it, and whether
/// each holds those alone ([`super::index::check_listed`]).
fn open_sharded(index_path: &Path, roots: &[PathBuf]) -> Result<(Vec<Shard>, bool), ModelError> {
    let text = read_small(index_path, INDEX_LIMIT, roots)?;
    let by_shard = parse_index(&text, index_path)?;
    let dir = index_path.parent().expect("index lives in a directory");
    // On rayon's pool, as the parse of a long header is: one after another, the headers took
    // 23-40 ms of one core at 100k tensors in 64 shards. The results keep the index's order.
    let opened: Vec<_> = by_shard
        .par_iter()
        .map(|(file, tensors)| {
            let shard_path = dir.join(file);
            let shard_path = match confine(&shard_path, roots) {
                Err(ModelError::PathNotFound(_)) => {
                    return Err(ModelError::MissingShard {
                        index: index_path.to_path_buf(),
                        shard: shard_path,
                    });
                }
                other => other?,
            };
            let shard = read_shard(&shard_path, roots)?;
            let alone = check_listed(tensors, &shard.tensors, &shard_path, index_path)?;
            Ok((shard, alone))
        })
        .collect();
    let mut shards = Vec::with_capacity(opened.len());
    let mut alone = true;
    // The first shard in order that fails is the one reported, as when they were read in turn.
    for shard in opened {
        let (shard, holds_its_list_alone) = shard?;
        alone &= holds_its_list_alone;
        shards.push(shard);
    }
    Ok((shards, alone))
}

#[cfg(test)]
mod tests {
    use super::{ModelError, open};

    #[test]
    fn of_several_bad_shards_the_first_in_order_is_the_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let names: Vec<String> = (1..=8).map(|i| format!("shard-{i}.safetensors")).collect();
        let map: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .enumerate()
            .map(|(i, f)| (format!("t{i}"), f.as_str().into()))
            .collect();
        let index = serde_json::json!({ "weight_map": map });
        std::fs::write(root.join("model.safetensors.index.json"), index.to_string()).unwrap();
        // Shards 3 and 6 are not safetensors; the others do not exist: shard 1 is named.
        std::fs::write(root.join(&names[2]), b"x").unwrap();
        std::fs::write(root.join(&names[5]), b"x").unwrap();
        match open(&root, std::slice::from_ref(&root)) {
            Err(ModelError::MissingShard { shard, .. }) => {
                assert_eq!(shard, root.join(&names[0]))
            }
            other => panic!("expected shard-1 missing, got {other:?}"),
        }
        // With shards 1 and 2 present but empty, the first bad one is 1, an empty file.
        std::fs::write(root.join(&names[0]), b"").unwrap();
        std::fs::write(root.join(&names[1]), b"").unwrap();
        match open(&root, std::slice::from_ref(&root)) {
            Err(ModelError::BadFile { path, .. }) => assert_eq!(path, root.join(&names[0])),
            other => panic!("expected shard-1 refused, got {other:?}"),
        }
    }
}
