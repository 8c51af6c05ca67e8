//! `fetch-dataset`: read a dataset into normalized rows per split.
//!
//! Sources: `hf://datasets/OWNER/NAME[@REV]` (parquet files of the hub
//! repository, via hf-hub and its cache), or local `jsonl`, `json`, `csv`,
//! `parquet` files: one file, a directory, a glob, or an explicit
//! `files = { split = path }` table. Then, in order: rename columns, check
//! and select columns, keep rows by seeded rules, carve a validation split,
//! cap rows per split.
//!
//! Output: `rows/<split>.jsonl`, one JSON object per row.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use indexmap::IndexMap;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Env, Input, Rule, RunContext, Stage, StageKind};
use pipeline_data::{self as data, Row, hub};

/// Parameters of a `fetch-dataset` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// `hf://datasets/OWNER/NAME[@REVISION]`, or a local file, directory or
    /// glob (`data/*.jsonl`), relative to the recipe. Each file's split comes
    /// from its name (`train-00000-of-00001.parquet`, `validation.jsonl`);
    /// other names count as `train`.
    #[serde(default)]
    pub source: Option<String>,
    /// Local files by split, instead of `source`:
    /// `{ train = "data/train.jsonl", validation = "data/val.jsonl" }`.
    #[serde(default)]
    pub files: IndexMap<String, String>,
    /// Hub datasets with several configurations: read only files under this
    /// directory of the repository.
    #[serde(default)]
    pub config: Option<String>,
    /// Splits to keep (default: every split found).
    #[serde(default)]
    pub splits: Vec<String>,
    /// Column renames, `new = "old"`.
    #[serde(default)]
    pub rename: IndexMap<String, String>,
    /// Keep only these columns (after renaming); each must exist.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Row filters. When present, a row is kept if it matches some rule's
    /// `where` (the first that matches) and is among that rule's seeded
    /// `fraction` of matching rows.
    #[serde(default)]
    pub keep: Vec<KeepRule>,
    /// If there is no `validation` split, move this fraction of `train`
    /// (seeded shuffle) into one.
    #[serde(default)]
    pub validation_fraction: Option<f64>,
    /// At most this many rows per split (after filtering), in order.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One row-filter rule of `fetch-dataset`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepRule {
    /// Column = value conditions, all of which must hold (empty: every row).
    /// A value `{ contains = "TEXT" }` holds when a string in the column
    /// (at any depth of a list or struct) contains TEXT; `{ contains =
    /// "TEXT", role = "assistant" }` looks only at the content of a list's
    /// messages with that role. With `fraction = 0` such a rule drops rows,
    /// e.g. traces whose answer calls a tool.
    #[serde(rename = "where", default)]
    pub conditions: IndexMap<String, Value>,
    /// The share of matching rows to keep, chosen by a seeded shuffle.
    #[serde(default = "one")]
    pub fraction: f64,
    /// The splits the rule applies to (default: every split). Rules for
    /// `train` alone leave the evaluated splits whole; a split none of
    /// whose rules apply keeps every row.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub splits: Vec<String>,
}

fn one() -> f64 {
    1.0
}

impl Params {
    fn uses_seed(&self) -> bool {
        self.validation_fraction.is_some() || self.keep.iter().any(|r| r.fraction > 0.0 && r.fraction < 1.0)
    }

