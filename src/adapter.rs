//! LoRA adapters in PEFT's on-disk layout, so `peft.PeftModel.from_pretrained`
//! loads what `lora-train` writes:
//!
//! - `adapter_model.safetensors`: for each adapted module `M` (HF path, e.g.
//!   `model.layers.3.self_attn.q_proj`), `base_model.model.M.lora_A.weight`
//!   `[r, in]` and `base_model.model.M.lora_B.weight` `[out, r]`;
//! - `adapter_config.json`: the `LoraConfig` fields PEFT reads.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";

/// PEFT's `adapter_config.json` for a LoRA adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: String,
    pub base_model_name_or_path: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub bias: String,
    pub fan_in_fan_out: bool,
    pub inference_mode: bool,
    pub init_lora_weights: bool,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules_to_save: Option<Vec<String>>,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<String>,
    pub rank_pattern: BTreeMap<String, usize>,
    pub alpha_pattern: BTreeMap<String, f64>,
    pub revision: Option<String>,
    /// Not read by PEFT: the blake3 of the base weights this adapter was
    /// trained on, so a merge onto another base is caught.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_base_weights_blake3: Option<String>,
}

impl AdapterConfig {
    pub fn lora(base: &str, r: usize, alpha: f64, dropout: f64, targets: Vec<String>, rslora: bool) -> AdapterConfig {
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            base_model_name_or_path: base.into(),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: targets,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: true,
            use_rslora: rslora,
            use_dora: false,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            revision: None,
            pipeline_base_weights_blake3: None,
        }
    }

    /// The factor applied to `B·A`: α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }
}

/// The PEFT tensor name of a module's `A` or `B` matrix.
pub fn peft_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// LoRA matrices by HF module path: (A `[r, in]`, B `[out, r]`).
pub type LoraTensors = BTreeMap<String, (Tensor, Tensor)>;

/// Writes an adapter directory (weights and config).
pub fn save(dir: &Path, config: &AdapterConfig, tensors: &LoraTensors) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (module, (a, b)) in tensors {
        named.push((peft_name(module, 'A'), a.clone()));
        named.push((peft_name(module, 'B'), b.clone()));
    }
    crate::model::save_safetensors(named.iter().map(|(k, t)| (k.as_str(), t)), &dir.join(WEIGHTS_FILE))?;
    let mut json = serde_json::to_vec_pretty(config)?;
    json.push(b'\n');
    std::fs::write(dir.join(CONFIG_FILE), json)?;
    Ok(())
}

/// Reads an adapter directory written by [`save`] (or by PEFT).
pub fn load(dir: &Path, device: &Device) -> Result<(AdapterConfig, LoraTensors)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let config: AdapterConfig = serde_json::from_slice(
        &std::fs::read(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?,
    )
    .with_context(|| format!("{} is not a PEFT LoRA config", cfg_path.display()))?;
    let weights = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), device)
        .with_context(|| format!("cannot read {}", dir.join(WEIGHTS_FILE).display()))?;
    let mut tensors = LoraTensors::new();
    for (name, a) in &weights {
        let Some(module) = name.strip_prefix("base_model.model.").and_then(|n| n.strip_suffix(".lora_A.weight")) else {
            continue;
        };
        let b = weights
            .get(&peft_name(module, 'B'))
            .with_context(|| format!("{}: `{name}` has no matching lora_B", dir.display()))?;
        tensors.insert(module.to_string(), (a.clone(), b.clone()));
    }
    Ok((config, tensors))
}

/// An adapter read from disk, ready to attach to a model for inference.
pub struct LoadedAdapter {
    pub config: AdapterConfig,
    pub tensors: LoraTensors,
    pub dir: std::path::PathBuf,
}

impl LoadedAdapter {
    pub fn read(dir: &Path, device: &Device) -> Result<LoadedAdapter> {
        let (config, tensors) = load(dir, device)?;
        Ok(LoadedAdapter { config, tensors, dir: dir.to_path_buf() })
    }

    /// Puts the LoRA matrices on the model's linear layers (unmerged).
    /// Fails, naming the module, when the adapter does not fit the model.
    pub fn attach(&self, model: &mut dyn crate::model::CausalLm) -> Result<()> {
        use crate::model::lora::Lora;
        let scale = self.config.scale();
        let mut found = 0;
        for (name, linear) in model.linears_mut() {
            let Some((a, b)) = self.tensors.get(&name) else {
                linear.lora = None;
                continue;
            };
            let (r, inp) = a.dims2()?;
            let (out, r2) = b.dims2()?;
            if inp != linear.in_features() || out != linear.out_features() || r != r2 {
                anyhow::bail!(
                    "{}: `{name}` has A {:?} and B {:?}, but the model's layer is {}×{}; was the adapter trained on \
                     another base model?",
                    self.dir.display(),
                    a.dims(),
                    b.dims(),
                    linear.out_features(),
                    linear.in_features()
                );
            }
            linear.lora = Some(Lora {
                a: candle_core::Var::from_tensor(a)?,
                b: candle_core::Var::from_tensor(b)?,
                scale,
                dropout: 0.0,
            });
            found += 1;
        }
        if found != self.tensors.len() {
            let names: std::collections::HashSet<String> = model.linears_mut().into_iter().map(|(n, _)| n).collect();
            let missing = self.tensors.keys().find(|k| !names.contains(*k)).cloned().unwrap_or_default();
            anyhow::bail!(
                "{}: the adapter has a module `{missing}` that this model does not have; was it trained on another \
                 base model?",
                self.dir.display()
            );
        }
        Ok(())
    }
}

/// Removes every LoRA from the model (back to the base weights).
pub fn detach(model: &mut dyn crate::model::CausalLm) {
    for (_, linear) in model.linears_mut() {
        linear.lora = None;
    }
}
