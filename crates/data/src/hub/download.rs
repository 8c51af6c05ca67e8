//! One file from the hub into the cache, the way `huggingface_hub` does it,
//! so that both share a cache and a half-done download:
//!
//! 1. `HEAD …/resolve/COMMIT/FILE` (relative redirects followed, as for a
//!    renamed repository) gives the blob's etag (`X-Linked-Etag` for LFS
//!    files, else `ETag`), its size and the commit;
//! 2. unless `blobs/ETAG` is there, `GET` the file (from the CDN an absolute
//!    redirect names) into `blobs/ETAG.incomplete`, asking only for the bytes
//!    still missing (`Range: bytes=N-`) and starting over when the server
//!    sends the whole file; under `.locks/…/ETAG.lock`, which
//!    `huggingface_hub` takes too;
//! 3. rename it to `blobs/ETAG` once whole, and link
//!    `snapshots/COMMIT/FILE` to it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Hub, HubError, HubRepo};

impl Hub {
    /// Downloads `file` of `repo` at `commit` into the cache; returns the
    /// snapshot path.
    pub(super) fn download(&self, repo: &HubRepo, commit: &str, file: &str) -> Result<PathBuf, HubError> {
        let url = format!("{}/{}/resolve/{commit}/{file}", self.endpoint, repo.repo().url());
        let head = self.head(repo, file, &url)?;
        let repo_dir = self.cache.path().join(repo.repo().folder_name());
        let blob = repo_dir.join("blobs").join(&head.etag);
        if !blob.is_file() {
            let locks = self.cache.path().join(".locks").join(repo.repo().folder_name());
            let cache_err =
                |path: &Path, e: std::io::Error| HubError::Cache { path: path.to_path_buf(), message: e.to_string() };
            std::fs::create_dir_all(&locks).map_err(|e| cache_err(&locks, e))?;
            std::fs::create_dir_all(blob.parent().unwrap_or(&repo_dir)).map_err(|e| cache_err(&blob, e))?;
            let lock_path = locks.join(format!("{}.lock", head.etag));
            let lock = std::fs::File::create(&lock_path).map_err(|e| cache_err(&lock_path, e))?;
            lock.lock().map_err(|e| cache_err(&lock_path, e))?;
            // Another process may have finished it while we waited.
            if !blob.is_file() {
                self.fetch_blob(repo, file, &head, &blob)?;
            }
        }
        let pointer = repo_dir.join("snapshots").join(&head.commit).join(file);
        link(&blob, &pointer).map_err(|e| HubError::Cache { path: pointer.clone(), message: e.to_string() })?;
        Ok(pointer)
    }

    pub(super) fn head(&self, repo: &HubRepo, file: &str, url: &str) -> Result<Head, HubError> {
        let agent = ureq::AgentBuilder::new().redirects(0).timeout_connect(Duration::from_secs(15)).build();
        let mut target = url.to_string();
        for _ in 0..10 {
            let request = self.authorized(agent.head(&target)).set("Accept-Encoding", "identity");
            let response = request.call().map_err(|e| self.classify_request(repo, Some(file), e))?;
            let location = response.header("location").map(str::to_string);
            let redirected = (300..400).contains(&response.status());
            match location {
                // A relative redirect stays on the hub (a renamed repository).
                Some(loc) if redirected && loc.starts_with('/') => {
                    target = format!("{}{loc}", self.endpoint);
                    continue;
                }
                _ => {}
            }
            let protocol = |what: &str| HubError::Protocol {
                repo: repo.display(),
                endpoint: self.endpoint.clone(),
                message: format!("its answer for `{file}` lacks {what}"),
            };
            let etag = response
                .header("x-linked-etag")
                .or_else(|| response.header("etag"))
                .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
                .filter(|e| !e.is_empty() && !e.contains('/'))
                .ok_or_else(|| protocol("an `ETag`"))?;
            let commit =
                response.header("x-repo-commit").map(str::to_string).ok_or_else(|| protocol("`X-Repo-Commit`"))?;
            let size = response
                .header("x-linked-size")
                .or_else(|| response.header("content-length"))
                .and_then(|s| s.parse().ok());
            let from = match location {
                Some(loc) if redirected => loc,
                _ => target,
            };
            return Ok(Head { etag, commit, size, from });
        }
        Err(HubError::Protocol {
            repo: repo.display(),
            endpoint: self.endpoint.clone(),
            message: format!("too many redirects for `{file}`"),
        })
    }

