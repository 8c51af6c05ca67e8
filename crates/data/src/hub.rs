//! The Hugging Face hub through `hf-hub`, with a real offline mode and the
//! hub's answers turned into errors that say what to do.
//!
//! The environment is read as `huggingface_hub` reads it: `HF_HOME` (or
//! `HF_HUB_CACHE`) picks the cache, `HF_ENDPOINT` the server, `HF_TOKEN` (or
//! the token file `huggingface-cli login` writes, `HF_TOKEN_PATH`) the
//! credentials. `HF_HUB_OFFLINE=1` resolves everything from the cache alone,
//! without any network attempt (hf-hub does not read that variable itself,
//! so we honour it here).
//!
//! As `huggingface_hub` does, a failed request for a repository (no network,
//! a gated or private repository, a server error) falls back to the cache
//! when the cache holds the revision, and reports the hub's own answer when
//! it does not: a gated repository names its licence page and whether a
//! token was sent, a missing one suggests checking the id.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use hf_hub::api::sync::ApiError;
use hf_hub::{Cache, Repo, RepoType};

mod download;

/// A repository on the hub, with an optional revision (branch, tag, commit).
#[derive(Debug, Clone)]
pub struct HubRepo {
    pub id: String,
    pub revision: Option<String>,
    pub kind: RepoType,
}

impl HubRepo {
    /// Parses `datasets/OWNER/NAME[@REV]` (the part after `hf://`).
    pub fn parse_dataset(rest: &str) -> Result<HubRepo> {
        let id = rest
            .strip_prefix("datasets/")
            .with_context(|| format!("`hf://{rest}` is not a dataset id; write hf://datasets/OWNER/NAME[@REVISION]"))?;
        Self::parse(id, RepoType::Dataset)
    }

    /// Parses `OWNER/NAME[@REV]` (the part after `hf://`).
    pub fn parse_model(rest: &str) -> Result<HubRepo> {
        Self::parse(rest, RepoType::Model)
    }

    fn parse(s: &str, kind: RepoType) -> Result<HubRepo> {
        let (id, revision) = match s.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, Some(rev.to_string())),
            Some(_) => bail!("`{s}`: empty revision after `@`"),
            None => (s, None),
        };
        let parts: Vec<&str> = id.split('/').collect();
        if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
            bail!("`{s}` is not OWNER/NAME");
        }
        Ok(HubRepo { id: id.to_string(), revision, kind })
    }

    fn repo(&self) -> Repo {
        match &self.revision {
            Some(rev) => Repo::with_revision(self.id.clone(), self.kind, rev.clone()),
            None => Repo::new(self.id.clone(), self.kind),
        }
    }

    /// `hf://[datasets/]OWNER/NAME[@REV]`, as a recipe writes it.
    pub fn display(&self) -> String {
        let prefix = if matches!(self.kind, RepoType::Dataset) { "datasets/" } else { "" };
        match &self.revision {
            Some(r) => format!("hf://{prefix}{}@{r}", self.id),
            None => format!("hf://{prefix}{}", self.id),
        }
    }

    /// The repository's page on `endpoint` (where its licence is accepted).
    pub fn page(&self, endpoint: &str) -> String {
        let prefix = if matches!(self.kind, RepoType::Dataset) { "datasets/" } else { "" };
        format!("{}/{prefix}{}", endpoint.trim_end_matches('/'), self.id)
    }
}

/// Where the token sent to the hub came from (named in messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// No token: anonymous requests.
    None,
    /// The `HF_TOKEN` environment variable.
    Env,
    /// A token file (`$HF_HOME/token`, written by `huggingface-cli login`).
    File(PathBuf),
}

impl TokenSource {
    fn describe(&self) -> String {
        match self {
            TokenSource::None => "without a token (HF_TOKEN is not set and there is no token file)".into(),
            TokenSource::Env => "with the token in HF_TOKEN".into(),
            TokenSource::File(p) => format!("with the token in {}", p.display()),
        }
    }
}

