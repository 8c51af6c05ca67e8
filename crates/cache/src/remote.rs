//! A remote copy of the cache in an object store, so that a job on a fresh
//! machine (a preempted cloud GPU, a CI runner) reuses what earlier machines
//! finished and resumes a training from the last checkpoint they pushed.
//!
//! `--cache-dir` names it by URL (the `object_store` crate): `s3://BUCKET/PREFIX`,
//! `gs://…`, `az://…`, `http(s)://…` (WebDAV) or `file:///…`. Credentials and
//! endpoints come from the usual environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `GOOGLE_SERVICE_ACCOUNT`,
//! `AZURE_STORAGE_ACCOUNT_NAME`…). The local cache stays the working copy:
//! stages run there, and finished entries are pulled into it before use.
//!
//! ```text
//! PREFIX/
//!   entries/<key>/manifest.json        the entry exists once this exists
//!   entries/<key>/<upload>/<file>...   the files of one upload
//!   work/<key>/checkpoints/step-N/...  a training's checkpoints, state.json last
//!   claims/<name>.json                 a job working on a sweep variant (refreshed)
//! ```
//!
//! Invariants:
//! - An entry is published by uploading every file under a fresh `<upload>`
//!   directory, then writing `manifest.json` (create-only where the store
//!   supports it): the manifest is last, so a job killed mid-upload leaves
//!   no entry, only an unreferenced upload directory.
//! - Concurrent jobs never clobber each other: each uploads into its own
//!   directory; the first manifest wins and a loser deletes its own upload.
//!   A published upload is never deleted or modified.
//! - A checkpoint counts once its `state.json` (uploaded last) exists, and
//!   remote checkpoints are dropped only after the entry is published.
//! - Downloaded entries are verified against the blake3 of their manifest.

use std::path::Path;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use pipeline_fs::IoContext;
use serde::{Deserialize, Serialize};

use super::hash::hash_file;
use super::key::CacheKey;
use super::store::{Manifest, list_files};

/// `entries/<key>/manifest.json`: the local manifest plus where its files are.
#[derive(Debug, Serialize, Deserialize)]
struct RemoteManifest {
    /// The upload directory (under `entries/<key>/`) holding the files.
    upload: String,
    manifest: Manifest,
}

/// A cache in an object store.
pub struct Remote {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
    /// Whether the store has create-only writes (all but plain WebDAV): a
    /// manifest, once written, is then never replaced by another job's.
    create_only: bool,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

/// Whether `--cache-dir` names an object store rather than a local directory.
pub fn is_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    })
}

impl Remote {
    /// Connects to the store at `url`, configured from the environment.
    pub fn open(url: &str) -> Result<Remote> {
        let options: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| ["AWS_", "GOOGLE_", "AZURE_"].iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        Remote::open_with(url, options)
    }

