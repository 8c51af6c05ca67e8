//! `format-chat`: turn dataset rows into conversations rendered with the
//! model's chat template, recording which byte spans are trained on.
//!
//! Input shapes: a messages column (`messages`, or this dataset's `trace`;
//! OpenAI `tool_calls` and a `tools` column included; ShareGPT `from`/`value`
//! accepted), instruction rows (alpaca `instruction`/`input`/`output`), and
//! question/answer rows. Output per split: `conversations/<split>.jsonl`
//! ([`Conversation`]), plus `chat_template.jinja` and `template.json`: the
//! exact template and special tokens used, which later stages write into the
//! served model so that serving renders what training saw.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fetch_dataset;
use super::{Env, Input, Kind, Rule, RunContext, Stage, StageKind, select_splits, splits_in};
use pipeline_data::{self as data, Row};
use pipeline_infer::chat::{ChatTemplate, Message, TurnSpan};
use pipeline_infer::tooluse::Converted;

/// Parameters of a `format-chat` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The `fetch-dataset` stage whose rows are formatted.
    pub dataset: String,
    /// Splits to format (default: all).
    #[serde(default)]
    pub splits: Vec<String>,
    /// The shape of a row (default: detected from the first row).
    #[serde(default)]
    pub input: InputShape,
    /// Column holding the list of messages (shape `messages`; default
    /// `messages`, else `conversations`).
    #[serde(default)]
    pub messages_column: Option<String>,
    /// Column holding an OpenAI-style tool catalogue passed to the template
    /// as `tools` (a list, or a JSON string of one).
    #[serde(default)]
    pub tools_column: Option<String>,
    /// Treat a leading `user` message as the system prompt (datasets that
    /// put instructions and the tool catalogue in a first user turn).
    #[serde(default)]
    pub first_user_is_system: bool,
    /// A system prompt for conversations that have none.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Prompt column for shapes `instruction` (default `instruction`) and
    /// `qa` (default `question`).
    #[serde(default)]
    pub prompt_column: Option<String>,
    /// Optional extra-input column for shape `instruction` (default `input`).
    #[serde(default)]
    pub input_column: Option<String>,
    /// Answer column for shapes `instruction` (default `output`) and `qa`
    /// (default `answer`).
    #[serde(default)]
    pub response_column: Option<String>,
    /// Which turns carry the loss.
    #[serde(default)]
    pub train_on: TrainOn,
    /// Regular-expression replacements applied to message contents before
    /// rendering, in order: cleaning a dataset's answers without editing
    /// it (e.g. one opening for every direct answer). Each rewrite names
    /// its role and, optionally, its splits. (Left out of the key when
    /// empty, so recipes without rewrites keep their keys.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewrite: Vec<Rewrite>,
    /// How tool calls are written: `keep` renders messages as the dataset
    /// has them; `native` converts them (after `rewrite`) into OpenAI
    /// `tools`, `tool_calls` and `tool` messages, which the chat template
    /// renders in the model's own tool format, the one servers parse. (Left
    /// out of the key when `keep`.)
    #[serde(default, skip_serializing_if = "ToolFormat::is_keep")]
    pub tool_format: ToolFormat,
    /// What to do with a row whose tool calls cannot be converted: `fail`
    /// (the error names the row) or `drop` it (counted). (Left out of the
    /// key when `fail`.)
    #[serde(default, skip_serializing_if = "Unconvertible::is_fail")]
    pub unconvertible: Unconvertible,
    /// A JSON file of tools (OpenAI `tools`, or `{"tools": […]}`; relative
    /// to the recipe) offered in every row that lists none: for datasets
    /// whose rows call a fixed set of tools without listing them. Its
    /// content is part of the cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools_file: Option<String>,
}

/// How tool calls are written in the rendered conversations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ToolFormat {
    /// The dataset's own text, rendered as it is.
    #[default]
    Keep,
    /// OpenAI `tools` / `tool_calls` / `tool` messages, rendered by the chat
    /// template in the model's tool format (Qwen's `<tools>` and
    /// `<tool_call>` blocks; `gemma-tools` for Gemma 3).
    Native,
}

