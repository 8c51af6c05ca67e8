//! The tools a dataset knows, and whether a parsed call could run against
//! them: the tool exists, every required argument is there, none is
//! unknown, and each value has its declared JSON type.
//!
//! Catalogues come in the two shapes the seed datasets use:
//!
//! - `<tools>[{"tool_name": …, "input_args": {"city": "string - Name…"}}]</tools>`
//!   in a prompt (this project's tool-use dataset; `name`/`parameters` and
//!   `arguments` are read too), where an argument's type is the word before
//!   ` - ` and one described as optional is not required;
//! - OpenAI `tools` (`[{"type": "function", "function": {"name", "parameters":
//!   {JSON schema}}}]`), where `required` lists the required arguments.
//!
//! A dataset's catalogue is the union over its rows: a row's own `<tools>`
//! list is a sample, and does not always hold the tool its answer uses.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::toolcall::ToolCall;

/// A JSON type an argument is declared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JsonType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

impl JsonType {
    /// The type named `word` (`str`, `int`, `float`, `list`, `dict`, `bool`
    /// as Python signatures write them, too); `None` for others (`any`).
    pub fn parse(word: &str) -> Option<JsonType> {
        Some(match word.trim().to_ascii_lowercase().as_str() {
            "string" | "str" => JsonType::String,
            "integer" | "int" => JsonType::Integer,
            "number" | "float" | "double" => JsonType::Number,
            "boolean" | "bool" => JsonType::Boolean,
            "array" | "list" => JsonType::Array,
            "object" | "dict" => JsonType::Object,
            _ => return None,
        })
    }

    fn accepts(self, v: &Value) -> bool {
        match self {
            JsonType::String => v.is_string(),
            JsonType::Integer => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
            JsonType::Number => v.is_number(),
            JsonType::Boolean => v.is_boolean(),
            JsonType::Array => v.is_array(),
            JsonType::Object => v.is_object(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JsonType::String => "string",
            JsonType::Integer => "integer",
            JsonType::Number => "number",
            JsonType::Boolean => "boolean",
            JsonType::Array => "array",
            JsonType::Object => "object",
        }
    }
}

/// One argument of a tool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Argument {
    /// `None`: any value.
    pub kind: Option<JsonType>,
    pub required: bool,
}

/// One tool: its arguments by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tool {
    pub arguments: BTreeMap<String, Argument>,
}

/// Why a call could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    UnknownTool(String),
    Missing(String),
    Unknown(String),
    WrongType { argument: String, expected: &'static str, got: String },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::UnknownTool(t) => write!(f, "no tool `{t}` in the catalogue"),
            CallError::Missing(a) => write!(f, "required argument `{a}` missing"),
            CallError::Unknown(a) => write!(f, "unknown argument `{a}`"),
            CallError::WrongType { argument, expected, got } => {
                write!(f, "argument `{argument}` is {got}, not {expected}")
            }
        }
    }
}

/// Tools by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Catalogue {
    pub tools: BTreeMap<String, Tool>,
}