    /// Connects with explicit options (`aws_endpoint`, `aws_access_key_id`,
    /// … as object_store names them) instead of the environment.
    pub fn open_with(url: &str, mut options: Vec<(String, String)>) -> Result<Remote> {
        let parsed = url::Url::parse(url).doing(|| format!("--cache-dir {url}: not a valid URL"))?;
        if parsed.scheme() == "http" {
            options.push(("allow_http".into(), "true".into()));
        }
        let endpoint = endpoint_of(&parsed, &options);
        let (store, prefix) = open_store(&parsed, options, retry_config()?).doing(|| {
            format!("--cache-dir {url}: cannot open the object store (schemes: s3, gs, az, http(s), file)")
        })?;
        if let Some(endpoint) = endpoint {
            probe(url, &endpoint)?;
        }
        // One I/O thread of its own: the HTTP connections it opens are
        // driven there, so a claim's refresher thread can use them while
        // this thread computes (on a current-thread runtime they stalled
        // until the next request from here, and a refresh timed out).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pipeline-remote-io")
            .enable_all()
            .build()
            .doing(|| "cannot start the I/O runtime for the remote cache".into())?;
        let create_only = !matches!(parsed.scheme(), "http" | "https");
        Ok(Remote { url: url.to_string(), store: Arc::from(store), prefix, runtime, create_only })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Lists the cache's prefix once, so that a missing bucket or refused
    /// credentials stop a command before it plans anything, with what to do.
    pub fn check_readable(&self) -> Result<()> {
        self.runtime
            .block_on(self.store.list_with_delimiter(Some(&self.prefix)))
            .map(|_| ())
            .map_err(|e| self.explain("cannot be read", &e.to_string()))
    }

    /// Writes and deletes a small object, so that a missing bucket or bad
    /// credentials stop a run before any work, not at its first push.
    pub fn check_writable(&self) -> Result<()> {
        let path = self.path(&format!("probes/{}", upload_id()));
        self.runtime
            .block_on(async {
                self.store.put(&path, PutPayload::from_static(b"probe")).await?;
                self.store.delete(&path).await
            })
            .map_err(|e| self.explain("is not writable", &e.to_string()))
    }

    /// The store's answer `text` to a probe, with what it means and what to do.
    fn explain(&self, failed: &str, text: &str) -> RemoteError {
        let why = if text.contains("NoSuchBucket") || text.contains("404") {
            "the bucket does not exist: create it (e.g. `aws s3 mb`) or fix the URL"
        } else if ["403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "401"]
            .iter()
            .any(|c| text.contains(c))
        {
            "the store refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the GOOGLE_ / \
             AZURE_ variables) and the bucket's permissions"
        } else if ["certificate", "tls", "TLS", "ssl", "SSL"].iter().any(|c| text.contains(c)) {
            "the TLS handshake failed: the endpoint's certificate is not trusted here, or the endpoint speaks \
             plain http (then use an http:// endpoint and AWS_ALLOW_HTTP=true)"
        } else {
            "does the bucket exist? are the credentials in the environment?"
        };
        RemoteError::Unavailable(format!("the remote cache {} {failed} ({why}): {text}", self.url))
    }

    fn path(&self, rel: &str) -> ObjectPath {
        rel.split('/').filter(|s| !s.is_empty()).fold(self.prefix.clone(), |p, part| p.join(part))
    }

    fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(rel);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => Ok(Some(r.bytes().await.doing(|| format!("cannot read {}/{rel}", self.url))?.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e).doing(|| format!("cannot read {}/{rel}", self.url)),
            }
        })
    }

    /// Uploads a file: in one request when small (or when the store has no
    /// multipart uploads, as plain WebDAV), else in parts of [`PART_SIZE`]
    /// so that a multi-GB model never sits in memory at once.
    fn put_file(&self, rel: &str, file: &Path) -> Result<()> {
        let size = std::fs::metadata(file).doing(|| format!("cannot read {}", file.display()))?.len();
        let path = self.path(rel);
        let context = || format!("cannot upload {} to {}/{rel}", file.display(), self.url);
        if size > PART_SIZE as u64 {
            match self.runtime.block_on(self.store.put_multipart(&path)) {
                Ok(upload) => {
                    return self.runtime.block_on(write_parts(upload, file)).doing(context);
                }
                Err(object_store::Error::NotImplemented { .. }) => {}
                Err(e) => return Err(e).doing(context),
            }
        }
        let bytes = std::fs::read(file).doing(|| format!("cannot read {}", file.display()))?;
        self.runtime.block_on(self.store.put(&path, PutPayload::from(bytes))).doing(context)?;
        Ok(())
    }

    /// Downloads an object into `dest`, streaming; `None` if it does not exist.
    fn get_file(&self, rel: &str, dest: &Path) -> Result<Option<()>> {
        use std::io::Write;
        let path = self.path(rel);
        let context = || format!("cannot download {}/{rel} to {}", self.url, dest.display());
        self.runtime.block_on(async {
            let result = match self.store.get(&path).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e).doing(context),
            };
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).on("create", parent)?;
            }
            let mut out = std::io::BufWriter::new(std::fs::File::create(dest).doing(context)?);
            let mut stream = result.into_stream();
            while let Some(chunk) = stream.try_next().await.doing(context)? {
                out.write_all(&chunk).doing(context)?;
            }
            out.flush().doing(context)?;
            Ok(Some(()))
        })
    }

    /// Relative paths (below `rel`) of every object under `rel/`.
    fn list(&self, rel: &str) -> Result<Vec<String>> {
        let base = self.path(rel);
        let metas: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&base)).try_collect())
            .doing(|| format!("cannot list {}/{rel}", self.url))?;
        let mut out: Vec<String> = metas
            .into_iter()
            .filter_map(|m| {
                m.location
                    .prefix_match(&base)
                    .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete_all(&self, rel: &str) -> Result<()> {
        for f in self.list(rel)? {
            let p = self.path(&format!("{rel}/{f}"));
            match self.runtime.block_on(self.store.delete(&p)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e).doing(|| format!("cannot delete {}/{rel}/{f}", self.url)),
            }
        }
        Ok(())
    }

    fn manifest(&self, key: &CacheKey) -> Result<Option<RemoteManifest>> {
        let rel = format!("entries/{}/manifest.json", key.as_str());
        match self.get(&rel)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| RemoteError::Corrupt(format!("corrupt remote manifest {}/{rel}: {e}", self.url)))?,
            )),
        }
    }

    /// Whether the remote holds a finished entry for `key`.
    pub fn has_entry(&self, key: &CacheKey) -> Result<bool> {
        let path = self.path(&format!("entries/{}/manifest.json", key.as_str()));
        match self.runtime.block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e).doing(|| format!("cannot reach the remote cache {}", self.url)),
        }
    }

    /// Downloads the entry for `key` into `out` (an empty directory), checks
    /// every file against the manifest's blake3 and returns the manifest, or
    /// `None` when the remote has no such entry.
    pub fn pull_entry(&self, key: &CacheKey, out: &Path) -> Result<Option<Manifest>> {
        let Some(remote) = self.manifest(key)? else {
            return Ok(None);
        };
        for f in &remote.manifest.files {
            let rel = format!("entries/{}/{}/{}", key.as_str(), remote.upload, f.path);
            let dest = out.join(&f.path);
            self.get_file(&rel, &dest)?.ok_or_else(|| {
                RemoteError::Corrupt(format!("{}/{rel}: listed in the manifest but missing", self.url))
            })?;
            let got = hash_file(&dest)?;
            if got != f.blake3 {
                return Err(RemoteError::Corrupt(format!(
                    "{}/{rel}: content does not match its manifest (blake3 {got}, expected {})",
                    self.url, f.blake3
                )));
            }
        }
        Ok(Some(remote.manifest))
    }

    /// Uploads the finished local entry `entry` (its files and manifest.json)
    /// as `key`. Returns false when another job published it first.
    pub fn push_entry(&self, key: &CacheKey, entry: &Path, manifest: &Manifest) -> Result<bool> {
        if self.has_entry(key)? {
            return Ok(false);
        }
        let upload = upload_id();
        let dir = format!("entries/{}/{upload}", key.as_str());
        for (i, f) in manifest.files.iter().enumerate() {
            if i == 1 {
                pipeline_fs::fault::point(&format!("remote.mid-upload.{}", manifest.kind));
            }
            self.put_file(&format!("{dir}/{}", f.path), &entry.join(&f.path))?;
        }
        let body = serde_json::to_vec_pretty(&RemoteManifest { upload: upload.clone(), manifest: manifest.clone() })
            .expect("serializes");
        let path = self.path(&format!("entries/{}/manifest.json", key.as_str()));
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let result = self.runtime.block_on(self.store.put_opts(&path, PutPayload::from(body.clone()), create));
        match result {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Another job won; ours is garbage no one refers to.
                self.delete_all(&dir).ok();
                Ok(false)
            }
            // Stores without create-only writes (plain WebDAV): check, then write.
            // Two jobs racing here each point the manifest at a complete upload.
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.has_entry(key)? {
                    self.delete_all(&dir).ok();
                    return Ok(false);
                }
                self.runtime
                    .block_on(self.store.put(&path, PutPayload::from(body)))
                    .doing(|| format!("cannot publish {}/entries/{}", self.url, key.as_str()))?;
                Ok(true)
            }
            Err(e) => Err(e).doing(|| format!("cannot publish {}/entries/{}", self.url, key.as_str())),
        }
    }

    /// Removes the upload directories (`entries/<key>/upload-…/`) no manifest
    /// will ever name: those of a job killed mid-upload, or of one that lost
    /// a race and died before deleting its own. Under an entry whose
    /// manifest names another upload, on a store with create-only writes,
    /// every other one is garbage (a job still uploading there cannot
    /// publish and gives up); otherwise (no manifest yet, or WebDAV, where a
    /// racing job's manifest may still replace the one there) only one that
    /// nothing was written to for `min_idle` (it may still be under way). Only the entries of
    /// `keys` when given, else every entry. With `dry_run` only counts.
    pub fn sweep_uploads(
        &self,
        keys: Option<&[CacheKey]>,
        min_idle: std::time::Duration,
        dry_run: bool,
    ) -> Result<SweptUploads> {
        use std::collections::BTreeMap;
        let prefixes: Vec<String> = match keys {
            Some(keys) => keys.iter().map(|k| format!("entries/{}", k.as_str())).collect(),
            None => vec!["entries".to_string()],
        };
        // (key, upload) -> (newest write, bytes, objects)
        let mut uploads: BTreeMap<(String, String), (chrono::DateTime<chrono::Utc>, u64, Vec<ObjectPath>)> =
            BTreeMap::new();
        let entries = self.path("entries");
        for prefix in prefixes {
            let base = self.path(&prefix);
            let metas: Vec<object_store::ObjectMeta> = self
                .runtime
                .block_on(self.store.list(Some(&base)).try_collect())
                .doing(|| format!("cannot list {}/{prefix}", self.url))?;
            for m in metas {
                let Some(parts) = m.location.prefix_match(&entries) else { continue };
                let parts: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
                if parts.len() < 3 || !parts[1].starts_with("upload-") {
                    continue;
                }
                let e = uploads.entry((parts[0].clone(), parts[1].clone())).or_insert((m.last_modified, 0, Vec::new()));
                e.0 = e.0.max(m.last_modified);
                e.1 += m.size;
                e.2.push(m.location);
            }
        }
        let mut out = SweptUploads::default();
        let mut published: BTreeMap<String, Option<String>> = BTreeMap::new();
        let now = chrono::Utc::now();
        for ((key, upload), (newest, bytes, objects)) in uploads {
            let named = match published.get(&key) {
                Some(n) => n.clone(),
                None => {
                    let n = self.manifest(&CacheKey(key.clone()))?.map(|m| m.upload);
                    published.insert(key.clone(), n.clone());
                    n
                }
            };
            let idle = now.signed_duration_since(newest).to_std().is_ok_and(|idle| idle >= min_idle);
            let abandoned = match &named {
                Some(n) => *n != upload && (self.create_only || idle),
                None => idle,
            };
            if !abandoned {
                continue;
            }
            if !dry_run {
                for o in &objects {
                    match self.runtime.block_on(self.store.delete(o)) {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(e).doing(|| format!("cannot delete {}/{o}", self.url)),
                    }
                }
            }
            out.uploads.push(format!("entries/{key}/{upload}"));
            out.bytes += bytes;
        }
        Ok(out)
    }

    /// Uploads checkpoint directory `dir` (`…/checkpoints/step-N`) of the
    /// stage `key`, `state.json` last, then drops all but the newest two on
    /// the remote.
    pub fn push_checkpoint(&self, key: &CacheKey, dir: &Path) -> Result<()> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| RemoteError::Corrupt(format!("{}: checkpoint directory without a name", dir.display())))?;
        let base = format!("work/{}/checkpoints/{name}", key.as_str());
        let mut files = list_files(dir)?;
        files.retain(|f| f != "state.json");
        for (i, f) in files.iter().enumerate() {
            if i == 1 {
                pipeline_fs::fault::point(&format!("remote.mid-upload.{name}"));
            }
            self.put_file(&format!("{base}/{f}"), &dir.join(f))?;
        }
        self.put_file(&format!("{base}/state.json"), &dir.join("state.json"))?;
        let mut steps = self.checkpoint_steps(key)?;
        steps.sort();
        let keep: Vec<&String> = steps.iter().rev().take(2).collect();
        for old in steps.iter().filter(|s| !keep.contains(s)) {
            self.delete_all(&format!("work/{}/checkpoints/{old}", key.as_str()))?;
        }
        Ok(())
    }

    /// Names (`step-N`) of the complete checkpoints on the remote.
    fn checkpoint_steps(&self, key: &CacheKey) -> Result<Vec<String>> {
        let mut steps: Vec<String> = self
            .list(&format!("work/{}/checkpoints", key.as_str()))?
            .into_iter()
            .filter_map(|f| f.strip_suffix("/state.json").map(str::to_string))
            .filter(|d| d.starts_with("step-") && !d.contains('/'))
            .collect();
        steps.sort();
        Ok(steps)
    }

    /// The step of the newest complete checkpoint on the remote.
    pub fn latest_checkpoint(&self, key: &CacheKey) -> Result<Option<u64>> {
        Ok(self.checkpoint_steps(key)?.last().and_then(|s| s.trim_start_matches("step-").parse().ok()))
    }

    /// Downloads the newest complete remote checkpoint into
    /// `checkpoints/step-N` (through a `.tmp` directory renamed into place,
    /// as local checkpoints are written). Returns its step.
    pub fn pull_latest_checkpoint(&self, key: &CacheKey, checkpoints: &Path) -> Result<Option<u64>> {
        let Some(name) = self.checkpoint_steps(key)?.pop() else {
            return Ok(None);
        };
        let base = format!("work/{}/checkpoints/{name}", key.as_str());
        let tmp = checkpoints.join(format!("{name}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).on("clear", &tmp)?;
        }
        std::fs::create_dir_all(&tmp).on("create", &tmp)?;
        let mut files = self.list(&base)?;
        // state.json last: the directory is complete once it is there.
        files.retain(|f| f != "state.json");
        files.push("state.json".into());
        for f in files {
            self.get_file(&format!("{base}/{f}"), &tmp.join(&f))?
                .ok_or_else(|| RemoteError::Corrupt(format!("{}/{base}/{f} vanished", self.url)))?;
        }
        let dest = checkpoints.join(&name);
        if dest.exists() {
            std::fs::remove_dir_all(&dest).on("replace", &dest)?;
        }
        std::fs::rename(&tmp, &dest).on("write", &dest)?;
        Ok(name.trim_start_matches("step-").parse().ok())
    }

    /// Removes the remote checkpoints of `key` (once its entry is published).
    pub fn drop_checkpoints(&self, key: &CacheKey) -> Result<()> {
        self.delete_all(&format!("work/{}", key.as_str()))
    }
}

