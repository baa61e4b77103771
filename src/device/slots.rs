//! The right to write one static slot. A lease's onloads come from several threads at once (up
//! to 8 fast-path connections, each on a thread of its own, and gRPC calls on blocking threads),
//! so the rule "a slot has one writer at a time" is a lock, and the copy functions take its
//! guard: a copy into a slot cannot be written without holding it.

use std::sync::{Mutex, MutexGuard};

/// One lock per slot of a lease's static buffers.
#[derive(Debug, Default)]
pub struct SlotLocks(Vec<Mutex<()>>);

impl SlotLocks {
    pub fn new(slots: usize) -> Self {
        Self((0..slots).map(|_| Mutex::new(())).collect())
    }

    /// Waits for `slot` and holds it until the returned guard is dropped. None when the lease
    /// has no such slot.
    pub fn lock(&self, slot: usize) -> Option<SlotWrite<'_>> {
        let lock = self.0.get(slot)?;
        // A copy that panicked leaves bytes the next onload overwrites whole; the lock itself
        // guards no other state, so poisoning carries no meaning here.
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        Some(SlotWrite {
            slot,
            _guard: guard,
        })
    }
}

/// Held while one copy writes one slot.
#[derive(Debug)]
pub struct SlotWrite<'a> {
    slot: usize,
    _guard: MutexGuard<'a, ()>,
}

impl SlotWrite<'_> {
    pub fn slot(&self) -> usize {
        self.slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_per_slot_and_slots_are_independent() {
        let locks = SlotLocks::new(2);
        let a = locks.lock(0).unwrap();
        assert_eq!(a.slot(), 0);
        // Another slot is free while slot 0 is held.
        assert_eq!(locks.lock(1).unwrap().slot(), 1);
        // Slot 0 is not: a second writer would block.
        assert!(locks.0[0].try_lock().is_err());
        drop(a);
        assert!(locks.0[0].try_lock().is_ok());
        assert!(locks.lock(2).is_none());
    }
}
