//! Tool-use conversations in one shape, OpenAI's: `tools` as functions with
//! JSON Schema parameters, assistant `tool_calls`, and `tool` messages with
//! results. This is the shape servers take (`/v1/chat/completions` with
//! `tools`, Ollama's `/api/chat`) and the one chat templates render, so a
//! model trained on it is called the way it was trained.
//!
//! [`to_native`] reads the shapes datasets come in:
//!
//! - OpenAI messages with `tool_calls` (arguments as objects or JSON strings)
//!   and `tool` results;
//! - ShareGPT `function_call` / `observation` turns (LLaMA-Factory's), whose
//!   message parser already made them assistant calls and `tool` turns;
//! - text with a `<tools>[…]</tools>` catalogue (`{"tool_name", "description",
//!   "input_args": {"city": "string - Name of the city."}}`, or OpenAI
//!   entries), `<tool_call>` blocks holding `{"tool_name", "args"}`,
//!   `{"name", "arguments"}` or `name({…})`, `<tool_result>` user turns and
//!   `<final_answer>` blocks (shawhin/tool-use-finetuning's form).
//!
//! What a catalogue message says besides its tools is the dataset's own
//! instructions for its own text format (`<instructions>…</instructions>`):
//! native calls replace that format, so those instructions are dropped and
//! counted. Contents are trimmed, as Go templates (Ollama) cannot trim, and
//! consecutive user turns are merged (with a blank line), as Ollama merges
//! them.

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::catalogue::{DescribedArgument, JsonType};
use crate::chat::Message;
use crate::toolcall;

/// What a conversion did, summed over rows for a stage's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Converted {
    /// `<tools>` blocks read into `tools`.
    pub catalogues: usize,
    /// Calls read from text into `tool_calls`.
    pub calls: usize,
    /// `<tool_result>` turns made `tool` messages.
    pub results: usize,
    /// `<final_answer>` blocks unwrapped.
    pub final_answers: usize,
    /// Instruction blocks dropped with their catalogue.
    pub instructions: usize,
    /// Tools a call used that the row did not list, added from `known`.
    pub tools_added: usize,
    /// Calls read after dropping a trailing comma (`{"a": 1,}`).
    pub repaired: usize,
}

impl Converted {
    pub fn add(&mut self, o: &Converted) {
        self.catalogues += o.catalogues;
        self.calls += o.calls;
        self.results += o.results;
        self.final_answers += o.final_answers;
        self.instructions += o.instructions;
        self.tools_added += o.tools_added;
        self.repaired += o.repaired;
    }
}

/// A conversation in the native shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Native {
    pub messages: Vec<Message>,
    /// OpenAI tools (`None` when the conversation has none).
    pub tools: Option<Value>,
    pub converted: Converted,
}

