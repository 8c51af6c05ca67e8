//! The on-disk cache: where stages run and where finished stages live.
//!
//! ```text
//! .pipeline/
//!   store/<key>/          finished entries: outputs + manifest.json (immutable)
//!   work/<key>/           a stage in progress: out/ (its outputs so far),
//!                         fingerprint.json, and whatever it keeps to resume
//!                         (checkpoints); survives interruption
//!   locks/<key>.lock      one writer per key (OS file locks)
//!   refs/<recipe>/<stage> the key each recipe's stage last resolved to
//!                         (only used to explain what changed)
//!   trash/                entries being deleted by `gc`
//!   hashes.json           content-hash memo for outside files
//! ```
//!
//! Invariants:
//! - An entry appears in `store/` only by an atomic rename of a complete
//!   directory whose `manifest.json` was written last. A crash at any moment
//!   leaves either no entry or a complete one.
//! - Entries are never modified after publication; `gc` removes them by
//!   renaming them into `trash/` first.
//! - Only the holder of `locks/<key>.lock` writes `work/<key>` or publishes
//!   `store/<key>`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use pipeline_fs::IoContext;
use serde::{Deserialize, Serialize};

use super::hash::hash_file;
use super::key::{CacheKey, Fingerprint};
pub use pipeline_fs::{list_files, sync_dir, sync_file, write_atomic};

/// What can go wrong with the local store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] pipeline_fs::Error),
    #[error("corrupt manifest {}", path.display())]
    CorruptManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A finished entry is never modified (two writers without the lock).
    #[error("refusing to overwrite the finished entry {}", .0.display())]
    Exists(PathBuf),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Version of the manifest layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// `manifest.json` of a finished entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub key: CacheKey,
    pub kind: String,
    /// Everything the key was computed from (params, input keys, outside
    /// content hashes).
    pub fingerprint: Fingerprint,
    /// Every output file, relative to the entry, with its size and blake3.
    pub files: Vec<FileEntry>,
    /// Seconds since the Unix epoch when the stage started.
    pub started_at: u64,
    pub duration_s: f64,
    pub pipeline_version: String,
    /// What the stage measured: row counts, length statistics, losses…
    pub metrics: serde_json::Value,
}

