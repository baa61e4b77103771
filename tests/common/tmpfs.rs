//! A tmpfs mounted for one test (root only): a small or full pools.dir, or one with huge pages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory for the test's life, unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// A tmpfs of `bytes` on `dir`; None (with the reason printed) where this process may not
    /// mount.
    pub fn mount(dir: &Path, bytes: u64, test: &str) -> Option<Self> {
        Self::mount_with(dir, bytes, "", test)
    }

    /// As [`Tmpfs::mount`], with more mount options (`huge=advise`).
    pub fn mount_with(dir: &Path, bytes: u64, options: &str, test: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let mut opts = format!("size={bytes}");
        if !options.is_empty() {
            opts = format!("{opts},{options}");
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self(dir.to_path_buf())),
            other => {
                eprintln!("SKIPPED {test}: cannot mount a tmpfs ({opts}) for pools.dir: {other:?}");
                None
            }
        }
    }

    /// Takes every byte left, as another tenant of the filesystem would.
    pub fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0xAAu8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let mut small = [0u8; 512];
        while f.write_all(&small).is_ok() {
            small[0] ^= 1;
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
