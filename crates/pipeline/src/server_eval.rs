//! Scoring a served model: the rows of an `evaluate` stage sent to an
//! OpenAI-compatible server (llama-server, Ollama, vLLM) the way an agent
//! sends them (the conversation before the gold turn as `messages`, the
//! row's tools as `tools`), and the answer's `tool_calls` scored as the
//! stage scores generated text. Only structured `tool_calls` count as calls:
//! a call the server left in `content` is one an agent never receives (such
//! answers are counted apart).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::executor::{Executor, Finished};
use crate::recipe::{Recipe, StageSpec};
use crate::stages::format_chat::Conversation;
use pipeline_infer::eval::{Gold, Metric, Tally, score_tool_call};

/// What to ask the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The server's base URL (`http://127.0.0.1:8080`); requests go to
    /// `/v1/chat/completions` under it.
    pub url: String,
    /// The `model` field of each request (Ollama needs its model's name).
    pub model: Option<String>,
    /// Evaluate only the first N rows (default: the stage's `limit`).
    pub limit: Option<usize>,
}

/// The scores of a served model on a stage's rows.
#[derive(Debug)]
pub struct ServerScores {
    pub split: String,
    pub overall: BTreeMap<String, Metric>,
    /// By the stage's group column (`query_type`), when rows have one.
    pub groups: BTreeMap<String, BTreeMap<String, Metric>>,
    /// Per row: the request's answer and its verdict.
    pub predictions: Vec<Value>,
    /// Answers with `<tool_call>` in their `content`: calls the server did
    /// not parse.
    pub calls_left_in_content: usize,
    pub seconds: f64,
}

/// Sends the rows of `recipe`'s evaluate stage `stage` to the server and
/// scores the answers.
pub fn evaluate_server(exec: &Executor, recipe: &Recipe, stage: &str, opts: &ServerOptions) -> Result<ServerScores> {
    let Some(StageSpec::Evaluate(p)) = recipe.stages.get(stage) else {
        bail!("`{stage}` is not an evaluate stage of {}", recipe.path.display());
    };
    let dir = match exec.finished(recipe, &p.conversations)? {
        Finished::Entry(dir) => dir,
        Finished::NotYet(why) => bail!(
            "stage `{}` has no finished result ({why}); run `pipeline run {} --until {}` first",
            p.conversations,
            recipe.path.display(),
            p.conversations
        ),
    };
    let found = crate::stages::splits_in(&dir.join("conversations"), "jsonl")?;
    let catalogue = crate::stages::evaluate::catalogue_of(&found)?;
    let split = p.split_of(&found, stage)?;
    let path = &crate::stages::select_splits(found, std::slice::from_ref(&split), stage)?[0].1;
    let mut rows: Vec<Conversation> = pipeline_data::read_jsonl_as(path)?;
    if let Some(n) = opts.limit.or(p.limit) {
        rows.truncate(n);
    }
    let toolbox = p.toolbox_for(&catalogue);
    let group_by = p.group_by.clone().unwrap_or_else(|| "query_type".into());
    let needs_call_column = p.needs_call_column.clone().unwrap_or_else(|| "tool_needed".into());
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(600)).build();
    let endpoint = format!("{}/v1/chat/completions", opts.url.trim_end_matches('/'));
    let started = Instant::now();
    let (mut overall, mut groups) = (Tally::default(), BTreeMap::<String, Tally>::new());
    let (mut predictions, mut left_in_content) = (Vec::new(), 0);
    let progress = crate::report::bar(rows.len() as u64, &format!("{stage} via {}", opts.url));
    for conv in &rows {
        let first = conv
            .messages
            .iter()
            .position(|m| m.role == "assistant")
            .with_context(|| format!("row `{}` has no assistant turn to compare with", conv.id))?;
        let gold_msg = &conv.messages[first];
        let needs_call = conv.meta.get(&needs_call_column).and_then(Value::as_bool);
        let gold = Gold::new(&gold_msg.content, gold_msg.tool_calls.as_ref(), needs_call);
        let mut request = json!({
            "messages": conv.messages[..first].iter().map(openai_message).collect::<Vec<_>>(),
            "temperature": 0.0,
            "max_tokens": p.generation.max_new_tokens,
        });
        if let Some(tools) = &conv.tools {
            request["tools"] = tools.clone();
        }
        if let Some(m) = &opts.model {
            request["model"] = m.clone().into();
        }
        let answer: Value = match agent
            .post(&endpoint)
            .set("Content-Type", "application/json")
            .send_string(&request.to_string())
        {
            Ok(r) => serde_json::from_str(&r.into_string()?).with_context(|| format!("{endpoint}: not JSON"))?,
            Err(ureq::Error::Status(code, r)) => {
                bail!("{endpoint} answered {code} for row `{}`: {}", conv.id, r.into_string().unwrap_or_default())
            }
            Err(e) => bail!(
                "cannot reach the server: {e} (is it running? e.g. `llama-server -m MODEL.gguf --jinja --port PORT`, \
                 then --url http://127.0.0.1:PORT)"
            ),
        };
        let message = &answer["choices"][0]["message"];
        let content = message["content"].as_str().unwrap_or_default();
        let pred = match message.get("tool_calls").filter(|t| t.as_array().is_some_and(|a| !a.is_empty())) {
            Some(tc) => pipeline_infer::toolcall::from_openai(tc),
            None => Default::default(),
        };
        left_in_content += usize::from(content.contains("<tool_call>"));
        let verdict = score_tool_call(&pred, content, &gold, &catalogue, toolbox.as_ref());
        overall.tool(&verdict);
        if let Some(g) = conv.meta.get(&group_by) {
            groups.entry(g.as_str().map_or(g.to_string(), str::to_string)).or_default().tool(&verdict);
        }
        predictions.push(json!({"id": conv.id, "message": message, "verdict": verdict}));
        progress.inc(1);
    }
    progress.finish();
    Ok(ServerScores {
        split,
        overall: overall.metrics(),
        groups: groups.into_iter().map(|(g, t)| (g, t.metrics())).collect(),
        predictions,
        calls_left_in_content: left_in_content,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A message as the OpenAI API takes it: calls with their arguments as a
/// JSON string, results with the id of the call they answer.
pub fn openai_message(m: &pipeline_infer::chat::Message) -> Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if let Some(calls) = m.tool_calls.as_ref().and_then(Value::as_array) {
        let calls: Vec<Value> = calls
            .iter()
            .map(|c| {
                let mut c = c.clone();
                if let Some(a) = c["function"].get("arguments").filter(|a| !a.is_string()) {
                    c["function"]["arguments"] = a.to_string().into();
                }
                c
            })
            .collect();
        v["tool_calls"] = calls.into();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = id.clone().into();
    }
    v
}
