//! The `merge` stage: the merged model computes what base + adapter
//! computes, in a directory transformers can load; merging onto the wrong
//! base is refused.

mod common;

use candle_core::{Device, Tensor};
use common::Project;
use pipeline_model::qwen::Variant;
use pipeline_model::testing::TinyQwen;

fn show(p: &Project, stage: &str) -> std::path::PathBuf {
    let out = p.run(&["show", "recipe.toml", stage]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().into()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn merged_logits_equal_base_plus_adapter() {
    let Some(models) = common::models_dir() else { return };
    for arch in ["gemma3", "qwen2"] {
        let p = Project::new();
        match arch {
            "gemma3" => common::tiny_gemma3(&models, &p.path("model"), 4096),
            _ => TinyQwen::new(Variant::Qwen2, 151_936)
                .write(&p.path("model"), &models.join("qwen3-tokenizer"), 9)
                .unwrap(),
        }
        p.write("data/train.jsonl", &common::chat_jsonl(12));
        // A large learning rate, so the adapter changes the logits visibly.
        let recipe = common::train_recipe(&p.path("model"), "max_steps = 3\nrank = 4\nlearning_rate = 0.02\n")
            + "\n[stages.merged]\nkind = \"merge\"\nadapter = \"train\"\nchat = \"chat\"\ndtype = \"f32\"\n";
        p.write("recipe.toml", &recipe);
        p.ok(&["run", "recipe.toml"]);
        let merged_dir = show(&p, "merged");
        for f in [
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            assert!(merged_dir.join(f).is_file(), "{arch}: no {f}");
        }
        let tc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(merged_dir.join("tokenizer_config.json")).unwrap()).unwrap();
        let trained = std::fs::read_to_string(show(&p, "chat").join("chat_template.jinja")).unwrap();
        assert_eq!(tc["chat_template"], trained.as_str(), "{arch}: the served template is the trained one");
        let generation: serde_json::Value =
            serde_json::from_slice(&std::fs::read(merged_dir.join("generation_config.json")).unwrap()).unwrap();
        assert!(
            generation["eos_token_id"].as_array().unwrap().contains(&151_645.into()),
            "{arch}: <|im_end|> stops: {generation}"
        );

        // Hugging Face's own reader: the header transformers checks, and the base's tensor names.
        let script = "import sys\nfrom safetensors import safe_open\n\
                      with safe_open(sys.argv[1], framework='numpy') as f:\n    \
                      print(f.metadata()['format'], len(list(f.keys())), 'model.embed_tokens.weight' in f.keys())";
        let file = merged_dir.join("model.safetensors");
        if let Some(out) = common::python_check("safetensors", script, &[file.to_str().unwrap()]) {
            let base_names = candle_core::safetensors::load(p.path("model/model.safetensors"), &Device::Cpu).unwrap();
            assert_eq!(out, format!("pt {} True", base_names.len()), "{arch}");
        }

        let ids: Vec<u32> = (0..19).map(|i| (i * 3371 + 11) % 151_000).collect();
        let merged =
            pipeline_model::load(&pipeline::model_source::from_path(&merged_dir).unwrap(), &Device::Cpu, 64).unwrap();
        let mut base =
            pipeline_model::load(&pipeline::model_source::from_path(&p.path("model")).unwrap(), &Device::Cpu, 64)
                .unwrap();
        let h_base = base.hidden(&ids, None).unwrap();
        pipeline_model::adapter::LoadedAdapter::read(&show(&p, "train"), &Device::Cpu)
            .unwrap()
            .attach(base.as_mut())
            .unwrap();
        let logits = |m: &dyn pipeline_model::CausalLm| m.logits(&m.hidden(&ids, None).unwrap()).unwrap();
        let (want, got) = (logits(base.as_ref()), logits(merged.as_ref()));
        let diff = max_abs_diff(&want, &got);
        assert!(diff < 1e-4, "{arch}: merged logits differ from base + adapter by {diff}");
        let moved = max_abs_diff(&h_base, &base.hidden(&ids, None).unwrap());
        assert!(moved > 1e-3, "{arch}: the adapter barely changes the model ({moved}); the test would prove nothing");
    }
}

#[test]
fn merging_onto_another_base_is_refused() {
    let Some(models) = common::models_dir() else { return };
    let p = Project::new();
    common::tiny_gemma3(&models, &p.path("model"), 4096);
    p.write("data/train.jsonl", &common::chat_jsonl(8));
    p.write("recipe.toml", &common::train_recipe(&p.path("model"), "max_steps = 1\nrank = 2\n"));
    p.ok(&["run", "recipe.toml"]);
    let adapter = show(&p, "train");

    // Another base of the same shapes (another seed): only the hash tells.
    let other = tempfile::tempdir().unwrap();
    let mut tiny = pipeline_model::testing::TinyGemma3::new(151_936);
    tiny.max_positions = 4096;
    tiny.write(other.path(), &models.join("qwen3-tokenizer"), 99).unwrap();
    let base = pipeline::model_source::from_path(other.path()).unwrap();
    let hash = pipeline_cache::hash::hash_file(&base.weights[0]).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = pipeline::stages::merge::merge(&base, &hash, &adapter, None, Default::default(), out.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("trained on other base weights"), "{err}");

    // A base of other shapes: the module that does not fit is named.
    let qwen = tempfile::tempdir().unwrap();
    let mut wider = TinyQwen::new(Variant::Qwen3, 151_936);
    wider.hidden_size = 96;
    wider.intermediate_size = 160;
    wider.write(qwen.path(), &models.join("qwen3-tokenizer"), 1).unwrap();
    // The adapter as PEFT would have written it: no base_weights.json.
    let stripped = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter.join(f), stripped.path().join(f)).unwrap();
    }
    let base = pipeline::model_source::from_path(qwen.path()).unwrap();
    let err = pipeline::stages::merge::merge(&base, "x", stripped.path(), None, Default::default(), out.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("another base model"), "{err}");
}