    /// The data files, each with its split and a stable label.
    fn resolve(&self, env: &Env) -> Result<Resolved> {
        let settings = &env.settings;
        let mut files = Vec::new();
        let mut revision = None;
        if let Some(source) = &self.source {
            if let Some(rest) = source.strip_prefix("hf://") {
                let repo = hub::HubRepo::parse_dataset(rest).with_context(|| format!("source = \"{source}\""))?;
                let config = self.config.clone();
                let wanted = |f: &str| {
                    data::is_data_file(f)
                        && f.ends_with(".parquet")
                        && config.as_ref().is_none_or(|c| f.starts_with(&format!("{c}/")))
                };
                let snapshot = hub::fetch_files(&repo, wanted, crate::report::draws_bars())
                    .with_context(|| format!("cannot fetch the dataset {source}"))?;
                if snapshot.files.is_empty() {
                    bail!(
                        "{source}: the repository has no parquet data files{}",
                        match &self.config {
                            Some(c) => format!(" under `{c}/`"),
                            None => String::new(),
                        }
                    );
                }
                for f in &snapshot.files {
                    files.push(DataFile { split: data::split_of(f), label: f.clone(), path: snapshot.dir.join(f) });
                }
                revision = Some(snapshot.revision);
            } else {
                let matched = expand_local(&settings.resolve_path(source))
                    .with_context(|| format!("{}: source = \"{source}\"", settings.path.display()))?;
                for (label, path) in matched {
                    files.push(DataFile { split: data::split_of(&label), label, path });
                }
            }
        } else {
            for (split, pattern) in &self.files {
                let matched = expand_local(&settings.resolve_path(pattern))
                    .with_context(|| format!("{}: files.{split} = \"{pattern}\"", settings.path.display()))?;
                for (label, path) in matched {
                    files.push(DataFile { split: split.clone(), label, path });
                }
            }
        }
        Ok(Resolved { files, revision })
    }
}

struct DataFile {
    split: String,
    /// Path relative to the source (never absolute: it enters the key).
    label: String,
    path: PathBuf,
}

struct Resolved {
    files: Vec<DataFile>,
    revision: Option<String>,
}

/// A file, a directory (its data files) or a glob → (label, path), sorted.
fn expand_local(path: &std::path::Path) -> Result<Vec<(String, PathBuf)>> {
    let s = path.to_string_lossy();
    let mut out = Vec::new();
    if s.contains(['*', '?', '[']) {
        for entry in glob::glob(&s).with_context(|| format!("invalid glob `{s}`"))? {
            let p = entry?;
            if p.is_file() {
                out.push((file_label(&p), p));
            }
        }
        if out.is_empty() {
            bail!("no file matches `{s}`");
        }
    } else if path.is_dir() {
        for rel in pipeline_cache::store::list_files(path)? {
            if data::is_data_file(&rel) {
                out.push((rel.clone(), path.join(&rel)));
            }
        }
        if out.is_empty() {
            bail!("the directory {} holds no .jsonl, .json, .csv or .parquet file", path.display());
        }
    } else if path.is_file() {
        out.push((file_label(path), path.to_path_buf()));
    } else {
        bail!("no such file or directory: {}", path.display());
    }
    out.sort();
    Ok(out)
}

fn file_label(p: &std::path::Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

impl StageKind for Params {
    fn hub_datasets(&self) -> Vec<String> {
        let id = self.source.as_deref().and_then(|s| s.strip_prefix("hf://datasets/"));
        id.map(|r| r.split('@').next().unwrap_or(r).split('/').take(2).collect::<Vec<_>>().join("/"))
            .into_iter()
            .collect()
    }

    fn inputs(&self) -> Vec<Input<'_>> {
        vec![]
    }

    /// Checks what serde cannot: (key, message, help).
    fn check(&self) -> Result<(), Rule> {
        match (&self.source, self.files.is_empty()) {
            (None, true) => {
                return Err((
                    "source",
                    "a fetch-dataset stage needs `source` or `files`".into(),
                    "e.g. source = \"hf://datasets/shawhin/tool-use-finetuning\" or source = \"data/train.jsonl\""
                        .into(),
                ));
            }
            (Some(_), false) => {
                return Err(("files", "give either `source` or `files`, not both".into(), String::new()));
            }
            _ => {}
        }
        for r in &self.keep {
            if !(0.0..=1.0).contains(&r.fraction) {
                return Err((
                    "keep",
                    format!("fraction {} is not in [0, 1]", r.fraction),
                    "0 drops the rows a rule matches, 1 keeps them all".into(),
                ));
            }
        }
        if let Some(f) = self.validation_fraction {
            if !(f > 0.0 && f < 1.0) {
                return Err(("validation_fraction", format!("{f} is not in (0, 1)"), String::new()));
            }
        }
        if self.limit == Some(0) {
            return Err(("limit", "limit must be at least 1".into(), String::new()));
        }
        Ok(())
    }
}

impl Stage for Params {
    fn version(&self) -> u32 {
        1
    }

