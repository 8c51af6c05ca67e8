//! Constrained decoding of tool calls: inside a `<tool_call>` block the
//! model may only write a JSON object naming a tool of the [`Catalogue`]
//! (`"tool_name"`/`"name"`), with arguments (`"args"`/`"arguments"`) among
//! that tool's, each value of its declared JSON type, every required one
//! present before the object closes. Outside a block the text is free, so
//! the model still decides whether to call at all.
//!
//! [`CallGrammar::allows`] checks whether a text is a prefix of such an
//! answer; decoding ([`crate::generate`]) takes, at each step, the most
//! likely token whose text keeps it so. [`CallGrammar::after`] reads the
//! open block once per step, so that each candidate costs only its own few
//! characters (a step may try the whole vocabulary).

use crate::catalogue::{Catalogue, JsonType};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const NAME_KEYS: [&str; 2] = ["tool_name", "name"];
const ARGS_KEYS: [&str; 2] = ["args", "arguments"];

/// The grammar of calls to the tools of one catalogue.
#[derive(Debug, Clone)]
pub struct CallGrammar {
    catalogue: Catalogue,
}

impl CallGrammar {
    /// Bumped whenever what the grammar allows changes (it is part of the
    /// cache key of a constrained evaluation). 2: JSON escapes only, at most
    /// one line break and 16 blanks between tokens, numbers of 24 characters.
    /// 3: a block that decoding had to leave the grammar in is finished
    /// unconstrained. 4: no backslash in keys; only JSON's whitespace
    /// between tokens. 5: no dead ends (a key, or a comma, only while an
    /// unused key remains; no backslash in a tool name; numbers as JSON
    /// writes them). 6: a conversation that lists its tools (a request's
    /// `tools`) is decoded under those tools alone, as servers do.
    pub const VERSION: u32 = 6;

    pub fn new(catalogue: Catalogue) -> CallGrammar {
        CallGrammar { catalogue }
    }

    /// Whether `text` (an answer so far) can still become a valid answer.
    pub fn allows(&self, text: &str) -> bool {
        let Some(i) = text.rfind(OPEN) else { return true };
        let body = &text[i + OPEN.len()..];
        if body.contains(CLOSE) {
            return true;
        }
        Parser::new(self).feed(body)
    }

    /// For trying many continuations of one answer: reads the answer's open
    /// block once, then each continuation's text alone (what `allows` on
    /// the whole answer plus the continuation says, without parsing the
    /// block again per candidate).
    pub fn after(&self, answer: &str) -> Continuations<'_> {
        let open = answer.rfind(OPEN).map(|i| &answer[i + OPEN.len()..]).filter(|body| !body.contains(CLOSE));
        let state = match open {
            None => State::Free,
            Some(body) => {
                let mut p = Parser::new(self);
                if p.feed(body) { State::Open(p) } else { State::Broken }
            }
        };
        Continuations { g: self, answer: answer.to_string(), state }
    }
}

/// The continuations of one answer; see [`CallGrammar::after`].
pub struct Continuations<'g> {
    g: &'g CallGrammar,
    answer: String,
    state: State<'g>,
}

enum State<'g> {
    /// No block is open.
    Free,
    /// A block is open and valid so far: its parser.
    Open(Parser<'g>),
    /// A block is open that cannot become valid any more (decoding had to
    /// leave the grammar).
    Broken,
}

impl Continuations<'_> {
    /// A `<tool_call>` block is open (the answer may not end here).
    pub fn in_call(&self) -> bool {
        !matches!(self.state, State::Free)
    }

    /// The open block can no longer become a valid call.
    pub fn broken(&self) -> bool {
        matches!(self.state, State::Broken)
    }

    /// Whether the answer followed by `added` can still become valid.
    pub fn allows(&self, added: &str) -> bool {
        match &self.state {
            // Without a `<`, `added` neither opens another block nor starts
            // the closing tag: the parser goes on from where the answer left it.
            State::Open(p) if !added.contains('<') => p.clone().feed(added),
            _ => self.g.allows(&format!("{}{added}", self.answer)),
        }
    }
}

