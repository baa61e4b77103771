//! Models published by an engine (CreateModel, then SealModel): the engine writes the bytes
//! through the shared pool file, the daemon allocates the ranges and checksums the result.

use std::sync::Arc;

use safetensors::Dtype;
use tokio::sync::watch;

use super::model::{Model, ModelSource, ModelState, TensorEntry};
use super::registry::{Models, NewModel, check_name, new_model};
use super::{ModelError, layers, loader, state_name};
use crate::core::backend::BackendConfig;
use crate::core::pools::Pools;

/// A tensor an engine will write itself.
#[derive(Debug, Clone)]
pub struct PublishedTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
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
        for (t, r) in tensors.iter_mut().zip(&alloc.ranges) {
            t.offset = r.offset;
        }
        let (_, load_done) = watch::channel(true);
        let bytes = tensors.iter().map(|t| t.len).sum();
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
        }));
        self.insert(&model)?;
        tracing::info!(model = %req.name, pool = %req.pool, bytes, "model created for publication");
        Ok(model)
    }

    /// Checksums the published bytes and marks the model READY. Blocking.
    pub fn seal(&self, name: &str) -> Result<Arc<Model>, ModelError> {
        let model = self.get(name)?;
        if model.state() != ModelState::AwaitingSeal {
            return Err(ModelError::WrongState {
                name: name.to_string(),
                state: state_name(model.state()),
                what: "only a model made by CreateModel can be sealed, once",
            });
        }
        let region = model.pool().region();
        let mut tensors = model.tensors.lock().expect("tensors lock");
        for t in Arc::make_mut(&mut tensors).iter_mut() {
            t.crc32c = Some(loader::checksum(region, t.offset, t.len));
        }
        drop(tensors);
        self.journal_write(&model);
        model.progress.send_modify(|p| {
            p.state = ModelState::Ready;
            p.loaded_bytes = p.total_bytes;
        });
        tracing::info!(model = name, "model sealed");
        Ok(model)
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