impl Catalogue {
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tools.len()
    }

    /// Adds the tools of every `<tools>…</tools>` block in `text` (blocks
    /// that are not a JSON list of tools are skipped).
    pub fn add_text(&mut self, text: &str) {
        let mut rest = text;
        while let Some(i) = rest.find("<tools>") {
            let body = &rest[i + "<tools>".len()..];
            let Some(end) = body.find("</tools>") else { return };
            if let Ok(v) = serde_json::from_str::<Value>(body[..end].trim()) {
                self.add_list(&v);
            }
            rest = &body[end..];
        }
    }

    /// Adds the tools of a list: OpenAI `tools`, or `<tools>`-style entries.
    pub fn add_list(&mut self, tools: &Value) {
        let items = match tools {
            Value::Array(items) => items.as_slice(),
            other => std::slice::from_ref(other),
        };
        for item in items {
            let item = match item.get("function") {
                Some(f @ Value::Object(_)) => f,
                _ => item,
            };
            let name = ["name", "tool_name"].iter().find_map(|k| item.get(*k).and_then(Value::as_str));
            let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else { continue };
            let args = ["parameters", "input_args", "arguments", "args"].iter().find_map(|k| item.get(*k));
            let tool = args.map(tool_from_args).unwrap_or_default();
            self.tools.entry(name.to_string()).or_insert(tool);
        }
    }

    /// Whether `call` could run: `Ok` or the first reason it could not.
    pub fn check(&self, call: &ToolCall) -> Result<(), CallError> {
        let tool = self.tools.get(&call.name).ok_or_else(|| CallError::UnknownTool(call.name.clone()))?;
        let given = call.arguments.as_object().cloned().unwrap_or_default();
        for (name, arg) in &tool.arguments {
            if arg.required && !given.contains_key(name) {
                return Err(CallError::Missing(name.clone()));
            }
        }
        for (name, value) in &given {
            let arg = tool.arguments.get(name).ok_or_else(|| CallError::Unknown(name.clone()))?;
            if let Some(kind) = arg.kind {
                if !kind.accepts(value) {
                    return Err(CallError::WrongType {
                        argument: name.clone(),
                        expected: kind.name(),
                        got: type_of(value).to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// An argument described as `"type - description"` (`"string - City."`;
/// one whose type or description says "optional" is not required).
pub struct DescribedArgument<'a> {
    /// The type as written (`str`, `integer`…), "(optional)" removed.
    pub type_word: &'a str,
    pub description: &'a str,
    pub required: bool,
}

impl<'a> DescribedArgument<'a> {
    pub fn parse(s: &'a str) -> DescribedArgument<'a> {
        let (ty, desc) = s.split_once(" - ").unwrap_or((s, ""));
        let optional = ty.contains("optional") || desc.to_ascii_lowercase().contains("optional");
        let type_word = ty.trim().trim_end_matches("(optional)").trim().trim_end_matches("optional").trim();
        DescribedArgument { type_word, description: desc.trim(), required: !optional }
    }
}

/// A tool's arguments from a JSON schema (`properties`, `required`) or a
/// name → "type - description" map.
fn tool_from_args(args: &Value) -> Tool {
    let Some(o) = args.as_object() else { return Tool::default() };
    let mut arguments = BTreeMap::new();
    if let Some(Value::Object(props)) = o.get("properties") {
        let required: Vec<&str> = o
            .get("required")
            .and_then(Value::as_array)
            .map_or(Vec::new(), |r| r.iter().filter_map(Value::as_str).collect());
        for (name, schema) in props {
            let kind = schema.get("type").and_then(Value::as_str).and_then(JsonType::parse);
            arguments.insert(name.clone(), Argument { kind, required: required.contains(&name.as_str()) });
        }
        return Tool { arguments };
    }
    for (name, spec) in o {
        let (kind, required) = match spec {
            Value::String(s) => {
                let d = DescribedArgument::parse(s);
                (JsonType::parse(d.type_word), d.required)
            }
            Value::Object(schema) => (
                schema.get("type").and_then(Value::as_str).and_then(JsonType::parse),
                schema.get("required").and_then(Value::as_bool).unwrap_or(true),
            ),
            _ => (None, true),
        };
        arguments.insert(name.clone(), Argument { kind, required });
    }
    Tool { arguments }
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, args: Value) -> ToolCall {
        ToolCall { name: name.into(), arguments: args }
    }

    #[test]
    fn reads_tools_blocks_and_openai_tools() {
        let mut c = Catalogue::default();
        c.add_text(
            "<instructions>…</instructions>\n<tools>\n[{\"tool_name\": \"convert_bases\", \"input_args\": \
             {\"number\": \"string - Number.\", \"to_base\": \"integer - Base.\", \"note\": \"string - A note (optional).\"}}]\n</tools>",
        );
        c.add_list(&json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"]}}}]));
        assert_eq!(c.len(), 2);
        assert_eq!(c.check(&call("convert_bases", json!({"number": "ff", "to_base": 10}))), Ok(()));
        assert_eq!(c.check(&call("convert_bases", json!({"number": "ff", "to_base": 10.0}))), Ok(()));
        assert_eq!(
            c.check(&call("convert_bases", json!({"number": "ff", "to_base": "10"}))),
            Err(CallError::WrongType { argument: "to_base".into(), expected: "integer", got: "a string".into() })
        );
        assert_eq!(c.check(&call("convert_bases", json!({"number": "ff"}))), Err(CallError::Missing("to_base".into())));
        assert_eq!(c.check(&call("get_weather", json!({"city": "Paris"}))), Ok(()));
        assert_eq!(
            c.check(&call("get_weather", json!({"city": "Paris", "when": "now"}))),
            Err(CallError::Unknown("when".into()))
        );
        assert_eq!(c.check(&call("search", json!({}))), Err(CallError::UnknownTool("search".into())));
    }

    #[test]
    fn the_first_definition_of_a_tool_wins_and_broken_blocks_are_skipped() {
        let mut c = Catalogue::default();
        c.add_text("<tools>not json</tools> <tools>[{\"name\": \"a\", \"parameters\": {}}]</tools>");
        c.add_text("<tools>[{\"name\": \"a\", \"parameters\": {\"x\": \"string - x\"}}]</tools>");
        assert_eq!(c.len(), 1);
        assert_eq!(c.check(&call("a", json!({}))), Ok(()));
    }
}
