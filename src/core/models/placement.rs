//! Placing a model in its pool: every tensor's range, all or nothing, making room by evicting
//! idle models of the same pool when `models.evict_idle` allows it.

use std::sync::Arc;

use super::ModelError;
use super::model::{Model, ModelState, TensorEntry};
use super::registry::Models;
use crate::core::alloc::{AllocError, MIN_ALIGN};
use crate::core::pool::{Allocation, Pool};

impl Models {
    /// Allocates every tensor's range, all or nothing; evicts idle models of the same pool, least
    /// recently used first, when allowed and needed.
    pub(super) fn allocate(
        &self,
        pool: &Arc<Pool>,
        model: &str,
        tensors: &[TensorEntry],
    ) -> Result<Allocation, ModelError> {
        let lens: Vec<u64> = tensors.iter().map(|t| t.len).collect();
        loop {
            match pool.alloc_all(&lens, MIN_ALIGN) {
                Ok(alloc) => return Ok(alloc),
                Err(AllocError::Exhausted { free, largest, .. }) => {
                    if self.params.evict_idle
                        && let Some(victim) = self.evict_one(pool)
                    {
                        // Its ranges return when the last reference drops. If a call still
                        // holds one, evicting the next model would not make room for this one
                        // either, and one held reference would empty the pool: stop here.
                        let name = victim.name.clone();
                        if Arc::into_inner(victim).is_some() {
                            continue;
                        }
                        return Err(ModelError::EvictionPending {
                            pool: pool.name.clone(),
                            model: model.to_string(),
                            evicted: name,
                        });
                    }
                    let needed = lens
                        .iter()
                        .map(|&l| l.max(1).div_ceil(MIN_ALIGN) * MIN_ALIGN)
                        .sum();
                    return Err(ModelError::PoolFull {
                        pool: pool.name.clone(),
                        model: model.to_string(),
                        needed,
                        free,
                        largest,
                        size: pool.size_bytes,
                    });
                }
                Err(e) => return Err(ModelError::Alloc(e)),
            }
        }
    }

    /// Evicts the least recently used idle READY model in `pool`; returns it, or None if there
    /// is none.
    fn evict_one(&self, pool: &Arc<Pool>) -> Option<Arc<Model>> {
        let victim = {
            let mut map = self.lock();
            let victim = map
                .values()
                .filter(|m| {
                    Arc::ptr_eq(m.pool(), pool)
                        && m.state() == ModelState::Ready
                        && m.attached_workers() == 0
                })
                .min_by_key(|m| m.last_used())
                .map(|m| m.name.clone());
            victim.and_then(|name| map.remove(&name))
        };
        if let Some(m) = &victim {
            self.journal_forget(m);
            tracing::info!(model = %m.name, pool = %pool.name, bytes = m.bytes, "evicted idle model to make room");
        }
        victim
    }
}
