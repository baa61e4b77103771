//! Pools: create, look up, list and delete, each on a blocking thread (mapping, pinning and
//! unpinning fault pages and may call the driver).

use std::sync::Arc;

use super::hop::blocking;
use super::{Service, ServiceError};
use crate::core::pool::Pool;
use crate::core::pools::NewPool;

/// A pool with what only a driver call can tell: how much of it the device has registered.
/// Taken on a blocking thread, so rendering it is pure.
#[derive(Debug, Clone)]
pub struct PoolView {
    pub pool: Arc<Pool>,
    pub registered_bytes: u64,
}

impl PoolView {
    /// Blocking: asks the pool's device (a driver call for cuda).
    fn of(pool: Arc<Pool>) -> Self {
        let registered_bytes = pool.device.registered_bytes(pool.region()).unwrap_or(0);
        Self {
            pool,
            registered_bytes,
        }
    }
}

impl Service {
    pub async fn create_pool(&self, req: NewPool) -> Result<PoolView, ServiceError> {
        blocking(&self.core, move |c| {
            Ok(PoolView::of(
                c.pools.create(&req).map_err(ServiceError::from)?,
            ))
        })
        .await
    }

    pub async fn pool(&self, name: String) -> Result<PoolView, ServiceError> {
        blocking(&self.core, move |c| {
            Ok(PoolView::of(
                c.pools.get(&name).map_err(ServiceError::from)?,
            ))
        })
        .await
    }

    pub async fn pools(&self) -> Result<Vec<PoolView>, ServiceError> {
        blocking(&self.core, |c| {
            Ok(c.pools.list().into_iter().map(PoolView::of).collect())
        })
        .await
    }

    /// Deletes an idle pool and renders its last view with `render`, on the blocking thread
    /// where the last reference goes: dropping the pool unpins (possibly a driver call) and
    /// unmaps.
    pub async fn delete_pool<R: Send + 'static>(
        &self,
        name: String,
        render: impl FnOnce(&PoolView) -> R + Send + 'static,
    ) -> Result<R, ServiceError> {
        blocking(&self.core, move |c| {
            let view = PoolView::of(c.pools.delete(&name).map_err(ServiceError::from)?);
            let reply = render(&view);
            drop(view);
            Ok(reply)
        })
        .await
    }
}
