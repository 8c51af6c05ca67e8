//! Gemma 3 (text), differentiable, with LoRA-capable linear layers.
//!
//! Per layer (HF `Gemma3DecoderLayer`):
//!
//! ```text
//! h = x + post_attn_norm(attn(input_norm(x)))
//! y = h + post_ff_norm(down(gelu_tanh(gate(n)) * up(n)))     n = pre_ff_norm(h)
//! ```
//!
//! Attention: grouped-query, per-head RMSNorm on q and k, rotary embeddings
//! (base 10 000 on sliding layers, `rope_theta` on global ones), query scale
//! `query_pre_attn_scalar^-½`, causal mask plus a sliding window on local
//! layers (five local, then one global). Embeddings are scaled by
//! `sqrt(hidden)`, tied to the LM head. Every RMSNorm multiplies by `1 + w`.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::Weights;
use super::decoder::Decoder;
use super::family::Family;
use super::gguf_meta::{GgufMetadata, MetaValue};
use super::kv::{Seq, is_step, per_sequence};
use super::lora::{DropoutMask, LoraLinear};
use super::ops::{Rope, cached_attention, gelu_tanh, rms_norm};

/// The hyper-parameters of a Gemma 3 text model (HF `Gemma3TextConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "rope_local")]
    pub rope_local_base_freq: f64,
    #[serde(default = "window")]
    pub sliding_window: usize,
    #[serde(default = "pattern")]
    pub sliding_window_pattern: usize,
    /// Per-layer `sliding_attention` / `full_attention` (newer configs).
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "scalar")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Linear rope scaling (4B and larger).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn eps() -> f64 {
    1e-6
}
fn rope_theta() -> f64 {
    1_000_000.0
}
fn rope_local() -> f64 {
    10_000.0
}
fn window() -> usize {
    512
}
fn pattern() -> usize {
    6
}
fn scalar() -> f64 {
    256.0
}
fn max_pos() -> usize {
    32_768
}

/// llama.cpp's per-layer tensor names and transformers' (after
/// `model.layers.N.`). Gemma 3 has four norms a layer: llama.cpp's
/// `ffn_norm` is the norm before the MLP.
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