impl Manifest {
    /// The manifest of the finished entry in directory `entry`: the one
    /// reader of `manifest.json`.
    pub fn read(entry: &Path) -> Result<Manifest> {
        let path = entry.join("manifest.json");
        let bytes = fs::read(&path).on("read", &path)?;
        serde_json::from_slice(&bytes).map_err(|source| Error::CorruptManifest { path, source })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// The cache rooted at a directory (default `.pipeline`).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for d in ["store", "work", "locks", "refs", "trash"] {
            fs::create_dir_all(root.join(d)).on("create the cache directory", &root.join(d))?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a finished entry (it may not exist).
    pub fn entry_dir(&self, key: &CacheKey) -> PathBuf {
        self.root.join("store").join(key.as_str())
    }

    /// The work directory of a stage in progress (it may not exist).
    pub fn work_dir(&self, key: &CacheKey) -> PathBuf {
        self.root.join("work").join(key.as_str())
    }

    /// Whether a finished entry exists for `key`.
    pub fn is_finished(&self, key: &CacheKey) -> bool {
        self.entry_dir(key).join("manifest.json").is_file()
    }

    /// The manifest of a finished entry.
    pub fn manifest(&self, key: &CacheKey) -> Result<Option<Manifest>> {
        let path = self.entry_dir(key).join("manifest.json");
        match fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).map_err(|source| Error::CorruptManifest { path, source })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).on("read", &path)?,
        }
    }

    /// The fingerprint a key was computed from, from the finished entry or,
    /// failing that, an unfinished work dir.
    pub fn fingerprint(&self, key: &CacheKey) -> Option<Fingerprint> {
        if let Ok(Some(m)) = self.manifest(key) {
            return Some(m.fingerprint);
        }
        let bytes = fs::read(self.work_dir(key).join("fingerprint.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Takes the writer lock for `key`, waiting for another process that
    /// holds it. `on_wait` is called once if we have to wait.
    pub fn lock(&self, key: &CacheKey, on_wait: impl FnOnce()) -> Result<KeyLock> {
        let path = self.root.join("locks").join(format!("{}.lock", key.as_str()));
        let file =
            File::options().create(true).truncate(false).write(true).open(&path).on("open the lock file", &path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                on_wait();
                file.lock().on("lock", &path)?;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).on("lock", &path)?;
            }
        }
        Ok(KeyLock { _file: file })
    }

    /// Like [`Store::lock`] but gives up at once if another process holds it.
    pub fn try_lock(&self, key: &CacheKey) -> Result<Option<KeyLock>> {
        let path = self.root.join("locks").join(format!("{}.lock", key.as_str()));
        let file =
            File::options().create(true).truncate(false).write(true).open(&path).on("open the lock file", &path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(KeyLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e).on("lock", &path)?,
        }
    }

    /// Prepares `work/<key>` for a run: records the fingerprint and gives an
    /// empty `out/` (a previous attempt's partial outputs are discarded; what
    /// a stage keeps to resume lives beside `out/` and is kept).
    pub fn prepare_work(&self, key: &CacheKey, fingerprint: &Fingerprint, _lock: &KeyLock) -> Result<PathBuf> {
        let work = self.work_dir(key);
        let out = work.join("out");
        if out.exists() {
            fs::remove_dir_all(&out).on("clear", &out)?;
        }
        fs::create_dir_all(&out).on("create", &out)?;
        write_atomic(&work.join("fingerprint.json"), &serde_json::to_vec_pretty(fingerprint).expect("serializes"))?;
        Ok(work)
    }

    /// Publishes `work/<key>/out` as `store/<key>`: hashes every file, writes
    /// `manifest.json` last, syncs, and renames the directory into place.
    /// Then removes the rest of the work dir (checkpoints are no longer
    /// needed once the result is final).
    pub fn publish(&self, key: &CacheKey, mut manifest: Manifest, _lock: &KeyLock) -> Result<PathBuf> {
        let work = self.work_dir(key);
        let out = work.join("out");
        manifest.files = list_files(&out)?
            .into_iter()
            .map(|rel| {
                let p = out.join(&rel);
                let size = fs::metadata(&p).on("read", &p)?.len();
                sync_file(&p)?;
                Ok(FileEntry { path: rel, size, blake3: hash_file(&p)? })
            })
            .collect::<Result<_>>()?;
        write_atomic(&out.join("manifest.json"), &serde_json::to_vec_pretty(&manifest).expect("serializes"))?;
        pipeline_fs::fault::point("publish.before-rename");
        let dest = self.entry_dir(key);
        if dest.exists() {
            return Err(Error::Exists(dest));
        }
        fs::rename(&out, &dest).on("publish", &dest)?;
        sync_dir(&self.root.join("store"))?;
        fs::remove_dir_all(&work).ok();
        Ok(dest)
    }

    /// Remembers that `stage` of `recipe` last resolved to `key`.
    pub fn set_ref(&self, recipe: &str, stage: &str, key: &CacheKey) -> Result<()> {
        let dir = self.root.join("refs").join(sanitize(recipe));
        fs::create_dir_all(&dir).on("create", &dir)?;
        Ok(write_atomic(&dir.join(sanitize(stage)), key.as_str().as_bytes())?)
    }

    /// The key `stage` of `recipe` last resolved to, if any.
    pub fn get_ref(&self, recipe: &str, stage: &str) -> Option<CacheKey> {
        let s = fs::read_to_string(self.root.join("refs").join(sanitize(recipe)).join(sanitize(stage))).ok()?;
        Some(CacheKey(s.trim().to_string()))
    }

    /// Keys of all finished entries.
    pub fn entries(&self) -> Result<Vec<CacheKey>> {
        Ok(subdirs(&self.root.join("store"))?.into_iter().map(CacheKey).collect())
    }

    /// Keys of all work dirs (stages in progress or interrupted).
    pub fn work_entries(&self) -> Result<Vec<CacheKey>> {
        Ok(subdirs(&self.root.join("work"))?.into_iter().map(CacheKey).collect())
    }

    /// Removes a finished entry or work dir: renamed into `trash/` first so
    /// the store never shows a half-deleted entry, then deleted.
    pub fn remove(&self, dir: &Path) -> Result<()> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let trash = self.root.join("trash").join(format!("{name}.{}", std::process::id()));
        fs::rename(dir, &trash).on("remove", dir)?;
        Ok(fs::remove_dir_all(&trash).on("delete", &trash)?)
    }

    /// Deletes leftovers in `trash/` (from a gc that was interrupted).
    pub fn empty_trash(&self) -> Result<()> {
        for name in subdirs(&self.root.join("trash"))? {
            fs::remove_dir_all(self.root.join("trash").join(name)).ok();
        }
        Ok(())
    }
}

/// Held while writing one key; released when dropped (or when the process
/// dies: the OS drops file locks with the process).
#[derive(Debug)]
pub struct KeyLock {
    _file: File,
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

fn subdirs(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).on("list", dir)? {
        let e = e.on("list", dir)?;
        if e.file_type().on("list", dir)?.is_dir() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}
