//! The subset of Python expressions that tool-use datasets pass as
//! arguments: a `calculator`'s arithmetic (`(104.5 + 17) * 3`) and a
//! `filter_list` condition on `x` (`x % 2 != 0 and x > 10`).
//!
//! Numbers (ints and floats with Python's `/`, `//`, `%`, `**`), strings,
//! `True`/`False`/`None`, lists, comparisons (chained, `in`, `not in`),
//! `and`/`or`/`not`, and a few built-ins (`abs`, `len`, `min`, `max`,
//! `round`, `int`, `float`, `str`) and string methods (`lower`, `upper`,
//! `startswith`, `endswith`, `isdigit`). Anything else — another function
//! (`isinstance`), an attribute, a name other than the bound ones — is an
//! error, as is what Python itself rejects (`'a' > 10`, a division by zero).

use serde_json::{Number, Value};

/// A Python value.
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Py>),
}

impl Py {
    /// A JSON value as Python sees it after `json.loads`.
    pub fn from_json(v: &Value) -> Result<Py, String> {
        Ok(match v {
            Value::Null => Py::None,
            Value::Bool(b) => Py::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Py::Int(i),
                None => Py::Float(n.as_f64().ok_or("number out of range")?),
            },
            Value::String(s) => Py::Str(s.clone()),
            Value::Array(a) => Py::List(a.iter().map(Py::from_json).collect::<Result<_, _>>()?),
            Value::Object(_) => return Err("dict values are not supported".into()),
        })
    }

    /// The value as JSON (floats stay floats: `35.0`).
    pub fn to_json(&self) -> Value {
        match self {
            Py::None => Value::Null,
            Py::Bool(b) => Value::Bool(*b),
            Py::Int(i) => Value::from(*i),
            Py::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Py::Str(s) => Value::String(s.clone()),
            Py::List(l) => Value::Array(l.iter().map(Py::to_json).collect()),
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Py::None => "NoneType",
            Py::Bool(_) => "bool",
            Py::Int(_) => "int",
            Py::Float(_) => "float",
            Py::Str(_) => "str",
            Py::List(_) => "list",
        }
    }

    /// Python's truth value.
    pub fn truthy(&self) -> bool {
        match self {
            Py::None => false,
            Py::Bool(b) => *b,
            Py::Int(i) => *i != 0,
            Py::Float(f) => *f != 0.0,
            Py::Str(s) => !s.is_empty(),
            Py::List(l) => !l.is_empty(),
        }
    }

    /// As a number (bools are ints in Python).
    fn num(&self) -> Option<Num> {
        match self {
            Py::Bool(b) => Some(Num::I(i64::from(*b))),
            Py::Int(i) => Some(Num::I(*i)),
            Py::Float(f) => Some(Num::F(*f)),
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Num {
    I(i64),
    F(f64),
}

impl Num {
    fn f(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::F(f) => f,
        }
    }
}

/// Evaluates `source` with the names in `vars` bound.
pub fn eval(source: &str, vars: &[(&str, &Py)]) -> Result<Py, String> {
    let tokens = lex(source)?;
    let mut p = Parser { tokens, pos: 0, vars };
    let v = p.or_expr()?;
    match p.tokens.get(p.pos) {
        None => Ok(v),
        Some(t) => Err(format!("invalid syntax at {t:?}")),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(Py),
    Str(String),
    Name(String),
    Op(&'static str),
}

const OPS: &[&str] =
    &["**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "<", ">", "(", ")", "[", "]", ",", "."];

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_') {
                // An exponent's sign belongs to the number.
                if matches!(chars[i], 'e' | 'E') && matches!(chars.get(i + 1), Some('+' | '-')) {
                    i += 1;
                }
                i += 1;
            }
            let text: String = chars[start..i].iter().filter(|c| **c != '_').collect();
            let n = match text.parse::<i64>() {
                Ok(n) => Py::Int(n),
                Err(_) => Py::Float(text.parse::<f64>().map_err(|_| format!("invalid number `{text}`"))?),
            };
            out.push(Tok::Num(n));
        } else if c == '\'' || c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err("unterminated string".into()),
                    Some(q) if *q == c => break,
                    Some('\\') => {
                        s.push(*chars.get(i + 1).ok_or("unterminated string")?);
                        i += 2;
                    }
                    Some(ch) => {
                        s.push(*ch);
                        i += 1;
                    }
                }
            }
            i += 1;
            out.push(Tok::Str(s));
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Name(chars[start..i].iter().collect()));
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let op = OPS.iter().find(|op| rest.starts_with(**op)).ok_or_else(|| format!("invalid character `{c}`"))?;
            i += op.chars().count();
            out.push(Tok::Op(op));
        }
    }
    Ok(out)
}

