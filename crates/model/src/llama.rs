//! The Llama family: Llama 3.x, SmolLM2, TinyLlama (HF `LlamaForCausalLM`).
//!
//! A Llama layer is the decoder of [`crate::qwen`] without biases or q/k
//! norms:
//!
//! ```text
//! h = x + o(attn(input_norm(x)))
//! y = h + down(silu(gate(n)) * up(n))      n = post_attention_norm(h)
//! ```
//!
//! Grouped-query causal attention with rotary embeddings (base `rope_theta`,
//! 10 000 unless stated; Llama 3.1+ scales the low frequencies,
//! `rope_type = "llama3"`). The LM head is tied to the embeddings when
//! `tie_word_embeddings` (SmolLM2, Llama 3.2 1B/3B).
//!
//! llama.cpp's converter stores the rows of `q_proj` and `k_proj` in its
//! rotary order (the two halves of each head interleaved): they are put
//! back on reading a GGUF, and interleaved again on writing one. A `llama3`
//! rotary scaling is stored as llama.cpp's converter stores it, as
//! per-frequency factors (`rope_freqs.weight`), and read back from them.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::family::Family;
use crate::gguf_meta::{GgufMetadata, MetaValue};
use crate::qwen::{self, Variant};
use crate::{CausalLm, Weights};

/// llama.cpp's tensor of rotary factors (Llama 3.1+).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The hyper-parameters of a Llama model (HF `LlamaConfig`), with
/// transformers' defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "theta")]
    pub rope_theta: f64,
    /// `{"rope_type": "llama3", "factor", "low_freq_factor",
    /// "high_freq_factor", "original_max_position_embeddings"}` or none.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
    /// `<s>`/`<|begin_of_text|>` and the end token(s), written back to
    /// config.json as read.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn eps() -> f64 {
    1e-6
}
fn theta() -> f64 {
    10_000.0
}
fn max_pos() -> usize {
    2048
}
fn silu() -> String {
    "silu".into()
}

impl Config {
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The rotary inverse frequencies, when `rope_scaling` changes them
    /// (transformers' `_compute_llama3_parameters`).
    fn scaled_inv_freq(&self) -> crate::Result<Option<Vec<f32>>> {
        let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) else { return Ok(None) };
        let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        if ty == "default" {
            return Ok(None);
        }
        if ty != "llama3" {
            return Err(crate::Error::Unsupported(format!(
                "Llama rope_scaling type `{ty}` is not supported (llama3 and default are)"
            )));
        }
        let num = |k: &str| {
            s.get(k)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| crate::Error::Unsupported(format!("Llama rope_scaling `llama3` without a number `{k}`")))
        };
        let (factor, low, high) = (num("factor")?, num("low_freq_factor")?, num("high_freq_factor")?);
        let old_context = num("original_max_position_embeddings")?;
        let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
        let d = self.head_dim();
        let inv_freq = (0..d / 2).map(|i| {
            let f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            if wavelen < high_wavelen || wavelen > low_wavelen {
                scaled as f32
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
            }
        });
        Ok(Some(inv_freq.collect()))
    }

    /// `(factor, low_freq_factor, high_freq_factor,
    /// original_max_position_embeddings)` of a `llama3` rope scaling, with
    /// the defaults llama.cpp's converter uses.
    fn llama3_scaling(&self) -> Option<(f64, f64, f64, f64)> {
        let s = self.rope_scaling.as_ref().filter(|s| !s.is_null())?;
        let ty = s.get("rope_type").or_else(|| s.get("type")).and_then(|t| t.as_str())?;
        let num = |k: &str, default: f64| s.get(k).and_then(|v| v.as_f64()).unwrap_or(default);
        ty.eq_ignore_ascii_case("llama3").then(|| {
            (
                num("factor", 8.0),
                num("low_freq_factor", 1.0),
                num("high_freq_factor", 4.0),
                num("original_max_position_embeddings", 8192.0),
            )
        })
    }

    /// llama.cpp's `rope_freqs.weight` for a `llama3` scaling: by how much
    /// each rotary frequency is divided, computed in f32 as its converter
    /// does (`conversion/llama.py`, `generate_extra_tensors`).
    fn rope_factors(&self) -> Option<Vec<f32>> {
        let (factor, low, high, old_context) = self.llama3_scaling()?;
        let (factor, low, high, old_context) = (factor as f32, low as f32, high as f32, old_context as f32);
        let d = self.head_dim();
        let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
        let factors = (0..d).step_by(2).map(|i| {
            let freq = 1.0 / (self.rope_theta as f32).powf(i as f32 / d as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        });
        Some(factors.collect())
    }

    /// The shared decoder's configuration.
    fn decoder(&self) -> crate::Result<qwen::Config> {
        if self.mlp_bias || self.attention_bias {
            return Err(crate::Error::Unsupported("Llama models with attention or MLP biases".into()));
        }
        Ok(qwen::Config {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads(),
            head_dim: Some(self.head_dim()),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: false,
            use_sliding_window: false,
            hidden_act: self.hidden_act.clone(),
            variant: Variant::Llama,
            rope_inv_freq: self.scaled_inv_freq()?,
        })
    }

    /// The heads a projection's rows are grouped in (q: all, k: the kv
    /// heads), for llama.cpp's rotary row order.
    fn rotary_heads(&self, hf: &str) -> Option<usize> {
        if hf.ends_with("self_attn.q_proj.weight") {
            Some(self.num_attention_heads)
        } else if hf.ends_with("self_attn.k_proj.weight") {
            Some(self.num_key_value_heads())
        } else {
            None
        }
    }
}

