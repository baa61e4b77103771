//! The pool directory's files as files: what an earlier run left behind, and what goes at exit.

use std::path::{Path, PathBuf};

use super::{POOL_FILE_PREFIX, Pools};

impl Pools {
    /// Removes every pool and static-buffer file that no live pool owns: what a crash, or a
    /// journal that did not match, left behind. Other files in the directory are never touched.
    pub fn sweep(&self) {
        let live: Vec<PathBuf> = self.list().iter().map(|p| p.path().to_path_buf()).collect();
        let files = match stale_pool_files(&self.params.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %self.params.dir.display(), error = %e, "cannot list pool files");
                return;
            }
        };
        for stale in files.into_iter().filter(|f| !live.contains(f)) {
            match std::fs::remove_file(&stale) {
                Ok(()) => {
                    tracing::warn!(path = %stale.display(), "removed a file left by an earlier run")
                }
                Err(e) => {
                    tracing::warn!(path = %stale.display(), error = %e, "cannot remove stale pool file")
                }
            }
        }
    }

    /// Unlinks pool and static-buffer files at shutdown (`pools.keep_on_exit = false`), or only
    /// the static buffers when the pools stay for the next start: leases never survive a
    /// restart, so nothing could use those. Workers that still map a file keep their mapping
    /// until they unmap it. Returns the bytes released.
    pub fn remove_files_at_exit(&self, keep_pools: bool) -> u64 {
        let files = match stale_pool_files(&self.params.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(dir = %self.params.dir.display(), error = %e, "cannot list pool files at exit");
                return 0;
            }
        };
        let mut bytes = 0;
        let is_pool = |f: &Path| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(POOL_FILE_PREFIX))
        };
        for f in files.into_iter().filter(|f| !(keep_pools && is_pool(f))) {
            let len = std::fs::metadata(&f).map_or(0, |m| m.len());
            match std::fs::remove_file(&f) {
                Ok(()) => bytes += len,
                Err(e) => {
                    tracing::warn!(path = %f.display(), error = %e, "cannot remove pool file at exit")
                }
            }
        }
        bytes
    }
}

fn stale_pool_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = [POOL_FILE_PREFIX, super::STATIC_FILE_PREFIX];
        if ours.iter().any(|p| name.starts_with(p)) {
            out.push(entry.path());
        }
    }
    Ok(out)
}