/// What [`Remote::sweep_uploads`] removed (or would remove).
#[derive(Debug, Default)]
pub struct SweptUploads {
    /// `entries/<key>/upload-…` of each abandoned upload.
    pub uploads: Vec<String>,
    pub bytes: u64,
}

/// How long an upload under an entry that has no manifest yet must have
/// been idle before it counts as abandoned: a day, as object stores'
/// lifecycle rules for incomplete uploads commonly wait.
pub const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What can go wrong with the remote cache.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The object store could not be set up, reached, read or written: what
    /// was being done, and the store's answer (one message: object_store's
    /// `Display` already holds its sources).
    #[error("{0}")]
    Unavailable(String),
    /// What the remote holds does not match its manifest.
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Io(#[from] pipeline_fs::Error),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
}

pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// Says what was being done when the object store (or its setup) failed.
trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> Doing<T> for std::result::Result<T, E> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| RemoteError::Unavailable(format!("{}: {e}", what())))
    }
}

/// object_store's builder for `url`'s scheme with `options` applied (keys it
/// does not know are left out, as `parse_url_opts` does) and `retry`.
fn open_store(
    url: &url::Url,
    options: Vec<(String, String)>,
    retry: object_store::RetryConfig,
) -> object_store::Result<(Box<dyn ObjectStore>, ObjectPath)> {
    use object_store::ObjectStoreScheme as Scheme;
    let (scheme, path) = Scheme::parse(url)?;
    let path = ObjectPath::parse(path)?;
    macro_rules! build {
        ($builder:ty, $url:expr) => {{
            let b = options.iter().fold(<$builder>::new().with_url($url), |b, (k, v)| match k.parse() {
                Ok(k) => b.with_config(k, v),
                Err(_) => b,
            });
            Box::new(b.with_retry(retry).build()?) as Box<dyn ObjectStore>
        }};
    }
    let store = match scheme {
        Scheme::AmazonS3 => build!(object_store::aws::AmazonS3Builder, url.to_string()),
        Scheme::GoogleCloudStorage => build!(object_store::gcp::GoogleCloudStorageBuilder, url.to_string()),
        Scheme::MicrosoftAzure => build!(object_store::azure::MicrosoftAzureBuilder, url.to_string()),
        Scheme::Http => build!(object_store::http::HttpBuilder, url[..url::Position::BeforePath].to_string()),
        _ => return object_store::parse_url_opts(url, options),
    };
    Ok((store, path))
}

