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
        })
    }

    /// Whether the weights are a GGUF file.
    pub fn is_gguf(&self) -> bool {
        self.weights.first().is_some_and(|w| w.extension().is_some_and(|e| e == "gguf"))
    }

    /// `tokenizer.json`, or an error saying how to provide one.
    pub fn tokenizer_json(&self) -> Result<&Path> {
        self.tokenizer_json.as_deref().ok_or_else(|| {
            Error::Missing(format!(
                "the model `{}` has no tokenizer.json (looked in {}); set [model] tokenizer = \"DIR\" \
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
