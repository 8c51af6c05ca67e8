//! `quantize`: write the merged (or base) model as GGUF v3 files that
//! llama.cpp and Ollama load, one per quantization type
//! (`pipeline_export::quantize`).
//!
//! Per-tensor types follow llama-quantize: 1-D tensors stay f32; for the
//! `_M` K-quant mixes, `attn_v` and `ffn_down` get Q6_K on the layers
//! llama.cpp's `use_more_bits` picks and the (tied) embeddings get Q6_K;
//! K-quants need rows that are multiples of 256, so narrower matrices fall
//! back the way llama-quantize does (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0).
//! Gemma norms are stored as `w + 1` (llama.cpp multiplies by `w`). The
//! metadata holds the hyper-parameters, the tokenizer (tokens, scores, token
//! types, merges for BPE models, special ids) and the trained chat template.
//!
//! Beside them, optionally: the adapter alone as a GGUF LoRA adapter
//! (`lora_adapter`), and the base unmerged (`base_types`), its blocks kept
//! as stored when it is a GGUF, to serve under that adapter.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::lora_train;
use super::merge;
use super::{Env, Input, Kind, Rule, RunContext, Stage, StageKind};
pub use pipeline_export::quantize::{
    GgufOptions, QuantType, chat_template_of, model_arch, tensor_type, write_adapter_gguf, write_gguf, write_gguf_with,
};

/// Parameters of a `quantize` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The `merge` stage whose model is quantized (leave out to quantize the
    /// base model).
    #[serde(default)]
    pub model: Option<String>,
    /// One GGUF file per type.
    #[serde(default = "default_types")]
    pub types: Vec<QuantType>,
    /// A `lora-train` stage whose adapter is also written alone as a GGUF
    /// LoRA adapter (`adapter.gguf`, for llama.cpp's `--lora` and Ollama's
    /// `ADAPTER`).
    #[serde(default)]
    pub lora_adapter: Option<String>,
    /// Types at which the base model is also written unmerged
    /// (`base-<type>.gguf`), carrying the trained chat template, to be
    /// served with `adapter.gguf` (llama-server `--lora`, Ollama's
    /// `ADAPTER`). A base that is already quantized (a GGUF) keeps its
    /// stored blocks, so the served weights are the ones training saw and
    /// the adapter stays in f32: merging and quantizing to 4 bits again
    /// rounds a fine-tune's small changes away. Needs `model` and
    /// `lora_adapter`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub base_types: Vec<QuantType>,
}

fn default_types() -> Vec<QuantType> {
    vec![QuantType::Q8_0]
}

impl StageKind for Params {
    const EXPORTED: bool = true;

    fn inputs(&self) -> Vec<Input<'_>> {
        let mut v = Vec::new();
        if let Some(m) = &self.model {
            v.push(Input { role: "model", stage: m, kinds: &[merge::Params::KIND] });
        }
        if let Some(a) = &self.lora_adapter {
            v.push(Input { role: "lora_adapter", stage: a, kinds: &[lora_train::Params::KIND] });
        }
        v
    }

    fn check(&self) -> Result<(), Rule> {
        if self.types.is_empty() {
            return Err(("types", "no quantization types".into(), "e.g. [\"q8_0\", \"q4_k_m\"]".into()));
        }
        if !self.base_types.is_empty() && (self.model.is_none() || self.lora_adapter.is_none()) {
            return Err((
                "base_types",
                "the base is written to be served with the adapter, in the trained chat template".into(),
                "set `model` (the merge stage) and `lora_adapter` (the lora-train stage) too".into(),
            ));
        }
        Ok(())
    }
}

impl Stage for Params {
    fn version(&self) -> u32 {
        // 2: the vocabulary as llama.cpp's converter writes it (user-defined
        // tokens pre-normalized, `does_token_look_special`), and the tied
        // embeddings of Q4_0 files typed as llama-quantize types them.
        // 3: K-quant blocks from llama.cpp's reference encoders (`kquants`).
        // 4: as llama.cpp's converter writes a file: each layer's tensors in
        // transformers' name order, `add_eos_token`/`add_sep_token` where it
        // states them, Llama 3.1+'s `rope_freqs.weight`.
        4
    }

    fn params(&self, _env: &Env) -> Json {
        serde_json::to_value(self).expect("params serialize")
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        // From a merge stage, everything read is in its (keyed) artifact;
        // the base is read when it is written alone or quantized itself.
        if self.model.is_some() && self.base_types.is_empty() {
            Ok(BTreeMap::new())
        } else {
            env.base_model_inputs(true)
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<Json> {
        if self.types.is_empty() {
            bail!("stage `{}`: no quantization `types`", ctx.name);
        }
        let model = match &self.model {
            Some(_) => crate::model_source::from_path(ctx.input("model"))?,
            None => ctx.env.model_weights()?.clone(),
        };
        let name = ctx.env.settings.name.clone();
        let mut files = serde_json::Map::new();
        for t in &self.types {
            let file = format!("model-{}.gguf", t.name());
            let stats = write_gguf(&model, *t, &name, &ctx.out.join(&file))?;
            crate::report::println(&format!("  quantize: {file} ({})", stats["size_bytes"]));
            files.insert(file, stats);
        }
        if self.lora_adapter.is_some() {
            let arch = model_arch(&model)?;
            let stats = write_adapter_gguf(ctx.input("lora_adapter"), &arch, &ctx.out.join("adapter.gguf"))?;
            files.insert("adapter.gguf".into(), stats);
        }
        if !self.base_types.is_empty() {
            let options = GgufOptions { chat_template: chat_template_of(&model)?, keep_stored_blocks: true };
            let base = ctx.env.model_weights()?;
            for t in &self.base_types {
                let file = format!("base-{}.gguf", t.name());
                let stats = write_gguf_with(base, *t, &name, &ctx.out.join(&file), &options)?;
                crate::report::println(&format!(
                    "  quantize: {file} ({}, {} tensors as the base stores them)",
                    stats["size_bytes"], stats["tensors_kept_as_stored"]
                ));
                files.insert(file, stats);
            }
        }
        Ok(json!({ "files": files }))
    }
}