/// What the hub answered that stops a fetch; the messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{repo} is gated: the hub answered {status} to a request sent {}. {}{}",
        token.describe(),
        if *token == TokenSource::None {
            format!("Accept its licence at {page} (logged in), then create a read token at https://huggingface.co/settings/tokens and set HF_TOKEN (or run `huggingface-cli login`)")
        } else {
            format!("Accept its licence at {page} as the user this token belongs to (access may take a moment to be granted), and check that the token may read gated repositories")
        },
        hub_says(message)
    )]
    Gated { repo: String, page: String, status: u16, token: TokenSource, message: Option<String> },
    #[error(
        "{repo} was not found{}: the hub answered {status} to a request sent {}. Check the id (its page would be {page}){}{}",
        if *token == TokenSource::None { " (or it is private)" } else { ", or the token cannot see it" },
        token.describe(),
        if *token == TokenSource::None { "; for a private repository set HF_TOKEN (or run `huggingface-cli login`)" } else { "" },
        hub_says(message)
    )]
    RepoNotFound { repo: String, page: String, status: u16, token: TokenSource, message: Option<String> },
    #[error(
        "{repo}: the revision `{revision}` does not exist (the hub answered 404); check the branch, tag or commit after `@`{}",
        hub_says(message)
    )]
    RevisionNotFound { repo: String, revision: String, message: Option<String> },
    #[error("{repo} has no file `{file}` at this revision (the hub answered 404){}", hub_says(message))]
    EntryNotFound { repo: String, file: String, message: Option<String> },
    #[error(
        "{repo}: the hub refused the token (answered {status} to a request sent {}); it may be mistyped, revoked or expired: create a new one at https://huggingface.co/settings/tokens{}",
        token.describe(),
        hub_says(message)
    )]
    BadToken { repo: String, status: u16, token: TokenSource, message: Option<String> },
    #[error("{repo}: the hub at {endpoint} answered {status}{}; try again later", hub_says(message))]
    Status { repo: String, endpoint: String, status: u16, message: Option<String> },
    #[error("cannot reach the hub at {endpoint} for {repo} ({reason})")]
    Unreachable { repo: String, endpoint: String, reason: String },
    #[error("{repo}: the server at {endpoint} does not answer as the hub does: {message}")]
    Protocol { repo: String, endpoint: String, message: String },
    #[error("cannot write the Hugging Face cache at {}: {message}", path.display())]
    Cache { path: PathBuf, message: String },
}

fn hub_says(message: &Option<String>) -> String {
    message.as_ref().map(|m| format!(" (the hub says: {m})")).unwrap_or_default()
}

impl HubError {
    /// Whether the cache may answer instead (as `huggingface_hub` does for
    /// everything but a missing revision or file).
    fn cache_may_answer(&self) -> bool {
        !matches!(self, HubError::RevisionNotFound { .. } | HubError::EntryNotFound { .. } | HubError::Cache { .. })
    }
}

/// Files of one resolved revision, in the local cache.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The commit the revision resolved to.
    pub revision: String,
    /// `…/snapshots/<commit>/`.
    pub dir: PathBuf,
    /// Paths relative to `dir`, sorted.
    pub files: Vec<String>,
    /// The hub's identity of each file whose identity is known (its etag:
    /// the LFS sha256, or the git blob id of a small file), from the
    /// cache's `snapshots/… -> blobs/ETAG` links or, for a file not
    /// downloaded yet, the hub's `HEAD` answer.
    pub etags: std::collections::BTreeMap<String, String>,
}

impl Snapshot {
    /// Whether every listed file is on disk (an [`identify`] snapshot may
    /// list files not downloaded yet).
    pub fn complete(&self) -> bool {
        self.files.iter().all(|f| self.dir.join(f).is_file())
    }
}

/// The etag a cache link names: `snapshots/C/F -> ../../blobs/ETAG`.
fn linked_etag(path: &std::path::Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    let name = target.file_name()?.to_str()?.to_string();
    let parent = target.parent()?.file_name()?;
    (parent == "blobs").then_some(name)
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only resolution.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes" | "ON" | "on"))
}

/// Resolves `repo` and makes the files accepted by `want` available locally;
/// `progress` shows download bars (on a terminal). The hub, cache and
/// token come from the environment ([`Hub::from_env`]).
pub fn fetch_files(repo: &HubRepo, want: impl Fn(&str) -> bool, progress: bool) -> Result<Snapshot> {
    Hub { progress, ..Hub::from_env() }.fetch(repo, want)
}

/// Resolves `repo` and the hub's identity (etag) of the files accepted by
/// `want`, downloading none of them: what a plan needs to key stages on
/// large weights it may never read.
pub fn identify(repo: &HubRepo, want: impl Fn(&str) -> bool) -> Result<Snapshot> {
    Hub::from_env().identify(repo, want)
}

/// One hub and one cache, as the environment (or a test) sets them.
#[derive(Debug, Clone)]
pub struct Hub {
    /// The local cache (`HF_HOME/hub`, or `HF_HUB_CACHE`).
    pub cache: Cache,
    /// The server (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The token sent, if any, and where it came from.
    pub token: Option<String>,
    pub token_source: TokenSource,
    /// Cache only, no request (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Download bars.
    pub progress: bool,
}

