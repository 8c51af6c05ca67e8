//! Stage kinds. Each module holds one kind: its parameters (part of the
//! recipe schema) and its [`Stage`] implementation.
//!
//! A stage reads the artifact directories of the stages it names (finished
//! store entries, read-only) and files outside the cache, and writes its
//! outputs into `ctx.out`. It never writes anywhere else: the executor
//! publishes `out` atomically when `run` returns `Ok`.

pub mod custom;
pub mod evaluate;
pub mod fetch_dataset;
pub mod format_chat;
pub mod kind;
pub mod lora_train;
pub mod merge;
pub mod ollama_modelfile;
pub mod quantize;
pub mod registry;
pub mod tokenize;

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::settings::Settings;
pub use kind::{Input, Kind, Rule, StageKind};
use pipeline_cache::{CacheKey, HashMemo};
use pipeline_model::ModelFiles;
pub use registry::register;

/// What every stage kind implements.
pub trait Stage {
    /// Implementation version, part of the cache key. Bump it when a code
    /// change would make this kind write different bytes for the same inputs.
    fn version(&self) -> u32;

    /// Parameters in canonical form for the key: the parameters serialized
    /// with defaults filled in, plus whatever recipe-level setting the kind
    /// depends on (seed, device). The executor removes references.
    fn params(&self, env: &Env) -> serde_json::Value;

    /// Content hashes of what the stage reads from outside the cache, by a
    /// label shown in `plan` reasons (e.g. `file train.jsonl`).
    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>>;

    /// Does the work, writing into `ctx.out`; returns metrics for the manifest.
    fn run(&self, ctx: &RunContext) -> Result<serde_json::Value>;

    /// Whether the stage writes checkpoints a run can resume from (then a
    /// remote cache's newest one is pulled before it starts).
    fn resumable(&self) -> bool {
        false
    }

    /// The step a run would continue from, if `work` holds a valid
    /// checkpoint (stages that checkpoint override this).
    fn resume_point(&self, _work: &Path) -> Option<u64> {
        None
    }

    /// Whether every rank of a data-parallel job runs this stage together
    /// (`lora-train`); the others run on rank 0 alone.
    fn data_parallel(&self) -> bool {
        false
    }
}

/// What stages may consult while planning and running: the recipe's
/// settings, the content-hash memo and the (lazily resolved) base model.
pub struct Env<'a> {
    pub settings: Settings,
    pub memo: &'a HashMemo,
    model: OnceCell<std::result::Result<ModelFiles, String>>,
}

impl<'a> Env<'a> {
    pub fn new(settings: Settings, memo: &'a HashMemo) -> Self {
        Env { settings, memo, model: OnceCell::new() }
    }

    /// The base model's weights on disk: [`Env::model`], with the weights
    /// of a `hf://` model downloaded (what a stage that reads them runs on).
    pub fn model_weights(&self) -> Result<&ModelFiles> {
        let m = self.model()?;
        crate::model_source::fetch_weights(m)?;
        Ok(m)
    }

    /// The base model's files, resolved once per run; the weights of a
    /// `hf://` model may not be on disk yet ([`Env::model_weights`]).
    pub fn model(&self) -> Result<&ModelFiles> {
        self.model
            .get_or_init(|| crate::model_source::resolve(&self.settings).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Content hashes of the base model's files, labelled for `plan`
    /// reasons: its weights and `config.json`, and with `tokenizer` also
    /// `tokenizer.json` and `tokenizer_config.json` (special tokens, chat
    /// template) for stages that read them.
    pub fn base_model_inputs(&self, tokenizer: bool) -> Result<BTreeMap<String, String>> {
        let m = self.model()?;
        let mut out = BTreeMap::new();
        for w in &m.weights {
            let name = w.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            // A hub file is keyed on the hub's identity of it (nothing to
            // download or hash to plan); a local one on its content.
            let id = match m.weight_ids.get(&name) {
                Some(etag) => format!("hub etag {etag}"),
                None => self.hash_file(w)?,
            };
            out.insert(format!("base weights {name}"), id);
        }
        if let Some(c) = &m.config_json {
            out.insert("config.json".into(), self.hash_file(c)?);
        }
        if tokenizer {
            out.insert("tokenizer.json".into(), self.hash_file(m.tokenizer_json()?)?);
            if let Some(c) = &m.tokenizer_config {
                out.insert("tokenizer_config.json".into(), self.hash_file(c)?);
            }
        }
        Ok(out)
    }

    /// Content hash of a file outside the cache (memoized).
    pub fn hash_file(&self, path: &Path) -> Result<String> {
        Ok(self.memo.file(path)?)
    }
}

/// Everything `Stage::run` needs.
pub struct RunContext<'a> {
    /// The stage's name in the recipe (for messages only).
    pub name: &'a str,
    pub key: &'a CacheKey,
    /// Where outputs go; published as the store entry on success.
    pub out: PathBuf,
    /// The stage's work dir (beside `out`): keeps what a resume needs.
    pub work: PathBuf,
    /// Artifact directory of each input, by parameter name.
    pub inputs: BTreeMap<String, PathBuf>,
    pub env: &'a Env<'a>,
    /// The remote cache, when `--cache-dir` names one.
    pub remote: Option<&'a pipeline_cache::Remote>,
    /// The ranks a [`Stage::data_parallel`] stage runs on (one process:
    /// [`pipeline_train::Single`]). Only rank 0's outputs are published.
    pub world: std::rc::Rc<dyn pipeline_train::Collective>,
}

impl RunContext<'_> {
    /// Called by stages that checkpoint, after writing checkpoint directory
    /// `dir` into their work dir: pushes it to the remote cache, if any, so
    /// that a job on another machine resumes from it.
    pub fn checkpoint_saved(&self, dir: &Path) -> Result<()> {
        match self.remote {
            Some(r) => Ok(r.push_checkpoint(self.key, dir)?),
            None => Ok(()),
        }
    }

    /// The artifact directory of the input held by parameter `role`.
    pub fn input(&self, role: &str) -> &Path {
        self.inputs.get(role).map(|p| p.as_path()).unwrap_or_else(|| panic!("no input `{role}`"))
    }
}

/// Splits found in an artifact dir: `<dir>/<sub>/<split>.<ext>` files, sorted.
pub fn splits_in(dir: &Path, ext: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == ext) {
            let split = p.file_stem().unwrap().to_string_lossy().into_owned();
            out.push((split, p));
        }
    }
    out.sort();
    Ok(out)
}

/// Keeps the splits a stage was asked for (all when `wanted` is empty) and
/// fails, naming what exists, when one is missing.
pub fn select_splits(found: Vec<(String, PathBuf)>, wanted: &[String], stage: &str) -> Result<Vec<(String, PathBuf)>> {
    if wanted.is_empty() {
        return Ok(found);
    }
    let mut out = Vec::new();
    for w in wanted {
        match found.iter().find(|(s, _)| s == w) {
            Some(f) => out.push(f.clone()),
            None => anyhow::bail!(
                "stage `{stage}`: split `{w}` does not exist in its input (found: {}); fix `splits`",
                found.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }
    Ok(out)
}
