//! Every recipe in `recipes/` validates, plans and runs end to end: on the
//! real Gemma 3 270M where the recipe's model is that one, on a small random
//! checkpoint of the recipe's architecture otherwise (`--set model.base=…`;
//! the 1B and Qwen weights are not available on these machines), shortened
//! with `--set` so that CI runs every stage of every recipe.

mod common;

use std::path::{Path, PathBuf};

use common::{Project, models_dir};
use pipeline_model::qwen::Variant;
use pipeline_model::testing::{TinyGemma3, TinyQwen};

fn recipe(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes").join(name)
}

fn all_recipes() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    v
}

/// `pipeline COMMAND RECIPE --set S…` arguments.
fn args<'a>(command: &'a str, recipe: &'a Path, sets: &'a [String]) -> Vec<&'a str> {
    let mut v = vec![command, recipe.to_str().unwrap()];
    for s in sets {
        v.extend(["--set", s.as_str()]);
    }
    v
}

/// `plan --json` of `recipe` with `sets`.
fn plan(p: &Project, recipe: &Path, sets: &[String]) -> serde_json::Value {
    let mut a = args("plan", recipe, sets);
    a.push("--json");
    let out = p.run(&a);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `recipe` with `sets` and returns (stderr, the directory of each stage).
fn run(p: &Project, recipe: &Path, sets: &[String]) -> (String, Vec<(String, PathBuf)>) {
    let stderr = p.ok(&args("run", recipe, sets));
    let plan = plan(p, recipe, sets);
    let dirs = plan["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["status"], "cached", "after a run every stage is cached: {s}");
            let key = s["key"].as_str().unwrap();
            (s["name"].as_str().unwrap().to_string(), p.path(".pipeline/store").join(key))
        })
        .collect();
    (stderr, dirs)
}

fn dir<'a>(dirs: &'a [(String, PathBuf)], stage: &str) -> &'a Path {
    &dirs.iter().find(|(n, _)| n == stage).unwrap_or_else(|| panic!("no stage {stage}")).1
}

fn set(key: &str, value: impl std::fmt::Display) -> String {
    format!("{key}={value}")
}

fn base(dir: &Path) -> String {
    format!("model.base=\"{}\"", dir.display())
}