/// What an object is, for the rules on its keys and values.
#[derive(Debug, Clone, PartialEq)]
enum Role {
    /// The call itself: a name and arguments.
    Call { name: Option<String> },
    /// The arguments of the named tool (`None`: not named yet).
    Args { tool: Option<String> },
    /// Anything nested in an argument's value.
    Free,
}

#[derive(Debug, Clone, PartialEq)]
enum Obj {
    /// After `{` or `,`: a key (or `}` right after `{`).
    Key {
        first: bool,
    },
    /// Inside a key string.
    InKey(String),
    Colon(String),
    /// Before a value of `key`.
    Value(String),
    /// After a value: `,` or `}`.
    Next,
}

#[derive(Debug, Clone, PartialEq)]
enum Arr {
    Value { first: bool },
    Next,
}

#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    /// A string (its content so far, after an escape?) for a value that
    /// must be a tool name when `names` is set.
    Str {
        content: String,
        escape: bool,
        tool_name: bool,
    },
    Number {
        integer: bool,
        text: String,
    },
    Literal(&'static str, usize),
}

#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Object { role: Role, keys: Vec<String>, state: Obj },
    Array(Arr),
    Scalar(Scalar),
}

/// Whitespace as JSON has it between tokens (not Unicode's other spaces).
fn json_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Whether `text` is a JSON number (`Some(true)`), the start of one
/// (`Some(false)`: `-`, `1.`, `2e+`), or neither (`None`: `01`, `1.e`).
fn json_number(text: &str) -> Option<bool> {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    // The integer part: 0, or digits not starting with 0.
    let int_start = i;
    let n = digits(&mut i);
    if n == 0 {
        return (i == b.len()).then_some(false);
    }
    if n > 1 && b[int_start] == b'0' {
        return None;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if digits(&mut i) == 0 {
            return (i == b.len()).then_some(false);
        }
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        i += 1;
        if i < b.len() && matches!(b[i], b'+' | b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return (i == b.len()).then_some(false);
        }
    }
    (i == b.len()).then_some(true)
}

/// Limits that JSON does not have but decoding needs: a model held back
/// from closing an object would otherwise pad it with whitespace forever,
/// or write a number without end.
const MAX_BLANK_RUN: usize = 16;
const MAX_NUMBER_LEN: usize = 24;

#[derive(Clone)]
struct Parser<'g> {
    g: &'g CallGrammar,
    stack: Vec<Frame>,
    /// The top-level object has closed.
    done: bool,
    /// What follows the closed object (only whitespace, then the start of
    /// the closing tag).
    tail: String,
    /// The top-level object has opened.
    started: bool,
    /// Blanks and line breaks in the current run between tokens.
    blanks: usize,
    newlines: usize,
}

impl<'g> Parser<'g> {
    fn new(g: &'g CallGrammar) -> Self {
        Parser { g, stack: Vec::new(), done: false, tail: String::new(), started: false, blanks: 0, newlines: 0 }
    }

    /// Reads more of the block; false as soon as it cannot become valid.
    fn feed(&mut self, body: &str) -> bool {
        for c in body.chars() {
            // Between tokens (not inside a string): at most one line break
            // and a little indentation at a time.
            let in_text = matches!(
                self.stack.last(),
                Some(Frame::Scalar(Scalar::Str { .. })) | Some(Frame::Object { state: Obj::InKey(..), .. })
            );
            if json_space(c) && !in_text {
                self.blanks += 1;
                self.newlines += usize::from(c == '\n');
                if self.blanks > MAX_BLANK_RUN || self.newlines > 1 {
                    return false;
                }
            } else {
                (self.blanks, self.newlines) = (0, 0);
            }
            if self.done {
                self.tail.push(c);
                let t = self.tail.trim_start();
                if t == CLOSE {
                    // The block has closed: what follows is free text.
                    return true;
                }
                if !CLOSE.starts_with(t) {
                    return false;
                }
                continue;
            }
            if !self.started {
                if json_space(c) {
                    continue;
                }
                if c != '{' {
                    return false;
                }
                self.started = true;
                self.stack.push(Frame::Object {
                    role: Role::Call { name: None },
                    keys: Vec::new(),
                    state: Obj::Key { first: true },
                });
                continue;
            }
            if !self.char(c) {
                return false;
            }
        }
        true
    }