/// Converts `messages` (and a `tools` list, if the row had one) into the
/// native shape. An error names the message and what could not be read.
///
/// A row whose call uses a tool it does not list (datasets that sample a
/// row's catalogue) gets that tool's definition from `known` (the dataset's
/// tools by name), at a place that depends on `seed`, not always last: a
/// served model is only ever offered tools, and must not learn to call
/// others, nor that the last listed is the one to call.
pub fn to_native(
    messages: Vec<Message>,
    tools: Option<&Value>,
    known: &std::collections::BTreeMap<String, Value>,
    seed: u64,
) -> Result<Native, String> {
    let mut out = Native { messages: Vec::with_capacity(messages.len()), tools: None, converted: Converted::default() };
    let mut catalogue: Vec<Value> = Vec::new();
    if let Some(t) = tools {
        let items = t.as_array().ok_or("the `tools` column is not a list")?;
        for (k, item) in items.iter().enumerate() {
            add_tool(&mut catalogue, openai_tool(item).map_err(|e| format!("tool {k}: {e}"))?);
        }
    }
    // Calls not yet answered by a tool message: results take their names.
    let mut pending: Vec<(String, String)> = Vec::new();
    let mut next_id = 0;
    for (j, mut m) in messages.into_iter().enumerate() {
        let role = m.role.clone();
        let at = |e: String| format!("message {j} ({role}): {e}");
        if let Some((list, rest)) = take_block(&m.content, "<tools>", "</tools>") {
            let v: Value = serde_json::from_str(list.trim())
                .map_err(|e| at(format!("the <tools> block is not a JSON list of tools ({e})")))?;
            for (k, item) in
                v.as_array().ok_or_else(|| at("the <tools> block is not a list".into()))?.iter().enumerate()
            {
                add_tool(&mut catalogue, openai_tool(item).map_err(|e| at(format!("tool {k}: {e}")))?);
            }
            out.converted.catalogues += 1;
            let mut rest = rest;
            if let Some((_, without)) = take_block(&rest, "<instructions>", "</instructions>") {
                out.converted.instructions += 1;
                rest = without;
            }
            m.content = rest.trim().to_string();
            if m.content.is_empty() {
                continue;
            }
        }
        match m.role.as_str() {
            "assistant" => {
                if let Some(tc) = m.tool_calls.take() {
                    let parsed = toolcall::from_openai(&tc);
                    if let Some(bad) = parsed.invalid.first() {
                        return Err(at(format!("unreadable tool call {bad}")));
                    }
                    m.tool_calls = Some(calls_json(&parsed.calls, &mut next_id, &mut pending));
                } else if m.content.contains("<tool_call>") {
                    // Tags quoted as code (`<tool_call>`) are still tags.
                    m.content =
                        m.content.replace("`<tool_call>`", "<tool_call>").replace("</tool_call>`", "</tool_call>");
                    let mut parsed = toolcall::parse(&m.content);
                    if !parsed.invalid.is_empty() {
                        // A trailing comma (`{"a": 1,}`) is the one slip read anyway.
                        let repaired = toolcall::parse(&without_trailing_commas(&m.content));
                        if repaired.all_valid() && !repaired.calls.is_empty() {
                            out.converted.repaired += 1;
                            parsed = repaired;
                        }
                    }
                    if let Some(bad) = parsed.invalid.first() {
                        return Err(at(format!(
                            "unreadable tool call `{}`",
                            bad.chars().take(120).collect::<String>()
                        )));
                    }
                    out.converted.calls += parsed.calls.len();
                    m.content = text_around_calls(&m.content);
                    m.tool_calls = Some(calls_json(&parsed.calls, &mut next_id, &mut pending));
                }
                if let Some(answer) = toolcall::final_answer(&m.content) {
                    // Some answers quote the tag as code: `<final_answer>`.
                    m.content = answer.trim_matches('`').trim().to_string();
                    out.converted.final_answers += 1;
                }
            }
            "user" => {
                let t = m.content.trim();
                if let Some(body) = t.strip_prefix("<tool_result>").and_then(|b| b.strip_suffix("</tool_result>")) {
                    m = tool_message(body, &mut pending);
                    out.converted.results += 1;
                }
            }
            "tool" if m.name.is_none() && m.tool_call_id.is_none() => {
                m = tool_message(&m.content, &mut pending);
            }
            _ => {}
        }
        m.content = m.content.trim().to_string();
        // Consecutive user turns are one (what is left of a catalogue message,
        // e.g. "Current date: …", and the question), as Ollama merges them.
        if let Some(prev) = out.messages.last_mut().filter(|p| p.role == "user" && m.role == "user") {
            prev.content = format!("{}\n\n{}", prev.content, m.content);
            continue;
        }
        out.messages.push(m);
    }
    let called: Vec<String> = out
        .messages
        .iter()
        .filter_map(|m| m.tool_calls.as_ref()?.as_array())
        .flatten()
        .filter_map(|c| c["function"]["name"].as_str().map(str::to_string))
        .collect();
    for (k, name) in called.iter().enumerate() {
        let listed = catalogue.iter().any(|t| t["function"]["name"] == name.as_str());
        if let (false, Some(tool)) = (listed, known.get(name)) {
            let at = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(k as u64) >> 32) as usize
                % (catalogue.len() + 1);
            catalogue.insert(at, tool.clone());
            out.converted.tools_added += 1;
        }
    }
    out.tools = (!catalogue.is_empty()).then(|| Value::Array(catalogue));
    Ok(out)
}

