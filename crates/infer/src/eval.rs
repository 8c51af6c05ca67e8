//! Scoring generated answers against the gold turn of a conversation, and
//! the report tables.
//!
//! Tool calls are scored on the parsed calls (not the raw text), with the
//! metrics the published tool-use evaluations report:
//!
//! - **decision accuracy** (all rows): a call was made iff one is needed —
//!   what the shawhin/tool-use-finetuning evaluation calls "tool called when
//!   needed";
//! - **correct tool** (tool-needed rows): the called tools are the gold ones;
//! - **call executes** (tool-needed rows): a call was made and every call
//!   ran without error on the dataset's tool implementations (a
//!   [`Toolbox`]) — what the published evaluation calls "success";
//!
//! and beside them **schema-valid call** (tool-needed rows): a call was made
//! and every call passes the dataset's tool [`Catalogue`] (known tool,
//! required arguments present, none unknown, values of the declared JSON
//! types). It is a weaker check than executing (`get_weather(city="ff")`
//! passes it), and constrained decoding enforces it by construction, so it
//! is never set against the published figure;
//!
//! and BFCL-style ones: argument exact match and per-argument
//! precision/recall (values compared as JSON), JSON validity, full-call
//! exact match. QA answers are scored with ROUGE-L F1. Every metric carries
//! its denominator, so a rate over 3 rows is not read like one over 300.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::catalogue::Catalogue;
use crate::toolbox::Toolbox;
use crate::toolcall::{ParsedCalls, ToolCall};

/// What is measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Tool calling when any gold turn holds a call, else QA.
    #[default]
    Auto,
    ToolCall,
    Qa,
}

/// The gold turn a tool-calling answer is compared with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gold {
    pub calls: ParsedCalls,
    pub text: String,
    /// Whether a call is needed: a dataset's own label (`tool_needed`) when
    /// it has one, else whether the gold turn calls a tool.
    pub needs_call: bool,
}

impl Gold {
    /// The gold turn of an assistant message: its OpenAI `tool_calls` if
    /// present, else the calls parsed from its text; `needs_call` overrides
    /// whether that turn calling a tool means one is needed.
    pub fn new(content: &str, tool_calls: Option<&Value>, needs_call: Option<bool>) -> Gold {
        let calls = match tool_calls {
            Some(tc) => crate::toolcall::from_openai(tc),
            None => crate::toolcall::parse(content),
        };
        let needs_call = needs_call.unwrap_or_else(|| calls.attempted());
        Gold { calls, text: content.to_string(), needs_call }
    }
}

/// The verdict on one tool-calling answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolVerdict {
    pub needs_call: bool,
    pub called: bool,
    /// Every attempted call could be read (only when `called`).
    pub json_valid: Option<bool>,
    /// The called tool names are the gold ones (only when `needs_call`).
    pub name_correct: Option<bool>,
    /// A call was made and every call passes the catalogue's schema (only
    /// when `needs_call` and there is a catalogue).
    #[serde(default)]
    pub schema_valid: Option<bool>,
    /// Why a call fails the schema, when one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_error: Option<String>,
    /// A call was made and every call ran on the toolbox without error (only
    /// when `needs_call` and there is a toolbox).
    #[serde(default)]
    pub executes: Option<bool>,
    /// What each call returned (Python's `repr`), or why it did not run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<Result<String, String>>,
    /// Same names and exactly the same arguments (only when `needs_call`).
    pub args_exact: Option<bool>,
    /// Arguments equal to gold ones / predicted / gold, summed over calls.
    pub args_matched: usize,
    pub args_predicted: usize,
    pub args_gold: usize,
    /// Right decision and, for calls, exactly the gold calls.
    pub exact: bool,
    /// When the gold answer has a final answer (no call): so does this one.
    pub final_answer: Option<bool>,
}