impl Family for Config {
    fn model_types() -> &'static [&'static str] {
        &["gemma3_text", "gemma3"]
    }

    fn gguf_archs() -> &'static [&'static str] {
        &["gemma3"]
    }

    fn from_hf_config(_model_type: &str, config: serde_json::Value) -> serde_json::Result<Config> {
        serde_json::from_value(config)
    }

    fn from_gguf(md: &GgufMetadata) -> crate::Result<Config> {
        let heads = md.u("attention.head_count")?;
        Ok(Config {
            vocab_size: md.vocab_size()?,
            hidden_size: md.u("embedding_length")?,
            intermediate_size: md.u("feed_forward_length")?,
            num_hidden_layers: md.u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: md.u("attention.head_count_kv").unwrap_or(heads),
            head_dim: md.u("attention.key_length")?,
            rms_norm_eps: md.f("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta: md.f("rope.freq_base", 1_000_000.0),
            rope_local_base_freq: md.f("rope.freq_base_swa", 10_000.0),
            sliding_window: md.u("attention.sliding_window").unwrap_or(512),
            sliding_window_pattern: 6,
            layer_types: None,
            query_pre_attn_scalar: md.u("attention.key_length")? as f64,
            max_position_embeddings: md.u("context_length")?,
            final_logit_softcapping: md.f_opt("final_logit_softcapping"),
            attn_logit_softcapping: None,
            rope_scaling: None,
        })
    }

    fn hf_config(&self) -> serde_json::Value {
        let c = self;
        let full = match c.rope_scaling.as_ref().and_then(|s| s.get("factor")) {
            Some(f) => serde_json::json!({"rope_type": "linear", "factor": f, "rope_theta": c.rope_theta}),
            None => serde_json::json!({"rope_type": "default", "rope_theta": c.rope_theta}),
        };
        serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps,
            // An int in Gemma3TextConfig (transformers 5 checks types).
            "query_pre_attn_scalar": c.query_pre_attn_scalar.round() as u64,
            "sliding_window": c.sliding_window,
            "layer_types": (0..c.num_hidden_layers)
                .map(|i| if c.is_sliding(i) { "sliding_attention" } else { "full_attention" })
                .collect::<Vec<_>>(),
            "final_logit_softcapping": c.final_logit_softcapping,
            "attn_logit_softcapping": c.attn_logit_softcapping,
            "rope_parameters": {
                "full_attention": full,
                "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_base_freq},
            },
            "tie_word_embeddings": true,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_bidirectional_attention": false,
            "use_cache": true,
        })
    }

    fn gguf_arch(&self) -> &'static str {
        "gemma3"
    }

    fn gguf_hparams(&self) -> crate::Result<Vec<(String, MetaValue)>> {
        let c = self;
        let k = |key: &str| format!("gemma3.{key}");
        let mut md = vec![
            (k("context_length"), MetaValue::U32(c.max_position_embeddings as u32)),
            (k("embedding_length"), MetaValue::U32(c.hidden_size as u32)),
            (k("block_count"), MetaValue::U32(c.num_hidden_layers as u32)),
            (k("feed_forward_length"), MetaValue::U32(c.intermediate_size as u32)),
            (k("attention.head_count"), MetaValue::U32(c.num_attention_heads as u32)),
            (k("attention.head_count_kv"), MetaValue::U32(c.num_key_value_heads as u32)),
            (k("attention.key_length"), MetaValue::U32(c.head_dim as u32)),
            (k("attention.value_length"), MetaValue::U32(c.head_dim as u32)),
            (k("attention.layer_norm_rms_epsilon"), MetaValue::F32(c.rms_norm_eps as f32)),
            (k("rope.freq_base"), MetaValue::F32(c.rope_theta as f32)),
            (k("rope.freq_base_swa"), MetaValue::F32(c.rope_local_base_freq as f32)),
            (k("attention.sliding_window"), MetaValue::U32(c.sliding_window as u32)),
        ];
        if let Some(cap) = c.final_logit_softcapping {
            md.push((k("final_logit_softcapping"), MetaValue::F32(cap as f32)));
        }
        Ok(md)
    }

    fn gguf_layer_names(&self) -> &'static [(&'static str, &'static str)] {
        LAYER_NAMES
    }

    /// llama.cpp multiplies Gemma's norms by `w`, transformers by `1 + w`.
    fn tensor_from_gguf(&self, hf: &str, t: Tensor) -> crate::Result<Tensor> {
        Ok(if hf.ends_with("norm.weight") { (t - 1.0)? } else { t })
    }

    fn tensor_to_gguf(&self, hf: &str, t: Tensor) -> crate::Result<Tensor> {
        Ok(if hf.ends_with("norm.weight") { (t + 1.0)? } else { t })
    }

    fn gguf_tokenizer(&self) -> (&'static str, &'static str) {
        ("default", "llama")
    }

    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    fn build(&self, weights: &mut Weights, max_positions: usize) -> crate::Result<Box<dyn crate::CausalLm>> {
        Ok(Box::new(Gemma3::new(self.clone(), weights, max_positions)?))
    }

    fn random_shapes() -> &'static [(&'static str, &'static str)] {
        &[
            ("gemma3", "Gemma 3, two layers (one sliding, one global), 64 wide"),
            ("gemma3-270m", "Gemma 3 270M's shape: 18 layers, 640 wide"),
            ("gemma3-1b", "Gemma 3 1B's shape: 26 layers, 1152 wide"),
        ]
    }

    fn write_random(
        name: &str,
        vocab_size: usize,
        dir: &std::path::Path,
        tokenizer: &std::path::Path,
        seed: u64,
        dtype: candle_core::DType,
    ) -> crate::Result<()> {
        use crate::testing::TinyGemma3;
        let shape = match name {
            "gemma3-270m" => TinyGemma3::gemma3_270m(vocab_size),
            "gemma3-1b" => TinyGemma3::gemma3_1b(vocab_size),
            _ => TinyGemma3::new(vocab_size),
        };
        shape.write_as(dir, tokenizer, seed, dtype)
    }
}