impl ToolFormat {
    fn is_keep(&self) -> bool {
        *self == ToolFormat::Keep
    }
}

/// What happens to a row that cannot be converted to native tool calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Unconvertible {
    /// Stop with an error naming the row and what could not be read.
    #[default]
    Fail,
    /// Leave the row out, counted in the stage's metrics.
    Drop,
}

impl Unconvertible {
    fn is_fail(&self) -> bool {
        *self == Unconvertible::Fail
    }
}

/// The roles a message may have.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One `[[stages.NAME.rewrite]]` rule: in the contents of `role`'s messages
/// (of `splits`), every match of `pattern` is replaced by `replace`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// A regular expression (Rust `regex` syntax: `^`/`$` anchor the whole
    /// content unless `(?m)`; `(?s)` lets `.` match newlines).
    pub pattern: String,
    /// The replacement; `$1` or `${name}` insert a group (`$$` is a `$`).
    pub replace: String,
    /// The role whose messages are rewritten (default `assistant`).
    #[serde(default = "assistant")]
    pub role: String,
    /// Splits rewritten (default: all). Leave the evaluated split out to
    /// score against the dataset as published.
    #[serde(default)]
    pub splits: Vec<String>,
}

fn assistant() -> String {
    "assistant".into()
}

impl Rewrite {
    fn applies(&self, split: &str) -> bool {
        self.splits.is_empty() || self.splits.iter().any(|s| s == split)
    }
}

/// The rewrites of one split, compiled.
struct Rewrites<'a>(Vec<(regex::Regex, &'a Rewrite)>);

impl Rewrites<'_> {
    /// Applies every rule to the messages; returns how many changed.
    fn apply(&self, messages: &mut [Message]) -> usize {
        let mut changed = 0;
        for m in messages.iter_mut() {
            let mut differs = false;
            for (re, rule) in self.0.iter().filter(|(_, r)| r.role == m.role) {
                // A match replaced by the same text is no change.
                if let std::borrow::Cow::Owned(s) = re.replace_all(&m.content, rule.replace.as_str()) {
                    differs |= s != m.content;
                    m.content = s;
                }
            }
            changed += usize::from(differs);
        }
        changed
    }
}

/// How a row is turned into messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InputShape {
    /// Detect from the first row: a messages column, else instruction/output,
    /// else question/answer.
    #[default]
    Auto,
    /// A list of `{role, content}` messages.
    Messages,
    /// Alpaca rows: `instruction`, optional `input`, `output`.
    Instruction,
    /// `question` / `answer` rows.
    Qa,
}

/// Which assistant turns are trained on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TrainOn {
    /// Every assistant turn (each including its end-of-turn marker).
    #[default]
    AllAssistant,
    /// Only the last assistant turn.
    LastAssistant,
    /// Only the first assistant turn, and the conversation ends there: what
    /// follows it would carry no loss, so it is neither rendered nor
    /// tokenized (tool-use traces: the call, without the tool's result and
    /// the final answer).
    FirstAssistant,
}

/// One formatted example, a line of `conversations/<split>.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// `<split>-<row index>`.
    pub id: String,
    /// The rendered text, exactly as the template produced it.
    pub text: String,
    /// Byte spans of `text` that are trained on.
    pub spans: Vec<TurnSpan>,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Value>,
    /// The row's other scalar columns (e.g. `query_type`), kept for reports.
    #[serde(default)]
    pub meta: Row,
}

impl StageKind for Params {
    fn inputs(&self) -> Vec<Input<'_>> {
        vec![Input { role: "dataset", stage: &self.dataset, kinds: &[fetch_dataset::Params::KIND] }]
    }

    fn check(&self) -> Result<(), Rule> {
        for (i, r) in self.rewrite.iter().enumerate() {
            if let Err(e) = regex::Regex::new(&r.pattern) {
                return Err(("rewrite", format!("rewrite {} (pattern {:?}): {e}", i + 1, r.pattern), String::new()));
            }
            if !ROLES.contains(&r.role.as_str()) {
                return Err((
                    "rewrite",
                    format!("rewrite {} has role `{}`", i + 1, r.role),
                    "roles are system, user, assistant and tool".into(),
                ));
            }
        }
        Ok(())
    }
}

