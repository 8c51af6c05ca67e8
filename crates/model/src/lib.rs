//! Language models on candle: loading base weights (HF safetensors or GGUF)
//! and the architectures, one readable file each.
//!
//! Weights are kept under their Hugging Face names (`model.layers.3.mlp.
//! up_proj.weight`) whatever file they come from, so adapters and merged
//! models interoperate with transformers and PEFT.

pub mod adapter;
pub mod arch;
pub mod decoder;
pub mod error;
pub mod family;
pub mod files;
pub mod gemma3;
pub mod gguf;
pub mod gguf_meta;
pub mod gguf_tokenizer;
pub mod kv;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod qwen;
pub mod testing;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use error::bad_file;
pub use error::{Error, Result};
use pipeline_fs::IoContext;
use pipeline_kernels::gemv::QuantLinear;

pub use arch::Arch;
pub use family::Family;
pub use files::ModelFiles;

pub use gemma3::Gemma3;
pub use kv::KvCache;
pub use qwen::Qwen;

use lora::{DropoutMask, LoraLinear};

/// What training, evaluation and generation need from an architecture.
pub trait CausalLm {
    fn device(&self) -> &Device;

    /// The context length the model was trained for.
    fn max_position_embeddings(&self) -> usize;

    /// The linear layers LoRA can adapt, with their HF module paths
    /// (`model.layers.3.self_attn.q_proj`).
    fn linears_mut(&mut self) -> Vec<(String, &mut LoraLinear)>;

    /// Final hidden states (after the last norm) for `ids`: `[T, hidden]`.
    fn hidden(&self, ids: &[u32], dropout: Option<&dyn DropoutMask>) -> candle_core::Result<Tensor>;

    /// An empty KV cache for [`CausalLm::forward_cached`].
    fn new_cache(&self) -> KvCache;

    /// The model as a stack of layers, for training with activation
    /// checkpointing (`train::checkpointed_grads`): `hidden` is
    /// `final_norm(layer_forward(n-1, … layer_forward(0, embed_tokens(ids))))`.
    fn embed_tokens(&self, ids: &[u32]) -> candle_core::Result<Tensor>;
    fn num_layers(&self) -> usize;
    /// Decoder layer `i` over a whole sequence (positions from 0).
    fn layer_forward(&self, i: usize, x: &Tensor, dropout: Option<&dyn DropoutMask>) -> candle_core::Result<Tensor>;
    fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor>;

    /// Inference on `ids` at the positions after those in `cache`, appending
    /// their keys and values: final hidden states `[T, hidden]`. The same
    /// numbers as [`CausalLm::hidden`] on the whole sequence.
    fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor>;