/// Scores `pred` (parsed from `pred_text`) against `gold`; the schema is
/// checked against `catalogue` (not at all when it is empty), and the calls
/// are run on `toolbox` when there is one.
pub fn score_tool_call(
    pred: &ParsedCalls,
    pred_text: &str,
    gold: &Gold,
    catalogue: &Catalogue,
    toolbox: Option<&Toolbox>,
) -> ToolVerdict {
    let needs_call = gold.needs_call;
    let called = pred.attempted();
    let mut v = ToolVerdict { needs_call, called, json_valid: called.then(|| pred.all_valid()), ..Default::default() };
    v.schema_error = schema_error(pred, catalogue);
    if let Some(tb) = toolbox {
        v.results = pred.calls.iter().map(|c| tb.execute(c).map(|r| crate::toolbox::py_display(&r))).collect();
        v.results.extend(pred.invalid.iter().map(|t| Err(unreadable(t))));
    }
    if needs_call {
        fn names(c: &[ToolCall]) -> Vec<&str> {
            let mut n: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
            n.sort_unstable();
            n
        }
        let name_ok = called && pred.all_valid() && names(&pred.calls) == names(&gold.calls.calls);
        v.name_correct = Some(name_ok);
        if !catalogue.is_empty() {
            v.schema_valid = Some(called && v.schema_error.is_none());
        }
        if toolbox.is_some() {
            v.executes = Some(called && v.results.iter().all(Result::is_ok));
        }
        // Match each gold call to an unused predicted call of the same name.
        let mut used = vec![false; pred.calls.len()];
        let mut all_args_equal = name_ok;
        for g in &gold.calls.calls {
            let g_args = g.arguments.as_object().cloned().unwrap_or_default();
            v.args_gold += g_args.len();
            let m = pred.calls.iter().enumerate().position(|(i, p)| !used[i] && p.name == g.name);
            match m {
                Some(i) => {
                    used[i] = true;
                    let p_args = pred.calls[i].arguments.as_object().cloned().unwrap_or_default();
                    v.args_matched += g_args.iter().filter(|(k, val)| p_args.get(*k) == Some(val)).count();
                    all_args_equal &= p_args == g_args;
                }
                None => all_args_equal = false,
            }
        }
        v.args_predicted = pred.calls.iter().map(|c| c.arguments.as_object().map_or(0, |o| o.len())).sum::<usize>();
        v.args_exact = Some(all_args_equal);
        v.exact = all_args_equal;
    } else {
        v.exact = !called;
        let wants_tag = gold.text.contains("<final_answer>");
        let has = if wants_tag {
            crate::toolcall::final_answer(pred_text).is_some_and(|a| !a.is_empty())
        } else {
            !called && !pred_text.trim().is_empty()
        };
        v.final_answer = Some(has);
        v.exact &= has;
    }
    v
}

/// What a verdict says of a call that could not be read: its start.
fn unreadable(text: &str) -> String {
    format!("unreadable call: {}", text.chars().take(80).collect::<String>())
}

/// Why the calls of `pred` fail `catalogue`'s schema (`None` when they
/// pass, when none was attempted, or when there is no catalogue).
fn schema_error(pred: &ParsedCalls, catalogue: &Catalogue) -> Option<String> {
    if !pred.attempted() || catalogue.is_empty() {
        return None;
    }
    if let Some(bad) = pred.invalid.first() {
        return Some(unreadable(bad));
    }
    pred.calls.iter().find_map(|c| catalogue.check(c).err().map(|e| format!("{}: {e}", c.name)))
}

/// ROUGE-L F1 between two texts: longest common subsequence over words
/// (lower-cased), with each CJK character a word of its own.
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let (c, r) = (words(candidate), words(reference));
    if c.is_empty() || r.is_empty() {
        return if c.is_empty() && r.is_empty() { 1.0 } else { 0.0 };
    }
    let mut prev = vec![0usize; r.len() + 1];
    for cw in &c {
        let mut cur = vec![0usize; r.len() + 1];
        for (j, rw) in r.iter().enumerate() {
            cur[j + 1] = if cw == rw { prev[j] + 1 } else { cur[j].max(prev[j + 1]) };
        }
        prev = cur;
    }
    let lcs = prev[r.len()] as f64;
    let (p, rec) = (lcs / c.len() as f64, lcs / r.len() as f64);
    if lcs == 0.0 { 0.0 } else { 2.0 * p * rec / (p + rec) }
}

fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in text.to_lowercase().chars() {
        let cjk = matches!(ch as u32, 0x3400..=0x9FFF | 0xF900..=0xFAFF | 0x3040..=0x30FF | 0xAC00..=0xD7AF);
        if ch.is_alphanumeric() && !cjk {
            cur.push(ch);
            continue;
        }
        if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        if cjk {
            out.push(ch.to_string());
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// A rate or mean with the number of rows it is over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub value: f64,
    pub n: usize,
}

/// Accumulates per-row results into metrics.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    sums: BTreeMap<&'static str, (f64, usize)>,
    args: (usize, usize, usize),
    nll: (f64, usize),
}

impl Tally {
    fn add(&mut self, key: &'static str, value: f64) {
        let e = self.sums.entry(key).or_default();
        e.0 += value;
        e.1 += 1;
    }

    fn rate(&mut self, key: &'static str, v: Option<bool>) {
        if let Some(b) = v {
            self.add(key, f64::from(u8::from(b)));
        }
    }

    pub fn tool(&mut self, v: &ToolVerdict) {
        self.rate("decision_accuracy", Some(v.called == v.needs_call));
        self.rate("correct_tool", v.name_correct);
        self.rate("call_executes", v.executes);
        self.rate("schema_valid_call", v.schema_valid);
        self.rate("called_when_needed", v.needs_call.then_some(v.called));
        self.rate("no_call_when_not_needed", (!v.needs_call).then_some(!v.called));
        self.rate("args_exact_match", v.args_exact);
        self.rate("json_validity", v.json_valid);
        self.rate("final_answer_presence", v.final_answer);
        self.rate("exact_match", Some(v.exact));
        self.args.0 += v.args_matched;
        self.args.1 += v.args_predicted;
        self.args.2 += v.args_gold;
    }

    pub fn rouge(&mut self, f1: f64) {
        self.add("rouge_l", f1);
    }

    /// Adds an example's summed negative log-likelihood over `tokens` tokens.
    pub fn loss(&mut self, nll: f64, tokens: usize) {
        self.nll.0 += nll;
        self.nll.1 += tokens;
    }

    /// Adds another tally's counts.
    pub fn merge(&mut self, other: &Tally) {
        for (k, (s, n)) in &other.sums {
            let e = self.sums.entry(k).or_default();
            e.0 += s;
            e.1 += n;
        }
        self.args = (self.args.0 + other.args.0, self.args.1 + other.args.1, self.args.2 + other.args.2);
        self.nll = (self.nll.0 + other.nll.0, self.nll.1 + other.nll.1);
    }

    /// The metrics, by name (only those with a denominator).
    pub fn metrics(&self) -> BTreeMap<String, Metric> {
        let mut out: BTreeMap<String, Metric> =
            self.sums.iter().map(|(k, (s, n))| (k.to_string(), Metric { value: s / *n as f64, n: *n })).collect();
        let (m, p, g) = self.args;
        if g > 0 || p > 0 {
            let precision = if p > 0 { m as f64 / p as f64 } else { 0.0 };
            let recall = if g > 0 { m as f64 / g as f64 } else { 0.0 };
            let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            out.insert("arg_precision".into(), Metric { value: precision, n: p });
            out.insert("arg_recall".into(), Metric { value: recall, n: g });
            out.insert("arg_f1".into(), Metric { value: f1, n: g });
        }
        if self.nll.1 > 0 {
            let loss = self.nll.0 / self.nll.1 as f64;
            out.insert("loss".into(), Metric { value: loss, n: self.nll.1 });
            out.insert("perplexity".into(), Metric { value: loss.exp(), n: self.nll.1 });
        }
        out
    }
}

