//! Tool calls in model text, in the formats the seed users train on:
//!
//! - `<tool_call>{"tool_name": …, "args": {…}}</tool_call>` (this project's
//!   tool-use dataset);
//! - Hermes / Qwen `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
//!   (`arguments` may also be a JSON string, as OpenAI writes it);
//! - function style, `get_weather({"location": "北京"})` or
//!   `get_weather(location="北京")`, inside `<tool_call>` tags or on its own;
//! - OpenAI `tool_calls` (`[{"type": "function", "function": {"name",
//!   "arguments"}}]`), in a message or as the generated JSON.
//!
//! Parsing never fails: what looks like a call but cannot be read (malformed
//! JSON, no name) is kept in [`ParsedCalls::invalid`], so a report can count
//! it as an invalid call.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One call: the tool's name and its arguments (a JSON object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// The calls found in a text.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ParsedCalls {
    pub calls: Vec<ToolCall>,
    /// Text of each attempted call that could not be read.
    pub invalid: Vec<String>,
}

impl ParsedCalls {
    /// Whether the text tries to call a tool at all (validly or not).
    pub fn attempted(&self) -> bool {
        !self.calls.is_empty() || !self.invalid.is_empty()
    }

    /// Whether every attempted call could be read.
    pub fn all_valid(&self) -> bool {
        self.invalid.is_empty()
    }
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// Finds the tool calls in `text`.
pub fn parse(text: &str) -> ParsedCalls {
    let mut out = ParsedCalls::default();
    if text.contains(OPEN) {
        // Tagged calls; an unterminated last block runs to the end (generation
        // may stop at `</tool_call>`, which is then not in the text).
        let mut rest = text;
        while let Some(i) = rest.find(OPEN) {
            let body_start = i + OPEN.len();
            let (body, next) = match rest[body_start..].find(CLOSE) {
                Some(j) => (&rest[body_start..body_start + j], body_start + j + CLOSE.len()),
                None => (&rest[body_start..], rest.len()),
            };
            parse_block(body, &mut out);
            rest = &rest[next..];
        }
        return out;
    }
    // Untagged: the whole text (or a fenced block) as JSON, else function style.
    let trimmed = strip_fence(text.trim());
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
            let before = out.calls.len() + out.invalid.len();
            json_calls(&v, trimmed, &mut out, false);
            if out.calls.len() + out.invalid.len() > before {
                return out;
            }
        }
    }
    function_calls(text, &mut out, false);
    out
}

/// Calls from an OpenAI `tool_calls` list (a message's field).
pub fn from_openai(tool_calls: &Value) -> ParsedCalls {
    let mut out = ParsedCalls::default();
    match tool_calls {
        Value::Array(items) => {
            for item in items {
                push_call(item, &mut out);
            }
        }
        other => push_call(other, &mut out),
    }
    out
}

/// The content of a `<final_answer>` block (to the end if unterminated).
pub fn final_answer(text: &str) -> Option<&str> {
    let start = text.find("<final_answer>")? + "<final_answer>".len();
    let body = &text[start..];
    Some(body.find("</final_answer>").map_or(body, |e| &body[..e]).trim())
}

/// One `<tool_call>` body: JSON (object or list), or function style.
fn parse_block(body: &str, out: &mut ParsedCalls) {
    let body = strip_fence(body.trim());
    if body.starts_with('{') || body.starts_with('[') {
        match serde_json::from_str::<Value>(body) {
            Ok(v) => json_calls(&v, body, out, true),
            Err(_) => out.invalid.push(body.to_string()),
        }
    } else if !function_calls(body, out, true) {
        out.invalid.push(body.to_string());
    }
}

/// Calls in a parsed JSON value: a call object, a list of them, or an
/// object with `tool_calls`. Outside tags, other JSON is not a call.
fn json_calls(v: &Value, raw: &str, out: &mut ParsedCalls, tagged: bool) {
    let is_call = |x: &Value| x.as_object().is_some_and(|o| call_name(o).is_some() || o.contains_key("function"));
    match v {
        Value::Array(items) if tagged || items.iter().all(is_call) => {
            for item in items {
                push_call(item, out);
            }
        }
        Value::Object(o) if o.contains_key("tool_calls") => {
            let calls = from_openai(&o["tool_calls"]);
            out.calls.extend(calls.calls);
            out.invalid.extend(calls.invalid);
        }
        Value::Object(o) if call_name(o).is_some() || o.contains_key("function") => push_call(v, out),
        _ if tagged => out.invalid.push(raw.to_string()),
        _ => {}
    }
}

/// The name of a call object: `name`, `tool_name`, or `function` as a string.
fn call_name(o: &Map<String, Value>) -> Option<&str> {
    ["name", "tool_name", "function"].iter().find_map(|k| o.get(*k).and_then(Value::as_str))
}

