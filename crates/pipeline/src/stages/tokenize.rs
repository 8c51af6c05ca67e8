//! `tokenize`: conversations → token ids and a loss mask.
//!
//! Uses the model's `tokenizer.json` (the `tokenizers` crate) on the text the
//! template rendered, without adding special tokens (templates write their
//! own `<bos>`). A token is trained on when it starts inside one of the
//! conversation's trained spans; the stage decodes the masked tokens back and
//! counts any example where they differ from the spans' text.
//!
//! Output per split: `tokens/<split>.safetensors`, ragged: `input_ids` (u32,
//! all examples concatenated), `loss_mask` (u8, same length) and `offsets`
//! (i64, n+1 boundaries); the example ids are in the file's metadata.
//! Length statistics go in the manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use pipeline_train::TokenizedSplit;

use super::format_chat;
use super::format_chat::Conversation;
use super::{Env, Input, Kind, Rule, RunContext, Stage, StageKind, select_splits, splits_in};
use pipeline_data as data;

/// Parameters of a `tokenize` stage.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The `format-chat` stage whose conversations are tokenized.
    pub conversations: String,
    /// Splits to tokenize (default: all).
    #[serde(default)]
    pub splits: Vec<String>,
    /// Longest example, in tokens.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// What to do with longer examples.
    #[serde(default)]
    pub truncation: Truncation,
    /// Supervise only the first this-many tokens of an assistant turn that
    /// calls no tool, and end the example after its last supervised token
    /// (what follows would carry no loss). The decision to answer directly
    /// is made in an answer's first tokens; whole answers, ten times longer
    /// than a call, otherwise carry most of the loss and teach the model
    /// to write answers rather than to choose and name tools. Unset: every
    /// token of every trained turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_answer_tokens: Option<usize>,
}

fn default_max_len() -> usize {
    2048
}

/// How examples longer than `max_len` are shortened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Truncation {
    /// Keep the last `max_len` tokens (the supervised answer is at the end).
    #[default]
    KeepTail,
    /// Keep the first `max_len` tokens.
    KeepHead,
    /// Leave the example out.
    Drop,
}

impl StageKind for Params {
    fn inputs(&self) -> Vec<Input<'_>> {
        vec![Input { role: "conversations", stage: &self.conversations, kinds: &[format_chat::Params::KIND] }]
    }

    fn check(&self) -> Result<(), Rule> {
        if self.max_len < 2 {
            return Err(("max_len", format!("max_len = {} is too small", self.max_len), "use at least 2".into()));
        }
        if self.direct_answer_tokens == Some(0) {
            return Err((
                "direct_answer_tokens",
                "direct_answer_tokens = 0 would train no direct answer at all".into(),
                "use at least 1 (the first token is the decision not to call), or leave it out".into(),
            ));
        }
        Ok(())
    }
}

impl Stage for Params {
    fn version(&self) -> u32 {
        1
    }

    fn params(&self, _env: &Env) -> Value {
        serde_json::to_value(self).expect("params serialize")
    }

    fn outside_inputs(&self, env: &Env) -> Result<BTreeMap<String, String>> {
        let path = env.model()?.tokenizer_json()?.to_path_buf();
        Ok(BTreeMap::from([("tokenizer.json".to_string(), env.hash_file(&path)?)]))
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let tok_path = ctx.env.model()?.tokenizer_json()?.to_path_buf();
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", tok_path.display()))?;
        let splits = select_splits(
            splits_in(&ctx.input("conversations").join("conversations"), "jsonl")?,
            &self.splits,
            ctx.name,
        )?;
        let dir = ctx.out.join("tokens");
        std::fs::create_dir_all(&dir)?;
        let mut metrics = serde_json::Map::new();
        for (split, path) in splits {
            let convs: Vec<Conversation> = data::read_jsonl_as(&path)?;
            let (tokenized, stats) = self.tokenize_split(&tokenizer, &convs, &split)?;
            pipeline_fs::fault::point("tokenize.mid-write");
            tokenized.save(&split_path(&ctx.out, &split))?;
            metrics.insert(split, stats);
        }
        Ok(Value::Object(metrics))
    }
}

