//! Qwen2 and Qwen3 (dense), differentiable, with LoRA-capable linear layers;
//! the Llama family ([`crate::llama`]) runs on the same decoder.
//!
//! The generations share one decoder and differ in two switches: Qwen2 has
//! biases on q/k/v and no q/k norm; Qwen3 has no biases (`attention_bias =
//! false`) and an RMSNorm on each head of q and k, before the rotary
//! embedding; Llama has neither, and may scale its rotary frequencies
//! (Llama 3). Per layer (HF `Qwen3DecoderLayer`):
//!
//! ```text
//! h = x + o(attn(input_norm(x)))
//! y = h + down(silu(gate(n)) * up(n))      n = post_attention_norm(h)
//! ```
//!
//! Attention is grouped-query and causal, with rotary embeddings (base
//! `rope_theta`) and scale `head_dim^-½`. RMSNorm multiplies by `w` (no
//! offset). The LM head is tied to the embeddings unless `lm_head.weight`
//! exists.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use pipeline_kernels::gemv::QuantLinear;

use super::Weights;
use super::decoder::Decoder;
use super::family::Family;
use super::gguf_meta::{GgufMetadata, MetaValue};
use super::kv::{Seq, is_step, per_sequence};
use super::lora::{DropoutMask, LoraLinear};
use super::ops::{Rope, cached_attention, rms_norm};

pub use crate::decoder::Variant;

/// The hyper-parameters of a Qwen2 / Qwen3 model (HF config.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Qwen3 states it; Qwen2 uses hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen3's switch for q/k/v/o biases (Qwen2 always has q/k/v biases).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// Which generation (from `model_type`, not a config.json field).
    #[serde(skip)]
    pub variant: Variant,
    /// Rotary frequencies other than `rope_theta`'s (Llama 3's scaled ones).
    #[serde(skip)]
    pub rope_inv_freq: Option<Vec<f32>>,
}

fn eps() -> f64 {
    1e-6
}
fn theta() -> f64 {
    1_000_000.0
}
fn max_pos() -> usize {
    32_768
}
fn silu() -> String {
    "silu".into()
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The `<arch>.*` GGUF hyper-parameters of this decoder (Qwen and Llama
    /// write the same keys).
    pub fn gguf_hparams_as(&self, arch: &str) -> Vec<(String, MetaValue)> {
        let k = |key: &str| format!("{arch}.{key}");
        vec![
            (k("context_length"), MetaValue::U32(self.max_position_embeddings as u32)),
            (k("embedding_length"), MetaValue::U32(self.hidden_size as u32)),
            (k("block_count"), MetaValue::U32(self.num_hidden_layers as u32)),
            (k("feed_forward_length"), MetaValue::U32(self.intermediate_size as u32)),
            (k("attention.head_count"), MetaValue::U32(self.num_attention_heads as u32)),
            (k("attention.head_count_kv"), MetaValue::U32(self.num_key_value_heads as u32)),
            (k("attention.key_length"), MetaValue::U32(self.head_dim() as u32)),
            (k("attention.value_length"), MetaValue::U32(self.head_dim() as u32)),
            (k("attention.layer_norm_rms_epsilon"), MetaValue::F32(self.rms_norm_eps as f32)),
            (k("rope.freq_base"), MetaValue::F32(self.rope_theta as f32)),
        ]
    }

    /// The decoder's hyper-parameters in a GGUF file's metadata.
    pub fn from_gguf_as(md: &GgufMetadata, variant: Variant) -> crate::Result<Config> {
        let heads = md.u("attention.head_count")?;
        let hidden = md.u("embedding_length")?;
        Ok(Config {
            vocab_size: md.vocab_size()?,
            hidden_size: hidden,
            intermediate_size: md.u("feed_forward_length")?,
            num_hidden_layers: md.u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: md.u("attention.head_count_kv").unwrap_or(heads),
            head_dim: Some(md.u("attention.key_length").unwrap_or(hidden / heads)),
            rms_norm_eps: md.f("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta: md.f("rope.freq_base", if variant == Variant::Llama { 10_000.0 } else { 1_000_000.0 }),
            max_position_embeddings: md.u("context_length")?,
            tie_word_embeddings: !md.has_tensor("output.weight"),
            attention_bias: variant != Variant::Qwen2 && md.has_tensor("blk.0.attn_q.bias"),
            use_sliding_window: false,
            hidden_act: "silu".into(),
            variant,
            rope_inv_freq: None,
        })
    }
}

/// llama.cpp's per-layer tensor names and transformers' (after
/// `model.layers.N.`), for this decoder: llama.cpp's `ffn_norm` is the norm
/// before the MLP, which transformers calls `post_attention_layernorm`.
pub const LAYER_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

impl Family for Config {
    fn model_types() -> &'static [&'static str] {
        &["qwen3", "qwen2"]
    }

    fn gguf_archs() -> &'static [&'static str] {
        &["qwen3", "qwen2"]
    }

    fn from_hf_config(model_type: &str, config: serde_json::Value) -> serde_json::Result<Config> {
        let mut c: Config = serde_json::from_value(config)?;
        c.variant = if model_type == "qwen3" { Variant::Qwen3 } else { Variant::Qwen2 };
        Ok(c)
    }

    fn from_gguf(md: &GgufMetadata) -> crate::Result<Config> {
        Config::from_gguf_as(md, if md.arch == "qwen3" { Variant::Qwen3 } else { Variant::Qwen2 })
    }

    fn hf_config(&self) -> serde_json::Value {
        let c = self;
        let (ty, class) = match c.variant {
            Variant::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
            _ => ("qwen2", "Qwen2ForCausalLM"),
        };
        let mut v = serde_json::json!({
            "architectures": [class],
            "model_type": ty,
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "hidden_act": c.hidden_act,
            "max_position_embeddings": c.max_position_embeddings,
            "max_window_layers": c.num_hidden_layers,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "tie_word_embeddings": c.tie_word_embeddings,
            "use_sliding_window": c.use_sliding_window,
            "sliding_window": null,
            "layer_types": vec!["full_attention"; c.num_hidden_layers],
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
        });
        if c.variant == Variant::Qwen3 {
            v["head_dim"] = c.head_dim().into();
            v["attention_bias"] = c.attention_bias.into();
        }
        v
    }

    fn gguf_arch(&self) -> &'static str {
        match self.variant {
            Variant::Qwen3 => "qwen3",
            _ => "qwen2",
        }
    }

    fn gguf_hparams(&self) -> crate::Result<Vec<(String, MetaValue)>> {
        Ok(self.gguf_hparams_as(self.gguf_arch()))
    }

    fn gguf_layer_names(&self) -> &'static [(&'static str, &'static str)] {
        LAYER_NAMES
    }

    fn gguf_tokenizer(&self) -> (&'static str, &'static str) {
        ("qwen2", "gpt2")
    }

    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    fn build(&self, weights: &mut Weights, max_positions: usize) -> crate::Result<Box<dyn crate::CausalLm>> {
        Ok(Box::new(Qwen::new(self.variant, self.clone(), weights, max_positions)?))
    }

    fn random_shapes() -> &'static [(&'static str, &'static str)] {
        &[
            ("qwen3", "Qwen3, two layers, 64 wide"),
            ("qwen2", "Qwen2, two layers, 64 wide"),
            ("qwen3-0.6b", "Qwen3 0.6B's shape: 28 layers, 1024 wide"),
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
        use crate::testing::TinyQwen;
        let shape = match name {
            "qwen3-0.6b" => TinyQwen::qwen3_0_6b(vocab_size),
            "qwen2" => TinyQwen::new(Variant::Qwen2, vocab_size),
            _ => TinyQwen::new(Variant::Qwen3, vocab_size),
        };
        shape.write_as(dir, tokenizer, seed, dtype)
    }
}

