//! A model loaded for `pipeline generate` and `pipeline chat`: weights
//! (base, base + adapter, or a recipe's output), tokenizer, the chat
//! template, and a KV cache that a chat reuses from turn to turn.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::executor::Finished;
use crate::recipe::Recipe;
use crate::stages::{Kind, lora_train};
use pipeline_infer::chat::{ChatTemplate, Message};
use pipeline_infer::generate::{Generation, GenerationParams, Generator};
use pipeline_model::{self as model, CausalLm, KvCache};

/// Which model to load, from the command line.
#[derive(Debug, Clone, Default)]
pub struct ModelChoice {
    /// A model directory (HF layout) or `.gguf` file.
    pub model: Option<PathBuf>,
    /// A PEFT adapter directory applied on top (unmerged).
    pub adapter: Option<PathBuf>,
    /// A recipe: its base model and chat template, and the output of
    /// `stage` (default: its `lora-train` stage, when finished).
    pub recipe: Option<PathBuf>,
    pub stage: Option<String>,
    pub cache: crate::executor::CacheLocation,
    pub device: String,
}

/// A loaded model, ready to generate.
pub struct Session {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    /// What was loaded, for the banner.
    pub description: String,
    pub seed: u64,
    /// Decode tool calls under this grammar (constrained decoding).
    pub grammar: Option<pipeline_infer::constrain::CallGrammar>,
    cache: KvCache,
    /// The tokens the cache holds.
    cached: Vec<u32>,
}

impl Session {
    pub fn load(choice: &ModelChoice) -> Result<Session> {
        let device = model::device(&choice.device)?;
        let (resolved, template_choice, base_dir, mut adapter, seed) = match (&choice.recipe, &choice.model) {
            (Some(path), None) => {
                let recipe = Recipe::load(path, &[])?;
                let resolved = crate::model_source::resolve_with_weights(&recipe.settings())?;
                let adapter = recipe_output(&recipe, choice)?;
                (resolved, recipe.model.chat_template.clone(), recipe.base_dir(), adapter, recipe.recipe.seed)
            }
            (None, Some(m)) => (crate::model_source::from_path(m)?, None, PathBuf::from("."), None, 0),
            (Some(_), Some(_)) => bail!("give either --model or --recipe, not both"),
            (None, None) => bail!("name a model: --model DIR|FILE.gguf, or --recipe RECIPE [--stage STAGE]"),
        };
        if choice.adapter.is_some() {
            adapter = choice.adapter.clone();
        }
        let template = ChatTemplate::for_model(&resolved, template_choice.as_deref(), &base_dir)?;
        let tok_path = resolved.tokenizer_json()?;
        let tokenizer = tokenizers::Tokenizer::from_file(tok_path)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
        let mut model = model::load_for_inference(&resolved, &device)?;
        let mut description = resolved.source.clone();
        if let Some(dir) = &adapter {
            pipeline_model::adapter::LoadedAdapter::read(dir, &device)?.attach(model.as_mut())?;
            description += &format!(" + adapter {}", dir.display());
        }
        let cache = model.new_cache();
        Ok(Session { model, tokenizer, template, description, seed, grammar: None, cache, cached: Vec::new() })
    }

    /// The prompt tokens of a conversation, ready for the assistant's turn.
    pub fn prompt(&self, messages: &[Message], tools: Option<&serde_json::Value>) -> Result<Vec<u32>> {
        let text = self.template.render(messages, tools, true)?;
        Ok(pipeline_infer::generate::encode(&self.tokenizer, &text)?)
    }

    /// Generates after `prompt`, reusing the cached tokens it starts with.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let shared = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        self.cache.truncate(shared);
        let generator = Generator::for_template(self.model.as_ref(), &self.tokenizer, &self.template)
            .constrained(self.grammar.as_ref());
        let g = generator.generate_cached(prompt, &mut self.cache, params, self.seed, on_text)?;
        self.cached = prompt.iter().chain(&g.tokens).copied().collect();
        self.cached.truncate(self.cache.len());
        Ok(g)
    }

    /// Generates for several prompts decoded together (batched decoding,
    /// see [`Generator::generate_batch`]), each from a fresh cache.
    pub fn generate_batch(&self, prompts: &[Vec<u32>], params: &GenerationParams) -> Result<Vec<Generation>> {
        let generator = Generator::for_template(self.model.as_ref(), &self.tokenizer, &self.template)
            .constrained(self.grammar.as_ref());
        let mut caches: Vec<KvCache> = prompts.iter().map(|_| self.model.new_cache()).collect();
        let mut jobs: Vec<(&[u32], &mut KvCache)> = prompts.iter().map(Vec::as_slice).zip(caches.iter_mut()).collect();
        Ok(generator.generate_batch(&mut jobs, params, self.seed)?)
    }
}

/// The adapter directory of a recipe's `--stage` (or its lora-train stage),
/// if that stage has finished.
fn recipe_output(recipe: &Recipe, choice: &ModelChoice) -> Result<Option<PathBuf>> {
    let stage = match &choice.stage {
        Some(s) => {
            let spec = recipe.stages.get(s).with_context(|| format!("the recipe has no stage `{s}`"))?;
            if spec.kind() != lora_train::Params::KIND {
                bail!("stage `{s}` is a `{}` stage; --stage takes a lora-train stage", spec.kind());
            }
            Some(s.clone())
        }
        None => recipe.stages.iter().find(|(_, s)| s.kind() == lora_train::Params::KIND).map(|(n, _)| n.clone()),
    };
    let Some(stage) = stage else { return Ok(None) };
    match choice.cache.open()?.finished(recipe, &stage)? {
        Finished::Entry(dir) => Ok(Some(dir)),
        Finished::NotYet(_) if choice.stage.is_some() => bail!(
            "stage `{stage}` has not run yet (with this recipe and cache); run `pipeline run {}` first",
            recipe.path.display()
        ),
        Finished::NotYet(_) => {
            crate::report::println(&format!("note: `{stage}` has not run yet; using the base model"));
            Ok(None)
        }
    }
}

/// Prompts for `generate --prompts FILE.jsonl`: each line `{"prompt": …}` or
/// `{"messages": […]}`, with optional `id` and `tools`.
pub fn read_prompts(path: &Path) -> Result<Vec<(String, Vec<Message>, Option<serde_json::Value>)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let id = v.get("id").map(|x| x.as_str().map_or(x.to_string(), str::to_string)).unwrap_or(format!("{}", i + 1));
        let messages = match (v.get("prompt").and_then(|p| p.as_str()), v.get("messages")) {
            (Some(p), _) => vec![Message::new("user", p)],
            (None, Some(m)) => crate::stages::format_chat::parse_messages(m).with_context(at)?,
            (None, None) => bail!("{}: a line needs `prompt` (text) or `messages` (a list)", at()),
        };
        out.push((id, messages, v.get("tools").cloned()));
    }
    Ok(out)
}
