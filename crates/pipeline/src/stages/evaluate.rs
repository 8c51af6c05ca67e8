//! `evaluate`: generate an answer for every conversation of a split and
//! score it against the conversation's own gold turn; eval loss and
//! perplexity on the same conversations.
//!
//! For each row the prompt is the conversation up to its first assistant
//! turn, rendered with the chat template that `format-chat` used for
//! training (read from its artifact, so evaluation sees what training saw).
//! One forward pass over the whole conversation scores the loss of its
//! assistant tokens and fills the KV cache; the cache is cut back to the
//! prompt and the answer is decoded from there. Rows run in token order,
//! each starting from the prefix it shares with the previous row (copied
//! out of that row's cache), and are decoded `batch` at a time. `compare =
//! ["base", "adapter"]` reports the base model and base + adapter (unmerged)
//! side by side; the base model's half is the implicit stage `NAME.base`,
//! cached on its own so that retraining does not evaluate it again. Outputs: `report.json`, `report.md`, `predictions.jsonl`
//! (in the split's order).

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::format_chat;
use super::format_chat::Conversation;
use super::lora_train;
use super::{Env, Input, Kind, Rule, RunContext, Stage, StageKind};
use pipeline_infer::catalogue::Catalogue;
use pipeline_infer::chat::{ChatTemplate, Message};
use pipeline_infer::constrain::CallGrammar;
use pipeline_infer::eval::{Gold, Metric, Task, markdown_table};
use pipeline_infer::generate::GenerationParams;
use pipeline_infer::runner::{EvalRow, Runner};
use pipeline_infer::toolbox::Toolbox;
use pipeline_model::{self as model, CausalLm};

/// Parameters of an `evaluate` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The `format-chat` stage whose conversations are evaluated.
    pub conversations: String,
    /// The `lora-train` stage whose adapter is evaluated (leave out to
    /// evaluate the base model alone).
    #[serde(default)]
    pub adapter: Option<String>,
    /// The split to evaluate (default: `validation`, else `test`).
    #[serde(default)]
    pub split: Option<String>,
    /// Models to evaluate side by side: `base`, `adapter` (default: the
    /// adapter when there is one, else the base).
    #[serde(default)]
    pub compare: Vec<Subject>,
    /// `tool-call`, `qa`, or `auto` (tool calling when any gold turn calls a tool).
    #[serde(default)]
    pub task: Task,
    /// Evaluate only the first N rows.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Prompts longer than this many tokens are skipped and counted in the
    /// report (default: the model's context minus `max_new_tokens`).
    #[serde(default)]
    pub max_prompt_tokens: Option<usize>,
    /// Compute eval loss and perplexity over the assistant turns.
    #[serde(default = "yes")]
    pub loss: bool,
    /// Row column whose values break the metrics down (default: `query_type`
    /// when rows have it).
    #[serde(default)]
    pub group_by: Option<String>,
    /// Boolean row column saying whether a query needs a tool (default:
    /// `tool_needed` when rows have it, else whether the gold turn calls one).
    #[serde(default)]
    pub needs_call_column: Option<String>,
    /// Decoding (greedy by default).
    #[serde(default)]
    pub generation: GenerationParams,
    /// Constrained decoding of tool calls: inside a `<tool_call>` block the
    /// model may only write a JSON call naming a tool of the row's `tools`
    /// (as a server's grammar allows a request's tools), or of the
    /// dataset's catalogue for rows that list none, with that tool's
    /// arguments of their declared types (it still decides freely whether
    /// to call). Compare with an unconstrained `evaluate` stage to see what
    /// the constraint buys.
    #[serde(default)]
    pub constrained_calls: bool,
    /// The tool implementations generated calls are executed on, for the
    /// "call executes" metric (the one the published tool-use evaluations
    /// call "success"): `auto` (the built-in toolbox that implements every
    /// tool of the dataset's catalogue, if one does), `none`, or a built-in
    /// toolbox by name (`tool-use-finetuning`).
    #[serde(default = "auto")]
    pub toolbox: String,
    /// Rows decoded together (one step runs a token of each): faster, and
    /// the same answers up to float rounding, so it is not part of the
    /// stage's cache key. Each row holds a KV cache of its whole prompt.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Spot checks: each prompt is sent as a user turn (after the split's
    /// system prompt, with its tools, when the conversations have them) to
    /// every compared model; the report lists what each generated and the
    /// tool calls parsed from it.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// The implicit stage that evaluates the base model when `compare` has
    /// both models (see [`Params::split_off_base`]); its results are read
    /// instead of evaluating the base model again.
    #[serde(skip)]
    #[schemars(skip)]
    pub baseline: Option<String>,
}

