//! Small random checkpoints in real Hugging Face layout, for tests and for
//! running recipes end to end where the real weights are not available.
//!
//! The files are exactly what a real checkpoint has (`config.json` with the
//! real `model_type`, `model.safetensors` with the real tensor names, the
//! tokenizer files), only with tiny dimensions and seeded random weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pipeline_fs::IoContext;

use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// Dimensions of a tiny Gemma 3.
#[derive(Debug, Clone)]
pub struct TinyGemma3 {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub sliding_window: usize,
    pub max_positions: usize,
}

impl TinyGemma3 {
    /// The shape of the real Gemma 3 270M (18 layers, 640 wide, 4 heads of
    /// 256, one kv head, window 512), for speed measurements without the
    /// real weights.
    pub fn gemma3_270m(vocab_size: usize) -> TinyGemma3 {
        TinyGemma3 {
            vocab_size,
            hidden_size: 640,
            intermediate_size: 2048,
            layers: 18,
            heads: 4,
            kv_heads: 1,
            head_dim: 256,
            sliding_window: 512,
            max_positions: 32_768,
        }
    }

    /// The shape of the real Gemma 3 1B (26 layers, 1152 wide, 4 heads of
    /// 256, one kv head, MLP 6912, window 512), for the 1B recipe's speed
    /// and memory without the real weights.
    pub fn gemma3_1b(vocab_size: usize) -> TinyGemma3 {
        TinyGemma3 { hidden_size: 1152, intermediate_size: 6912, layers: 26, ..TinyGemma3::gemma3_270m(vocab_size) }
    }

    /// A two-layer model (one sliding, one global) with a window of 8.
    pub fn new(vocab_size: usize) -> TinyGemma3 {
        TinyGemma3 {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            layers: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 32,
            sliding_window: 8,
            max_positions: 4096,
        }
    }

    /// Writes `config.json` and `model.safetensors` (f32) into `dir`, and
    /// copies `tokenizer.json` / `tokenizer_config.json` from `tokenizer_dir`.
    pub fn write(&self, dir: &Path, tokenizer_dir: &Path, seed: u64) -> Result<()> {
        self.write_as(dir, tokenizer_dir, seed, DType::F32)
    }

    /// [`TinyGemma3::write`] with the weights stored as `dtype` (f32, or
    /// bf16 as Google ships Gemma 3).
    pub fn write_as(&self, dir: &Path, tokenizer_dir: &Path, seed: u64, dtype: DType) -> Result<()> {
        let config = serde_json::json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "sliding_window": self.sliding_window,
            // Tiny models alternate; real-sized ones follow Gemma 3 (5 local, 1 global).
            "layer_types": (0..self.layers)
                .map(|i| {
                    let global = if self.layers <= 2 { i % 2 == 1 } else { i % 6 == 5 };
                    if global { "full_attention" } else { "sliding_attention" }
                })
                .collect::<Vec<_>>(),
            "query_pre_attn_scalar": self.head_dim,
            "max_position_embeddings": self.max_positions,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": true,
            "torch_dtype": torch_dtype(dtype)?,
        });
        let mut w = RandomWeights::new(seed);
        let (h, i, nh, nkv, hd) = (self.hidden_size, self.intermediate_size, self.heads, self.kv_heads, self.head_dim);
        w.add("model.embed_tokens.weight".into(), &[self.vocab_size, h], 50.0, 0.0)?;
        w.add("model.norm.weight".into(), &[h], 5.0, 0.0)?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            w.projections(&p, h, i, nh * hd, nkv * hd)?;
            for (name, n) in [
                ("input_layernorm.weight", h),
                ("post_attention_layernorm.weight", h),
                ("pre_feedforward_layernorm.weight", h),
                ("post_feedforward_layernorm.weight", h),
                ("self_attn.q_norm.weight", hd),
                ("self_attn.k_norm.weight", hd),
            ] {
                w.add(format!("{p}.{name}"), &[n], 5.0, 0.0)?;
            }
        }
        w.save(dir, &config, tokenizer_dir, dtype)
    }
}