impl Stage for Params {
    fn version(&self) -> u32 {
        1
    }

    fn params(&self, _env: &Env) -> Value {
        serde_json::to_value(self).expect("params serialize")
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        let t = template(env)?;
        let mut h = blake3::Hasher::new();
        for part in [&t.source, &t.bos_token, &t.eos_token] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let mut inputs = BTreeMap::from([("chat template".to_string(), h.finalize().to_hex().to_string())]);
        if let Some(f) = &self.tools_file {
            let path = env.settings.base_dir.join(f);
            let bytes = std::fs::read(&path)
                .with_context(|| format!("tools_file = \"{f}\": cannot read {}", path.display()))?;
            inputs.insert("tools file".into(), blake3::hash(&bytes).to_hex().to_string());
        }
        Ok(inputs)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let template = template(ctx.env)?;
        if self.tool_format == ToolFormat::Native && !renders_tools(&template) {
            bail!(
                "[stages.{}] tool_format = \"native\", but the chat template does not render `tools` (Gemma 3's own \
                 has no tool format); set [model] chat_template = \"gemma-tools\" for Gemma, \"chatml-tools\" for a ChatML \
                 model (SmolLM2), or a template with a \
                 tool block",
                ctx.name
            );
        }
        let splits = select_splits(splits_in(&ctx.input("dataset").join("rows"), "jsonl")?, &self.splits, ctx.name)?;
        let dir = ctx.out.join("conversations");
        std::fs::create_dir_all(&dir)?;
        let mut metrics = serde_json::Map::new();
        let known = match self.tool_format {
            ToolFormat::Native => self.known_tools(&splits)?,
            ToolFormat::Keep => BTreeMap::new(),
        };
        let fixed_tools = match &self.tools_file {
            Some(f) => {
                let path = ctx.env.settings.base_dir.join(f);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("tools_file = \"{f}\": cannot read {}", path.display()))?;
                Some(pipeline_infer::tooluse::read_tools(&text).map_err(|e| {
                    anyhow::anyhow!("[stages.{}] tools_file = \"{f}\" ({}): {e}", ctx.name, path.display())
                })?)
            }
            None => None,
        };
        for (split, path) in splits {
            let rows: Vec<Row> = data::read_jsonl_as(&path)?;
            let shape = self.shape_for(rows.first(), &split)?;
            let rewrites = self.rewrites(&split)?;
            let pb = crate::report::bar(rows.len() as u64, &format!("format {split}"));
            let mut out = Vec::with_capacity(rows.len());
            let (mut turns, mut rewritten) = (0, 0);
            let mut converted = Converted::default();
            let mut dropped = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                let formatted =
                    match self.format_row(&template, &rewrites, &known, fixed_tools.as_ref(), row, shape, &split, i) {
                        Ok(f) => f,
                        Err(Unusable(why)) if self.unconvertible == Unconvertible::Drop => {
                            tracing::debug!("split `{split}`, row {i} dropped: {why}");
                            dropped.push(i);
                            pb.inc(1);
                            continue;
                        }
                        Err(Unusable(why)) => bail!(
                            "split `{split}`, row {i}: {why} (set `unconvertible = \"drop\"` in [stages.{}] to leave \
                         such rows out)",
                            ctx.name
                        ),
                    };
                let (conv, changed, c) = formatted.map_err(|e| e.context(format!("split `{split}`, row {i}")))?;
                turns += conv.spans.len();
                rewritten += changed;
                converted.add(&c);
                out.push(conv);
                pb.inc(1);
            }
            pb.finish();
            data::write_jsonl(&dir.join(format!("{split}.jsonl")), &out)?;
            let mut m = serde_json::json!({"conversations": out.len(), "trained_turns": turns});
            if !rewrites.0.is_empty() {
                m["rewritten_messages"] = rewritten.into();
            }
            if self.tool_format == ToolFormat::Native {
                m["converted"] = serde_json::to_value(converted)?;
                m["dropped_rows"] = dropped.len().into();
            }
            metrics.insert(split, m);
        }
        std::fs::write(ctx.out.join("chat_template.jinja"), &template.source)?;
        std::fs::write(
            ctx.out.join("template.json"),
            serde_json::to_vec_pretty(&serde_json::json!({
                "bos_token": template.bos_token,
                "eos_token": template.eos_token,
                "end_of_turn": template.end_of_turn,
            }))?,
        )?;
        Ok(serde_json::json!({"splits": metrics, "end_of_turn": template.end_of_turn}))
    }
}