fn yes() -> bool {
    true
}

fn auto() -> String {
    "auto".into()
}

fn default_batch() -> usize {
    8
}

/// A model to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Subject {
    Base,
    Adapter,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Base => "base",
            Subject::Adapter => "adapter",
        }
    }
}

impl Params {
    /// When `compare` has both the base model and the adapter, the base
    /// model's half of the work is its own stage: it does not depend on the
    /// adapter, so retraining (new steps, rank, learning rate…) reuses it
    /// from the cache instead of evaluating the unchanged base model again.
    /// Returns that stage's parameters (those of this stage without the
    /// adapter: its cache key is the one of a base-only `evaluate` stage
    /// written in the recipe) and points this stage's `baseline` at `name`.
    pub fn split_off_base(&mut self, name: &str) -> Option<Params> {
        if !(self.subjects().contains(&Subject::Base) && self.subjects().contains(&Subject::Adapter)) {
            return None;
        }
        let base = Params { adapter: None, compare: Vec::new(), baseline: None, ..self.clone() };
        self.baseline = Some(name.to_string());
        Some(base)
    }

    /// The split evaluated among those `found`: `split`, else `validation`,
    /// else `test`.
    pub(crate) fn split_of(&self, found: &[(String, std::path::PathBuf)], stage: &str) -> Result<String> {
        if let Some(s) = &self.split {
            return Ok(s.clone());
        }
        ["validation", "test"].iter().find(|s| found.iter().any(|(f, _)| f == *s)).map(|s| s.to_string()).with_context(
            || {
                format!(
                    "stage `{stage}`: no `validation` or `test` split to evaluate (found: {}); set `split`",
                    found.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", ")
                )
            },
        )
    }

    /// The toolbox calls are executed on, for `catalogue` (see `toolbox`).
    pub(crate) fn toolbox_for(&self, catalogue: &Catalogue) -> Option<Toolbox> {
        match self.toolbox.as_str() {
            "none" => None,
            "auto" => Toolbox::covering(catalogue),
            name => Toolbox::builtin(name),
        }
    }

    fn subjects(&self) -> Vec<Subject> {
        match (self.compare.is_empty(), &self.adapter) {
            (false, _) => self.compare.clone(),
            (true, Some(_)) => vec![Subject::Adapter],
            (true, None) => vec![Subject::Base],
        }
    }
}

impl StageKind for Params {
    const EXPORTED: bool = true;

