//! LoRA adapters in PEFT's on-disk layout, so `peft.PeftModel.from_pretrained`
//! loads what `lora-train` writes, and `pipeline` loads what PEFT writes:
//!
//! - `adapter_model.safetensors`: for each adapted module `M` (HF path, e.g.
//!   `model.layers.3.self_attn.q_proj`), `base_model.model.M.lora_A.weight`
//!   `[r, in]` and `base_model.model.M.lora_B.weight` `[out, r]`, with
//!   `format: pt` in the header as PEFT writes it;
//! - `adapter_config.json`: the `LoraConfig` fields PEFT reads, and nothing
//!   else (PEFT before 0.13 refuses a config with a key it does not know);
//! - from `lora-train` also `base_weights.json`, which PEFT ignores: the
//!   blake3 of the base weights the adapter was trained on, so a merge onto
//!   another base is caught. (Not in the safetensors header: its metadata
//!   is written in hash-map order, and adapters must be byte-reproducible.)
//!
//! Configs written by any PEFT version load: fields a version does not write
//! take PEFT's defaults, fields added later are ignored, and the features
//! this crate does not implement (DoRA, per-module rank or alpha patterns)
//! are refused with a message instead of being applied wrongly.

use std::collections::BTreeMap;
use std::path::Path;

use pipeline_fs::IoContext;

use crate::error::{Error, Result, bad_file};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Beside the adapter: `{"blake3": …}` of the base weights it was trained on.
pub const BASE_WEIGHTS_FILE: &str = "base_weights.json";

/// PEFT's `adapter_config.json` for a LoRA adapter. Reading follows PEFT:
/// a missing field takes its `LoraConfig` default, an unknown one is ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// A list of module names, or (as PEFT also allows) one string: a regex
    /// or `all-linear`. Informational here: the tensors say what is adapted.
    pub target_modules: serde_json::Value,
    pub bias: String,
    pub fan_in_fan_out: bool,
    pub inference_mode: bool,
    /// `true`, or the name of an initialisation (`"gaussian"`, `"pissa"`…).
    pub init_lora_weights: serde_json::Value,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub modules_to_save: Option<Vec<String>>,
    /// A layer index or a list of them.
    pub layers_to_transform: serde_json::Value,
    pub layers_pattern: serde_json::Value,
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    pub revision: Option<String>,
}

impl Default for AdapterConfig {
    /// PEFT's `LoraConfig()` defaults.
    fn default() -> AdapterConfig {
        AdapterConfig {
            peft_type: "LORA".into(),
            task_type: None,
            base_model_name_or_path: None,
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: serde_json::Value::Null,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: false,
            init_lora_weights: true.into(),
            use_rslora: false,
            use_dora: false,
            modules_to_save: None,
            layers_to_transform: serde_json::Value::Null,
            layers_pattern: serde_json::Value::Null,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            revision: None,
        }
    }
}

impl AdapterConfig {
    pub fn lora(base: &str, r: usize, alpha: f64, dropout: f64, targets: Vec<String>, rslora: bool) -> AdapterConfig {
        AdapterConfig {
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base.into()),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: targets.into(),
            inference_mode: true,
            use_rslora: rslora,
            ..AdapterConfig::default()
        }
    }

    /// The factor applied to `B·A`: α/r, or α/√r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }

    /// Refuses what this crate would apply wrongly, naming the field.
    fn check_supported(&self, path: &Path) -> Result<()> {
        let refuse = |what: &str| -> Result<()> {
            Err(Error::Unsupported(format!(
                "{}: {what}; pipeline applies plain LoRA adapters (one rank and alpha for all modules)",
                path.display()
            )))
        };
        if self.peft_type != "LORA" {
            refuse(&format!("`peft_type` is {:?}, not \"LORA\"", self.peft_type))?;
        }
        if self.use_dora {
            refuse("`use_dora` is true (DoRA adds magnitude vectors)")?;
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            refuse("`rank_pattern` / `alpha_pattern` give some modules their own rank or alpha")?;
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            refuse("`modules_to_save` replaces whole modules")?;
        }
        if self.bias != "none" {
            refuse(&format!("`bias` is {:?} (trained biases)", self.bias))?;
        }
        if self.r == 0 {
            refuse("`r` is 0")?;
        }
        Ok(())
    }
}

/// The PEFT tensor name of a module's `A` or `B` matrix.
pub fn peft_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// LoRA matrices by HF module path: (A `[r, in]`, B `[out, r]`).
pub type LoraTensors = BTreeMap<String, (Tensor, Tensor)>;

