//! `evaluate`: generate an answer for every conversation of a split and
//! score it against the conversation's own gold turn; eval loss and
//! perplexity on the same conversations.
//!
//! For each row the prompt is the conversation up to its first assistant
//! turn, rendered with the chat template that `format-chat` used for
//! training (read from its artifact, so evaluation sees what training saw).
//! One forward pass over the whole conversation scores the loss of its
//! assistant tokens and fills the KV cache; the cache is cut back to the
//! prompt and the answer is decoded from there. `compare = ["base",
//! "adapter"]` runs the base model and base + adapter (unmerged) side by
//! side. Outputs: `report.json`, `report.md`, `predictions.jsonl`.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::format_chat::Conversation;
use super::{Env, RunContext, Stage};
use crate::chat::{ChatTemplate, Message};
use crate::eval::{Metric, Tally, Task, markdown_table, rouge_l, score_tool_call};
use crate::generate::{GenerationParams, Generator};
use crate::model::{self, CausalLm};

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
    /// Decoding (greedy by default).
    #[serde(default)]
    pub generation: GenerationParams,
    /// Spot checks: each prompt is sent as a user turn (after the split's
    /// system prompt, with its tools, when the conversations have them) to
    /// every compared model; the report lists what each generated and the
    /// tool calls parsed from it.
    #[serde(default)]
    pub prompts: Vec<String>,
}

fn yes() -> bool {
    true
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
    pub fn check(&self) -> Result<(), (&'static str, String, String)> {
        if self.compare.contains(&Subject::Adapter) && self.adapter.is_none() {
            return Err((
                "compare",
                "`adapter` is compared but no adapter stage is named".into(),
                "set `adapter = \"<lora-train stage>\"` or compare only \"base\"".into(),
            ));
        }
        if self.generation.max_new_tokens == 0 {
            return Err(("generation.max_new_tokens", "0".into(), "generate at least 1 token".into()));
        }
        if self.limit == Some(0) {
            return Err(("limit", "0".into(), "evaluate at least 1 row, or leave `limit` out".into()));
        }
        if let Some(i) = self.prompts.iter().position(|p| p.trim().is_empty()) {
            return Err(("prompts", format!("prompt {i} is empty"), "write the user's request".into()));
        }
        self.generation.check().map_err(|(k, v, h)| (k, v, h))
    }

    fn subjects(&self) -> Vec<Subject> {
        match (self.compare.is_empty(), &self.adapter) {
            (false, _) => self.compare.clone(),
            (true, Some(_)) => vec![Subject::Adapter],
            (true, None) => vec![Subject::Base],
        }
    }
}

impl Stage for Params {
    fn version(&self) -> u32 {
        1
    }

    fn params(&self, env: &Env) -> Value {
        let mut v = serde_json::to_value(self).expect("params serialize");
        v["seed"] = env.recipe.recipe.seed.into();
        v["device"] = env.recipe.recipe.device.clone().into();
        v
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        env.base_model_inputs(true)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        Evaluation::new(self, ctx)?.run()
    }
}

/// The chat template `format-chat` trained with, from its artifact.
pub fn trained_template(conversations_dir: &std::path::Path) -> Result<ChatTemplate> {
    let source = std::fs::read_to_string(conversations_dir.join("chat_template.jinja"))
        .with_context(|| format!("{}: no chat_template.jinja", conversations_dir.display()))?;
    let t: Value = serde_json::from_slice(&std::fs::read(conversations_dir.join("template.json"))?)?;
    let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    ChatTemplate::new(&source, &s("bos_token"), &s("eos_token"))
}

/// One row, ready to run.
struct Row {
    conv: Conversation,
    /// Tokens of the prompt (conversation up to the first assistant turn,
    /// with the generation prompt).
    prompt: Vec<u32>,
    /// Tokens of the whole conversation and its loss mask.
    full: Vec<u32>,
    mask: Vec<u8>,
    gold_text: String,
    gold: crate::toolcall::ParsedCalls,
    group: Option<String>,
}