/// How often a failed request to the store is retried (with exponential
/// backoff from 0.1 s, at most 15 s apart): `PIPELINE_REMOTE_RETRIES`, else
/// 10 (about a minute in all).
fn retry_config() -> Result<object_store::RetryConfig> {
    let mut retry = object_store::RetryConfig::default();
    if let Ok(v) = std::env::var("PIPELINE_REMOTE_RETRIES") {
        retry.max_retries = v.trim().parse().map_err(|_| {
            RemoteError::Unavailable(format!("PIPELINE_REMOTE_RETRIES={v}: not a number of retries (e.g. 3)"))
        })?;
    }
    Ok(retry)
}

/// How long the connectivity probe waits for the store's endpoint.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The host and port a store is reached at, where it is not a cloud's
/// default endpoint: an `http(s)://` WebDAV URL, or an S3 URL with an
/// endpoint set (`AWS_ENDPOINT`, `aws_endpoint_url`).
fn endpoint_of(url: &url::Url, options: &[(String, String)]) -> Option<(String, u16)> {
    let target = match url.scheme() {
        "http" | "https" => url.clone(),
        "s3" | "s3a" => {
            let e =
                options.iter().find(|(k, _)| matches!(k.as_str(), "aws_endpoint" | "aws_endpoint_url" | "endpoint"))?;
            url::Url::parse(&e.1).ok()?
        }
        _ => return None,
    };
    Some((target.host_str()?.to_string(), target.port_or_known_default()?))
}

