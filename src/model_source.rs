//! Resolving `[model] base` to files on disk.
//!
//! A base model is one of:
//! - `hf://OWNER/NAME[@REV]`: fetched with `hf-hub` into the Hugging Face
//!   cache (`HF_HOME`); with `HF_HUB_OFFLINE=1` only the cache is read;
//! - a local directory in Hugging Face layout (`config.json`,
//!   `tokenizer.json`, `tokenizer_config.json`, `*.safetensors`, or a `.gguf`);
//! - a local `.gguf` file (tokenizer files beside it or via `[model] tokenizer`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::data::hub::{self, HubRepo};
use crate::recipe::{ModelSpec, Recipe, resolve_against};

/// The small files every model directory may carry.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
];

/// The files of a base model, as found on disk.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// `[model] base` as written.
    pub source: String,
    /// The directory holding the model's files.
    pub dir: PathBuf,
    pub tokenizer_json: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub config_json: Option<PathBuf>,
    /// A `chat_template.jinja` file (newer HF layout), if present.
    pub chat_template_file: Option<PathBuf>,
    /// `*.safetensors` files, or a single `.gguf`.
    pub weights: Vec<PathBuf>,
    /// The hub revision a `hf://` source resolved to.
    pub revision: Option<String>,
}

impl ResolvedModel {
    /// Finds the model files for a recipe's `[model]` table.
    pub fn resolve(recipe: &Recipe) -> Result<ResolvedModel> {
        ResolvedModel::resolve_spec(&recipe.model, &recipe.base_dir(), &recipe.path)
    }

    /// Finds the model files for a path or `hf://` id given on the command line.
    pub fn from_path(path: &Path) -> Result<ResolvedModel> {
        let spec = ModelSpec { base: path.display().to_string(), tokenizer: None, chat_template: None };
        ResolvedModel::resolve_spec(&spec, Path::new("."), Path::new("--model"))
    }

    /// `spec`'s files, relative paths resolved against `base_dir`; `origin`
    /// (the recipe file) is named in messages.
    fn resolve_spec(spec: &ModelSpec, base_dir: &Path, origin: &Path) -> Result<ResolvedModel> {
        let resolve_path = |p: &str| resolve_against(base_dir, p);
        let mut model = if let Some(rest) = spec.base.strip_prefix("hf://") {
            let repo = HubRepo::parse_model(rest).with_context(|| format!("[model] base = \"{}\"", spec.base))?;
            let snapshot =
                hub::fetch_files(&repo, |name| MODEL_FILES.contains(&name) || name.ends_with(".safetensors"))
                    .with_context(|| format!("cannot fetch the model `{}` ([model] base)", spec.base))?;
            let mut m = ResolvedModel::from_dir(&spec.base, &snapshot.dir)?;
            m.revision = Some(snapshot.revision);
            m
        } else {
            let path = resolve_path(&spec.base);
            if path.is_dir() {
                ResolvedModel::from_dir(&spec.base, &path)?
            } else if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
                let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                let mut m = ResolvedModel::from_dir(&spec.base, &dir)?;
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
        Ok(model)
    }

    fn from_dir(source: &str, dir: &Path) -> Result<ResolvedModel> {
        let file = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list the model directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        weights.sort();
        if weights.is_empty() {
            let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            ggufs.sort();
            weights.extend(ggufs.into_iter().take(1));
        }
        Ok(ResolvedModel {
            source: source.to_string(),
            dir: dir.to_path_buf(),
            tokenizer_json: file("tokenizer.json"),
            tokenizer_config: file("tokenizer_config.json"),
            config_json: file("config.json"),
            chat_template_file: file("chat_template.jinja"),
            weights,
            revision: None,
        })
    }

    /// `tokenizer.json`, or an error saying how to provide one.
    /// Whether the weights are a GGUF file.
    pub fn is_gguf(&self) -> bool {
        self.weights.first().is_some_and(|w| w.extension().is_some_and(|e| e == "gguf"))
    }

    pub fn tokenizer_json(&self) -> Result<&Path> {
        self.tokenizer_json.as_deref().with_context(|| {
            format!(
                "the model `{}` has no tokenizer.json (looked in {}); set [model] tokenizer = \"DIR\" \
                 to a directory holding tokenizer.json and tokenizer_config.json",
                self.source,
                self.dir.display()
            )
        })
    }

    /// The parsed `tokenizer_config.json` (empty object when absent).
    pub fn tokenizer_config(&self) -> Result<serde_json::Value> {
        match &self.tokenizer_config {
            Some(p) => {
                let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid JSON", p.display()))
            }
            None => Ok(serde_json::json!({})),
        }
    }
}
