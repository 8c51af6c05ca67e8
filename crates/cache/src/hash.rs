//! Content hashes of files outside the cache, with a memo so large files
//! (model weights) are not re-read on every `plan`.
//!
//! The memo maps (canonical path, size, mtime) to the blake3 of the content.
//! It is an optimization only: a stale or missing memo entry just means the
//! file is hashed again. Keys always use the content hash.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::UNIX_EPOCH;

use pipeline_fs::IoContext;

use pipeline_fs::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct MemoEntry {
    size: u64,
    mtime_ns: u128,
    blake3: String,
}

/// A persistent memo of file content hashes (`.pipeline/hashes.json`).
#[derive(Debug)]
pub struct HashMemo {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, MemoEntry>>,
    dirty: AtomicBool,
}

impl HashMemo {
    /// A memo persisted at `path` (loaded now, saved by [`HashMemo::save`]).
    pub fn open(path: PathBuf) -> Self {
        let entries = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        HashMemo { path: Some(path), entries: Mutex::new(entries), dirty: AtomicBool::new(false) }
    }

    /// The blake3 hex digest of the file's content.
    pub fn file(&self, path: &Path) -> Result<String> {
        let meta = std::fs::metadata(path).on("read", path)?;
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let id = canon.to_string_lossy().into_owned();
        let mtime_ns = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        if let Some(e) = self.entries.lock().unwrap().get(&id) {
            if e.size == meta.len() && e.mtime_ns == mtime_ns && mtime_ns != 0 {
                return Ok(e.blake3.clone());
            }
        }
        let digest = hash_file(path)?;
        self.entries.lock().unwrap().insert(id, MemoEntry { size: meta.len(), mtime_ns, blake3: digest.clone() });
        self.dirty.store(true, Ordering::Relaxed);
        Ok(digest)
    }

    /// Writes the memo back (atomically) if anything was added.
    pub fn save(&self) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.load(Ordering::Relaxed) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&*self.entries.lock().unwrap()).expect("serializes");
        Ok(pipeline_fs::write_atomic(path, &bytes)?)
    }
}

/// blake3 of a file's content, streamed.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).on("open", path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).on("read", path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}