/// llama.cpp's row order of a q/k projection: each head's rows `[a, b]`
/// (the two rotary halves) become `[a0 b0 a1 b1 …]` (`to_gguf`), or back.
fn reorder_rows(t: Tensor, heads: usize, to_gguf: bool) -> crate::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    let half = dims[0] / heads / 2;
    let grouped = if to_gguf { (heads, 2, half, rest) } else { (heads, half, 2, rest) };
    Ok(t.reshape(grouped)?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

impl Family for Config {
    fn model_types() -> &'static [&'static str] {
        &["llama"]
    }

    fn gguf_archs() -> &'static [&'static str] {
        &["llama"]
    }

    fn from_hf_config(_model_type: &str, mut config: serde_json::Value) -> serde_json::Result<Config> {
        // transformers 5 writes `rope_parameters` (rope_theta and the
        // scaling together).
        if let Some(rp) = config.get("rope_parameters").cloned() {
            if let Some(theta) = rp.get("rope_theta") {
                config["rope_theta"] = theta.clone();
            }
            if rp.get("rope_type").and_then(|t| t.as_str()).is_some_and(|t| t != "default") {
                config["rope_scaling"] = rp;
            }
        }
        serde_json::from_value(config)
    }

    fn from_gguf(md: &GgufMetadata) -> crate::Result<Config> {
        let d = qwen::Config::from_gguf_as(md, Variant::Llama)?;
        let mut config = Config {
            vocab_size: d.vocab_size,
            hidden_size: d.hidden_size,
            intermediate_size: d.intermediate_size,
            num_hidden_layers: d.num_hidden_layers,
            num_attention_heads: d.num_attention_heads,
            num_key_value_heads: Some(d.num_key_value_heads),
            head_dim: d.head_dim,
            rms_norm_eps: d.rms_norm_eps,
            rope_theta: d.rope_theta,
            rope_scaling: None,
            max_position_embeddings: d.max_position_embeddings,
            tie_word_embeddings: d.tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
            hidden_act: "silu".into(),
            bos_token_id: None,
            eos_token_id: None,
        };
        if md.has_tensor(ROPE_FREQS) {
            // Llama 3.1+: the factors are all the file keeps of the scaling.
            // Every Llama 3.x states factor (the lowest frequency's), 1, 4
            // and 8192; the scaling is taken when it gives these factors.
            let stored = md.tensor_values(ROPE_FREQS)?;
            let factor = stored.last().copied().unwrap_or(1.0);
            config.rope_scaling = Some(serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }));
            let same = config.rope_factors().is_some_and(|f| {
                f.len() == stored.len() && f.iter().zip(&stored).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs())
            });
            if !same {
                return Err(crate::Error::Unsupported(format!(
                    "{}: its rotary factors (`{ROPE_FREQS}`) are not Llama 3's scaling (low_freq_factor 1, \
                     high_freq_factor 4, original context 8192); use its Hugging Face checkpoint",
                    md.path.display()
                )));
            }
        }
        Ok(config)
    }

    fn hf_config(&self) -> serde_json::Value {
        let c = self;
        let mut rope = serde_json::json!({"rope_type": "default", "rope_theta": c.rope_theta});
        if let Some(s) = c.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            rope = s.clone();
            rope["rope_theta"] = c.rope_theta.into();
        }
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads(),
            "head_dim": c.head_dim(),
            "hidden_act": c.hidden_act,
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": c.tie_word_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id,
            "use_cache": true,
        })
    }

    fn gguf_arch(&self) -> &'static str {
        "llama"
    }

    fn gguf_hparams(&self) -> crate::Result<Vec<(String, MetaValue)>> {
        let decoder = self.decoder()?;
        let mut md = decoder.gguf_hparams_as("llama");
        md.extend([
            ("llama.rope.dimension_count".into(), MetaValue::U32(self.head_dim() as u32)),
            ("llama.vocab_size".into(), MetaValue::U32(self.vocab_size as u32)),
        ]);
        Ok(md)
    }

    /// Llama 3.1+'s scaled rotary frequencies, as factors.
    fn gguf_extra_tensors(&self) -> crate::Result<Vec<(String, Tensor)>> {
        Ok(match self.rope_factors() {
            Some(f) => {
                let n = f.len();
                vec![(ROPE_FREQS.into(), Tensor::from_vec(f, n, &candle_core::Device::Cpu)?)]
            }
            None => Vec::new(),
        })
    }

    fn gguf_layer_names(&self) -> &'static [(&'static str, &'static str)] {
        qwen::LAYER_NAMES
    }

    fn tensor_from_gguf(&self, hf: &str, t: Tensor) -> crate::Result<Tensor> {
        match self.rotary_heads(hf) {
            Some(heads) => reorder_rows(t, heads, false),
            None => Ok(t),
        }
    }

    fn gguf_rows_reordered(&self, hf: &str) -> bool {
        self.rotary_heads(hf).is_some()
    }

    fn tensor_to_gguf(&self, hf: &str, t: Tensor) -> crate::Result<Tensor> {
        match self.rotary_heads(hf) {
            Some(heads) => reorder_rows(t, heads, true),
            None => Ok(t),
        }
    }

    /// SentencePiece for the 32k vocabularies (TinyLlama, Llama 2), Llama
    /// 3's BPE for 128k, SmolLM's otherwise (llama.cpp tells them apart by
    /// hashing a test string's tokens; a GGUF base states its own).
    fn gguf_tokenizer(&self) -> (&'static str, &'static str) {
        match self.vocab_size {
            32_000 => ("default", "llama"),
            128_256 => ("llama-bpe", "gpt2"),
            _ => ("smollm", "gpt2"),
        }
    }

    fn num_layers(&self) -> usize {
        self.num_hidden_layers
    }

    fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
    }

    fn build(&self, weights: &mut Weights, max_positions: usize) -> crate::Result<Box<dyn CausalLm>> {
        Ok(Box::new(qwen::Qwen::new(Variant::Llama, self.decoder()?, weights, max_positions)?))
    }

    fn random_shapes() -> &'static [(&'static str, &'static str)] {
        &[
            ("llama", "Llama, two layers, 64 wide"),
            ("smollm2-135m", "SmolLM2-135M's shape: 30 layers, 576 wide"),
            ("llama3.2-1b", "Llama 3.2 1B's shape: 16 layers, 2048 wide, llama3 rotary scaling"),
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
        use crate::testing::TinyLlama;
        let shape = match name {
            "smollm2-135m" => TinyLlama::smollm2_135m(vocab_size),
            "llama3.2-1b" => TinyLlama::llama3_2_1b(vocab_size),
            _ => TinyLlama::new(vocab_size),
        };
        shape.write_as(dir, tokenizer, seed, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_cpp_row_order_round_trips_and_interleaves_each_heads_halves() {
        // 2 heads of 4 rows (halves of 2), 1 column: rows numbered 0..8.
        let t = Tensor::arange(0f32, 8.0, &candle_core::Device::Cpu).unwrap().reshape((8, 1)).unwrap();
        let g = reorder_rows(t.clone(), 2, true).unwrap();
        let rows: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(rows, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let back = reorder_rows(g, 2, false).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn llama3_scaling_leaves_high_frequencies_and_divides_low_ones() {
        let c: Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .unwrap();
        let f = c.scaled_inv_freq().unwrap().unwrap();
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0, "the highest frequency is kept");
        let plain = 1.0 / 500000f64.powf(62.0 / 64.0);
        assert!((f64::from(f[31]) - plain / 32.0).abs() < 1e-12, "the lowest is divided by the factor");
    }
}
