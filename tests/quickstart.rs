//! The quickstart recipe end to end, every stage, on the real Gemma 3 270M,
//! offline, shortened with `--set` so that CI runs it in minutes: data →
//! chat → tokens → train → eval (base beside adapter) → merge → GGUF → Modelfile.

mod common;

use common::Project;

#[test]
fn quickstart_runs_every_stage_offline() {
    let Some(models) = common::models_dir() else { return };
    let recipe = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/quickstart.toml"))
        .unwrap()
        .replace("../models/gemma-3-270m", &models.join("gemma-3-270m").display().to_string());
    let p = Project::new();
    p.write("quickstart.toml", &recipe);
    let set = [
        "stages.tokens.max_len=256",
        "stages.train.max_steps=2",
        "stages.train.eval_examples=2",
        "stages.train.eval_every=2",
        "stages.eval.limit=2",
        "stages.eval.generation.max_new_tokens=8",
    ];
    let mut args = vec!["run", "quickstart.toml"];
    for s in &set {
        args.extend(["--set", s]);
    }
    p.ok(&args);
    let show = |stage: &str| {
        let mut a = vec!["show", "quickstart.toml", stage];
        for s in &set {
            a.extend(["--set", s]);
        }
        let out = p.run(&a);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(show("eval").join("report.json")).unwrap()).unwrap();
    assert!(report["models"]["base"]["overall"]["loss"]["value"].is_number());
    assert!(report["models"]["adapter"]["overall"]["loss"]["value"].is_number());
    assert!(show("merged").join("model.safetensors").is_file());
    for f in ["model-q8_0.gguf", "model-q4_k_m.gguf", "adapter.gguf"] {
        assert!(show("gguf").join(f).is_file(), "{f}");
    }
    let ollama = show("ollama");
    let modelfile = std::fs::read_to_string(ollama.join("Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./model.gguf") && modelfile.contains("PARAMETER stop \"<end_of_turn>\""));
    assert_eq!(
        std::fs::metadata(ollama.join("model.gguf")).unwrap().len(),
        std::fs::metadata(show("gguf").join("model-q4_k_m.gguf")).unwrap().len()
    );

    // `export` writes model cards that huggingface_hub reads as the hub does.
    let mut a = vec!["export", "quickstart.toml", "--to", "out"];
    for s in &set {
        a.extend(["--set", s]);
    }
    p.ok(&a);
    let script = r#"
import sys
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
for sub, library in [("train", "peft"), ("merged", "transformers")]:
    path = sys.argv[1] + "/" + sub + "/README.md"
    card = ModelCard.load(path)
    d = card.data
    assert d.base_model == "google/gemma-3-270m", d.base_model
    assert d.library_name == library, d.library_name
    assert d.license == "gemma", d.license
    assert d.pipeline_tag == "text-generation"
    assert d.datasets == ["shawhin/tool-use-finetuning"], d.datasets
    assert "tool-calling" in d.tags, d.tags
    results = d.eval_results
    assert results, "model-index results"
    names = {r.metric_type: r.metric_value for r in results}
    assert "decision_accuracy" in names and "loss" in names, names
    assert all(r.dataset_type == "shawhin/tool-use-finetuning" and r.dataset_split == "validation" for r in results)
    assert metadata_load(path)["model-index"][0]["name"] == "quickstart"
    print(sub, len(results), names["decision_accuracy"])
"#;
    let out = common::python_check("huggingface_hub", script, &[p.path("out").to_str().unwrap()]);
    if let Some(out) = out {
        assert!(out.contains("train ") && out.contains("merged "), "{out}");
    }
    // The training log as HF Trainer and TensorBoard users read it.
    let script = r#"
import sys, csv
from transformers import TrainerState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
d = sys.argv[1] + "/train"
rows = list(csv.DictReader(open(d + "/loss.csv")))
state = TrainerState.load_from_json(d + "/trainer_state.json")
steps = [h for h in state.log_history if "loss" in h]
assert [h["step"] for h in steps] == [int(r["step"]) for r in rows], steps
assert all(abs(h["loss"] - float(r["loss"])) < 1e-5 for h, r in zip(steps, rows))
assert all("learning_rate" in h and "grad_norm" in h and "epoch" in h for h in steps)
assert state.global_step == int(rows[-1]["step"]) == state.max_steps
evals = [h for h in state.log_history if "eval_loss" in h]
assert [h["step"] for h in evals] == [0] + [int(r["step"]) for r in rows if r["eval_loss"]], evals
ea = EventAccumulator(d + "/runs")
ea.Reload()
tags = set(ea.Tags()["scalars"])
assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "eval/loss"} <= tags, tags
loss = ea.Scalars("train/loss")
assert [e.step for e in loss] == [int(r["step"]) for r in rows]
assert all(abs(e.value - float(r["loss"])) < 1e-4 for e, r in zip(loss, rows))
assert [e.step for e in ea.Scalars("eval/loss")] == [h["step"] for h in evals]
print("logs", len(loss), len(evals))
"#;
    let out = common::python_check("tensorboard", script, &[p.path("out").to_str().unwrap()]);
    if let Some(out) = out {
        assert_eq!(out, "logs 2 2");
    }
    let card = std::fs::read_to_string(p.path("out/train/README.md")).unwrap();
    assert!(card.contains("PeftModel.from_pretrained") && card.contains("| metric | base | fine-tuned |"), "{card}");
}