struct Parser<'a> {
    tokens: Vec<Tok>,
    pos: usize,
    vars: &'a [(&'a str, &'a Py)],
}

impl Parser<'_> {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some(Tok::Op(o)) if *o == op)
    }

    fn peek_name(&self, name: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some(Tok::Name(n)) if n == name)
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        if self.peek_op(op) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("invalid syntax: expected `{op}`"))
        }
    }

    fn or_expr(&mut self) -> Result<Py, String> {
        let mut v = self.and_expr()?;
        while self.peek_name("or") {
            self.pos += 1;
            let rhs = self.and_expr()?;
            if !v.truthy() {
                v = rhs;
            }
        }
        Ok(v)
    }

    fn and_expr(&mut self) -> Result<Py, String> {
        let mut v = self.not_expr()?;
        while self.peek_name("and") {
            self.pos += 1;
            let rhs = self.not_expr()?;
            if v.truthy() {
                v = rhs;
            }
        }
        Ok(v)
    }

    fn not_expr(&mut self) -> Result<Py, String> {
        if self.peek_name("not") {
            self.pos += 1;
            return Ok(Py::Bool(!self.not_expr()?.truthy()));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Py, String> {
        let mut left = self.arith()?;
        let mut result = None;
        loop {
            let op = match self.tokens.get(self.pos) {
                Some(Tok::Op(o @ ("<" | "<=" | ">" | ">=" | "==" | "!="))) => *o,
                Some(Tok::Name(n)) if n == "in" => "in",
                Some(Tok::Name(n))
                    if n == "not" && matches!(self.tokens.get(self.pos + 1), Some(Tok::Name(m)) if m == "in") =>
                {
                    self.pos += 1;
                    "not in"
                }
                _ => break,
            };
            self.pos += 1;
            let right = self.arith()?;
            let ok = compare(op, &left, &right)?;
            result = Some(result.unwrap_or(true) && ok);
            left = right;
        }
        Ok(result.map_or(left, Py::Bool))
    }

    fn arith(&mut self) -> Result<Py, String> {
        let mut v = self.term()?;
        while let Some(op) = ["+", "-"].into_iter().find(|o| self.peek_op(o)) {
            self.pos += 1;
            let rhs = self.term()?;
            v = binary(op, &v, &rhs)?;
        }
        Ok(v)
    }

    fn term(&mut self) -> Result<Py, String> {
        let mut v = self.factor()?;
        while let Some(op) = ["*", "/", "//", "%"].into_iter().find(|o| self.peek_op(o)) {
            self.pos += 1;
            let rhs = self.factor()?;
            v = binary(op, &v, &rhs)?;
        }
        Ok(v)
    }

    fn factor(&mut self) -> Result<Py, String> {
        if let Some(op) = ["+", "-"].into_iter().find(|o| self.peek_op(o)) {
            self.pos += 1;
            let v = self.factor()?;
            return match (op, v.num()) {
                ("+", Some(_)) => Ok(v),
                (_, Some(Num::I(i))) => i.checked_neg().map(Py::Int).ok_or_else(|| "integer overflow".into()),
                (_, Some(Num::F(f))) => Ok(Py::Float(-f)),
                _ => Err(format!("bad operand type for unary {op}: '{}'", v.type_name())),
            };
        }
        self.power()
    }

    fn power(&mut self) -> Result<Py, String> {
        let base = self.postfix()?;
        if self.peek_op("**") {
            self.pos += 1;
            let exp = self.factor()?;
            return binary("**", &base, &exp);
        }
        Ok(base)
    }

    /// An atom followed by method calls (`x.lower()`) and subscripts (`x[0]`).
    fn postfix(&mut self) -> Result<Py, String> {
        let mut v = self.atom()?;
        loop {
            if self.peek_op(".") {
                self.pos += 1;
                let Some(Tok::Name(method)) = self.tokens.get(self.pos).cloned() else {
                    return Err("invalid syntax after `.`".into());
                };
                self.pos += 1;
                let args = self.call_args()?;
                v = method_call(&v, &method, &args)?;
            } else if self.peek_op("[") {
                self.pos += 1;
                let index = self.or_expr()?;
                self.expect("]")?;
                v = subscript(&v, &index)?;
            } else {
                return Ok(v);
            }
        }
    }

    fn call_args(&mut self) -> Result<Vec<Py>, String> {
        self.expect("(")?;
        let mut args = Vec::new();
        while !self.peek_op(")") {
            args.push(self.or_expr()?);
            if !self.peek_op(")") {
                self.expect(",")?;
            }
        }
        self.pos += 1;
        Ok(args)
    }

    fn atom(&mut self) -> Result<Py, String> {
        let tok = self.tokens.get(self.pos).cloned().ok_or("unexpected end of expression")?;
        self.pos += 1;
        match tok {
            Tok::Num(n) => Ok(n),
            Tok::Str(s) => Ok(Py::Str(s)),
            Tok::Op("(") => {
                let v = self.or_expr()?;
                self.expect(")")?;
                Ok(v)
            }
            Tok::Op("[") => {
                let mut items = Vec::new();
                while !self.peek_op("]") {
                    items.push(self.or_expr()?);
                    if !self.peek_op("]") {
                        self.expect(",")?;
                    }
                }
                self.pos += 1;
                Ok(Py::List(items))
            }
            Tok::Name(name) => match name.as_str() {
                "True" => Ok(Py::Bool(true)),
                "False" => Ok(Py::Bool(false)),
                "None" => Ok(Py::None),
                _ if self.peek_op("(") => {
                    let args = self.call_args()?;
                    builtin(&name, &args)
                }
                _ => self
                    .vars
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).clone())
                    .ok_or_else(|| format!("name '{name}' is not defined")),
            },
            Tok::Op(op) => Err(format!("invalid syntax at `{op}`")),
        }
    }
}