/// One TCP connection to the store's endpoint, bounded by
/// [`PROBE_TIMEOUT`]: a store that is not there fails the run at once with
/// what happened (name not found, connection refused, no answer), instead
/// of after a minute of silent retries.
fn probe(url: &str, (host, port): &(String, u16)) -> Result<()> {
    use std::net::{TcpStream, ToSocketAddrs};
    let fail = |why: String| Err(RemoteError::Unavailable(format!("the remote cache {url} cannot be reached: {why}")));
    let addrs: Vec<std::net::SocketAddr> = match (host.as_str(), *port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => return fail(format!("the name `{host}` does not resolve ({e}); check the endpoint's host name")),
    };
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, PROBE_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => fail(format!(
            "connection refused at {host}:{port}: no server is listening there (is the store running? is the \
             endpoint's port right?)"
        )),
        Some(e) if e.kind() == std::io::ErrorKind::TimedOut => fail(format!(
            "no answer from {host}:{port} within {} s (a firewall, or the wrong address)",
            PROBE_TIMEOUT.as_secs()
        )),
        Some(e) => fail(format!("cannot connect to {host}:{port}: {e}")),
        None => fail(format!("`{host}` resolves to no address")),
    }
}

/// Uploads larger than this go in parts of this size.
const PART_SIZE: usize = 32 << 20;

