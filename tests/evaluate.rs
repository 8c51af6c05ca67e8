//! The `evaluate` stage on a tiny model: reports for base and adapter side
//! by side, eval loss that agrees with the training stage's, and bad input.

mod common;

use common::Project;
use serde_json::Value;

fn show(p: &Project, stage: &str) -> std::path::PathBuf {
    let out = p.run(&["show", "recipe.toml", stage]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().into()
}

fn json(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A trained tiny model plus an evaluate stage with `eval` options.
fn project(eval: &str) -> Option<Project> {
    let models = common::models_dir()?;
    let p = Project::new();
    common::tiny_gemma3(&models, &p.path("model"), 4096);
    p.write("data/train.jsonl", &common::chat_jsonl(16));
    let recipe = common::train_recipe(&p.path("model"), "max_steps = 2\nrank = 4\n")
        + &format!(
            r#"
[stages.eval]
kind = "evaluate"
conversations = "chat"
adapter = "train"
group_by = "kind"
{eval}
"#
        );
    p.write("recipe.toml", &recipe);
    Some(p)
}

#[test]
fn reports_base_and_adapter_side_by_side() {
    let Some(p) = project("compare = [\"base\", \"adapter\"]\n[stages.eval.generation]\nmax_new_tokens = 6\n") else {
        return;
    };
    p.ok(&["run", "recipe.toml"]);
    let dir = show(&p, "eval");
    let report = json(&dir.join("report.json"));
    let rows = report["rows"].as_u64().unwrap();
    assert_eq!(rows, 4, "validation_fraction 0.25 of 16 rows");
    assert_eq!(report["task"], "tool-call", "the gold turns are tool calls");
    for model in ["base", "adapter"] {
        let m = &report["models"][model]["overall"];
        assert_eq!(m["called_when_needed"]["n"], rows, "{model}: every row needs a call");
        assert!(m["loss"]["value"].as_f64().unwrap() > 0.0);
        assert!(m["perplexity"]["value"].as_f64().unwrap() > 1.0);
        let groups = report["models"][model]["by_group"].as_object().unwrap();
        let n: u64 = groups.values().map(|g| g["called_when_needed"]["n"].as_u64().unwrap()).sum();
        assert_eq!(n, rows, "{model}: the groups partition the rows");
    }
    // The base model's eval loss (KV-cache, chunked path) is the training
    // stage's loss before training (the plain full-sequence path).
    let train: Value = json(&show(&p, "train").join("manifest.json"));
    let before = train["metrics"]["eval_loss_before"].as_f64().unwrap();
    let base = report["models"]["base"]["overall"]["loss"]["value"].as_f64().unwrap();
    assert!((before - base).abs() < 1e-4, "eval loss {base} vs training's {before}");

    let preds = std::fs::read_to_string(dir.join("predictions.jsonl")).unwrap();
    let lines: Vec<Value> = preds.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len() as u64, 2 * rows);
    for l in &lines {
        assert!(l["generated"].is_string() && l["verdict"]["needs_call"] == true, "{l}");
        assert_eq!(l["gold"]["calls"][0]["name"], "add");
    }
    let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(md.contains("| metric | base | adapter |"), "{md}");
    assert!(md.contains("### even") && md.contains("decision: call iff needed"), "{md}");

    // Cached on a second run, also with another decoding batch size (not
    // part of the key: it does not change the answers).
    let plan = p.plan(&["recipe.toml"]);
    assert!(plan.iter().all(|(_, s, _)| s == "cached"), "{plan:?}");
    let plan = p.plan(&["recipe.toml", "--set", "stages.eval.batch=1"]);
    assert!(plan.iter().all(|(_, s, _)| s == "cached"), "{plan:?}");

    // Rows one by one, each from an empty cache (`limit` only changes the
    // key): the same answers and losses as rows in token order sharing
    // their prefixes, decoded 8 at a time.
    p.ok(&["run", "recipe.toml", "--set", "stages.eval.batch=1", "--set", "stages.eval.limit=4"]);
    let one_by_one =
        std::fs::read_to_string(show_with(&p, "eval", "stages.eval.limit=4").join("predictions.jsonl")).unwrap();
    let one_by_one: Vec<Value> = one_by_one.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(one_by_one.len(), lines.len());
    for (a, b) in lines.iter().zip(&one_by_one) {
        assert_eq!((&a["id"], &a["model"], &a["generated"]), (&b["id"], &b["model"], &b["generated"]));
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((la - lb).abs() < 1e-4, "row {}: loss {la} vs {lb}", a["id"]);
    }

    // The base model's half is a stage of its own, `eval.base`: retraining
    // evaluates the new adapter only; the base column comes from the cache.
    let retrain = "stages.train.max_steps=3";
    let plan = p.plan(&["recipe.toml", "--set", retrain]);
    let status = |name: &str| plan.iter().find(|(n, _, _)| n == name).map(|(_, s, _)| s.clone());
    assert_eq!(status("eval.base").as_deref(), Some("cached"), "{plan:?}");
    assert_eq!(status("train").as_deref(), Some("run"), "{plan:?}");
    assert_eq!(status("eval").as_deref(), Some("run"), "{plan:?}");
    p.ok(&["run", "recipe.toml", "--set", retrain]);
    let again = json(&show_with(&p, "eval", retrain).join("report.json"));
    assert_eq!(again["models"]["base"], report["models"]["base"]);
    assert_ne!(again["models"]["adapter"]["overall"]["loss"], report["models"]["adapter"]["overall"]["loss"]);
    let preds = std::fs::read_to_string(show_with(&p, "eval", retrain).join("predictions.jsonl")).unwrap();
    let again: Vec<Value> = preds.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(again.len(), lines.len());
    let base = |v: &[Value]| v.iter().filter(|l| l["model"] == "base").cloned().collect::<Vec<_>>();
    assert_eq!(base(&again), base(&lines), "the base model's predictions, reused");
}

fn show_with(p: &Project, stage: &str, set: &str) -> std::path::PathBuf {
    let out = p.run(&["show", "recipe.toml", stage, "--set", set]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().into()
}

#[test]
fn overlong_prompts_are_skipped_and_counted() {
    let Some(p) = project("max_prompt_tokens = 3\n[stages.eval.generation]\nmax_new_tokens = 4\n") else { return };
    p.ok(&["run", "recipe.toml"]);
    let report = json(&show(&p, "eval").join("report.json"));
    assert_eq!(report["models"]["adapter"]["skipped_overlong"], 4);
    // Loss is still measured on them; nothing was generated.
    assert!(report["models"]["adapter"]["overall"]["loss"]["n"].as_u64().unwrap() > 0);
    assert!(report["models"]["adapter"]["overall"].get("called_when_needed").is_none());
    let md = std::fs::read_to_string(show(&p, "eval").join("report.md")).unwrap();
    assert!(md.contains("4 rows skipped"), "{md}");
}

#[test]
fn bad_evaluate_input_gets_clear_errors() {
    let Some(p) = project("split = \"nope\"\n") else { return };
    let out = p.run(&["run", "recipe.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("split `nope` does not exist") && err.contains("validation"), "{err}");

    let models = common::models_dir().unwrap();
    let p = Project::new();
    common::tiny_gemma3(&models, &p.path("model"), 4096);
    p.write("data/train.jsonl", &common::chat_jsonl(8));
    let recipe = common::train_recipe(&p.path("model"), "max_steps = 1\n")
        + "\n[stages.eval]\nkind = \"evaluate\"\nconversations = \"chat\"\ncompare = [\"base\", \"adapter\"]\n";
    p.write("recipe.toml", &recipe);
    let out = p.run(&["validate", "recipe.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("compare") && err.contains("adapter"), "{err}");

    // An empty validation split is refused where it is read, naming it.
    let p = Project::new();
    common::tiny_gemma3(&models, &p.path("model"), 4096);
    p.write("data/train.jsonl", &common::chat_jsonl(8));
    p.write("data/validation.jsonl", "");
    let recipe = common::train_recipe(&p.path("model"), "max_steps = 1\n")
        .replace("source = \"data/train.jsonl\"\nvalidation_fraction = 0.25", "source = \"data/*.jsonl\"")
        + "\n[stages.eval]\nkind = \"evaluate\"\nconversations = \"chat\"\nadapter = \"train\"\n";
    p.write("recipe.toml", &recipe);
    let out = p.run(&["run", "recipe.toml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("validation") && (err.contains("no rows") || err.contains("empty")), "{err}");
}
