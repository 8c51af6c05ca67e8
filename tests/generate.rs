//! The generation engine: the KV cache gives the same tokens as recomputing
//! the whole sequence, and the quantized path follows the f32 reference on
//! the real Gemma 3 270M.

mod common;

use candle_core::{D, Device};
use pipeline::generate::{GenerationParams, Generator};
use pipeline::model::qwen::Variant;
use pipeline::model::testing::TinyQwen;
use pipeline::model::{self, CausalLm};
use pipeline::model_source::ResolvedModel;

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// Greedy decoding by recomputing the whole sequence at every step.
fn greedy_without_cache(m: &dyn CausalLm, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let logits = m.last_logits(&ids).unwrap();
        ids.push(logits.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap());
    }
    ids[prompt.len()..].to_vec()
}

#[test]
fn greedy_with_and_without_kv_cache_agree_on_every_architecture() {
    let Some(models) = common::models_dir() else { return };
    let tok = tokenizers::Tokenizer::from_file(models.join("qwen3-tokenizer/tokenizer.json")).unwrap();
    let prompt: Vec<u32> = (0..13).map(|i| (i * 7919 + 3) % 151_000).collect();
    for arch in ["gemma3", "qwen3", "qwen2"] {
        let dir = tempfile::tempdir().unwrap();
        match arch {
            // A window of 8: the 40 decoded tokens go well past it.
            "gemma3" => common::tiny_gemma3(&models, dir.path(), 4096),
            "qwen3" => {
                TinyQwen::new(Variant::Qwen3, 151_936).write(dir.path(), &models.join("qwen3-tokenizer"), 5).unwrap()
            }
            _ => TinyQwen::new(Variant::Qwen2, 151_936).write(dir.path(), &models.join("qwen3-tokenizer"), 5).unwrap(),
        }
        let resolved = ResolvedModel::from_path(dir.path()).unwrap();
        let m = model::load_for_inference(&resolved, &Device::Cpu).unwrap();
        let expected = greedy_without_cache(m.as_ref(), &prompt, 40);
        let generator = Generator { model: m.as_ref(), tokenizer: &tok, stop_tokens: vec![] };
        let params = GenerationParams { max_new_tokens: 40, ..Default::default() };
        let got = generator.generate(&prompt, &params, 0, &mut |_| {}).unwrap();
        assert_eq!(got.tokens, expected, "{arch}: cached and uncached greedy decoding differ");

        // Chunked prefill through the cache (3 + 10 + 20 + 1 tokens) gives
        // the hidden states of one pass over the whole sequence.
        let all: Vec<u32> = prompt.iter().chain(&expected).copied().take(34).collect();
        let full = m.hidden(&all, None).unwrap();
        let mut cache = m.new_cache();
        let mut parts = Vec::new();
        for (a, b) in [(0, 3), (3, 13), (13, 33), (33, 34)] {
            parts.push(m.forward_cached(&all[a..b], &mut cache).unwrap());
        }
        let chunked = candle_core::Tensor::cat(&parts, 0).unwrap();
        let diff = max_abs_diff(&full, &chunked);
        assert!(diff < 1e-4, "{arch}: chunked prefill differs by {diff}");

        // Truncating the cache and going on reproduces the same positions.
        cache.truncate(20);
        let again = m.forward_cached(&all[20..34], &mut cache).unwrap();
        let diff = max_abs_diff(&full.narrow(0, 20, 14).unwrap(), &again);
        assert!(diff < 1e-4, "{arch}: decoding after truncate differs by {diff}");
    }
}

#[test]
fn quantized_greedy_text_follows_the_f32_reference_on_gemma3_270m() {
    let Some(models) = common::models_dir() else { return };
    let dir = models.join("gemma-3-270m");
    let resolved = ResolvedModel::from_path(&dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let m = model::load_for_inference(&resolved, &Device::Cpu).unwrap();
    let mut prompt = vec![2u32];
    prompt.extend(tok.encode("The capital of France is", false).unwrap().get_ids());
    let generator = Generator::new(m.as_ref(), &tok, &["<eos>", "<end_of_turn>"]);
    let params = GenerationParams { max_new_tokens: 30, ..Default::default() };
    let mut streamed = String::new();
    let got = generator.generate(&prompt, &params, 0, &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(streamed, got.text, "the streamed text is the text");
    let reference = " the capital of the country of France. It is the largest city in France and the second largest \
                     city in Europe. It is located in the middle of";
    let ref_ids = tok.encode(reference, false).unwrap().get_ids().to_vec();
    let same = got.tokens.iter().zip(&ref_ids).take_while(|(a, b)| a == b).count();
    eprintln!("quantized decode: {:?} ({same} tokens as the f32 reference)", got.text);
    assert!(same >= 10, "only {same} tokens agree with the f32 reference: {:?}", got.text);
}