/// Metric names in report order, with their labels; rates print as %.
pub const METRICS: &[(&str, &str, bool)] = &[
    ("decision_accuracy", "decision: call iff needed", true),
    ("correct_tool", "correct tool", true),
    ("call_executes", "call executes (published \"success\")", true),
    ("schema_valid_call", "schema-valid call", true),
    ("called_when_needed", "call made when needed", true),
    ("no_call_when_not_needed", "no call when none needed", true),
    ("args_exact_match", "arguments exact match", true),
    ("arg_precision", "argument precision", true),
    ("arg_recall", "argument recall", true),
    ("arg_f1", "argument F1", true),
    ("json_validity", "valid call JSON", true),
    ("final_answer_presence", "final answer present", true),
    ("exact_match", "full-call exact match", true),
    ("rouge_l", "ROUGE-L F1", false),
    ("loss", "eval loss (assistant tokens)", false),
    ("perplexity", "perplexity", false),
];

/// A Markdown table: one row per metric, one column per model.
pub fn markdown_table(columns: &[(&str, &BTreeMap<String, Metric>)]) -> String {
    let mut s = String::from("| metric |");
    for (name, _) in columns {
        s += &format!(" {name} |");
    }
    s += "\n|---|";
    s += &"---:|".repeat(columns.len());
    s += "\n";
    for (key, label, pct) in METRICS {
        if columns.iter().all(|(_, m)| !m.contains_key(*key)) {
            continue;
        }
        s += &format!("| {label} |");
        for (_, m) in columns {
            s += &match m.get(*key) {
                Some(v) if *pct => format!(" {:.1} % (n={}) |", 100.0 * v.value, v.n),
                Some(v) => format!(" {:.4} |", v.value),
                None => " – |".into(),
            };
        }
        s += "\n";
    }
    s
}