#[test]
fn export_links_finished_artifacts_and_never_overwrites() {
    let Some(models) = common::models_dir() else { return };
    let p = Project::new();
    common::tiny_gemma3(&models, &p.path("model"), 4096);
    p.write("data/train.jsonl", &common::chat_jsonl(8));
    let recipe = common::train_recipe(&p.path("model"), "max_steps = 1\nrank = 2\n")
        + "\n[stages.merged]\nkind = \"merge\"\nadapter = \"train\"\n";
    p.write("recipe.toml", &recipe);
    // Nothing finished yet: a clear error.
    let out = p.run(&["export", "recipe.toml", "--to", "out"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to export"));

    p.ok(&["run", "recipe.toml"]);
    p.ok(&["export", "recipe.toml", "--to", "out", "--link"]);
    let adapter = p.path("out/train/adapter_model.safetensors");
    assert_eq!(
        std::fs::read(&adapter).unwrap(),
        std::fs::read(show(&p, "train").join("adapter_model.safetensors")).unwrap()
    );
    assert!(p.path("out/merged/model.safetensors").is_file() && p.path("out/merged/config.json").is_file());
    // Again: a no-op. A file changed by hand is not overwritten without --force.
    p.ok(&["export", "recipe.toml", "--to", "out"]);
    std::fs::remove_file(p.path("out/merged/config.json")).unwrap();
    std::fs::write(p.path("out/merged/config.json"), "{}").unwrap();
    let out = p.run(&["export", "recipe.toml", "--to", "out"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("config.json exists with other content") && err.contains("--force"), "{err}");
    p.ok(&["export", "recipe.toml", "--to", "out", "--force"]);
    assert_ne!(std::fs::read_to_string(p.path("out/merged/config.json")).unwrap(), "{}");
}