#[test]
fn every_recipe_validates() {
    let recipes = all_recipes();
    assert!(recipes.len() >= 6, "{recipes:?}");
    let p = Project::new();
    let mut args = vec!["validate".to_string()];
    args.extend(recipes.iter().map(|r| r.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = p.run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn retargeting_another_gemma_changes_one_line() {
    let a = std::fs::read_to_string(recipe("gemma3-270m-finance.toml")).unwrap();
    let b = std::fs::read_to_string(recipe("gemma3-1b-finance.toml")).unwrap();
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!(la.len(), lb.len());
    let diff: Vec<(&str, &str)> = la.iter().zip(&lb).filter(|(x, y)| x != y).map(|(x, y)| (*x, *y)).collect();
    assert_eq!(diff, vec![("base = \"hf://google/gemma-3-270m-it\"", "base = \"hf://google/gemma-3-1b-it\"")]);
}

#[test]
fn gemma3_finance_runs_on_the_real_270m() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let sets = [
        base(&models.join("gemma-3-270m")),
        set("stages.train.max_steps", 2),
        set("stages.train.gradient_accumulation", 1),
        set("stages.eval.limit", 2),
        set("stages.eval.generation.max_new_tokens", 12),
    ];
    let (stderr, dirs) = run(&p, &recipe("gemma3-270m-finance.toml"), &sets);
    assert!(stderr.contains("ran     ollama"), "{stderr}");
    let modelfile = std::fs::read_to_string(dir(&dirs, "ollama").join("Modelfile")).unwrap();
    assert!(modelfile.contains("<end_of_turn>"), "{modelfile}");
    assert!(dir(&dirs, "gguf").join("model-q4_k_m.gguf").is_file());
    assert!(modelfile.contains("ADAPTER ./adapter.gguf"), "{modelfile}");
    // The 1B recipe pointed at the same weights is the same recipe: every
    // stage is already cached.
    let plan = plan(&p, &recipe("gemma3-1b-finance.toml"), &sets);
    assert!(plan["stages"].as_array().unwrap().iter().all(|s| s["status"] == "cached"), "{plan}");
}

#[test]
fn gemma3_270m_tool_use_runs_on_the_real_270m_with_and_without_constrained_calls() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let sets = [
        base(&models.join("gemma-3-270m")),
        set("stages.tokens.max_len", 1024),
        set("stages.train.max_steps", 2),
        set("stages.train.gradient_accumulation", 1),
        set("stages.train.eval_examples", 2),
        set("stages.eval.limit", 3),
        set("stages.eval.generation.max_new_tokens", 24),
        set("stages.eval-constrained.limit", 3),
        set("stages.eval-constrained.generation.max_new_tokens", 24),
    ];
    let (stderr, dirs) = run(&p, &recipe("gemma3-270m-tool-use.toml"), &sets);
    assert!(stderr.contains("ran     ollama"), "{stderr}");
    let rows = |stage: &str| {
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir(&dirs, stage).join("report.json")).unwrap()).unwrap();
        assert_eq!(r["needs_call_column"], "tool_needed", "{stage}: the dataset's own label decides");
        assert_eq!(r["catalogue"].as_array().unwrap().len(), 40, "{stage}: the union of the rows' tool lists");
        r["models"]["adapter"]["overall"]["decision_accuracy"]["n"].clone()
    };
    assert_eq!(rows("eval"), 3);
    assert_eq!(rows("eval-constrained"), 3);
    // Only the train split is sampled: the validation split stays whole.
    let data: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&dirs, "data").join("manifest.json")).unwrap()).unwrap();
    assert_eq!(data["metrics"]["splits"]["validation"]["rows"], 60);
    assert!(data["metrics"]["splits"]["train"]["rows"].as_u64().unwrap() < 477);
    // The traces become native tool calls: every catalogue, call and result
    // converted, the dataset's instruction block dropped, no row lost.
    let chat: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&dirs, "chat").join("manifest.json")).unwrap()).unwrap();
    let train = &chat["metrics"]["splits"]["train"];
    let rows = train["conversations"].as_u64().unwrap();
    assert_eq!(train["converted"]["catalogues"], rows, "{chat}");
    assert_eq!(train["converted"]["instructions"], rows, "{chat}");
    assert!(train["converted"]["calls"].as_u64().unwrap() > rows / 3, "{chat}");
    assert_eq!(chat["metrics"]["splits"]["validation"]["dropped_rows"], 0, "{chat}");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(dir(&dirs, "chat").join("conversations/train.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    let text = first["text"].as_str().unwrap();
    assert!(text.starts_with("<bos><start_of_turn>user\nYou can call these tools:\n- "), "{text}");
    assert!(!text.contains("<instructions>") && !text.contains("tool_name"), "{text}");
    // The evaluated rows are fetched apart from the training mix: another mix
    // trains again but reuses the base model's evaluation.
    let mut other_mix = sets.to_vec();
    other_mix.push(set("stages.data.keep.1.fraction", "1.0"));
    let plan = plan(&p, &recipe("gemma3-270m-tool-use.toml"), &other_mix);
    let status =
        |name: &str| plan["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["status"].clone();
    assert_eq!((status("eval.base"), status("eval-chat")), ("cached".into(), "cached".into()), "{plan}");
    assert_eq!(status("train"), "run", "{plan}");
}

#[test]
fn gemma3_1b_tool_use_runs_end_to_end_on_a_small_gemma3() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    TinyGemma3::new(262_144).write(&p.path("tiny-gemma3"), &models.join("gemma-3-270m"), 1).unwrap();
    let sets = [
        base(&p.path("tiny-gemma3")),
        set("stages.train.max_steps", 2),
        set("stages.train.gradient_accumulation", 2),
        set("stages.train.eval_examples", 2),
        set("stages.eval.limit", 2),
        set("stages.eval.generation.max_new_tokens", 8),
    ];
    let (stderr, dirs) = run(&p, &recipe("gemma3-1b-tool-use.toml"), &sets);
    assert!(stderr.contains("ran     ollama"), "{stderr}");
    // The seeded filter: easy tool-needed rows plus a fifth of the no-tool ones.
    let rows = std::fs::read_to_string(dir(&dirs, "data").join("rows/train.jsonl")).unwrap();
    let kinds: Vec<String> = rows
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["query_type"].as_str().unwrap().to_string())
        .collect();
    let easy = kinds.iter().filter(|k| *k == "easy").count();
    let no_tool = kinds.iter().filter(|k| *k == "no_tool").count();
    assert_eq!(easy, 158, "every easy row of the train split");
    assert_eq!(no_tool, 32, "20 % of the 161 no-tool rows, rounded");
    assert!(!kinds.iter().any(|k| k == "hard"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&dirs, "eval").join("report.json")).unwrap()).unwrap();
    assert!(report["models"]["base"].is_object() && report["models"]["adapter"].is_object(), "{report}");
}

