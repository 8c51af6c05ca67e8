//! `schema/recipe.schema.json` is generated from the recipe types; this test
//! fails when it is stale. Regenerate with:
//!
//!     UPDATE_SCHEMA=1 cargo test --test schema

use std::path::Path;

#[test]
fn recipe_schema_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/recipe.schema.json");
    let generated = pipeline::recipe::json_schema();
    if std::env::var("UPDATE_SCHEMA").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "schema/recipe.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test --test schema` and commit the result"
    );
}

#[test]
fn every_recipe_in_recipes_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let recipe = pipeline::Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
            pipeline::executor::execution_order(&recipe, None).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1);
}