impl Hub {
    /// The hub the environment describes, as `huggingface_hub` reads it.
    pub fn from_env() -> Hub {
        let cache = match std::env::var("HF_HUB_CACHE").ok().filter(|c| !c.is_empty()) {
            Some(dir) => Cache::new(PathBuf::from(dir)),
            None => Cache::from_env(),
        };
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into());
        let (token, token_source) = match std::env::var("HF_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
            Some(t) => (Some(t.trim().to_string()), TokenSource::Env),
            None => {
                let path = token_path();
                match std::fs::read_to_string(&path).map(|t| t.trim().to_string()) {
                    Ok(t) if !t.is_empty() => (Some(t), TokenSource::File(path)),
                    _ => (None, TokenSource::None),
                }
            }
        };
        Hub {
            cache,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            token_source,
            offline: offline(),
            progress: false,
        }
    }

    /// Resolves `repo` and makes the files accepted by `want` available in
    /// the cache: online, the revision's file list comes from the hub and
    /// missing files are downloaded; offline, or when the hub cannot answer,
    /// the cache alone.
    pub fn fetch(&self, repo: &HubRepo, want: impl Fn(&str) -> bool) -> Result<Snapshot> {
        self.resolve(repo, &want, true)
    }

    /// As [`Hub::fetch`], but only the files' identities: nothing is
    /// downloaded (a `HEAD` per file not in the cache).
    pub fn identify(&self, repo: &HubRepo, want: impl Fn(&str) -> bool) -> Result<Snapshot> {
        self.resolve(repo, &want, false)
    }

    fn resolve(&self, repo: &HubRepo, want: &dyn Fn(&str) -> bool, download: bool) -> Result<Snapshot> {
        if self.offline {
            return from_cache(&self.cache, repo, &want, true);
        }
        match self.fetch_online(repo, &want, download) {
            Ok(snapshot) => Ok(snapshot),
            Err(e) if e.cache_may_answer() => match from_cache(&self.cache, repo, &want, false) {
                Ok(snapshot) => {
                    tracing::warn!("{e}; using revision {} from the local cache", snapshot.revision);
                    Ok(snapshot)
                }
                Err(cache) => Err(anyhow::anyhow!("{e}\n(and the local cache cannot stand in: {cache:#})")),
            },
            Err(e) => Err(e.into()),
        }
    }

    fn fetch_online(&self, repo: &HubRepo, want: &dyn Fn(&str) -> bool, download: bool) -> Result<Snapshot, HubError> {
        let api = hf_hub::api::sync::ApiBuilder::from_cache(self.cache.clone())
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| self.classify(repo, None, e))?;
        let api_repo = api.repo(repo.repo());
        let info = api_repo.info().map_err(|e| self.classify(repo, None, e))?;
        let mut files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).filter(|f| want(f)).collect();
        files.sort();
        let dir = snapshot_dir(&self.cache, repo, &info.sha);
        let mut etags = std::collections::BTreeMap::new();
        for f in &files {
            if !dir.join(f).exists() {
                if download {
                    tracing::info!(repo = %repo.id, file = %f, "fetching");
                    self.download(repo, &info.sha, f)?;
                } else {
                    let url = format!("{}/{}/resolve/{}/{f}", self.endpoint, repo.repo().url(), info.sha);
                    etags.insert(f.clone(), self.head(repo, f, &url)?.etag);
                    continue;
                }
            }
            if let Some(etag) = linked_etag(&dir.join(f)) {
                etags.insert(f.clone(), etag);
            }
        }
        if repo.revision.as_deref() != Some(info.sha.as_str()) {
            let rev = repo.revision.as_deref().unwrap_or("main");
            let refs = self.cache.path().join(repo.repo().folder_name()).join("refs");
            let io = |e: std::io::Error| HubError::Cache { path: refs.clone(), message: e.to_string() };
            std::fs::create_dir_all(refs.join(rev).parent().unwrap_or(&refs)).map_err(io)?;
            std::fs::write(refs.join(rev), &info.sha).map_err(io)?;
        }
        Ok(Snapshot { revision: info.sha, dir, files, etags })
    }

    /// What an error of hf-hub (its repository info call) means.
    fn classify(&self, repo: &HubRepo, file: Option<&str>, error: ApiError) -> HubError {
        let (name, endpoint) = (repo.display(), self.endpoint.clone());
        match error {
            ApiError::TooManyRetries(inner) => self.classify(repo, file, *inner),
            ApiError::RequestError(e) => self.classify_request(repo, file, *e),
            ApiError::MissingHeader(h) | ApiError::InvalidHeader(h) => {
                HubError::Protocol { repo: name, endpoint, message: format!("its answer lacks a valid `{h}` header") }
            }
            other => HubError::Unreachable { repo: name, endpoint, reason: other.to_string() },
        }
    }

    /// What a failed request means, from the status and the hub's
    /// `X-Error-Code` / `X-Error-Message` headers.
    fn classify_request(&self, repo: &HubRepo, file: Option<&str>, error: ureq::Error) -> HubError {
        let (name, endpoint, token) = (repo.display(), self.endpoint.clone(), self.token_source.clone());
        let (status, response) = match error {
            ureq::Error::Status(status, response) => (status, response),
            ureq::Error::Transport(t) => return HubError::Unreachable { repo: name, endpoint, reason: t.to_string() },
        };
        let code = response.header("x-error-code").map(str::to_string);
        let message = response.header("x-error-message").map(str::to_string);
        let page = repo.page(&self.endpoint);
        let gated = code.as_deref() == Some("GatedRepo")
            || (status == 403 && message.as_deref().is_some_and(|m| m.contains("gated")));
        match (status, code.as_deref(), file) {
            (401 | 403, _, _) if gated => HubError::Gated { repo: name, page, status, token, message },
            (_, Some("RepoNotFound"), None) | (404, None, None) => {
                HubError::RepoNotFound { repo: name, page, status, token, message }
            }
            (_, Some("RevisionNotFound"), _) => HubError::RevisionNotFound {
                repo: name,
                revision: repo.revision.clone().unwrap_or_else(|| "main".into()),
                message,
            },
            (404, _, Some(file)) => HubError::EntryNotFound { repo: name, file: file.to_string(), message },
            (401, _, _) if token != TokenSource::None => HubError::BadToken { repo: name, status, token, message },
            (401 | 403, _, _) => HubError::RepoNotFound { repo: name, page, status, token, message },
            _ => HubError::Status { repo: name, endpoint, status, message },
        }
    }
}

