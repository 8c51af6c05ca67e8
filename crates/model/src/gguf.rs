//! Reading base weights from a GGUF file (llama.cpp's format).
//!
//! Tensors are dequantized to f32 and renamed from llama.cpp's names
//! (`blk.3.ffn_up.weight`) to Hugging Face's (`model.layers.3.mlp.up_proj.
//! weight`). llama.cpp stores every Gemma `*norm.weight` as `w + 1` (it
//! computes `x·w` where HF computes `x·(1 + w)`), so 1 is subtracted here.
//! See `../shared/reference/gguf-gemma3.md` for the mapping.

use std::collections::HashMap;
use std::path::Path;

use pipeline_fs::IoContext;

use crate::error::{Error, Result, bad_file};
use candle_core::Device;
use candle_core::quantized::{GgmlDType, gguf_file};
use pipeline_kernels::gemv::QuantLinear;

use super::{Arch, Weights, gemma3, qwen};

/// llama.cpp per-layer tensor name → HF name (after `model.layers.N.`), for
/// Gemma 3. Qwen differs in one place (see [`QWEN_FFN_NORM`]).
const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

/// In llama.cpp's Qwen models, `ffn_norm` is the norm before the MLP, which
/// HF calls `post_attention_layernorm` (Gemma 3 has both, see above).
const QWEN_FFN_NORM: &str = "post_attention_layernorm";

/// The HF name of a llama.cpp tensor name of architecture `arch`
/// (`gemma3`, `qwen2`, `qwen3`), if it is one we know.
pub fn hf_name_for(arch: &str, gguf_name: &str) -> Option<String> {
    if arch != "gemma3" && gguf_name.starts_with("blk.") && gguf_name.contains(".ffn_norm.") {
        let (layer, suffix) = gguf_name.strip_prefix("blk.")?.split_once(".ffn_norm.")?;
        return Some(format!("model.layers.{layer}.{QWEN_FFN_NORM}.{suffix}"));
    }
    hf_name(gguf_name)
}

/// The llama.cpp name of an HF tensor name (the inverse of [`hf_name_for`]).
pub fn gguf_name_for(arch: &str, hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let g = if arch != "gemma3" && base == QWEN_FFN_NORM {
        "ffn_norm"
    } else {
        LAYER_NAMES.iter().find(|(_, h)| *h == base)?.0
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// The HF name of a llama.cpp (Gemma 3) tensor name, if it is one we know.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let hf = LAYER_NAMES.iter().find(|(g, _)| *g == base)?.1;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Loads a GGUF model: architecture, config from the metadata, and weights
/// (dequantized to f32; with `keep_quantized`, the quantized matrices too).
pub fn load(path: &Path, device: &Device, keep_quantized: bool) -> Result<(Arch, Weights)> {
    let mut file = std::fs::File::open(path).on("open", path)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| bad_file(path, format!("not a GGUF file: {e}")))?;
    let arch = read_arch(&content, path)?;
    let arch_name = match &arch {
        Arch::Gemma3(_) => "gemma3",
        Arch::Qwen(qwen::Variant::Qwen2, _) => "qwen2",
        Arch::Qwen(qwen::Variant::Qwen3, _) => "qwen3",
    };
    let mut map = HashMap::new();
    let mut quantized = Vec::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name_for(arch_name, name) else {
            tracing::warn!(tensor = %name, "unknown GGUF tensor, ignored");
            continue;
        };
        let q = content.tensor(&mut file, name, device)?;
        let mut t = q.dequantize(device)?;
        if arch_name == "gemma3" && name.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        if keep_quantized && t.rank() == 2 && !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            // A prompt multiplies the layers' weights in full, the LM head
            // (tied to the embedding) at its last position only.
            let q = if hf.contains(".layers.") {
                QuantLinear::with_prefill(q, device)?
            } else {
                QuantLinear::new(q, device)?
            };
            quantized.push((hf.clone(), q));
        }
        map.insert(hf, t);
    }
    let mut w = Weights::new(map, device.clone(), path.display().to_string());
    for (name, q) in quantized {
        w.insert_quantized(name, q);
    }
    Ok((arch, w))
}

