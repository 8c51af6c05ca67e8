//! Build a recipe in code and run it with the library API.
//!
//!     cargo run --example recipe_in_code
//!
//! Writes a tiny QA dataset to a scratch directory, then runs a one-stage
//! recipe (`fetch-dataset`) twice: the second time it is served from the cache.

use std::path::Path;

use pipeline::{Executor, Recipe};

fn main() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("pipeline-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("qa.jsonl"),
        "{\"question\": \"Which fish suit beginners?\", \"answer\": \"Guppies and platies.\"}\n\
         {\"question\": \"How often should I change aquarium water?\", \"answer\": \"About 25 % weekly.\"}\n",
    )?;

    let text = r#"
        [recipe]
        name = "in-code"

        [model]
        base = "unused-by-fetch"

        [stages.data]
        kind = "fetch-dataset"
        source = "qa.jsonl"
        validation_fraction = 0.5
    "#;
    // Relative paths resolve against the recipe's directory.
    let recipe = Recipe::parse(text, &dir.join("recipe.toml"), &[])?;
    let executor = Executor::new(&dir.join(".pipeline"))?;
    for attempt in 1..=2 {
        for outcome in executor.run(&recipe, None)? {
            println!("run {attempt}: {} {} ({})", outcome.name, outcome.done.verb(), outcome.key.short());
        }
    }
    let plan = executor.plan(&recipe, None)?;
    let rows = executor.store().entry_dir(&plan.stages[0].key).join("rows");
    for split in ["train", "validation"] {
        let n = std::fs::read_to_string(rows.join(format!("{split}.jsonl")))?.lines().count();
        println!("{split}: {n} row(s) in {}", Path::new(&rows).display());
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
