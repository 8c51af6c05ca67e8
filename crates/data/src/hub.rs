//! The Hugging Face hub through `hf-hub`, with a real offline mode.
//!
//! `HF_HOME` picks the cache, `HF_ENDPOINT` the server, `HF_TOKEN` (or the
//! cache's `token` file) the credentials. `HF_HUB_OFFLINE=1` resolves
//! everything from the cache alone, without any network attempt (hf-hub does
//! not read that variable itself, so we honour it here).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use hf_hub::{Cache, Repo, RepoType};

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

    fn display(&self) -> String {
        let prefix = if matches!(self.kind, RepoType::Dataset) { "datasets/" } else { "" };
        match &self.revision {
            Some(r) => format!("hf://{prefix}{}@{r}", self.id),
            None => format!("hf://{prefix}{}", self.id),
        }
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
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only resolution.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "True" | "yes" | "ON" | "on"))
}

/// Resolves `repo` and makes the files accepted by `want` available locally;
/// `progress` shows hf-hub's download bars (on a terminal).
pub fn fetch_files(repo: &HubRepo, want: impl Fn(&str) -> bool, progress: bool) -> Result<Snapshot> {
    let cache = Cache::from_env();
    if offline() {
        return from_cache(&cache, repo, &want);
    }
    let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| cache.token());
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_token(token)
        .with_progress(progress)
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let api_repo = api.repo(repo.repo());
    let info = match api_repo.info() {
        Ok(info) => info,
        Err(e) => {
            // No network: fall back to the cache when it has the revision.
            return from_cache(&cache, repo, &want).with_context(|| {
                format!("cannot reach the hub for {} ({e}), and the local cache does not have it", repo.display())
            });
        }
    };
    let mut files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).filter(|f| want(f)).collect();
    files.sort();
    let mut dir = None;
    for f in &files {
        tracing::info!(repo = %repo.id, file = %f, "fetching");
        let local = api_repo.get(f).with_context(|| format!("cannot download {f} from {}", repo.display()))?;
        if dir.is_none() {
            let depth = Path::new(f).components().count();
            dir = local.ancestors().nth(depth).map(Path::to_path_buf);
        }
    }
    let dir = dir.unwrap_or_else(|| snapshot_dir(&cache, repo, &info.sha));
    Ok(Snapshot { revision: info.sha, dir, files })
}

fn snapshot_dir(cache: &Cache, repo: &HubRepo, commit: &str) -> PathBuf {
    cache.path().join(repo.repo().folder_name()).join("snapshots").join(commit)
}

fn from_cache(cache: &Cache, repo: &HubRepo, want: &dyn Fn(&str) -> bool) -> Result<Snapshot> {
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
                if offline() { ", or unset HF_HUB_OFFLINE to download it" } else { "" }
            )
        })?
    };
    let dir = repo_dir.join("snapshots").join(&commit);
    if !dir.is_dir() {
        bail!("{}: revision {commit} is not in the cache ({} is missing)", repo.display(), dir.display());
    }
    let files = pipeline_fs::list_files(&dir)?.into_iter().filter(|f| want(f)).collect();
    Ok(Snapshot { revision: commit, dir, files })
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