impl Config {
    /// Whether layer `i` uses sliding-window attention.
    pub fn is_sliding(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            None => (i + 1) % self.sliding_window_pattern != 0,
        }
    }

    fn rope_scale(&self) -> f64 {
        self.rope_scaling.as_ref().and_then(|s| s.get("factor")).and_then(|f| f.as_f64()).unwrap_or(1.0)
    }
}

struct Layer {
    input_norm: Tensor,
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    q_norm: Tensor,
    k_norm: Tensor,
    post_attn_norm: Tensor,
    pre_ff_norm: Tensor,
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
    post_ff_norm: Tensor,
    sliding: bool,
}

/// A Gemma 3 text model.
pub struct Gemma3 {
    pub cfg: Config,
    embed: Tensor,
    /// The LM head (tied embeddings) kept quantized for decoding, when the
    /// weights came from a GGUF loaded for inference.
    embed_q: Option<std::sync::Arc<pipeline_kernels::gemv::QuantLinear>>,
    layers: Vec<Layer>,
    norm: Tensor,
    rope_local: Rope,
    rope_global: Rope,
    device: Device,
}

impl Gemma3 {
    /// Builds the model from HF-named weights (`model.layers.N.…`).
    pub fn new(cfg: Config, w: &mut Weights, max_positions: usize) -> crate::Result<Gemma3> {
        let device = w.device().clone();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    input_norm: w.take(&format!("{p}.input_layernorm.weight"))?,
                    q: w.linear(&format!("{p}.self_attn.q_proj"), false)?,
                    k: w.linear(&format!("{p}.self_attn.k_proj"), false)?,
                    v: w.linear(&format!("{p}.self_attn.v_proj"), false)?,
                    o: w.linear(&format!("{p}.self_attn.o_proj"), false)?,
                    q_norm: w.take(&format!("{p}.self_attn.q_norm.weight"))?,
                    k_norm: w.take(&format!("{p}.self_attn.k_norm.weight"))?,
                    post_attn_norm: w.take(&format!("{p}.post_attention_layernorm.weight"))?,
                    pre_ff_norm: w.take(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                    gate: w.linear(&format!("{p}.mlp.gate_proj"), false)?,
                    up: w.linear(&format!("{p}.mlp.up_proj"), false)?,
                    down: w.linear(&format!("{p}.mlp.down_proj"), false)?,
                    post_ff_norm: w.take(&format!("{p}.post_feedforward_layernorm.weight"))?,
                    sliding: cfg.is_sliding(i),
                })
            })
            .collect::<crate::Result<Vec<_>>>()?;
        let embed = w.frozen("model.embed_tokens.weight")?;
        let embed_q = w.take_quantized("model.embed_tokens.weight");
        let norm = w.take("model.norm.weight")?;
        let rope_local = Rope::new(cfg.rope_local_base_freq, cfg.head_dim, max_positions, 1.0, &device)?;
        let rope_global = Rope::new(cfg.rope_theta, cfg.head_dim, max_positions, cfg.rope_scale(), &device)?;
        Ok(Gemma3 { cfg, embed, embed_q, layers, norm, rope_local, rope_global, device })
    }

    /// One decoder layer on `x: [T, hidden]`, the rows of `seqs`.
    fn layer(&self, l: &Layer, x: &Tensor, seqs: &mut [Seq<'_>], dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let step = is_step(seqs);
        let n = rms_norm(x, &l.input_norm, eps, 1.0)?;
        let attn = self.attention(l, &n, seqs, dropout, step)?;
        let h = (x + rms_norm(&attn, &l.post_attn_norm, eps, 1.0)?)?;
        let n = rms_norm(&h, &l.pre_ff_norm, eps, 1.0)?;
        let [gate, up] = LoraLinear::forward_in([&l.gate, &l.up], &n, dropout, step)?;
        let [ff] = LoraLinear::forward_in([&l.down], &(gelu_tanh(&gate)? * up)?, dropout, step)?;
        h + rms_norm(&ff, &l.post_ff_norm, eps, 1.0)?
    }

    /// `step`: a batched decoding step ([`LoraLinear::forward_in`]).
    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        seqs: &mut [Seq<'_>],
        dropout: Option<&dyn DropoutMask>,
        step: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (t, _) = x.dims2()?;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps;
        // [T, heads·hd] → [heads, T, hd]
        let heads = |y: Tensor, n: usize| y.reshape((t, n, hd))?.transpose(0, 1)?.contiguous();
        let [q, k, v] = LoraLinear::forward_in([&l.q, &l.k, &l.v], x, dropout, step)?;
        let q = rms_norm(&heads(q, nh)?, &l.q_norm, eps, 1.0)?;
        let k = rms_norm(&heads(k, nkv)?, &l.k_norm, eps, 1.0)?;
        let v = heads(v, nkv)?;
        let rope = if l.sliding { &self.rope_local } else { &self.rope_global };
        let window = l.sliding.then_some(cfg.sliding_window);
        let out = per_sequence(&q, &k, &v, seqs, |q, k, v, seq| {
            let (t, start) = (seq.len, seq.start);
            let q = (rope.apply(&q, start)? * cfg.query_pre_attn_scalar.powf(-0.5))?;
            let k = rope.apply(&k, start)?;
            let (k, v) = match seq.kv.as_deref_mut() {
                Some(kv) => kv.append(&k, &v)?,
                None => (k, v),
            };
            // Grouped-query attention without copying k/v: q heads of one kv
            // group are stacked along the time axis.
            let group = nh / nkv;
            let q = q.reshape((nkv, group * t, hd))?;
            let out = cached_attention(&q, &k, &v, t, start, window, cfg.attn_logit_softcapping)?; // [nkv, group·T, hd]
            out.reshape((nh, t, hd))?.transpose(0, 1)?.reshape((t, nh * hd))
        })?;
        let [out] = LoraLinear::forward_in([&l.o], &out, dropout, step)?;
        Ok(out)
    }
}