    fn evaluates(&self) -> Option<super::kind::Evaluates<'_>> {
        Some(super::kind::Evaluates { adapter: self.adapter.as_deref() })
    }

    /// The adapter's metrics (else the base model's).
    fn sweep_metrics(&self, entry: &std::path::Path) -> Result<super::kind::SweepMetrics> {
        let report = EvalReport::read(entry)?;
        let mut out = super::kind::SweepMetrics::default();
        if let Some(m) = report.tuned_or_base() {
            out.metrics = m.overall.clone();
            out.groups = m.by_group.clone();
        }
        Ok(out)
    }

    fn inputs(&self) -> Vec<Input<'_>> {
        let mut v =
            vec![Input { role: "conversations", stage: &self.conversations, kinds: &[format_chat::Params::KIND] }];
        if let Some(a) = &self.adapter {
            v.push(Input { role: "adapter", stage: a, kinds: &[lora_train::Params::KIND] });
        }
        if let Some(b) = &self.baseline {
            v.push(Input { role: "baseline", stage: b, kinds: &[Params::KIND] });
        }
        v
    }

    fn check(&self) -> Result<(), Rule> {
        if self.compare.contains(&Subject::Adapter) && self.adapter.is_none() {
            return Err((
                "compare",
                "`adapter` is compared but no adapter stage is named".into(),
                "set `adapter = \"<lora-train stage>\"` or compare only \"base\"".into(),
            ));
        }
        if self.constrained_calls && self.task == Task::Qa {
            return Err((
                "constrained_calls",
                "constrained decoding of tool calls in a `qa` evaluation".into(),
                "constrain calls only where the task is tool calling".into(),
            ));
        }
        if !["auto", "none"].contains(&self.toolbox.as_str()) && Toolbox::builtin(&self.toolbox).is_none() {
            return Err((
                "toolbox",
                format!("no built-in toolbox `{}`", self.toolbox),
                format!(
                    "use \"auto\", \"none\" or one of: {}",
                    pipeline_infer::toolbox::builtin_names().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if self.generation.max_new_tokens == 0 {
            return Err(("generation.max_new_tokens", "0".into(), "generate at least 1 token".into()));
        }
        if self.batch == 0 {
            return Err(("batch", "0".into(), "decode at least 1 row at a time (default 8)".into()));
        }
        if self.limit == Some(0) {
            return Err(("limit", "0".into(), "evaluate at least 1 row, or leave `limit` out".into()));
        }
        if let Some(i) = self.prompts.iter().position(|p| p.trim().is_empty()) {
            return Err(("prompts", format!("prompt {i} is empty"), "write the user's request".into()));
        }
        self.generation.check().map_err(|(k, v, h)| (k, v, h))
    }
}

impl Stage for Params {
    fn version(&self) -> u32 {
        // 2: decision accuracy, correct tool, call success against the catalogue.
        // 3: a GGUF base's prompts multiply on its quantized weights (8-bit
        //    activations, as llama.cpp), not on f32 copies.
        // 4: calls executed on a toolbox ("call executes"); the schema check
        //    renamed "schema-valid call".
        4
    }

    fn params(&self, env: &Env) -> Value {
        let mut v = serde_json::to_value(self).expect("params serialize");
        v.as_object_mut().expect("an object").remove("batch");
        if self.constrained_calls {
            // What the grammar allows decides the answers: its revisions are
            // part of the key (of constrained evaluations only).
            v["call_grammar"] = CallGrammar::VERSION.into();
        }
        v["seed"] = env.settings.seed.into();
        v["device"] = env.settings.device.clone().into();
        v
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        env.base_model_inputs(true)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        Evaluation::new(self, ctx)?.run()
    }
}

/// The tool catalogue of a dataset: the union of every split's `<tools>`
/// blocks (in any message) and OpenAI `tools` lists.
pub(crate) fn catalogue_of(splits: &[(String, std::path::PathBuf)]) -> Result<Catalogue> {
    let mut catalogue = Catalogue::default();
    for (_, path) in splits {
        for conv in pipeline_data::read_jsonl_as::<Conversation>(path)? {
            if let Some(tools) = &conv.tools {
                catalogue.add_list(tools);
            }
            for m in &conv.messages {
                catalogue.add_text(&m.content);
            }
        }
    }
    Ok(catalogue)
}

/// The share of `rows` whose gold calls all run on `toolbox` (over the rows
/// whose gold turn calls a tool; none when no row does).
fn gold_calls_execute(rows: &[EvalRow], toolbox: &Toolbox) -> Option<Metric> {
    let runs: Vec<bool> = rows
        .iter()
        .filter(|r| r.gold.calls.attempted())
        .map(|r| r.gold.calls.all_valid() && r.gold.calls.calls.iter().all(|c| toolbox.execute(c).is_ok()))
        .collect();
    let n = runs.len();
    (n > 0).then(|| Metric { value: runs.iter().filter(|ok| **ok).count() as f64 / n as f64, n })
}

struct Evaluation<'a> {
    p: &'a Params,
    ctx: &'a RunContext<'a>,
    split: String,
    rows: Vec<EvalRow>,
    /// The first row's conversation: its system turns and tools frame the
    /// spot-check prompts.
    first: Conversation,
    task: Task,
    tokenizer: tokenizers::Tokenizer,
    template: ChatTemplate,
    model: Box<dyn CausalLm>,
    /// Adapter weights, attached for `adapter` and detached for `base`.
    adapter: Option<pipeline_model::adapter::LoadedAdapter>,
    max_prompt: usize,
    /// The column the per-group tables break down by, if any.
    group_by: Option<String>,
    /// The column labelling whether a row needs a call, if any.
    needs_call_column: Option<String>,
    /// The tools of every split's rows: what a call must run against.
    catalogue: Catalogue,
    /// With `constrained_calls`: the grammar decoding follows.
    grammar: Option<CallGrammar>,
    /// The implementations calls are executed on, if any.
    toolbox: Option<Toolbox>,
    /// Of the rows whose gold turn calls a tool, those whose calls all run
    /// on the toolbox: how well it stands in for the dataset's own tools (a
    /// figure near 100 % says a model's failures are its own).
    gold_calls_execute: Option<Metric>,
}

impl<'a> Evaluation<'a> {
    fn new(p: &'a Params, ctx: &'a RunContext<'a>) -> Result<Self> {
        let conv_dir = ctx.input("conversations");
        let found = super::splits_in(&conv_dir.join("conversations"), "jsonl")?;
        let split = p.split_of(&found, ctx.name)?;
        let catalogue = catalogue_of(&found)?;
        let path = &super::select_splits(found, std::slice::from_ref(&split), ctx.name)?[0].1;
        let mut convs: Vec<Conversation> = pipeline_data::read_jsonl_as(path)?;
        if let Some(n) = p.limit {
            convs.truncate(n);
        }
        if convs.is_empty() {
            bail!("stage `{}`: split `{split}` has no rows to evaluate ({})", ctx.name, path.display());
        }
        let template = super::format_chat::trained_template(conv_dir)?;
        let resolved = ctx.env.model_weights()?;
        let tok_path = resolved.tokenizer_json()?;
        let tokenizer = tokenizers::Tokenizer::from_file(tok_path)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
        let group_by = p
            .group_by
            .clone()
            .or_else(|| convs.first().filter(|c| c.meta.contains_key("query_type")).map(|_| "query_type".to_string()));
        let needs_call_column = p.needs_call_column.clone().or_else(|| {
            convs
                .first()
                .filter(|c| c.meta.get("tool_needed").is_some_and(Value::is_boolean))
                .map(|_| "tool_needed".into())
        });
        let first = convs[0].clone();
        let mut rows = Vec::with_capacity(convs.len());
        for conv in convs {
            let first = conv.messages.iter().position(|m| m.role == "assistant").with_context(|| {
                format!("stage `{}`: row `{}` has no assistant turn to compare with", ctx.name, conv.id)
            })?;
            let gold_msg = &conv.messages[first];
            let prompt_text = template.render(&conv.messages[..first], conv.tools.as_ref(), true)?;
            let prompt = pipeline_infer::generate::encode(&tokenizer, &prompt_text)?;
            let (full, mask) = super::tokenize::encode_with_mask(&tokenizer, &conv)?;
            let group = group_by.as_ref().map(|g| match conv.meta.get(g) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "(none)".into(),
                Some(v) => v.to_string(),
            });
            let needs_call = match &needs_call_column {
                Some(c) => Some(conv.meta.get(c).and_then(Value::as_bool).with_context(|| {
                    format!(
                        "stage `{}`: row `{}` has no boolean `{c}` (needs_call_column): set it for every row or leave the key out",
                        ctx.name, conv.id
                    )
                })?),
                None => None,
            };
            let grammar = match (&conv.tools, p.constrained_calls) {
                (Some(tools), true) => {
                    let mut own = Catalogue::default();
                    own.add_list(tools);
                    (!own.is_empty()).then(|| CallGrammar::new(own))
                }
                _ => None,
            };
            rows.push(EvalRow {
                id: conv.id,
                grammar,
                gold: Gold::new(&gold_msg.content, gold_msg.tool_calls.as_ref(), needs_call),
                prompt,
                full,
                mask,
                group,
            });
        }
        let task = match p.task {
            Task::Auto if rows.iter().any(|r| r.gold.calls.attempted()) => Task::ToolCall,
            Task::Auto => Task::Qa,
            t => t,
        };
        let device = model::device(&ctx.env.settings.device)?;
        let model = model::load_for_inference(resolved, &device)?;
        let adapter = match &p.adapter {
            Some(_) => Some(pipeline_model::adapter::LoadedAdapter::read(ctx.input("adapter"), &device)?),
            None => None,
        };
        let toolbox = p.toolbox_for(&catalogue);
        let gold_calls_execute = toolbox.as_ref().and_then(|t| gold_calls_execute(&rows, t));
        let limit = model.max_positions().min(model.max_position_embeddings());
        let max_prompt = p.max_prompt_tokens.unwrap_or(limit.saturating_sub(p.generation.max_new_tokens));
        Ok(Evaluation {
            p,
            ctx,
            split,
            rows,
            first,
            task,
            tokenizer,
            template,
            model,
            adapter,
            max_prompt,
            group_by,
            needs_call_column,
            grammar: p.constrained_calls.then(|| CallGrammar::new(catalogue.clone())),
            gold_calls_execute,
            toolbox,
            catalogue,
        })
    }

    fn run(mut self) -> Result<Value> {
        let mut per_model = indexmap::IndexMap::new();
        let mut predictions = Vec::new();
        let mut tables: Vec<(String, BTreeMap<String, Metric>, BTreeMap<String, BTreeMap<String, Metric>>)> =
            Vec::new();
        let mut skipped = 0;
        let mut spot_checks = Vec::new();
        for subject in self.p.subjects() {
            let r = match (subject, &self.p.baseline) {
                (Subject::Base, Some(_)) => ModelResult::read(self.ctx.input("baseline"), subject)?,
                _ => {
                    match (subject, &self.adapter) {
                        (Subject::Adapter, Some(a)) => a.attach(self.model.as_mut())?,
                        _ => pipeline_model::adapter::detach(self.model.as_mut()),
                    }
                    self.evaluate(subject)?
                }
            };
            skipped = r.skipped;
            per_model.insert(
                subject.name().into(),
                ModelReport {
                    overall: r.overall.clone(),
                    by_group: r.groups.clone(),
                    skipped_overlong: r.skipped,
                    seconds: r.seconds,
                },
            );
            predictions.extend(r.predictions);
            tables.push((subject.name().to_string(), r.overall, r.groups));
            spot_checks.extend(r.spot_checks);
        }
        pipeline_data::write_jsonl(&self.ctx.out.join("predictions.jsonl"), &predictions)?;
        let report = EvalReport {
            split: self.split.clone(),
            rows: self.rows.len(),
            task: self.task,
            group_by: self.group_by.clone(),
            needs_call_column: self.needs_call_column.clone(),
            catalogue: self.catalogue.tools.keys().cloned().collect(),
            toolbox: self.toolbox.as_ref().map(|t| t.name.to_string()),
            gold_calls_execute: self.gold_calls_execute,
            max_prompt_tokens: self.max_prompt,
            generation: self.p.generation.clone(),
            constrained_calls: self.p.constrained_calls,
            models: per_model,
            prompts: spot_checks.clone(),
        };
        std::fs::write(self.ctx.out.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
        std::fs::write(self.ctx.out.join("report.md"), self.markdown(&tables, skipped, &spot_checks))?;
        let summary: serde_json::Map<String, Value> = tables
            .iter()
            .map(|(name, overall, _)| {
                let pick = |k: &str| overall.get(k).map(|m| m.value);
                (
                    name.clone(),
                    json!({"exact_match": pick("exact_match"), "rouge_l": pick("rouge_l"), "loss": pick("loss")}),
                )
            })
            .collect();
        let columns: Vec<(&str, &BTreeMap<String, Metric>)> =
            tables.iter().map(|(name, overall, _)| (name.as_str(), overall)).collect();
        crate::report::println(&format!(
            "  evaluate `{}` on {} ({} rows):",
            self.ctx.name,
            self.split,
            self.rows.len()
        ));
        for line in pipeline_infer::eval::text_table(&columns).lines() {
            crate::report::println(&format!("    {line}"));
        }
        for c in &spot_checks {
            crate::report::println(&format!("  prompt [{}] {:?} → {}", c.model, c.prompt, c.calls_summary()));
        }
        Ok(json!({"split": self.split, "rows": self.rows.len(), "skipped_overlong": skipped, "models": summary}))
    }

    /// Every row with the model as it is now (base, or the adapter
    /// attached), through the runner of `pipeline-infer`, and the spot checks.
    fn evaluate(&self, subject: Subject) -> Result<ModelResult> {
        let pb = crate::report::bar(self.rows.len() as u64, &format!("evaluate {}", subject.name()));
        let run = self.runner().run(subject.name(), &|| pb.inc(1))?;
        pb.finish();
        Ok(ModelResult {
            overall: run.overall,
            groups: run.groups,
            predictions: run.predictions,
            skipped: run.skipped,
            seconds: run.seconds,
            spot_checks: self.spot_checks(subject)?,
        })
    }

    fn runner(&self) -> Runner<'_> {
        Runner {
            model: self.model.as_ref(),
            tokenizer: &self.tokenizer,
            template: &self.template,
            rows: &self.rows,
            task: self.task,
            generation: &self.p.generation,
            seed: self.ctx.env.settings.seed,
            batch: self.p.batch,
            loss: self.p.loss,
            max_prompt: self.max_prompt,
            grammar: self.grammar.as_ref(),
            catalogue: &self.catalogue,
            toolbox: self.toolbox.as_ref(),
        }
    }

    /// Generates for each of `prompts`, rendered like the split's rows.
    fn spot_checks(&self, subject: Subject) -> Result<Vec<SpotCheck>> {
        if self.p.prompts.is_empty() {
            return Ok(Vec::new());
        }
        let first = &self.first;
        let system: Vec<Message> = first.messages.iter().take_while(|m| m.role == "system").cloned().collect();
        let runner = self.runner();
        let generator = runner.generator();
        let mut out = Vec::new();
        for prompt in &self.p.prompts {
            let mut messages = system.clone();
            messages.push(Message::new("user", prompt));
            let text = self.template.render(&messages, first.tools.as_ref(), true)?;
            let ids = pipeline_infer::generate::encode(&self.tokenizer, &text)?;
            let g = generator.generate(&ids, &self.p.generation, self.ctx.env.settings.seed, &mut |_| {})?;
            let parsed = pipeline_infer::toolcall::parse(&g.text);
            out.push(SpotCheck { model: subject.name().into(), prompt: prompt.clone(), generated: g.text, parsed });
        }
        Ok(out)
    }

    fn markdown(
        &self,
        tables: &[(String, BTreeMap<String, Metric>, BTreeMap<String, BTreeMap<String, Metric>>)],
        skipped: usize,
        spot_checks: &[SpotCheck],
    ) -> String {
        let mut s = format!(
            "# Evaluation of `{}` on split `{}`\n\n{} rows, task `{}`, greedy = {}, max_new_tokens = {}{}.\n",
            self.ctx.env.settings.name,
            self.split,
            self.rows.len(),
            serde_json::to_value(self.task).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            self.p.generation.temperature == 0.0,
            self.p.generation.max_new_tokens,
            if self.p.constrained_calls {
                ", tool calls decoded under the grammar of each row's tools (else the catalogue's)"
            } else {
                ""
            },
        );
        if skipped > 0 {
            s += &format!(
                "\n**{skipped} rows skipped**: their prompt is longer than {} tokens (max_prompt_tokens).\n",
                self.max_prompt
            );
        }
        if self.task == Task::ToolCall {
            let needed = match &self.needs_call_column {
                Some(c) => format!("its `{c}` column"),
                None => "whether its gold turn calls a tool".into(),
            };
            s += &format!(
                "\nA row needs a call by {needed}. **Decision**: a call was made iff one is needed (all rows; \
                 published as \"tool called when needed\"). **Correct tool**, **call executes** and \
                 **schema-valid call** are over the tool-needed rows. {} A call is **schema-valid** when it \
                 passes the schema of the dataset's {} tools (the union of its rows' catalogues): a known tool, \
                 every required argument, no unknown one, values of the declared JSON types; it need not run \
                 (`get_weather(city=\"ff\")` passes), and constrained decoding enforces it by construction.\n",
                match &self.toolbox {
                    Some(t) => format!(
                        "A call **executes** when it runs without error on the `{}` toolbox's implementations of \
                         the tools (the published \"success\"){}.",
                        t.name,
                        self.gold_calls_execute
                            .map(|m| format!(
                                "; the gold turns' own calls execute in {:.1} % of their rows (n={})",
                                100.0 * m.value,
                                m.n
                            ))
                            .unwrap_or_default()
                    ),
                    None => "No toolbox implements these tools, so no call was executed.".into(),
                },
                self.catalogue.len()
            );
        }
        s += "\n## Overall\n\n";
        let cols: Vec<(&str, &BTreeMap<String, Metric>)> = tables.iter().map(|(n, o, _)| (n.as_str(), o)).collect();
        s += &markdown_table(&cols);
        let groups: std::collections::BTreeSet<&String> = tables.iter().flat_map(|(_, _, g)| g.keys()).collect();
        if !groups.is_empty() {
            s += &format!("\n## By `{}`\n", self.group_by.as_deref().unwrap_or_default());
            let empty = BTreeMap::new();
            for g in groups {
                s += &format!("\n### {g}\n\n");
                let cols: Vec<(&str, &BTreeMap<String, Metric>)> =
                    tables.iter().map(|(n, _, gs)| (n.as_str(), gs.get(g).unwrap_or(&empty))).collect();
                s += &markdown_table(&cols);
            }
        }
        if !spot_checks.is_empty() {
            s += "\n## Prompts\n\n| model | prompt | parsed calls | generated |\n|---|---|---|---|\n";
            for c in spot_checks {
                let cell = |t: &str| t.replace('|', "\\|").replace('\n', "<br>");
                s += &format!(
                    "| {} | {} | {} | {} |\n",
                    c.model,
                    cell(&c.prompt),
                    cell(&c.calls_summary()),
                    cell(&c.generated)
                );
            }
        }
        s += "\nPer-row generations and verdicts: `predictions.jsonl`.\n";
        s
    }
}

/// What evaluating one model gave.
struct ModelResult {
    overall: BTreeMap<String, Metric>,
    groups: BTreeMap<String, BTreeMap<String, Metric>>,
    /// Its records of `predictions.jsonl`, in the split's order.
    predictions: Vec<Value>,
    /// Rows whose prompt was too long to decode.
    skipped: usize,
    seconds: f64,
    spot_checks: Vec<SpotCheck>,
}

impl ModelResult {
    /// `subject`'s results from the artifact of an `evaluate` stage that
    /// evaluated it (with the same rows and settings: the same key but for
    /// the adapter).
    fn read(dir: &std::path::Path, subject: Subject) -> Result<ModelResult> {
        let report = EvalReport::read(dir)?;
        let name = subject.name();
        let m = report.models.get(name).with_context(|| format!("{}: no results of `{name}`", dir.display()))?;
        let of = |v: &Value| v.as_str() == Some(name);
        let predictions: Vec<Value> = pipeline_data::read_jsonl_as(&dir.join("predictions.jsonl"))?;
        Ok(ModelResult {
            overall: m.overall.clone(),
            groups: m.by_group.clone(),
            predictions: predictions.into_iter().filter(|p| of(&p["model"])).collect(),
            skipped: m.skipped_overlong,
            seconds: m.seconds,
            spot_checks: report.prompts.into_iter().filter(|c| c.model == name).collect(),
        })
    }
}

/// `report.json`, what an `evaluate` stage writes: the settings it scored
/// under and each model's metrics. Read back through this one type (a later
/// evaluation reusing a model's results, `pipeline compare`, the model
/// cards `pipeline export` writes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub split: String,
    pub rows: usize,
    pub task: Task,
    pub group_by: Option<String>,
    pub needs_call_column: Option<String>,
    /// The tools a call must run against.
    pub catalogue: Vec<String>,
    /// The toolbox that executed the calls, if any.
    pub toolbox: Option<String>,
    /// How many of the dataset's own calls the toolbox executes.
    pub gold_calls_execute: Option<Metric>,
    pub max_prompt_tokens: usize,
    pub generation: GenerationParams,
    pub constrained_calls: bool,
    /// By model (`base`, `adapter`), in the order evaluated.
    pub models: indexmap::IndexMap<String, ModelReport>,
    /// The spot-check prompts, each answered by each model.
    pub prompts: Vec<SpotCheck>,
}