    /// Whether `key` (`complete`, or the start of one) may follow in an
    /// object with `role` that has `keys`: a name the role allows that it
    /// does not have yet. `key_ok(role, keys, "", false)` says whether any
    /// key may follow at all: a key, or the comma before one, is only
    /// written while one remains, so that decoding never reaches a point
    /// from which no text is valid.
    fn key_ok(&self, role: &Role, keys: &[String], key: &str, complete: bool) -> bool {
        let fits = |cands: &mut dyn Iterator<Item = &str>| {
            for k in cands.filter(|k| !keys.iter().any(|have| have == k)) {
                if if complete { k == key } else { k.starts_with(key) } {
                    return true;
                }
            }
            false
        };
        match role {
            Role::Call { .. } => {
                let has_name = keys.iter().any(|k| NAME_KEYS.contains(&k.as_str()));
                let has_args = keys.iter().any(|k| ARGS_KEYS.contains(&k.as_str()));
                let mut c =
                    NAME_KEYS.iter().filter(|_| !has_name).chain(ARGS_KEYS.iter().filter(|_| !has_args)).copied();
                fits(&mut c)
            }
            Role::Args { tool: Some(t) } => match self.g.catalogue.tools.get(t) {
                Some(tool) => fits(&mut tool.arguments.keys().map(String::as_str)),
                None => true,
            },
            Role::Args { tool: None } | Role::Free => !complete || !keys.iter().any(|k| k == key),
        }
    }

    /// Whether an object with `role` and `keys` may close now.
    fn close_ok(&self, role: &Role, keys: &[String]) -> bool {
        match role {
            Role::Call { .. } => keys.iter().any(|k| NAME_KEYS.contains(&k.as_str())),
            Role::Args { tool: Some(t) } => self
                .g
                .catalogue
                .tools
                .get(t)
                .is_none_or(|tool| tool.arguments.iter().filter(|(_, a)| a.required).all(|(n, _)| keys.contains(n))),
            _ => true,
        }
    }

    /// The declared type of the value of `key` in an object with `role`.
    fn value_type(&self, role: &Role, key: &str) -> Option<JsonType> {
        match role {
            Role::Call { .. } if NAME_KEYS.contains(&key) => Some(JsonType::String),
            Role::Call { .. } => Some(JsonType::Object),
            Role::Args { tool: Some(t) } => self.g.catalogue.tools.get(t)?.arguments.get(key)?.kind,
            _ => None,
        }
    }

    /// Starts a value with `c`; `expected` its type if declared, `role` of
    /// an object value, `tool_name` whether it names the tool.
    fn start_value(&mut self, c: char, expected: Option<JsonType>, role: Role, tool_name: bool) -> bool {
        if json_space(c) {
            return true;
        }
        let kind = match c {
            '"' => JsonType::String,
            '{' => JsonType::Object,
            '[' => JsonType::Array,
            't' | 'f' => JsonType::Boolean,
            '-' | '0'..='9' => JsonType::Number,
            'n' => {
                // null only where no type is declared.
                if expected.is_some() {
                    return false;
                }
                self.stack.push(Frame::Scalar(Scalar::Literal("null", 1)));
                return true;
            }
            _ => return false,
        };
        let ok = match expected {
            None => true,
            Some(JsonType::Integer) => kind == JsonType::Number,
            Some(e) => e == kind,
        };
        if !ok {
            return false;
        }
        let frame = match c {
            '"' => Frame::Scalar(Scalar::Str { content: String::new(), escape: false, tool_name }),
            '{' => Frame::Object { role, keys: Vec::new(), state: Obj::Key { first: true } },
            '[' => Frame::Array(Arr::Value { first: true }),
            't' => Frame::Scalar(Scalar::Literal("true", 1)),
            'f' => Frame::Scalar(Scalar::Literal("false", 1)),
            _ => Frame::Scalar(Scalar::Number { integer: expected == Some(JsonType::Integer), text: c.to_string() }),
        };
        self.stack.push(frame);
        true
    }