/// Whether a template writes a request's tools into the prompt: a probe
/// tool's name appears in its rendering.
fn renders_tools(template: &ChatTemplate) -> bool {
    let probe = serde_json::json!([{"type": "function", "function": {"name": "pipeline_probe_tool",
        "description": "", "parameters": {"type": "object", "properties": {}}}}]);
    template
        .render(&[Message::new("user", "hi")], Some(&probe), true)
        .is_ok_and(|text| text.contains("pipeline_probe_tool"))
}

/// A row the recipe may drop: its tool calls could not be converted.
struct Unusable(String);

fn template(env: &Env) -> Result<ChatTemplate> {
    let model = env.model()?;
    Ok(ChatTemplate::for_model(model, env.settings.model.chat_template.as_deref(), &env.settings.base_dir)?)
}

impl Params {
    /// The rewrite rules that apply to `split`, compiled.
    fn rewrites(&self, split: &str) -> Result<Rewrites<'_>> {
        let rules = self.rewrite.iter().enumerate().filter(|(_, r)| r.applies(split));
        Ok(Rewrites(
            rules
                .map(|(i, r)| {
                    regex::Regex::new(&r.pattern).map(|re| (re, r)).with_context(|| format!("rewrite {}", i + 1))
                })
                .collect::<Result<_>>()?,
        ))
    }

    fn messages_column<'a>(&'a self, row: &Row) -> &'a str {
        match &self.messages_column {
            Some(c) => c,
            None if !row.contains_key("messages") && row.contains_key("conversations") => "conversations",
            None => "messages",
        }
    }

    fn shape_for(&self, first: Option<&Row>, split: &str) -> Result<InputShape> {
        if self.input != InputShape::Auto {
            return Ok(self.input);
        }
        let Some(row) = first else { bail!("split `{split}` is empty") };
        if self.messages_column.is_some() || row.contains_key("messages") || row.contains_key("conversations") {
            Ok(InputShape::Messages)
        } else if row.contains_key("instruction") && row.contains_key("output") {
            Ok(InputShape::Instruction)
        } else if row.contains_key("question") && row.contains_key("answer") {
            Ok(InputShape::Qa)
        } else {
            bail!(
                "split `{split}`: cannot tell the row shape from its columns ({}); set `input` \
                 (messages, instruction, qa) and the column names (messages_column, prompt_column, response_column)",
                row.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
            )
        }
    }

    /// One row as a conversation, how many of its messages were rewritten
    /// and what was converted to native tool calls. The outer error is a
    /// row whose calls cannot be converted (which the recipe may drop).
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn format_row(
        &self,
        template: &ChatTemplate,
        rewrites: &Rewrites,
        known: &BTreeMap<String, Value>,
        fixed_tools: Option<&Value>,
        row: &Row,
        shape: InputShape,
        split: &str,
        i: usize,
    ) -> Result<Result<(Conversation, usize, Converted)>, Unusable> {
        let (mut messages, used, tools, rewritten) = match self.row_messages(rewrites, row, shape) {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let mut tools = tools.or_else(|| fixed_tools.cloned());
        let mut converted = Converted::default();
        if self.tool_format == ToolFormat::Native {
            let seed = u64::from_le_bytes(
                blake3::hash(format!("{split}-{i}").as_bytes()).as_bytes()[..8].try_into().expect("8 bytes"),
            );
            let native = pipeline_infer::tooluse::to_native(messages, tools.as_ref(), known, seed).map_err(Unusable)?;
            converted = native.converted;
            messages = native.messages;
            tools = native.tools;
        }
        Ok(self.finish_row(template, messages, tools, used, row, split, i).map(|c| (c, rewritten, converted)))
    }

    /// Every tool the dataset's rows list (all splits; the first definition
    /// of a name wins): what a row that calls a tool it does not list gets.
    fn known_tools(&self, splits: &[(String, std::path::PathBuf)]) -> Result<BTreeMap<String, Value>> {
        let mut known = BTreeMap::new();
        for (split, path) in splits {
            let rows: Vec<Row> = data::read_jsonl_as(path)?;
            let shape = self.shape_for(rows.first(), split)?;
            let rewrites = self.rewrites(split)?;
            for row in &rows {
                let Ok((messages, _, tools, _)) = self.row_messages(&rewrites, row, shape) else { continue };
                let Ok(native) = pipeline_infer::tooluse::to_native(messages, tools.as_ref(), &BTreeMap::new(), 0)
                else {
                    continue;
                };
                for t in native.tools.iter().flat_map(|t| t.as_array().cloned().unwrap_or_default()) {
                    if let Some(name) = t["function"]["name"].as_str() {
                        known.entry(name.to_string()).or_insert(t.clone());
                    }
                }
            }
        }
        Ok(known)
    }

    /// A row's messages (roles fixed, rewrites applied), the columns they
    /// came from, its tools, and how many messages were rewritten.
    fn row_messages(
        &self,
        rewrites: &Rewrites,
        row: &Row,
        shape: InputShape,
    ) -> Result<(Vec<Message>, Vec<String>, Option<Value>, usize)> {
        let (mut messages, used): (Vec<Message>, Vec<String>) = match shape {
            InputShape::Messages | InputShape::Auto => {
                let col = self.messages_column(row);
                let v = row.get(col).with_context(|| format!("no column `{col}` (set messages_column)"))?;
                (parse_messages(v).with_context(|| format!("column `{col}`"))?, vec![col.to_string()])
            }
            InputShape::Instruction => {
                let p = self.prompt_column.as_deref().unwrap_or("instruction");
                let x = self.input_column.as_deref().unwrap_or("input");
                let r = self.response_column.as_deref().unwrap_or("output");
                let mut prompt = text_column(row, p)?;
                let extra = row.get(x).and_then(Value::as_str).unwrap_or_default().trim().to_string();
                if !extra.is_empty() {
                    prompt = format!("{prompt}\n### Input:\n{extra}");
                }
                let msgs = vec![Message::new("user", &prompt), Message::new("assistant", &text_column(row, r)?)];
                (msgs, vec![p.into(), x.into(), r.into()])
            }
            InputShape::Qa => {
                let p = self.prompt_column.as_deref().unwrap_or("question");
                let r = self.response_column.as_deref().unwrap_or("answer");
                let msgs =
                    vec![Message::new("user", &text_column(row, p)?), Message::new("assistant", &text_column(row, r)?)];
                (msgs, vec![p.into(), r.into()])
            }
        };
        if self.first_user_is_system && messages.first().is_some_and(|m| m.role == "user") {
            messages[0].role = "system".into();
        }
        let rewritten = rewrites.apply(&mut messages);
        // Native conversion reads a `tools` column (LLaMA-Factory's ShareGPT
        // rows) without being told.
        let native_default = (self.tool_format == ToolFormat::Native && row.contains_key("tools")).then_some("tools");
        let tools = match self.tools_column.as_deref().or(native_default) {
            Some(c) => match row.get(c) {
                Some(Value::String(s)) if !s.trim().is_empty() => {
                    Some(serde_json::from_str(s).with_context(|| format!("column `{c}` is not valid JSON"))?)
                }
                Some(Value::Null) | None => None,
                Some(Value::String(_)) => None,
                Some(v) => Some(v.clone()),
            },
            None => None,
        };
        Ok((messages, used, tools, rewritten))
    }

    /// Renders a conversation and finds its trained spans.
    #[allow(clippy::too_many_arguments)]
    fn finish_row(
        &self,
        template: &ChatTemplate,
        mut messages: Vec<Message>,
        tools: Option<Value>,
        used: Vec<String>,
        row: &Row,
        split: &str,
        i: usize,
    ) -> Result<Conversation> {
        if let Some(sys) = &self.system_prompt {
            if messages.first().is_none_or(|m| m.role != "system") {
                messages.insert(0, Message::new("system", sys));
            }
        }
        let Some(first_answer) = messages.iter().position(|m| m.role == "assistant") else {
            bail!("the conversation has no assistant turn to train on");
        };
        if self.train_on == TrainOn::FirstAssistant {
            messages.truncate(first_answer + 1);
        }
        let (text, mut spans) = template.render_with_spans(&messages, tools.as_ref())?;
        if self.train_on == TrainOn::LastAssistant {
            spans = spans.split_off(spans.len() - 1);
        }
        let meta: Row = row
            .iter()
            .filter(|(k, v)| {
                !used.contains(k) && self.tools_column.as_ref() != Some(*k) && !v.is_array() && !v.is_object()
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Conversation { id: format!("{split}-{i}"), text, spans, messages, tools, meta })
    }
}

fn text_column(row: &Row, col: &str) -> Result<String> {
    match row.get(col) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => {
            bail!("no column `{col}` (columns: {})", row.keys().map(String::as_str).collect::<Vec<_>>().join(", "))
        }
        Some(other) => Ok(other.to_string()),
    }
}

