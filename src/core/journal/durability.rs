//! What did not reach the journal in this run. A failed write leaves the model or pool served
//! but not surviving a restart; callers learn it in their answer, GetInfo and metrics, instead
//! of from a log line, and `journal.required` turns it into a refusal.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::JournalError;

#[derive(Debug, Default)]
pub struct Durability {
    failures: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<String>,
    /// Why the pools file is stale, when its last write failed: no pool is then durable.
    pools: Option<String>,
    /// Models whose own record failed, with why.
    models: BTreeMap<String, String>,
}

impl Durability {
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn last_failure(&self) -> Option<String> {
        self.lock().last.clone()
    }

    /// Why no pool would survive a restart now; None when the pools file is current.
    pub fn pools(&self) -> Option<String> {
        self.lock().pools.clone()
    }

    /// Why this model would not survive a restart (its record, or its pool's); None when it
    /// would.
    pub fn model(&self, name: &str) -> Option<String> {
        let s = self.lock();
        s.models.get(name).or(s.pools.as_ref()).cloned()
    }

    /// The models whose records failed, by name.
    pub fn models(&self) -> Vec<String> {
        self.lock().models.keys().cloned().collect()
    }

    pub(super) fn pools_written(&self, result: Result<(), String>) {
        let mut s = self.lock();
        s.pools = self.outcome(&mut s.last, result);
    }

    pub(super) fn model_written(&self, name: &str, result: Result<(), String>) {
        let mut s = self.lock();
        match self.outcome(&mut s.last, result) {
            Some(why) => s.models.insert(name.to_string(), why),
            None => s.models.remove(name),
        };
    }

    /// The model's record is gone for good (unregistered): nothing of it to report.
    pub(super) fn model_removed(&self, name: &str) {
        self.lock().models.remove(name);
    }

    fn outcome(&self, last: &mut Option<String>, result: Result<(), String>) -> Option<String> {
        let why = result.err()?;
        self.failures.fetch_add(1, Ordering::Relaxed);
        *last = Some(why.clone());
        Some(why)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("durability lock")
    }
}

/// A failed write as the operator needs it: the error, and the filesystem's free bytes when it
/// ran out of them.
pub fn describe(e: &JournalError, dir: &Path) -> String {
    match free_bytes(dir) {
        Some((free, total)) if no_space(e) => {
            format!("{e}; {} has {free} of {total} bytes free", dir.display())
        }
        _ => e.to_string(),
    }
}

/// Whether the write failed for want of space (ENOSPC, or EDQUOT under a quota).
pub fn no_space(e: &JournalError) -> bool {
    let JournalError::Io { source, .. } = e else {
        return false;
    };
    let code = source.raw_os_error();
    code == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || code == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

/// Available and total bytes of the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Option<(u64, u64)> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some((s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize))
}
