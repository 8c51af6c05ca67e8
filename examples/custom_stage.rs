//! Add a stage kind of your own and use it in a recipe.
//!
//!     cargo run --example custom_stage
//!
//! `column-stats` reads a `fetch-dataset` stage and writes, per split, the
//! number of rows and the mean length (in characters) of one column. Its
//! parameters go into the cache key like a built-in kind's: the second run
//! is served from the cache, and changing `column` runs it again.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use pipeline::stages::custom::CustomStage;
use pipeline::stages::{Env, RunContext, Stage};
use pipeline::{Executor, Recipe};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Parameters of `[stages.NAME] kind = "column-stats"`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnStats {
    /// The `fetch-dataset` stage to read.
    dataset: String,
    /// The column whose lengths are measured.
    column: String,
}

impl Stage for ColumnStats {
    fn version(&self) -> u32 {
        1
    }

    fn params(&self, _env: &Env) -> Value {
        serde_json::to_value(self).expect("params serialize")
    }

    fn outside_inputs(&self, _env: &Env) -> Result<BTreeMap<String, String>> {
        // Reads nothing outside the cache.
        Ok(BTreeMap::new())
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let rows_dir = ctx.input("dataset").join("rows");
        let mut stats = serde_json::Map::new();
        for split in pipeline::stages::splits_in(&rows_dir, "jsonl")? {
            let (name, path) = split;
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut rows = 0usize;
            let mut chars = 0usize;
            for line in text.lines() {
                let row: Value = serde_json::from_str(line)?;
                let cell = row.get(&self.column).and_then(Value::as_str).with_context(|| {
                    format!("stage `{}`: split `{name}` has a row without a text column `{}`", ctx.name, self.column)
                })?;
                rows += 1;
                chars += cell.chars().count();
            }
            stats.insert(name, json!({"rows": rows, "mean_chars": chars as f64 / rows.max(1) as f64}));
        }
        std::fs::write(ctx.out.join("stats.json"), serde_json::to_vec_pretty(&stats)?)?;
        Ok(Value::Object(stats))
    }
}

impl CustomStage for ColumnStats {
    fn inputs(&self) -> Vec<(&'static str, String)> {
        vec![("dataset", self.dataset.clone())]
    }
}

fn main() -> Result<()> {
    pipeline::stages::register::<ColumnStats>("column-stats");

    let dir = std::env::temp_dir().join(format!("pipeline-custom-stage-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // The fish-care dataset kept in this repository.
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/data/fish-care-qa.jsonl");
    let text = format!(
        r#"
        [recipe]
        name = "custom-stage"

        [model]
        base = "unused-by-these-stages"

        [stages.data]
        kind = "fetch-dataset"
        source = "{}"
        validation_fraction = 0.1

        [stages.stats]
        kind = "column-stats"
        dataset = "data"
        column = "answer"
        "#,
        data.display()
    );
    let recipe = Recipe::parse(&text, &dir.join("recipe.toml"), &[])?;
    let executor = Executor::new(&dir.join(".pipeline"))?;
    for attempt in 1..=2 {
        for outcome in executor.run(&recipe, None)? {
            println!("run {attempt}: {} {}", outcome.name, outcome.done.verb());
        }
    }
    let plan = executor.plan(&recipe, None)?;
    let stats = executor.store().entry_dir(&plan.stage("stats").expect("planned").key).join("stats.json");
    println!("{}", std::fs::read_to_string(stats)?);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