    /// A value just ended: the enclosing frame moves on.
    fn value_done(&mut self) {
        match self.stack.last_mut() {
            None => self.done = true,
            Some(Frame::Object { state, .. }) => *state = Obj::Next,
            Some(Frame::Array(a)) => *a = Arr::Next,
            Some(Frame::Scalar(_)) => unreachable!("scalars hold no values"),
        }
    }

    fn char(&mut self, c: char) -> bool {
        let Some(top) = self.stack.last().cloned() else { return false };
        match top {
            Frame::Scalar(s) => self.scalar(s, c),
            Frame::Array(a) => match a {
                Arr::Value { first } => {
                    if c == ']' && first {
                        self.stack.pop();
                        self.value_done();
                        return true;
                    }
                    if json_space(c) {
                        return true;
                    }
                    if let Some(Frame::Array(a)) = self.stack.last_mut() {
                        *a = Arr::Next;
                    }
                    self.start_value(c, None, Role::Free, false)
                }
                Arr::Next => match c {
                    ',' => {
                        *self.stack.last_mut().unwrap() = Frame::Array(Arr::Value { first: false });
                        true
                    }
                    ']' => {
                        self.stack.pop();
                        self.value_done();
                        true
                    }
                    c => json_space(c),
                },
            },
            Frame::Object { role, keys, state } => self.object(role, keys, state, c),
        }
    }

    fn set_state(&mut self, s: Obj) {
        if let Some(Frame::Object { state, .. }) = self.stack.last_mut() {
            *state = s;
        }
    }

    fn object(&mut self, role: Role, keys: Vec<String>, state: Obj, c: char) -> bool {
        match state {
            Obj::Key { first } => match c {
                '"' => {
                    if !self.key_ok(&role, &keys, "", false) {
                        return false;
                    }
                    self.set_state(Obj::InKey(String::new()));
                    true
                }
                '}' if first => self.close_object(&role, &keys),
                c => json_space(c),
            },
            Obj::InKey(mut key) => {
                match c {
                    // Keys are argument names: no escapes in them.
                    '\\' => false,
                    '"' => {
                        if !self.key_ok(&role, &keys, &key, true) {
                            return false;
                        }
                        self.set_state(Obj::Colon(key));
                        true
                    }
                    c => {
                        key.push(c);
                        if !self.key_ok(&role, &keys, &key, false) {
                            return false;
                        }
                        self.set_state(Obj::InKey(key));
                        true
                    }
                }
            }
            Obj::Colon(key) => match c {
                ':' => {
                    self.set_state(Obj::Value(key));
                    true
                }
                c => json_space(c),
            },
            Obj::Value(key) => {
                if json_space(c) {
                    return true;
                }
                let expected = self.value_type(&role, &key);
                let child_role = match &role {
                    Role::Call { name } if ARGS_KEYS.contains(&key.as_str()) => Role::Args { tool: name.clone() },
                    _ => Role::Free,
                };
                let tool_name = matches!(role, Role::Call { .. }) && NAME_KEYS.contains(&key.as_str());
                if let Some(Frame::Object { keys, state, .. }) = self.stack.last_mut() {
                    keys.push(key);
                    *state = Obj::Next;
                }
                self.start_value(c, expected, child_role, tool_name)
            }
            Obj::Next => match c {
                ',' => {
                    if !self.key_ok(&role, &keys, "", false) {
                        return false;
                    }
                    self.set_state(Obj::Key { first: false });
                    true
                }
                '}' => self.close_object(&role, &keys),
                c => json_space(c),
            },
        }
    }

    /// `}`: closes the object on top if its rules allow it now.
    fn close_object(&mut self, role: &Role, keys: &[String]) -> bool {
        if !self.close_ok(role, keys) {
            return false;
        }
        self.stack.pop();
        self.value_done();
        true
    }

