//! Reading base weights from a GGUF file (llama.cpp's format).
//!
//! Tensors are dequantized to f32 and renamed from llama.cpp's names
//! (`blk.3.ffn_up.weight`) to Hugging Face's (`model.layers.3.mlp.up_proj.
//! weight`). llama.cpp stores every Gemma `*norm.weight` as `w + 1` (it
//! computes `x·w` where HF computes `x·(1 + w)`), so 1 is subtracted here.
//! See `../shared/reference/gguf-gemma3.md` for the mapping.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_core::quantized::gguf_file;

use super::{Arch, Weights, gemma3};

/// llama.cpp per-layer tensor name → HF name (after `model.layers.N.`).
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

/// The HF name of a llama.cpp tensor name, if it is one we know.
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

/// Loads a GGUF model: architecture, config from the metadata, and weights.
pub fn load(path: &Path, device: &Device) -> Result<(Arch, Weights)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content =
        gguf_file::Content::read(&mut file).with_context(|| format!("{}: not a GGUF file", path.display()))?;
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .with_context(|| format!("{}: no general.architecture", path.display()))?
        .clone();
    if arch != "gemma3" {
        bail!("{}: GGUF architecture `{arch}` is not supported yet (supported: gemma3)", path.display());
    }
    let u = |k: &str| -> Result<usize> {
        let key = format!("{arch}.{k}");
        Ok(md.get(&key).with_context(|| format!("{}: missing metadata `{key}`", path.display()))?.to_u32()? as usize)
    };
    let f = |k: &str, default: f64| -> f64 {
        md.get(&format!("{arch}.{k}")).and_then(|v| v.to_f32().ok()).map_or(default, f64::from)
    };
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .with_context(|| format!("{}: no token_embd.weight", path.display()))?
        .shape
        .dims()[0];
    let heads = u("attention.head_count")?;
    let cfg = gemma3::Config {
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
    };
    let mut map = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else {
            tracing::warn!(tensor = %name, "unknown GGUF tensor, ignored");
            continue;
        };
        let q = content.tensor(&mut file, name, device)?;
        let mut t = q.dequantize(device)?;
        if name.ends_with("norm.weight") {
            t = (t - 1.0)?;
        }
        map.insert(hf, t);
    }
    Ok((Arch::Gemma3(cfg), Weights::new(map, device.clone(), path.display().to_string())))
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
