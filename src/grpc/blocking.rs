//! Running blocking core work (page faults, mlock, file reads, driver calls) off the async
//! runtime, for every handler that needs it.

use std::sync::Arc;

use tonic::Status;

use super::status::join_error;
use crate::core::Core;

/// Runs `f` on a blocking thread; its error and a panic alike become a gRPC status.
pub async fn blocking<T, E>(
    core: &Arc<Core>,
    f: impl FnOnce(&Core) -> Result<T, E> + Send + 'static,
) -> Result<T, Status>
where
    T: Send + 'static,
    E: Into<Status> + Send + 'static,
{
    let core = Arc::clone(core);
    tokio::task::spawn_blocking(move || f(&core))
        .await
        .map_err(join_error)?
        .map_err(Into::into)
}

/// As [`blocking`], for work that grants something only its caller can use or give back (a
/// lease, whose id only the answer carries). The server drops a call whose caller went away
/// (its deadline, a cancel, its connection), possibly while `f` still runs; what `f` then
/// made is handed to `undo` on the same thread instead of being left behind.
pub async fn blocking_or_undo<T, E>(
    core: &Arc<Core>,
    f: impl FnOnce(&Core) -> Result<T, E> + Send + 'static,
    undo: impl FnOnce(&Core, T) + Send + 'static,
) -> Result<T, Status>
where
    T: Send + 'static,
    E: Into<Status> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let core = Arc::clone(core);
    let task = tokio::task::spawn_blocking(move || {
        if let Err(Ok(made)) = tx.send(f(&core)) {
            undo(&core, made);
        }
    });
    match rx.await {
        Ok(made) => made.map_err(Into::into),
        // Gone without sending: `f` panicked.
        Err(_) => Err(match task.await {
            Err(e) => join_error(e),
            Ok(()) => Status::internal("internal task ended without an answer"),
        }),
    }
}
