//! Every family's random-checkpoint shapes (`pipeline dev random-model
//! --arch NAME`): named once, and written by their family as a checkpoint
//! that reads back as that family.

use pipeline_model::{Arch, testing};

#[test]
fn each_random_shape_is_named_once_and_the_small_ones_read_back_as_their_family() {
    let shapes = Arch::random_shapes();
    let mut names: Vec<&str> = shapes.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "a shape named twice: {shapes:?}");
    assert!(
        Arch::write_random("nope", 8, std::path::Path::new("x"), std::path::Path::new("y"), 0, candle_core::DType::F32)
            .is_err_and(|e| e.to_string().contains("llama3.2-1b"))
    );

    let Some(models) = testing::models_dir() else { return };
    let tokenizer = models.join("qwen3-tokenizer");
    let dir = tempfile::tempdir().unwrap();
    // The two-layer shapes (the real-model ones are gigabytes of f32).
    for (name, family) in [("gemma3", "Gemma3"), ("qwen3", "Qwen"), ("qwen2", "Qwen"), ("llama", "Llama")] {
        let out = dir.path().join(name);
        Arch::write_random(name, 151_936, &out, &tokenizer, 1, candle_core::DType::BF16).unwrap();
        let arch = pipeline_model::read_config(&out.join("config.json")).unwrap();
        assert!(format!("{arch:?}").starts_with(family), "{name}: {arch:?}");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16", "{name}");
    }
}
