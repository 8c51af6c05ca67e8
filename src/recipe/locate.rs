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
pub fn toml_error(e: &toml::de::Error, source: &str, file: &Path) -> RecipeError {
    let message = e.message().trim().to_string();
    let mut err = RecipeError::new(message.clone()).in_file(file);
    let mut offset = e.span().map(|s| s.start);

    if let Some((word, expected)) = parse_unknown(&message, "unknown field `") {
        // Serde reports the table, not the key: find the key inside it.
        if let Some(span) = e.span().and_then(|s| find_key_within(source, &word, s)) {
            offset = Some(span.start);
        }
        err.key = Some(word.clone());
        err.message = format!("unknown key `{word}`");
        err.help = Some(
            match did_you_mean(&word, expected.iter().map(|s| s.as_str())) {
                Some(s) => format!(
                    "did you mean `{s}`? (valid keys here: {})",
                    expected.join(", ")
                ),
                None => format!("valid keys here: {}", expected.join(", ")),
            },
        );
    } else if let Some((word, expected)) = parse_unknown(&message, "unknown variant `") {
        if let Some(span) = e.span().and_then(|s| find_value_within(source, &word, s)) {
            offset = Some(span.start);
        }
        err.help = Some(
            match did_you_mean(&word, expected.iter().map(|s| s.as_str())) {
                Some(s) => format!("did you mean `{s}`? (one of: {})", expected.join(", ")),
                None => format!("use one of: {}", expected.join(", ")),
            },
        );
    } else if message.starts_with("missing field `kind`") {
        err.help = Some(format!(
            "every stage needs a `kind`: one of {}",
            super::KINDS.join(", ")
        ));
    }
    if let Some(off) = offset {
        if !source.is_empty() {
            err.location = Some(Location::from_offset(file, source, off));
        }
    }
    err
}

/// Parses serde's "unknown field `x`, expected one of `a`, `b`" messages.
fn parse_unknown(message: &str, prefix: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix(prefix)?;
    let (word, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.to_string())
        .collect();
    Some((word.to_string(), expected))
}

/// The span of a key named `word` whose position lies inside `within`.
fn find_key_within(source: &str, word: &str, within: Range<usize>) -> Option<Range<usize>> {
    let doc = DeTable::parse(source).ok()?;
    let mut found = None;
    walk(doc.get_ref(), &mut |k, _| {
        let s = k.span();
        if found.is_none()
            && k.get_ref().as_ref() == word
            && s.start >= within.start
            && s.end <= within.end.max(s.end)
            && s.start <= within.end
        {
            found = Some(s);
        }
    });
    found
}

/// The span of a string value equal to `word` inside `within`.
fn find_value_within(source: &str, word: &str, within: Range<usize>) -> Option<Range<usize>> {
    let doc = DeTable::parse(source).ok()?;
    let mut found = None;
    walk(doc.get_ref(), &mut |_, v| {
        let s = v.span();
        if found.is_none()
            && v.get_ref().as_str() == Some(word)
            && s.start >= within.start
            && s.start <= within.end
        {
            found = Some(s);
        }
    });
    found
}

fn walk<'a>(
    table: &'a DeTable<'a>,
    f: &mut dyn FnMut(&'a Spanned<toml::de::DeString<'a>>, &'a Spanned<DeValue<'a>>),
) {
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
