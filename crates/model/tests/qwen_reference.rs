//! Qwen2 and Qwen3 against a second implementation: candle-transformers'
//! own models, on small random checkpoints in the real HF layout.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use pipeline_model::ModelFiles;
use pipeline_model::load;
use pipeline_model::qwen::Variant;
use pipeline_model::testing::TinyQwen;

fn resolved(dir: &std::path::Path) -> ModelFiles {
    ModelFiles {
        source: "tiny".into(),
        dir: dir.to_path_buf(),
        tokenizer_json: None,
        tokenizer_config: None,
        config_json: Some(dir.join("config.json")),
        chat_template_file: None,
        weights: vec![dir.join("model.safetensors")],
        revision: None,
        weight_ids: Default::default(),
        gguf_tokenizer_unread: None,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn qwen2_and_qwen3_match_candle_transformers() {
    let Some(models) = pipeline_model::testing::models_dir() else { return };
    let ids: Vec<u32> = (0..23).map(|i| (i * 4099 + 7) % 151_000).collect();
    for variant in [Variant::Qwen3, Variant::Qwen2] {
        let dir = tempfile::tempdir().unwrap();
        TinyQwen::new(variant, 151_936).write(dir.path(), &models.join("qwen3-tokenizer"), 11).unwrap();
        let ours = load(&resolved(dir.path()), &Device::Cpu, 64).unwrap();
        let hidden = ours.hidden(&ids, None).unwrap();

        let cfg_text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[dir.path().join("model.safetensors")], DType::F32, &Device::Cpu)
                .unwrap()
        };
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let (theirs, last_logits) = match variant {
            Variant::Qwen3 => {
                use candle_transformers::models::qwen3;
                let cfg: qwen3::Config = serde_json::from_str(&cfg_text).unwrap();
                let h = qwen3::Model::new(&cfg, vb.clone()).unwrap().forward(&input, 0).unwrap();
                let l = qwen3::ModelForCausalLM::new(&cfg, vb).unwrap().forward(&input, 0).unwrap();
                (h, l)
            }
            Variant::Qwen2 => {
                use candle_transformers::models::qwen2;
                let mut v: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
                v["sliding_window"] = 4096.into();
                let cfg: qwen2::Config = serde_json::from_value(v).unwrap();
                let h = qwen2::Model::new(&cfg, vb.clone()).unwrap().forward(&input, 0, None).unwrap();
                let l = qwen2::ModelForCausalLM::new(&cfg, vb).unwrap().forward(&input, 0).unwrap();
                (h, l)
            }
            Variant::Llama => unreachable!("the loop runs Qwen2 and Qwen3 (Llama: llama_reference.rs)"),
        };
        let d = max_abs_diff(&hidden, &theirs.squeeze(0).unwrap());
        assert!(d < 1e-4, "{variant:?}: hidden states differ by {d}");
        let ours_last = ours.last_logits(&ids).unwrap();
        let d = max_abs_diff(&ours_last, &last_logits.flatten_all().unwrap());
        assert!(d < 1e-3, "{variant:?}: last logits differ by {d}");
    }
}
