//! The recipe: one TOML file describing a DAG of stages.
//!
//! ```toml
//! [recipe]
//! name = "quickstart"
//!
//! [model]
//! base = "../models/gemma-3-270m"
//!
//! [stages.data]
//! kind = "fetch-dataset"
//! source = "hf://datasets/shawhin/tool-use-finetuning"
//!
//! [stages.chat]
//! kind = "format-chat"
//! dataset = "data"          # a reference: the stage this one reads
//! ```
//!
//! The Rust types here are the single source of truth: serde reads them
//! (unknown keys are errors), schemars generates `schema/recipe.schema.json`
//! from them, and the cache key hashes their canonical form with defaults
//! filled in. Parsing ([`Recipe::parse`]) reports mistakes with file, line,
//! column and key, and a "did you mean" where a typo is likely.

mod locate;
mod overrides;

use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::{Location, RecipeError, did_you_mean};
pub use crate::settings::{ModelSpec, ReportTo, Settings, resolve_against};
pub use crate::stages::kind::Input;
pub use crate::stages::registry::{KINDS, StageSpec};

pub use overrides::Override;

/// A parsed and validated recipe.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "pipeline recipe")]
pub struct Recipe {
    /// Name, device and seed of this recipe.
    pub recipe: RecipeMeta,
    /// The base model every stage of this recipe works with.
    pub model: ModelSpec,
    /// The stages, by name. Each names the stages it reads; together they
    /// form a DAG.
    pub stages: IndexMap<String, StageSpec>,
    /// Sweep axes: each key a recipe key as `--set` names it
    /// (`"stages.train.learning_rate"`), each value the list of values it
    /// takes. `pipeline run` runs every combination, sharing the stages they
    /// do not change; `pipeline compare` ranks them (see `pipeline::sweep`).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub sweep: IndexMap<String, Vec<serde_json::Value>>,
    /// Where the recipe was read from (relative paths in it resolve against
    /// this file's directory). Not part of the TOML.
    #[serde(skip)]
    #[schemars(skip)]
    pub path: PathBuf,
    /// For a variant of a sweep: its label (`learning_rate=0.0002 rank=8`).
    /// Not part of the TOML, nor of any key.
    #[serde(skip)]
    #[schemars(skip)]
    pub variant: Option<String>,
}

/// The `[recipe]` table.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecipeMeta {
    /// A short name; used in logs and to remember which cache entry each
    /// stage of this recipe last produced.
    pub name: String,
    /// Free text for people reading the recipe.
    #[serde(default)]
    pub description: Option<String>,
    /// Where numeric stages run: `cpu`, `cuda`, `cuda:N`, `metal` or `auto`
    /// (the first GPU found, else CPU).
    #[serde(default = "default_device")]
    pub device: String,
    /// Seed for every random choice (sampling rows, data order, LoRA init,
    /// dropout). Same seed, same inputs: same result.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where trainings also log as they run, as transformers' `report_to`:
    /// `["tensorboard"]` (the default: event files in the training's work
    /// dir, whose path is logged) or `["none"]`. A finished training holds
    /// `trainer_state.json` and TensorBoard files either way; this is not
    /// part of any key.
    #[serde(default = "default_report_to")]
    pub report_to: Vec<ReportTo>,
}

fn default_report_to() -> Vec<ReportTo> {
    vec![ReportTo::Tensorboard]
}

fn default_device() -> String {
    "cpu".into()
}
fn default_seed() -> u64 {
    42
}

