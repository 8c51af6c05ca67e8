//! Resolving `[model] base` (or `--model`) to files on disk.
//!
//! A base model is one of:
//! - `hf://OWNER/NAME[@REV]`: fetched into the Hugging Face cache
//!   (`HF_HOME`); with `HF_HUB_OFFLINE=1` only the cache is read. The small
//!   files (config, tokenizer, card) come at once; the weights only when a
//!   stage reads them ([`fetch_weights`]): until then they are known by the
//!   hub's identity of each file (its etag), which is what keys stages;
//! - a local directory in Hugging Face layout (`config.json`,
//!   `tokenizer.json`, `tokenizer_config.json`, `*.safetensors`, or a `.gguf`);
//! - a local `.gguf` file (tokenizer files beside it or via `[model] tokenizer`).

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::settings::{ModelSpec, Settings, resolve_against};
use pipeline_data::hub::{self, HubRepo};
pub use pipeline_model::ModelFiles;

/// The small files every model directory may carry.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
    "README.md",
];

/// Finds the model files for a recipe's `[model]` table; the weights of a
/// `hf://` model may not be downloaded yet ([`fetch_weights`]).
pub fn resolve(settings: &Settings) -> Result<ModelFiles> {
    resolve_spec(&settings.model, &settings.base_dir, &settings.path)
}

/// [`resolve`], with the weights on disk.
pub fn resolve_with_weights(settings: &Settings) -> Result<ModelFiles> {
    let m = resolve(settings)?;
    fetch_weights(&m)?;
    Ok(m)
}

/// Finds the model files for a path or `hf://` id given on the command
/// line, weights included.
pub fn from_path(path: &Path) -> Result<ModelFiles> {
    let spec = ModelSpec { base: path.display().to_string(), tokenizer: None, chat_template: None, hub_id: None };
    let m = resolve_spec(&spec, Path::new("."), Path::new("--model"))?;
    fetch_weights(&m)?;
    Ok(m)
}

/// Downloads the weights of a `hf://` model that are not on disk yet, at
/// the commit it resolved to (a no-op for local models).
pub fn fetch_weights(m: &ModelFiles) -> Result<()> {
    let missing: Vec<String> = m
        .weights
        .iter()
        .filter(|w| !w.is_file())
        .filter_map(|w| w.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let rest = m
        .source
        .strip_prefix("hf://")
        .with_context(|| format!("the weights of `{}` are missing: {}", m.source, missing.join(", ")))?;
    let mut repo = HubRepo::parse_model(rest)?;
    repo.revision = m.revision.clone().or(repo.revision);
    hub::fetch_files(&repo, |name| missing.iter().any(|f| f == name), crate::report::draws_bars())
        .with_context(|| format!("cannot fetch the weights of `{}`", m.source))?;
    Ok(())
}

/// `spec`'s files, relative paths resolved against `base_dir`; `origin`
/// (the recipe file) is named in messages.
fn resolve_spec(spec: &ModelSpec, base_dir: &Path, origin: &Path) -> Result<ModelFiles> {
    let resolve_path = |p: &str| resolve_against(base_dir, p);
    let mut model = if let Some(rest) = spec.base.strip_prefix("hf://") {
        let repo = HubRepo::parse_model(rest).with_context(|| format!("[model] base = \"{}\"", spec.base))?;
        let fetch_err = || format!("cannot fetch the model `{}` ([model] base)", spec.base);
        let snapshot = hub::fetch_files(&repo, |name| MODEL_FILES.contains(&name), crate::report::draws_bars())
            .with_context(fetch_err)?;
        // The weights at the same commit, by identity only.
        let pinned = HubRepo { revision: Some(snapshot.revision.clone()), ..repo.clone() };
        let weights = hub::identify(&pinned, |name| name.ends_with(".safetensors")).with_context(fetch_err)?;
        let mut m = ModelFiles::from_dir(&spec.base, &snapshot.dir)?;
        m.weights = weights.files.iter().map(|f| weights.dir.join(f)).collect();
        m.weight_ids = weights.etags;
        m.revision = Some(snapshot.revision);
        m
    } else {
        let path = resolve_path(&spec.base);
        if path.is_dir() {
            ModelFiles::from_dir(&spec.base, &path)?
        } else if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            let mut m = ModelFiles::from_dir(&spec.base, &dir)?;
            m.weights = vec![path];
            m
        } else {
            bail!(
                "{}: [model] base = \"{}\" is not a directory, a .gguf file or an hf:// id \
                 (resolved to {}); run scripts/fetch-models.sh to provision the local models",
                origin.display(),
                spec.base,
                path.display()
            );
        }
    };
    if let Some(tok) = &spec.tokenizer {
        let p = resolve_path(tok);
        let (json, cfg) = if p.is_dir() {
            (p.join("tokenizer.json"), p.join("tokenizer_config.json"))
        } else {
            (p.clone(), p.with_file_name("tokenizer_config.json"))
        };
        if !json.is_file() {
            bail!("{}: [model] tokenizer = \"{tok}\": no tokenizer.json at {}", origin.display(), json.display());
        }
        model.tokenizer_json = Some(json);
        model.tokenizer_config = cfg.is_file().then_some(cfg);
    }
    Ok(model.with_tokenizer_from_gguf()?)
}