/// Writes an adapter directory: weights, config and, when known, the
/// blake3 of the base weights.
pub fn save(
    dir: &Path,
    config: &AdapterConfig,
    tensors: &LoraTensors,
    base_weights_blake3: Option<&str>,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (module, (a, b)) in tensors {
        named.push((peft_name(module, 'A'), a.clone()));
        named.push((peft_name(module, 'B'), b.clone()));
    }
    crate::save_safetensors(named.iter().map(|(k, t)| (k.as_str(), t)), &dir.join(WEIGHTS_FILE))?;
    write_json(&dir.join(CONFIG_FILE), &serde_json::to_value(config).expect("serializes"))?;
    if let Some(hash) = base_weights_blake3 {
        write_json(&dir.join(BASE_WEIGHTS_FILE), &serde_json::json!({ "blake3": hash }))?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(value).expect("serializes");
    json.push(b'\n');
    Ok(std::fs::write(path, json).on("write", path)?)
}

/// Reads an adapter directory written by [`save`] or by PEFT.
pub fn load(dir: &Path, device: &Device) -> Result<LoadedAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let bytes = std::fs::read(&cfg_path)
        .map_err(|e| bad_file(&cfg_path, format!("cannot read ({e}); not an adapter directory?")))?;
    let config: AdapterConfig =
        serde_json::from_slice(&bytes).map_err(|e| bad_file(&cfg_path, format!("not a PEFT LoRA config: {e}")))?;
    config.check_supported(&cfg_path)?;
    let base_path = dir.join(BASE_WEIGHTS_FILE);
    let base_weights_blake3 = match std::fs::read(&base_path) {
        Ok(bytes) => {
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| bad_file(&base_path, format!("not JSON: {e}")))?;
            Some(v["blake3"].as_str().ok_or_else(|| bad_file(&base_path, "no `blake3`"))?.to_string())
        }
        Err(_) => None,
    };
    let weights_path = dir.join(WEIGHTS_FILE);
    let weights = candle_core::safetensors::load(&weights_path, device)
        .map_err(|e| bad_file(&weights_path, format!("cannot read: {e}")))?;
    let mut tensors = LoraTensors::new();
    for (name, a) in &weights {
        if name.ends_with(".lora_B.weight") {
            continue; // found through its A
        }
        let Some(module) = name.strip_prefix("base_model.model.").and_then(|n| n.strip_suffix(".lora_A.weight")) else {
            return Err(Error::Unsupported(format!(
                "{}: `{name}` is not a LoRA matrix (`base_model.model.MODULE.lora_A.weight` / `lora_B.weight`); \
                 pipeline applies plain LoRA adapters of linear layers",
                weights_path.display()
            )));
        };
        let b = weights
            .get(&peft_name(module, 'B'))
            .ok_or_else(|| bad_file(dir, format!("`{name}` has no matching lora_B")))?;
        if a.dim(0)? != config.r {
            return Err(bad_file(
                &weights_path,
                format!(
                    "`{name}` has rank {} but `r` in {CONFIG_FILE} is {}; the scale α/r would be wrong",
                    a.dim(0)?,
                    config.r
                ),
            ));
        }
        tensors.insert(module.to_string(), (a.clone(), b.clone()));
    }
    if tensors.is_empty() {
        return Err(bad_file(&weights_path, "holds no LoRA matrices (`base_model.model.….lora_A.weight`)"));
    }
    let paired: std::collections::HashSet<String> = tensors.keys().map(|m| peft_name(m, 'B')).collect();
    if let Some(orphan) = weights.keys().find(|n| n.ends_with(".lora_B.weight") && !paired.contains(*n)) {
        return Err(bad_file(&weights_path, format!("`{orphan}` has no matching lora_A")));
    }
    Ok(LoadedAdapter { config, tensors, base_weights_blake3, dir: dir.to_path_buf() })
}

/// An adapter read from disk ([`load`]), ready to attach to a model for
/// inference, merge or convert.
pub struct LoadedAdapter {
    pub config: AdapterConfig,
    pub tensors: LoraTensors,
    /// The blake3 of the base weights it was trained on, when `lora-train`
    /// wrote it (PEFT does not record one).
    pub base_weights_blake3: Option<String>,
    pub dir: std::path::PathBuf,
}

impl LoadedAdapter {
    pub fn read(dir: &Path, device: &Device) -> Result<LoadedAdapter> {
        load(dir, device)
    }

    /// Puts the LoRA matrices on the model's linear layers (unmerged).
    /// Fails, naming the module, when the adapter does not fit the model.
    pub fn attach(&self, model: &mut dyn crate::CausalLm) -> Result<()> {
        use crate::lora::Lora;
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
                return Err(Error::Mismatch(format!(
                    "{}: `{name}` has A {:?} and B {:?}, but the model's layer is {}×{}; was the adapter trained on \
                     another base model?",
                    self.dir.display(),
                    a.dims(),
                    b.dims(),
                    linear.out_features(),
                    linear.in_features()
                )));
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
            return Err(Error::Mismatch(format!(
                "{}: the adapter has a module `{missing}` that this model does not have; was it trained on another \
                 base model?",
                self.dir.display()
            )));
        }
        Ok(())
    }
}

/// Removes every LoRA from the model (back to the base weights).
pub fn detach(model: &mut dyn crate::CausalLm) {
    for (_, linear) in model.linears_mut() {
        linear.lora = None;
    }
}