/// Dimensions of a tiny Qwen2 or Qwen3.
#[derive(Debug, Clone)]
pub struct TinyQwen {
    pub variant: crate::decoder::Variant,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl TinyQwen {
    pub fn new(variant: crate::decoder::Variant, vocab_size: usize) -> TinyQwen {
        TinyQwen {
            variant,
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        }
    }

    /// The shape of the real Qwen3 0.6B (28 layers, 1024 wide, 16 heads of
    /// 128, 8 kv heads, MLP 3072).
    pub fn qwen3_0_6b(vocab_size: usize) -> TinyQwen {
        TinyQwen {
            hidden_size: 1024,
            intermediate_size: 3072,
            layers: 28,
            heads: 16,
            kv_heads: 8,
            head_dim: 128,
            ..TinyQwen::new(crate::decoder::Variant::Qwen3, vocab_size)
        }
    }

    /// Writes `config.json` (every field transformers and candle-transformers
    /// read) and `model.safetensors` (f32), and copies the tokenizer files.
    pub fn write(&self, dir: &Path, tokenizer_dir: &Path, seed: u64) -> Result<()> {
        self.write_as(dir, tokenizer_dir, seed, DType::F32)
    }

    /// [`TinyQwen::write`] with the weights stored as `dtype`.
    pub fn write_as(&self, dir: &Path, tokenizer_dir: &Path, seed: u64, dtype: DType) -> Result<()> {
        use crate::decoder::Variant;
        let qwen3 = self.variant == Variant::Qwen3;
        let config = serde_json::json!({
            "architectures": [if qwen3 { "Qwen3ForCausalLM" } else { "Qwen2ForCausalLM" }],
            "model_type": if qwen3 { "qwen3" } else { "qwen2" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "attention_bias": false,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": 4096,
            "max_window_layers": self.layers,
            "sliding_window": null,
            "use_sliding_window": false,
            "tie_word_embeddings": true,
            "hidden_act": "silu",
            "torch_dtype": torch_dtype(dtype)?,
        });
        let mut w = RandomWeights::new(seed);
        let (h, i, nh, nkv, hd) = (self.hidden_size, self.intermediate_size, self.heads, self.kv_heads, self.head_dim);
        w.add("model.embed_tokens.weight".into(), &[self.vocab_size, h], 50.0, 0.0)?;
        w.add("model.norm.weight".into(), &[h], 5.0, 1.0)?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            w.projections(&p, h, i, nh * hd, nkv * hd)?;
            for name in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
                w.add(format!("{p}.{name}"), &[h], 5.0, 1.0)?;
            }
            if qwen3 {
                for name in ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] {
                    w.add(format!("{p}.{name}"), &[hd], 5.0, 1.0)?;
                }
            } else {
                for (name, n) in [("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)] {
                    w.add(format!("{p}.self_attn.{name}.bias"), &[n], 5.0, 0.0)?;
                }
            }
        }
        w.save(dir, &config, tokenizer_dir, dtype)
    }
}

/// Dimensions of a tiny Llama (SmolLM2-like: tied embeddings), with
/// optional rotary scaling (`{"rope_type": "llama3", …}`).
#[derive(Debug, Clone)]
pub struct TinyLlama {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<serde_json::Value>,
}

impl TinyLlama {
    pub fn new(vocab_size: usize) -> TinyLlama {
        TinyLlama {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            rope_theta: 10_000.0,
            rope_scaling: None,
        }
    }

    /// The shape of the real SmolLM2-135M (30 layers, 576 wide, 9 heads of
    /// 64, 3 kv heads, MLP 1536, rotary base 100 000).
    pub fn smollm2_135m(vocab_size: usize) -> TinyLlama {
        TinyLlama {
            hidden_size: 576,
            intermediate_size: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            rope_theta: 100_000.0,
            ..TinyLlama::new(vocab_size)
        }
    }

    /// The shape of the real Llama 3.2 1B (16 layers, 2048 wide, 32 heads
    /// of 64, 8 kv heads, MLP 8192, Llama 3's rotary scaling).
    pub fn llama3_2_1b(vocab_size: usize) -> TinyLlama {
        TinyLlama {
            hidden_size: 2048,
            intermediate_size: 8192,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            rope_theta: 500_000.0,
            rope_scaling: Some(serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
            ..TinyLlama::new(vocab_size)
        }
    }

    /// Writes `config.json` (as transformers' `LlamaConfig` states it) and
    /// `model.safetensors` (f32), and copies the tokenizer files.
    pub fn write(&self, dir: &Path, tokenizer_dir: &Path, seed: u64) -> Result<()> {
        self.write_as(dir, tokenizer_dir, seed, DType::F32)
    }

    /// [`TinyLlama::write`] with the weights stored as `dtype`.
    pub fn write_as(&self, dir: &Path, tokenizer_dir: &Path, seed: u64, dtype: DType) -> Result<()> {
        let hd = self.hidden_size / self.heads;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": hd,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": torch_dtype(dtype)?,
        });
        let mut w = RandomWeights::new(seed);
        let (h, i, nh, nkv) = (self.hidden_size, self.intermediate_size, self.heads, self.kv_heads);
        w.add("model.embed_tokens.weight".into(), &[self.vocab_size, h], 50.0, 0.0)?;
        w.add("model.norm.weight".into(), &[h], 5.0, 1.0)?;
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            w.projections(&p, h, i, nh * hd, nkv * hd)?;
            for name in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
                w.add(format!("{p}.{name}"), &[h], 5.0, 1.0)?;
            }
        }
        w.save(dir, &config, tokenizer_dir, dtype)
    }
}

