//! Dataset rows: reading them from files and the hub, writing them as jsonl.
//!
//! A row is a JSON object. Hub datasets (parquet) and local jsonl, json, csv
//! and parquet files all become the same thing, so every later stage reads
//! one format. Errors name the file and the line or row.

pub mod hub;

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use pipeline_fs::IoContext;
use serde_json::{Map, Value};

/// A data file that cannot be read as rows.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] pipeline_fs::Error),
    /// What is at `at` (a line, `line:column`, `row N`, `item N`; empty for
    /// the whole file) is not what the format or the caller expects.
    #[error("{}{}: {message}", path.display(), if at.is_empty() { String::new() } else { format!(":{at}") })]
    Malformed { path: std::path::PathBuf, at: String, message: String },
    #[error("{}: unsupported data file type `.{ext}`; use .jsonl, .json, .csv or .parquet", path.display())]
    Unsupported { path: std::path::PathBuf, ext: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A [`Error::Malformed`] for `path` at `at`.
fn malformed(path: &Path, at: impl ToString, message: impl ToString) -> Error {
    Error::Malformed { path: path.to_path_buf(), at: at.to_string(), message: message.to_string() }
}

/// One dataset row.
pub type Row = Map<String, Value>;

/// Reads every row of a data file, choosing the reader by extension.
pub fn read_file(path: &Path) -> Result<Vec<Row>> {
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "jsonl" | "ndjson" => read_jsonl(path),
        "json" => read_json(path),
        "csv" => read_csv(path),
        "parquet" => read_parquet(path),
        _ => Err(Error::Unsupported { path: path.to_path_buf(), ext }),
    }
}

/// Whether a path has a data file extension this module reads.
pub fn is_data_file(path: &str) -> bool {
    let lower = path.to_lowercase();
    [".jsonl", ".ndjson", ".json", ".csv", ".parquet"].iter().any(|e| lower.ends_with(e))
}

fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let f = std::fs::File::open(path).on("open", path)?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| malformed(path, i + 1, format!("cannot read line: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| malformed(path, i + 1, format!("not valid JSON; each line must be one JSON object: {e}")))?;
        match v {
            Value::Object(m) => rows.push(m),
            other => {
                return Err(malformed(path, i + 1, format!("expected a JSON object, found {}", type_name(&other))));
            }
        }
    }
    Ok(rows)
}

fn read_json(path: &Path) -> Result<Vec<Row>> {
    let bytes = std::fs::read(path).on("read", path)?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(path, format!("{}:{}", e.line(), e.column()), format!("not valid JSON: {e}")))?;
    let items = match v {
        Value::Array(items) => items,
        Value::Object(mut m) => match m.remove("data").or_else(|| m.remove("rows")) {
            Some(Value::Array(items)) => items,
            _ => return Err(malformed(path, "", "expected a JSON array of objects (or {\"data\": [...]})")),
        },
        other => {
            return Err(malformed(path, "", format!("expected a JSON array of objects, found {}", type_name(&other))));
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::Object(m) => Ok(m),
            other => Err(malformed(path, "", format!("item {i}: expected a JSON object, found {}", type_name(&other)))),
        })
        .collect()
}

fn read_csv(path: &Path) -> Result<Vec<Row>> {
    let f = std::fs::File::open(path).on("open", path)?;
    let mut reader = csv::Reader::from_reader(f);
    let headers =
        reader.headers().map_err(|e| malformed(path, "", format!("cannot read the header row: {e}")))?.clone();
    let mut rows = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| {
            let line = e.position().map_or(i + 2, |p| p.line() as usize);
            malformed(path, line, format!("malformed CSV row: {e}"))
        })?;
        let row: Row =
            headers.iter().zip(rec.iter()).map(|(h, v)| (h.to_string(), Value::String(v.to_string()))).collect();
        rows.push(row);
    }
    Ok(rows)
}

fn read_parquet(path: &Path) -> Result<Vec<Row>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).on("open", path)?;
    let unreadable =
        |e: parquet::errors::ParquetError| malformed(path, "", format!("not a readable parquet file: {e}"));
    let reader = SerializedFileReader::new(f).map_err(unreadable)?;
    let mut rows = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(unreadable)?.enumerate() {
        let row = row.map_err(|e| malformed(path, "", format!("row {i}: cannot decode: {e}")))?;
        match row.to_json_value() {
            Value::Object(m) => rows.push(m),
            _ => return Err(malformed(path, "", format!("row {i}: not a record"))),
        }
    }
    Ok(rows)
}

/// Writes rows as jsonl.
pub fn write_jsonl<T: serde::Serialize>(path: &Path, rows: impl IntoIterator<Item = T>) -> Result<usize> {
    let f = std::fs::File::create(path).on("create", path)?;
    let mut w = BufWriter::new(f);
    let mut n = 0;
    for row in rows {
        serde_json::to_writer(&mut w, &row).map_err(std::io::Error::from).on("write", path)?;
        w.write_all(b"\n").on("write", path)?;
        n += 1;
    }
    w.flush().on("write", path)?;
    Ok(n)
}

/// Reads a jsonl file of values of type `T` (artifacts written by stages).
pub fn read_jsonl_as<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let f = std::fs::File::open(path).on("open", path)?;
    BufReader::new(f)
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(i, l)| {
            let l = l.on("read", path)?;
            serde_json::from_str(&l).map_err(|e| malformed(path, i + 1, format!("unexpected content: {e}")))
        })
        .collect()
}

/// The split a data file belongs to, from Hugging Face naming conventions:
/// `data/train-00000-of-00001.parquet`, `validation.jsonl`, `test/0000.parquet`.
/// Files that name no known split belong to `train`.
pub fn split_of(rel_path: &str) -> String {
    const KNOWN: &[&str] = &["train", "validation", "valid", "val", "dev", "test", "eval", "evaluation"];
    let path = Path::new(rel_path);
    let stem = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = stem.split('.').next().unwrap_or_default();
    let head = stem.split(['-', '_']).next().unwrap_or_default();
    let canonical = |s: &str| match s {
        "valid" | "val" | "dev" => "validation".to_string(),
        "eval" | "evaluation" => "validation".to_string(),
        other => other.to_string(),
    };
    if KNOWN.contains(&head) {
        return canonical(head);
    }
    for dir in path.parent().into_iter().flat_map(|p| p.iter()).rev() {
        let d = dir.to_string_lossy();
        if KNOWN.contains(&d.as_ref()) {
            return canonical(&d);
        }
    }
    "train".to_string()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::split_of;

    #[test]
    fn splits_follow_hub_conventions() {
        assert_eq!(split_of("data/train-00000-of-00001.parquet"), "train");
        assert_eq!(split_of("data/validation-00000-of-00001.parquet"), "validation");
        assert_eq!(split_of("test/0000.parquet"), "test");
        assert_eq!(split_of("fish_qa.jsonl"), "train");
        assert_eq!(split_of("dev.csv"), "validation");
    }
}