    /// Batched decoding: one new token `ids[b]` for each sequence `caches[b]`
    /// (each at its own position): final hidden states `[B, hidden]`, row b
    /// the same as `forward_cached(&[ids[b]], caches[b])`. The linear layers
    /// multiply all rows at once, so a quantized weight is read once per
    /// step instead of once per sequence.
    fn forward_batch(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> candle_core::Result<Tensor> {
        let rows = ids.iter().zip(caches.iter_mut()).map(|(&id, c)| self.forward_cached(&[id], c));
        Tensor::cat(&rows.collect::<Result<Vec<_>, _>>()?, 0)
    }

    /// The longest sequence the rotary tables were built for.
    fn max_positions(&self) -> usize;

    /// Logits for rows of `hidden`: `[N, hidden]` → `[N, vocab]`.
    fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor>;

    /// Mean cross-entropy of the next-token predictions at rows of `hidden`
    /// against `targets`. Architectures override this to avoid holding all
    /// the logits at once.
    fn loss(&self, hidden: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
        let t = Tensor::new(targets, hidden.device())?;
        ops::cross_entropy(&self.logits(hidden)?, &t)
    }

    /// The mean loss over the tokens `mask` marks (`mask[p] == 1`: token
    /// `ids[p]` is scored, predicted at position `p - 1`), from hidden states
    /// already computed for (at least) the first `ids.len() - 1` positions;
    /// with the number of scored tokens (the loss is 0 when there are none).
    /// Training's loss and evaluation's eval loss are this.
    fn masked_loss(&self, hidden: &Tensor, ids: &[u32], mask: &[u8]) -> candle_core::Result<(Tensor, usize)> {
        let positions: Vec<u32> = (0..ids.len() - 1).filter(|&p| mask[p + 1] == 1).map(|p| p as u32).collect();
        if positions.is_empty() {
            return Ok((Tensor::new(0f32, self.device())?, 0));
        }
        let targets: Vec<u32> = positions.iter().map(|&p| ids[p as usize + 1]).collect();
        let picked = hidden.index_select(&Tensor::new(positions.as_slice(), self.device())?, 0)?;
        Ok((self.loss(&picked, &targets)?, positions.len()))
    }

    /// Brings `cache`, which holds a prefix of `tokens` (possibly none),
    /// to hold all of `tokens`, and returns the final hidden states of the
    /// positions it ran: `[n, hidden]` for the last `n` tokens (at least
    /// one). The cache is first cut back to its
    /// [`KvCache::resume_point`], and the rest runs through
    /// [`CausalLm::forward_cached`] in chunks that end at multiples of
    /// [`PREFILL_CHUNK`]: every position gets the bits a fresh prefill of
    /// `tokens` gives it (see [`kv`]), and sliding-window layers attend over
    /// a chunk plus one window instead of the whole sequence.
    fn prefill(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Tensor> {
        if tokens.is_empty() {
            candle_core::bail!("prefill of an empty sequence");
        }
        cache.truncate(cache.resume_point(tokens.len() - 1));
        let mut parts = Vec::new();
        while cache.len() < tokens.len() {
            let start = cache.len();
            let end = ((start / PREFILL_CHUNK + 1) * PREFILL_CHUNK).min(tokens.len());
            parts.push(self.forward_cached(&tokens[start..end], cache)?);
            cache.prefilled();
        }
        Tensor::cat(&parts, 0)
    }

    /// Logits at the last position only: `[vocab]`.
    fn last_logits(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let h = self.hidden(ids, None)?;
        self.logits(&h.narrow(0, ids.len() - 1, 1)?)?.flatten_all()
    }
}

/// Prefill chunks ([`CausalLm::prefill`]) end at multiples of this many
/// positions; a shared or truncated cache is reused up to such a boundary.
/// Each chunk streams every f32 weight once, so smaller chunks prefill
/// slower (Gemma 3 270M, 1500 tokens, 2 cores: 64 → -30 %, 128 → -23 %,
/// 256 → -8 % against one chunk per 512) while larger ones share less of a
/// reused prefix.
pub const PREFILL_CHUNK: usize = 256;

/// The instruction paths the CPU kernels take on this machine.
pub use pipeline_kernels::cpu_paths;

/// The linear modules LoRA can target, by their HF names.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Named base weights, f32, on one device; for GGUF files loaded for
/// inference, also the quantized matrices (used where one row at a time is
/// multiplied: decoding). The frozen matrices (linear layers, embeddings,
/// LM head) are handed out in the [`Precision`] asked for.
pub struct Weights {
    map: HashMap<String, Tensor>,
    quantized: HashMap<String, Arc<QuantLinear>>,
    device: Device,
    precision: Precision,
    /// Where they came from, for messages.
    pub source: String,
}

impl Weights {
    pub fn new(map: HashMap<String, Tensor>, device: Device, source: String) -> Weights {
        Weights { map, quantized: HashMap::new(), device, source, precision: Precision::F32 }
    }

    /// Hands out the frozen matrices in `precision` from now on.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// A frozen matrix (embeddings, LM head, a linear layer's weight) in the
    /// weights' [`Precision`]; norms and biases stay f32 ([`Weights::take`]).
    pub fn frozen(&mut self, name: &str) -> Result<Tensor> {
        let t = self.take_as_stored(name)?;
        Ok(t.to_dtype(self.precision.dtype())?)
    }

    /// Adds the quantized form of weight `name` (a GGUF tensor).
    pub fn insert_quantized(&mut self, name: String, q: QuantLinear) {
        self.quantized.insert(name, Arc::new(q));
    }

    /// The quantized form of `name`, if it has one.
    pub fn take_quantized(&mut self, name: &str) -> Option<Arc<QuantLinear>> {
        self.quantized.remove(name)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every tensor, by HF name.
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.map
    }

    /// Removes and returns a tensor, failing with the file's name if missing.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.take_as_stored(name)?.to_dtype(DType::F32)?)
    }

    /// [`Weights::take`] in the type it was loaded as.
    fn take_as_stored(&mut self, name: &str) -> Result<Tensor> {
        self.map.remove(name).ok_or_else(|| {
            bad_file(&self.source, format!("no tensor `{name}` (is this the architecture the config says?)"))
        })
    }

    /// The linear layer `<name>.weight` (and `<name>.bias` when `bias`).
    pub fn linear(&mut self, name: &str, bias: bool) -> Result<LoraLinear> {
        let mut l = LoraLinear::new(self.frozen(&format!("{name}.weight"))?);
        l.quantized = self.take_quantized(&format!("{name}.weight"));
        if bias {
            l.bias = Some(self.take(&format!("{name}.bias"))?);
        }
        Ok(l)
    }
}

/// The device a recipe's `device` names.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Ok(Device::new_cuda(0)?)
            } else if candle_core::utils::metal_is_available() {
                Ok(Device::new_metal(0)?)
            } else {
                Ok(Device::Cpu)
            }
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(Error::Device(
                    "device = \"metal\", but this build has no Metal support: rebuild with `--features metal` on macOS"
                        .into(),
                ));
            }
            Ok(Device::new_metal(0)?)
        }
        cuda => {
            let ordinal = match cuda.strip_prefix("cuda") {
                Some("") => 0,
                Some(n) => {
                    n.trim_start_matches(':').parse().map_err(|_| Error::Device(format!("bad device `{cuda}`")))?
                }
                None => return Err(Error::Device(format!("unknown device `{cuda}`"))),
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Device(format!(
                    "device = \"{cuda}\", but this build has no CUDA support: rebuild with `--features cuda`"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
    }
}

/// Loads the base model of a recipe, ready for training or inference.
/// `max_positions` bounds the rotary tables (the longest sequence used).
pub fn load(model: &ModelFiles, device: &Device, max_positions: usize) -> Result<Box<dyn CausalLm>> {
    load_with(model, device, max_positions, false, Precision::F32)
}

/// [`load`] with the frozen matrices in `precision` (training in mixed
/// precision: bf16 base weights, everything trained in f32).
pub fn load_in(
    model: &ModelFiles,
    device: &Device,
    max_positions: usize,
    precision: Precision,
) -> Result<Box<dyn CausalLm>> {
    load_with(model, device, max_positions, false, precision)
}

/// The number format of a model's frozen base matrices.
///
/// `Bf16` halves their memory; on a CPU with AVX512-BF16 the products with
/// them also run on native bf16 dot products (twice the multiply-adds per
/// instruction), elsewhere they are widened to f32 block by block
/// ([`pipeline_kernels::bf16`]). Activations, the LoRA matrices, their
/// gradients and the optimizer state stay f32: PyTorch's autocast split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// What `precision = "auto"` means on `device`: bf16 where the hardware
    /// multiplies it natively (a CPU with AVX512-BF16, CUDA), f32 elsewhere.
    pub fn auto(device: &Device) -> Precision {
        let native = match device {
            Device::Cpu => pipeline_kernels::bf16::native_available(),
            Device::Cuda(_) => true,
            _ => false,
        };
        if native { Precision::Bf16 } else { Precision::F32 }
    }
}

/// Loads a model for inference: as [`load`], and a GGUF file's quantized
/// matrices are kept for decoding (prefill multiplies many rows at once and
/// uses the dequantized f32 copies, which is faster on a CPU).
pub fn load_for_inference(model: &ModelFiles, device: &Device) -> Result<Box<dyn CausalLm>> {
    load_with(model, device, INFERENCE_POSITIONS, true, Precision::F32)
}

/// The longest sequence inference supports (rotary tables are built for
/// `min(this, the model's context)` positions).
pub const INFERENCE_POSITIONS: usize = 32_768;

fn load_with(
    model: &ModelFiles,
    device: &Device,
    max_positions: usize,
    keep_quantized: bool,
    precision: Precision,
) -> Result<Box<dyn CausalLm>> {
    let (arch, mut w) = load_weights_as(model, device, keep_quantized, precision)?;
    let positions = max_positions.min(arch.max_position_embeddings());
    arch.build(&mut w, positions)
}

/// A model's architecture and its named weights (HF names, f32), from a
/// GGUF file or safetensors + `config.json`; with `keep_quantized`, a
/// GGUF's quantized matrices are kept too (for decoding).
pub fn load_weights(model: &ModelFiles, device: &Device, keep_quantized: bool) -> Result<(Arch, Weights)> {
    load_weights_as(model, device, keep_quantized, Precision::F32)
}

/// [`load_weights`] for frozen matrices in `precision`: in bf16, a
/// safetensors checkpoint's matrices go straight from the file into bf16
/// (never all of them in f32 at once: a 1B model's peak memory is its bf16
/// size plus the mapped file, not four bytes a weight more).
pub fn load_weights_as(
    model: &ModelFiles,
    device: &Device,
    keep_quantized: bool,
    precision: Precision,
) -> Result<(Arch, Weights)> {
    let weights = model.weights.first().ok_or_else(|| {
        Error::Missing(format!(
            "the model `{}` has no weights (no *.safetensors or *.gguf in {}); run scripts/fetch-models.sh or fix \
             [model] base",
            model.source,
            model.dir.display()
        ))
    })?;
    let (arch, mut w) = if weights.extension().is_some_and(|e| e == "gguf") {
        gguf::load(weights, device, keep_quantized)?
    } else {
        let config = model.config_json.as_ref().ok_or_else(|| {
            bad_file(&model.dir, format!("the model `{}` has safetensors weights but no config.json", model.source))
        })?;
        (read_config(config)?, load_safetensors_as(&model.weights, device, precision.dtype())?)
    };
    w.set_precision(precision);
    Ok((arch, w))
}

/// Reads an HF `config.json` (text config of multimodal checkpoints too).
pub fn read_config(path: &Path) -> Result<Arch> {
    let text = std::fs::read_to_string(path).on("read", path)?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad_file(path, format!("not valid JSON: {e}")))?;
    if let Some(text_cfg) = v.get("text_config").cloned() {
        v = text_cfg;
    }
    legacy_rope_keys(&mut v);
    Arch::from_hf_config(v, path)
}

