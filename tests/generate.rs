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

        batched_decoding_matches_decoding_alone(m.as_ref(), &tok, &prompt, arch);
    }
}

/// Three prompts of different lengths decoded together (one of them
/// starting from a prefix copied out of another sequence's cache) give the
/// tokens each gives alone.
fn batched_decoding_matches_decoding_alone(m: &dyn CausalLm, tok: &tokenizers::Tokenizer, prompt: &[u32], arch: &str) {
    let generator = Generator { model: m, tokenizer: tok, stop_tokens: vec![] };
    let params = GenerationParams { max_new_tokens: 12, ..Default::default() };
    let prompts = [&prompt[..13], &prompt[2..7], &prompt[..9]];
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| generator.generate(p, &params, 0, &mut |_| {}).unwrap().tokens).collect();
    let mut first = m.new_cache();
    m.forward_cached(prompts[0], &mut first).unwrap();
    let mut shared = first.prefix_copy(6).unwrap();
    assert_eq!(shared.len(), 6);
    let (mut a, mut b) = (m.new_cache(), m.new_cache());
    let mut jobs = [(prompts[0], &mut a), (prompts[1], &mut b), (prompts[2], &mut shared)];
    let together = generator.generate_batch(&mut jobs, &params, 0).unwrap();
    let together: Vec<Vec<u32>> = together.into_iter().map(|g| g.tokens).collect();
    assert_eq!(together, alone, "{arch}: batched and one-by-one greedy decoding differ");
    assert_eq!(a.len(), 13 + 11, "{arch}: the cache holds the prompt and the fed tokens");
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

    // Quantized batched decoding reads each weight once for all sequences
    // and gives each sequence's tokens decoded alone, bit for bit.
    batched_decoding_matches_decoding_alone(m.as_ref(), &tok, &ref_ids, "gemma3-270m q4_k_m");
}
