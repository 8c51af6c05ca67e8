//! What a stage kind is, beside [`Stage`]: its name in recipes ([`Kind`]),
//! the stages it reads, its parameter rules, and what the commands that
//! read finished entries ask of it ([`StageKind`]). The kinds implement
//! these; [`super::registry`] lists the kinds and dispatches to them.

use std::collections::BTreeMap;
use std::path::Path;

use pipeline_infer::eval::Metric;
use pipeline_train::checkpoint::LogRow;

use super::Stage;

/// A kind's name as recipes write it (`kind = "lora-train"`); generated
/// from the registry.
pub trait Kind {
    const KIND: &'static str;
}

/// What the executor and the recipe checks need from a built-in kind,
/// beside [`Stage`].
pub trait StageKind: Stage + Kind {
    /// The stages this one reads.
    fn inputs(&self) -> Vec<Input<'_>>;

    /// Rules serde cannot express: `Err((key, message, help))`.
    fn check(&self) -> Result<(), Rule> {
        Ok(())
    }

    /// Whether `pipeline export` copies this kind's finished output.
    const EXPORTED: bool = false;

    /// The model this kind's output is, for the model card `export` writes
    /// beside it: the artifact and the `lora-train` stage whose training it
    /// carries (`None`: this stage's own).
    fn model_artifact(&self) -> Option<(Artifact, Option<&str>)> {
        None
    }

    /// Whether this kind scores models, and which `lora-train` stage's
    /// adapter (`adapter: None`: the base model only).
    fn evaluates(&self) -> Option<Evaluates<'_>> {
        None
    }

    /// What `pipeline compare` shows of this kind's finished `entry` in its
    /// variant's row (nothing by default).
    fn sweep_metrics(&self, _entry: &Path) -> anyhow::Result<SweepMetrics> {
        Ok(SweepMetrics::default())
    }

    /// The hub datasets (`owner/name`) this stage reads, for model cards.
    fn hub_datasets(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The model files a stage kind writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Artifact {
    /// A PEFT LoRA adapter (`library_name: peft`).
    Adapter,
    /// The base model with the adapter merged in (`library_name: transformers`).
    Merged,
}

/// What an evaluating stage evaluates.
#[derive(Debug, Clone, Copy)]
pub struct Evaluates<'a> {
    /// The `lora-train` stage whose adapter is scored (`None`: only the base).
    pub adapter: Option<&'a str>,
}

/// What a finished stage adds to its variant's row in `pipeline compare`;
/// each kind fills what it measured.
#[derive(Debug, Clone, Default)]
pub struct SweepMetrics {
    /// An evaluation's overall metrics (of the adapter, else the base model).
    pub metrics: BTreeMap<String, Metric>,
    /// The same per group (`query_type`, or the evaluation's `group_by`).
    pub groups: BTreeMap<String, BTreeMap<String, Metric>>,
    /// A training's run time (its last run, when resumed).
    pub train_seconds: Option<f64>,
    /// A training's loss on its eval split at the end.
    pub eval_loss_after: Option<f64>,
    /// A training's loss curve.
    pub log: Vec<LogRow>,
}

/// A broken parameter rule: (key, message, help; help may be empty).
pub type Rule = (&'static str, String, String);

/// A reference from one stage to another, by parameter ("role").
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The parameter that holds the reference, e.g. `dataset`.
    pub role: &'static str,
    /// The referenced stage's name.
    pub stage: &'a str,
    /// Which kinds that stage may be (empty: any).
    pub kinds: &'static [&'static str],
}
