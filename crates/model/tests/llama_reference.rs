//! The Llama implementation on the real SmolLM2-135M-Instruct (a Q4_1 GGUF,
//! q/k rows in llama.cpp's rotary order) against transformers' own Llama,
//! which reads the same file with its GGUF loader: logits at every
//! position of a prompt.

use std::path::{Path, PathBuf};

use candle_core::Device;
use pipeline_model::testing::{missing, models_dir};
use pipeline_model::{Arch, ModelFiles};

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The SmolLM2 directory, when provisioned (`scripts/fetch-models.sh`).
fn smollm2() -> Option<PathBuf> {
    let dir = models_dir()?.join("smollm2-135m-instruct");
    if dir.join(GGUF).is_file() {
        return Some(dir);
    }
    missing(&format!("{} is not provisioned", dir.join(GGUF).display()), "run scripts/fetch-models.sh");
    None
}

/// The Python with torch and transformers (`scripts/fetch-test-tools.sh`).
fn torch_python() -> Option<String> {
    let pointer = models_dir()?.join("torch-python");
    match std::fs::read_to_string(&pointer) {
        Ok(p) if Path::new(p.trim()).is_file() => Some(p.trim().to_string()),
        _ => {
            missing("no Python with torch and transformers", "run scripts/fetch-test-tools.sh");
            None
        }
    }
}

#[test]
fn smollm2_logits_match_transformers_reading_the_same_gguf() {
    let (Some(dir), Some(python)) = (smollm2(), torch_python()) else { return };
    let files = ModelFiles { weights: vec![dir.join(GGUF)], ..ModelFiles::from_dir("smollm2", &dir).unwrap() };
    let (arch, mut weights) = pipeline_model::load_weights(&files, &Device::Cpu, false).unwrap();
    let Arch::Llama(cfg) = &arch else { panic!("SmolLM2 is a Llama: {arch:?}") };
    assert_eq!((cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads), (30, 576, 9));
    assert_eq!((cfg.num_key_value_heads(), cfg.rope_theta, cfg.tie_word_embeddings), (3, 100_000.0, true));
    let m = arch.build(&mut weights, 64).unwrap();

    // Ten ids starting with <|im_start|> (1); any ids serve the comparison.
    let ids: Vec<u32> = vec![1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47];
    let ours = m.logits(&m.hidden(&ids, None).unwrap()).unwrap();
    let ours: Vec<Vec<f32>> = ours.to_vec2().unwrap();

    let script = r#"
import json, sys
import torch
from transformers import AutoModelForCausalLM
d, name, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
with torch.no_grad():
    print(json.dumps(m(torch.tensor([ids])).logits[0].tolist()))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, dir.to_str().unwrap(), GGUF, &serde_json::to_string(&ids).unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "transformers failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let theirs: Vec<Vec<f32>> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(theirs.len(), ids.len());
    let mut worst = 0f32;
    for (pos, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(d);
        let argmax = |v: &[f32]| v.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).unwrap().0;
        assert_eq!(argmax(a), argmax(b), "position {pos}: another next token");
    }
    eprintln!("SmolLM2 logits, 10 positions × 49152: largest difference {worst:.2e}");
    assert!(worst < 1e-3, "logits differ from transformers' by {worst}");
}

/// Llama 3's scaled rotary frequencies (`rope_type = "llama3"`) against
/// transformers' `LlamaForCausalLM` on a random checkpoint in HF layout,
/// over 96 positions (past the scaled-down context of 64, so high, medium
/// and low frequencies all turn).
#[test]
fn llama3_rope_scaling_matches_transformers_on_a_random_checkpoint() {
    let (Some(models), Some(python)) = (models_dir(), torch_python()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut tiny = pipeline_model::testing::TinyLlama::new(151_936);
    tiny.rope_scaling = Some(serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}));
    tiny.write(dir.path(), &models.join("qwen3-tokenizer"), 11).unwrap();
    let files = ModelFiles::from_dir("tiny-llama", dir.path()).unwrap();
    let m = pipeline_model::load(&files, &Device::Cpu, 128).unwrap();
    let ids: Vec<u32> = (0..96u32).map(|i| (i * 7919 + 13) % 151_936).collect();
    let ours: Vec<Vec<f32>> = m.logits(&m.hidden(&ids, None).unwrap()).unwrap().to_vec2().unwrap();

    let script = r#"
import json, sys
import torch
from transformers import AutoModelForCausalLM
d, ids = sys.argv[1], json.loads(sys.argv[2])
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
assert m.config.rope_parameters["rope_type"] == "llama3", m.config.rope_parameters
with torch.no_grad():
    print(json.dumps(m(torch.tensor([ids])).logits[0].tolist()))
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", script, dir.path().to_str().unwrap(), &serde_json::to_string(&ids).unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "transformers failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let theirs: Vec<Vec<f32>> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let worst =
        ours.iter().zip(&theirs).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    eprintln!("Llama 3 rotary scaling, 96 positions: largest logit difference {worst:.2e}");
    assert!(worst < 1e-3, "logits differ from transformers' by {worst}");
    // Without the scaling the same weights score otherwise: the test sees it.
    let plain_dir = tempfile::tempdir().unwrap();
    tiny.rope_scaling = None;
    tiny.write(plain_dir.path(), &models.join("qwen3-tokenizer"), 11).unwrap();
    let plain =
        pipeline_model::load(&ModelFiles::from_dir("plain", plain_dir.path()).unwrap(), &Device::Cpu, 128).unwrap();
    let unscaled: Vec<Vec<f32>> = plain.logits(&plain.hidden(&ids, None).unwrap()).unwrap().to_vec2().unwrap();
    let moved =
        unscaled.iter().zip(&ours).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
    assert!(moved > 1e-2, "the scaling changes no logit ({moved:.2e}): the test would prove nothing");
}
