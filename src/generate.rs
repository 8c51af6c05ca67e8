//! Text generation: a prefill over the prompt, then one token at a time
//! through the model's KV cache.
//!
//! Decoding is greedy (`temperature = 0`) or sampled (temperature, top-k,
//! top-p, seeded; candle-transformers' `LogitsProcessor`), with a repetition
//! penalty. It stops at a stop token (EOS, the template's end-of-turn marker),
//! at a stop string (cut from the text, as OpenAI and Ollama do), at
//! `max_new_tokens`, or at the end of the model's context. Text is streamed
//! to a callback as soon as it can no longer turn into a stop string or an
//! incomplete UTF-8 sequence.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::{CausalLm, KvCache};

/// How to decode: recipe parameters (`evaluate`, `ollama-modelfile`) and CLI
/// options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationParams {
    /// At most this many new tokens.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// 0 decodes greedily (the default).
    #[serde(default)]
    pub temperature: f64,
    /// Sample among the k most likely tokens only.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities add up to p.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// > 1 discourages repeating the last `repeat_last_n` tokens (1 = off).
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    #[serde(default = "default_repeat_last_n")]
    pub repeat_last_n: usize,
    /// Seed of the sampler (default: the recipe's seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Strings that end the generation (not included in the text).
    #[serde(default)]
    pub stop: Vec<String>,
}

fn default_max_new_tokens() -> usize {
    256
}
fn one() -> f32 {
    1.0
}
fn default_repeat_last_n() -> usize {
    64
}

impl Default for GenerationParams {
    fn default() -> Self {
        GenerationParams {
            max_new_tokens: default_max_new_tokens(),
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            repeat_last_n: default_repeat_last_n(),
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl GenerationParams {
    /// Checks the values, naming the bad key.
    pub fn check(&self) -> Result<(), (&'static str, String, String)> {
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            return Err(("temperature", self.temperature.to_string(), "use 0 (greedy) or a positive number".into()));
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) || p == 0.0 {
                return Err(("top_p", p.to_string(), "use a probability in (0, 1]".into()));
            }
        }
        if self.top_k == Some(0) {
            return Err(("top_k", "0".into(), "use at least 1, or leave it out".into()));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(("repetition_penalty", self.repetition_penalty.to_string(), "use 1 (off) or more".into()));
        }
        if self.stop.iter().any(String::is_empty) {
            return Err(("stop", "\"\"".into(), "an empty stop string would stop at once; remove it".into()));
        }
        Ok(())
    }

    fn sampling(&self) -> Sampling {
        let temperature = self.temperature;
        if temperature <= 0.0 {
            return Sampling::ArgMax;
        }
        match (self.top_k, self.top_p) {
            (None, None) => Sampling::All { temperature },
            (Some(k), None) => Sampling::TopK { k, temperature },
            (None, Some(p)) => Sampling::TopP { p, temperature },
            (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// A stop token (EOS, end of turn).
    Stop,
    /// A stop string.
    StopString,
    /// `max_new_tokens`.
    Length,
    /// The model's context is full.
    Context,
}

/// One generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// New tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// Their text, cut before any stop string.
    pub text: String,
    pub finish: Finish,
    /// Tokens run through the model in the prefill (prompt minus what the
    /// cache already held).
    pub prefill_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// Generates with one model and tokenizer.
pub struct Generator<'a> {
    pub model: &'a dyn CausalLm,
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// Token ids that end a generation.
    pub stop_tokens: Vec<u32>,
}

impl<'a> Generator<'a> {
    /// A generator that stops at the tokens spelled `stop_tokens` (e.g.
    /// `<end_of_turn>`, `<eos>`); names the tokenizer does not know are skipped.
    pub fn new(model: &'a dyn CausalLm, tokenizer: &'a tokenizers::Tokenizer, stop_tokens: &[&str]) -> Self {
        let mut ids: Vec<u32> = stop_tokens.iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        ids.sort_unstable();
        ids.dedup();
        Generator { model, tokenizer, stop_tokens: ids }
    }

    /// Generates after `prompt` from an empty cache.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
        default_seed: u64,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let mut cache = self.model.new_cache();
        self.generate_cached(prompt, &mut cache, params, default_seed, on_text)
    }

    /// Generates after `prompt`, whose first `cache.len()` tokens the cache
    /// already holds (a chat's history, or a prefix scored before). The
    /// cache ends holding the prompt and the generated tokens.
    pub fn generate_cached(
        &self,
        prompt: &[u32],
        cache: &mut KvCache,
        params: &GenerationParams,
        default_seed: u64,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let max_positions = self.model.max_positions();
        if prompt.len() >= max_positions {
            bail!("the prompt has {} tokens; the model takes at most {}", prompt.len(), max_positions - 1);
        }
        // At least one prompt token goes through the model, for its logits.
        if cache.len() >= prompt.len() {
            cache.truncate(prompt.len() - 1);
        }
        let t0 = Instant::now();
        let prefill_tokens = prompt.len() - cache.len();
        let mut logits = self.next_logits(&prompt[cache.len()..], cache)?;
        let prefill_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut sampler = LogitsProcessor::from_sampling(params.seed.unwrap_or(default_seed), params.sampling());
        let mut tokens: Vec<u32> = Vec::new();
        let mut stream = TextStream::new(&params.stop);
        let mut finish = Finish::Length;
        while tokens.len() < params.max_new_tokens {
            if params.repetition_penalty != 1.0 {
                let context: Vec<u32> = prompt.iter().chain(&tokens).copied().collect();
                let recent = &context[context.len().saturating_sub(params.repeat_last_n)..];
                logits = candle_transformers::utils::apply_repeat_penalty(&logits, params.repetition_penalty, recent)?;
            }
            let next = sampler.sample(&logits)?;
            if self.stop_tokens.contains(&next) {
                finish = Finish::Stop;
                break;
            }
            tokens.push(next);
            let text = self.tokenizer.decode(&tokens, false).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
            if stream.push(&text, on_text) {
                finish = Finish::StopString;
                break;
            }
            if cache.len() + 1 >= max_positions {
                finish = Finish::Context;
                break;
            }
            if tokens.len() < params.max_new_tokens {
                logits = self.next_logits(&[next], cache)?;
            }
        }
        let text = stream.finish(on_text);
        Ok(Generation { tokens, text, finish, prefill_tokens, prefill_s, decode_s: t1.elapsed().as_secs_f64() })
    }

    /// Runs `ids` through the model and returns the logits after the last.
    fn next_logits(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let h = self.model.forward_chunked(ids, cache)?;
        let last = h.narrow(0, ids.len() - 1, 1)?;
        Ok(self.model.logits(&last)?.flatten_all()?)
    }
}

/// Streams decoded text, holding back what may still become a stop string
/// (or an incomplete character), and cutting at the first stop string.
struct TextStream<'s> {
    stop: &'s [String],
    text: String,
    emitted: usize,
}

impl<'s> TextStream<'s> {
    fn new(stop: &'s [String]) -> Self {
        TextStream { stop, text: String::new(), emitted: 0 }
    }

