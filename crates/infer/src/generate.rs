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

use crate::error::{Error, Result};
use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use pipeline_model::{CausalLm, KvCache};

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
    /// Tool calls only as this grammar allows ([`crate::constrain`]).
    pub grammar: Option<&'a crate::constrain::CallGrammar>,
}

impl<'a> Generator<'a> {
    /// A generator that stops at the tokens spelled `stop_tokens` (e.g.
    /// `<end_of_turn>`, `<eos>`); names the tokenizer does not know are skipped.
    pub fn new(model: &'a dyn CausalLm, tokenizer: &'a tokenizers::Tokenizer, stop_tokens: &[&str]) -> Self {
        let mut ids: Vec<u32> = stop_tokens.iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        ids.sort_unstable();
        ids.dedup();
        Generator { model, tokenizer, stop_tokens: ids, grammar: None }
    }

    /// Decodes tool calls under `grammar`: inside a `<tool_call>` block each
    /// step takes the likeliest token that keeps the call one that can run.
    pub fn constrained(mut self, grammar: Option<&'a crate::constrain::CallGrammar>) -> Self {
        self.grammar = grammar;
        self
    }

    /// A generator that stops where `template`'s turns end (its end-of-turn
    /// marker, and EOS).
    pub fn for_template(
        model: &'a dyn CausalLm,
        tokenizer: &'a tokenizers::Tokenizer,
        template: &crate::chat::ChatTemplate,
    ) -> Self {
        let stops = stop_tokens(&template.end_of_turn, &template.eos_token);
        Generator::new(model, tokenizer, &stops.iter().map(String::as_str).collect::<Vec<_>>())
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
        let t0 = Instant::now();
        let prefill_tokens = self.check(prompt, cache)?;
        let mut logits = self.next_logits(prompt, cache)?;
        let prefill_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let mut decoding = Decoding::new(prompt, params, self.grammar, default_seed);
        while let Some(next) = decoding.step(self, &logits, cache.len(), on_text)? {
            logits = self.step_logits(next, cache)?;
        }
        Ok(decoding.finish(prefill_tokens, prefill_s, t1.elapsed().as_secs_f64(), on_text))
    }

    /// Generates for several prompts at once, each with its cache (as
    /// [`Generator::generate_cached`]: the cache may hold a prefix of its
    /// prompt). The prompts are prefilled one after another, then decoded
    /// together: each step runs one token of every unfinished sequence
    /// through [`CausalLm::forward_batch`]. Each sequence gets bit for bit
    /// the logits, and so the tokens, it gets decoded alone from a fresh
    /// cache, on every ISA: prefills resume only at chunk boundaries
    /// ([`pipeline_model::kv`]), and every op of a decoding step treats its
    /// rows one by one (quantized and f32 row kernels, row-wise LoRA
    /// updates, attention per sequence). A sampled sequence draws from its
    /// own sampler, seeded as when alone. `decode_s` is the
    /// wall time until the sequence finished.
    pub fn generate_batch(
        &self,
        jobs: &mut [(&[u32], &mut KvCache)],
        params: &GenerationParams,
        default_seed: u64,
    ) -> Result<Vec<Generation>> {
        let grammars = vec![self.grammar; jobs.len()];
        self.generate_batch_constrained(jobs, &grammars, params, default_seed)
    }