/// The same table as aligned text for a terminal: one row per metric, one
/// column per model, percentages without their counts.
pub fn text_table(columns: &[(&str, &BTreeMap<String, Metric>)]) -> String {
    let rows: Vec<(&str, Vec<String>)> = METRICS
        .iter()
        .filter(|(key, _, _)| columns.iter().any(|(_, m)| m.contains_key(*key)))
        .map(|(key, label, pct)| {
            let cells = columns
                .iter()
                .map(|(_, m)| match m.get(*key) {
                    Some(v) if *pct => format!("{:.1} %", 100.0 * v.value),
                    Some(v) => format!("{:.4}", v.value),
                    None => "–".into(),
                })
                .collect();
            (*label, cells)
        })
        .collect();
    let label_w = rows.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0).max("metric".len());
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            rows.iter().map(|(_, c)| c[i].chars().count()).chain([name.chars().count()]).max().unwrap_or(0)
        })
        .collect();
    let line = |label: &str, cells: Vec<&str>| {
        let mut s = format!("{label:<label_w$}");
        for (c, w) in cells.iter().zip(&widths) {
            s += &format!("  {c:>w$}");
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line("metric", columns.iter().map(|(n, _)| *n).collect());
    for (label, cells) in &rows {
        out += &line(label, cells.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::toolcall::parse;

    fn gold(text: &str) -> Gold {
        Gold::new(text, None, None)
    }

    fn none() -> Catalogue {
        Catalogue::default()
    }

    #[test]
    fn scores_calls_field_by_field() {
        let gold = gold(r#"<tool_call>{"tool_name": "w", "args": {"city": "Paris", "unit": "c"}}</tool_call>"#);
        let exact = parse(r#"<tool_call>{"name": "w", "arguments": {"unit": "c", "city": "Paris"}}</tool_call>"#);
        let v = score_tool_call(&exact, "", &gold, &none(), None);
        assert!(v.exact && v.args_exact == Some(true) && v.name_correct == Some(true));
        assert_eq!((v.schema_valid, v.executes), (None, None), "no catalogue, no toolbox: no verdict on running");
        let half =
            parse(r#"<tool_call>{"name": "w", "arguments": {"city": "Paris", "unit": "f", "x": 1}}</tool_call>"#);
        let v = score_tool_call(&half, "", &gold, &none(), None);
        assert_eq!((v.args_matched, v.args_predicted, v.args_gold), (1, 3, 2));
        assert_eq!((v.name_correct, v.args_exact, v.exact), (Some(true), Some(false), false));
        let wrong = parse(r#"<tool_call>{"name": "v", "arguments": {"city": "Paris"}}</tool_call>"#);
        let v = score_tool_call(&wrong, "", &gold, &none(), None);
        assert_eq!((v.name_correct, v.args_matched), (Some(false), 0));
        let broken = parse("<tool_call>{\"name\": \"w\",</tool_call>");
        let v = score_tool_call(&broken, "", &gold, &none(), None);
        assert_eq!((v.called, v.json_valid, v.name_correct), (true, Some(false), Some(false)));
        let no_call = parse("<final_answer>no</final_answer>");
        let v = score_tool_call(&no_call, "<final_answer>no</final_answer>", &gold, &none(), None);
        assert_eq!((v.called, v.exact), (false, false));

        let mut t = Tally::default();
        for p in [&exact, &half] {
            t.tool(&score_tool_call(p, "", &gold, &none(), None));
        }
        let m = t.metrics();
        assert_eq!(m["called_when_needed"], Metric { value: 1.0, n: 2 });
        assert_eq!(m["exact_match"], Metric { value: 0.5, n: 2 });
        assert_eq!(m["arg_precision"].value, 3.0 / 5.0);
        assert_eq!(m["arg_recall"].value, 3.0 / 4.0);
    }

    #[test]
    fn published_metrics_on_hand_made_predictions() {
        let toolbox = Toolbox::builtin("tool-use-finetuning").unwrap();
        // The dataset's catalogue: the union of its rows' <tools> blocks.
        let mut catalogue = Catalogue::default();
        catalogue.add_text(
            r#"<tools>[{"tool_name": "get_weather", "input_args": {"city": "string - City."}},
                       {"tool_name": "convert_bases", "input_args": {"number": "string - N.", "to_base": "integer - B."}}]</tools>"#,
        );
        let weather = gold(r#"<tool_call>{"tool_name": "get_weather", "args": {"city": "Paris"}}</tool_call>"#);
        let bases =
            gold(r#"<tool_call>{"tool_name": "convert_bases", "args": {"number": "ff", "to_base": 2}}</tool_call>"#);
        let chat = gold("<final_answer>Hello!</final_answer>");
        // A trace that calls a tool although the dataset labels the query as
        // needing none (`tool_needed = false`): the label decides.
        let labelled =
            Gold::new(r#"<tool_call>{"tool_name": "web_search", "args": {}}</tool_call>"#, None, Some(false));
        let rows: Vec<(&str, &Gold)> = vec![
            // 1. right tool, runs.
            (r#"<tool_call>{"tool_name": "get_weather", "args": {"city": "Tokyo"}}</tool_call>"#, &weather),
            // 2. a tool outside the catalogue: the decision is right, the call cannot run.
            (r#"<tool_call>{"tool_name": "search", "args": {"q": "Paris weather"}}</tool_call>"#, &weather),
            // 3. right tool, required argument missing.
            (r#"<tool_call>{"tool_name": "convert_bases", "args": {"number": "ff"}}</tool_call>"#, &bases),
            // 4. wrong tool, schema-valid, but it does not run: no city "ff".
            (r#"<tool_call>{"tool_name": "get_weather", "args": {"city": "ff"}}</tool_call>"#, &bases),
            // 5. no call where one is needed.
            ("<final_answer>I cannot check.</final_answer>", &weather),
            // 6. a no-tool row answered without a call.
            ("<final_answer>Hi!</final_answer>", &chat),
            // 7. a no-tool row answered with a call.
            (r#"<tool_call>{"tool_name": "get_weather", "args": {"city": "x"}}</tool_call>"#, &chat),
            // 8. labelled no-tool, answered directly: right, whatever the trace did.
            ("<final_answer>Sure.</final_answer>", &labelled),
        ];
        let mut t = Tally::default();
        let mut verdicts = Vec::new();
        for (text, g) in &rows {
            let v = score_tool_call(&parse(text), text, g, &catalogue, Some(&toolbox));
            t.tool(&v);
            verdicts.push(v);
        }
        assert_eq!(verdicts[1].schema_error.as_deref(), Some("search: no tool `search` in the catalogue"));
        assert_eq!(verdicts[1].results, vec![Err("no tool `search`".to_string())]);
        assert_eq!(verdicts[2].schema_error.as_deref(), Some("convert_bases: required argument `to_base` missing"));
        assert_eq!(
            (verdicts[3].name_correct, verdicts[3].schema_valid, verdicts[3].executes),
            (Some(false), Some(true), Some(false)),
            "schema-valid is not executing"
        );
        assert_eq!(
            verdicts[0].results,
            vec![Ok("{'temperature': 68, 'condition': 'Sunny', 'humidity': 70}".to_string())]
        );
        assert_eq!(
            (verdicts[4].called, verdicts[4].schema_valid, verdicts[4].executes),
            (false, Some(false), Some(false))
        );
        assert!(verdicts[5].exact && verdicts[7].exact && !verdicts[6].exact);
        let m = t.metrics();
        // Decisions: rows 1-4 call (needed), 5 does not (needed), 6 and 8
        // do not (not needed), 7 calls (not needed): 6 of 8.
        assert_eq!(m["decision_accuracy"], Metric { value: 6.0 / 8.0, n: 8 });
        // Tool-needed rows 1-5: correct tool in 1 and 3, schema-valid in 1 and 4.
        assert_eq!(m["correct_tool"], Metric { value: 2.0 / 5.0, n: 5 });
        assert_eq!(m["schema_valid_call"], Metric { value: 2.0 / 5.0, n: 5 });
        // Only row 1's call executes.
        assert_eq!(m["call_executes"], Metric { value: 1.0 / 5.0, n: 5 });
        assert_eq!(m["called_when_needed"], Metric { value: 4.0 / 5.0, n: 5 });
        assert_eq!(m["no_call_when_not_needed"], Metric { value: 2.0 / 3.0, n: 3 });
    }

    #[test]
    fn no_call_rows_need_a_final_answer_and_no_call() {
        let gold_text = "<final_answer>\nHello\n</final_answer>";
        let gold = gold(gold_text);
        let ok = "<final_answer>\nHi there\n</final_answer>";
        let v = score_tool_call(&parse(ok), ok, &gold, &none(), None);
        assert!(v.exact && v.final_answer == Some(true) && !v.needs_call);
        let bad = "<tool_call>{\"name\": \"x\", \"arguments\": {}}</tool_call>";
        let v = score_tool_call(&parse(bad), bad, &gold, &none(), None);
        assert!(!v.exact && v.called && v.final_answer == Some(false));
    }

    #[test]
    fn rouge_l_on_words_and_cjk_characters() {
        assert_eq!(rouge_l("the cat sat", "the cat sat"), 1.0);
        assert_eq!(rouge_l("", "x"), 0.0);
        // LCS "the sat" = 2 of 3 and 2 of 4.
        let f = rouge_l("the cat sat", "the dog really sat");
        assert!((f - 2.0 * (2.0 / 3.0) * 0.5 / (2.0 / 3.0 + 0.5)).abs() < 1e-12);
        // 白点病 shares 3 of 4 characters with 白点病症.
        let f = rouge_l("白点病", "白点病症");
        assert!((f - 2.0 * 1.0 * 0.75 / 1.75).abs() < 1e-12);
    }
}
