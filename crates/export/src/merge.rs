//! Folding a LoRA adapter into the base weights, `W' = W + s·B·A` (s = α/r,
//! or α/√r with rsLoRA), written as a model directory in Hugging Face layout
//! that transformers loads: `config.json`, `model.safetensors` (f32, bf16 or
//! f16), `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`
//! (with the chat template training used) and `special_tokens_map.json`.
//!
//! A GGUF base is merged into its dequantized weights (the metrics say so):
//! the merged model is as precise as the GGUF, not as the original.

use std::collections::HashMap;
use std::path::Path;

use pipeline_fs::IoContext;

use crate::error::{Error, Result, bad_file};
use candle_core::{DType, Device, Tensor};
use pipeline_model::ModelFiles;
use pipeline_model::adapter::{AdapterConfig, LoraTensors};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Storage type of merged weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    F32,
    #[default]
    Bf16,
    F16,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F16 => "float16",
        }
    }
}

/// Merges the adapter in `adapter_dir` into `base` and writes the model
/// directory `out`. `base_hash` is the blake3 of the base weights file, checked
/// against the one the adapter recorded. Returns the manifest metrics.
pub fn merge(
    base: &ModelFiles,
    base_hash: &str,
    adapter_dir: &Path,
    chat_template: Option<&pipeline_infer::chat::ChatTemplate>,
    dtype: WeightDtype,
    out: &Path,
) -> Result<Value> {
    let device = Device::Cpu;
    let adapter = pipeline_model::adapter::load(adapter_dir, &device)?;
    let (config, tensors) = (&adapter.config, &adapter.tensors);
    if let Some(trained_on) = &adapter.base_weights_blake3
        && trained_on != base_hash
    {
        return Err(Error::Mismatch(format!(
            "the adapter in {} was trained on other base weights (blake3 {}…) than {} ({}…); merge it onto the \
             model it was trained on",
            adapter_dir.display(),
            &trained_on[..12.min(trained_on.len())],
            base.source,
            &base_hash[..12.min(base_hash.len())]
        )));
    }
    let from_gguf = base.is_gguf();
    let (arch, weights) = pipeline_model::load_weights(base, &device, false)?;
    let mut map = weights.into_map();
    let merged = apply(&mut map, config, tensors, adapter_dir)?;

    std::fs::create_dir_all(out).on("create", out)?;
    let stored: HashMap<String, Tensor> =
        map.into_iter().map(|(k, v)| Ok((k, v.to_dtype(dtype.dtype())?))).collect::<Result<_>>()?;
    pipeline_model::save_safetensors(stored.iter().map(|(k, t)| (k.as_str(), t)), &out.join("model.safetensors"))?;

    let mut hf_config = match (&base.config_json, from_gguf) {
        (Some(c), false) => serde_json::from_slice(&std::fs::read(c).on("read", c)?)
            .map_err(|e| bad_file(c, format!("not JSON: {e}")))?,
        _ => arch.hf_config(),
    };
    // transformers 5 names the weights' dtype `dtype` (`torch_dtype` before).
    if let Some(o) = hf_config.as_object_mut() {
        o.remove("torch_dtype");
    }
    hf_config["dtype"] = dtype.torch_name().into();
    let ids = tokenizer_files(base, chat_template, out)?;
    for (key, id) in ids {
        hf_config[key] = id;
    }
    write_json(&out.join("config.json"), &hf_config)?;
    Ok(json!({
        "merged_modules": merged,
        "dtype": dtype,
        "scale": config.scale(),
        "rank": config.r,
        "base": base.source,
        "dequantized_from_gguf": from_gguf,
        "note": if from_gguf {
            "the base is a quantized GGUF: the adapter was merged into its dequantized weights"
        } else {
            "merged into the base's weights"
        },
    }))
}

/// `W += scale·B·A` for every module of the adapter; returns how many.
fn apply(
    map: &mut HashMap<String, Tensor>,
    config: &AdapterConfig,
    tensors: &LoraTensors,
    adapter_dir: &Path,
) -> Result<usize> {
    for (module, (a, b)) in tensors {
        let name = format!("{module}.weight");
        let w = map.get(&name).ok_or_else(|| {
            Error::Mismatch(format!(
                "{}: the adapter adapts `{module}`, which the base model does not have; was it trained on another \
                 base model?",
                adapter_dir.display()
            ))
        })?;
        let delta = (b.matmul(a)? * config.scale())?;
        if delta.dims() != w.dims() {
            return Err(Error::Mismatch(format!(
                "{}: `{module}` has B·A {:?} but the base weight is {:?}; was it trained on another base model?",
                adapter_dir.display(),
                delta.dims(),
                w.dims()
            )));
        }
        let merged = (w + delta)?;
        map.insert(name, merged);
    }
    Ok(tensors.len())
}

/// Copies the tokenizer, and writes `tokenizer_config.json` with the chat
/// template, `special_tokens_map.json` and `generation_config.json`.
/// Returns the special token ids `config.json` states (`bos_token_id`,
/// `eos_token_id`, `pad_token_id`), those of the generation config.
fn tokenizer_files(
    base: &ModelFiles,
    chat_template: Option<&pipeline_infer::chat::ChatTemplate>,
    out: &Path,
) -> Result<Vec<(&'static str, Value)>> {
    let tok = base.tokenizer_json()?;
    std::fs::copy(tok, out.join("tokenizer.json")).on("copy", tok)?;
    let mut tc = base.tokenizer_config()?;
    if let Some(t) = chat_template {
        tc["chat_template"] = t.source.clone().into();
    }
    write_json(&out.join("tokenizer_config.json"), &tc)?;
    let mut special = serde_json::Map::new();
    for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(v) = tc.get(k).filter(|v| !v.is_null()) {
            special.insert(k.into(), v.clone());
        }
    }
    write_json(&out.join("special_tokens_map.json"), &Value::Object(special))?;
    let generation = base.dir.join("generation_config.json");
    let g = if generation.is_file() {
        std::fs::copy(&generation, out.join("generation_config.json")).on("copy", &generation)?;
        serde_json::from_slice(&std::fs::read(&generation).on("read", &generation)?)
            .map_err(|e| bad_file(&generation, format!("not JSON: {e}")))?
    } else {
        let tokenizer = tokenizers::Tokenizer::from_file(tok).map_err(|e| bad_file(tok, e))?;
        let id = |k: &str| pipeline_infer::chat::special_token(&tc, k).and_then(|name| tokenizer.token_to_id(&name));
        let mut g = json!({"_from_model_config": true});
        for (k, t) in [("bos_token_id", "bos_token"), ("pad_token_id", "pad_token")] {
            if let Some(i) = id(t) {
                g[k] = i.into();
            }
        }
        // Generation stops at EOS and at the end-of-turn marker training used.
        let mut eos: Vec<u32> = id("eos_token").into_iter().collect();
        if let Some(i) = chat_template.and_then(|t| tokenizer.token_to_id(&t.end_of_turn))
            && !eos.contains(&i)
        {
            eos.push(i);
        }
        g["eos_token_id"] = json!(eos);
        write_json(&out.join("generation_config.json"), &g)?;
        g
    };
    let ids = ["bos_token_id", "eos_token_id", "pad_token_id"];
    Ok(ids.into_iter().filter_map(|k| Some((k, g.get(k).filter(|v| !v.is_null())?.clone()))).collect())
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("serializes");
    bytes.push(b'\n');
    Ok(std::fs::write(path, bytes).on("write", path)?)
}
