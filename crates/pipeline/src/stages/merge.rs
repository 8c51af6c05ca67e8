//! `merge`: fold a LoRA adapter into the base weights (`pipeline_export::merge`), `W' = W + s·B·A`
//! (s = α/r, or α/√r with rsLoRA), and write a model directory in Hugging
//! Face layout that transformers loads: `config.json`, `model.safetensors`
//! (f32, bf16 or f16), `generation_config.json`, `tokenizer.json`,
//! `tokenizer_config.json` (with the chat template training used) and
//! `special_tokens_map.json`.
//!
//! A GGUF base is merged into its dequantized weights (the manifest says
//! so): the merged model is as precise as the GGUF, not as the original.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::format_chat;
use super::lora_train;
use super::{Env, Input, Kind, RunContext, Stage, StageKind};
pub use pipeline_export::merge::{WeightDtype, merge};

/// Parameters of a `merge` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The `lora-train` stage whose adapter is merged.
    pub adapter: String,
    /// The `format-chat` stage whose chat template is written into
    /// `tokenizer_config.json` (default: the base's own template).
    #[serde(default)]
    pub chat: Option<String>,
    /// Weight dtype of `model.safetensors`.
    #[serde(default)]
    pub dtype: WeightDtype,
}

impl StageKind for Params {
    const EXPORTED: bool = true;

    fn model_artifact(&self) -> Option<(super::kind::Artifact, Option<&str>)> {
        Some((super::kind::Artifact::Merged, Some(&self.adapter)))
    }

    fn inputs(&self) -> Vec<Input<'_>> {
        let mut v = vec![Input { role: "adapter", stage: &self.adapter, kinds: &[lora_train::Params::KIND] }];
        if let Some(c) = &self.chat {
            v.push(Input { role: "chat", stage: c, kinds: &[format_chat::Params::KIND] });
        }
        v
    }
}

impl Stage for Params {
    fn version(&self) -> u32 {
        // 2: model.safetensors carries `{"format": "pt"}` metadata, as save_pretrained writes it.
        // 3: config.json as transformers 5 writes it (types, `rope_parameters`, `dtype`, token ids).
        3
    }

    fn params(&self, _env: &Env) -> Value {
        serde_json::to_value(self).expect("params serialize")
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        env.base_model_inputs(true)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let base = ctx.env.model_weights()?;
        let template = match &self.chat {
            Some(_) => Some(crate::stages::format_chat::trained_template(ctx.input("chat"))?),
            None => None,
        };
        let weights = base.weights.first().with_context(|| format!("the model `{}` has no weights", base.source))?;
        Ok(merge(base, &ctx.env.hash_file(weights)?, ctx.input("adapter"), template.as_ref(), self.dtype, &ctx.out)?)
    }
}