/// Streams `file` into a multipart upload, at most two parts in flight.
async fn write_parts(upload: Box<dyn object_store::MultipartUpload>, file: &Path) -> object_store::Result<()> {
    use std::io::Read;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut f =
        std::fs::File::open(file).map_err(|e| object_store::Error::Generic { store: "local", source: e.into() })?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| object_store::Error::Generic { store: "local", source: e.into() })?;
        if n == 0 {
            break;
        }
        writer.wait_for_capacity(2).await?;
        writer.write(&buf[..n]);
    }
    writer.finish().await?;
    Ok(())
}

/// A name no other job picks: time, process and a random part.
/// How often a claim's holder refreshes it, and how long a claim lives
/// without a refresh before another job may take it over (its holder died).
const CLAIM_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
const CLAIM_STALE_S: u64 = 5 * 60;

/// `claims/<name>.json`: who works on a variant, and when they last said so.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimHolder {
    pub host: String,
    pub pid: u32,
    pub since: u64,
    pub refreshed: u64,
}

impl ClaimHolder {
    fn me() -> ClaimHolder {
        let now = unix_now();
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown host".into());
        ClaimHolder { host, pid: std::process::id(), since: now, refreshed: now }
    }
}

impl ClaimHolder {
    /// A holder on this machine whose process is gone (killed, crashed):
    /// its claim is taken over at once instead of after 5 minutes. Known on
    /// Linux (`/proc`); elsewhere a claim waits to go stale.
    fn died_on_this_host(&self, me: &ClaimHolder) -> bool {
        if !cfg!(target_os = "linux") || self.host != me.host || self.pid == me.pid {
            return false;
        }
        // Gone, or a zombie its parent has not reaped yet (state `Z`).
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Err(_) => true,
            Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }
}

impl std::fmt::Display for ClaimHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ago = unix_now().saturating_sub(self.since);
        write!(f, "process {} on {} (for {} min)", self.pid, self.host, ago / 60)
    }
}

