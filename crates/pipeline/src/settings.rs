//! The recipe-level settings stages read: the recipe's name, seed, device
//! and logging, its base model, and where its relative paths resolve.
//! Stages see these, not the recipe (whose stage table is built from the
//! stage kinds), so stage kinds and the recipe do not import each other.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What stages read of their recipe ([`crate::recipe::Recipe::settings`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[recipe] name`.
    pub name: String,
    /// `[recipe] seed`.
    pub seed: u64,
    /// `[recipe] device`.
    pub device: String,
    /// `[recipe] report_to`.
    pub report_to: Vec<ReportTo>,
    /// The `[model]` table.
    pub model: ModelSpec,
    /// The directory relative paths in the recipe resolve against.
    pub base_dir: PathBuf,
    /// The recipe file (for messages).
    pub path: PathBuf,
}

impl Settings {
    /// Resolves a path written in the recipe.
    pub fn resolve_path(&self, p: &str) -> PathBuf {
        resolve_against(&self.base_dir, p)
    }
}

/// A logging integration for `report_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    Tensorboard,
    None,
}

/// The `[model]` table.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The base model: `hf://OWNER/NAME[@REV]`, a local directory in Hugging
    /// Face layout (config.json, tokenizer.json, tokenizer_config.json,
    /// *.safetensors or a *.gguf), or a local `.gguf` file. Relative paths
    /// resolve against the recipe's directory.
    pub base: String,
    /// Where to take `tokenizer.json` (and `tokenizer_config.json`) from, when
    /// not beside the weights: a directory or a `tokenizer.json` path.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// The chat template used in training *and* written into the served
    /// model: `model` (default: the one in tokenizer_config.json), a built-in
    /// (`gemma`, `gemma-tools`, `chatml`, `chatml-tools`, `alpaca`), or the path of a Jinja file.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// The base model's Hugging Face id, for the model cards `export`
    /// writes, when `base` is a local path (e.g. `google/gemma-3-270m`;
    /// default: the id of an `hf://` base, else what its files say). Not
    /// part of any cache key.
    #[serde(default)]
    pub hub_id: Option<String>,
}

/// `p` if absolute, else `p` under `base`.
pub fn resolve_against(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() { p.to_path_buf() } else { base.join(p) }
}
