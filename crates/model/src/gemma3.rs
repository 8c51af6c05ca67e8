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
