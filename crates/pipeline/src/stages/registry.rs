//! The stage kinds, listed once.
//!
//! [`stage_kinds!`] turns the list at the bottom into everything that must
//! know every kind: the recipe's [`StageSpec`] (whose variants serde reads
//! and schemars describes), [`KINDS`], each parameter type's
//! [`Kind::KIND`], and the dispatch from a `StageSpec` to its kind's
//! [`Stage`] and [`StageKind`] implementations. Adding a kind: a module in
//! `stages/` whose `Params` implement `Stage` and `StageKind`, and one line
//! here.

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::kind::{Artifact, Evaluates, Input, Kind, Rule, StageKind, SweepMetrics};
use super::{
    Stage, custom, evaluate, fetch_dataset, format_chat, lora_train, merge, ollama_modelfile, quantize, tokenize,
};

/// Makes custom kind `kind` usable in recipes, with parameters of type `P`
/// (see [`custom`]). Panics if `kind` is a built-in kind.
pub fn register<P: custom::CustomStage + serde::de::DeserializeOwned + 'static>(kind: &str) {
    assert!(!KINDS.contains(&kind), "`{kind}` is a built-in stage kind");
    custom::add::<P>(kind);
}

macro_rules! stage_kinds {
    ($( $(#[$doc:meta])* $kind:literal => $variant:ident($params:ty), )*) => {
        /// One `[stages.NAME]` table: a `kind` and that kind's parameters.
        #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
        #[serde(tag = "kind")]
        pub enum StageSpec {
            $( $(#[$doc])* #[serde(rename = $kind)] $variant($params), )*
            /// A kind registered by a program using the library
            /// ([`custom`]); not part of the schema.
            #[serde(skip)]
            #[schemars(skip)]
            Custom(custom::CustomSpec),
        }

        $( impl Kind for $params { const KIND: &'static str = $kind; } )*

        /// All built-in stage kinds, as recipes write them.
        pub const KINDS: &[&str] = &[$($kind),*];

        impl StageSpec {
            /// The `kind` string as written in recipes.
            pub fn kind(&self) -> &str {
                match self {
                    $( StageSpec::$variant(_) => $kind, )*
                    StageSpec::Custom(c) => &c.kind,
                }
            }

            /// The implementation of this stage's kind.
            pub fn stage(&self) -> &dyn Stage {
                match self {
                    $( StageSpec::$variant(p) => p, )*
                    StageSpec::Custom(c) => c.stage.as_ref(),
                }
            }

            /// The stages this one reads: (parameter name, stage name, kinds allowed).
            pub fn inputs(&self) -> Vec<Input<'_>> {
                match self {
                    $( StageSpec::$variant(p) => p.inputs(), )*
                    StageSpec::Custom(c) => {
                        c.inputs().iter().map(|(role, stage)| Input { role, stage, kinds: &[] }).collect()
                    }
                }
            }

            /// The kind's own parameter rules.
            pub fn check(&self) -> Result<(), Rule> {
                match self {
                    $( StageSpec::$variant(p) => p.check(), )*
                    StageSpec::Custom(_) => Ok(()),
                }
            }

            /// See [`StageKind::model_artifact`].
            pub fn model_artifact(&self) -> Option<(Artifact, Option<&str>)> {
                match self {
                    $( StageSpec::$variant(p) => p.model_artifact(), )*
                    StageSpec::Custom(_) => None,
                }
            }

            /// See [`StageKind::evaluates`].
            pub fn evaluates(&self) -> Option<Evaluates<'_>> {
                match self {
                    $( StageSpec::$variant(p) => p.evaluates(), )*
                    StageSpec::Custom(_) => None,
                }
            }

            /// See [`StageKind::sweep_metrics`].
            pub fn sweep_metrics(&self, entry: &Path) -> anyhow::Result<SweepMetrics> {
                match self {
                    $( StageSpec::$variant(p) => p.sweep_metrics(entry), )*
                    StageSpec::Custom(_) => Ok(SweepMetrics::default()),
                }
            }

            /// See [`StageKind::hub_datasets`].
            pub fn hub_datasets(&self) -> Vec<String> {
                match self {
                    $( StageSpec::$variant(p) => p.hub_datasets(), )*
                    StageSpec::Custom(_) => Vec::new(),
                }
            }

            /// Whether `pipeline export` copies this stage's output.
            pub fn is_exported(&self) -> bool {
                match self {
                    $( StageSpec::$variant(_) => <$params as StageKind>::EXPORTED, )*
                    StageSpec::Custom(_) => false,
                }
            }
        }

        /// The built-in kinds `pipeline export` copies.
        pub fn exported_kinds() -> Vec<&'static str> {
            let mut out = Vec::new();
            $( if <$params as StageKind>::EXPORTED { out.push($kind); } )*
            out
        }

        /// Reads `doc` (one stage table in an otherwise blank recipe) as the
        /// parameters of `kind`, returning serde's error if it fails (to
        /// locate errors of the untyped pass; see `recipe::locate`).
        pub fn params_error(kind: &str, doc: &str) -> Option<toml::de::Error> {
            #[derive(Deserialize)]
            #[allow(dead_code)] // read only for its errors
            struct Only<P> {
                stages: indexmap::IndexMap<String, P>,
            }
            match kind {
                $( $kind => toml::from_str::<Only<$params>>(doc).err(), )*
                _ => None,
            }
        }
    };
}

stage_kinds! {
    /// Read a dataset (hub or local files) into normalized rows per split.
    "fetch-dataset" => FetchDataset(fetch_dataset::Params),
    /// Render rows as conversations with the model's chat template.
    "format-chat" => FormatChat(format_chat::Params),
    /// Tokenize conversations into ids and a loss mask.
    "tokenize" => Tokenize(tokenize::Params),
    /// Train a LoRA adapter on tokenized examples.
    "lora-train" => LoraTrain(lora_train::Params),
    /// Generate answers for a split and score them (tool calls, QA), with eval loss.
    "evaluate" => Evaluate(evaluate::Params),
    /// Fold a LoRA adapter into the base weights: an HF model directory.
    "merge" => Merge(merge::Params),
    /// Write GGUF files (f32 … q4_k_m) for llama.cpp and Ollama.
    "quantize" => Quantize(quantize::Params),
    /// An Ollama Modelfile serving a GGUF with the trained chat template.
    "ollama-modelfile" => OllamaModelfile(ollama_modelfile::Params),
}