    /// `GET`s the blob into `BLOB.incomplete`, resuming from what is there.
    fn fetch_blob(&self, repo: &HubRepo, file: &str, head: &Head, blob: &Path) -> Result<(), HubError> {
        let partial = blob.with_file_name(format!("{}.incomplete", head.etag));
        let cache_err = |e: std::io::Error| HubError::Cache { path: partial.clone(), message: e.to_string() };
        let mut have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if head.size.is_some_and(|size| have > size) {
            have = 0;
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .build();
        let mut request = agent.get(&head.from);
        if head.from.starts_with(&self.endpoint) {
            request = self.authorized(request);
        }
        if have > 0 {
            tracing::info!(file, bytes = have, "resuming the download");
            request = request.set("Range", &format!("bytes={have}-"));
        }
        let response = match request.call() {
            // Asked for nothing more: the partial file is whole.
            Err(ureq::Error::Status(416, _)) if head.size == Some(have) => None,
            Err(e) => return Err(self.classify_request(repo, Some(file), e)),
            Ok(r) => Some(r),
        };
        if let Some(response) = response {
            let resumed = response.status() == 206;
            if !resumed {
                have = 0; // The server sent the whole file.
            }
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(resumed)
                .write(true)
                .truncate(!resumed)
                .open(&partial)
                .map_err(cache_err)?;
            let bar = self.bar(file, head.size, have);
            let mut reader = bar.wrap_read(response.into_reader());
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = reader.read(&mut buf).map_err(|e| HubError::Unreachable {
                    repo: repo.display(),
                    endpoint: self.endpoint.clone(),
                    reason: format!("the download of `{file}` broke off ({e}); run again to resume it"),
                })?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n]).map_err(cache_err)?;
            }
            out.sync_all().map_err(cache_err)?;
            bar.finish_and_clear();
        }
        let got = std::fs::metadata(&partial).map_err(cache_err)?.len();
        if let Some(size) = head.size.filter(|&s| s != got) {
            return Err(HubError::Unreachable {
                repo: repo.display(),
                endpoint: self.endpoint.clone(),
                reason: format!("`{file}` arrived with {got} of {size} bytes; run again to resume it"),
            });
        }
        std::fs::rename(&partial, blob).map_err(cache_err)
    }

    fn authorized(&self, request: ureq::Request) -> ureq::Request {
        let request = request.set("User-Agent", concat!("pipeline/", env!("CARGO_PKG_VERSION")));
        match &self.token {
            Some(t) => request.set("Authorization", &format!("Bearer {t}")),
            None => request,
        }
    }

    fn bar(&self, file: &str, size: Option<u64>, at: u64) -> indicatif::ProgressBar {
        if !self.progress {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(size.unwrap_or(0)).with_position(at).with_message(file.to_string());
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }
}

/// What `HEAD` says of a file.
pub(super) struct Head {
    pub(super) etag: String,
    commit: String,
    size: Option<u64>,
    /// Where to `GET` it (the CDN an absolute redirect names, or the hub).
    from: String,
}

/// Points `pointer` at `blob` with a relative symlink, as `huggingface_hub`
/// does (a copy where links are not allowed).
fn link(blob: &Path, pointer: &Path) -> std::io::Result<()> {
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if pointer.symlink_metadata().is_ok() {
        std::fs::remove_file(pointer)?;
    }
    // snapshots/COMMIT/a/b → ../../../blobs/ETAG
    let repo_dir = blob.parent().and_then(Path::parent).unwrap_or(Path::new("."));
    let depth = pointer.strip_prefix(repo_dir).map(|p| p.components().count() - 1).unwrap_or(2);
    let mut target = PathBuf::new();
    for _ in 0..depth {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().unwrap_or_default());
    #[cfg(unix)]
    {
        if std::os::unix::fs::symlink(&target, pointer).is_ok() {
            return Ok(());
        }
    }
    std::fs::copy(blob, pointer).map(|_| ())
}
