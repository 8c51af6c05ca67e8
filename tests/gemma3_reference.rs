//! The Gemma 3 implementation against reference numbers measured with
//! transformers and llama.cpp on the real Gemma 3 270M
//! (`../shared/reference/numbers.md`): greedy text and perplexity.

mod common;

use candle_core::{D, Device, Tensor};
use pipeline::model::{self, CausalLm};
use pipeline::model_source::ResolvedModel;

fn load() -> Option<(Box<dyn CausalLm>, tokenizers::Tokenizer)> {
    let models = common::models_dir()?;
    let dir = models.join("gemma-3-270m");
    let resolved = ResolvedModel {
        source: "gemma-3-270m".into(),
        dir: dir.clone(),
        tokenizer_json: Some(dir.join("tokenizer.json")),
        tokenizer_config: Some(dir.join("tokenizer_config.json")),
        config_json: None,
        chat_template_file: None,
        weights: vec![dir.join("gemma-3-270m-q4_k_m.gguf")],
        revision: None,
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
    let text = std::fs::read_to_string(common::shared_dir().join("reference/ppl_text.txt")).unwrap();
    let mut tokens = vec![2u32];
    tokens.extend(tok.encode(text.as_str(), false).unwrap().get_ids());
    let n_ctx = 256;
    let (mut nll, mut count) = (0f64, 0usize);
    for chunk in 0..tokens.len() / n_ctx {
        let mut ids = tokens[chunk * n_ctx..(chunk + 1) * n_ctx].to_vec();
        ids[0] = 2;
        let hidden = m.hidden(&ids, None).unwrap();
        let first = n_ctx / 2;
        let logits = m.logits(&hidden.narrow(0, first, n_ctx - 1 - first).unwrap()).unwrap();
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let targets = Tensor::new(&ids[first + 1..], &Device::Cpu).unwrap().unsqueeze(1).unwrap();
        let picked: Vec<f32> = log_probs.gather(&targets, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        nll -= picked.iter().map(|&x| x as f64).sum::<f64>();
        count += picked.len();
    }
    let ppl = (nll / count as f64).exp();
    eprintln!("perplexity {ppl:.3} over {count} tokens");
    assert_eq!(tokens.len() / n_ctx, 4, "4 chunks of 256 tokens");
    assert!((ppl - 16.835).abs() < 0.05, "perplexity {ppl} is not 16.83 ± 0.05");
}
