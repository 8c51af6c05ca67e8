//! Reading base weights from a GGUF file (llama.cpp's format).
//!
//! Tensors are dequantized to f32, renamed from llama.cpp's names
//! (`blk.3.ffn_up.weight`) to Hugging Face's (`model.layers.3.mlp.up_proj.
//! weight`) and brought to transformers' layout by their family
//! ([`crate::family::Family::tensor_from_gguf`]: Gemma's norms, Llama's q/k
//! rows). See `../shared/reference/gguf-gemma3.md` for Gemma 3's mapping.

use std::collections::HashMap;
use std::path::Path;

use pipeline_fs::IoContext;

use crate::error::{Result, bad_file};
use candle_core::Device;
use candle_core::quantized::{GgmlDType, gguf_file};
use pipeline_kernels::gemv::QuantLinear;

use crate::Weights;
use crate::arch::Arch;
pub use crate::gguf_meta::{GgufMetadata, MetaValue};

/// The architecture of a GGUF file, from its metadata alone.
pub fn read_arch(path: &Path) -> Result<Arch> {
    let mut file = std::fs::File::open(path).on("open", path)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| bad_file(path, format!("not a GGUF file: {e}")))?;
    Arch::from_gguf(&GgufMetadata::new(&content, path)?)
}

/// Loads a GGUF model: architecture, config from the metadata, and weights
/// (dequantized to f32; with `keep_quantized`, the quantized matrices too).
pub fn load(path: &Path, device: &Device, keep_quantized: bool) -> Result<(Arch, Weights)> {
    let mut file = std::fs::File::open(path).on("open", path)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| bad_file(path, format!("not a GGUF file: {e}")))?;
    let arch = Arch::from_gguf(&GgufMetadata::new(&content, path)?)?;
    let family = arch.family();
    // Tensors that are not weights (Llama 3.1+'s rotary factors), read into
    // the configuration.
    let extra: Vec<String> = family.gguf_extra_tensors()?.into_iter().map(|(name, _)| name).collect();
    let mut map = HashMap::new();
    let mut quantized = Vec::new();
    for name in content.tensor_infos.keys().filter(|n| !extra.contains(n)) {
        let Some(hf) = arch.hf_tensor_name(name) else {
            tracing::warn!(tensor = %name, "unknown GGUF tensor, ignored");
            continue;
        };
        let q = content.tensor(&mut file, name, device)?;
        let t = family.tensor_from_gguf(&hf, q.dequantize(device)?)?;
        if keep_quantized
            && t.rank() == 2
            && !family.gguf_rows_reordered(&hf)
            && !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
        {
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
