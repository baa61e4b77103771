//! A registered model: its tensor table, where its bytes live in the pool, and its state.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::core::backend::BackendConfig;
use crate::core::journal::{
    AsTensorRecord, FileStamp, Journal, JournalError, ModelRecordOut, SourceRecord, TensorRecordOut,
};
use crate::core::pool::Allocation;
use crate::core::pool::Pool;
pub use crate::core::table::{TensorEntry, contiguous_strides};

/// Lifecycle of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Loading,
    Ready,
    Failed,
    /// Published by an engine (CreateModel); waiting for SealModel.
    AwaitingSeal,
}

/// What WatchModel streams and GetModel reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub state: ModelState,
    pub loaded_bytes: u64,
    pub total_bytes: u64,
    pub error: Option<String>,
    /// How long the bytes took to load, once READY after a load from a checkpoint.
    pub load_time: Option<std::time::Duration>,
    /// FAILED because journal.required and its record could not be written: Some(true) when
    /// `pools.dir` was full, Some(false) for any other failure.
    pub journal_refused: Option<bool>,
    /// FAILED reading from object storage: what kind of failure, for the status code.
    pub remote_failure: Option<crate::core::remote::RemoteKind>,
}

impl Progress {
    pub fn is_terminal(&self) -> bool {
        matches!(self.state, ModelState::Ready | ModelState::Failed)
    }
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The canonical path the operator named, and each shard as it was when loaded.
    Checkpoint {
        path: PathBuf,
        files: Vec<FileStamp>,
    },
    Published,
    /// The URL the operator named, and each object as it was when read.
    Remote {
        url: String,
        objects: Vec<crate::core::remote::ObjectStamp>,
    },
}

#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub source: ModelSource,
    pub alloc: Allocation,
    /// Filled in as loading or sealing computes checksums. Shared (not copied) with every lease
    /// and reader once the model is READY: a 100k-row table takes milliseconds to copy and free.
    pub(in crate::core) tensors: Mutex<Arc<Vec<TensorEntry>>>,
    pub bytes: u64,
    pub(in crate::core) progress: watch::Sender<Progress>,
    /// Shared with a RegisterModel that waits for the load without holding the model.
    pub(in crate::core) cancel: Arc<AtomicBool>,
    pub(in crate::core) backend: Mutex<Option<BackendConfig>>,
    pub(in crate::core) attached: AtomicUsize,
    pub(in crate::core) last_used: Mutex<Instant>,
    /// Becomes true once no loader thread holds the model (immediately for published models).
    pub(in crate::core) load_done: watch::Receiver<bool>,
    /// Came back from the journal at this start rather than being registered in this run.
    pub adopted: bool,
    /// Made by CreateModel in this run: who may write its bytes, and until when.
    pub publication: Option<super::Publication>,
    /// Set once the scrubber found bytes that no longer match their checksum: why. Nothing is
    /// served from the model after that; leases learn it at their next KeepAlive.
    pub(in crate::core) out_of_service: std::sync::OnceLock<String>,
    /// Serializes this model's journal writes; true once its record was removed for good, so a
    /// late write (SetBackend racing UnregisterModel) cannot bring it back at the next start.
    pub(in crate::core) journal_gate: Mutex<bool>,
}

impl Model {
    pub fn pool(&self) -> &Arc<Pool> {
        self.alloc.pool()
    }

    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// The progress now and every change after it (WatchModel, a waiting RegisterModel).
    pub fn watch_progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Becomes true once no loader or verifier thread holds the model.
    pub fn load_ended(&self) -> watch::Receiver<bool> {
        self.load_done.clone()
    }

    /// Whether its load was cancelled (it was unregistered), readable without the model.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.cancel)
    }

    pub fn state(&self) -> ModelState {
        self.progress.borrow().state
    }

    pub fn attached_workers(&self) -> usize {
        self.attached.load(Ordering::Acquire)
    }

    /// Why the model was taken out of service, once it was.
    pub fn out_of_service(&self) -> Option<&str> {
        self.out_of_service.get().map(String::as_str)
    }

    pub fn touch(&self) {
        *self.last_used.lock().expect("last_used lock") = Instant::now();
    }

    pub fn last_used(&self) -> Instant {
        *self.last_used.lock().expect("last_used lock")
    }

    pub fn tensors(&self) -> Arc<Vec<TensorEntry>> {
        Arc::clone(&self.tensors.lock().expect("tensors lock"))
    }

    pub fn backend(&self) -> Option<BackendConfig> {
        self.backend.lock().expect("backend lock").clone()
    }

    /// Writes this model's record to the journal, straight from its table; does nothing (and
    /// answers `Ok`) until every tensor has a checksum.
    pub fn write_record(&self, journal: &Journal) -> Result<(), JournalError> {
        let tensors = self.tensors();
        if tensors.iter().any(|t| t.crc32c.is_none()) {
            return Ok(());
        }
        let source = match &self.source {
            ModelSource::Checkpoint { path, files } => SourceRecord::Checkpoint {
                path: path.clone(),
                files: files.clone(),
            },
            ModelSource::Published => SourceRecord::Published,
            ModelSource::Remote { url, objects } => SourceRecord::Remote {
                url: url.clone(),
                objects: objects.clone(),
            },
        };
        let backend = self.backend();
        journal.write_model(&ModelRecordOut {
            name: &self.name,
            pool: &self.pool().name,
            source: &source,
            backend: backend.as_ref(),
            tensors: &tensors,
        })
    }
}

impl AsTensorRecord for TensorEntry {
    fn record(&self) -> TensorRecordOut<'_> {
        TensorRecordOut {
            name: &self.name,
            dtype: self.dtype,
            shape: &self.shape,
            offset: self.offset,
            len: self.len,
            crc32c: self.crc32c.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn strides_are_row_major() {
        assert_eq!(super::contiguous_strides(&[4, 3, 2]), vec![6, 2, 1]);
        assert_eq!(super::contiguous_strides(&[5]), vec![1]);
        assert!(super::contiguous_strides(&[]).is_empty());
    }
}