/// A claim this job holds: refreshed in the background, deleted on drop.
pub struct RemoteClaim {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RemoteClaim {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

/// Whether a claim was taken.
pub enum Claimed {
    Ours(RemoteClaim),
    /// Another live job holds it.
    Theirs(ClaimHolder),
}

impl Remote {
    /// Claims `name` for this job (create-only, so two jobs racing for it
    /// cannot both win; a claim not refreshed for 5 minutes is taken over).
    pub fn claim(&self, name: &str) -> Result<Claimed> {
        let rel = format!("claims/{name}.json");
        let path = self.path(&rel);
        let me = ClaimHolder::me();
        let body = serde_json::to_vec(&me).expect("serializes");
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        let context = || format!("cannot claim {}/{rel}", self.url);
        match self.runtime.block_on(self.store.put_opts(&path, PutPayload::from(body.clone()), create)) {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::NotImplemented { .. }) => {
                if let Some(bytes) = self.get(&rel)? {
                    if let Ok(holder) = serde_json::from_slice::<ClaimHolder>(&bytes) {
                        let alive = unix_now().saturating_sub(holder.refreshed) < CLAIM_STALE_S
                            && !holder.died_on_this_host(&me);
                        if alive && !(holder.pid == me.pid && holder.host == me.host) {
                            return Ok(Claimed::Theirs(holder));
                        }
                    }
                }
                self.runtime.block_on(self.store.put(&path, PutPayload::from(body))).doing(context)?;
            }
            Err(e) => return Err(e).doing(context),
        }
        // Refresh in the background until dropped, then delete.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let store = self.store.clone();
        let rt = self.runtime.handle().clone();
        let thread = std::thread::spawn(move || {
            let mut holder = me;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CLAIM_REFRESH) {
                holder.refreshed = unix_now();
                let body = serde_json::to_vec(&holder).expect("serializes");
                // A refresh that fails lets the claim go stale: at worst another
                // job runs the variant too (entries are published create-only).
                rt.block_on(store.put(&path, PutPayload::from(body))).ok();
            }
            rt.block_on(store.delete(&path)).ok();
        });
        Ok(Claimed::Ours(RemoteClaim { stop: Some(stop), thread: Some(thread) }))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn upload_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("upload-{nanos:x}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Fingerprint;
    use crate::store::FileEntry;

    fn remote(dir: &Path) -> Remote {
        Remote::open(&format!("file://{}", dir.display())).unwrap()
    }

    fn entry(dir: &Path, files: &[(&str, &str)]) -> Manifest {
        let files = files
            .iter()
            .map(|(name, text)| {
                let p = dir.join(name);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, text).unwrap();
                FileEntry { path: name.to_string(), size: text.len() as u64, blake3: hash_file(&p).unwrap() }
            })
            .collect();
        Manifest {
            format: 1,
            key: CacheKey("k".repeat(64)),
            kind: "test".into(),
            fingerprint: Fingerprint {
                kind: "test".into(),
                version: 1,
                params: serde_json::Value::Null,
                inputs: Default::default(),
                outside: Default::default(),
            },
            files,
            started_at: 0,
            duration_s: 0.0,
            pipeline_version: "test".into(),
            metrics: serde_json::Value::Null,
        }
    }

    #[test]
    fn entries_round_trip_and_the_first_publisher_wins() {
        let tmp = tempfile::tempdir().unwrap();
        let r = remote(&tmp.path().join("remote"));
        let key = CacheKey("a".repeat(64));
        assert!(!r.has_entry(&key).unwrap());
        assert!(r.pull_entry(&key, &tmp.path().join("nothing")).unwrap().is_none());

        let src = tmp.path().join("src");
        let m = entry(&src, &[("rows/train.jsonl", "{}\n"), ("report.md", "# hi\n")]);
        assert!(r.push_entry(&key, &src, &m).unwrap());
        assert!(r.has_entry(&key).unwrap());
        // A second job finds it published and uploads nothing.
        let other = tmp.path().join("other");
        let m2 = entry(&other, &[("rows/train.jsonl", "{\"x\": 1}\n")]);
        assert!(!r.push_entry(&key, &other, &m2).unwrap());
        assert_eq!(r.list(&format!("entries/{}", key.as_str())).unwrap().len(), 3, "one upload and the manifest");

        let out = tmp.path().join("out");
        let got = r.pull_entry(&key, &out).unwrap().unwrap();
        assert_eq!(got.files, m.files);
        assert_eq!(std::fs::read_to_string(out.join("rows/train.jsonl")).unwrap(), "{}\n");
    }

    #[test]
    fn abandoned_uploads_are_swept_and_a_live_one_is_kept() {
        use std::time::Duration;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("remote");
        let r = remote(&root);
        r.check_readable().expect("an empty remote that does not exist yet can be read");
        // A published entry, and beside it the upload of a job killed after
        // its first file (it lost the race): garbage at any age.
        let key = CacheKey("a".repeat(64));
        let src = tmp.path().join("src");
        let m = entry(&src, &[("a.txt", "a"), ("b.txt", "b")]);
        assert!(r.push_entry(&key, &src, &m).unwrap());
        let loser = root.join(format!("entries/{}/upload-1-2-3/a.txt", key.as_str()));
        std::fs::create_dir_all(loser.parent().unwrap()).unwrap();
        std::fs::write(&loser, "aa").unwrap();
        // An entry with no manifest yet: an upload that may still be going.
        let pending = CacheKey("b".repeat(64));
        let live = root.join(format!("entries/{}/upload-4-5-6/a.txt", pending.as_str()));
        std::fs::create_dir_all(live.parent().unwrap()).unwrap();
        std::fs::write(&live, "aaa").unwrap();

        let dry = r.sweep_uploads(None, UPLOAD_IDLE, true).unwrap();
        assert_eq!(dry.uploads, vec![format!("entries/{}/upload-1-2-3", key.as_str())]);
        assert_eq!(dry.bytes, 2);
        assert!(loser.exists(), "a dry run removes nothing");
        let swept = r.sweep_uploads(None, UPLOAD_IDLE, false).unwrap();
        assert_eq!(swept.uploads.len(), 1);
        assert!(!loser.exists() && live.exists(), "the recent unpublished upload is kept");
        // The published entry still pulls whole.
        assert!(r.pull_entry(&key, &tmp.path().join("out")).unwrap().is_some());
        // Idle long enough (here: at all), the unpublished one goes too; only
        // for the keys asked about.
        assert!(r.sweep_uploads(Some(&[key.clone()]), Duration::ZERO, false).unwrap().uploads.is_empty());
        assert_eq!(r.sweep_uploads(Some(&[pending]), Duration::ZERO, false).unwrap().uploads.len(), 1);
        assert!(!live.exists());
    }