/// transformers 5 states rotary parameters as `rope_parameters` (per layer
/// type for Gemma 3); the configs we read keep the older flat keys, filled
/// in here when only the new form is present.
fn legacy_rope_keys(v: &mut serde_json::Value) {
    let Some(rp) = v.get("rope_parameters").cloned() else { return };
    let (full, sliding) = match rp.get("full_attention") {
        Some(full) => (full.clone(), rp.get("sliding_attention").cloned()),
        None => (rp, None),
    };
    let Some(o) = v.as_object_mut() else { return };
    if let Some(theta) = full.get("rope_theta") {
        o.entry("rope_theta").or_insert(theta.clone());
    }
    if let Some(theta) = sliding.as_ref().and_then(|s| s.get("rope_theta")) {
        o.entry("rope_local_base_freq").or_insert(theta.clone());
    }
    if full.get("rope_type").and_then(|t| t.as_str()) == Some("linear") {
        o.entry("rope_scaling").or_insert(full.clone());
    }
}

/// Writes tensors to a safetensors file the way transformers'
/// `save_pretrained` and PEFT's `save_pretrained` do: tensors sorted by
/// name, with `{"format": "pt"}` in the header's `__metadata__` (the field
/// transformers checks before loading a checkpoint). Only that one entry:
/// the crate writes metadata in hash-map order, and our files must be
/// byte-reproducible.
pub fn save_safetensors<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>, path: &Path) -> Result<()> {
    let mut sorted: Vec<(&str, &Tensor)> = tensors.into_iter().collect();
    sorted.sort_by_key(|(name, _)| *name);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(sorted, Some(metadata), path)
        .map_err(|e| bad_file(path, format!("cannot write: {e}")))
}

/// Loads every tensor of the safetensors files as f32 on `device`.
pub fn load_safetensors(files: &[std::path::PathBuf], device: &Device) -> Result<Weights> {
    load_safetensors_as(files, device, DType::F32)
}

/// [`load_safetensors`] with matrices (rank 2) in `matrices` (f32 or bf16);
/// [`Weights::take`] still hands out f32, [`Weights::frozen`] the
/// precision's type.
fn load_safetensors_as(files: &[std::path::PathBuf], device: &Device, matrices: DType) -> Result<Weights> {
    let mut map = HashMap::new();
    for f in files {
        // SAFETY: the file is not modified while mapped (it is an input).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }
            .map_err(|e| bad_file(f, format!("cannot read: {e}")))?;
        for (name, view) in st.tensors() {
            let dtype = if view.shape().len() == 2 { matrices } else { DType::F32 };
            let t = st.load(&name, device)?.to_dtype(dtype)?;
            map.insert(name, t);
        }
    }
    let source = files.first().map(|f| f.display().to_string()).unwrap_or_default();
    Ok(Weights::new(map, device.clone(), source))
}