/// Where `huggingface-cli login` keeps the token (`HF_TOKEN_PATH`, or
/// `$HF_HOME/token`).
fn token_path() -> PathBuf {
    if let Ok(p) = std::env::var("HF_TOKEN_PATH") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HF_HOME").map(PathBuf::from).unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
        PathBuf::from(home).join(".cache").join("huggingface")
    });
    home.join("token")
}

fn snapshot_dir(cache: &Cache, repo: &HubRepo, commit: &str) -> PathBuf {
    cache.path().join(repo.repo().folder_name()).join("snapshots").join(commit)
}

/// The revision's files from the cache alone; `offline` adds the advice to
/// unset `HF_HUB_OFFLINE`.
fn from_cache(cache: &Cache, repo: &HubRepo, want: &dyn Fn(&str) -> bool, offline: bool) -> Result<Snapshot> {
    let repo_dir = cache.path().join(repo.repo().folder_name());
    let rev = repo.revision.clone().unwrap_or_else(|| "main".into());
    let commit = if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        rev.clone()
    } else {
        let ref_path = repo_dir.join("refs").join(&rev);
        std::fs::read_to_string(&ref_path).map(|s| s.trim().to_string()).with_context(|| {
            format!(
                "{} is not in the Hugging Face cache at {} (no {}); point HF_HOME at a cache that \
                     holds it{}",
                repo.display(),
                cache.path().display(),
                ref_path.display(),
                if offline { ", or unset HF_HUB_OFFLINE to download it" } else { "" }
            )
        })?
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    if !dir.is_dir() {
        bail!("{}: revision {commit} is not in the cache ({} is missing)", repo.display(), dir.display());
    }
    let files: Vec<String> = pipeline_fs::list_files(&dir)?.into_iter().filter(|f| want(f)).collect();
    let etags = files.iter().filter_map(|f| linked_etag(&dir.join(f)).map(|e| (f.clone(), e))).collect();
    Ok(Snapshot { revision: commit, dir, files, etags })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dataset_uris() {
        let r = HubRepo::parse_dataset("datasets/shawhin/tool-use-finetuning@v1").unwrap();
        assert_eq!(r.id, "shawhin/tool-use-finetuning");
        assert_eq!(r.revision.as_deref(), Some("v1"));
        assert!(HubRepo::parse_dataset("shawhin/x").is_err());
        assert!(HubRepo::parse_model("google").is_err());
        assert!(HubRepo::parse_model("a/b@").is_err());
    }
}