    /// Takes the full text so far; returns true when a stop string appeared.
    fn push(&mut self, text: &str, on_text: &mut dyn FnMut(&str)) -> bool {
        self.text = text.to_string();
        if let Some(cut) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            return true;
        }
        // Hold back an incomplete character and any tail that begins a stop string.
        let mut safe = self.text.trim_end_matches('\u{FFFD}').len();
        for s in self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text[..safe].ends_with(&s[..k]) {
                    safe = safe.min(self.text.len() - k);
                    break;
                }
            }
        }
        if safe > self.emitted && self.text.is_char_boundary(safe) {
            on_text(&self.text[self.emitted..safe]);
            self.emitted = safe;
        }
        false
    }

    /// Emits the rest and returns the whole text.
    fn finish(self, on_text: &mut dyn FnMut(&str)) -> String {
        if self.text.len() > self.emitted {
            on_text(&self.text[self.emitted..]);
        }
        self.text
    }
}

/// Renders the stop tokens a template implies: its end-of-turn marker and
/// the tokenizer's EOS.
pub fn stop_tokens(end_of_turn: &str, eos: &str) -> Vec<String> {
    let mut v: Vec<String> = [end_of_turn, eos].iter().filter(|s| !s.is_empty()).map(|s| s.to_string()).collect();
    v.dedup();
    v
}

/// Tokenizes `text` as rendered by a chat template (which writes any BOS
/// itself), failing with context.
pub fn encode(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("tokenizing the prompt")?
        .get_ids()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::TextStream;

    fn run(stop: &[&str], steps: &[&str]) -> (Vec<String>, String, bool) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&stop);
        let mut out = Vec::new();
        let mut stopped = false;
        for t in steps {
            if s.push(t, &mut |x| out.push(x.to_string())) {
                stopped = true;
                break;
            }
        }
        let text = s.finish(&mut |x| out.push(x.to_string()));
        (out, text, stopped)
    }

    #[test]
    fn holds_back_a_possible_stop_string_and_cuts_at_it() {
        let (out, text, stopped) = run(&["</tool_call>"], &["a", "a</", "a</tool", "a</tool_call>tail"]);
        assert!(stopped);
        assert_eq!(text, "a");
        assert_eq!(out.concat(), "a");
        // A false alarm is released once it cannot be a stop string.
        let (out, text, stopped) = run(&["</tool_call>"], &["x</", "x</b"]);
        assert!(!stopped);
        assert_eq!((out.concat(), text), ("x</b".to_string(), "x</b".to_string()));
    }

    #[test]
    fn waits_for_complete_characters() {
        let (out, _, _) = run(&[], &["北", "北\u{FFFD}", "北京"]);
        assert_eq!(out, ["北", "京"]);
    }
}
