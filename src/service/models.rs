//! Models: registration with its background load, progress, publication, removal.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::hop::blocking;
use super::{Service, ServiceError};
use crate::core::backend::BackendConfig;
use crate::core::models::model::{Model, ModelState, Progress};
use crate::core::models::{ModelError, NewPublished, PendingLoad, RegisterRequest, wait_loaded};

impl Service {
    /// Validates and allocates on a blocking thread, then loads in the background. `render`
    /// sees the model before its load starts, so an answer without `wait` always says
    /// LOADING; with `wait` it sees the model once the load has ended, and a load that failed
    /// (or a model unregistered meanwhile) is the error instead.
    pub async fn register<R>(
        &self,
        req: RegisterRequest,
        wait: bool,
        render: impl Fn(&Model) -> R,
    ) -> Result<R, ServiceError> {
        let pending = self.prepare(req).await?;
        let model = Arc::clone(pending.model());
        let started = render(&model);
        self.spawn_load(pending);
        if !wait {
            return Ok(started);
        }
        let model = wait_ready(model).await?;
        Ok(render(&model))
    }

    /// Prepares a registration and starts its load without waiting for it: startup
    /// registration, which reports progress through WatchModel.
    pub async fn start_load(&self, req: RegisterRequest) -> Result<Arc<Model>, ServiceError> {
        let pending = self.prepare(req).await?;
        let model = Arc::clone(pending.model());
        self.spawn_load(pending);
        Ok(model)
    }

    async fn prepare(&self, req: RegisterRequest) -> Result<PendingLoad, ServiceError> {
        blocking(&self.core, move |c| {
            c.models.prepare(&c.pools, &req).map_err(ServiceError::from)
        })
        .await
    }

    fn spawn_load(&self, pending: PendingLoad) {
        let c = Arc::clone(&self.core);
        tokio::task::spawn_blocking(move || {
            let ended = c.models.load(pending);
            // Whoever waits on the load may next drop the last other handle on the core (a
            // test rebuilding one over the same directory, the daemon shutting down).
            drop(c);
            ended.signal();
        });
    }

    /// The model's progress now and every change after it.
    pub fn watch(&self, name: &str) -> Result<watch::Receiver<Progress>, ServiceError> {
        Ok(self.core.models.get(name)?.watch_progress())
    }

    /// A lookup in the registry's map: no blocking.
    pub fn model(&self, name: &str) -> Result<Arc<Model>, ServiceError> {
        Ok(self.core.models.get(name)?)
    }

    pub fn models(&self) -> Vec<Arc<Model>> {
        self.core.models.list()
    }

    /// Renders a model on a blocking thread: a page of a large table takes milliseconds to
    /// build and encode, and every other call would wait behind it on the runtime.
    pub async fn render_model<R, E>(
        &self,
        name: String,
        render: impl FnOnce(&Arc<Model>) -> Result<R, E> + Send + 'static,
    ) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<ServiceError> + Send + 'static,
    {
        blocking(&self.core, move |c| {
            let model = c.models.get(&name).map_err(|e| E::from(e.into()))?;
            render(&model)
        })
        .await
    }

    /// Removes a model, refused while workers are attached. A load in progress is cancelled
    /// and waited for, so the pool's bytes are back when this returns.
    pub async fn unregister(&self, name: String) -> Result<Arc<Model>, ServiceError> {
        let model = blocking(&self.core, move |c| {
            c.models.unregister(&name).map_err(ServiceError::from)
        })
        .await?;
        wait_loaded(&model).await;
        Ok(model)
    }

    /// Off the runtime: it rewrites the model's journal record, its whole tensor table.
    pub async fn set_backend(
        &self,
        name: String,
        backend: BackendConfig,
    ) -> Result<Arc<Model>, ServiceError> {
        blocking(&self.core, move |c| {
            c.models
                .set_backend(&name, backend)
                .map_err(ServiceError::from)
        })
        .await
    }

    /// Allocates a publication and renders it with the one copy of its publish token the
    /// daemon ever hands out, on the blocking thread (the first page of a large table).
    pub async fn create_published<R: Send + 'static>(
        &self,
        req: NewPublished,
        render: impl FnOnce(&Model, &str) -> R + Send + 'static,
    ) -> Result<R, ServiceError> {
        blocking(&self.core, move |c| {
            let model = c.models.create_published(&c.pools, &req)?;
            let token = model.publication.as_ref().map(|p| p.token().to_string());
            Ok(render(&model, token.as_deref().unwrap_or_default()))
        })
        .await
    }

    /// Puts one message's bytes (a copy of up to 16 MiB) into a publication.
    pub async fn write_published(
        &self,
        name: String,
        token: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), ServiceError> {
        blocking(&self.core, move |c| {
            c.models
                .write_published(&name, &token, offset, &data)
                .map_err(ServiceError::from)
        })
        .await
    }

    /// Closes a publication, then checksums it.
    pub async fn seal(&self, name: String, token: String) -> Result<Arc<Model>, ServiceError> {
        blocking(&self.core, move |c| {
            c.models.seal(&name, &token).map_err(ServiceError::from)
        })
        .await
    }
}

/// Waits for a load without holding the model: its ranges go back to the pool with the last
/// holder, and an UnregisterModel during the load must find them freed when it returns, not
/// when this waiter next gets to run.
async fn wait_ready(model: Arc<Model>) -> Result<Arc<Model>, ServiceError> {
    let (mut done, progress) = (model.load_ended(), model.watch_progress());
    let (name, cancel) = (model.name.clone(), model.cancel_flag());
    // Dropped, not shadowed: a shadowed Arc would live in this future until it ends.
    let weak = Arc::downgrade(&model);
    drop(model);
    let _ = done.wait_for(|done| *done).await;
    let p = progress.borrow().clone();
    if p.state == ModelState::Failed {
        return Err(if let Some(no_space) = p.journal_refused {
            ModelError::NotDurable {
                why: p.error.unwrap_or_default(),
                no_space,
            }
        } else if cancel.load(Ordering::Relaxed) {
            ModelError::Cancelled(name)
        } else {
            ModelError::LoadFailed {
                name,
                why: p.error.unwrap_or_default(),
                remote: p.remote_failure,
            }
        }
        .into());
    }
    // READY, then unregistered before this answer: the registration did not last.
    Ok(weak.upgrade().ok_or(ModelError::Cancelled(name))?)
}