impl Recipe {
    /// Reads and validates a recipe file, applying `--set` overrides.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<Recipe, RecipeError> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            RecipeError::new(format!("cannot read the recipe: {e}"))
                .in_file(path)
                .help("check the path; recipes live in recipes/*.toml")
        })?;
        Recipe::parse(&source, path, overrides)
    }

    /// Parses recipe text. `path` is used for messages and to resolve
    /// relative paths; it need not exist.
    pub fn parse(source: &str, path: &Path, overrides: &[Override]) -> Result<Recipe, RecipeError> {
        let mut table: toml::Table = toml::from_str(source).map_err(|e| locate::toml_error(&e, source, path))?;
        let has_custom =
            matches!(table.get("stages"), Some(toml::Value::Table(t)) if !custom_stage_names(t).is_empty());
        // A typed pass on the text itself, so errors carry line and column
        // (serde does not know custom kinds: those recipes are read from the
        // table below only).
        if !has_custom {
            let recipe: Recipe = toml::from_str(source).map_err(|e| locate::toml_error(&e, source, path))?;
            if overrides.is_empty() {
                return recipe.finish(source, path);
            }
        }
        for o in overrides {
            o.apply(&mut table)?;
        }
        // Custom stages come out of the table before serde reads the rest.
        let mut custom_tables = Vec::new();
        if let Some(toml::Value::Table(stages)) = table.get_mut("stages") {
            for name in custom_stage_names(stages) {
                if let Some(toml::Value::Table(mut t)) = stages.remove(&name) {
                    let kind = t.remove("kind").and_then(|k| k.as_str().map(str::to_string)).unwrap_or_default();
                    custom_tables.push((name, kind, t));
                }
            }
        }
        let mut recipe: Recipe = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
            let mut err = locate::toml_error(&e, "", path);
            err.location = None;
            if !overrides.is_empty() {
                err.message = format!("{} (after applying --set overrides)", err.message);
            }
            err
        })?;
        for (name, kind, t) in custom_tables {
            let spec = crate::stages::custom::CustomSpec::build(&kind, t).map_err(|e| {
                RecipeError::new(format!("stage `{name}` ({kind}): {}", e.message().trim()))
                    .at(locate::find(source, path, &["stages", &name]))
                    .in_file(path)
                    .key(format!("stages.{name}"))
            })?;
            recipe.stages.insert(name, StageSpec::Custom(spec));
        }
        recipe.finish(source, path)
    }

    /// Sets the path, checks what serde cannot and adds the implicit stages.
    fn finish(mut self, source: &str, path: &Path) -> Result<Recipe, RecipeError> {
        self.path = path.to_path_buf();
        self.validate(source)?;
        self.add_implicit_stages();
        Ok(self)
    }

    /// The name the cache remembers this recipe's last entries by: the
    /// recipe's name, and a variant's label.
    pub fn ref_name(&self) -> String {
        match &self.variant {
            Some(v) => format!("{} [{v}]", self.recipe.name),
            None => self.recipe.name.clone(),
        }
    }

    /// Whether a stage name is one `add_implicit_stages` made.
    pub fn is_implied(stage: &str) -> bool {
        stage.contains('.')
    }

    /// Stages the recipe implies without naming them: for an `evaluate`
    /// stage NAME comparing the base model with the adapter, `NAME.base`
    /// evaluates the base model (cached apart from the adapter; see
    /// `evaluate::Params::split_off_base`). The `.` keeps these names apart
    /// from the ones a recipe can write.
    fn add_implicit_stages(&mut self) {
        let mut added = Vec::new();
        for (name, stage) in self.stages.iter_mut() {
            if let StageSpec::Evaluate(p) = stage {
                let base_name = format!("{name}.base");
                if let Some(base) = p.split_off_base(&base_name) {
                    added.push((base_name, StageSpec::Evaluate(base)));
                }
            }
        }
        self.stages.extend(added);
    }

    /// The directory relative paths in the recipe resolve against.
    pub fn base_dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// The settings its stages read ([`Settings`]).
    pub fn settings(&self) -> Settings {
        Settings {
            name: self.recipe.name.clone(),
            seed: self.recipe.seed,
            device: self.recipe.device.clone(),
            report_to: self.recipe.report_to.clone(),
            model: self.model.clone(),
            base_dir: self.base_dir(),
            path: self.path.clone(),
        }
    }

    /// Resolves a path written in the recipe.
    pub fn resolve_path(&self, p: &str) -> PathBuf {
        resolve_against(&self.base_dir(), p)
    }

    /// Checks what serde cannot: names, references, devices, per-stage rules.
    /// (Cycles are found when the executor builds the graph.)
    fn validate(&self, source: &str) -> Result<(), RecipeError> {
        let loc = |keys: &[&str]| locate::find(source, &self.path, keys);
        let err =
            |keys: &[&str], msg: String| RecipeError::new(msg).at(loc(keys)).in_file(&self.path).key(keys.join("."));

        if !is_valid_device(&self.recipe.device) {
            return Err(err(&["recipe", "device"], format!("unknown device `{}`", self.recipe.device))
                .help("use one of: cpu, cuda, cuda:N, metal, auto"));
        }
        if self.stages.is_empty() {
            return Err(RecipeError::new("the recipe has no stages")
                .in_file(&self.path)
                .help("add a [stages.NAME] table with a `kind`, e.g. kind = \"fetch-dataset\""));
        }
        for (name, stage) in &self.stages {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(err(&["stages", name], format!("invalid stage name `{name}`"))
                    .help("stage names use letters, digits, `-` and `_`"));
            }
            for input in stage.inputs() {
                if !self.stages.contains_key(input.stage) {
                    let mut e = err(
                        &["stages", name, input.role],
                        format!(
                            "stage `{name}` reads `{} = \"{}\"`, but no stage is named `{}`",
                            input.role, input.stage, input.stage
                        ),
                    );
                    e.help = Some(match did_you_mean(input.stage, self.stages.keys().map(|s| s.as_str())) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!(
                            "name one of the stages: {}",
                            self.stages.keys().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    });
                    return Err(e);
                }
            }
            stage.check().map_err(|(key, msg, help)| {
                let e = err(&["stages", name, key], msg);
                if help.is_empty() { e } else { e.help(help) }
            })?;
        }
        Ok(())
    }

    /// Checks that each reference names a stage of a kind it can read. Run
    /// after cycle detection, so a cycle is reported as a cycle.
    pub fn check_input_kinds(&self, source: Option<&str>) -> Result<(), RecipeError> {
        for (name, stage) in &self.stages {
            for input in stage.inputs() {
                let target = &self.stages[input.stage];
                if !input.kinds.is_empty() && !input.kinds.contains(&target.kind()) {
                    let keys = ["stages", name.as_str(), input.role];
                    return Err(RecipeError::new(format!(
                        "`{}` must name a stage of kind {}, but `{}` is a `{}` stage",
                        input.role,
                        input.kinds.join(" or "),
                        input.stage,
                        target.kind()
                    ))
                    .at(source.and_then(|s| locate::find(s, &self.path, &keys)))
                    .in_file(&self.path)
                    .key(keys.join(".")));
                }
            }
        }
        Ok(())
    }

    /// Locates a key path in the recipe file, for messages that come later
    /// (the executor's cycle errors).
    pub fn locate(&self, keys: &[&str]) -> Option<Location> {
        let source = std::fs::read_to_string(&self.path).ok()?;
        locate::find(&source, &self.path, keys)
    }
}

/// Names of the stages whose `kind` is a registered custom kind.
fn custom_stage_names(stages: &toml::Table) -> Vec<String> {
    stages
        .iter()
        .filter(|(_, v)| v.get("kind").and_then(|k| k.as_str()).is_some_and(crate::stages::custom::is_registered))
        .map(|(k, _)| k.clone())
        .collect()
}

fn is_valid_device(d: &str) -> bool {
    matches!(d, "cpu" | "cuda" | "metal" | "auto")
        || d.strip_prefix("cuda:").is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Reads one stage table (in an otherwise blank document) as the parameters
/// of `kind`, returning the error if it fails. See `locate::toml_error`.
fn read_stage_params(kind: &str, doc: &str) -> Option<toml::de::Error> {
    crate::stages::registry::params_error(kind, doc)
}

/// The JSON schema of recipes, as written to `schema/recipe.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Recipe);
    serde_json::to_string_pretty(&schema).expect("schema serializes") + "\n"
}