fn unsupported(op: &str, a: &Py, b: &Py) -> String {
    format!("unsupported operand type(s) for {op}: '{}' and '{}'", a.type_name(), b.type_name())
}

fn binary(op: &str, a: &Py, b: &Py) -> Result<Py, String> {
    match (a, b, op) {
        (Py::Str(x), Py::Str(y), "+") => return Ok(Py::Str(format!("{x}{y}"))),
        (Py::List(x), Py::List(y), "+") => return Ok(Py::List(x.iter().chain(y).cloned().collect())),
        _ => {}
    }
    let (Some(x), Some(y)) = (a.num(), b.num()) else { return Err(unsupported(op, a, b)) };
    let overflow = || "integer overflow".to_string();
    let zero = |y: Num| y.f() == 0.0;
    Ok(match (op, x, y) {
        ("/", _, y) if zero(y) => return Err("division by zero".into()),
        ("//" | "%", _, y) if zero(y) => return Err("integer division or modulo by zero".into()),
        ("+", Num::I(x), Num::I(y)) => Py::Int(x.checked_add(y).ok_or_else(overflow)?),
        ("-", Num::I(x), Num::I(y)) => Py::Int(x.checked_sub(y).ok_or_else(overflow)?),
        ("*", Num::I(x), Num::I(y)) => Py::Int(x.checked_mul(y).ok_or_else(overflow)?),
        ("//", Num::I(x), Num::I(y)) => Py::Int(x.div_euclid(y) - i64::from(y < 0 && x.rem_euclid(y) != 0)),
        ("%", Num::I(x), Num::I(y)) => Py::Int(x - y * (x.div_euclid(y) - i64::from(y < 0 && x.rem_euclid(y) != 0))),
        ("**", Num::I(x), Num::I(y)) if y >= 0 => {
            Py::Int(x.checked_pow(u32::try_from(y).map_err(|_| overflow())?).ok_or_else(overflow)?)
        }
        ("+", x, y) => Py::Float(x.f() + y.f()),
        ("-", x, y) => Py::Float(x.f() - y.f()),
        ("*", x, y) => Py::Float(x.f() * y.f()),
        ("/", x, y) => Py::Float(x.f() / y.f()),
        ("//", x, y) => Py::Float((x.f() / y.f()).floor()),
        ("%", x, y) => Py::Float(x.f() - y.f() * (x.f() / y.f()).floor()),
        ("**", x, y) => Py::Float(x.f().powf(y.f())),
        _ => return Err(unsupported(op, a, b)),
    })
}

