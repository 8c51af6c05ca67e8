//! Tools that run: implementations of a dataset's tools, so that a generated
//! call is judged as the published tool-use evaluations judge it — by
//! executing it — and not only against the catalogue's schema
//! ([`crate::catalogue`]).
//!
//! A [`Toolbox`] maps tool names to functions of the call's arguments. A call
//! *executes* when its tool is in the toolbox, its arguments match the
//! function's signature (every required one given, none unknown, as Python
//! raises `TypeError` otherwise) and the function returns without error.
//! Results are JSON values; [`py_repr`] prints them as the dataset's
//! `<tool_result>` blocks do (Python's `repr`).
//!
//! Built-in toolboxes (by [`Toolbox::builtin`] name):
//! - `tool-use-finetuning`: the 40 tools of `shawhin/tool-use-finetuning`
//!   ([`tool_use_finetuning`]).

pub mod pyexpr;
pub mod tool_use_finetuning;

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::catalogue::Catalogue;
use crate::toolcall::ToolCall;

/// A tool's implementation: its arguments (already checked against the
/// signature) to its result, or why it failed.
pub type ToolFn = fn(&Args) -> Result<Value, String>;

/// One implemented tool.
#[derive(Clone, Copy)]
pub struct ToolImpl {
    pub name: &'static str,
    /// Parameter names; those ending in `?` may be left out.
    pub params: &'static [&'static str],
    pub run: ToolFn,
}

/// Implementations by tool name.
#[derive(Clone)]
pub struct Toolbox {
    pub name: &'static str,
    tools: BTreeMap<&'static str, ToolImpl>,
}

/// The built-in toolboxes: name and tools.
const BUILTIN: &[(&str, &[ToolImpl])] = &[("tool-use-finetuning", tool_use_finetuning::TOOLS)];

/// The names of the built-in toolboxes.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN.iter().map(|(name, _)| *name)
}

impl Toolbox {
    /// The built-in toolbox called `name`.
    pub fn builtin(name: &str) -> Option<Toolbox> {
        let (name, tools) = BUILTIN.iter().find(|(n, _)| *n == name)?;
        Some(Toolbox { name, tools: tools.iter().map(|t| (t.name, *t)).collect() })
    }

    /// The built-in toolbox that implements every tool of `catalogue` (none
    /// for an empty catalogue).
    pub fn covering(catalogue: &Catalogue) -> Option<Toolbox> {
        if catalogue.is_empty() {
            return None;
        }
        builtin_names()
            .filter_map(Toolbox::builtin)
            .find(|t| catalogue.tools.keys().all(|name| t.tools.contains_key(name.as_str())))
    }

    /// Runs `call`: its result, or why it did not execute.
    pub fn execute(&self, call: &ToolCall) -> Result<Value, String> {
        let tool = self.tools.get(call.name.as_str()).ok_or_else(|| format!("no tool `{}`", call.name))?;
        let empty = Map::new();
        let given = match &call.arguments {
            Value::Object(m) => m,
            Value::Null => &empty,
            other => return Err(format!("arguments are {}, not an object", kind(other))),
        };
        for key in given.keys() {
            if !tool.params.iter().any(|p| p.trim_end_matches('?') == key) {
                return Err(format!("{}() got an unexpected keyword argument '{key}'", tool.name));
            }
        }
        for p in tool.params.iter().filter(|p| !p.ends_with('?')) {
            if !given.contains_key(*p) {
                return Err(format!("{}() missing required argument: '{p}'", tool.name));
            }
        }
        (tool.run)(&Args { map: given })
    }
}

/// A call's arguments, read with the type each parameter needs.
pub struct Args<'a> {
    map: &'a Map<String, Value>,
}