/// Seeded random tensors collected under HF names, then saved beside a copy
/// of the tokenizer files.
struct RandomWeights {
    rng: rand_chacha::ChaCha8Rng,
    normal: Normal<f32>,
    map: HashMap<String, Tensor>,
}

impl RandomWeights {
    fn new(seed: u64) -> RandomWeights {
        let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
        RandomWeights { rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed), normal, map: HashMap::new() }
    }

    /// `offset + N(0, 0.02·scale)` entries.
    fn add(&mut self, name: String, shape: &[usize], scale: f32, offset: f32) -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| offset + self.normal.sample(&mut self.rng) * scale).collect();
        self.map.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    }

    /// The seven projections of layer `p` (`model.layers.N`).
    fn projections(&mut self, p: &str, h: usize, i: usize, q_out: usize, kv_out: usize) -> Result<()> {
        for (name, shape) in [
            ("self_attn.q_proj.weight", [q_out, h]),
            ("self_attn.k_proj.weight", [kv_out, h]),
            ("self_attn.v_proj.weight", [kv_out, h]),
            ("self_attn.o_proj.weight", [h, q_out]),
            ("mlp.gate_proj.weight", [i, h]),
            ("mlp.up_proj.weight", [i, h]),
            ("mlp.down_proj.weight", [h, i]),
        ] {
            self.add(format!("{p}.{name}"), &shape, 5.0, 0.0)?;
        }
        Ok(())
    }

    fn save(self, dir: &Path, config: &serde_json::Value, tokenizer_dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).on("create", dir)?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(config).expect("serializes"))
            .on("write", &config_path)?;
        let map = self.map.into_iter().map(|(k, t)| Ok((k, t.to_dtype(dtype)?))).collect::<Result<HashMap<_, _>>>()?;
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(tokenizer_dir.join(f), dir.join(f)).on("copy", &tokenizer_dir.join(f))?;
        }
        Ok(())
    }
}

/// `config.json`'s name of a weight dtype.
fn torch_dtype(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        other => return Err(crate::Error::Unsupported(format!("random weights cannot be stored as {other:?}"))),
    })
}

/// The repository this crate is built in (tests find `models/` and
/// `../shared` from it).
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shared read-only inputs beside the repository (`../shared`: the
/// dataset cache, reference numbers), or `PIPELINE_SHARED_DIR`.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("PIPELINE_SHARED_DIR").map(PathBuf::from).unwrap_or_else(|| repository().join("../shared"))
}

/// Reports that something a test needs is not provisioned: a failure, so
/// that a run that could not check something never looks like a pass,
/// unless `PIPELINE_ALLOW_SKIP=1` asks to skip such tests (each says
/// SKIPPED, and why).
pub fn missing(what: &str, fix: &str) {
    if std::env::var("PIPELINE_ALLOW_SKIP").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: {what} ({fix})");
        return;
    }
    panic!("{what}: {fix} (or set PIPELINE_ALLOW_SKIP=1 to skip the tests that need it)");
}

/// The provisioned models (`scripts/fetch-models.sh`; `PIPELINE_MODELS_DIR`
/// elsewhere), or `None` when they are missing and skipping is allowed
/// ([`missing`]).
pub fn models_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PIPELINE_MODELS_DIR").map(PathBuf::from).unwrap_or_else(|| repository().join("models"));
    let provisioned = ["gemma-3-270m", "qwen3-tokenizer", "llama3.2-tokenizer"];
    if provisioned.iter().all(|m| dir.join(m).join("tokenizer.json").is_file()) {
        return Some(dir.canonicalize().expect("the models directory"));
    }
    missing(&format!("the real models are not provisioned in {}", dir.display()), "run scripts/fetch-models.sh");
    None
}

/// Perplexity as `llama-perplexity` computes it: `tokens` in chunks of
/// `n_ctx`, each starting with `bos`, scoring the second half of each
/// chunk. Returns the perplexity and the number of chunks.
pub fn chunked_perplexity(
    m: &dyn crate::CausalLm,
    tokens: &[u32],
    bos: u32,
    n_ctx: usize,
) -> candle_core::Result<(f64, usize)> {
    let (mut nll, mut count) = (0f64, 0usize);
    let chunks = tokens.len() / n_ctx;
    for chunk in 0..chunks {
        let mut ids = tokens[chunk * n_ctx..(chunk + 1) * n_ctx].to_vec();
        ids[0] = bos;
        let hidden = m.hidden(&ids, None)?;
        let first = n_ctx / 2;
        let logits = m.logits(&hidden.narrow(0, first, n_ctx - 1 - first)?)?;
        let targets = Tensor::new(&ids[first + 1..], m.device())?;
        let mean = crate::ops::cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        nll += f64::from(mean) * (n_ctx - 1 - first) as f64;
        count += n_ctx - 1 - first;
    }
    Ok(((nll / count as f64).exp(), chunks))
}
