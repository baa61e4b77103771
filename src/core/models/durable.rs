//! Models in the journal: recording a READY model, forgetting one for good, and taking one out
//! of service. Bringing them back at the next start is `core::recovery`'s.

use crate::core::models::model::{Model, ModelState};

use super::registry::Models;

/// A model refused under journal.required because its record could not be written.
#[derive(Debug)]
pub struct Refused {
    /// pools.dir was full (RESOURCE_EXHAUSTED rather than FAILED_PRECONDITION).
    pub no_space: bool,
    pub why: String,
}

impl Models {
    /// Records a READY model. A failure is logged and reported (the model's `durable`,
    /// GetInfo, metrics); the model keeps serving and is simply not adopted after a restart.
    /// Under journal.required the failure is returned instead, for the caller to refuse.
    pub(super) fn journal_write(&self, model: &Model) -> Result<(), Refused> {
        let gate = model.journal_gate.lock().expect("journal gate");
        if *gate {
            return Ok(());
        }
        let journal = &self.params.journal;
        let Err(e) = model.write_record(journal) else {
            return Ok(());
        };
        let why = journal.describe(&e);
        if journal.required() {
            drop(gate);
            self.journal_forget(model);
            return Err(Refused {
                no_space: crate::core::journal::no_space(&e),
                why: format!(
                    "journal.required: the record of model {:?} cannot be written, so it would not survive a restart: {why}; free space in pools.dir or unset journal.required",
                    model.name
                ),
            });
        }
        tracing::error!(model = %model.name, error = %why, "cannot write the journal; this model will not survive a restart");
        Ok(())
    }

    /// Takes a READY model whose bytes no longer match its table out of service: FAILED with
    /// the reason (GetModel, WatchModel, metrics), no new lease or onload, and no record for
    /// the next start to adopt. It stays listed, so operators see why, until unregistered.
    pub fn take_out_of_service(&self, model: &Model, why: String) {
        if model.out_of_service.set(why.clone()).is_err() {
            return;
        }
        tracing::error!(model = %model.name, pool = %model.pool().name, reason = %why, "model taken out of service");
        self.journal_forget(model);
        model.progress.send_modify(|p| {
            p.state = ModelState::Failed;
            p.error = Some(format!("out of service: {why}"));
        });
    }

    /// Removes a model's record for good: it is being unregistered, evicted or dropped.
    pub(in crate::core) fn journal_forget(&self, model: &Model) {
        let mut gate = model.journal_gate.lock().expect("journal gate");
        *gate = true;
        if let Err(e) = self.params.journal.remove_model(&model.name) {
            tracing::error!(model = %model.name, error = %e, "cannot remove the model from the journal");
        }
    }
}