/// Where a tokenize entry (or its work directory) keeps split `split`.
fn split_path(entry: &Path, split: &str) -> PathBuf {
    entry.join("tokens").join(format!("{split}.safetensors"))
}

/// Whether the finished tokenize entry `entry` holds split `split`.
pub fn has_split(entry: &Path, split: &str) -> bool {
    split_path(entry, split).is_file()
}

/// Split `split` of the finished tokenize entry `entry`: the one reader of
/// what this kind writes (training and `bench` read through it).
pub fn read_split(entry: &Path, split: &str) -> Result<TokenizedSplit> {
    let path = split_path(entry, split);
    TokenizedSplit::load(&path).with_context(|| format!("split `{split}` ({})", path.display()))
}

impl Params {
    fn tokenize_split(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        convs: &[Conversation],
        split: &str,
    ) -> Result<(TokenizedSplit, Value)> {
        let mut out = TokenizedSplit { ids: vec![], input_ids: vec![], loss_mask: vec![], offsets: vec![0] };
        let (mut truncated, mut cut_tokens, mut dropped, mut mismatches) = (0usize, 0usize, 0usize, 0usize);
        let mut lengths = Vec::with_capacity(convs.len());
        let (mut supervised, mut capped_turns, mut capped_tokens) = (0usize, 0usize, 0usize);
        let pb = crate::report::bar(convs.len() as u64, &format!("tokenize {split}"));
        for conv in convs {
            let enc = encode(tokenizer, conv)?;
            let mut mask = mask_of(&enc, conv);
            let mut ids = enc.get_ids();
            if !mask_decodes_to_spans(tokenizer, ids, &mask, conv)? {
                mismatches += 1;
            }
            if let Some(n) = self.direct_answer_tokens {
                let cap = cap_direct_answers(enc.get_offsets(), conv, &mut mask, n);
                capped_turns += cap.turns;
                capped_tokens += cap.tokens;
                let end = mask.iter().rposition(|&m| m == 1).map_or(0, |i| i + 1);
                ids = &ids[..end];
                mask.truncate(end);
            }
            let (ids, mask) = if ids.len() > self.max_len {
                truncated += 1;
                cut_tokens += ids.len() - self.max_len;
                match self.truncation {
                    Truncation::KeepTail => (&ids[ids.len() - self.max_len..], &mask[mask.len() - self.max_len..]),
                    Truncation::KeepHead => (&ids[..self.max_len], &mask[..self.max_len]),
                    Truncation::Drop => {
                        dropped += 1;
                        pb.inc(1);
                        continue;
                    }
                }
            } else {
                (ids, &mask[..])
            };
            let n_sup = mask.iter().filter(|&&m| m == 1).count();
            if n_sup == 0 {
                dropped += 1;
                pb.inc(1);
                continue;
            }
            supervised += n_sup;
            lengths.push(ids.len());
            out.ids.push(conv.id.clone());
            out.input_ids.extend_from_slice(ids);
            out.loss_mask.extend_from_slice(mask);
            out.offsets.push(out.input_ids.len() as i64);
            pb.inc(1);
        }
        pb.finish();
        if out.is_empty() {
            bail!(
                "split `{split}`: no example left after truncation to max_len = {} ({dropped} dropped); raise max_len",
                self.max_len
            );
        }
        if mismatches > 0 {
            tracing::warn!(
                split,
                mismatches,
                "the trained tokens of some examples do not decode to exactly their assistant turns \
                 (the tokenizer merges across a turn boundary); see mask_decode_mismatches in the manifest"
            );
        }
        let stats = serde_json::json!({
            "examples": out.len(),
            "tokens": out.input_ids.len(),
            "supervised_tokens": supervised,
            "direct_answers_capped": capped_turns,
            "direct_answer_tokens_left_out": capped_tokens,
            "length": length_stats(&mut lengths),
            "truncated": truncated,
            "truncated_tokens": cut_tokens,
            "dropped": dropped,
            "mask_decode_mismatches": mismatches,
        });
        Ok((out, stats))
    }
}

