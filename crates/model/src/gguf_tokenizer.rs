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
//! way. The files are written once per distinct content under the system's
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

/// `tokenizer.json` and `tokenizer_config.json` for the GGUF at `path`, or
/// `None` when it carries no vocabulary.
pub fn tokenizer_files(path: &Path) -> Result<Option<(Json, Json)>> {
    let mut file = std::fs::File::open(path).on("open", path)?;
    let content = Content::read(&mut file).map_err(|e| bad_file(path, format!("not a GGUF file: {e}")))?;
    let md = &content.metadata;
    let s = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
    let Some(model) = s("tokenizer.ggml.model") else { return Ok(None) };
    if model != "gpt2" {
        return Err(Error::Unsupported(format!(
            "{}: its tokenizer is `{model}` (SentencePiece); only byte-level BPE vocabularies (`gpt2`) are read \
             from a GGUF so far: put the model's tokenizer.json and tokenizer_config.json beside it",
            path.display()
        )));
    }
    let strings = |k: &str| -> Result<Vec<String>> {
        match md.get(k) {
            Some(Value::Array(a)) => Ok(a.iter().filter_map(|v| v.to_string().ok().cloned()).collect()),
            _ => Err(bad_file(path, format!("no `{k}` list"))),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let pre = s("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
    let Some(regexes) = pre_tokenizer_regexes(&pre) else {
        return Err(Error::Unsupported(format!(
            "{}: pre-tokenizer `{pre}` is not known here; put the model's tokenizer.json beside it",
            path.display()
        )));
    };

    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    // Control (3) and user-defined (4) tokens are matched whole before the
    // split, as llama.cpp does.
    let added: Vec<Json> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(i, t)| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *t == 3})
        })
        .collect();
    let mut splits: Vec<Json> = regexes
        .iter()
        .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
        .collect();
    splits.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });

    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok()).and_then(|i| tokens.get(i as usize)).cloned();
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
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
