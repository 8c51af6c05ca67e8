//! A GGUF file's metadata as model families read and write it: typed
//! values, and the `<arch>.*` hyper-parameters and tensor list of a file.

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file;
use pipeline_fs::IoContext;

use crate::error::{Result, bad_file};

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