    /// [`Generator::generate_batch`] with a grammar per sequence (a
    /// request's own tools), instead of the generator's.
    pub fn generate_batch_constrained(
        &self,
        jobs: &mut [(&[u32], &mut KvCache)],
        grammars: &[Option<&crate::constrain::CallGrammar>],
        params: &GenerationParams,
        default_seed: u64,
    ) -> Result<Vec<Generation>> {
        assert_eq!(grammars.len(), jobs.len(), "one grammar (or none) per sequence");
        let mut states = Vec::with_capacity(jobs.len());
        let mut logits = Vec::with_capacity(jobs.len());
        for ((prompt, cache), grammar) in jobs.iter_mut().zip(grammars) {
            let t0 = Instant::now();
            let prefill_tokens = self.check(prompt, cache)?;
            logits.push(self.next_logits(prompt, cache)?);
            states.push(Some((
                Decoding::new(prompt, params, *grammar, default_seed),
                prefill_tokens,
                t0.elapsed().as_secs_f64(),
            )));
        }
        let t1 = Instant::now();
        let mut done: Vec<Option<Generation>> = (0..jobs.len()).map(|_| None).collect();
        loop {
            // Each unfinished sequence takes its next token, or finishes.
            let mut feed = Vec::new();
            for i in 0..jobs.len() {
                let Some((decoding, _, _)) = &mut states[i] else { continue };
                match decoding.step(self, &logits[i], jobs[i].1.len(), &mut |_| {})? {
                    Some(next) => feed.push((i, next)),
                    None => {
                        let (decoding, tokens, seconds) = states[i].take().expect("unfinished");
                        done[i] = Some(decoding.finish(tokens, seconds, t1.elapsed().as_secs_f64(), &mut |_| {}));
                    }
                }
            }
            if feed.is_empty() {
                break;
            }
            // At most MAX_DECODE_BATCH rows per pass: larger passes would use
            // the f32 LM head, and differ from decoding alone.
            for part in feed.chunks(pipeline_model::lora::MAX_DECODE_BATCH) {
                let ids: Vec<u32> = part.iter().map(|&(_, t)| t).collect();
                let mut caches: Vec<&mut KvCache> = jobs
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| part.iter().any(|(j, _)| j == i))
                    .map(|(_, (_, c))| &mut **c)
                    .collect();
                let rows = self.model.logits(&self.model.forward_batch(&ids, &mut caches)?)?;
                for (row, &(i, _)) in part.iter().enumerate() {
                    logits[i] = rows.get(row)?;
                }
            }
        }
        Ok(done.into_iter().map(|g| g.expect("every sequence finished")).collect())
    }

    /// Checks `prompt` against the context; returns how many tokens the
    /// prefill runs.
    fn check(&self, prompt: &[u32], cache: &KvCache) -> Result<usize> {
        if prompt.is_empty() {
            return Err(Error::Prompt("the prompt is empty".into()));
        }
        let max_positions = self.model.max_positions();
        if prompt.len() >= max_positions {
            return Err(Error::Prompt(format!(
                "the prompt has {} tokens; the model takes at most {}",
                prompt.len(),
                max_positions - 1
            )));
        }
        Ok(prompt.len() - cache.resume_point(prompt.len() - 1))
    }

    /// Prefills `prompt` (the cache holds a prefix of it) and returns the
    /// logits after its last token.
    fn next_logits(&self, prompt: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let h = self.model.prefill(prompt, cache)?;
        let last = h.narrow(0, h.dim(0)? - 1, 1)?;
        Ok(self.model.logits(&last)?.flatten_all()?)
    }

    /// One decoding step of one sequence: the step of a batch of one, so
    /// that its numbers are those of the same sequence in a batch.
    fn step_logits(&self, next: u32, cache: &mut KvCache) -> Result<Tensor> {
        let h = self.model.forward_batch(&[next], &mut [cache])?;
        Ok(self.model.logits(&h)?.flatten_all()?)
    }
}

/// The decoding state of one sequence: sampler, new tokens, streamed text.
struct Decoding<'p> {
    prompt: &'p [u32],
    params: &'p GenerationParams,
    /// The grammar this sequence's calls follow, if any.
    grammar: Option<&'p crate::constrain::CallGrammar>,
    sampler: LogitsProcessor,
    tokens: Vec<u32>,
    stream: TextStream<'p>,
    finish: Finish,
}

impl<'p> Decoding<'p> {
    fn new(
        prompt: &'p [u32],
        params: &'p GenerationParams,
        grammar: Option<&'p crate::constrain::CallGrammar>,
        default_seed: u64,
    ) -> Self {
        Decoding {
            prompt,
            params,
            grammar,
            sampler: LogitsProcessor::from_sampling(params.seed.unwrap_or(default_seed), params.sampling()),
            tokens: Vec::new(),
            stream: TextStream::new(&params.stop),
            finish: Finish::Length,
        }
    }

