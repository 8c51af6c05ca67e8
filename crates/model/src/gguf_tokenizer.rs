//! The tokenizer a GGUF file carries, as `tokenizer.json` and
//! `tokenizer_config.json`: a model downloaded as a GGUF alone is a
//! complete model.
//!
//! llama.cpp keeps the vocabulary in `tokenizer.ggml.*` (tokens, their
//! types, BPE merges, the pre-tokenizer's name, special-token ids) and the
//! chat template in `tokenizer.chat_template`. Byte-level BPE vocabularies
//! (`tokenizer.ggml.model = "gpt2"`: SmolLM, Llama 3, Qwen) become a
//! Hugging Face BPE tokenizer with the pre-tokenizer regexes llama.cpp
//! applies for that name (`llama-vocab.cpp`), so both split text the same
//! way. SentencePiece vocabularies (`llama`: Gemma, Llama 2) become the
//! BPE tokenizer transformers converts them to, with merges ranked by the
//! pieces' scores. The files are written once per distinct content under the system's
//! temporary directory (`pipeline-gguf-tokenizers/<hash>/`), named after
//! what they hold: the same GGUF always gives the same files.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use pipeline_fs::IoContext;
use serde_json::{Value as Json, json};

use crate::error::{Error, Result, bad_file};

/// GPT-2's split (llama.cpp's default for BPE vocabularies).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// The regexes llama.cpp splits text with before BPE, by
/// `tokenizer.ggml.pre`, applied in order (each splits the pieces the
/// previous left).
fn pre_tokenizer_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => vec![GPT2],
        "smollm" | "starcoder" | "refact" | "command-r" => vec![r"\p{N}", GPT2],
        "llama-bpe" | "llama3" | "falcon3" | "pixtral" => vec![
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "qwen2" | "deepseek-r1-qwen" => vec![
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        _ => return None,
    })
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const BYTE: i32 = 6;
}

/// The vocabulary lists of a GGUF's metadata.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
}

impl Vocab {
    /// Control and user-defined tokens, matched whole before the text is
    /// split, as llama.cpp does; `content` is the text each is matched on.
    fn added_tokens(&self, content: impl Fn(usize) -> String) -> Vec<Json> {
        self.types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == token_type::CONTROL || **t == token_type::USER_DEFINED)
            .map(|(i, t)| {
                json!({"id": i, "content": content(i), "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": *t == token_type::CONTROL})
            })
            .collect()
    }
}

/// `tokenizer.json` and `tokenizer_config.json` for the GGUF at `path`, or
/// `None` when it carries no vocabulary.
pub fn tokenizer_files(path: &Path) -> Result<Option<(Json, Json)>> {
    let mut file = std::fs::File::open(path).on("open", path)?;
    let content = Content::read(&mut file).map_err(|e| bad_file(path, format!("not a GGUF file: {e}")))?;
    let md = &content.metadata;
    let s = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
    let flag = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
    let Some(model) = s("tokenizer.ggml.model") else { return Ok(None) };
    let list = |k: &str| match md.get(k) {
        Some(Value::Array(a)) => Ok(a),
        _ => Err(bad_file(path, format!("no `{k}` list"))),
    };
    let tokens: Vec<String> =
        list("tokenizer.ggml.tokens")?.iter().filter_map(|v| v.to_string().ok().cloned()).collect();
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab = Vocab { tokens, types };
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(false);
    let bos = md.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok());
    let tokenizer = match model.as_str() {
        "gpt2" => {
            let merges: Vec<String> =
                list("tokenizer.ggml.merges")?.iter().filter_map(|v| v.to_string().ok().cloned()).collect();
            let pre = s("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
            let Some(regexes) = pre_tokenizer_regexes(&pre) else {
                return Err(Error::Unsupported(format!(
                    "{}: pre-tokenizer `{pre}` is not known here; put the model's tokenizer.json beside it",
                    path.display()
                )));
            };
            byte_level_bpe(&vocab, &merges, &regexes)
        }
        "llama" => {
            let scores: Vec<f32> = list("tokenizer.ggml.scores")?.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect();
            if scores.len() != vocab.tokens.len() {
                return Err(bad_file(path, "`tokenizer.ggml.scores` and `tokenizer.ggml.tokens` differ in length"));
            }
            let prefix_space = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let bos = bos.filter(|_| add_bos).and_then(|i| vocab.tokens.get(i as usize).map(|t| (i, t.clone())));
            sentencepiece_bpe(&vocab, &scores, prefix_space, bos)
        }
        other => {
            return Err(Error::Unsupported(format!(
                "{}: its tokenizer is `{other}`; byte-level BPE (`gpt2`) and SentencePiece BPE (`llama`) \
                 vocabularies are read from a GGUF: put the model's tokenizer.json and tokenizer_config.json \
                 beside it",
                path.display()
            )));
        }
    };

    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok()).and_then(|i| vocab.tokens.get(i as usize)).cloned();
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": md
            .get(&format!("{}.context_length", s("general.architecture").unwrap_or_default()))
            .and_then(|v| v.to_u32().ok())
            .unwrap_or(8192),
    });
    for (key, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
    ] {
        if let Some(t) = id(key) {
            config[name] = json!(t);
        }
    }
    if let Some(t) = s("tokenizer.chat_template") {
        config["chat_template"] = json!(t);
    }
    Ok(Some((tokenizer, config)))
}