#[test]
fn qwen3_function_calling_runs_end_to_end_and_reports_the_four_prompts() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    TinyQwen::new(Variant::Qwen3, 151_936).write(&p.path("tiny-qwen3"), &models.join("qwen3-tokenizer"), 1).unwrap();
    let sets = [
        base(&p.path("tiny-qwen3")),
        set("stages.train.max_steps", 2),
        set("stages.eval.limit", 2),
        set("stages.eval.generation.max_new_tokens", 8),
    ];
    let (stderr, dirs) = run(&p, &recipe("qwen3-0.6b-function-calling.toml"), &sets);
    assert!(stderr.contains("ran     ollama"), "{stderr}");
    // The repository's dataset: Chinese and English, its function-style calls
    // rendered as Qwen3's native calls, its tools in Qwen3's <tools> block.
    let conv = std::fs::read_to_string(dir(&dirs, "chat").join("conversations/train.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(conv.lines().next().unwrap()).unwrap();
    let text = first["text"].as_str().unwrap();
    assert!(text.starts_with("<|im_start|>system\n你是一个可以调用工具的智能助手"), "{text}");
    assert!(
        text.contains("# Tools")
            && text.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""),
        "{text}"
    );
    // (Arguments in sorted order, as Ollama writes them: `date` before `location`.)
    assert!(
        conv.contains("<tool_call>\\n{\\\"name\\\": \\\"get_weather\\\", \\\"arguments\\\": {\\\"date\\\""),
        "native calls"
    );
    assert!(conv.contains("\\\"location\\\": \\\""), "the arguments kept");
    assert!(!conv.contains("get_weather({"), "no function-style call is left");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&dirs, "eval").join("report.json")).unwrap()).unwrap();
    let prompts = report["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 8, "4 prompts x (base, adapter)");
    assert_eq!(prompts[0]["prompt"], "今天北京的天气怎么样？");
    assert!(prompts.iter().all(|c| c["parsed"]["calls"].is_array()));
    let md = std::fs::read_to_string(dir(&dirs, "eval").join("report.md")).unwrap();
    assert!(md.contains("## Prompts") && md.contains("帮我计算一下 25 * 4 + 10"), "{md}");
    assert!(stderr.contains("prompt [adapter] \"现在几点了？\""), "{stderr}");
}

/// Llama 3.2's tool format end to end, on a small random Llama with the
/// real Llama 3.2 tokenizer and chat template: the tool list in the first
/// user turn, calls as `{"name", "parameters"}`, results in `ipython`
/// turns; the GGUF carries that template and the Modelfile is Ollama's
/// rendering of it, with `tools`.
#[test]
fn llama3_tool_use_runs_end_to_end_in_llama3s_own_tool_format() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let tiny = p.path("tiny-llama3");
    pipeline_model::testing::TinyLlama::new(128_256).write(&tiny, &models.join("llama3.2-tokenizer"), 1).unwrap();
    let sets = [
        base(&tiny),
        set("stages.tokens.max_len", 1024),
        set("stages.train.max_steps", 2),
        set("stages.train.gradient_accumulation", 1),
        set("stages.train.eval_examples", 2),
        set("stages.eval.limit", 2),
        set("stages.eval.generation.max_new_tokens", 8),
        set("stages.eval-constrained.limit", 2),
        set("stages.eval-constrained.generation.max_new_tokens", 8),
    ];
    let (stderr, dirs) = run(&p, &recipe("llama3.2-1b-tool-use.toml"), &sets);
    assert!(stderr.contains("ran     ollama"), "{stderr}");
    let conv = std::fs::read_to_string(dir(&dirs, "chat").join("conversations/train.jsonl")).unwrap();
    let calls = conv
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .find(|t| t.contains("\"parameters\": {\""))
        .expect("a conversation with a call");
    assert!(
        calls.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"),
        "{calls}"
    );
    assert!(calls.contains("Today Date: 26 Jul 2024\n"), "training's fixed date: {calls}");
    assert!(calls.contains("<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \""), "{calls}");
    let modelfile = std::fs::read_to_string(dir(&dirs, "ollama").join("Modelfile")).unwrap();
    assert!(modelfile.contains("{{ if .ToolCalls }}") && modelfile.contains("Environment: ipython"), "{modelfile}");
    assert!(modelfile.contains("PARAMETER stop \"<|eot_id|>\""), "{modelfile}");
}

/// The SmolLM2 directory, or `None` (a failure unless skipping is allowed).
fn smollm2(models: &Path) -> Option<PathBuf> {
    let dir = models.join("smollm2-135m-instruct");
    if dir.join("SmolLM2-135M-Instruct.Q4_1.gguf").is_file() {
        return Some(dir);
    }
    common::missing("SmolLM2-135M-Instruct is not provisioned", "run scripts/fetch-models.sh");
    None
}

