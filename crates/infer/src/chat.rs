//! Chat templates: rendering conversations exactly as `transformers`'
//! `apply_chat_template` does, and finding the byte spans of the turns a
//! model is trained on.
//!
//! The template is the model's own (`chat_template` in
//! `tokenizer_config.json`, or `chat_template.jinja`), rendered by minijinja
//! set up the way transformers sets up Jinja2: `trim_blocks` and
//! `lstrip_blocks`, Python string methods (`startswith`, `strip`, `split`…),
//! `raise_exception`, `strftime_now`, and a `tojson` that writes
//! `json.dumps(…, ensure_ascii=False)` (no HTML escaping). Built-in templates
//! (`gemma`, `gemma-tools`, `chatml`, `chatml-tools`, `alpaca`) exist for models without one or
//! by choice.

use pipeline_fs::IoContext;

use crate::error::Result;
use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use pipeline_model::ModelFiles;

/// One message of a conversation, in the shape HF templates expect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    /// OpenAI-style tool calls (`[{"type": "function", "function": {...}}]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into(), tool_calls: None, name: None, tool_call_id: None }
    }
}

/// Built-in templates. `gemma` and `chatml` follow the official ones;
/// `gemma-tools` is Gemma's turns with tools, tool calls and results;
/// `chatml-tools` ChatML with Qwen's Hermes tool block (for ChatML models
/// whose own template has no tools, SmolLM2's).
pub const BUILTIN: &[(&str, &str)] = &[
    ("gemma", include_str!("templates/gemma.jinja")),
    ("gemma-tools", include_str!("templates/gemma-tools.jinja")),
    ("chatml", include_str!("templates/chatml.jinja")),
    ("chatml-tools", include_str!("templates/chatml-tools.jinja")),
    ("alpaca", include_str!("templates/alpaca.jinja")),
];

/// A special token named in `tokenizer_config.json` (`bos_token`, …), written
/// as a string or as an `AddedToken` object with a `content`.
pub fn special_token(tokenizer_config: &serde_json::Value, key: &str) -> Option<String> {
    match tokenizer_config.get(key) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// A chat template ready to render, with the special tokens it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template text (hashed into cache keys, written into served models).
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// The marker that ends an assistant turn (`<end_of_turn>`, `<|im_end|>`),
    /// found by rendering a probe conversation.
    pub end_of_turn: String,
}

impl ChatTemplate {
    /// The template a recipe's `[model] chat_template` selects.
    pub fn for_model(model: &ModelFiles, choice: Option<&str>, recipe_dir: &std::path::Path) -> Result<ChatTemplate> {
        let config = model.tokenizer_config()?;
        let token = |k: &str| special_token(&config, k).unwrap_or_default();
        let source =
            match choice.unwrap_or("model") {
                "model" => model_template(model, &config)?,
                name => match BUILTIN.iter().find(|(n, _)| *n == name) {
                    Some((_, text)) => text.to_string(),
                    None => {
                        let p = recipe_dir.join(name);
                        std::fs::read_to_string(&p).map_err(|e| {
                        crate::Error::Template(format!(
                            "[model] chat_template = \"{name}\" is neither `model`, a built-in ({}) nor a readable \
                             file ({})",
                            BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
                            p.display()
                        ) + &format!(": {e}"))
                    })?
                    }
                },
            };
        ChatTemplate::new(&source, &token("bos_token"), &token("eos_token"))
    }

