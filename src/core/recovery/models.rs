//! Models across a restart: bringing journaled models back into their adopted pools, checked
//! against their checkpoints and (by default) every tensor's CRC32C.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::watch;

use super::Recovery;
use crate::config::VerifyOnAdopt;
use crate::core::crc;
use crate::core::journal::{FileStamp, ModelRecord, SourceRecord};
use crate::core::layers;
use crate::core::models::header::{header_crc, mtime_ns, open_regular};
use crate::core::models::model::{Model, ModelSource, ModelState, TensorEntry};
use crate::core::models::{LoadEnded, Models, NewModel, check_name, new_model};
use crate::core::pool::Pool;

/// Tensors are checked and reported in batches of about this many bytes: a progress update per
/// tensor wakes every watcher, and at 100k tensors of 4 KiB that cost more than the checksums.
const VERIFY_BATCH_BYTES: u64 = 8 << 20;

/// `tensors` cut into runs of at least `bytes` (the last one may be shorter); a tensor larger
/// than that is a run of its own.
fn batches(tensors: &[TensorEntry], bytes: u64) -> Vec<&[TensorEntry]> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0);
    for (i, t) in tensors.iter().enumerate() {
        sum += t.len;
        if sum >= bytes {
            out.push(&tensors[start..=i]);
            (start, sum) = (i + 1, 0);
        }
    }
    if start < tensors.len() {
        out.push(&tensors[start..]);
    }
    out
}

/// An adopted model whose bytes are still to be checked; it is LOADING until then.
pub struct PendingVerify {
    model: Arc<Model>,
    done: watch::Sender<bool>,
    adopted_at: Instant,
}

impl Models {
    /// Brings back a journaled model into its adopted pool, with exactly the ranges it had. It
    /// is READY at once with `VerifyOnAdopt::None`; otherwise LOADING until [`Models::verify`]
    /// has checked every tensor. Returns why it cannot come back otherwise. `spans` are the
    /// record's (offset, len) in table order: the caller has them already, to quarantine the
    /// ranges of a model that cannot come back.
    pub fn adopt(
        &self,
        pool: &Arc<Pool>,
        rec: ModelRecord,
        spans: &[(u64, u64)],
        verify: VerifyOnAdopt,
    ) -> Result<Option<PendingVerify>, String> {
        check_name(&rec.name).map_err(|e| e.to_string())?;
        self.check_free(&rec.name).map_err(|e| e.to_string())?;
        if let Some(b) = &rec.backend {
            b.validate().map_err(|e| format!("backend: {e}"))?;
        }
        let source = match rec.source {
            SourceRecord::Checkpoint { path, files } => {
                for f in &files {
                    self.check_unchanged(f)?;
                }
                ModelSource::Checkpoint { path, files }
            }
            SourceRecord::Published => ModelSource::Published,
            // The store is not asked: the pool holds the version the journal names, checked
            // byte by byte under verify_on_adopt = crc, and a start must not wait on the network.
            SourceRecord::Remote { url, objects } => ModelSource::Remote { url, objects },
        };
        let mut tensors = rec.tensors;
        for t in &mut tensors {
            let elems = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let bits = elems.and_then(|n| n.checked_mul(t.dtype.bitsize()));
            if bits != Some(t.len as usize * 8) {
                return Err(format!(
                    "the journal's tensor {:?} has {} bytes, which is not its shape × dtype",
                    t.name, t.len
                ));
            }
            // The names decide layers as this start's config says, not as the last one did.
            t.layer = layers::layer_of(&t.name, &self.params.layer_patterns);
        }
        let alloc = pool.claim_all(spans).map_err(|e| {
            format!(
                "the journal places its tensors where pool {:?} cannot hold them: {e}",
                pool.name
            )
        })?;
        let bytes = tensors.iter().map(|t| t.len).sum();
        let state = match verify {
            VerifyOnAdopt::Crc => ModelState::Loading,
            VerifyOnAdopt::None => ModelState::Ready,
        };
        let (done, load_done) = watch::channel(state == ModelState::Ready);
        let model = Arc::new(new_model(NewModel {
            name: rec.name.clone(),
            source,
            alloc,
            tensors,
            bytes,
            state,
            backend: rec.backend,
            load_done,
            adopted: true,
            publication: None,
        }));
        if state == ModelState::Ready {
            model
                .progress
                .send_modify(|p| p.loaded_bytes = p.total_bytes);
        }
        self.insert(&model).map_err(|e| e.to_string())?;
        tracing::info!(model = %rec.name, pool = %pool.name, bytes, verify = ?verify, "model adopted from the journal");
        Ok((state == ModelState::Loading).then_some(PendingVerify {
            model,
            done,
            adopted_at: Instant::now(),
        }))
    }