/// SmolLM2 (a GGUF alone: tokenizer and template read from it) learns tool
/// calls in ChatML with the Hermes tool block, and is served as its Q4_1
/// base, block for block, with the adapter.
#[test]
fn smollm2_tool_use_runs_end_to_end_on_the_real_smollm2() {
    let Some(models) = models_dir() else { return };
    let Some(smol) = smollm2(&models) else { return };
    let p = Project::new();
    let sets = [
        base(&smol),
        set("stages.tokens.max_len", 1024),
        set("stages.train.max_steps", 2),
        set("stages.train.gradient_accumulation", 1),
        set("stages.train.eval_examples", 2),
        set("stages.eval.limit", 3),
        set("stages.eval.generation.max_new_tokens", 24),
        set("stages.eval-constrained.limit", 3),
        set("stages.eval-constrained.generation.max_new_tokens", 24),
    ];
    let (stderr, dirs) = run(&p, &recipe("smollm2-135m-tool-use.toml"), &sets);
    assert!(stderr.contains("ran     ollama"), "{stderr}");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(dir(&dirs, "chat").join("conversations/train.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    let text = first["text"].as_str().unwrap();
    assert!(text.starts_with("<|im_start|>system\n# Tools\n"), "{text}");
    let gguf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&dirs, "gguf").join("manifest.json")).unwrap()).unwrap();
    let base_file = &gguf["metrics"]["files"]["base-q4_1.gguf"];
    assert_eq!(base_file["tensors"], 272, "{gguf}");
    assert_eq!(base_file["tensors_kept_as_stored"], 272, "every tensor as the original stores it: {gguf}");
    let modelfile = std::fs::read_to_string(dir(&dirs, "ollama").join("Modelfile")).unwrap();
    assert!(modelfile.contains("ADAPTER ./adapter.gguf") && modelfile.contains("<tools>"), "{modelfile}");
}

/// SmolLM2's own ChatML template (read from its GGUF), a system prompt
/// trained and served.
#[test]
fn smollm2_fish_care_runs_end_to_end_in_smollm2s_own_template() {
    let Some(models) = models_dir() else { return };
    let Some(smol) = smollm2(&models) else { return };
    let p = Project::new();
    let sets = [
        base(&smol),
        set("stages.train.max_steps", 3),
        set("stages.eval.limit", 2),
        set("stages.eval.generation.max_new_tokens", 8),
    ];
    let (stderr, dirs) = run(&p, &recipe("smollm2-135m-fish-care.toml"), &sets);
    assert!(stderr.contains("ran     ollama"), "{stderr}");
    let conv = std::fs::read_to_string(dir(&dirs, "chat").join("conversations/train.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(conv.lines().next().unwrap()).unwrap();
    let text = first["text"].as_str().unwrap();
    assert!(text.starts_with("<|im_start|>system\n你是一位观赏鱼养护专家。<|im_end|>\n<|im_start|>user\n"), "{text}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&dirs, "merged").join("config.json")).unwrap()).unwrap();
    assert_eq!((config["model_type"].as_str(), config["num_hidden_layers"].as_u64()), (Some("llama"), Some(30)));
    let modelfile = std::fs::read_to_string(dir(&dirs, "ollama").join("Modelfile")).unwrap();
    assert!(modelfile.contains("<|im_start|>{{ .Role }}") && modelfile.contains("SYSTEM"), "{modelfile}");
}

#[test]
fn fish_care_qa_runs_end_to_end_on_a_small_qwen2_with_alpaca_prompts() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    TinyQwen::new(Variant::Qwen2, 151_936).write(&p.path("tiny-qwen2"), &models.join("qwen3-tokenizer"), 1).unwrap();
    let sets =
        [base(&p.path("tiny-qwen2")), set("stages.eval.limit", 2), set("stages.eval.generation.max_new_tokens", 8)];
    let (stderr, dirs) = run(&p, &recipe("fish-care-qa.toml"), &sets);
    assert!(stderr.contains("ran     ollama"), "{stderr}");
    let conv = std::fs::read_to_string(dir(&dirs, "chat").join("conversations/train.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(conv.lines().next().unwrap()).unwrap();
    let text = first["text"].as_str().unwrap();
    assert!(text.starts_with("### Instruction:\n") && text.contains("\n\n### Input:\n\n### Response:\n"), "{text}");
    let train: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&dirs, "train").join("manifest.json")).unwrap()).unwrap();
    assert_eq!(train["metrics"]["steps"], 10, "LLaMA-Factory's quick run: 10 steps");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir(&dirs, "train").join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 2);
    let modelfile = std::fs::read_to_string(dir(&dirs, "ollama").join("Modelfile")).unwrap();
    assert!(modelfile.contains("### Instruction:"), "{modelfile}");
}
