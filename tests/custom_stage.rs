//! Stage kinds registered by library users: parsed from recipes, validated
//! like built-in kinds, keyed by their parameters.

use std::collections::BTreeMap;

use pipeline::stages::custom::CustomStage;
use pipeline::stages::{Env, RunContext, Stage};
use pipeline::{Executor, Recipe};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Echo {
    dataset: String,
    word: String,
}

impl Stage for Echo {
    fn version(&self) -> u32 {
        1
    }
    fn params(&self, _env: &Env) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
    fn outside_inputs(&self, _env: &Env) -> anyhow::Result<BTreeMap<String, String>> {
        Ok(BTreeMap::new())
    }
    fn run(&self, ctx: &RunContext) -> anyhow::Result<serde_json::Value> {
        assert!(ctx.input("dataset").join("rows/train.jsonl").is_file());
        std::fs::write(ctx.out.join("word.txt"), &self.word)?;
        Ok(serde_json::json!({}))
    }
}

impl CustomStage for Echo {
    fn inputs(&self) -> Vec<(&'static str, String)> {
        vec![("dataset", self.dataset.clone())]
    }
}

fn recipe_text(extra: &str) -> String {
    format!(
        "[recipe]\nname = \"echo\"\n\n[model]\nbase = \"unused\"\n\n[stages.data]\nkind = \"fetch-dataset\"\n\
         source = \"qa.jsonl\"\n\n[stages.echo]\nkind = \"echo\"\n{extra}\n"
    )
}

#[test]
fn a_registered_kind_runs_caches_and_reports_mistakes() {
    pipeline::stages::register::<Echo>("echo");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("qa.jsonl"), "{\"question\": \"q\", \"answer\": \"a\"}\n").unwrap();
    let path = dir.path().join("r.toml");

    let r = Recipe::parse(&recipe_text("dataset = \"data\"\nword = \"hi\""), &path, &[]).unwrap();
    let exec = Executor::new(&dir.path().join(".pipeline")).unwrap();
    let runs: Vec<bool> = exec.run(&r, None).unwrap().iter().map(|o| o.ran()).collect();
    assert_eq!(runs, vec![true, true]);
    let runs: Vec<bool> = exec.run(&r, None).unwrap().iter().map(|o| o.ran()).collect();
    assert_eq!(runs, vec![false, false], "cached the second time");
    // Its parameters are part of the key.
    let changed: pipeline::recipe::Override = "stages.echo.word=\"ho\"".parse().unwrap();
    let r2 = Recipe::parse(&recipe_text("dataset = \"data\"\nword = \"hi\""), &path, &[changed]).unwrap();
    let plan = exec.plan(&r2, None).unwrap();
    assert_eq!(plan.stage("echo").unwrap().status, pipeline::Status::Run);
    assert!(plan.stage("echo").unwrap().reason.as_deref().unwrap().contains("word"), "{:?}", plan.stage("echo"));

    // An unknown key names the stage and the key.
    let e = Recipe::parse(&recipe_text("dataset = \"data\"\nwrod = \"hi\""), &path, &[]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("stage `echo` (echo)") && msg.contains("wrod"), "{msg}");
    // A reference to a missing stage is caught like a built-in one's.
    let e = Recipe::parse(&recipe_text("dataset = \"dta\"\nword = \"hi\""), &path, &[]).unwrap_err();
    assert!(e.to_string().contains("did you mean `data`"), "{e}");
}
