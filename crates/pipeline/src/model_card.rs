//! Model cards: the `README.md` that `pipeline export` writes beside an
//! adapter and a merged model, so that `hf upload USER/NAME out/train`
//! publishes a complete hub repository.
//!
//! The front matter holds the hub's metadata (`base_model`, `library_name`,
//! `pipeline_tag`, `license`, `tags`, `datasets`, and the evaluation as
//! `model-index` results). It is written in YAML's flow style, which is
//! JSON: every value is quoted by serde_json, so no recipe text can break
//! the YAML, and `huggingface_hub.ModelCard` reads it as any card.

use serde_json::{Value, json};

use crate::recipe::Recipe;
use pipeline_infer::eval::{METRICS, Metric, markdown_table};

pub use crate::stages::kind::Artifact;

/// What the card says, gathered from the recipe and the finished stages.
#[derive(Debug, Clone, Default)]
pub struct CardFacts {
    /// The base model's hub id, when known.
    pub base_model: Option<String>,
    pub license: Option<String>,
    pub architecture: Option<String>,
    /// Hub ids of the datasets trained on.
    pub datasets: Vec<String>,
    /// The evaluation: its split, task and the adapter's (else the base
    /// model's) overall metrics, and the base model's beside them.
    pub eval: Option<Evaluation>,
    /// The training stage's parameters and summary (its manifest metrics).
    pub training: Option<(Value, Value)>,
}

#[derive(Debug, Clone)]
pub struct Evaluation {
    pub split: String,
    pub task: String,
    pub tuned: std::collections::BTreeMap<String, Metric>,
    pub base: Option<std::collections::BTreeMap<String, Metric>>,
}

/// The hub id a recipe's base model has: `[model] hub_id`, the id of an
/// `hf://` source, else what its files say.
pub fn base_model_id(recipe: &Recipe, files_say: Option<String>) -> Option<String> {
    if let Some(id) = &recipe.model.hub_id {
        return Some(id.clone());
    }
    if let Some(rest) = recipe.model.base.strip_prefix("hf://") {
        return Some(rest.split('@').next().unwrap_or(rest).to_string());
    }
    files_say
}

/// Hub ids of the recipe's `hf://datasets/…` sources.
pub fn datasets(recipe: &Recipe) -> Vec<String> {
    recipe.stages.values().flat_map(|s| s.hub_datasets()).collect()
}