/// Python's comparison `a OP b` (`<`, `<=`, `>`, `>=`, `==`, `!=`, `in`,
/// `not in`), or the `TypeError` it raises.
pub fn compare(op: &str, a: &Py, b: &Py) -> Result<bool, String> {
    use std::cmp::Ordering;
    if op == "in" || op == "not in" {
        let found = match b {
            Py::List(items) => items.iter().any(|i| equal(i, a)),
            Py::Str(s) => match a {
                Py::Str(sub) => s.contains(sub.as_str()),
                _ => return Err(format!("'in <string>' requires string as left operand, not {}", a.type_name())),
            },
            _ => return Err(format!("argument of type '{}' is not iterable", b.type_name())),
        };
        return Ok(found == (op == "in"));
    }
    if op == "==" || op == "!=" {
        return Ok(equal(a, b) == (op == "=="));
    }
    let ord = match (a, b) {
        (Py::Str(x), Py::Str(y)) => x.cmp(y),
        _ => match (a.num(), b.num()) {
            (Some(Num::I(x)), Some(Num::I(y))) => x.cmp(&y),
            (Some(x), Some(y)) => x.f().partial_cmp(&y.f()).unwrap_or(Ordering::Equal),
            _ => {
                return Err(format!(
                    "'{op}' not supported between instances of '{}' and '{}'",
                    a.type_name(),
                    b.type_name()
                ));
            }
        },
    };
    Ok(match op {
        "<" => ord.is_lt(),
        "<=" => ord.is_le(),
        ">" => ord.is_gt(),
        _ => ord.is_ge(),
    })
}

fn equal(a: &Py, b: &Py) -> bool {
    match (a.num(), b.num()) {
        (Some(x), Some(y)) => x.f() == y.f(),
        _ => a == b,
    }
}

fn subscript(v: &Py, index: &Py) -> Result<Py, String> {
    let Py::Int(i) = index else { return Err(format!("indices must be integers, not {}", index.type_name())) };
    let items: Vec<Py> = match v {
        Py::List(l) => l.clone(),
        Py::Str(s) => s.chars().map(|c| Py::Str(c.to_string())).collect(),
        _ => return Err(format!("'{}' object is not subscriptable", v.type_name())),
    };
    let n = items.len() as i64;
    let at = if *i < 0 { n + i } else { *i };
    usize::try_from(at).ok().and_then(|at| items.get(at).cloned()).ok_or_else(|| "index out of range".into())
}

fn builtin(name: &str, args: &[Py]) -> Result<Py, String> {
    let one = || match args {
        [a] => Ok(a),
        _ => Err(format!("{name}() takes exactly one argument ({} given)", args.len())),
    };
    match name {
        "abs" => match one()?.num() {
            Some(Num::I(i)) => Ok(Py::Int(i.abs())),
            Some(Num::F(f)) => Ok(Py::Float(f.abs())),
            None => Err(format!("bad operand type for abs(): '{}'", one()?.type_name())),
        },
        "len" => match one()? {
            Py::Str(s) => Ok(Py::Int(s.chars().count() as i64)),
            Py::List(l) => Ok(Py::Int(l.len() as i64)),
            other => Err(format!("object of type '{}' has no len()", other.type_name())),
        },
        "int" => match one()? {
            Py::Str(s) => s.trim().parse::<i64>().map(Py::Int).map_err(|_| format!("invalid literal for int(): '{s}'")),
            v => match v.num() {
                Some(Num::I(i)) => Ok(Py::Int(i)),
                Some(Num::F(f)) if f.is_finite() => Ok(Py::Int(f.trunc() as i64)),
                _ => Err(format!("int() argument must be a string or a number, not '{}'", v.type_name())),
            },
        },
        "float" => match one()? {
            Py::Str(s) => {
                s.trim().parse::<f64>().map(Py::Float).map_err(|_| format!("could not convert string to float: '{s}'"))
            }
            v => v
                .num()
                .map(|n| Py::Float(n.f()))
                .ok_or_else(|| format!("float() argument must be a number, not '{}'", v.type_name())),
        },
        "str" => Ok(Py::Str(match one()? {
            Py::Str(s) => s.clone(),
            v => super::py_repr(&v.to_json()),
        })),
        "round" => match args {
            [v] => {
                v.num().map(|n| Py::Int(round_half_even(n.f()) as i64)).ok_or_else(|| "round() needs a number".into())
            }
            [v, Py::Int(d)] => {
                let x = v.num().ok_or("round() needs a number")?.f();
                let scale = 10f64.powi(*d as i32);
                Ok(Py::Float(round_half_even(x * scale) / scale))
            }
            _ => Err("round() takes 1 or 2 arguments".into()),
        },
        "min" | "max" => {
            let items = match args {
                [Py::List(l)] => l.clone(),
                [_] | [] => return Err(format!("{name}() needs an iterable or several arguments")),
                many => many.to_vec(),
            };
            let mut best = items.first().cloned().ok_or_else(|| format!("{name}() arg is an empty sequence"))?;
            for item in &items[1..] {
                let better = compare(if name == "min" { "<" } else { ">" }, item, &best)?;
                if better {
                    best = item.clone();
                }
            }
            Ok(best)
        }
        other => Err(format!("name '{other}' is not supported in this expression")),
    }
}

fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 { 2.0 * (x / 2.0).round() } else { r }
}

fn method_call(v: &Py, method: &str, args: &[Py]) -> Result<Py, String> {
    let Py::Str(s) = v else { return Err(format!("'{}' object has no attribute '{method}'", v.type_name())) };
    let arg = || match args {
        [Py::Str(a)] => Ok(a.as_str()),
        _ => Err(format!("{method}() takes one string argument")),
    };
    Ok(match method {
        "lower" => Py::Str(s.to_lowercase()),
        "upper" => Py::Str(s.to_uppercase()),
        "strip" => Py::Str(s.trim().to_string()),
        "isdigit" => Py::Bool(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
        "startswith" => Py::Bool(s.starts_with(arg()?)),
        "endswith" => Py::Bool(s.ends_with(arg()?)),
        _ => return Err(format!("'str' object has no attribute '{method}' here")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str) -> Result<Py, String> {
        eval(s, &[])
    }

    #[test]
    fn arithmetic_as_python() {
        assert_eq!(run("(104.5 + 17) * 3"), Ok(Py::Float(364.5)));
        assert_eq!(run("245 / 7"), Ok(Py::Float(35.0)));
        assert_eq!(run("37*5 + 116/2"), Ok(Py::Float(243.0)));
        assert_eq!(run("2 ** 10"), Ok(Py::Int(1024)));
        assert_eq!(run("2 ** -1"), Ok(Py::Float(0.5)));
        assert_eq!(run("-7 // 2"), Ok(Py::Int(-4)));
        assert_eq!(run("-7 % 3"), Ok(Py::Int(2)));
        assert_eq!(run("7 % -3"), Ok(Py::Int(-2)));
        assert_eq!(run("-2 ** 2"), Ok(Py::Int(-4)));
        assert_eq!(run("1e3 + .5"), Ok(Py::Float(1000.5)));
        assert_eq!(run("round(2.5) + round(3.5)"), Ok(Py::Int(6)));
        assert!(run("1 / 0").unwrap_err().contains("division by zero"));
        assert!(run("2 +").is_err());
        assert!(run("import os").is_err());
        assert!(run("__import__('os')").is_err());
    }

    #[test]
    fn conditions_on_x() {
        let x = Py::Int(7);
        assert_eq!(eval("x % 2 != 0 and x > 5", &[("x", &x)]), Ok(Py::Bool(true)));
        assert_eq!(eval("3 < x <= 7", &[("x", &x)]), Ok(Py::Bool(true)));
        assert_eq!(eval("x in [1, 7]", &[("x", &x)]), Ok(Py::Bool(true)));
        assert_eq!(eval("not x > 10", &[("x", &x)]), Ok(Py::Bool(true)));
        let s = Py::Str("Apple".into());
        assert_eq!(eval("x.lower().startswith('a') and len(x) == 5", &[("x", &s)]), Ok(Py::Bool(true)));
        // What Python rejects is an error here too.
        assert!(eval("x > 10", &[("x", &s)]).unwrap_err().contains("not supported between"));
        assert!(eval("isinstance(x, (int, float)) and x > 10", &[("x", &x)]).is_err());
        assert!(eval("y > 1", &[("x", &x)]).unwrap_err().contains("not defined"));
    }
}
