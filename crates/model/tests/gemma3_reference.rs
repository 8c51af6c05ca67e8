//! The Gemma 3 implementation against reference numbers measured with
//! transformers and llama.cpp on the real Gemma 3 270M
//! (`../shared/reference/numbers.md`): greedy text and perplexity.

use candle_core::{D, Device};
use pipeline_model::{self as model, CausalLm};

fn load() -> Option<(Box<dyn CausalLm>, tokenizers::Tokenizer)> {
    let models = pipeline_model::testing::models_dir()?;
    let dir = models.join("gemma-3-270m");
    let resolved = pipeline_model::ModelFiles {
        source: "gemma-3-270m".into(),
        dir: dir.clone(),
        tokenizer_json: Some(dir.join("tokenizer.json")),
        tokenizer_config: Some(dir.join("tokenizer_config.json")),
        config_json: None,
        chat_template_file: None,
        weights: vec![dir.join("gemma-3-270m-q4_k_m.gguf")],
        revision: None,
        weight_ids: Default::default(),
        gguf_tokenizer_unread: None,
    };
    let m = model::load(&resolved, &Device::Cpu, 512).unwrap();
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    Some((m, tok))
}

#[test]
fn greedy_text_and_perplexity_match_the_references() {
    let Some((m, tok)) = load() else { return };

    // Greedy decoding, 30 tokens, f32 weights (dequantized GGUF).
    let mut ids = vec![2u32];
    ids.extend(tok.encode("The capital of France is", false).unwrap().get_ids());
    assert_eq!(ids, [2, 818, 5279, 529, 7001, 563]);
    let prompt_len = ids.len();
    for _ in 0..30 {
        let logits = m.last_logits(&ids).unwrap();
        ids.push(logits.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap());
    }
    let text = tok.decode(&ids[prompt_len..], false).unwrap();
    assert_eq!(
        text,
        " the capital of the country of France. It is the largest city in France and the second largest city in \
         Europe. It is located in the middle of"
    );

    // Perplexity, llama.cpp's method: chunks of 256 tokens, BOS first,
    // score the second half of each chunk.
    let text = std::fs::read_to_string(model::testing::shared_dir().join("reference/ppl_text.txt")).unwrap();
    let mut tokens = vec![2u32];
    tokens.extend(tok.encode(text.as_str(), false).unwrap().get_ids());
    let (ppl, chunks) = model::testing::chunked_perplexity(m.as_ref(), &tokens, 2, 256).unwrap();
    eprintln!("perplexity {ppl:.3}");
    assert_eq!(chunks, 4, "4 chunks of 256 tokens");
    assert!((ppl - 16.835).abs() < 0.05, "perplexity {ppl} is not 16.83 ± 0.05");
}
