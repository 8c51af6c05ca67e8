//! Turning TOML errors and key paths into file:line:column locations.

use std::ops::Range;
use std::path::Path;

use serde_spanned::Spanned;
use toml::de::{DeTable, DeValue};

use crate::error::{Location, RecipeError, did_you_mean};

/// Finds the span of the value at `keys` (or of the deepest table on the
/// way, when the last keys are missing) and converts it to a location.
pub fn find(source: &str, file: &Path, keys: &[&str]) -> Option<Location> {
    let doc = DeTable::parse(source).ok()?;
    let mut table: &DeTable = doc.get_ref();
    let mut span: Option<Range<usize>> = None;
    for key in keys {
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *key) else {
            break;
        };
        span = Some(k.span());
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            _ => {
                span = Some(v.span());
                break;
            }
        }
    }
    span.map(|s| Location::from_offset(file, source, s.start))
}

/// Converts a toml/serde error into a [`RecipeError`] with the best location
/// we can find and a "did you mean" for unknown keys and kinds.
///
/// Serde reads a `[stages.NAME]` table through its `kind` tag, which loses
/// positions: an error inside one points at the table, not the key. So when
/// an error lands on a stage table, that table alone is read again with its
/// kind's parameter type, from a copy of the source where everything else is
/// blanked (offsets unchanged), which pins the error to the key.
pub fn toml_error(e: &toml::de::Error, source: &str, file: &Path) -> RecipeError {
    if let Some(precise) = e.span().and_then(|s| stage_error(source, file, s.start)) {
        return precise;
    }
    plain_toml_error(e, source, file)
}

fn plain_toml_error(e: &toml::de::Error, source: &str, file: &Path) -> RecipeError {
    let message = e.message().trim().to_string();
    let mut err = RecipeError::new(message.clone()).in_file(file);
    let mut offset = e.span().map(|s| s.start);

    if let Some((word, expected)) = parse_unknown(&message, "unknown field `") {
        err.key = Some(word.clone());
        err.message = format!("unknown key `{word}`");
        err.help = Some(match did_you_mean(&word, expected.iter().map(|s| s.as_str())) {
            Some(s) => format!("did you mean `{s}`? (valid keys here: {})", expected.join(", ")),
            None => format!("valid keys here: {}", expected.join(", ")),
        });
    } else if let Some((word, expected)) = parse_unknown(&message, "unknown variant `") {
        if let Some(span) = e.span().and_then(|s| find_value_within(source, &word, s)) {
            offset = Some(span.start);
        }
        err.help = Some(match did_you_mean(&word, expected.iter().map(|s| s.as_str())) {
            Some(s) => format!("did you mean `{s}`? (one of: {})", expected.join(", ")),
            None => format!("use one of: {}", expected.join(", ")),
        });
    } else if message.starts_with("missing field `kind`") {
        err.help = Some(format!("every stage needs a `kind`: one of {}", super::KINDS.join(", ")));
    }
    if let Some(off) = offset {
        if !source.is_empty() {
            err.location = Some(Location::from_offset(file, source, off));
            if err.key.is_none() {
                err.key = key_at(source, off);
            }
        }
    }
    err
}

/// The dotted path of the key whose key or value starts at `offset`.
fn key_at(source: &str, offset: usize) -> Option<String> {
    fn search(table: &DeTable, offset: usize, path: &mut Vec<String>) -> bool {
        for (k, v) in table.iter() {
            path.push(k.get_ref().to_string());
            if k.span().start == offset || v.span().start == offset {
                return true;
            }
            let found = match v.get_ref() {
                DeValue::Table(t) => search(t, offset, path),
                DeValue::Array(a) => a.iter().any(|item| match item.get_ref() {
                    DeValue::Table(t) => search(t, offset, path),
                    _ => false,
                }),
                _ => false,
            };
            if found {
                return true;
            }
            path.pop();
        }
        false
    }
    let doc = DeTable::parse(source).ok()?;
    let mut path = Vec::new();
    search(doc.get_ref(), offset, &mut path).then(|| path.join("."))
}

