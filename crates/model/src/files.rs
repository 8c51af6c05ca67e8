//! The files of a model on disk: weights (`*.safetensors` or one `.gguf`),
//! `config.json`, the tokenizer and its configuration, a chat template.

use std::path::{Path, PathBuf};

use pipeline_fs::IoContext;

use crate::error::{Error, Result, bad_file};

/// The files of a base model, as found on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// Where the files came from, as the user wrote it (`[model] base`,
    /// `--model`): named in messages.
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
    /// The hub's identity (etag: LFS sha256) of weights files by name, for
    /// a `hf://` source: stages are keyed on it, so the weights need not be
    /// on disk (nor hashed) to plan; they are fetched when a stage runs.
    pub weight_ids: std::collections::BTreeMap<String, String>,
    /// Why the GGUF's own tokenizer could not stand in for a missing
    /// `tokenizer.json`, for the message when one is needed.
    pub gguf_tokenizer_unread: Option<String>,
}

impl ModelFiles {
    /// The files found in a model directory (in Hugging Face layout).
    pub fn from_dir(source: &str, dir: &Path) -> Result<ModelFiles> {
        let file = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        let mut weights: Vec<PathBuf> = std::fs::read_dir(dir)
            .on("list the model directory", dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        weights.sort();
        if weights.is_empty() {
            let mut ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
                .on("list the model directory", dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            ggufs.sort();
            weights.extend(ggufs.into_iter().take(1));
        }
        Ok(ModelFiles {
            source: source.to_string(),
            dir: dir.to_path_buf(),
            tokenizer_json: file("tokenizer.json"),
            tokenizer_config: file("tokenizer_config.json"),
            config_json: file("config.json"),
            chat_template_file: file("chat_template.jinja"),
            weights,
            revision: None,
            weight_ids: Default::default(),
            gguf_tokenizer_unread: None,
        })
    }

    /// A GGUF model without `tokenizer.json` uses the tokenizer and chat
    /// template its metadata carries ([`crate::gguf_tokenizer`]);
    /// `tokenizer_config.json` too when there is none.
    pub fn with_tokenizer_from_gguf(mut self) -> Result<ModelFiles> {
        if self.tokenizer_json.is_some() || !self.is_gguf() {
            return Ok(self);
        }
        match crate::gguf_tokenizer::materialize(&self.weights[0]) {
            Ok(Some(dir)) => {
                tracing::debug!(gguf = %self.weights[0].display(), dir = %dir.display(), "tokenizer from the GGUF");
                self.tokenizer_json = Some(dir.join("tokenizer.json"));
                if self.tokenizer_config.is_none() {
                    self.tokenizer_config = Some(dir.join("tokenizer_config.json"));
                }
            }
            Ok(None) => {}
            // A vocabulary of a kind not read here (Unigram, RWKV…): the
            // model works where no tokenizer is needed, and
            // `tokenizer_json` says what to provide where one is.
            Err(Error::Unsupported(why)) => self.gguf_tokenizer_unread = Some(why),
            Err(e) => return Err(e),
        }
        Ok(self)
    }

    /// Whether the weights are a GGUF file.
    pub fn is_gguf(&self) -> bool {
        self.weights.first().is_some_and(|w| w.extension().is_some_and(|e| e == "gguf"))
    }

    /// `tokenizer.json`, or an error saying how to provide one.
    pub fn tokenizer_json(&self) -> Result<&Path> {
        self.tokenizer_json.as_deref().ok_or_else(|| {
            let gguf = self.gguf_tokenizer_unread.as_ref().map(|w| format!(" ({w})")).unwrap_or_default();
            Error::Missing(format!(
                "the model `{}` has no tokenizer.json (looked in {}){gguf}; set [model] tokenizer = \"DIR\" \
                 to a directory holding tokenizer.json and tokenizer_config.json",
                self.source,
                self.dir.display()
            ))
        })
    }

    /// The parsed `tokenizer_config.json` (empty object when absent).
    pub fn tokenizer_config(&self) -> Result<serde_json::Value> {
        match &self.tokenizer_config {
            Some(p) => {
                let bytes = std::fs::read(p).on("read", p)?;
                serde_json::from_slice(&bytes).map_err(|e| bad_file(p, format!("not valid JSON: {e}")))
            }
            None => Ok(serde_json::json!({})),
        }
    }
}

/// What a model says about itself, for the model card of a fine-tune:
/// from the front matter of its `README.md` (a hub snapshot's model card)
/// or a GGUF's `general.*` metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Provenance {
    /// A hub id (`google/gemma-3-270m`), when the files name one.
    pub hub_id: Option<String>,
    pub license: Option<String>,
    /// `gemma3`, `qwen3`…
    pub architecture: Option<String>,
    /// A human name (`Gemma 3 270m`).
    pub name: Option<String>,
}

impl ModelFiles {
    /// Reads [`Provenance`] from the model's card and weights; what they do
    /// not say stays `None`.
    pub fn provenance(&self) -> Provenance {
        let mut p = Provenance::default();
        if let Ok(readme) = std::fs::read_to_string(self.dir.join("README.md")) {
            let front = readme.strip_prefix("---\n").and_then(|r| r.split("\n---").next()).unwrap_or_default();
            for line in front.lines() {
                if let Some(v) = line.strip_prefix("license:") {
                    p.license = Some(v.trim().trim_matches('"').to_string()).filter(|v| !v.is_empty());
                }
            }
        }
        if let Some(c) = self.config_json.as_ref().and_then(|c| std::fs::read(c).ok()) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&c) {
                p.architecture = v.get("model_type").and_then(|t| t.as_str()).map(str::to_string);
            }
        }
        if self.is_gguf() {
            if let Some(meta) = self.weights.first().and_then(|w| gguf_metadata(w)) {
                let s = |k: &str| meta.get(k).and_then(|v| v.to_string().ok()).cloned();
                p.license = p.license.or_else(|| s("general.license"));
                p.architecture = p.architecture.or_else(|| s("general.architecture"));
                p.name = s("general.name");
                p.hub_id = s("general.base_model.0.repo_url")
                    .or_else(|| s("general.source.huggingface.repository"))
                    .and_then(|u| u.strip_prefix("https://huggingface.co/").map(str::to_string));
            }
        }
        p
    }
}

fn gguf_metadata(path: &Path) -> Option<std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>> {
    let mut f = std::fs::File::open(path).ok()?;
    Some(candle_core::quantized::gguf_file::Content::read(&mut f).ok()?.metadata)
}
