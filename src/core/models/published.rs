//! Models published by an engine (CreateModel, WriteModel, SealModel). The daemon allocates
//! the ranges and is the only writer of pool memory: an engine sends its bytes, which land only
//! inside its own tensors and only until it seals, and the checksums are of what the daemon
//! wrote. Pool files are never writable by engines, so no publisher reaches another's bytes.

use std::sync::{Arc, Mutex};

use safetensors::Dtype;
use tokio::sync::watch;

use super::model::{Model, ModelSource, ModelState, TensorEntry};
use super::registry::{Models, NewModel, check_name, new_model};
use super::{ModelError, state_name};
use crate::core::backend::BackendConfig;
use crate::core::crc;
use crate::core::layers;
use crate::core::pools::Pools;

/// A tensor an engine will write itself.
#[derive(Debug, Clone)]
pub struct PublishedTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// Who may write a model made by CreateModel, where, and until when.
#[derive(Debug)]
pub struct Publication {
    /// The secret only CreateModel's answer carries.
    token: String,
    /// The model's tensors as (pool offset, length), sorted by offset, for bounds checks.
    ranges: Vec<(u64, u64)>,
    /// true until SealModel begins. Held for each write, so that a seal waits for the write in
    /// flight and none lands after it, and one publication's writes never overlap in time.
    open: Mutex<bool>,
}

