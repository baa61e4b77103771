//! The start after a restart: read the journal, adopt the pools and models that still match it,
//! and remove everything else an earlier run left in `pools.dir`.

use std::collections::HashMap;
use std::time::Instant;

use super::models::PendingVerify;
use super::pools::PendingPin;
use super::report::JournalOutcome;
use crate::config::{ModelSpec, PoolSpec, VerifyOnAdopt};
use crate::core::Core;
use crate::core::journal::{Journal, SourceRecord};

/// What the operator's config says this start must have: a journaled pool or model that
/// contradicts it is not adopted, so the config's version is created instead.
pub struct AdoptParams<'a> {
    pub journal: &'a Journal,
    pub verify: VerifyOnAdopt,
    pub config_pools: &'a [PoolSpec],
    pub config_models: &'a [ModelSpec],
}

/// The background work an adoption leaves: the adopted models' verifications (their models are
/// LOADING until then) and the adopted pools' pins (AttachWorker on them waits until then).
#[derive(Default)]
pub struct Adopted {
    pub verifications: Vec<PendingVerify>,
    pub pins: Vec<PendingPin>,
}

/// Adopts what matches and sweeps the rest, and returns the work still to run. Never fails: at
/// worst everything is rebuilt.
pub fn adopt(core: &Core, p: &AdoptParams<'_>) -> Adopted {
    let recovery = &core.recovery;
    let contents = match p.journal.read() {
        Ok(Some(c)) => c,
        Ok(None) => {
            core.pools.sweep();
            return Adopted::default();
        }
        Err(e) => {
            tracing::warn!(reason = %e, "the journal is unusable; starting clean");
            recovery.set_journal(JournalOutcome::Discarded(e.to_string()));
            if let Err(e) = p.journal.clear() {
                tracing::warn!(error = %e, "cannot remove the unusable journal");
            }
            core.pools.sweep();
            return Adopted::default();
        }
    };
    recovery.set_journal(JournalOutcome::Applied);
    for bad in contents.bad_models {
        let file = bad.path().to_path_buf();
        recovery.dropped("model", &file.display().to_string(), bad.to_string());
        if let Err(e) = std::fs::remove_file(&file) {
            tracing::warn!(path = %file.display(), error = %e, "cannot remove the unreadable journal file");
        }
    }
    let config_pools: HashMap<&str, &PoolSpec> = p
        .config_pools
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut pins = Vec::new();
    for rec in &contents.pools {
        if let Some(spec) = config_pools.get(rec.name.as_str()) {
            if spec.device != rec.device || spec.size_bytes != rec.size_bytes {
                recovery.dropped(
                    "pool",
                    &rec.name,
                    format!(
                        "pools.create now declares it as {} bytes on {}, not {} bytes on {}",
                        spec.size_bytes, spec.device, rec.size_bytes, rec.device
                    ),
                );
                continue;
            }
        }
        match super::pools::adopt(&core.pools, rec) {
            Ok((_, pin)) => {
                recovery.pool_adopted(&rec.name);
                pins.extend(pin);
            }
            Err(reason) => recovery.dropped("pool", &rec.name, reason),
        }
    }
    core.pools.sweep();
    let _ = core.pools.write_journal();

    let config_models: HashMap<&str, &ModelSpec> = p
        .config_models
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut pending = Vec::new();
    let started = Instant::now();
    for rec in contents.models {
        let name = rec.name.clone();
        let pool_name = rec.pool.clone();
        let spans: Vec<(u64, u64)> = rec.tensors.iter().map(|t| (t.offset, t.len)).collect();
        let outcome = (|| {
            if let Some(spec) = config_models.get(name.as_str()) {
                let same_path = match &rec.source {
                    SourceRecord::Checkpoint { path, .. } => {
                        spec.path.canonicalize().ok().as_ref() == Some(path)
                    }
                    SourceRecord::Remote { url, .. } => spec.path.to_str() == Some(url.as_str()),
                    SourceRecord::Published => false,
                };
                if spec.pool != rec.pool || !same_path {
                    return Err(format!(
                        "models.register now declares it from {} in pool {:?}",
                        spec.path.display(),
                        spec.pool
                    ));
                }
            }
            let pool = core
                .pools
                .get(&rec.pool)
                .map_err(|_| format!("its pool {:?} was not adopted", rec.pool))?;
            core.models.adopt(&pool, rec, &spans, p.verify)
        })();
        match outcome {
            Ok(job) => {
                recovery.model_adopted(&name);
                pending.extend(job);
            }
            Err(reason) => {
                if let Err(e) = p.journal.remove_model(&name) {
                    tracing::warn!(model = %name, error = %e, "cannot remove the model from the journal");
                }
                recovery.dropped("model", &name, reason);
                // Workers of the old daemon may still read its ranges in place until they
                // learn their lease ended: nothing new goes there before the longest ttl.
                if let Ok(pool) = core.pools.get(&pool_name) {
                    if let Ok(held) = pool.claim_all(&spans) {
                        pool.quarantine(held, started);
                    }
                }
            }
        }
    }
    Adopted {
        verifications: pending,
        pins,
    }
}