    fn params(&self, env: &Env) -> Value {
        let mut v = serde_json::to_value(self).expect("params serialize");
        if self.uses_seed() {
            v["seed"] = env.settings.seed.into();
        }
        v
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        let resolved = self.resolve(env)?;
        let mut out = BTreeMap::new();
        if let Some(rev) = &resolved.revision {
            out.insert("hub revision".to_string(), rev.clone());
        }
        for f in &resolved.files {
            out.insert(format!("data file {} ({})", f.label, f.split), env.hash_file(&f.path)?);
        }
        Ok(out)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let resolved = self.resolve(ctx.env)?;
        let mut splits: BTreeMap<String, Vec<Row>> = BTreeMap::new();
        let pb = crate::report::bar(resolved.files.len() as u64, "files");
        for f in &resolved.files {
            let rows = data::read_file(&f.path)?;
            tracing::debug!(file = %f.label, rows = rows.len(), "read");
            let rows = self.shape_rows(rows, f)?;
            splits.entry(f.split.clone()).or_default().extend(rows);
            pb.inc(1);
        }
        pb.finish();
        let source_rows: BTreeMap<String, usize> = splits.iter().map(|(s, r)| (s.clone(), r.len())).collect();

        let seed = ctx.env.settings.seed;
        for (split, rows) in splits.iter_mut() {
            *rows = self.apply_keep(std::mem::take(rows), seed, split)?;
        }
        if let Some(frac) = self.validation_fraction {
            if !splits.contains_key("validation") {
                let train = splits.remove("train").context("validation_fraction needs a `train` split")?;
                let (train, val) = carve(train, frac, seed);
                splits.insert("train".into(), train);
                splits.insert("validation".into(), val);
            }
        }
        if !self.splits.is_empty() {
            for s in &self.splits {
                if !splits.contains_key(s) {
                    bail!(
                        "split `{s}` (from `splits`) is not in the dataset; found: {}",
                        splits.keys().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
            }
            splits.retain(|s, _| self.splits.contains(s));
        }

        let dir = ctx.out.join("rows");
        std::fs::create_dir_all(&dir)?;
        let mut metrics = serde_json::Map::new();
        for (split, rows) in &mut splits {
            if let Some(limit) = self.limit {
                rows.truncate(limit);
            }
            if rows.is_empty() {
                bail!("split `{split}` has no rows left after filtering; loosen `keep` or check the source");
            }
            data::write_jsonl(&dir.join(format!("{split}.jsonl")), rows.iter())?;
            metrics.insert(
                split.clone(),
                serde_json::json!({"rows": rows.len(), "source_rows": source_rows.get(split).copied().unwrap_or(0)}),
            );
        }
        let columns: Vec<String> = splits
            .values()
            .flat_map(|r| r.first())
            .flat_map(|r| r.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok(serde_json::json!({"splits": metrics, "columns": columns, "revision": resolved.revision}))
    }
}

impl Params {
    /// Renames and selects columns, naming the file and row on error.
    fn shape_rows(&self, rows: Vec<Row>, f: &DataFile) -> Result<Vec<Row>> {
        let mut out = Vec::with_capacity(rows.len());
        for (i, mut row) in rows.into_iter().enumerate() {
            for (new, old) in &self.rename {
                let v = row.remove(old).with_context(|| {
                    format!("{}: row {i} has no column `{old}` (from rename.{new}); columns: {}", f.label, cols(&row))
                })?;
                row.insert(new.clone(), v);
            }
            if !self.columns.is_empty() {
                let mut kept = Row::new();
                for c in &self.columns {
                    let v = row.get(c).cloned().with_context(|| {
                        format!(
                            "{}: row {i} has no column `{c}` (named in `columns`); columns: {}",
                            f.label,
                            cols(&row)
                        )
                    })?;
                    kept.insert(c.clone(), v);
                }
                row = kept;
            }
            out.push(row);
        }
        Ok(out)
    }

    /// Applies the `keep` rules: each row goes to the first rule it matches;
    /// each rule keeps a seeded `fraction` of its rows; order is preserved.
    fn apply_keep(&self, rows: Vec<Row>, seed: u64, split: &str) -> Result<Vec<Row>> {
        let applies = |rule: &KeepRule| rule.splits.is_empty() || rule.splits.iter().any(|s| s == split);
        if !self.keep.iter().any(applies) {
            return Ok(rows);
        }
        let mut by_rule: Vec<Vec<usize>> = vec![Vec::new(); self.keep.len()];
        for (i, row) in rows.iter().enumerate() {
            for (r, rule) in self.keep.iter().enumerate().filter(|(_, rule)| applies(rule)) {
                if rule_matches(rule, row).with_context(|| format!("split `{split}`, row {i}: keep[{r}]"))? {
                    by_rule[r].push(i);
                    break;
                }
            }
        }
        let mut kept = vec![false; rows.len()];
        for (r, (rule, mut idx)) in self.keep.iter().zip(by_rule).enumerate() {
            let n = (rule.fraction * idx.len() as f64).round() as usize;
            if n < idx.len() {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ stable_hash(&format!("{split}/{r}")));
                idx.shuffle(&mut rng);
                idx.truncate(n);
            }
            for i in idx {
                kept[i] = true;
            }
        }
        Ok(rows.into_iter().zip(kept).filter_map(|(r, k)| k.then_some(r)).collect())
    }
}

fn rule_matches(rule: &KeepRule, row: &Row) -> Result<bool> {
    for (col, want) in &rule.conditions {
        let got = row.get(col).with_context(|| format!("no column `{col}` (columns: {})", cols(row)))?;
        if let Some(test) = contains_condition(want) {
            if !test.holds(got).with_context(|| format!("column `{col}`"))? {
                return Ok(false);
            }
            continue;
        }
        let equal = got == want
            || match (got, want) {
                (Value::String(s), w) if !w.is_string() => *s == w.to_string(),
                (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                _ => false,
            };
        if !equal {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A `{ contains = "TEXT" }` condition, optionally `role = "assistant"`:
/// some string in the column (or, with `role`, in the content of one of its
/// messages with that role) contains TEXT.
struct Contains<'a> {
    text: &'a str,
    role: Option<&'a str>,
}

fn contains_condition(want: &Value) -> Option<Contains<'_>> {
    let o = want.as_object()?;
    let text = o.get("contains")?.as_str()?;
    let role = o.get("role").and_then(Value::as_str);
    (o.len() == 1 + usize::from(role.is_some())).then_some(Contains { text, role })
}

impl Contains<'_> {
    fn holds(&self, got: &Value) -> Result<bool> {
        let Some(role) = self.role else { return Ok(any_string(got, &|s| s.contains(self.text))) };
        let Value::Array(messages) = got else { bail!("`role = \"{role}\"` needs a list of messages") };
        Ok(messages.iter().any(|m| {
            let has_role = ["role", "from"].iter().any(|k| m.get(*k).and_then(Value::as_str) == Some(role));
            let content = ["content", "value"].iter().find_map(|k| m.get(*k));
            has_role && content.is_some_and(|c| any_string(c, &|s| s.contains(self.text)))
        }))
    }
}

/// Whether any string in `v` (at any depth) satisfies `test`.
fn any_string(v: &Value, test: &dyn Fn(&str) -> bool) -> bool {
    match v {
        Value::String(s) => test(s),
        Value::Array(items) => items.iter().any(|x| any_string(x, test)),
        Value::Object(o) => o.values().any(|x| any_string(x, test)),
        _ => false,
    }
}

/// Splits `rows` into (rest, validation) with a seeded shuffle; order within
/// each part is the original order.
fn carve(rows: Vec<Row>, frac: f64, seed: u64) -> (Vec<Row>, Vec<Row>) {
    let n_val = ((rows.len() as f64 * frac).round() as usize).clamp(1, rows.len().saturating_sub(1).max(1));
    let mut idx: Vec<usize> = (0..rows.len()).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ stable_hash("validation_fraction"));
    idx.shuffle(&mut rng);
    let mut is_val = vec![false; rows.len()];
    for &i in &idx[..n_val] {
        is_val[i] = true;
    }
    let (mut rest, mut val) = (Vec::new(), Vec::new());
    for (r, v) in rows.into_iter().zip(is_val) {
        if v { val.push(r) } else { rest.push(r) }
    }
    (rest, val)
}

fn stable_hash(s: &str) -> u64 {
    let h = blake3::hash(s.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn cols(row: &Row) -> String {
    row.keys().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
}