struct Layer {
    input_norm: Tensor,
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    /// Qwen3 only.
    qk_norm: Option<(Tensor, Tensor)>,
    post_attn_norm: Tensor,
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
}

/// A Qwen2 or Qwen3 model.
pub struct Qwen {
    pub variant: Variant,
    pub cfg: Config,
    embed: Tensor,
    lm_head: Option<Tensor>,
    /// Quantized copies of the LM head for decoding (GGUF inference).
    embed_q: Option<std::sync::Arc<QuantLinear>>,
    lm_head_q: Option<std::sync::Arc<QuantLinear>>,
    layers: Vec<Layer>,
    norm: Tensor,
    rope: Rope,
    device: Device,
}

impl Qwen {
    pub fn new(variant: Variant, mut cfg: Config, w: &mut Weights, max_positions: usize) -> crate::Result<Qwen> {
        cfg.variant = variant;
        if cfg.use_sliding_window {
            return Err(crate::Error::Unsupported(format!(
                "{}: sliding-window Qwen models are not supported",
                w.source
            )));
        }
        if cfg.hidden_act != "silu" {
            return Err(crate::Error::Unsupported(format!(
                "{}: hidden_act `{}` is not supported (Qwen uses silu)",
                w.source, cfg.hidden_act
            )));
        }
        let device = w.device().clone();
        let qkv_bias = variant == Variant::Qwen2 || cfg.attention_bias;
        let o_bias = variant != Variant::Qwen2 && cfg.attention_bias;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let q = w.linear(&format!("{p}.self_attn.q_proj"), qkv_bias)?;
            let k = w.linear(&format!("{p}.self_attn.k_proj"), qkv_bias)?;
            let v = w.linear(&format!("{p}.self_attn.v_proj"), qkv_bias)?;
            let o = w.linear(&format!("{p}.self_attn.o_proj"), o_bias)?;
            let gate = w.linear(&format!("{p}.mlp.gate_proj"), false)?;
            let up = w.linear(&format!("{p}.mlp.up_proj"), false)?;
            let down = w.linear(&format!("{p}.mlp.down_proj"), false)?;
            let qk_norm = match variant {
                Variant::Qwen3 => Some((
                    w.take(&format!("{p}.self_attn.q_norm.weight"))?,
                    w.take(&format!("{p}.self_attn.k_norm.weight"))?,
                )),
                Variant::Qwen2 | Variant::Llama => None,
            };
            layers.push(Layer {
                input_norm: w.take(&format!("{p}.input_layernorm.weight"))?,
                q,
                k,
                v,
                o,
                qk_norm,
                post_attn_norm: w.take(&format!("{p}.post_attention_layernorm.weight"))?,
                gate,
                up,
                down,
            });
        }
        let embed = w.frozen("model.embed_tokens.weight")?;
        let embed_q = w.take_quantized("model.embed_tokens.weight");
        let lm_head = if cfg.tie_word_embeddings { None } else { w.frozen("lm_head.weight").ok() };
        let lm_head_q = w.take_quantized("lm_head.weight");
        let norm = w.take("model.norm.weight")?;
        let rope = match &cfg.rope_inv_freq {
            Some(inv_freq) => Rope::from_inv_freq(inv_freq, max_positions, &device)?,
            None => Rope::new(cfg.rope_theta, cfg.head_dim(), max_positions, 1.0, &device)?,
        };
        Ok(Qwen { variant, cfg, embed, lm_head, embed_q, lm_head_q, layers, norm, rope, device })
    }

    /// One decoder layer on `x: [T, hidden]`, the rows of `seqs`.
    fn layer(&self, l: &Layer, x: &Tensor, seqs: &mut [Seq<'_>], dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        let step = is_step(seqs);
        let n = rms_norm(x, &l.input_norm, eps, 0.0)?;
        let h = (x + self.attention(l, &n, seqs, dropout, step)?)?;
        let n = rms_norm(&h, &l.post_attn_norm, eps, 0.0)?;
        let [gate, up] = LoraLinear::forward_in([&l.gate, &l.up], &n, dropout, step)?;
        let [ff] = LoraLinear::forward_in([&l.down], &(gate.silu()? * up)?, dropout, step)?;
        h + ff
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
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim());
        let heads = |y: Tensor, n: usize| y.reshape((t, n, hd))?.transpose(0, 1)?.contiguous();
        let [q, k, v] = LoraLinear::forward_in([&l.q, &l.k, &l.v], x, dropout, step)?;
        let (mut q, mut k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        if let Some((qn, kn)) = &l.qk_norm {
            q = rms_norm(&q, qn, cfg.rms_norm_eps, 0.0)?;
            k = rms_norm(&k, kn, cfg.rms_norm_eps, 0.0)?;
        }
        let out = per_sequence(&q, &k, &v, seqs, |q, k, v, seq| {
            let (t, start) = (seq.len, seq.start);
            let q = (self.rope.apply(&q, start)? * (hd as f64).powf(-0.5))?;
            let k = self.rope.apply(&k, start)?;
            let (k, v) = match seq.kv.as_deref_mut() {
                Some(kv) => kv.append(&k, &v)?,
                None => (k, v),
            };
            // Grouped-query attention: the q heads of a kv group stacked in time.
            let group = nh / nkv;
            let out = cached_attention(&q.reshape((nkv, group * t, hd))?, &k, &v, t, start, None, None)?;
            out.reshape((nh, t, hd))?.transpose(0, 1)?.reshape((t, nh * hd))
        })?;
        let [out] = LoraLinear::forward_in([&l.o], &out, dropout, step)?;
        Ok(out)
    }

    /// The LM head: `lm_head`, or the tied embeddings.
    fn head(&self) -> (&Tensor, Option<&QuantLinear>) {
        match &self.lm_head {
            Some(w) => (w, self.lm_head_q.as_deref()),
            None => (&self.embed, self.embed_q.as_deref()),
        }
    }
}