/// One model's results in an [`EvalReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelReport {
    pub overall: BTreeMap<String, Metric>,
    pub by_group: BTreeMap<String, BTreeMap<String, Metric>>,
    /// Rows whose prompt was too long to decode.
    pub skipped_overlong: usize,
    pub seconds: f64,
}

impl EvalReport {
    /// The report of the finished `evaluate` artifact `dir`.
    pub fn read(dir: &std::path::Path) -> Result<EvalReport> {
        let path = dir.join("report.json");
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: not an evaluation report", path.display()))
    }

    /// The fine-tuned model's results, else the base model's.
    pub fn tuned_or_base(&self) -> Option<&ModelReport> {
        self.models.get("adapter").or_else(|| self.models.get("base"))
    }
}

/// One prompt of `prompts`, answered by one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpotCheck {
    pub model: String,
    pub prompt: String,
    pub generated: String,
    pub parsed: pipeline_infer::toolcall::ParsedCalls,
}

impl SpotCheck {
    /// `get_weather({"location":"北京"}); calculate(…)`, or why there is none.
    fn calls_summary(&self) -> String {
        if !self.parsed.attempted() {
            return "(no tool call)".into();
        }
        let mut parts: Vec<String> = self.parsed.calls.iter().map(|c| format!("{}({})", c.name, c.arguments)).collect();
        parts.extend(self.parsed.invalid.iter().map(|t| format!("invalid: {t}")));
        parts.join("; ")
    }
}