/// A generated answer as the assistant message a server returns: its prose
/// as `content` and its calls as OpenAI `tool_calls` (ids `call_0`, …), or
/// `None` when it calls nothing; calls that cannot be read stay in the
/// content, as llama-server and Ollama leave them.
pub fn assistant_message(text: &str) -> Message {
    let parsed = toolcall::parse(text);
    let mut m = Message::new("assistant", text.trim());
    if text.contains("<tool_call>") && parsed.all_valid() && !parsed.calls.is_empty() {
        m.content = text_around_calls(text);
        m.tool_calls = Some(calls_json(&parsed.calls, &mut 0, &mut Vec::new()));
    }
    m
}

/// Reads a tools file (`--tools FILE.json`): a list of tools, or an object
/// with `tools`, each an OpenAI tool or one of the shapes [`openai_tool`]
/// reads; returned as OpenAI tools.
pub fn read_tools(text: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let list = match &v {
        Value::Array(a) => a,
        Value::Object(o) => o.get("tools").and_then(Value::as_array).ok_or("an object without a `tools` list")?,
        _ => return Err("expected a list of tools".into()),
    };
    let tools = list
        .iter()
        .enumerate()
        .map(|(k, t)| openai_tool(t).map_err(|e| format!("tool {k}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(tools))
}

/// `text` with every comma that only whitespace separates from a closing
/// `}` or `]` removed (outside strings).
fn without_trailing_commas(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if in_string {
            in_string = !(c == '"' && !escaped);
            escaped = c == '\\' && !escaped;
        } else if c == '"' {
            in_string = true;
        } else if c == ',' && chars[i + 1..].iter().find(|c| !c.is_whitespace()).is_some_and(|n| matches!(n, '}' | ']'))
        {
            continue;
        }
        out.push(c);
    }
    out
}

/// `text` without its first `open…close` block: (block body, the rest).
fn take_block(text: &str, open: &str, close: &str) -> Option<(String, String)> {
    let i = text.find(open)?;
    let body_start = i + open.len();
    let j = text[body_start..].find(close)? + body_start;
    Some((text[body_start..j].to_string(), format!("{}{}", &text[..i], &text[j + close.len()..])))
}

/// The prose of a turn that calls tools: what precedes the first call and
/// follows the last, trimmed (fences and `<final_answer>` tags around
/// calls dropped).
fn text_around_calls(text: &str) -> String {
    let before = &text[..text.find("<tool_call>").unwrap_or(text.len())];
    let after = text.rfind("</tool_call>").map_or("", |e| &text[e + "</tool_call>".len()..]);
    let clean = |s: &str| {
        let s = s.replace("```xml", "").replace("```", "").replace("<final_answer>", "").replace("</final_answer>", "");
        s.trim().trim_matches('`').trim().to_string()
    };
    [clean(before), clean(after)].into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join("\n")
}

/// Calls as OpenAI `tool_calls`, given ids `call_0`, `call_1`, … that the
/// following `tool` messages answer.
fn calls_json(calls: &[toolcall::ToolCall], next_id: &mut usize, pending: &mut Vec<(String, String)>) -> Value {
    Value::Array(
        calls
            .iter()
            .map(|c| {
                let id = format!("call_{next_id}");
                *next_id += 1;
                pending.push((id.clone(), c.name.clone()));
                json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": sorted(&c.arguments)}})
            })
            .collect(),
    )
}

/// A `tool` message answering the oldest unanswered call.
fn tool_message(content: &str, pending: &mut Vec<(String, String)>) -> Message {
    let mut m = Message::new("tool", content.trim());
    if !pending.is_empty() {
        let (id, name) = pending.remove(0);
        m.tool_call_id = Some(id);
        m.name = Some(name);
    }
    m
}

/// `v` with the keys of every object in sorted order: the order Go (and so
/// Ollama) writes a map in, so that templates that dump arguments as given
/// (Qwen's `tojson`) render what Ollama renders.
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&o[k]))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// Adds `tool` unless one of that name is listed already.
fn add_tool(catalogue: &mut Vec<Value>, tool: Value) {
    let name = tool["function"]["name"].clone();
    if !catalogue.iter().any(|t| t["function"]["name"] == name) {
        catalogue.push(tool);
    }
}