impl Decoder for Gemma3 {
    fn device(&self) -> &Device {
        &self.device
    }

    fn max_position_embeddings(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn max_positions(&self) -> usize {
        self.rope_global.cos.dim(0).unwrap_or(0)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn layer_linears(&mut self) -> Vec<[&mut LoraLinear; 7]> {
        self.layers
            .iter_mut()
            .map(|l| [&mut l.q, &mut l.k, &mut l.v, &mut l.o, &mut l.gate, &mut l.up, &mut l.down])
            .collect()
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, &self.device)?;
        self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)? * (self.cfg.hidden_size as f64).sqrt()
    }

    fn layer(&self, i: usize, x: &Tensor, seqs: &mut [Seq<'_>], dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        Gemma3::layer(self, &self.layers[i], x, seqs, dropout)
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps, 1.0)
    }

    /// The LM head is the embedding matrix.
    fn loss(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        match self.cfg.final_logit_softcapping {
            None => super::ops::linear_cross_entropy(hidden, &self.embed, targets),
            Some(_) => super::ops::cross_entropy(&self.logits(hidden)?, &Tensor::new(targets, hidden.device())?),
        }
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = super::lora::head_logits(hidden, &self.embed, self.embed_q.as_deref())?;
        match self.cfg.final_logit_softcapping {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LAYER_NAMES;
    use crate::family::{gguf_name, hf_name};

    #[test]
    fn maps_llama_cpp_names_including_the_gemma_norm_traps() {
        let hf = |g: &str| hf_name(LAYER_NAMES, g);
        assert_eq!(hf("blk.3.ffn_norm.weight").unwrap(), "model.layers.3.pre_feedforward_layernorm.weight");
        assert_eq!(hf("blk.3.post_attention_norm.weight").unwrap(), "model.layers.3.post_attention_layernorm.weight");
        assert_eq!(hf("blk.17.attn_output.weight").unwrap(), "model.layers.17.self_attn.o_proj.weight");
        assert_eq!(hf("token_embd.weight").unwrap(), "model.embed_tokens.weight");
        assert!(hf("blk.1.nonsense.weight").is_none());
        for (g, _) in LAYER_NAMES {
            let name = format!("blk.5.{g}.weight");
            assert_eq!(gguf_name(LAYER_NAMES, &hf(&name).unwrap()).unwrap(), name, "round trip");
        }
    }
}