impl Args<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn wrong(&self, name: &str, want: &str) -> String {
        format!("argument '{name}' must be {want}, not {}", self.get(name).map_or("missing", kind))
    }

    pub fn str(&self, name: &str) -> Result<&str, String> {
        self.get(name).and_then(Value::as_str).ok_or_else(|| self.wrong(name, "a string"))
    }

    /// An integer (a float with no fraction is one, as `int(12.0)`).
    pub fn int(&self, name: &str) -> Result<i64, String> {
        let v = self.get(name).ok_or_else(|| self.wrong(name, "an integer"))?;
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
            .ok_or_else(|| self.wrong(name, "an integer"))
    }

    pub fn num(&self, name: &str) -> Result<f64, String> {
        self.get(name).and_then(Value::as_f64).ok_or_else(|| self.wrong(name, "a number"))
    }

    /// An integer, or `default` when it is left out.
    pub fn int_or(&self, name: &str, default: i64) -> Result<i64, String> {
        if self.get(name).is_none() { Ok(default) } else { self.int(name) }
    }

    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.wrong(name, "a boolean")),
        }
    }

    pub fn list(&self, name: &str) -> Result<&Vec<Value>, String> {
        self.get(name).and_then(Value::as_array).ok_or_else(|| self.wrong(name, "a list"))
    }

    /// A list of numbers: each as a float (to order and add) and as given
    /// (to return: ints stay ints).
    pub fn numbers(&self, name: &str) -> Result<Vec<(f64, &Value)>, String> {
        self.list(name)?
            .iter()
            .map(|v| match v.as_f64() {
                Some(f) if v.is_number() => Ok((f, v)),
                _ => Err(format!("argument '{name}' must hold numbers only, not {}", kind(v))),
            })
            .collect()
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "None",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a float",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a dict",
    }
}

/// `value` as Python's `repr` prints it: `{'a': 1, 'b': [2.0, 'x']}`,
/// `True`, `None`; a top-level string bare, as `print` shows it.
pub fn py_display(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

/// Python's `repr` of a JSON value.
pub fn py_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => py_float(f),
            _ => n.to_string(),
        },
        Value::String(s) => py_str(s),
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => {
            format!(
                "{{{}}}",
                o.iter().map(|(k, v)| format!("{}: {}", py_str(k), py_repr(v))).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let exp = if f == 0.0 { 0 } else { f.abs().log10().floor() as i32 };
    if !(-4..16).contains(&exp) {
        // Python: shortest digits in scientific notation, `1e+16`, `1.5e-07`.
        let s = format!("{f:e}");
        let (mantissa, e) = s.split_once('e').expect("`{:e}` has an exponent");
        let e: i32 = e.parse().expect("an integer exponent");
        return format!("{mantissa}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    let s = format!("{f}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

fn py_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, args: Value) -> ToolCall {
        ToolCall { name: name.into(), arguments: args }
    }

    #[test]
    fn repr_as_python() {
        let v =
            json!({"status": "added", "n": 7153.0, "i": 2, "ok": true, "none": null, "l": ["a", "it's", 1e16, 1.5e-7]});
        assert_eq!(
            py_repr(&v),
            "{'status': 'added', 'n': 7153.0, 'i': 2, 'ok': True, 'none': None, 'l': ['a', \"it's\", 1e+16, 1.5e-07]}"
        );
        assert_eq!(py_repr(&json!(3.391164991562634)), "3.391164991562634");
        assert_eq!(py_display(&json!("hello-world")), "hello-world");
    }

    #[test]
    fn signatures_are_checked_as_python_calls_them() {
        let tb = Toolbox::builtin("tool-use-finetuning").unwrap();
        assert_eq!(
            tb.execute(&call("get_weather", json!({"city": "Paris"}))).map(|v| v["temperature"].clone()),
            Ok(json!(62))
        );
        assert_eq!(
            tb.execute(&call("get_weather", json!({"city": "Paris", "unit": "c"}))),
            Err("get_weather() got an unexpected keyword argument 'unit'".into())
        );
        assert_eq!(
            tb.execute(&call("convert_bases", json!({"number": "ff", "to_base": 2}))),
            Err("convert_bases() missing required argument: 'from_base'".into())
        );
        assert_eq!(tb.execute(&call("search", json!({}))), Err("no tool `search`".into()));
        // Optional parameters may be left out.
        assert_eq!(tb.execute(&call("sort_list", json!({"items": [3, 1, 2]}))), Ok(json!([1, 2, 3])));
        assert!(tb.execute(&call("get_current_datetime", Value::Null)).is_ok());
    }

    #[test]
    fn covering_finds_the_toolbox_of_a_catalogue() {
        let mut c = Catalogue::default();
        assert!(Toolbox::covering(&c).is_none(), "nothing to run an empty catalogue against");
        c.add_text(r#"<tools>[{"tool_name": "get_weather", "input_args": {"city": "string - City."}}]</tools>"#);
        assert_eq!(Toolbox::covering(&c).map(|t| t.name), Some("tool-use-finetuning"));
        c.add_text(r#"<tools>[{"tool_name": "book_flight", "input_args": {}}]</tools>"#);
        assert!(Toolbox::covering(&c).is_none(), "a tool no toolbox implements");
    }
}
