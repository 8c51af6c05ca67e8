//! The runner's promises: finished stages are reused, edits re-run exactly
//! what depends on them (and `plan` says why), and a crash or kill at any
//! moment leaves the cache consistent.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::{Project, chat_jsonl, local_recipe, models_dir, shared_dir};

fn statuses(plan: &[(String, String, String)]) -> Vec<(&str, &str)> {
    plan.iter().map(|(n, s, _)| (n.as_str(), s.as_str())).collect()
}

#[test]
fn quickstart_data_stages_run_then_are_all_cached() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    let recipe = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/quickstart.toml"))
        .unwrap()
        .replace("../models", models.to_str().unwrap());
    p.write("quickstart.toml", &recipe);

    let first = p.ok(&["run", "quickstart.toml", "--until", "tokens"]);
    assert_eq!(first.matches("  ran ").count(), 3, "{first}");

    let t0 = std::time::Instant::now();
    let second = p.ok(&["run", "quickstart.toml", "--until", "tokens"]);
    eprintln!("second run took {:?}", t0.elapsed());
    assert_eq!(second.matches("  cached ").count(), 3, "{second}");
    assert!(!second.contains("  ran "), "{second}");

    let plan = p.plan(&["quickstart.toml"]);
    for (name, status, _) in plan.iter().filter(|(n, _, _)| ["data", "chat", "tokens"].contains(&n.as_str())) {
        assert_eq!(status, "cached", "{name}");
    }

    // Only a tokenize parameter changes: tokenize runs, and says why.
    let plan = p.plan(&["quickstart.toml", "--set", "stages.tokens.max_len=512"]);
    let tokens = plan.iter().find(|(n, _, _)| n == "tokens").unwrap();
    assert_eq!(tokens.1, "run");
    assert!(tokens.2.contains("max_len") && tokens.2.contains("1024 → 512"), "{}", tokens.2);
    assert_eq!(plan.iter().find(|(n, _, _)| n == "chat").unwrap().1, "cached");
    assert_eq!(plan.iter().find(|(n, _, _)| n == "data").unwrap().1, "cached");

    // A default written out explicitly is the same recipe.
    let plan = p.plan(&["quickstart.toml", "--set", "stages.tokens.truncation=keep-tail"]);
    assert_eq!(plan.iter().find(|(n, _, _)| n == "tokens").unwrap().1, "cached");
}

#[test]
fn logs_written_to_a_file_or_pipe_have_no_colour_codes() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    p.write("data/train.jsonl", &chat_jsonl(4));
    p.write("recipe.toml", &local_recipe(&models, "data/train.jsonl", ""));
    let out = p.cmd(&["run", "recipe.toml"]).env("RUST_LOG", "info").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("INFO") && stderr.contains("running"), "the info log is there: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape codes in piped output: {stderr:?}");
}

#[test]
fn editing_one_byte_of_a_data_file_reruns_everything_downstream() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    p.write("data/train.jsonl", &chat_jsonl(6));
    p.write("recipe.toml", &local_recipe(&models, "data/train.jsonl", ""));
    p.ok(&["run", "recipe.toml"]);
    assert_eq!(statuses(&p.plan(&["recipe.toml"])), vec![("data", "cached"), ("chat", "cached"), ("tokens", "cached")]);

    let text = std::fs::read_to_string(p.path("data/train.jsonl")).unwrap().replacen("plus", "plvs", 1);
    p.write("data/train.jsonl", &text);
    let plan = p.plan(&["recipe.toml"]);
    assert_eq!(statuses(&plan), vec![("data", "run"), ("chat", "run"), ("tokens", "run")]);
    assert!(plan[0].2.contains("train.jsonl"), "reason: {}", plan[0].2);
    assert!(plan[1].2.contains("input `dataset` changed"), "reason: {}", plan[1].2);
    assert!(plan[2].2.contains("input `conversations` changed"), "reason: {}", plan[2].2);

    // Renaming a stage is not a change: names are not part of keys.
    let renamed = local_recipe(&models, "data/train.jsonl", "").replace("[stages.tokens]", "[stages.tok2]");
    p.write("renamed.toml", &renamed);
    p.ok(&["run", "recipe.toml"]);
    assert_eq!(statuses(&p.plan(&["renamed.toml"])), vec![("data", "cached"), ("chat", "cached"), ("tok2", "cached")]);
}