/// Reads a list of messages: `{role, content}` (OpenAI, with `tool_calls`),
/// or ShareGPT `{from, value}` (with `function_call` and `observation`
/// turns). Content may be a string or a list of parts.
pub fn parse_messages(v: &Value) -> Result<Vec<Message>> {
    let v = match v {
        Value::String(s) => serde_json::from_str(s).context("a string that is not a JSON list of messages")?,
        other => other.clone(),
    };
    let Value::Array(items) = v else { bail!("expected a list of messages") };
    items
        .iter()
        .enumerate()
        .map(|(j, m)| {
            let obj = m.as_object().with_context(|| format!("message {j} is not an object"))?;
            let role = obj
                .get("role")
                .or_else(|| obj.get("from"))
                .and_then(Value::as_str)
                .with_context(|| format!("message {j} has no `role`"))?;
            // ShareGPT's `function_call` turn: the assistant calling tools,
            // its value the calls' JSON.
            if role == "function_call" {
                let text = match obj.get("value").or_else(|| obj.get("content")) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let parsed = pipeline_infer::toolcall::parse(&text);
                if !parsed.all_valid() || parsed.calls.is_empty() {
                    bail!("message {j}: a function_call turn whose value is not a call: {text}");
                }
                let calls: Vec<Value> = parsed
                    .calls
                    .iter()
                    .map(|c| serde_json::json!({"type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect();
                let mut m = Message::new("assistant", "");
                m.tool_calls = Some(Value::Array(calls));
                return Ok(m);
            }
            let role = match role {
                "human" => "user",
                "gpt" | "model" | "bot" => "assistant",
                "function" | "observation" | "ipython" => "tool",
                r => r,
            };
            if !ROLES.contains(&role) {
                bail!("message {j} has role `{role}`; expected system, user, assistant or tool");
            }
            let content = match obj.get("content").or_else(|| obj.get("value")) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("")
                }
                Some(Value::Null) | None => String::new(),
                Some(other) => bail!("message {j}: content is {other}, expected text"),
            };
            Ok(Message {
                role: role.to_string(),
                content,
                tool_calls: obj.get("tool_calls").filter(|t| !t.is_null()).cloned(),
                name: obj.get("name").and_then(Value::as_str).map(str::to_string),
                tool_call_id: obj.get("tool_call_id").and_then(Value::as_str).map(str::to_string),
            })
        })
        .collect()
}

/// The chat template a `format-chat` stage rendered with, read back from
/// its artifact (`chat_template.jinja`, `template.json`): what evaluation,
/// merge and the Modelfile use, so the served model is the trained one.
pub fn trained_template(conversations_dir: &std::path::Path) -> Result<ChatTemplate> {
    let source = std::fs::read_to_string(conversations_dir.join("chat_template.jinja"))
        .with_context(|| format!("{}: no chat_template.jinja", conversations_dir.display()))?;
    let t: Value = serde_json::from_slice(&std::fs::read(conversations_dir.join("template.json"))?)?;
    let s = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    Ok(ChatTemplate::new(&source, &s("bos_token"), &s("eos_token"))?)
}
