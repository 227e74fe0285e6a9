//! Atomic file writes: a temporary file in the same folder, flushed, then renamed over the
//! destination, so a failed save never leaves a half-written or missing file.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically. A symlink is written through (its target is
/// replaced, the link stays); an existing path that is not a regular file (a device, a FIFO,
/// a folder) is refused. Temporary files of earlier saves into the same folder whose process
/// died are removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    super::output::check_replaceable(path)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::AlreadyExists, e))?;
    let real = super::output::resolve(path);
    let path = real.as_path();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    super::output::clean_stale_temps(&dir);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename durable too (best effort: not every platform can open a folder).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn failure_keeps_old_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.bin");
        write_atomic(&p, b"old").unwrap();
        // Writing into a missing folder fails and must not touch anything else.
        let bad = d.path().join("missing").join("a.bin");
        assert!(write_atomic(&bad, b"new").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }
}
