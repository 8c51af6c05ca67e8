//! Files that survive a crash, shared by the cache, training checkpoints and
//! datasets: atomic writes (temporary sibling, fsync, rename), flushing
//! directory entries, sorted listings, and the fault-injection points
//! ([`fault`]) the crash tests abort or pause at.

pub mod fault;

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// All files below `dir`, as sorted '/'-separated relative paths.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
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
        let mut f = File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("cannot flush {} to disk", tmp.display()))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Flushes a file to disk; an error (EIO: the data may be lost) stops the
/// publication that needed it.
pub fn sync_file(p: &Path) -> Result<()> {
    File::open(p)?.sync_all().with_context(|| format!("cannot flush {} to disk", p.display()))
}

/// Flushes a directory's entries (a rename) to disk. Filesystems that cannot
/// sync directories (EINVAL, ENOTSUP), and platforms that cannot open one,
/// are skipped; any other error is returned.
pub fn sync_dir(p: &Path) -> Result<()> {
    let Ok(d) = File::open(p) else { return Ok(()) };
    match d.sync_all() {
        Err(e) if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTSUP)) => {
            Err(e).with_context(|| format!("cannot flush directory {} to disk", p.display()))
        }
        _ => Ok(()),
    }
}