/// Reads one call object in any of the JSON shapes.
fn push_call(v: &Value, out: &mut ParsedCalls) {
    let Some(o) = v.as_object() else {
        out.invalid.push(v.to_string());
        return;
    };
    // OpenAI: {"type": "function", "function": {"name", "arguments"}}.
    let o = match o.get("function") {
        Some(Value::Object(f)) => f,
        _ => o,
    };
    let Some(name) = call_name(o).filter(|n| !n.trim().is_empty()) else {
        out.invalid.push(v.to_string());
        return;
    };
    let args = ["arguments", "args", "parameters"].iter().find_map(|k| o.get(*k));
    let arguments = match args {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(a @ Value::Object(_)) => a,
            _ => {
                out.invalid.push(v.to_string());
                return;
            }
        },
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => {
            out.invalid.push(v.to_string());
            return;
        }
    };
    out.calls.push(ToolCall { name: name.trim().to_string(), arguments });
}

/// Function-style calls `name({…})` / `name(k=v, …)` in `text`. Inside a
/// tag (`tagged`), a call that starts but cannot be read is invalid; in free
/// text only `name({` counts as an attempt (prose is full of parentheses).
/// Returns whether any call was attempted.
fn function_calls(text: &str, out: &mut ParsedCalls, tagged: bool) -> bool {
    let mut attempted = false;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_ident = (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_')
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b'.'));
        if !starts_ident {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || matches!(bytes[j], b'_' | b'.' | b'-')) {
            j += 1;
        }
        let name = &text[i..j];
        let after = text[j..].trim_start();
        let Some(args) = after.strip_prefix('(') else {
            i = j;
            continue;
        };
        let args_trim = args.trim_start();
        if !tagged && !args_trim.starts_with('{') {
            i = j;
            continue;
        }
        attempted = true;
        let consumed_to = text.len() - args_trim.len();
        match function_args(args_trim) {
            Some((arguments, used)) => {
                out.calls.push(ToolCall { name: name.to_string(), arguments });
                i = consumed_to + used;
            }
            None => {
                out.invalid.push(text[i..].lines().next().unwrap_or_default().to_string());
                i = consumed_to;
            }
        }
    }
    attempted
}

/// Reads the arguments after `name(` up to the closing `)`: a JSON object,
/// keyword arguments with JSON values, or nothing. Returns the arguments and
/// the bytes used (through the `)`).
fn function_args(s: &str) -> Option<(Value, usize)> {
    if s.starts_with(')') {
        return Some((Value::Object(Map::new()), 1));
    }
    if s.starts_with('{') {
        let mut stream = serde_json::Deserializer::from_str(s).into_iter::<Value>();
        let v = stream.next()?.ok()?;
        let end = stream.byte_offset();
        let tail = &s[end..];
        let close = tail.len() - tail.trim_start().len();
        if !tail.trim_start().starts_with(')') || !v.is_object() {
            return None;
        }
        return Some((v, end + close + 1));
    }
    // Keyword arguments: k=<json>, …
    let mut args = Map::new();
    let mut pos = 0;
    loop {
        let rest = &s[pos..];
        let trimmed = rest.trim_start();
        pos += rest.len() - trimmed.len();
        if trimmed.starts_with(')') {
            return Some((Value::Object(args), pos + 1));
        }
        let eq = trimmed.find('=')?;
        let key = trimmed[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return None;
        }
        pos += eq + 1;
        let len = value_len(&s[pos..])?;
        let v: Value = serde_json::from_str(s[pos..pos + len].trim()).ok()?;
        args.insert(key.to_string(), v);
        pos += len;
        if s[pos..].starts_with(',') {
            pos += 1;
        }
    }
}

