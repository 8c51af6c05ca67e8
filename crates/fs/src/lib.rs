//! Files that survive a crash, shared by the cache, training checkpoints and
//! datasets: atomic writes (temporary sibling, fsync, rename), flushing
//! directory entries, sorted listings, and the fault-injection points
//! ([`fault`]) the crash tests abort or pause at.

pub mod fault;

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// A file operation that failed, with the path it failed on.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct Error {
    /// What was being done: `write`, `list`, `flush … to disk`.
    pub action: &'static str,
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the action and path to an I/O error:
/// `fs::read(p).on("read", p)?`.
pub trait IoContext<T> {
    fn on(self, action: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn on(self, action: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error { action, path: path.to_path_buf(), source })
    }
}

/// All files below `dir`, as sorted '/'-separated relative paths.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in fs::read_dir(dir).on("list", dir)? {
            let e = e.on("list", dir)?;
            let p = e.path();
            if e.file_type().on("list", &p)?.is_dir() {
                walk(base, &p, out)?;
            } else {
                let rel = p.strip_prefix(base).expect("below base");
                out.push(rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Writes a file atomically: a temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp-{}",
        path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    {
        let mut f = File::create(&tmp).on("write", &tmp)?;
        f.write_all(bytes).on("write", &tmp)?;
        f.sync_all().on("flush to disk", &tmp)?;
    }
    fs::rename(&tmp, path).on("write", path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Flushes a file to disk; an error (EIO: the data may be lost) stops the
/// publication that needed it. (Windows flushes only a file opened for
/// writing: `FlushFileBuffers` refuses a read-only handle.)
pub fn sync_file(p: &Path) -> Result<()> {
    let file = if cfg!(windows) { File::options().write(true).open(p) } else { File::open(p) };
    file.and_then(|f| f.sync_all()).on("flush to disk", p)
}

/// Flushes a directory's entries (a rename) to disk. Filesystems that cannot
/// sync directories (EINVAL, ENOTSUP), and platforms that cannot open one,
/// are skipped; any other error is returned.
pub fn sync_dir(p: &Path) -> Result<()> {
    let Ok(d) = File::open(p) else { return Ok(()) };
    match d.sync_all() {
        Err(e) if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) => {
            Err(e).on("flush to disk the directory", p)
        }
        _ => Ok(()),
    }
}