/// Re-reads the stage table the error at `offset` belongs to (see
/// [`toml_error`]). `None` when the error is not inside a stage table or the
/// table reads fine on its own.
fn stage_error(source: &str, file: &Path, offset: usize) -> Option<RecipeError> {
    let doc = DeTable::parse(source).ok()?;
    let (_, stages) = doc.get_ref().iter().find(|(k, _)| k.get_ref().as_ref() == "stages")?;
    let DeValue::Table(stages) = stages.get_ref() else {
        return None;
    };
    let (name, table) = stages.iter().find(|(k, v)| k.span().start == offset || v.span().start == offset)?;
    let name = name.get_ref().to_string();
    let DeValue::Table(table) = table.get_ref() else {
        return None;
    };
    let kind = table.iter().find(|(k, _)| k.get_ref().as_ref() == "kind")?.1.get_ref().as_str()?.to_string();

    // Keep the stage's header lines and its entries (but `kind`); blank the rest.
    let mut keep = vec![false; source.len()];
    let mut line_start = 0;
    for line in source.split_inclusive('\n') {
        let t = line.trim_start().trim_start_matches('[').trim_start();
        if line.trim_start().starts_with('[')
            && (t.starts_with(&format!("stages.{name}]")) || t.starts_with(&format!("stages.{name}.")))
        {
            keep[line_start..line_start + line.len()].iter_mut().for_each(|b| *b = true);
        }
        line_start += line.len();
    }
    fn mark(table: &DeTable, keep: &mut [bool], top: bool) {
        for (k, v) in table.iter() {
            if top && k.get_ref().as_ref() == "kind" {
                continue;
            }
            match v.get_ref() {
                DeValue::Table(t) if v.span().start < k.span().start || t.is_empty() => mark(t, keep, false),
                DeValue::Array(a)
                    if a.iter().all(|i| matches!(i.get_ref(), DeValue::Table(_)))
                        && !a.is_empty()
                        && a.iter()
                            .next()
                            .is_some_and(|i| i.span().start < k.span().start || i.span().start > k.span().end + 3) =>
                {
                    for item in a.iter() {
                        if let DeValue::Table(t) = item.get_ref() {
                            mark(t, keep, false);
                        }
                    }
                }
                _ => keep[k.span().start..v.span().end].iter_mut().for_each(|b| *b = true),
            }
        }
    }
    mark(table, &mut keep, true);
    // Same byte offsets: a blanked character becomes as many spaces as it had bytes.
    let mut blanked = String::with_capacity(source.len());
    for (i, c) in source.char_indices() {
        if keep[i] || c == '\n' {
            blanked.push(c);
        } else {
            blanked.extend(std::iter::repeat_n(' ', c.len_utf8()));
        }
    }
    let err = super::read_stage_params(&kind, &blanked)?;
    let mut e = plain_toml_error(&err, source, file);
    e.key = e.key.map(|k| if k.starts_with("stages.") { k } else { format!("stages.{name}.{k}") });
    Some(e)
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" messages.
fn parse_unknown(message: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(prefix)?;
    let (word, rest) = rest.split_once('`')?;
    let expected = rest.split('`').skip(1).step_by(2).map(|s| s.to_string()).collect();
    Some((word.to_string(), expected))
}

/// The span of a string value equal to `word` inside `within`.
fn find_value_within(source: &str, word: &str, within: Range<usize>) -> Option<Range<usize>> {
    let doc = DeTable::parse(source).ok()?;
    let mut found = None;
    walk(doc.get_ref(), &mut |_, v| {
        let s = v.span();
        if found.is_none() && v.get_ref().as_str() == Some(word) && s.start >= within.start && s.start <= within.end {
            found = Some(s);
        }
    });
    found
}

fn walk<'a>(table: &'a DeTable<'a>, f: &mut dyn FnMut(&'a Spanned<toml::de::DeString<'a>>, &'a Spanned<DeValue<'a>>)) {
    for (k, v) in table.iter() {
        f(k, v);
        match v.get_ref() {
            DeValue::Table(t) => walk(t, f),
            DeValue::Array(a) => {
                for item in a.iter() {
                    if let DeValue::Table(t) = item.get_ref() {
                        walk(t, f);
                    }
                }
            }
            _ => {}
        }
    }
}