/// Length of a keyword argument's value: up to the next `,` or `)` outside
/// quotes and brackets.
fn value_len(s: &str) -> Option<usize> {
    let (mut depth, mut in_str, mut escaped) = (0i32, false, false);
    for (i, c) in s.char_indices() {
        if in_str {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '[' | '{' | '(' => depth += 1,
            ']' | '}' => depth -= 1,
            ')' if depth == 0 => return Some(i),
            ')' => depth -= 1,
            ',' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

/// `text` without a surrounding Markdown code fence.
fn strip_fence(text: &str) -> &str {
    let Some(rest) = text.strip_prefix("```") else { return text };
    let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
    rest.trim().strip_suffix("```").unwrap_or(rest).trim()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, arguments: Value) -> ToolCall {
        ToolCall { name: name.into(), arguments }
    }

    #[test]
    fn reads_this_datasets_format_with_text_around_it() {
        let text = "Sure.\n<tool_call>\n{\n  \"tool_name\": \"extract_hashtags\",\n  \"args\": {\"text\": \"#a #b\"}\n}\n</tool_call>\nDone";
        let p = parse(text);
        assert_eq!(p.calls, [call("extract_hashtags", json!({"text": "#a #b"}))]);
        assert!(p.all_valid() && p.attempted());
    }

    #[test]
    fn reads_hermes_calls_with_object_or_string_arguments_and_several_calls() {
        let text = r#"<tool_call>
{"name": "get_weather", "arguments": {"location": "北京", "unit": {"deg": "c", "n": [1, 2]}}}
</tool_call>
<tool_call>
{"name": "get_time", "arguments": "{\"tz\": \"Asia/Shanghai\"}"}
</tool_call>"#;
        let p = parse(text);
        assert_eq!(
            p.calls,
            [
                call("get_weather", json!({"location": "北京", "unit": {"deg": "c", "n": [1, 2]}})),
                call("get_time", json!({"tz": "Asia/Shanghai"}))
            ]
        );
    }

    #[test]
    fn reads_llama3_calls_a_bare_object_with_parameters() {
        // Llama 3.x's own format: the call alone, `parameters` for arguments.
        let p = parse(r##"{"name": "extract_hashtags", "parameters": {"text": "#a #b"}}"##);
        assert_eq!(p.calls, [call("extract_hashtags", json!({"text": "#a #b"}))]);
        assert!(p.all_valid());
        // Other JSON outside tags is an answer, not a call.
        assert!(!parse(r#"{"answer": 42}"#).attempted());
    }

    #[test]
    fn reads_function_style_inside_tags_and_in_free_text() {
        let p = parse(
            "我来查一下。\n<tool_call>\nget_weather({\"location\": \"北京\", \"date\": \"today\"})\n</tool_call>",
        );
        assert_eq!(p.calls, [call("get_weather", json!({"location": "北京", "date": "today"}))]);
        let p = parse("Calling get_weather({\"location\": \"Paris\"}) now, then calc(expression=\"25 * 4 + 10\")");
        assert_eq!(p.calls, [call("get_weather", json!({"location": "Paris"}))], "kwargs only count inside tags");
        let p = parse("<tool_call>calc(expression=\"25 * 4 + 10\", precise=true)</tool_call>");
        assert_eq!(p.calls, [call("calc", json!({"expression": "25 * 4 + 10", "precise": true}))]);
        let p = parse("<tool_call>get_time()</tool_call>");
        assert_eq!(p.calls, [call("get_time", json!({}))]);
        // Two calls, one per line, in one block.
        let p = parse("<tool_call>\na({\"x\": 1})\nb({\"y\": \"(z)\"})\n</tool_call>");
        assert_eq!(p.calls, [call("a", json!({"x": 1})), call("b", json!({"y": "(z)"}))]);
    }

    #[test]
    fn reads_openai_tool_calls() {
        let v =
            json!([{"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{\"q\": \"AI\"}"}}]);
        assert_eq!(from_openai(&v).calls, [call("search", json!({"q": "AI"}))]);
        let text =
            r#"{"tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"q": "AI"}}}]}"#;
        assert_eq!(parse(text).calls, [call("search", json!({"q": "AI"}))]);
        let fenced = "```json\n{\"name\": \"search\", \"arguments\": {\"q\": \"AI\"}}\n```";
        assert_eq!(parse(fenced).calls, [call("search", json!({"q": "AI"}))]);
    }

    #[test]
    fn malformed_calls_are_invalid_never_a_panic() {
        for text in [
            "<tool_call>{\"name\": \"x\", \"arguments\": {\"a\": 1}</tool_call>",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"x\", \"arguments\": \"{not json\"}</tool_call>",
            "<tool_call>get_weather({\"location\": </tool_call>",
            "<tool_call>just words</tool_call>",
            "<tool_call>{\"name\": \"x\", \"arguments\": [1]}",
            "<tool_call>",
            "f({\"a\": 1}",
        ] {
            let p = parse(text);
            assert!(p.calls.is_empty(), "{text}: {p:?}");
            assert_eq!(p.invalid.len(), 1, "{text}: {p:?}");
            assert!(p.attempted() && !p.all_valid());
        }
        // An unterminated last block (generation stopped at `</tool_call>`) is fine.
        let p = parse("<tool_call>\n{\"tool_name\": \"a\", \"args\": {}}\n");
        assert_eq!(p.calls, [call("a", json!({}))]);
    }

    #[test]
    fn plain_answers_have_no_calls() {
        for text in ["<final_answer>\nParis (the capital) is nice.\n</final_answer>", "I think (maybe) yes.", "", "{}"]
        {
            assert!(!parse(text).attempted(), "{text}");
        }
        assert_eq!(final_answer("x <final_answer>\n Paris \n</final_answer>"), Some("Paris"));
        assert_eq!(final_answer("<final_answer>Par"), Some("Par"));
        assert_eq!(final_answer("Paris"), None);
    }
}