struct Evaluation<'a> {
    p: &'a Params,
    ctx: &'a RunContext<'a>,
    split: String,
    rows: Vec<Row>,
    task: Task,
    tokenizer: tokenizers::Tokenizer,
    template: ChatTemplate,
    model: Box<dyn CausalLm>,
    /// Adapter weights, attached for `adapter` and detached for `base`.
    adapter: Option<crate::adapter::LoadedAdapter>,
    max_prompt: usize,
    /// The column the per-group tables break down by, if any.
    group_by: Option<String>,
}

impl<'a> Evaluation<'a> {
    fn new(p: &'a Params, ctx: &'a RunContext<'a>) -> Result<Self> {
        let conv_dir = ctx.input("conversations");
        let found = super::splits_in(&conv_dir.join("conversations"), "jsonl")?;
        let split = match &p.split {
            Some(s) => s.clone(),
            None => ["validation", "test"]
                .iter()
                .find(|s| found.iter().any(|(f, _)| f == *s))
                .map(|s| s.to_string())
                .with_context(|| {
                format!(
                    "stage `{}`: no `validation` or `test` split to evaluate (found: {}); set `split`",
                    ctx.name,
                    found.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", ")
                )
            })?,
        };
        let path = &super::select_splits(found, std::slice::from_ref(&split), ctx.name)?[0].1;
        let mut convs: Vec<Conversation> = crate::data::read_jsonl_as(path)?;
        if let Some(n) = p.limit {
            convs.truncate(n);
        }
        if convs.is_empty() {
            bail!("stage `{}`: split `{split}` has no rows to evaluate ({})", ctx.name, path.display());
        }
        let template = trained_template(conv_dir)?;
        let resolved = ctx.env.model()?;
        let tok_path = resolved.tokenizer_json()?;
        let tokenizer = tokenizers::Tokenizer::from_file(tok_path)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
        let group_by = p
            .group_by
            .clone()
            .or_else(|| convs.first().filter(|c| c.meta.contains_key("query_type")).map(|_| "query_type".to_string()));
        let mut rows = Vec::with_capacity(convs.len());
        for conv in convs {
            let first = conv.messages.iter().position(|m| m.role == "assistant").with_context(|| {
                format!("stage `{}`: row `{}` has no assistant turn to compare with", ctx.name, conv.id)
            })?;
            let gold_msg = &conv.messages[first];
            let prompt_text = template.render(&conv.messages[..first], conv.tools.as_ref(), true)?;
            let prompt = crate::generate::encode(&tokenizer, &prompt_text)?;
            let (full, mask) = super::tokenize::encode_with_mask(&tokenizer, &conv)?;
            let group = group_by.as_ref().map(|g| match conv.meta.get(g) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "(none)".into(),
                Some(v) => v.to_string(),
            });
            rows.push(Row {
                gold_text: gold_msg.content.clone(),
                gold: crate::eval::gold_calls(&gold_msg.content, gold_msg.tool_calls.as_ref()),
                prompt,
                full,
                mask,
                group,
                conv,
            });
        }
        let task = match p.task {
            Task::Auto if rows.iter().any(|r| r.gold.attempted()) => Task::ToolCall,
            Task::Auto => Task::Qa,
            t => t,
        };
        let device = model::device(&ctx.env.recipe.recipe.device)?;
        let model = model::load_for_inference(resolved, &device)?;
        let adapter = match &p.adapter {
            Some(_) => Some(crate::adapter::LoadedAdapter::read(ctx.input("adapter"), &device)?),
            None => None,
        };
        let limit = model.max_positions().min(model.max_position_embeddings());
        let max_prompt = p.max_prompt_tokens.unwrap_or(limit.saturating_sub(p.generation.max_new_tokens));
        Ok(Evaluation { p, ctx, split, rows, task, tokenizer, template, model, adapter, max_prompt, group_by })
    }

    fn run(mut self) -> Result<Value> {
        let subjects = self.p.subjects();
        let mut per_model = serde_json::Map::new();
        let mut predictions = Vec::new();
        let mut tables: Vec<(String, BTreeMap<String, Metric>, BTreeMap<String, BTreeMap<String, Metric>>)> =
            Vec::new();
        let mut skipped = 0;
        let mut spot_checks = Vec::new();
        for subject in subjects {
            match (subject, &self.adapter) {
                (Subject::Adapter, Some(a)) => a.attach(self.model.as_mut())?,
                _ => crate::adapter::detach(self.model.as_mut()),
            }
            let (overall, groups, preds, skip, seconds) = self.evaluate(subject)?;
            skipped = skip;
            per_model.insert(
                subject.name().into(),
                json!({"overall": overall, "by_group": groups, "skipped_overlong": skip, "seconds": seconds}),
            );
            predictions.extend(preds);
            tables.push((subject.name().to_string(), overall, groups));
            spot_checks.extend(self.spot_checks(subject)?);
        }
        crate::data::write_jsonl(&self.ctx.out.join("predictions.jsonl"), &predictions)?;
        let report = json!({
            "split": self.split,
            "rows": self.rows.len(),
            "task": self.task,
            "group_by": self.group_by,
            "max_prompt_tokens": self.max_prompt,
            "generation": self.p.generation,
            "models": per_model,
            "prompts": spot_checks,
        });
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
        for (name, overall, _) in &tables {
            let line = crate::eval::METRICS
                .iter()
                .filter_map(|(k, _, pct)| {
                    overall.get(*k).map(|m| {
                        if *pct { format!("{k} {:.1}%", 100.0 * m.value) } else { format!("{k} {:.3}", m.value) }
                    })
                })
                .collect::<Vec<_>>()
                .join(", ");
            crate::progress::println(&format!("  evaluate {name}: {line}"));
        }
        for c in &spot_checks {
            crate::progress::println(&format!("  prompt [{}] {:?} → {}", c.model, c.prompt, c.calls_summary()));
        }
        Ok(json!({"split": self.split, "rows": self.rows.len(), "skipped_overlong": skipped, "models": summary}))
    }

    #[allow(clippy::type_complexity)]
    fn evaluate(
        &self,
        subject: Subject,
    ) -> Result<(BTreeMap<String, Metric>, BTreeMap<String, BTreeMap<String, Metric>>, Vec<Value>, usize, f64)> {
        let t0 = std::time::Instant::now();
        let generator = self.generator();
        let seed = self.ctx.env.recipe.recipe.seed;
        let mut overall = Tally::default();
        let mut groups: BTreeMap<String, Tally> = BTreeMap::new();
        let mut preds = Vec::new();
        let mut skipped = 0;
        let pb = crate::progress::bar(self.rows.len() as u64, &format!("evaluate {}", subject.name()));
        let max_positions = self.model.max_positions();
        for row in &self.rows {
            pb.inc(1);
            let mut cache = self.model.new_cache();
            let mut tally_here = Tally::default();
            // Loss over the whole conversation; the pass fills the cache, and
            // the prompt's part of it is reused when the prompt's tokens are
            // a prefix of the conversation's.
            let mut loss = None;
            let t_loss = std::time::Instant::now();
            if self.p.loss && row.full.len() <= max_positions && row.mask.iter().any(|&m| m == 1) {
                let hidden = self.model.forward_chunked(&row.full, &mut cache)?;
                let (l, n) = crate::train::masked_loss(self.model.as_ref(), &hidden, &row.full, &row.mask)?;
                let l = l.to_scalar::<f32>()? as f64;
                tally_here.loss(l * n as f64, n);
                loss = Some(l);
                let shared = row.prompt.iter().zip(&row.full).take_while(|(a, b)| a == b).count();
                cache.truncate(shared);
            }
            let loss_s = t_loss.elapsed().as_secs_f64();
            if row.prompt.len() > self.max_prompt {
                skipped += 1;
                preds.push(json!({
                    "id": row.conv.id, "model": subject.name(), "group": row.group,
                    "prompt_tokens": row.prompt.len(), "skipped": "prompt longer than max_prompt_tokens",
                    "loss": loss,
                }));
                merge(&mut overall, &mut groups, row.group.as_deref(), &tally_here);
                continue;
            }
            let g = generator.generate_cached(&row.prompt, &mut cache, &self.p.generation, seed, &mut |_| {})?;
            let pred = crate::toolcall::parse(&g.text);
            let mut record = json!({
                "id": row.conv.id, "model": subject.name(), "group": row.group,
                "prompt_tokens": row.prompt.len(), "generated": g.text, "finish": g.finish,
                "parsed": pred, "gold": row.gold, "loss": loss,
                "seconds": {"loss": loss_s, "prefill": g.prefill_s, "decode": g.decode_s},
                "new_tokens": g.tokens.len(),
            });
            match self.task {
                Task::Qa => {
                    let f1 = rouge_l(&g.text, &row.gold_text);
                    tally_here.rouge(f1);
                    record["rouge_l"] = json!(f1);
                }
                _ => {
                    let v = score_tool_call(&pred, &row.gold, &row.gold_text, &g.text);
                    tally_here.tool(&v);
                    record["verdict"] = serde_json::to_value(&v)?;
                }
            }
            merge(&mut overall, &mut groups, row.group.as_deref(), &tally_here);
            preds.push(record);
        }
        pb.finish_and_clear();
        let groups = groups.into_iter().map(|(k, t)| (k, t.metrics())).collect();
        Ok((overall.metrics(), groups, preds, skipped, t0.elapsed().as_secs_f64()))
    }

    /// Decoding with the model as it is now (base or adapter attached),
    /// stopping at the trained template's end of turn.
    fn generator(&self) -> Generator<'_> {
        let stops = crate::generate::stop_tokens(&self.template.end_of_turn, &self.template.eos_token);
        let stops: Vec<&str> = stops.iter().map(String::as_str).collect();
        Generator::new(self.model.as_ref(), &self.tokenizer, &stops)
    }

    /// Generates for each of `prompts`, rendered like the split's rows.
    fn spot_checks(&self, subject: Subject) -> Result<Vec<SpotCheck>> {
        if self.p.prompts.is_empty() {
            return Ok(Vec::new());
        }
        let first = &self.rows[0].conv;
        let system: Vec<Message> = first.messages.iter().take_while(|m| m.role == "system").cloned().collect();
        let generator = self.generator();
        let mut out = Vec::new();
        for prompt in &self.p.prompts {
            let mut messages = system.clone();
            messages.push(Message::new("user", prompt));
            let text = self.template.render(&messages, first.tools.as_ref(), true)?;
            let ids = crate::generate::encode(&self.tokenizer, &text)?;
            let g = generator.generate(&ids, &self.p.generation, self.ctx.env.recipe.recipe.seed, &mut |_| {})?;
            let parsed = crate::toolcall::parse(&g.text);
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
            "# Evaluation of `{}` on split `{}`\n\n{} rows, task `{}`, greedy = {}, max_new_tokens = {}.\n",
            self.ctx.env.recipe.recipe.name,
            self.split,
            self.rows.len(),
            serde_json::to_value(self.task).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            self.p.generation.temperature == 0.0,
            self.p.generation.max_new_tokens,
        );
        if skipped > 0 {
            s += &format!(
                "\n**{skipped} rows skipped**: their prompt is longer than {} tokens (max_prompt_tokens).\n",
                self.max_prompt
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

/// One prompt of `prompts`, answered by one model.
#[derive(Debug, Clone, Serialize)]
struct SpotCheck {
    model: String,
    prompt: String,
    generated: String,
    parsed: crate::toolcall::ParsedCalls,
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

fn merge(overall: &mut Tally, groups: &mut BTreeMap<String, Tally>, group: Option<&str>, row: &Tally) {
    overall.merge(row);
    if let Some(g) = group {
        groups.entry(g.to_string()).or_default().merge(row);
    }
}
