//! `ollama-modelfile`: an Ollama `Modelfile` beside the GGUF it serves, with
//! a `TEMPLATE` (Ollama's Go-template syntax) that renders conversations as
//! the training chat template did, `PARAMETER stop` for every end-of-turn
//! and EOS string, sampling defaults and an optional `SYSTEM`.
//!
//! The Go template is chosen by the family of the trained Jinja template
//! (Gemma's turns with the system prompt folded into the first user turn,
//! ChatML, Alpaca); tests render both on the same conversations and compare.
//! When an `ollama` binary is on PATH, `ollama create` registers the model.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::format_chat;
use super::quantize;
pub use pipeline_export::modelfile::{Family, Modelfile};

use super::{Env, Input, Kind, RunContext, Stage, StageKind};

/// Parameters of an `ollama-modelfile` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The `quantize` stage whose GGUF is served.
    pub gguf: String,
    /// Which of its files (`q4_k_m`, `q8_0`, …; default: the first it wrote).
    #[serde(default)]
    pub file: Option<String>,
    /// Serve the base at type `file` (`base-<file>.gguf`, from the quantize
    /// stage's `base_types`) with the adapter on top (`ADAPTER
    /// ./adapter.gguf`), instead of the merged model.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adapter: bool,
    /// The `format-chat` stage whose template and stop tokens are served.
    pub chat: String,
    /// The model name for `ollama create` (default: the recipe's name).
    #[serde(default)]
    pub name: Option<String>,
    /// A default system prompt (`SYSTEM`).
    #[serde(default)]
    pub system: Option<String>,
    /// Sampling defaults (`PARAMETER temperature` …).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub repeat_penalty: Option<f64>,
    /// Context window Ollama allocates (`num_ctx`).
    #[serde(default = "default_num_ctx")]
    pub num_ctx: usize,
    /// Run `ollama create` when `ollama` is on PATH.
    #[serde(default = "yes")]
    pub create: bool,
}

fn default_temperature() -> f64 {
    0.7
}
fn default_num_ctx() -> usize {
    4096
}
fn yes() -> bool {
    true
}

impl StageKind for Params {
    const EXPORTED: bool = true;

    fn inputs(&self) -> Vec<Input<'_>> {
        vec![
            Input { role: "gguf", stage: &self.gguf, kinds: &[quantize::Params::KIND] },
            Input { role: "chat", stage: &self.chat, kinds: &[format_chat::Params::KIND] },
        ]
    }
}

impl Stage for Params {
    /// 2: Qwen's own template (and `gemma-tools`) get a Go template with
    /// `.Tools`, `.ToolCalls` and tool results.
    fn version(&self) -> u32 {
        2
    }

    fn params(&self, env: &Env) -> Value {
        let mut v = serde_json::to_value(self).expect("params serialize");
        v["recipe_name"] = env.settings.name.clone().into();
        v
    }

    fn outside_inputs(&self, _env: &Env) -> Result<BTreeMap<String, String>> {
        Ok(BTreeMap::new())
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let gguf_dir = ctx.input("gguf");
        let file = match &self.file {
            Some(t) if self.adapter => format!("base-{t}.gguf"),
            Some(t) => format!("model-{t}.gguf"),
            None if self.adapter => bail!("stage `{}`: `adapter = true` needs `file`, the base's type", ctx.name),
            None => {
                let mut found: Vec<String> = std::fs::read_dir(gguf_dir)?
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.ends_with(".gguf"))
                    .collect();
                found.sort();
                found.into_iter().next().with_context(|| format!("{}: no GGUF file", gguf_dir.display()))?
            }
        };
        let src = gguf_dir.join(&file);
        if !src.is_file() {
            let fix = match self.adapter {
                true => "list the type in the quantize stage's `base_types`",
                false => "set `file` to one of its types",
            };
            bail!("stage `{}`: the quantize stage wrote no `{file}`; {fix}", ctx.name);
        }
        let adapter = gguf_dir.join("adapter.gguf");
        if self.adapter && !adapter.is_file() {
            bail!("stage `{}`: the quantize stage wrote no `adapter.gguf`; set its `lora_adapter`", ctx.name);
        }
        let template = super::format_chat::trained_template(ctx.input("chat"))?;
        let family = Family::of(&template.source).with_context(|| {
            format!(
                "stage `{}`: no Ollama template is known for this chat template (supported: Gemma, ChatML, Alpaca)",
                ctx.name
            )
        })?;
        // The GGUF files beside the Modelfile (hard links: all are immutable).
        let mut beside = vec![(src, ctx.out.join("model.gguf"))];
        if self.adapter {
            beside.push((adapter, ctx.out.join("adapter.gguf")));
        }
        for (src, dest) in beside {
            if std::fs::hard_link(&src, &dest).is_err() {
                std::fs::copy(&src, &dest).with_context(|| format!("cannot copy {}", src.display()))?;
            }
        }
        let stops = pipeline_infer::generate::stop_tokens(&template.end_of_turn, &template.eos_token);
        let modelfile = self.modelfile(&ctx.env.settings.name, family, &template.eos_token, &stops);
        std::fs::write(ctx.out.join("Modelfile"), &modelfile)?;
        let name = self.name.clone().unwrap_or_else(|| ctx.env.settings.name.clone());
        let created = self.create && ollama_create(&name, &ctx.out, ctx.name)?;
        Ok(
            json!({"gguf": file, "adapter": self.adapter, "family": format!("{family:?}"), "stop": stops, "ollama_created": created, "name": name}),
        )
    }
}

impl Params {
    /// The Modelfile text.
    pub fn modelfile(&self, recipe: &str, family: Family, eos: &str, stops: &[String]) -> String {
        Modelfile {
            recipe: recipe.to_string(),
            family,
            adapter: self.adapter,
            eos: eos.to_string(),
            stops: stops.to_vec(),
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            num_ctx: self.num_ctx,
            system: self.system.clone(),
        }
        .render()
    }
}

/// `ollama create NAME -f Modelfile` when `ollama` is installed; returns
/// whether it ran. `stage` names the directory `pipeline export` gives it.
fn ollama_create(name: &str, dir: &std::path::Path, stage: &str) -> Result<bool> {
    let Ok(out) = std::process::Command::new("ollama")
        .arg("create")
        .arg(name)
        .arg("-f")
        .arg("Modelfile")
        .current_dir(dir)
        .output()
    else {
        crate::report::println(&format!(
            "  ollama-modelfile: `ollama` is not on PATH; skipped `ollama create`. Later: \
             pipeline export RECIPE --to DIR && cd DIR/{} && ollama create {name} -f Modelfile",
            stage
        ));
        return Ok(false);
    };
    if !out.status.success() {
        bail!("`ollama create {name}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(true)
}
