//! Reading base weights from a GGUF file (llama.cpp's format).
//!
//! Tensors are dequantized to f32, renamed from llama.cpp's names
//! (`blk.3.ffn_up.weight`) to Hugging Face's (`model.layers.3.mlp.up_proj.
//! weight`) and brought to transformers' layout by their family
//! ([`crate::family::Family::tensor_from_gguf`]: Gemma's norms, Llama's q/k
//! rows). See `../shared/reference/gguf-gemma3.md` for Gemma 3's mapping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pipeline_fs::IoContext;

use crate::error::{Result, bad_file};
use candle_core::Device;
use candle_core::quantized::{GgmlDType, gguf_file};
use pipeline_kernels::gemv::QuantLinear;

use super::{Arch, Weights};

/// A GGUF metadata value, as the files we write hold them.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// A GGUF file's metadata and tensor list, read for its architecture
/// (`<arch>.*` keys).
pub struct GgufMetadata<'a> {
    /// `general.architecture`.
    pub arch: String,
    pub content: &'a gguf_file::Content,
    /// The file, for messages.
    pub path: PathBuf,
}

impl GgufMetadata<'_> {
    pub fn new<'a>(content: &'a gguf_file::Content, path: &Path) -> Result<GgufMetadata<'a>> {
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| bad_file(path, "no general.architecture"))?
            .clone();
        Ok(GgufMetadata { arch, content, path: path.to_path_buf() })
    }

    /// The unsigned integer `<arch>.<key>`.
    pub fn u(&self, key: &str) -> Result<usize> {
        let key = format!("{}.{key}", self.arch);
        let v =
            self.content.metadata.get(&key).ok_or_else(|| bad_file(&self.path, format!("missing metadata `{key}`")))?;
        Ok(v.to_u32()? as usize)
    }

    /// The float `<arch>.<key>`, as the decimal the converter read (1e-6,
    /// not the f32's 9.999999974752427e-7), if present.
    pub fn f_opt(&self, key: &str) -> Option<f64> {
        let shortest = |x: f32| x.to_string().parse().unwrap_or(f64::from(x));
        self.content.metadata.get(&format!("{}.{key}", self.arch)).and_then(|v| v.to_f32().ok()).map(shortest)
    }

    /// [`GgufMetadata::f_opt`], or `default`.
    pub fn f(&self, key: &str, default: f64) -> f64 {
        self.f_opt(key).unwrap_or(default)
    }

    /// Whether the file holds tensor `name` (llama.cpp's name).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The values of tensor `name` (llama.cpp's name; a small one such as
    /// `rope_freqs.weight`), read from the file.
    pub fn tensor_values(&self, name: &str) -> Result<Vec<f32>> {
        let mut file = std::fs::File::open(&self.path).on("open", &self.path)?;
        let t = self.content.tensor(&mut file, name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        Ok(t.flatten_all()?.to_vec1()?)
    }

    /// The vocabulary size: the embedding's rows.
    pub fn vocab_size(&self) -> Result<usize> {
        let info = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| bad_file(&self.path, "no token_embd.weight"))?;
        Ok(info.shape.dims()[0])
    }
}

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