impl Publication {
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The caller's token is this publication's. Compared in constant time: a wrong guess
    /// says nothing about how close it was.
    fn admits(&self, token: &str) -> bool {
        let (a, b) = (self.token.as_bytes(), token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Whether `offset..offset + len` lies inside one tensor.
    fn covers(&self, offset: u64, len: u64) -> bool {
        let i = self.ranges.partition_point(|&(o, _)| o <= offset);
        i > 0 && {
            let (o, l) = self.ranges[i - 1];
            offset.checked_add(len).is_some_and(|end| end <= o + l)
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewPublished {
    pub name: String,
    pub pool: String,
    pub tensors: Vec<PublishedTensor>,
    pub backend: Option<BackendConfig>,
}

impl Models {
    /// Allocates ranges for an engine to fill through the shared pool file.
    pub fn create_published(
        &self,
        pools: &Pools,
        req: &NewPublished,
    ) -> Result<Arc<Model>, ModelError> {
        check_name(&req.name)?;
        req.backend
            .as_ref()
            .map(BackendConfig::validate)
            .transpose()?;
        self.check_free(&req.name)?;
        let pool = pools
            .get(&req.pool)
            .map_err(|_| ModelError::PoolNotFound(req.pool.clone()))?;
        let mut tensors = Vec::with_capacity(req.tensors.len());
        let mut seen = std::collections::HashSet::new();
        for t in &req.tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(ModelError::BadTensorSpec {
                    tensor: t.name.clone(),
                    why: "listed twice".into(),
                });
            }
            let (dtype, len) = tensor_bytes(t)?;
            tensors.push(TensorEntry {
                layer: layers::layer_of(&t.name, &self.params.layer_patterns),
                name: t.name.clone(),
                dtype,
                shape: t.shape.clone(),
                offset: 0,
                len,
                crc32c: None,
            });
        }
        let alloc = self.allocate(&pool, &req.name, &tensors)?;
        for (t, r) in tensors.iter_mut().zip(alloc.ranges()) {
            t.offset = r.offset();
        }
        let (_, load_done) = watch::channel(true);
        let bytes = tensors.iter().map(|t| t.len).sum();
        let mut ranges: Vec<(u64, u64)> = tensors.iter().map(|t| (t.offset, t.len)).collect();
        ranges.sort_unstable();
        let publication = Publication {
            token: crate::core::secret::token(),
            ranges,
            open: Mutex::new(true),
        };
        let model = Arc::new(new_model(NewModel {
            name: req.name.clone(),
            source: ModelSource::Published,
            alloc,
            tensors,
            bytes,
            state: ModelState::AwaitingSeal,
            backend: req.backend.clone(),
            load_done,
            adopted: false,
            publication: Some(publication),
        }));
        self.insert(&model)?;
        tracing::info!(model = %req.name, pool = %req.pool, bytes, "model created for publication");
        Ok(model)
    }

    /// Writes `data` at pool `offset`, inside one of a publication's tensors. Blocking (a
    /// copy of up to one message).
    pub fn write_published(
        &self,
        name: &str,
        token: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ModelError> {
        let model = self.get(name)?;
        let publication = publication(&model, token)?;
        if !publication.covers(offset, data.len() as u64) {
            return Err(ModelError::OutsideTensors {
                model: name.to_string(),
                offset,
                len: data.len() as u64,
            });
        }
        let open = publication.open.lock().expect("publication lock");
        if !*open {
            return Err(sealed(name));
        }
        // SAFETY: the range lies inside one of this model's tensors (checked above), allocated
        // to it alone; nobody reads it as weights before the seal, and the seal, like every
        // other write to it, waits for this lock, which is held for the whole copy.
        unsafe { model.pool().region().write_at(offset as usize, data) };
        Ok(())
    }

    /// Ends the publication (no write lands after this begins), checksums the bytes the
    /// daemon wrote and marks the model READY. Blocking.
    pub fn seal(&self, name: &str, token: &str) -> Result<Arc<Model>, ModelError> {
        let model = self.get(name)?;
        let publication = publication(&model, token)?;
        {
            let mut open = publication.open.lock().expect("publication lock");
            if !*open || model.state() != ModelState::AwaitingSeal {
                return Err(sealed(name));
            }
            *open = false;
        }
        let region = model.pool().region();
        let mut crc = crc::CrcBuffer::default();
        let mut tensors = model.tensors.lock().expect("tensors lock");
        for t in Arc::make_mut(&mut tensors).iter_mut() {
            t.crc32c = Some(crc.checksum(region, t.offset, t.len));
        }
        drop(tensors);
        if let Err(refused) = self.journal_write(&model) {
            self.remove_if_same(&model);
            model.progress.send_modify(|p| {
                p.state = ModelState::Failed;
                p.error = Some(refused.why.clone());
                p.journal_refused = Some(refused.no_space);
            });
            return Err(ModelError::NotDurable {
                why: refused.why,
                no_space: refused.no_space,
            });
        }
        model.progress.send_modify(|p| {
            p.state = ModelState::Ready;
            p.loaded_bytes = p.total_bytes;
        });
        tracing::info!(model = name, "model sealed");
        Ok(model)
    }
}

/// The model's publication, when the caller holds its token.
fn publication<'m>(model: &'m Model, token: &str) -> Result<&'m Publication, ModelError> {
    let Some(p) = model.publication.as_ref() else {
        return Err(ModelError::WrongState {
            name: model.name.clone(),
            state: state_name(model.state()),
            what: "only a model made by CreateModel in this run of the daemon is written and sealed by its publisher",
        });
    };
    if !p.admits(token) {
        return Err(ModelError::NotPublisher(model.name.clone()));
    }
    Ok(p)
}

fn sealed(name: &str) -> ModelError {
    ModelError::WrongState {
        name: name.to_string(),
        state: "sealed",
        what: "its bytes can no longer change; unregister it and publish again to change them",
    }
}

fn tensor_bytes(t: &PublishedTensor) -> Result<(Dtype, u64), ModelError> {
    let bad = |why: String| ModelError::BadTensorSpec {
        tensor: t.name.clone(),
        why,
    };
    if t.name.is_empty() {
        return Err(bad("name is empty".into()));
    }
    let dtype: Dtype =
        serde_json::from_value(serde_json::Value::String(t.dtype.clone())).map_err(|_| {
            bad(format!(
                "unknown dtype {:?}; use a safetensors dtype such as BF16, F16, F8_E4M3",
                t.dtype
            ))
        })?;
    let bits = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.bitsize()))
        .ok_or_else(|| bad("shape overflows".into()))?;
    if bits % 8 != 0 {
        return Err(bad("shape × dtype is not a whole number of bytes".into()));
    }
    Ok((dtype, (bits / 8) as u64))
}
