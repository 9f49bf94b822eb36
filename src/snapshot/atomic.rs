//! Atomic file writes: a snapshot is either there whole under its name, or not at all.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::SnapshotError;

/// Removes the temporary file unless the write went through (every error path,
/// including one in the caller's `fill`).
struct Tmp(Option<PathBuf>);

impl Drop for Tmp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes `path` through `fill`: into a new temporary file in the same directory
/// (so the rename stays on one file system), fsynced, then renamed over `path`, and
/// the directory fsynced so the rename survives a crash. On any error the temporary
/// file is removed and `path` is untouched. Files are created 0600: they hold guest
/// memory and state.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut File) -> Result<(), SnapshotError>) -> Result<(), SnapshotError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let bad = |reason: &str| SnapshotError::Io {
        path: path.into(),
        op: "writing",
        err: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason.to_string()),
    };
    let name = path.file_name().ok_or_else(|| bad("not a file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp.{}.{n}", name.to_string_lossy(), std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(SnapshotError::io(&tmp, "creating"))?;
    let mut guard = Tmp(Some(tmp.clone()));
    fill(&mut file)?;
    file.sync_all().map_err(SnapshotError::io(&tmp, "fsync"))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(SnapshotError::io(path, "renaming into place"))?;
    guard.0 = None;
    File::open(dir).and_then(|d| d.sync_all()).map_err(SnapshotError::io(dir, "fsync of the directory"))
}