impl Decoder for Qwen {
    fn device(&self) -> &Device {
        &self.device
    }

    fn max_position_embeddings(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn max_positions(&self) -> usize {
        self.rope.cos.dim(0).unwrap_or(0)
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
        self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)
    }

    fn layer(&self, i: usize, x: &Tensor, seqs: &mut [Seq<'_>], dropout: Option<&dyn DropoutMask>) -> Result<Tensor> {
        Qwen::layer(self, &self.layers[i], x, seqs, dropout)
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps, 0.0)
    }

    fn loss(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        super::ops::linear_cross_entropy(hidden, self.head().0, targets)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (w, q) = self.head();
        super::lora::head_logits(hidden, w, q)
    }
}

#[cfg(test)]
mod tests {
    use super::LAYER_NAMES;
    use crate::family::{gguf_name, hf_name};

    #[test]
    fn the_norm_before_the_mlp_is_llama_cpps_ffn_norm() {
        assert_eq!(
            hf_name(LAYER_NAMES, "blk.2.ffn_norm.weight").unwrap(),
            "model.layers.2.post_attention_layernorm.weight"
        );
        assert_eq!(
            gguf_name(LAYER_NAMES, "model.layers.2.post_attention_layernorm.weight").unwrap(),
            "blk.2.ffn_norm.weight"
        );
        assert_eq!(gguf_name(LAYER_NAMES, "lm_head.weight").unwrap(), "output.weight");
    }
}