#[test]
fn an_injected_crash_mid_stage_leaves_no_entry_and_the_next_run_redoes_it() {
    let Some(models) = models_dir() else { return };
    // (fault point, stages published before it fires)
    for (point, published) in [("tokenize.mid-write", 2), ("publish.before-rename", 0)] {
        let p = Project::new();
        p.write("data/train.jsonl", &chat_jsonl(4));
        p.write("recipe.toml", &local_recipe(&models, "data/train.jsonl", ""));
        let out = p.cmd(&["run", "recipe.toml"]).env("PIPELINE_FAULT", point).output().unwrap();
        assert!(!out.status.success(), "the run should have crashed at {point}");
        assert_eq!(p.store_entries().len(), published, "entries after a crash at {point}");
        let plan = p.plan(&["recipe.toml"]);
        let want: Vec<_> = ["data", "chat", "tokens"]
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, if i < published { "cached" } else { "run" }))
            .collect();
        assert_eq!(statuses(&plan), want, "after a crash at {point}");

        let stderr = p.ok(&["run", "recipe.toml"]);
        assert!(stderr.contains("ran     tokens"), "{stderr}");
        assert_eq!(stderr.matches("  ran ").count(), 3 - published, "{stderr}");
        assert_eq!(p.store_entries().len(), 3);
        for e in p.store_entries() {
            assert!(p.path(&format!(".pipeline/store/{e}/manifest.json")).is_file());
        }
    }
}

/// Spawns a run that pauses inside the tokenize stage (holding its lock) and
/// returns it once it has reached that point.
fn spawn_paused(p: &Project) -> std::process::Child {
    let mut child = p
        .cmd(&["run", "recipe.toml"])
        .env("PIPELINE_PAUSE", "tokenize.mid-write")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the run ended before pausing").unwrap();
        if line.contains("paused at tokenize.mid-write") {
            break;
        }
    }
    child
}

#[test]
fn a_sigkill_mid_stage_leaves_the_cache_consistent_and_a_waiting_run_takes_over() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    p.write("data/train.jsonl", &chat_jsonl(4));
    p.write("recipe.toml", &local_recipe(&models, "data/train.jsonl", ""));

    let mut first = spawn_paused(&p);
    // A second run of the same recipe must wait for the key's lock…
    let second = p.cmd(&["run", "recipe.toml"]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(p.store_entries().len(), 2, "tokens must not be published while the first run holds it");

    // …and when the first is killed outright, it takes over and finishes.
    first.kill().unwrap();
    first.wait().unwrap();
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("waiting for another pipeline process working on `tokens`"), "{stderr}");
    assert!(stderr.contains("ran     tokens"), "{stderr}");
    assert_eq!(p.store_entries().len(), 3);
}

#[test]
fn gc_removes_what_no_recipe_uses_and_show_prints_entries() {
    let Some(models) = models_dir() else { return };
    let p = Project::new();
    p.write("data/train.jsonl", &chat_jsonl(4));
    p.write("recipe.toml", &local_recipe(&models, "data/train.jsonl", "max_len = 64"));
    p.ok(&["run", "recipe.toml", "--set", "stages.tokens.max_len=32"]);
    p.ok(&["run", "recipe.toml"]);
    assert_eq!(p.store_entries().len(), 4);

    let dry = p.run(&["gc", "recipe.toml", "--dry-run"]);
    assert!(dry.status.success());
    assert_eq!(String::from_utf8_lossy(&dry.stdout).lines().count(), 1);
    assert_eq!(p.store_entries().len(), 4);

    p.ok(&["gc", "recipe.toml"]);
    assert_eq!(p.store_entries().len(), 3);
    assert_eq!(statuses(&p.plan(&["recipe.toml"])), vec![("data", "cached"), ("chat", "cached"), ("tokens", "cached")]);

    let out = p.run(&["show", "recipe.toml", "tokens"]);
    assert!(out.status.success());
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(std::path::Path::new(&dir).join("tokens/train.safetensors").is_file(), "{dir}");

    let missing = p.run(&["show", "recipe.toml", "tokens", "--set", "stages.tokens.max_len=16"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--until tokens"));

    let none = p.run(&["gc"]);
    assert_eq!(none.status.code(), Some(2));
}

#[test]
fn hub_dataset_resolves_offline_from_the_shared_cache() {
    let p = Project::new();
    assert!(shared_dir().join("hf/hub").is_dir(), "../shared/hf is missing");
    p.write(
        "r.toml",
        r#"[recipe]
name = "hub"
[model]
base = "nowhere"
[stages.data]
kind = "fetch-dataset"
source = "hf://datasets/shawhin/tool-use-finetuning"
"#,
    );
    p.ok(&["run", "r.toml"]);
    let entry = &p.store_entries()[0];
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.path(&format!(".pipeline/store/{entry}/manifest.json"))).unwrap())
            .unwrap();
    assert_eq!(m["metrics"]["splits"]["train"]["rows"], 477);
    assert_eq!(m["metrics"]["splits"]["validation"]["rows"], 60);
    assert_eq!(m["fingerprint"]["outside"]["hub revision"], "0000000000000000000000000000000000000001");

    // Offline and not in the cache: a clear error, no network attempt.
    p.write("r2.toml", &std::fs::read_to_string(p.path("r.toml")).unwrap().replace("shawhin/", "nobody/"));
    let out = p.run(&["run", "r2.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not in the Hugging Face cache") && stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
}
