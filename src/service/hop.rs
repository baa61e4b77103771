//! The one hop from the async runtime to a blocking thread. Page faults, mlock, file reads,
//! journal writes and driver calls all take it here, so no caller of the service can stall the
//! runtime by calling the core inline.

use std::sync::Arc;

use super::ServiceError;
use crate::core::Core;

/// Runs `f` on a blocking thread; its error and a panic alike come back as the caller's error.
pub(super) async fn blocking<T, E>(
    core: &Arc<Core>,
    f: impl FnOnce(&Core) -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<ServiceError> + Send + 'static,
{
    let core = Arc::clone(core);
    tokio::task::spawn_blocking(move || f(&core))
        .await
        .map_err(|e| E::from(e.into()))?
}

/// As [`blocking`], for work that grants something only its caller can use or give back (a
/// lease, whose id only the answer carries). A caller that went away (its deadline, a cancel,
/// its connection) drops this future, possibly while `f` still runs; what `f` then made is
/// handed to `undo` on the same thread instead of being left behind.
pub(super) async fn blocking_or_undo<T, E>(
    core: &Arc<Core>,
    f: impl FnOnce(&Core) -> Result<T, E> + Send + 'static,
    undo: impl FnOnce(&Core, T) + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<ServiceError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let core = Arc::clone(core);
    let task = tokio::task::spawn_blocking(move || {
        let made = f(&core);
        // The caller may drop its last handle on the core as soon as it has the answer.
        let weak = Arc::downgrade(&core);
        drop(core);
        if let Err(Ok(made)) = tx.send(made) {
            // A core already gone took what `f` made with it.
            if let Some(core) = weak.upgrade() {
                undo(&core, made);
            }
        }
    });
    match rx.await {
        Ok(made) => made,
        // Gone without sending: `f` panicked.
        Err(_) => Err(E::from(match task.await {
            Err(e) => e.into(),
            Ok(()) => ServiceError::Task("ended without an answer".into()),
        })),
    }
}