/// A byte-level BPE vocabulary (`gpt2`: SmolLM, Llama 3, Qwen): llama.cpp's
/// regex split for the pre-tokenizer's name, then GPT-2's byte mapping and
/// the GGUF's merges.
fn byte_level_bpe(vocab: &Vocab, merges: &[String], regexes: &[&str]) -> Json {
    let ids: serde_json::Map<String, Json> =
        vocab.tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let mut splits: Vec<Json> = regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
    splits.push(byte_level.clone());
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(|i| vocab.tokens[i].clone()),
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits},
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": ids, "merges": merges,
        },
    })
}

/// A SentencePiece BPE vocabulary (`llama`: Gemma, Llama 2, TinyLlama) as
/// transformers converts one: spaces become `▁`, unknown characters fall
/// back to `<0xNN>` byte tokens, and the merges are those SentencePiece's
/// scores imply. llama.cpp merges the adjacent pair whose joined piece
/// scores highest; a BPE merge list ranked by that score (each piece's
/// splits into two vocabulary pieces, longer left part first) does the
/// same, as transformers' `SentencePieceExtractor` builds it. llama.cpp's
/// converter writes user-defined pieces with spaces for `▁` and scores of
/// -1000 for user-defined and control pieces, which SentencePiece scores 0;
/// both are undone here, so the vocabulary and merges are the original's.
fn sentencepiece_bpe(vocab: &Vocab, scores: &[f32], prefix_space: bool, bos: Option<(u32, String)>) -> Json {
    let pieces: Vec<String> = vocab
        .tokens
        .iter()
        .zip(&vocab.types)
        .map(|(t, ty)| if *ty == token_type::USER_DEFINED { t.replace(' ', "▁") } else { t.clone() })
        .collect();
    let ids: std::collections::HashMap<&str, usize> = pieces.iter().enumerate().map(|(i, p)| (p.as_str(), i)).collect();
    let score = |i: usize| match vocab.types[i] {
        token_type::CONTROL | token_type::USER_DEFINED => 0.0,
        _ => scores[i],
    };
    // (left, right, score of the joined piece), in vocabulary order, each
    // piece's splits by the ids of their parts.
    let chars: Vec<usize> = pieces.iter().map(|p| p.chars().count()).collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        if vocab.types[i] == token_type::BYTE {
            continue;
        }
        let start = merges.len();
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..at]), ids.get(&piece[at..])) {
                merges.push((l, r, score(i)));
            }
        }
        merges[start..].sort_by_key(|&(l, r, _)| (l, r));
    }
    // Highest score first, then longer left part, then longer right part;
    // a stable sort keeps the order above among equals (as Python's does:
    // -0.0, the first normal piece's score, equals a special piece's 0).
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(chars[b.0].cmp(&chars[a.0]))
            .then(chars[b.1].cmp(&chars[a.1]))
    });
    let merges: Vec<[&str; 2]> = merges.iter().map(|&(l, r, _)| [pieces[l].as_str(), pieces[r].as_str()]).collect();
    let unk = vocab.types.iter().position(|t| *t == token_type::UNKNOWN).map(|i| pieces[i].clone());

    let replace = |from: &str, to: &str| json!({"type": "Replace", "pattern": {"String": from}, "content": to});
    // With a space prefix (Llama 2), every run of text after a special
    // token starts with one, as llama.cpp and transformers' legacy Llama
    // tokenizer do.
    let normalizer = if prefix_space {
        json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace(" ", "▁")]})
    } else {
        replace(" ", "▁")
    };
    let mut decoders = vec![replace("▁", " "), json!({"type": "ByteFallback"}), json!({"type": "Fuse"})];
    if prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let post_processor = bos.map(|(id, bos)| {
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos.as_str(): {"id": bos, "ids": [id], "tokens": [bos]}},
        })
    });
    let ids: serde_json::Map<String, Json> = pieces.iter().enumerate().map(|(i, p)| (p.clone(), json!(i))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(|i| pieces[i].clone()),
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": ids, "merges": merges,
        },
    })
}

/// Writes [`tokenizer_files`] of `gguf` under the temporary directory and
/// returns that directory (`None` when the GGUF carries no vocabulary).
pub fn materialize(gguf: &Path) -> Result<Option<PathBuf>> {
    let Some((tokenizer, config)) = tokenizer_files(gguf)? else { return Ok(None) };
    let tokenizer = serde_json::to_vec(&tokenizer).expect("serializes");
    let config = serde_json::to_vec_pretty(&config).expect("serializes");
    let mut h = blake3::Hasher::new();
    h.update(&tokenizer);
    h.update(&config);
    let dir = std::env::temp_dir().join("pipeline-gguf-tokenizers").join(&h.finalize().to_hex()[..16]);
    if !dir.join("tokenizer_config.json").is_file() {
        // Written beside, then renamed into place: a reader never sees half
        // a directory.
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        std::fs::create_dir_all(&tmp).on("create", &tmp)?;
        std::fs::write(tmp.join("tokenizer.json"), &tokenizer).on("write", &tmp)?;
        std::fs::write(tmp.join("tokenizer_config.json"), &config).on("write", &tmp)?;
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process wrote the same files first.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    Ok(Some(dir))
}