    /// Compiles a template and probes its end-of-turn marker.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String { strftime_now(&fmt) });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| crate::Error::Template(format!("the chat template does not compile: {e}")))?;
        let mut t = ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            end_of_turn: String::new(),
        };
        t.end_of_turn = t.probe_end_of_turn()?;
        Ok(t)
    }

    /// Renders a conversation (and tool catalogue, if any).
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            tools => tools.map(|t| Value::from(Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            date_string => DATE_STRING,
        };
        tmpl.render(ctx).map_err(|e| {
            let detail = match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                _ => format!("{e:#}"),
            };
            crate::Error::Template(format!("the chat template raised: {detail}"))
        })
    }

    /// What follows an assistant message's content up to the next
    /// whitespace: the end-of-turn marker. Falls back to the EOS token.
    fn probe_end_of_turn(&self) -> Result<String> {
        const PROBE: &str = "PIPELINE_PROBE_ANSWER";
        let conv = [Message::new("user", "PIPELINE_PROBE_QUESTION"), Message::new("assistant", PROBE)];
        let marker = match self.render(&conv, None, false) {
            Ok(text) => text
                .rfind(PROBE)
                .map(|i| text[i + PROBE.len()..].split_whitespace().next().unwrap_or_default().to_string())
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        let marker = if marker.is_empty() { self.eos_token.clone() } else { marker };
        if marker.is_empty() {
            return Err(crate::Error::Template(format!(
                "the chat template ends assistant turns with no marker and the tokenizer has no eos_token; \
                   the model could never learn to stop"
            )));
        }
        Ok(marker)
    }

    /// Renders a conversation and returns the byte spans of its assistant
    /// turns: from the end of the assistant header to the end of the
    /// end-of-turn marker (so the model learns to stop).
    pub fn render_with_spans(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
    ) -> Result<(String, Vec<TurnSpan>)> {
        let full = self.render(messages, tools, false)?;
        let mut spans = Vec::new();
        let mut cursor = 0;
        for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
            // The text before this turn, with the generation prompt: the turn's
            // content starts where that prefix ends.
            let prefix = self.render(&messages[..i], tools, true)?;
            if !full.starts_with(&prefix) || prefix.len() < cursor {
                return Err(crate::Error::Template(format!(
                    "message {i}: the template renders this conversation's prefix differently from the whole \
                     conversation, so the assistant turn cannot be located"
                )));
            }
            let start = prefix.len();
            let end =
                full[start..].find(&self.end_of_turn).map(|p| start + p + self.end_of_turn.len()).ok_or_else(|| {
                    crate::Error::Template(format!("message {i}: no `{}` after the assistant turn", self.end_of_turn))
                })?;
            // The turn holds its text; a turn that calls tools may lose its
            // text to the template (Llama 3.x's renders the call alone), but
            // then holds the name of every tool it calls.
            let turn = &full[start..end];
            let content = m.content.trim();
            let calls_rendered = m.tool_calls.as_ref().is_some_and(|calls| {
                let calls = crate::toolcall::from_openai(calls).calls;
                !calls.is_empty() && calls.iter().all(|c| turn.contains(&c.name))
            });
            if !content.is_empty() && !turn.contains(content) && !calls_rendered {
                return Err(crate::Error::Template(format!(
                    "message {i}: the assistant text is not where the template put the turn"
                )));
            }
            spans.push(TurnSpan { message: i, start, end });
            cursor = end;
        }
        Ok((full, spans))
    }
}

/// The byte range of one assistant turn in a rendered conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnSpan {
    /// Index of the message in the conversation.
    pub message: usize,
    pub start: usize,
    pub end: usize,
}

/// The model's own template: `chat_template.jinja`, else tokenizer_config's
/// `chat_template` (a string, or a list of named templates: `default`).
fn model_template(model: &ModelFiles, config: &serde_json::Value) -> Result<String> {
    if let Some(p) = &model.chat_template_file {
        return Ok(std::fs::read_to_string(p).on("read", p)?);
    }
    match config.get("chat_template") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string)
            .ok_or_else(|| {
                crate::Error::Template("tokenizer_config.json lists chat templates but none is named `default`".into())
            }),
        _ => {
            return Err(crate::Error::Template(format!(
                "the model `{}` has no chat template (tokenizer_config.json has no `chat_template`); set \
             [model] chat_template to a built-in (gemma, gemma-tools, chatml, chatml-tools, alpaca) or a .jinja file",
                model.source
            )));
        }
    }
}