    #[test]
    fn large_files_go_up_in_parts_and_come_back_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let r = remote(&tmp.path().join("remote"));
        let key = CacheKey("d".repeat(64));
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        // Just over two parts, with content that differs between parts.
        let big: Vec<u8> = (0..(2 * PART_SIZE + 12345)).map(|i| (i / 4096 % 251) as u8).collect();
        std::fs::write(src.join("model.safetensors"), &big).unwrap();
        let mut m = entry(&src, &[("config.json", "{}")]);
        let p = src.join("model.safetensors");
        m.files.push(FileEntry {
            path: "model.safetensors".into(),
            size: big.len() as u64,
            blake3: hash_file(&p).unwrap(),
        });
        assert!(r.push_entry(&key, &src, &m).unwrap());
        let out = tmp.path().join("out");
        r.pull_entry(&key, &out).unwrap().unwrap();
        assert!(std::fs::read(out.join("model.safetensors")).unwrap() == big);
    }

    #[test]
    fn a_tampered_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("remote");
        let r = remote(&root);
        let key = CacheKey("b".repeat(64));
        let src = tmp.path().join("src");
        let m = entry(&src, &[("a.txt", "right")]);
        r.push_entry(&key, &src, &m).unwrap();
        let upload =
            r.list(&format!("entries/{}", key.as_str())).unwrap().into_iter().find(|f| f.ends_with("a.txt")).unwrap();
        std::fs::write(root.join("entries").join(key.as_str()).join(&upload), "wrong").unwrap();
        let err = r.pull_entry(&key, &tmp.path().join("out")).unwrap_err();
        assert!(format!("{err:#}").contains("does not match its manifest"), "{err:#}");
    }

    #[test]
    fn checkpoints_count_once_complete_and_the_newest_two_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let r = remote(&tmp.path().join("remote"));
        let key = CacheKey("c".repeat(64));
        assert_eq!(r.latest_checkpoint(&key).unwrap(), None);
        for step in [2, 4, 6] {
            let dir = tmp.path().join(format!("local/step-{step:06}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("adapter.safetensors"), format!("weights {step}")).unwrap();
            std::fs::write(dir.join("state.json"), format!("{{\"step\": {step}}}")).unwrap();
            r.push_checkpoint(&key, &dir).unwrap();
        }
        assert_eq!(r.checkpoint_steps(&key).unwrap(), vec!["step-000004", "step-000006"]);
        // A partial upload (no state.json) is not a checkpoint.
        let partial = tmp.path().join("remote/work").join(key.as_str()).join("checkpoints/step-000008");
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("adapter.safetensors"), "half").unwrap();
        assert_eq!(r.latest_checkpoint(&key).unwrap(), Some(6));

        let local = tmp.path().join("machine-2/checkpoints");
        std::fs::create_dir_all(&local).unwrap();
        assert_eq!(r.pull_latest_checkpoint(&key, &local).unwrap(), Some(6));
        assert_eq!(std::fs::read_to_string(local.join("step-000006/adapter.safetensors")).unwrap(), "weights 6");
        assert!(local.join("step-000006/state.json").is_file());

        r.drop_checkpoints(&key).unwrap();
        assert_eq!(r.latest_checkpoint(&key).unwrap(), None);
    }

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("s3://bucket/prefix"));
        assert!(is_url("file:///tmp/x"));
        assert!(!is_url(".pipeline"));
        assert!(!is_url("/tmp/a://b"));
        assert!(Remote::open("nope://x").is_err());
    }
}