    /// A checkpoint that changed since its bytes were loaded makes the pool copy stale. One that
    /// is gone (or out of reach) does not: the pool copy is the only one left, and it is kept.
    fn check_unchanged(&self, f: &FileStamp) -> Result<(), String> {
        let changed = |what: String| {
            Err(format!(
                "checkpoint {} changed since it was loaded ({what}); register the model again",
                f.path.display()
            ))
        };
        let file = match open_regular(&f.path, &self.params.roots) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(path = %f.path.display(), error = %e, "cannot check the checkpoint; keeping the pool copy");
                return Ok(());
            }
        };
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if meta.len() != f.size {
            return changed(format!("{} bytes, was {}", meta.len(), f.size));
        }
        if mtime_ns(&meta) != f.mtime_ns {
            return changed("modification time differs".into());
        }
        match header_crc(&file, &f.path, f.size) {
            Ok(crc) if crc == f.header_crc32c => Ok(()),
            Ok(_) => changed("its header differs".into()),
            Err(e) => changed(e.to_string()),
        }
    }

    /// Checks every tensor's CRC32C against the journal, in parallel, then marks the model
    /// READY; a mismatch drops it (ranges freed, record removed) with the tensor named.
    /// Blocking: runs on its own thread. Returns the signal that it has ended, as
    /// [`Models::load`] does.
    #[must_use = "send the load-ended signal, or waiters wait forever"]
    pub fn verify(&self, job: PendingVerify, recovery: &Recovery) -> LoadEnded {
        let PendingVerify {
            model,
            done,
            adopted_at,
        } = job;
        let start = Instant::now();
        // This runs beside the adopted pool's background pin. Waiting for the pin first was
        // slower on the 2-core benchmark machine (0.75 s against 0.68 s for 4 GiB).
        let region = model.pool().region();
        let tensors = model.tensors();
        let verified = AtomicU64::new(0);
        let bad = batches(&tensors, VERIFY_BATCH_BYTES)
            .par_iter()
            .find_map_any(|batch| {
                if model.cancel.load(Ordering::Relaxed) {
                    return Some("cancelled: the model was unregistered".to_string());
                }
                let mut crc = crc::CrcBuffer::default();
                let bad = batch.iter().find_map(|t| {
                    let got = crc.checksum(region, t.offset, t.len);
                    let want = t.crc32c.expect("adopted tensors carry their checksum");
                    (got != want).then(|| {
                        format!(
                            "tensor {:?} at pool offset {}: crc32c {got:08x}, the journal says {want:08x}; the pool changed while offloadd was down, register the model again",
                            t.name, t.offset
                        )
                    })
                });
                let len: u64 = batch.iter().map(|t| t.len).sum();
                let n = verified.fetch_add(len, Ordering::Relaxed) + len;
                model.progress.send_modify(|p| p.loaded_bytes = p.loaded_bytes.max(n));
                bad
            });
        match bad {
            None => {
                let secs = start.elapsed().as_secs_f64();
                tracing::info!(model = %model.name, bytes = model.bytes, secs, "adopted model verified");
                model.progress.send_modify(|p| {
                    p.state = ModelState::Ready;
                    p.loaded_bytes = p.total_bytes;
                });
            }
            Some(why) => {
                self.journal_forget(&model);
                self.remove_if_same(&model);
                recovery.dropped("model", &model.name, why.clone());
                // Workers of the old daemon may still read these ranges in place.
                model.pool().quarantine(Arc::clone(&model), adopted_at);
                model.progress.send_modify(|p| {
                    p.state = ModelState::Failed;
                    p.error = Some(why);
                });
            }
        }
        drop(model);
        LoadEnded(done)
    }
}