    fn scalar(&mut self, s: Scalar, c: char) -> bool {
        match s {
            Scalar::Str { mut content, escape, tool_name } => {
                if escape {
                    // JSON's escapes only; `\u` takes four hex digits.
                    if !"\"\\/bfnrtu".contains(c) {
                        return false;
                    }
                    content.push('\\');
                    content.push(c);
                    *self.stack.last_mut().unwrap() = Frame::Scalar(Scalar::Str { content, escape: false, tool_name });
                    return true;
                }
                if let Some(i) = content.rfind("\\u") {
                    let hex = &content[i + 2..];
                    if hex.len() < 4 && !content[..i].ends_with('\\') {
                        if !c.is_ascii_hexdigit() {
                            return false;
                        }
                        content.push(c);
                        *self.stack.last_mut().unwrap() =
                            Frame::Scalar(Scalar::Str { content, escape: false, tool_name });
                        return true;
                    }
                }
                match c {
                    // Tool names are plain: no escapes in them.
                    '\\' if tool_name => false,
                    '\\' => {
                        *self.stack.last_mut().unwrap() =
                            Frame::Scalar(Scalar::Str { content, escape: true, tool_name });
                        true
                    }
                    '"' => {
                        if tool_name && !self.g.catalogue.tools.contains_key(&content) {
                            return false;
                        }
                        self.stack.pop();
                        if tool_name {
                            self.name_tool(&content);
                        }
                        self.value_done();
                        true
                    }
                    c => {
                        content.push(c);
                        if tool_name && !self.g.catalogue.tools.keys().any(|n| n.starts_with(&content)) {
                            return false;
                        }
                        *self.stack.last_mut().unwrap() =
                            Frame::Scalar(Scalar::Str { content, escape: false, tool_name });
                        true
                    }
                }
            }
            Scalar::Number { integer, mut text } => {
                let part = c.is_ascii_digit() || (!integer && matches!(c, '.' | 'e' | 'E' | '+' | '-'));
                if part {
                    if text.len() >= MAX_NUMBER_LEN && json_number(&text) == Some(true) {
                        return false;
                    }
                    text.push(c);
                    if json_number(&text).is_none() {
                        return false;
                    }
                    *self.stack.last_mut().unwrap() = Frame::Scalar(Scalar::Number { integer, text });
                    return true;
                }
                if json_number(&text) != Some(true) {
                    return false;
                }
                // The number ended: the character belongs to the enclosing frame.
                self.stack.pop();
                self.value_done();
                self.char(c)
            }
            Scalar::Literal(word, n) => {
                if word[n..].starts_with(c) {
                    if n + 1 == word.len() {
                        self.stack.pop();
                        self.value_done();
                    } else {
                        *self.stack.last_mut().unwrap() = Frame::Scalar(Scalar::Literal(word, n + 1));
                    }
                    true
                } else {
                    false
                }
            }
        }
    }