/// The architecture and its hyper-parameters from a GGUF's metadata.
fn read_arch(content: &gguf_file::Content, path: &Path) -> Result<Arch> {
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| bad_file(path, "no general.architecture"))?
        .clone();
    let u = |k: &str| -> Result<usize> {
        let key = format!("{arch}.{k}");
        Ok(md.get(&key).ok_or_else(|| bad_file(path, format!("missing metadata `{key}`")))?.to_u32()? as usize)
    };
    let f = |k: &str, default: f64| -> f64 {
        // The f32's shortest decimal (1e-6, not 9.999999974752427e-7), as
        // the config it was converted from stated it.
        let shortest = |x: f32| x.to_string().parse().unwrap_or(f64::from(x));
        md.get(&format!("{arch}.{k}")).and_then(|v| v.to_f32().ok()).map_or(default, shortest)
    };
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| bad_file(path, "no token_embd.weight"))?
        .shape
        .dims()[0];
    let heads = u("attention.head_count")?;
    match arch.as_str() {
        "gemma3" => Ok(Arch::Gemma3(gemma3::Config {
            vocab_size: vocab,
            hidden_size: u("embedding_length")?,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: u("attention.head_count_kv").unwrap_or(heads),
            head_dim: u("attention.key_length")?,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta: f("rope.freq_base", 1_000_000.0),
            rope_local_base_freq: f("rope.freq_base_swa", 10_000.0),
            sliding_window: u("attention.sliding_window").unwrap_or(512),
            sliding_window_pattern: 6,
            layer_types: None,
            query_pre_attn_scalar: u("attention.key_length")? as f64,
            max_position_embeddings: u("context_length")?,
            final_logit_softcapping: md
                .get(&format!("{arch}.final_logit_softcapping"))
                .and_then(|v| v.to_f32().ok())
                .map(f64::from),
            attn_logit_softcapping: None,
            rope_scaling: None,
        })),
        "qwen2" | "qwen3" => {
            let variant = if arch == "qwen3" { qwen::Variant::Qwen3 } else { qwen::Variant::Qwen2 };
            let hidden = u("embedding_length")?;
            Ok(Arch::Qwen(
                variant,
                qwen::Config {
                    vocab_size: vocab,
                    hidden_size: hidden,
                    intermediate_size: u("feed_forward_length")?,
                    num_hidden_layers: u("block_count")?,
                    num_attention_heads: heads,
                    num_key_value_heads: u("attention.head_count_kv").unwrap_or(heads),
                    head_dim: Some(u("attention.key_length").unwrap_or(hidden / heads)),
                    rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-6),
                    rope_theta: f("rope.freq_base", 1_000_000.0),
                    max_position_embeddings: u("context_length")?,
                    tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
                    attention_bias: variant == qwen::Variant::Qwen3
                        && content.tensor_infos.contains_key("blk.0.attn_q.bias"),
                    use_sliding_window: false,
                    hidden_act: "silu".into(),
                },
            ))
        }
        other => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF architecture `{other}` is not supported (supported: gemma3, qwen2, qwen3)",
                path.display()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hf_name;

    #[test]
    fn maps_llama_cpp_names_including_the_gemma_norm_traps() {
        assert_eq!(hf_name("blk.3.ffn_norm.weight").unwrap(), "model.layers.3.pre_feedforward_layernorm.weight");
        assert_eq!(
            hf_name("blk.3.post_attention_norm.weight").unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("blk.17.attn_output.weight").unwrap(), "model.layers.17.self_attn.o_proj.weight");
        assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf_name("blk.1.nonsense.weight").is_none());
    }
}
