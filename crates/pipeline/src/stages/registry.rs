//! The stage kinds, listed once.
//!
//! [`stage_kinds!`] turns the list at the bottom into everything that must
//! know every kind: the recipe's [`StageSpec`] (whose variants serde reads
//! and schemars describes), [`KINDS`], each parameter type's
//! [`Kind::KIND`], and the dispatch from a `StageSpec` to its kind's
//! [`Stage`] and [`StageKind`] implementations. Adding a kind: a module in
//! `stages/` whose `Params` implement `Stage` and `StageKind`, and one line
//! here.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Stage, custom, evaluate, fetch_dataset, format_chat, lora_train, merge, ollama_modelfile, quantize, tokenize,
};

/// Makes custom kind `kind` usable in recipes, with parameters of type `P`
/// (see [`custom`]). Panics if `kind` is a built-in kind.
pub fn register<P: custom::CustomStage + serde::de::DeserializeOwned + 'static>(kind: &str) {
    assert!(!KINDS.contains(&kind), "`{kind}` is a built-in stage kind");
    custom::add::<P>(kind);
}

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
