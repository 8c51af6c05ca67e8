//! Writing GGUF v3 files (llama.cpp's format), as `../shared/reference/
//! gguf-gemma3.md` describes it: magic, version 3, tensor and metadata
//! counts, typed key/values, tensor infos (dims innermost first), then the
//! tensor data, each tensor aligned to 32 bytes. Tensor data are candle
//! `QTensor` blocks, which are ggml's byte layout.

use std::io::Write;
use std::path::Path;

use pipeline_fs::IoContext;

use crate::error::Result;
use candle_core::quantized::GgmlDType;

/// A metadata value.
pub use pipeline_model::gguf::MetaValue as Value;

/// Alignment of tensor data (`general.alignment`'s default).
pub const ALIGNMENT: usize = 32;

/// One tensor: name, type, HF-order dims (`[out, in]`), and its bytes.
pub struct TensorData {
    pub name: String,
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// ggml's type id of a candle quantized dtype.
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    use GgmlDType::*;
    match t {
        F32 => 0,
        F16 => 1,
        Q4_0 => 2,
        Q4_1 => 3,
        Q5_0 => 6,
        Q5_1 => 7,
        Q8_0 => 8,
        Q8_1 => 9,
        Q2K => 10,
        Q3K => 11,
        Q4K => 12,
        Q5K => 13,
        Q6K => 14,
        Q8K => 15,
        BF16 => 30,
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value(out: &mut Vec<u8>, v: &Value) {
    let array = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend_from_slice(&9u32.to_le_bytes());
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
    };
    match v {
        Value::U32(x) => {
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::I32(x) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::F32(x) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
        Value::Bool(b) => {
            out.extend_from_slice(&7u32.to_le_bytes());
            out.push(u8::from(*b));
        }
        Value::Str(s) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            string(out, s);
        }
        Value::Strs(items) => {
            array(out, 8, items.len());
            for s in items {
                string(out, s);
            }
        }
        Value::F32s(items) => {
            array(out, 6, items.len());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Value::I32s(items) => {
            array(out, 5, items.len());
            for x in items {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Writes a GGUF v3 file.
pub fn write(path: &Path, metadata: &[(String, Value)], tensors: &[TensorData]) -> Result<()> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut head, k);
        value(&mut head, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        string(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += t.bytes.len().next_multiple_of(ALIGNMENT);
    }
    head.resize(head.len().next_multiple_of(ALIGNMENT), 0);
    let file = std::fs::File::create(path).on("create", path)?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&head).on("write", path)?;
    for t in tensors {
        w.write_all(&t.bytes).on("write", path)?;
        let pad = t.bytes.len().next_multiple_of(ALIGNMENT) - t.bytes.len();
        w.write_all(&vec![0u8; pad]).on("write", path)?;
    }
    w.into_inner().map_err(|e| e.into_error()).and_then(|f| f.sync_all()).on("write", path)?;
    Ok(())
}