/// One catalogue entry as an OpenAI tool: `{"type": "function", "function":
/// {"name", "description", "parameters": {"type": "object", "properties",
/// "required"}}}`. Reads OpenAI entries, bare `{name, description,
/// parameters}` functions, and `{tool_name, description, input_args}` whose
/// arguments are `"type - description"` strings (one that says "optional"
/// is not required). Properties are listed in sorted order.
pub fn openai_tool(entry: &Value) -> Result<Value, String> {
    let f = match entry.get("function") {
        Some(f @ Value::Object(_)) => f,
        _ => entry,
    };
    let o = f.as_object().ok_or("not an object")?;
    let name = ["name", "tool_name"]
        .iter()
        .find_map(|k| o.get(*k).and_then(Value::as_str))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or("no `name` (or `tool_name`)")?;
    let description = o.get("description").and_then(Value::as_str).unwrap_or_default().trim();
    let parameters = match ["parameters", "input_args", "arguments", "args"].iter().find_map(|k| o.get(*k)) {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(Value::Object(p)) if p.contains_key("properties") || p.get("type").is_some_and(|t| t == "object") => {
            Value::Object(p.clone())
        }
        Some(Value::Object(args)) => schema_of_args(args)?,
        Some(other) => return Err(format!("parameters are {other}, expected an object")),
    };
    // Properties in sorted order, as Ollama lists them (see `sorted`).
    let mut parameters = parameters;
    if let Some(props) = parameters.get_mut("properties").filter(|p| p.is_object()) {
        let mut keys: Vec<String> = props.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        let o = props.as_object().unwrap();
        *props = Value::Object(keys.into_iter().map(|k| (k.clone(), o[&k].clone())).collect());
    }
    Ok(json!({"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}))
}

/// `{"city": "string - Name of the city."}` as a JSON Schema object.
fn schema_of_args(args: &Map<String, Value>) -> Result<Value, String> {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for (name, spec) in args {
        let (schema, is_required) = match spec {
            Value::String(s) => {
                let d = DescribedArgument::parse(s);
                let ty = JsonType::parse(d.type_word).ok_or_else(|| {
                    format!("argument `{name}` has type `{}`, which JSON Schema does not name", d.type_word)
                })?;
                (json!({"type": ty.name(), "description": d.description}), d.required)
            }
            Value::Object(schema) => {
                let req = schema.get("required").and_then(Value::as_bool).unwrap_or(true);
                let mut s = schema.clone();
                s.remove("required");
                (Value::Object(s), req)
            }
            other => return Err(format!("argument `{name}` is described by {other}")),
        };
        properties.insert(name.clone(), schema);
        if is_required {
            required.push(Value::String(name.clone()));
        }
    }
    Ok(json!({"type": "object", "properties": properties, "required": required}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tool_use_datasets_text_form() {
        let messages = vec![
            Message::new(
                "system",
                "<instructions>\nUse <tool_call>…</instructions>\n\n<tools>\n[{\"tool_name\": \"get_weather\", \
                 \"description\": \"Weather now.\", \"input_args\": {\"city\": \"string - City.\", \"unit\": \
                 \"string - c or f (optional).\"}}]\n</tools>",
            ),
            Message::new("user", "Weather in Paris?"),
            Message::new(
                "assistant",
                "I will look.\n<tool_call>\n{\"tool_name\": \"get_weather\", \"args\": {\"city\": \"Paris\"}}\n</tool_call>",
            ),
            Message::new("user", "<tool_result>\n18 C\n</tool_result>"),
            Message::new("assistant", "```xml\n<final_answer>\nIt is 18 C.\n</final_answer>\n```"),
        ];
        let n = to_native(messages, None, &Default::default(), 0).unwrap();
        assert_eq!(
            n.converted,
            Converted { catalogues: 1, calls: 1, results: 1, final_answers: 1, instructions: 1, ..Default::default() }
        );
        assert_eq!(
            n.tools.unwrap(),
            json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City."},
                "unit": {"type": "string", "description": "c or f (optional)."}}, "required": ["city"]}}}])
        );
        let roles: Vec<&str> = n.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
        assert_eq!(n.messages[1].content, "I will look.");
        assert_eq!(
            n.messages[1].tool_calls.as_ref().unwrap(),
            &json!([{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
        );
        assert_eq!((n.messages[2].content.as_str(), n.messages[2].name.as_deref()), ("18 C", Some("get_weather")));
        assert_eq!(n.messages[2].tool_call_id.as_deref(), Some("call_0"));
        assert_eq!(n.messages[3].content, "It is 18 C.");
    }

    #[test]
    fn a_generated_answer_becomes_content_and_tool_calls() {
        let m = assistant_message(
            "Let me check.\n<tool_call>\n{\"name\":\"w\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>",
        );
        assert_eq!(m.content, "Let me check.");
        assert_eq!(
            m.tool_calls.unwrap(),
            json!([{"id": "call_0", "type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}}}])
        );
        let m = assistant_message("It is sunny.");
        assert_eq!((m.content.as_str(), m.tool_calls), ("It is sunny.", None));
        let m = assistant_message("<tool_call>\n{\"name\": ");
        assert!(m.tool_calls.is_none() && m.content.starts_with("<tool_call>"));
        assert_eq!(
            read_tools("[{\"tool_name\": \"w\", \"input_args\": {\"city\": \"string - City.\"}}]").unwrap()[0]["function"]
                ["parameters"]["required"],
            json!(["city"])
        );
        assert_eq!(read_tools("{\"tools\": 3}").unwrap_err(), "an object without a `tools` list");
    }

    #[test]
    fn a_called_tool_the_row_does_not_list_is_added_from_the_dataset() {
        let tool = |n: &str| openai_tool(&json!({"name": n, "parameters": {}})).unwrap();
        let known = [("b".to_string(), tool("b"))].into_iter().collect();
        let listed = json!([tool("a"), tool("c")]);
        let m = vec![Message::new("user", "q"), Message::new("assistant", "<tool_call>{\"name\": \"b\"}</tool_call>")];
        let places: std::collections::BTreeSet<usize> = (0..16)
            .map(|seed| {
                let n = to_native(m.clone(), Some(&listed), &known, seed).unwrap();
                assert_eq!(n.converted.tools_added, 1);
                let t = n.tools.unwrap();
                assert_eq!(t.as_array().unwrap().len(), 3);
                t.as_array().unwrap().iter().position(|t| t["function"]["name"] == "b").unwrap()
            })
            .collect();
        assert!(places.len() > 1, "the added tool always lands at {places:?}");
    }

    #[test]
    fn reads_function_style_and_openai_calls_and_names_bad_ones() {
        let m = vec![
            Message::new("user", "北京天气？"),
            Message::new("assistant", "我来查询。\n<tool_call>\nget_weather({\"location\": \"北京\"})\n</tool_call>"),
        ];
        let n = to_native(m, None, &Default::default(), 0).unwrap();
        assert_eq!(n.messages[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"], json!({"location": "北京"}));
        let mut a = Message::new("assistant", "");
        a.tool_calls = Some(json!([{"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]));
        let n = to_native(vec![Message::new("user", "q"), a], None, &Default::default(), 0).unwrap();
        assert_eq!(n.messages[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"], json!({"x": 1}));
        let comma = vec![
            Message::new("user", "q"),
            Message::new("assistant", "<tool_call>{\"name\": \"f\", \"args\": {\"q\": \"a,}\",\n}}</tool_call>"),
        ];
        let n = to_native(comma, None, &Default::default(), 0).unwrap();
        assert_eq!(n.converted.repaired, 1);
        assert_eq!(n.messages[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"], json!({"q": "a,}"}));
        let bad = vec![Message::new("user", "q"), Message::new("assistant", "<tool_call>{\"tool_name\": </tool_call>")];
        let e = to_native(bad, None, &Default::default(), 0).unwrap_err();
        assert!(e.starts_with("message 1 (assistant): unreadable tool call"), "{e}");
        let e = to_native(
            vec![Message::new("user", "<tools>[{\"description\": \"x\"}]</tools>")],
            None,
            &Default::default(),
            0,
        )
        .unwrap_err();
        assert_eq!(e, "message 0 (user): tool 0: no `name` (or `tool_name`)");
    }
}