/// Token ids of a conversation's text (which holds its own BOS) and the loss
/// mask: 1 on tokens that start inside a trained span.
pub fn encode_with_mask(tokenizer: &tokenizers::Tokenizer, conv: &Conversation) -> Result<(Vec<u32>, Vec<u8>)> {
    let enc = encode(tokenizer, conv)?;
    Ok((enc.get_ids().to_vec(), mask_of(&enc, conv)))
}

/// The conversation's text as tokens, with their byte offsets.
fn encode(tokenizer: &tokenizers::Tokenizer, conv: &Conversation) -> Result<tokenizers::Encoding> {
    tokenizer
        .encode(conv.text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("example {}: tokenizer failed: {e}", conv.id))
}

/// 1 on the tokens that start inside one of the conversation's trained spans.
fn mask_of(enc: &tokenizers::Encoding, conv: &Conversation) -> Vec<u8> {
    enc.get_offsets().iter().map(|&(s, _)| u8::from(conv.spans.iter().any(|sp| s >= sp.start && s < sp.end))).collect()
}

/// What [`cap_direct_answers`] left out.
struct Capped {
    turns: usize,
    tokens: usize,
}

/// Unmarks the tokens of each trained turn without tool calls past its first
/// `n` (`offsets`: each token's byte span in the text).
fn cap_direct_answers(offsets: &[(usize, usize)], conv: &Conversation, mask: &mut [u8], n: usize) -> Capped {
    let mut capped = Capped { turns: 0, tokens: 0 };
    for span in &conv.spans {
        let calls = conv.messages.get(span.message).and_then(|m| m.tool_calls.as_ref());
        if calls.is_some_and(|c| c.as_array().is_none_or(|a| !a.is_empty())) {
            continue;
        }
        let (mut seen, mut cut) = (0, 0);
        for (m, &(s, _)) in mask.iter_mut().zip(offsets) {
            if *m == 1 && s >= span.start && s < span.end {
                seen += 1;
                if seen > n {
                    *m = 0;
                    cut += 1;
                }
            }
        }
        capped.turns += usize::from(cut > 0);
        capped.tokens += cut;
    }
    capped
}

/// Whether the masked tokens decode to exactly the spans' text.
fn mask_decodes_to_spans(
    tokenizer: &tokenizers::Tokenizer,
    ids: &[u32],
    mask: &[u8],
    conv: &Conversation,
) -> Result<bool> {
    let want: String = conv.spans.iter().map(|s| &conv.text[s.start..s.end]).collect();
    let mut got = String::new();
    // Decode each contiguous masked run on its own (decoding across a gap
    // would merge text that is not adjacent).
    let mut run: Vec<u32> = Vec::new();
    for (i, (&id, &m)) in ids.iter().zip(mask).enumerate() {
        if m == 1 {
            run.push(id);
        }
        if (m == 0 || i + 1 == ids.len()) && !run.is_empty() {
            got += &tokenizer.decode(&run, false).map_err(|e| anyhow::anyhow!("decode: {e}"))?;
            run.clear();
        }
    }
    Ok(got == want)
}

fn length_stats(lengths: &mut [usize]) -> Value {
    lengths.sort_unstable();
    let n = lengths.len();
    let pct = |p: f64| lengths[((n as f64 - 1.0) * p).round() as usize];
    serde_json::json!({
        "min": lengths[0],
        "mean": lengths.iter().sum::<usize>() as f64 / n as f64,
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": lengths[n - 1],
    })
}