/// The card's text.
pub fn render(recipe: &Recipe, artifact: Artifact, facts: &CardFacts) -> String {
    let mut meta = serde_json::Map::new();
    if let Some(b) = &facts.base_model {
        meta.insert("base_model".into(), b.clone().into());
    }
    let library = match artifact {
        Artifact::Adapter => "peft",
        Artifact::Merged => "transformers",
    };
    meta.insert("library_name".into(), library.into());
    meta.insert("pipeline_tag".into(), "text-generation".into());
    if let Some(l) = &facts.license {
        meta.insert("license".into(), l.clone().into());
    }
    let mut tags = Vec::new();
    if let (Artifact::Adapter, Some(b)) = (artifact, &facts.base_model) {
        // The tag the hub links an adapter to its base model by.
        tags.push(format!("base_model:adapter:{b}"));
    }
    tags.extend(["pipeline".to_string(), "lora".to_string()]);
    tags.extend(facts.architecture.clone());
    if facts.eval.as_ref().is_some_and(|e| e.task == "tool-call") {
        tags.push("tool-calling".into());
    }
    meta.insert("tags".into(), tags.into());
    if !facts.datasets.is_empty() {
        meta.insert("datasets".into(), facts.datasets.clone().into());
    }
    if let Some(e) = &facts.eval {
        meta.insert("model-index".into(), model_index(recipe, facts, e));
    }
    let mut s = String::from("---\n");
    for (k, v) in &meta {
        s += &format!("{k}: {v}\n");
    }
    s += "---\n\n";
    let what = match artifact {
        Artifact::Adapter => "a LoRA adapter",
        Artifact::Merged => "the base model with its LoRA adapter merged in",
    };
    let base = facts.base_model.as_deref().unwrap_or(&recipe.model.base);
    s += &format!("# {}\n\n", recipe.recipe.name);
    if let Some(d) = &recipe.recipe.description {
        // Markdown would take `<tool_call>` for an HTML tag and hide it.
        let d = d.trim().trim_end_matches('.').replace('<', "&lt;").replace('>', "&gt;");
        s += &format!("{d}.\n\n");
    }
    s += &format!("This is {what} for [`{base}`](https://huggingface.co/{base}), trained with `pipeline`");
    if !facts.datasets.is_empty() {
        let ds: Vec<String> =
            facts.datasets.iter().map(|d| format!("[`{d}`](https://huggingface.co/datasets/{d})")).collect();
        s += &format!(" on {}", ds.join(", "));
    }
    s += &format!(" (recipe `{}`).\n", recipe.path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default());
    if let Some(e) = &facts.eval {
        s += &format!("\n## Evaluation\n\nOn the `{}` split (task `{}`):\n\n", e.split, e.task);
        let mut cols: Vec<(&str, &std::collections::BTreeMap<String, Metric>)> = Vec::new();
        if let Some(b) = &e.base {
            cols.push(("base", b));
        }
        cols.push(("fine-tuned", &e.tuned));
        s += &markdown_table(&cols);
    }
    if let Some((params, summary)) = &facts.training {
        s += "\n## Training\n\n| setting | value |\n|---|---|\n";
        for k in ["targets", "rank", "alpha", "dropout", "learning_rate", "schedule", "epochs", "max_steps"] {
            if let Some(v) = params.get(k).filter(|v| !v.is_null()) {
                s += &format!("| {k} | {} |\n", v.to_string().trim_matches('"'));
            }
        }
        for (k, label) in [
            ("steps", "optimizer steps"),
            ("eval_loss_before", "validation loss before"),
            ("eval_loss_after", "validation loss after"),
        ] {
            if let Some(v) = summary.get(k).filter(|v| !v.is_null()) {
                let v = v
                    .as_f64()
                    .map_or(v.to_string(), |f| if f.fract() == 0.0 { format!("{f}") } else { format!("{f:.4}") });
                s += &format!("| {label} | {v} |\n");
            }
        }
    }
    s += "\n## Use\n\n";
    s += &match artifact {
        Artifact::Adapter => format!(
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             base = AutoModelForCausalLM.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"USER/NAME\")\n\
             tokenizer = AutoTokenizer.from_pretrained(\"{base}\")\n```\n\n\
             With llama.cpp: `llama-cli -m BASE.gguf --lora` the adapter's GGUF (the recipe's `quantize` stage writes it).\n"
        ),
        Artifact::Merged => "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             model = AutoModelForCausalLM.from_pretrained(\"USER/NAME\")\ntokenizer = AutoTokenizer.from_pretrained(\"USER/NAME\")\n```\n\n\
             The chat template in `tokenizer_config.json` is the one the model was trained with.\n"
            .to_string(),
    };
    s
}

/// The evaluation as `model-index` results (rates in percent).
fn model_index(recipe: &Recipe, facts: &CardFacts, e: &Evaluation) -> Value {
    let metrics: Vec<Value> = METRICS
        .iter()
        .filter_map(|(key, label, pct)| {
            let m = e.tuned.get(*key)?;
            let value = if *pct { (1000.0 * m.value).round() / 10.0 } else { (10000.0 * m.value).round() / 10000.0 };
            Some(json!({"type": key, "value": value, "name": if *pct { format!("{label} (%)") } else { label.to_string() }}))
        })
        .collect();
    let dataset = facts.datasets.first().cloned().unwrap_or_else(|| "local".into());
    let task_name = if e.task == "tool-call" { "Tool calling" } else { "Question answering" };
    json!([{
        "name": recipe.recipe.name,
        "results": [{
            "task": {"type": "text-generation", "name": task_name},
            "dataset": {"name": dataset, "type": dataset, "split": e.split},
            "metrics": metrics,
        }],
    }])
}
