//! The generation engine: the KV cache gives the same tokens as recomputing
//! the whole sequence, and the quantized path follows the f32 reference on
//! the real Gemma 3 270M.

mod common;

use candle_core::{D, Device};
use pipeline_infer::generate::{GenerationParams, Generator};
use pipeline_model::qwen::Variant;
use pipeline_model::testing::TinyQwen;
use pipeline_model::{self as model, CausalLm};

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
        let resolved = pipeline::model_source::from_path(dir.path()).unwrap();
        let m = model::load_for_inference(&resolved, &Device::Cpu).unwrap();
        let expected = greedy_without_cache(m.as_ref(), &prompt, 40);
        let generator = Generator::new(m.as_ref(), &tok, &[]);
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
        let mut m = m;
        attach_random_lora(m.as_mut());
        batched_decoding_matches_decoding_alone(m.as_ref(), &tok, &prompt, &format!("{arch} + LoRA"));
    }
}

/// Prompts of different lengths decoded together, two of them starting from
/// prefixes copied out of another sequence's cache (across prefill chunk
/// boundaries, so that the copy is really reused), give bit for bit the
/// logits and tokens each gives alone.
fn batched_decoding_matches_decoding_alone(m: &dyn CausalLm, tok: &tokenizers::Tokenizer, prompt: &[u32], arch: &str) {
    let chunk = model::PREFILL_CHUNK;
    let long: Vec<u32> = prompt.iter().cycle().take(2 * chunk + 22).copied().collect();
    let mut branch = long[..2 * chunk + 9].to_vec();
    branch.extend(&prompt[..3]);
    let prompts: [&[u32]; 4] = [&long, &long[2..9], &branch, &long[..chunk]];

    // Prefill (a fresh cache, or one that resumes from a copied prefix)
    // gives the same hidden states.
    let fresh = |p: &[u32]| {
        let mut c = m.new_cache();
        let h = m.prefill(p, &mut c).unwrap();
        (c, h)
    };
    let (first, _) = fresh(prompts[0]);
    let mut caches =
        [m.new_cache(), m.new_cache(), first.prefix_copy(branch.len() - 3).unwrap(), first.prefix_copy(chunk).unwrap()];
    assert_eq!(caches[2].resume_point(usize::MAX), 2 * chunk, "{arch}: the copy resumes at the last chunk boundary");
    // The third reuses two chunks; the fourth holds exactly its prompt, and
    // recomputes its one chunk for the logits after the last token.
    let ran = [prompts[0].len(), prompts[1].len(), branch.len() - 2 * chunk, chunk];
    for ((p, c), ran) in prompts.iter().zip(&mut caches).zip(ran) {
        let resumed = m.prefill(p, c).unwrap();
        let (_, alone) = fresh(p);
        assert_eq!(resumed.dim(0).unwrap(), ran, "{arch}: positions the prefill ran");
        let last = |h: &candle_core::Tensor| h.narrow(0, h.dim(0).unwrap() - 1, 1).unwrap();
        let diff = max_abs_diff(&last(&resumed), &last(&alone));
        assert_eq!(diff, 0.0, "{arch}: a resumed prefill differs from a fresh one by {diff}");
    }

    // One batched step: each row's logits are those of its sequence alone.
    let next = [5u32, 7, 11, 13];
    let mut refs: Vec<&mut model::KvCache> = caches.iter_mut().collect();
    let batch = m.logits(&m.forward_batch(&next, &mut refs).unwrap()).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let (mut c, _) = fresh(p);
        let alone = m.logits(&m.forward_batch(&next[i..=i], &mut [&mut c]).unwrap()).unwrap();
        let diff = max_abs_diff(&batch.narrow(0, i, 1).unwrap(), &alone);
        assert_eq!(diff, 0.0, "{arch}: row {i} of a batched step differs from the step alone by {diff}");
    }

    // Greedy generation, batched from the copied prefixes, one by one from fresh caches.
    let generator = Generator::new(m, tok, &[]);
    let params = GenerationParams { max_new_tokens: 12, ..Default::default() };
    let alone: Vec<Vec<u32>> =
        prompts.iter().map(|p| generator.generate(p, &params, 0, &mut |_| {}).unwrap().tokens).collect();
    let mut caches =
        [m.new_cache(), m.new_cache(), first.prefix_copy(branch.len() - 3).unwrap(), first.prefix_copy(chunk).unwrap()];
    let mut jobs: Vec<(&[u32], &mut model::KvCache)> = prompts.iter().copied().zip(caches.iter_mut()).collect();
    let together = generator.generate_batch(&mut jobs, &params, 0).unwrap();
    let together: Vec<Vec<u32>> = together.into_iter().map(|g| g.tokens).collect();
    assert_eq!(together, alone, "{arch}: batched and one-by-one greedy decoding differ");
    assert_eq!(caches[0].len(), long.len() + 11, "{arch}: the cache holds the prompt and the fed tokens");
}