    /// Picks the next token from `logits` (the model's output after the
    /// last token, with `cached` positions now in the cache): `Some(token)`
    /// when the model must run it to go on, `None` when the sequence ends.
    fn step(
        &mut self,
        g: &Generator<'_>,
        logits: &Tensor,
        cached: usize,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>> {
        let params = self.params;
        if self.tokens.len() >= params.max_new_tokens {
            return Ok(None);
        }
        let mut logits = logits.flatten_all()?;
        if params.repetition_penalty != 1.0 {
            let context: Vec<u32> = self.prompt.iter().chain(&self.tokens).copied().collect();
            let recent = &context[context.len().saturating_sub(params.repeat_last_n)..];
            logits = candle_transformers::utils::apply_repeat_penalty(&logits, params.repetition_penalty, recent)?;
        }
        let next = match self.grammar {
            None => self.sampler.sample(&logits)?,
            Some(grammar) => self.constrained(g, grammar, &logits)?,
        };
        if g.stop_tokens.contains(&next) {
            self.finish = Finish::Stop;
            return Ok(None);
        }
        self.tokens.push(next);
        let text = g.tokenizer.decode(&self.tokens, false).map_err(|e| Error::Tokenizer(format!("decode: {e}")))?;
        if self.stream.push(&text, on_text) {
            self.finish = Finish::StopString;
            return Ok(None);
        }
        if cached + 1 >= g.model.max_positions() {
            self.finish = Finish::Context;
            return Ok(None);
        }
        Ok((self.tokens.len() < params.max_new_tokens).then_some(next))
    }

    /// The next token under `grammar`: of the likeliest candidates (all
    /// tokens if none of the first 64 will do), those whose text keeps the
    /// answer valid; greedy takes the first, sampling draws among them.
    fn constrained(
        &mut self,
        g: &Generator<'_>,
        grammar: &crate::constrain::CallGrammar,
        logits: &Tensor,
    ) -> Result<u32> {
        const CANDIDATES: usize = 64;
        let v: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let by_logit = |a: &u32, b: &u32| v[*b as usize].total_cmp(&v[*a as usize]);
        let mut order: Vec<u32> = (0..v.len() as u32).collect();
        let k = CANDIDATES.min(order.len());
        order.select_nth_unstable_by(k - 1, by_logit);
        order[..k].sort_unstable_by(by_logit);
        let now = self.stream.text.clone();
        let continuations = grammar.after(&now);
        if continuations.broken() {
            // An earlier step found no token that kept the call valid: the
            // block is finished unconstrained.
            return Ok(self.sampler.sample(logits)?);
        }
        let mut next_text = NextText::new(g.tokenizer, &self.tokens, &now)?;
        let greedy = self.params.temperature <= 0.0;
        let mut allowed = Vec::new();
        for pass in 0..2 {
            let range = if pass == 0 {
                0..k
            } else {
                order[k..].sort_unstable_by(by_logit);
                k..order.len()
            };
            for &t in &order[range] {
                let ok = if g.stop_tokens.contains(&t) {
                    !continuations.in_call()
                } else {
                    match next_text.added(t)? {
                        Some(added) => continuations.allows(&added),
                        None => grammar.allows(&next_text.whole(t)?),
                    }
                };
                if ok {
                    if greedy {
                        return Ok(t);
                    }
                    allowed.push(t);
                }
            }
            if !allowed.is_empty() {
                break;
            }
        }
        if allowed.is_empty() {
            // Nothing keeps the call valid: decode unconstrained.
            return Ok(self.sampler.sample(logits)?);
        }
        let mut masked = vec![f32::NEG_INFINITY; v.len()];
        for &t in &allowed {
            masked[t as usize] = v[t as usize];
        }
        Ok(self.sampler.sample(&Tensor::new(masked, logits.device())?)?)
    }

    fn finish(self, prefill_tokens: usize, prefill_s: f64, decode_s: f64, on_text: &mut dyn FnMut(&str)) -> Generation {
        let text = self.stream.finish(on_text);
        Generation { tokens: self.tokens, text, finish: self.finish, prefill_tokens, prefill_s, decode_s }
    }
}

/// The text of an answer with one more token, for trying many candidates:
/// what the candidate adds to the last few tokens' text, appended to the
/// answer's (decoding the whole answer again per candidate, up to a whole
/// vocabulary of them a step, took minutes a step). Where the short decode
/// does not extend (a decoder that rewrites its start), the whole answer is
/// decoded.
pub struct NextText<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    tokens: &'a [u32],
    text: &'a str,
    /// The last few tokens, then the candidate.
    context: Vec<u32>,
    before: String,
}

impl<'a> NextText<'a> {
    /// Tokens decoded again before each candidate.
    const CONTEXT: usize = 4;

    /// For an answer of `tokens` whose decoded text is `text`.
    pub fn new(tokenizer: &'a tokenizers::Tokenizer, tokens: &'a [u32], text: &'a str) -> Result<Self> {
        let context = tokens[tokens.len().saturating_sub(Self::CONTEXT)..].to_vec();
        let before = decode(tokenizer, &context)?;
        Ok(NextText { tokenizer, tokens, text, context, before })
    }

    /// What `token` adds to the answer's text, when the last few tokens'
    /// decoding tells (`None`: decode the whole answer, [`Self::with`]).
    pub fn added(&mut self, token: u32) -> Result<Option<String>> {
        self.context.push(token);
        let after = decode(self.tokenizer, &self.context);
        self.context.pop();
        Ok(after?.strip_prefix(self.before.as_str()).map(str::to_string))
    }

    /// The answer's text with `token` after it.
    pub fn with(&mut self, token: u32) -> Result<String> {
        match self.added(token)? {
            Some(added) => Ok(format!("{}{added}", self.text)),
            None => self.whole(token),
        }
    }

    /// The answer's text with `token` after it, decoded whole (where
    /// [`Self::added`] could not tell).
    pub fn whole(&self, token: u32) -> Result<String> {
        decode(self.tokenizer, &[self.tokens, &[token]].concat())
    }
}

fn decode(tokenizer: &tokenizers::Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer.decode(ids, false).map_err(|e| Error::Tokenizer(format!("decode: {e}")))
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
        .map_err(|e| Error::Tokenizer(format!("tokenizing the prompt: {e}")))?
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