    /// The call object now names `tool`: its arguments object (if already
    /// open, it cannot be: frames above are closed) takes its rules from it.
    fn name_tool(&mut self, tool: &str) {
        if let Some(Frame::Object { role: Role::Call { name }, .. }) = self.stack.last_mut() {
            *name = Some(tool.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammar() -> CallGrammar {
        let mut c = Catalogue::default();
        c.add_text(
            r#"<tools>[{"tool_name": "get_weather", "input_args": {"city": "string - City."}},
                      {"tool_name": "convert_bases", "input_args": {"number": "string - N.", "to_base": "integer - B."}},
                      {"tool_name": "get_time", "input_args": {}},
                      {"tool_name": "get_ratio", "input_args": {"x": "number - X.", "y": "number - Y."}}]</tools>"#,
        );
        CallGrammar::new(c)
    }

    /// Reading the answer once and each continuation alone says what
    /// reading the whole text says, at every split and for every length of
    /// continuation, on valid and invalid answers, within and across tags.
    #[test]
    fn continuations_agree_with_reading_the_whole_text() {
        let g = grammar();
        let answers = [
            "I will check.\n<tool_call>\n{\n  \"tool_name\": \"convert_bases\",\n  \"args\": {\"number\": \"ff\", \"to_base\": 2}\n}\n</tool_call> done <tool_call>{\"name\": \"get_weather\"",
            "<tool_call>{\"tool_name\": \"get_weather\", \"args\": {\"city\": 12}}</tool_call>",
            "<tool_call>{\"tool_name\": \"search\"}</tool_call><final_answer>x</final_answer>",
            "<tool_call>  {\"tool_name\": \"get_weather\", \"args\": {\"city\": \"a\\\"b\"}}   \n </tool_call>",
        ];
        let mut checked = 0;
        for answer in answers {
            let bounds: Vec<usize> = (0..=answer.len()).filter(|&i| answer.is_char_boundary(i)).collect();
            for &i in &bounds {
                let c = g.after(&answer[..i]);
                for &j in bounds.iter().filter(|&&j| j >= i && j <= i + 24) {
                    assert_eq!(
                        c.allows(&answer[i..j]),
                        g.allows(&answer[..j]),
                        "{:?} + {:?}",
                        &answer[..i],
                        &answer[i..j]
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 4000, "{checked}");
    }

    /// What a model wrote when it wanted a key it already had, or padded a
    /// call: a backslash in a key, carriage-return runs, a no-break space.
    #[test]
    fn keys_have_no_escapes_and_only_json_whitespace_separates_tokens() {
        let g = grammar();
        let w = "<tool_call>{\"tool_name\": \"get_weather\", \"args\": {";
        assert!(g.allows(&format!("{w}\"cit")));
        assert!(!g.allows(&format!("{w}\"cit\\")));
        assert!(g.allows(&format!("{w}\r\n  \"city\"")));
        assert!(!g.allows(&format!("{w}\r\n\r\n\"city\"")), "two line breaks in a row");
        assert!(!g.allows(&format!("{w}\u{a0}\"city\"")), "not JSON whitespace");
        assert!(g.allows(&format!("{w}\"city\": \"a\u{a0}b\"")), "inside a string it is text");
    }

    /// Wherever the grammar lets an answer go it lets it go on: seeded
    /// random walks over the characters it allows (structural ones
    /// favoured, so that walks write many keys, commas and numbers) never
    /// reach a text that no character continues before the block closes.
    /// (Decoding from such a text used to leave the grammar: a comma after
    /// a tool's last argument, then `"cittad"`; a backslash in a tool name,
    /// then `\u00b1`.)
    #[test]
    fn every_text_the_grammar_allows_can_be_continued() {
        let g = grammar();
        let alphabet: Vec<char> = (' '..='~').chain(['\n', '\t', '\r', 'é', '±', '\u{a0}']).collect();
        let structural = "\"{}[],:-.e0123456789tfn<";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut closed, mut steps) = (0, 0);
        for _ in 0..400 {
            let mut text = String::from("<tool_call>");
            for _ in 0..300 {
                let after = g.after(&text);
                let options: Vec<char> = alphabet.iter().copied().filter(|c| after.allows(&c.to_string())).collect();
                assert!(!options.is_empty(), "no character continues {text:?}");
                let favoured: Vec<char> = options.iter().copied().filter(|c| structural.contains(*c)).collect();
                let pool = if !favoured.is_empty() && next(4) > 0 { &favoured } else { &options };
                text.push(pool[next(pool.len())]);
                steps += 1;
                if !g.after(&text).in_call() {
                    closed += 1;
                    break;
                }
            }
        }
        assert!(closed > 40 && steps > 20_000, "the walks closed {closed} blocks in {steps} steps");
    }

    /// What decoding wrote where grammar v4 had let it into a dead end.
    #[test]
    fn no_key_or_comma_without_a_key_left_and_no_escape_in_tool_names() {
        let g = grammar();
        let call = |s: &str| format!("<tool_call>{s}");
        let w = r#"{"tool_name": "get_weather", "args": {"city": "new york""#;
        assert!(g.allows(&call(&format!("{w}}}"))));
        assert!(!g.allows(&call(&format!("{w},"))), "get_weather has no argument left");
        assert!(!g.allows(&call(&format!("{w}, \"cit"))), "a key once");
        assert!(!g.allows(&call(r#"{"tool_name": "get_time", "args": {""#)), "get_time has no arguments");
        assert!(g.allows(&call(r#"{"tool_name": "get_time", "args": {}}"#)));
        assert!(!g.allows(&call(r#"{"tool_name": "get_time", "args": {}, "#)), "name and arguments are there");
        assert!(!g.allows(&call(r#"{"tool_name": "get_w\"#)));
        let r = r#"{"tool_name": "get_ratio", "args": {"x": "#;
        for ok in ["0", "-1.5e+3", "2E7", "0.25"] {
            assert!(g.allows(&call(&format!("{r}{ok}, \"y\": 1}}"))), "{ok}");
        }
        for bad in ["01", "1.e", "-.5", "1e", "1.", "--1", "1e5.2"] {
            assert!(!g.allows(&call(&format!("{r}{bad}, \"y\": 1}}"))), "{bad}");
        }
    }

    #[test]
    fn free_text_and_closed_calls_are_allowed() {
        let g = grammar();
        assert!(g.allows("<final_answer>Hello</final_answer>"));
        assert!(g.allows("<tool_call>{\"tool_name\": \"get_weather\", \"args\": {\"city\": \"Paris\"}}</tool_call>"));
    }

    #[test]
    fn valid_call_prefixes_are_allowed() {
        let g = grammar();
        let full = "<tool_call>\n{\n  \"tool_name\": \"convert_bases\",\n  \"args\": {\n    \"number\": \"ff\",\n    \"to_base\": 2\n  }\n}\n</tool_call>";
        for end in 0..=full.len() {
            if full.is_char_boundary(end) {
                assert!(g.allows(&full[..end]), "prefix {:?}", &full[..end]);
            }
        }
    }

    #[test]
    fn what_cannot_run_is_refused_as_it_is_written() {
        let g = grammar();
        let call = |s: &str| format!("<tool_call>{s}");
        // An unknown tool, as soon as its name leaves every catalogue name.
        assert!(g.allows(&call(r#"{"tool_name": "get_w"#)));
        assert!(!g.allows(&call(r#"{"tool_name": "search"#)));
        assert!(!g.allows(&call(r#"{"tool_name": "get_weather_now"#)));
        // An unknown argument, a value of the wrong type, a missing required one.
        let w = r#"{"tool_name": "get_weather", "args": {"#;
        assert!(g.allows(&call(&format!("{w}\"ci"))));
        assert!(!g.allows(&call(&format!("{w}\"when"))));
        assert!(!g.allows(&call(&format!("{w}\"city\": 3"))));
        assert!(!g.allows(&call(&format!("{w}}}"))));
        let b = r#"{"tool_name": "convert_bases", "args": {"number": "ff", "to_base": "#;
        assert!(g.allows(&call(&format!("{b}16}}"))));
        assert!(!g.allows(&call(&format!("{b}1.5"))));
        assert!(!g.allows(&call(&format!("{b}\"16\""))));
        // Broken JSON and text after the object.
        assert!(!g.allows(&call(r#"{"tool_name" "get"#)));
        assert!(!g.allows(&call(r#"{"tool_name": "get_weather"}} x"#)));
        assert!(g.allows(&call("{\"tool_name\": \"get_weather\", \"args\": {\"city\": \"x\"}}\n</tool_")));
        // The call needs a name; a key appears once.
        assert!(!g.allows(&call(r#"{"args": {}}"#)));
        assert!(!g.allows(&call(r#"{"tool_name": "get_weather", "tool_name"#)));
        assert!(!g.allows(&call("x")));
    }

    #[test]
    fn no_endless_padding_numbers_or_broken_escapes() {
        let g = grammar();
        let w = "<tool_call>{\"tool_name\": \"get_weather\", \"args\": {\"city\": \"";
        assert!(g.allows(&format!("{w}a\\nb\\u00e9\"")));
        assert!(!g.allows(&format!("{w}\\-")));
        assert!(!g.allows(&format!("{w}\\u00g")));
        // Inside a string, whitespace is text.
        assert!(g.allows(&format!("{w}{}", " ".repeat(40))));
        let open = "<tool_call>{\"tool_name\": \"get_weather\", \"args\": {\"city\": \"x\"";
        assert!(g.allows(&format!("{open}\n    ")));
        assert!(!g.allows(&format!("{open}\n  \n  ")));
        assert!(!g.allows(&format!("{open}{}", " ".repeat(17))));
        let b = "<tool_call>{\"tool_name\": \"convert_bases\", \"args\": {\"number\": \"1\", \"to_base\": ";
        assert!(g.allows(&format!("{b}{}", "1".repeat(24))));
        assert!(!g.allows(&format!("{b}{}", "1".repeat(25))));
    }
}
