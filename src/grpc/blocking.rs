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