/// A rank-4 LoRA update with non-zero `A` and `B` on every linear layer of `m`.
fn attach_random_lora(m: &mut dyn CausalLm) {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for (_, lin) in m.linears_mut() {
        let (out, inp) = (lin.out_features(), lin.in_features());
        // Uniform values of the shapes A: [r, in] and B: [out, r].
        let a = model::lora::init_lora_a(4, inp, &mut rng, &Device::Cpu).unwrap();
        let b = model::lora::init_lora_a(out, 4, &mut rng, &Device::Cpu).unwrap();
        let var = |t| candle_core::Var::from_tensor(&t).unwrap();
        lin.lora = Some(model::lora::Lora { a: var(a), b: var(b), scale: 0.5, dropout: 0.0 });
    }
}

#[test]
fn quantized_greedy_text_follows_the_f32_reference_on_gemma3_270m() {
    let Some(models) = common::models_dir() else { return };
    let dir = models.join("gemma-3-270m");
    let resolved = pipeline::model_source::from_path(&dir).unwrap();
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
    let mut m = m;
    attach_random_lora(m.as_mut());
    batched_decoding_matches_decoding_alone(m.as_ref(), &tok, &ref_ids, "gemma3-270m q4_k_m + LoRA");
}

/// Constrained decoding tries up to a vocabulary of candidates a step; their
/// texts come from the last few tokens, and must be what decoding the whole
/// answer gives, on both real tokenizers (SentencePiece with byte fallback,
/// byte-level BPE), across words, JSON, CJK, emoji and line breaks.
#[test]
fn a_candidate_tokens_text_equals_decoding_the_whole_answer() {
    use pipeline_infer::generate::NextText;
    let Some(models) = common::models_dir() else { return };
    let answer =
        "<tool_call>\n{\n  \"tool_name\": \"get_weather\",\n  \"args\": {\"city\": \"北京\", \"note\": \"🌧️ ok\"}\n}";
    for dir in ["gemma-3-270m", "qwen3-tokenizer"] {
        let tok = tokenizers::Tokenizer::from_file(models.join(dir).join("tokenizer.json")).unwrap();
        let ids = tok.encode(answer, false).unwrap().get_ids().to_vec();
        let vocab = tok.get_vocab_size(true) as u32;
        let mut checked = 0;
        for n in 0..=ids.len() {
            let tokens = &ids[..n];
            let text = tok.decode(tokens, false).unwrap();
            let mut next = NextText::new(&tok, tokens, &text).unwrap();
            // Every 211th token of the vocabulary, and the answer's own.
            for t in (0..vocab).step_by(211).chain(ids.iter().copied()) {
                let whole = tok.decode(&[tokens, &[t]].concat(), false).unwrap();
                assert_eq!(next.with(t).unwrap(), whole, "{dir}: {n} tokens, then token {t}");
                checked += 1;
            }
        }
        assert!(checked > 10_000, "{dir}: {checked}");
    }
}
