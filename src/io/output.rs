//! Output paths that cannot destroy anything: checked before a command does its work.
//!
//! - Anything that exists and is not a regular file (a device node, a FIFO, a socket, a folder)
//!   is refused; a symlink to a regular file (or to a path that does not exist yet) is written
//!   through, so the link stays a link.
//! - An output that is one of the command's inputs is refused (e.g. `import RUN --out
//!   RUN/model_10000.pth`).
//! - An existing result is replaced only with `--force`.
//! - The folder must be writable, checked with a probe file before training starts.
//! - While a command writes an output it holds an exclusive lock on it (a `.NAME.lock` file
//!   beside it, `flock`ed), so two runs cannot both "succeed" on one file.

use std::fs::File;
use std::path::{Path, PathBuf};

/// The file an output path really names: a symlink resolves to its target (also when the
/// target does not exist yet); anything else is the path itself.
pub fn resolve(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&p) {
                Ok(t) => {
                    p = if t.is_absolute() {
                        t
                    } else {
                        p.parent().unwrap_or(Path::new(".")).join(t)
                    }
                }
                Err(_) => return p,
            },
            _ => return p,
        }
    }
    p
}

/// Refuses an output path that exists and is not a regular file (after following symlinks).
pub fn check_replaceable(path: &Path) -> Result<(), String> {
    let real = resolve(path);
    match std::fs::symlink_metadata(&real) {
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "{}: symlink loop or unreadable link; refusing to write",
            path.display()
        )),
        Ok(m) if !m.is_file() => Err(format!(
            "{}: exists and is not a regular file ({}); refusing to replace it",
            path.display(),
            kind_of(&m)
        )),
        _ => Ok(()),
    }
}

fn kind_of(m: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = m.file_type();
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if m.is_dir() { "a folder" } else { "not a file" }
}

/// True when `a` and `b` name the same existing file (same device and inode), or the same
/// canonical path.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// An output that passed every check, with its lock held until dropped.
#[derive(Debug)]
pub struct Output {
    /// The path as given (messages use it).
    pub path: PathBuf,
    lock: Option<(File, PathBuf)>,
}

/// What the output may overwrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// Refuse an existing file (unless `--force`).
    Never,
    /// Replace an existing file (`--force`, or a documented in-place update).
    Allowed,
}

/// Checks `path` as the output of a command reading `inputs` and locks it; creates its folder.
pub fn prepare(path: &Path, inputs: &[&Path], replace: Replace) -> anyhow::Result<Output> {
    let shown = path.display();
    check_replaceable(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let real = resolve(path);
    for inp in inputs {
        if same_file(&real, inp) || path_inside_run(&real, inp) {
            anyhow::bail!(
                "{shown}: is one of this command's inputs ({}); choose another output",
                inp.display()
            );
        }
    }
    if real.exists() && replace == Replace::Never {
        anyhow::bail!("{shown}: exists; pass --force to replace it");
    }
    let dir = match real.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create folder: {e}", dir.display()))?;
    }
    if !dir.is_dir() {
        anyhow::bail!("{}: is not a folder", dir.display());
    }
    let name = real
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{shown}: not a file name"))?
        .to_string_lossy()
        .into_owned();
    // Writable? A probe file in the folder, removed at once.
    let probe = dir.join(format!(".{name}.probe-{}", std::process::id()));
    File::create(&probe)
        .map_err(|e| anyhow::anyhow!("{}: cannot write into this folder: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    let lock =
        lock(&dir.join(format!(".{name}.lock"))).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
    Ok(Output {
        path: path.to_path_buf(),
        lock,
    })
}

/// An output inside a reference run folder given as input would be a file of that run.
fn path_inside_run(out: &Path, inp: &Path) -> bool {
    inp.is_dir()
        && out.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.ends_with(".pth") || n.ends_with(".yaml") || n == "metrics.jsonl"
        })
        && out.parent().is_some_and(|p| {
            same_file(p, inp) || (p.as_os_str().is_empty() && same_file(Path::new("."), inp))
        })
}

#[cfg(unix)]
fn lock(path: &Path) -> Result<Option<(File, PathBuf)>, String> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    for _ in 0..10 {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("cannot create lock file {}: {e}", path.display()))?;
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err("another spdlab process is writing this file (it holds the lock); wait for it or choose another output".into());
        }
        // The file may have been removed by the previous holder between open and flock:
        // then our lock is on an orphan; try again.
        match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev() => {
                return Ok(Some((f, path.to_path_buf())));
            }
            _ => continue,
        }
    }
    Err(format!("cannot lock {}", path.display()))
}

#[cfg(not(unix))]
fn lock(_path: &Path) -> Result<Option<(File, PathBuf)>, String> {
    Ok(None)
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some((f, p)) = self.lock.take() {
            // Remove while still holding the lock, so a waiter re-checks the inode.
            let _ = std::fs::remove_file(&p);
            drop(f);
        }
    }
}

/// Removes `.NAME.tmp-PID` files in `dir` left by saves whose process no longer exists.
pub fn clean_stale_temps(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_temp_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The PID of a `.NAME.tmp-PID` file name.
fn stale_temp_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, pid) = name.rsplit_once(".tmp-")?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_pid: u32) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        assert_eq!(stale_temp_pid(".run.spdlab.tmp-123"), Some(123));
        assert_eq!(stale_temp_pid("run.spdlab.tmp-123"), None);
        assert_eq!(stale_temp_pid(".run.spdlab.tmp-"), None);
        assert_eq!(stale_temp_pid(".run.tmp-12x"), None);
    }

    #[test]
    fn refuses_existing_inputs_and_non_files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.spdlab");
        std::fs::write(&f, b"x").unwrap();
        let e = prepare(&f, &[], Replace::Never).unwrap_err().to_string();
        assert!(e.contains("exists; pass --force"), "{e}");
        let e = prepare(&f, &[&f], Replace::Allowed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is one of this command's inputs"), "{e}");
        let e = prepare(d.path(), &[], Replace::Allowed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file (a folder)"), "{e}");
        // A second writer is refused while the first holds the lock; afterwards it may.
        let o = d.path().join("b.spdlab");
        let held = prepare(&o, &[], Replace::Never).unwrap();
        let e = prepare(&o, &[], Replace::Never).unwrap_err().to_string();
        assert!(e.contains("another spdlab process"), "{e}");
        drop(held);
        prepare(&o, &[], Replace::Never).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_resolve_to_their_target() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("real.spdlab");
        let link = d.path().join("link.spdlab");
        std::os::unix::fs::symlink("real.spdlab", &link).unwrap();
        assert_eq!(resolve(&link), target);
        check_replaceable(&link).unwrap();
        let dev = d.path().join("null");
        std::os::unix::fs::symlink("/dev/null", &dev).unwrap();
        assert!(check_replaceable(&dev).unwrap_err().contains("a device"));
    }
}