/// The date templates that print one (Llama 3.x's system turn: "Today
/// Date: …") are given: fixed, so a conversation renders the same on any
/// day (its cache key stays true) and Ollama's template can write the
/// same text; it is the date Llama 3.x's template falls back to. Serve with
/// `llama-server --chat-template-kwargs '{"date_string": "26 Jul 2024"}'`
/// to render it there too (llama.cpp otherwise writes today's date).
pub const DATE_STRING: &str = "26 Jul 2024";

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`, with Python's separators.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut json: serde_json::Value =
        serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    if sort_keys == Some(true) {
        json = sort_json(json);
    }
    let seps = match separators.as_deref() {
        None => None,
        Some([item, key]) => Some((item.as_str(), key.as_str())),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators is (item, key)")),
    };
    Ok(Value::from_safe_string(python_json_with(&json, indent, seps)))
}

fn sort_json(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<_> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sort_json(v))).collect())
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(sort_json).collect()),
        other => other,
    }
}

/// JSON text as Python's `json.dumps(ensure_ascii=False)` writes it.
pub fn python_json(v: &serde_json::Value, indent: Option<usize>) -> String {
    python_json_with(v, indent, None)
}

/// `json.dumps(ensure_ascii=False, indent=…, separators=(item, key))`.
pub fn python_json_with(v: &serde_json::Value, indent: Option<usize>, separators: Option<(&str, &str)>) -> String {
    let default_item = if indent.is_some() { "," } else { ", " };
    let (item, key) = separators.unwrap_or((default_item, ": "));
    let mut out = String::new();
    write_py(v, indent, (item, key), 0, &mut out);
    out
}

fn write_py(v: &serde_json::Value, indent: Option<usize>, seps: (&str, &str), depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let (sep, key_sep) = seps;
    match v {
        J::Object(m) if !m.is_empty() => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).expect("string"));
                out.push_str(key_sep);
                write_py(x, indent, seps, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        J::Array(a) if !a.is_empty() => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_py(x, indent, seps, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Number(n) if n.is_f64() => {
            // Python writes 1.0 where serde writes 1.0 too, and 1e-05 for 1e-5.
            out.push_str(&n.to_string());
        }
        other => out.push_str(&serde_json::to_string(other).expect("json")),
    }
}

/// `strftime_now(fmt)`, which templates use to print today's date.
fn strftime_now(fmt: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    // An unknown directive makes chrono's formatter fail: leave it verbatim.
    match write!(out, "{}", chrono::Local::now().format(fmt)) {
        Ok(()) => out,
        Err(_) => fmt.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_json_matches_json_dumps() {
        let v = serde_json::json!({"name": "get_weather", "arguments": {"location": "北京", "days": [1, 2]}, "e": {}});
        assert_eq!(
            python_json(&v, None),
            r#"{"name": "get_weather", "arguments": {"location": "北京", "days": [1, 2]}, "e": {}}"#
        );
        assert_eq!(python_json(&serde_json::json!({"a": [1]}), Some(2)), "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn chatml_spans_cover_assistant_turns_and_end_marker() {
        let t = ChatTemplate::new(BUILTIN.iter().find(|(n, _)| *n == "chatml").unwrap().1, "", "<|im_end|>").unwrap();
        assert_eq!(t.end_of_turn, "<|im_end|>");
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
            Message::new("assistant", "Goodbye."),
        ];
        let (text, spans) = t.render_with_spans(&msgs, None).unwrap();
        let got: Vec<&str> = spans.iter().map(|s| &text[s.start..s.end]).collect();
        assert_eq!(got, vec!["Hello!<|im_end|>", "Goodbye.<|im_end|>"]);
    }

    #[test]
    fn strftime_now_formats_today() {
        let year = strftime_now("%Y");
        assert_eq!(year.len(), 4, "{year}");
        assert!(year.starts_with("20"), "{year}");
        assert_eq!(strftime_now("%d %B %Y").split(' ').count(), 3);
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "</s>").unwrap();
        let err = t.render(&[Message::new("user", "x")], None, false).unwrap_err();
        assert!(format!("{err}").contains("roles must alternate"), "{err}");
    }
}
