//! GGUF files for llama.cpp and Ollama, one per quantization type.
//!
//! Per-tensor types follow llama-quantize: 1-D tensors stay f32; for the
//! `_M` K-quant mixes, `attn_v` and `ffn_down` get Q6_K on the layers
//! llama.cpp's `use_more_bits` picks and the (tied) embeddings get Q6_K;
//! K-quants need rows that are multiples of 256, so narrower matrices fall
//! back the way llama-quantize does (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0).
//! Gemma norms are stored as `w + 1` (llama.cpp multiplies by `w`). The
//! metadata holds the hyper-parameters, the tokenizer (tokens, scores, token
//! types, merges for BPE models, special ids) and the trained chat template.

use std::collections::BTreeMap;
use std::path::Path;

use pipeline_fs::IoContext;

use crate::error::{Error, Result, bad_file};
use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor};
use pipeline_model::Arch;
use pipeline_model::ModelFiles;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use crate::gguf_writer::{TensorData, Value};

/// A GGUF file type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QuantType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    /// SmolLM2's provisioned file is Q4_1.
    Q4_1,
    Q4KM,
    Q5KM,
    Q6K,
}

impl QuantType {
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::F16 => "f16",
            QuantType::Bf16 => "bf16",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q4KM => "q4_k_m",
            QuantType::Q5KM => "q5_k_m",
            QuantType::Q6K => "q6_k",
        }
    }

    /// llama.cpp's `general.file_type` (LlamaFileType).
    fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Bf16 => 32,
            QuantType::Q8_0 => 7,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q4KM => 15,
            QuantType::Q5KM => 17,
            QuantType::Q6K => 18,
        }
    }
}

/// llama.cpp's `use_more_bits`: the layers a `_M` mix gives more bits.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer as isize - (layers / 8) as isize) % 3 == 2
}

/// The type of one tensor (GGUF name, ne0 = row length) in a `target` file,
/// as llama-quantize chooses it (`llama_tensor_get_type`): `tied` when the
/// model has no `output.weight`, so that `token_embd` is also the LM head
/// and gets the output tensor's type.
pub fn tensor_type(target: QuantType, name: &str, ne0: usize, rank: usize, layers: usize, tied: bool) -> GgmlDType {
    use GgmlDType::*;
    let base = match target {
        QuantType::F32 => F32,
        QuantType::F16 => F16,
        QuantType::Bf16 => BF16,
        QuantType::Q8_0 => Q8_0,
        QuantType::Q4_0 => Q4_0,
        QuantType::Q4_1 => Q4_1,
        QuantType::Q4KM => Q4K,
        QuantType::Q5KM => Q5K,
        QuantType::Q6K => Q6K,
    };
    if rank == 1 {
        return F32;
    }
    if matches!(base, F32 | F16 | BF16) {
        return base;
    }
    let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok());
    let more_bits =
        (name.contains(".attn_v.") || name.contains(".ffn_down.")) && layer.is_some_and(|l| use_more_bits(l, layers));
    let is_head = name == "output.weight" || (tied && name == "token_embd.weight");
    let t = if is_head {
        // The output tensor: Q6_K unless the file is Q8_0, or its rows do
        // not fit the file type's blocks (then Q8_0).
        if ne0 % base.block_size() != 0 || base == Q8_0 { Q8_0 } else { Q6K }
    } else {
        match target {
            QuantType::Q4KM | QuantType::Q5KM if more_bits => Q6K,
            _ => base,
        }
    };
    // Rows that do not fit a type's blocks fall back to a smaller block.
    let t = match t {
        Q4K if ne0 % 256 != 0 => Q5_0,
        Q5K if ne0 % 256 != 0 => Q5_1,
        Q6K if ne0 % 256 != 0 => Q8_0,
        t => t,
    };
    if ne0 % t.block_size() != 0 { F16 } else { t }
}

/// How a GGUF file is written, beyond its type.
#[derive(Debug, Clone, Default)]
pub struct GgufOptions {
    /// The chat template the file carries instead of the model's own (a
    /// base model served with an adapter carries the trained template).
    pub chat_template: Option<String>,
    /// When the model is itself a GGUF file: a tensor whose stored type is
    /// the type it gets in the written file is copied block for block
    /// instead of being decoded and encoded again. Serving a quantized base
    /// beside a LoRA adapter then serves the very weights training saw.
    pub keep_stored_blocks: bool,
}

/// Writes `model` as a GGUF file of type `target`; returns per-file stats.
pub fn write_gguf(model: &ModelFiles, target: QuantType, name: &str, path: &Path) -> Result<Json> {
    write_gguf_with(model, target, name, path, &GgufOptions::default())
}

/// [`write_gguf`] with [`GgufOptions`].
pub fn write_gguf_with(
    model: &ModelFiles,
    target: QuantType,
    name: &str,
    path: &Path,
    options: &GgufOptions,
) -> Result<Json> {
    let device = Device::Cpu;
    let (arch, weights) = pipeline_model::load_weights(model, &device, false)?;
    let family = arch.family();
    let (arch_name, layers) = (family.gguf_arch(), family.num_layers());
    let mut map: Vec<(String, candle_core::Tensor)> = weights.into_map().into_iter().collect();
    map.sort_by(|a, b| a.0.cmp(&b.0));
    let tied = !map.iter().any(|(hf, _)| hf == "lm_head.weight");
    let mut stored = match options.keep_stored_blocks && model.is_gguf() {
        true => Some(StoredBlocks::open(&model.weights[0])?),
        false => None,
    };
    let mut tensors = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut kept = 0;
    let mut vocab_rows = 0;
    for (hf, t) in map {
        let Some(gname) = arch.gguf_tensor_name(&hf) else {
            return Err(Error::Unsupported(format!(
                "{}: tensor `{hf}` has no GGUF name for {arch_name}",
                model.source
            )));
        };
        if hf == "model.embed_tokens.weight" {
            vocab_rows = t.dim(0)?;
        }
        let t = family.tensor_to_gguf(&hf, t)?;
        let dims = t.dims().to_vec();
        let dtype = tensor_type(target, &gname, *dims.last().unwrap_or(&1), dims.len(), layers, tied);
        let bytes = match stored.as_mut().map(|s| s.blocks(&gname, dtype, &dims)).transpose()?.flatten() {
            Some(bytes) => {
                kept += 1;
                bytes
            }
            None => encode(&t, dtype)?,
        };
        *counts.entry(format!("{dtype:?}")).or_default() += 1;
        tensors.push(TensorData { name: gname, dtype, dims, bytes });
    }
    // llama.cpp orders tensors as converters write them: embeddings first,
    // then layer by layer, each layer's in the order of their transformers
    // names (the input's; the sort is stable).
    tensors.sort_by_key(|t| (t.name != "token_embd.weight", layer_of(&t.name)));
    // Tensors that are not weights (Llama 3.1+'s rotary factors) come
    // before them, in f32, as the converter writes them and llama-quantize
    // keeps them.
    let extra = family.gguf_extra_tensors()?;
    for (i, (gname, t)) in extra.into_iter().enumerate() {
        *counts.entry(format!("{:?}", GgmlDType::F32)).or_default() += 1;
        let bytes = encode(&t, GgmlDType::F32)?;
        tensors.insert(i, TensorData { name: gname, dtype: GgmlDType::F32, dims: t.dims().to_vec(), bytes });
    }
    let mut md = architecture_metadata(&arch, name, target)?;
    md.extend(tokenizer_metadata(model, &arch, vocab_rows, options.chat_template.as_deref())?);
    crate::gguf_writer::write(path, &md, &tensors)?;
    Ok(json!({
        "type": target.name(),
        "tensors": tensors.len(),
        "tensors_kept_as_stored": kept,
        "tensor_types": counts,
        "size_bytes": std::fs::metadata(path).on("read", path)?.len(),
    }))
}

/// The tensors of a GGUF file, read as stored.
struct StoredBlocks {
    path: std::path::PathBuf,
    file: std::fs::File,
    content: candle_core::quantized::gguf_file::Content,
}

impl StoredBlocks {
    fn open(path: &Path) -> Result<StoredBlocks> {
        let mut file = std::fs::File::open(path).on("open", path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)
            .map_err(|e| bad_file(path, format!("not a GGUF file: {e}")))?;
        Ok(StoredBlocks { path: path.to_path_buf(), file, content })
    }

    /// The stored blocks of tensor `name` when it is stored as `dtype` with
    /// `dims` (outermost first).
    fn blocks(&mut self, name: &str, dtype: GgmlDType, dims: &[usize]) -> Result<Option<Vec<u8>>> {
        match self.content.tensor_infos.get(name) {
            Some(info) if info.ggml_dtype == dtype && info.shape.dims() == dims => {}
            _ => return Ok(None),
        }
        let t = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| bad_file(&self.path, format!("cannot read tensor `{name}`: {e}")))?;
        Ok(Some(t.data()?.to_vec()))
    }
}

/// A tensor's data as `dtype` blocks: K-quants with llama.cpp's reference
/// encoders ([`crate::kquants`]), the rest with candle's (which equal ggml's).
fn encode(t: &candle_core::Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    let kquant: Option<fn(&[f32]) -> Vec<u8>> = match dtype {
        GgmlDType::Q4K => Some(crate::kquants::q4_k),
        GgmlDType::Q5K => Some(crate::kquants::q5_k),
        GgmlDType::Q6K => Some(crate::kquants::q6_k),
        _ => None,
    };
    match kquant {
        Some(f) => {
            let x: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
            // Rows are independent: encode them on every core.
            let row = *t.dims().last().unwrap_or(&1);
            use rayon::prelude::*;
            Ok(x.par_chunks(row).flat_map_iter(f).collect())
        }
        None => Ok(QTensor::quantize(t, dtype)?.data()?.to_vec()),
    }
}

/// The architecture of a model, from its `config.json` or GGUF metadata
/// (without reading its weights).
pub fn model_arch(model: &ModelFiles) -> Result<Arch> {
    Ok(if model.is_gguf() {
        pipeline_model::gguf::read_arch(&model.weights[0])?
    } else {
        let config = model.config_json.as_ref().ok_or_else(|| bad_file(&model.dir, "no config.json"))?;
        pipeline_model::read_config(config)?
    })
}

/// Writes a PEFT adapter as a GGUF LoRA adapter: `general.type = adapter`,
/// `adapter.type = lora`, `adapter.lora.alpha`, and per module
/// `<base tensor>.lora_a` (HF A `[r, in]` as is, ggml `[in, r]`) and
/// `.lora_b` (HF B `[out, r]`, ggml `[r, out]`), in f32. rsLoRA's α/√r is
/// expressed as the α that gives the same scale with llama.cpp's α/r.
pub fn write_adapter_gguf(adapter_dir: &Path, arch: &Arch, path: &Path) -> Result<Json> {
    let pipeline_model::adapter::LoadedAdapter { config, tensors, .. } =
        pipeline_model::adapter::load(adapter_dir, &Device::Cpu)?;
    let alpha = config.scale() * config.r as f64;
    let md = vec![
        ("general.architecture".to_string(), Value::Str(arch.family().gguf_arch().into())),
        ("general.type".into(), Value::Str("adapter".into())),
        ("adapter.type".into(), Value::Str("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha as f32)),
    ];
    let mut out = Vec::new();
    for (module, (a, b)) in &tensors {
        let base = arch.gguf_tensor_name(&format!("{module}.weight")).ok_or_else(|| {
            Error::Unsupported(format!("{}: module `{module}` has no GGUF name", adapter_dir.display()))
        })?;
        for (suffix, t) in [("lora_a", a), ("lora_b", b)] {
            let q = QTensor::quantize(t, GgmlDType::F32)?;
            out.push(TensorData {
                name: format!("{base}.{suffix}"),
                dtype: GgmlDType::F32,
                dims: t.dims().to_vec(),
                bytes: q.data()?.to_vec(),
            });
        }
    }
    out.sort_by_key(|t| (layer_of(&t.name), t.name.clone()));
    crate::gguf_writer::write(path, &md, &out)?;
    Ok(
        json!({"type": "lora adapter", "tensors": out.len(), "alpha": alpha, "size_bytes": std::fs::metadata(path).on("read", path)?.len()}),
    )
}

fn layer_of(name: &str) -> usize {
    name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok()).unwrap_or(usize::MAX)
}

fn architecture_metadata(arch: &Arch, name: &str, target: QuantType) -> Result<Vec<(String, Value)>> {
    let family = arch.family();
    let mut md = vec![
        ("general.architecture".to_string(), Value::Str(family.gguf_arch().into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(target.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    md.extend(family.gguf_hparams()?);
    Ok(md)
}

/// Added tokens that llama.cpp's converter makes CONTROL even when the
/// tokenizer does not mark them special (`does_token_look_special`).
fn looks_like_control(t: &str) -> bool {
    ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The tokenizer as llama.cpp reads it, from `tokenizer.json` and
/// `tokenizer_config.json`: SentencePiece-style (`llama`) for Gemma, GPT-2
/// BPE with merges for Qwen; `vocab_rows` entries (the embedding's rows).
fn tokenizer_metadata(
    model: &ModelFiles,
    arch: &Arch,
    vocab_rows: usize,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let (family_pre, tokenizer_model) = arch.family().gguf_tokenizer();
    let spm = tokenizer_model == "llama";
    // A GGUF base states its pre-tokenizer (llama.cpp's converter tells
    // them apart by hashing a test string's tokens); keep it.
    let pre = gguf_string(model, "tokenizer.ggml.pre")?.unwrap_or_else(|| family_pre.to_string());
    let tok_path = model.tokenizer_json()?;
    let tj: Json = serde_json::from_slice(&std::fs::read(tok_path).on("read", tok_path)?)
        .map_err(|e| bad_file(tok_path, format!("not JSON: {e}")))?;
    let tc = model.tokenizer_config()?;
    let vocab = tj["model"]["vocab"].as_object().ok_or_else(|| bad_file(tok_path, "no model.vocab"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_rows];
    for (piece, id) in vocab {
        if let Some(slot) = id.as_u64().and_then(|i| tokens.get_mut(i as usize)) {
            *slot = Some(piece.clone());
        }
    }
    // Added tokens, as llama.cpp's converter reads them: tokenizer_config's
    // `added_tokens_decoder` (else tokenizer.json's `added_tokens`). A
    // special token, or one that looks like a control token, is CONTROL;
    // any other is USER_DEFINED, and its text is pre-normalized (`▁` → space)
    // because llama.cpp matches user-defined tokens against the raw text.
    let added_list: Vec<(usize, &Json)> = match tc.get("added_tokens_decoder").and_then(Json::as_object) {
        Some(m) => m.iter().filter_map(|(id, a)| Some((id.parse().ok()?, a))).collect(),
        None => tj["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| Some((a["id"].as_u64()? as usize, a)))
            .collect(),
    };
    let mut added: BTreeMap<usize, bool> = BTreeMap::new();
    for (id, a) in added_list {
        let (Some(content), Some(slot)) = (a["content"].as_str(), tokens.get_mut(id)) else { continue };
        let control = a["special"].as_bool().unwrap_or(false) || looks_like_control(content);
        *slot = Some(if control { content.to_string() } else { content.replace('\u{2581}', " ") });
        added.insert(id, control);
    }
    let token_name = |k: &str| pipeline_infer::chat::special_token(&tc, k);
    let id_of = |name: Option<String>| name.and_then(|n| tokens.iter().position(|t| t.as_deref() == Some(&n)));
    let is_byte = |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
    let types: Vec<i32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| match (added.get(&i), t.as_deref()) {
            (_, None) => 5,
            (Some(true), _) => 3,
            (Some(false), _) => 4,
            (None, Some(t)) if spm && is_byte(t) => 6,
            (None, _) => 1,
        })
        .collect();
    let pieces: Vec<String> =
        tokens.iter().enumerate().map(|(i, t)| t.clone().unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    let mut md = Vec::new();
    if spm {
        // SentencePiece BPE scores rank the pieces: -rank for normal pieces,
        // 0 for byte pieces, -1000 for control and user-defined ones, and
        // -10000 for rows the tokenizer does not fill. (tokenizer.json keeps
        // the ranks of the merged pieces, in id order, which is all that
        // llama.cpp's tokenizer compares; Gemma's own `tokenizer.model`
        // numbers its single characters 31 ranks further down, which no
        // tokenization reads.)
        let mut rank = 0f32;
        let scores: Vec<f32> = types
            .iter()
            .map(|&ty| match ty {
                1 => {
                    rank += 1.0;
                    -(rank - 1.0)
                }
                6 => 0.0,
                5 => -10000.0,
                _ => -1000.0,
            })
            .collect();
        md.extend([
            ("tokenizer.ggml.model".to_string(), Value::Str("llama".into())),
            ("tokenizer.ggml.pre".into(), Value::Str(pre)),
            ("tokenizer.ggml.tokens".into(), Value::Strs(pieces)),
            ("tokenizer.ggml.scores".into(), Value::F32s(scores)),
            ("tokenizer.ggml.token_type".into(), Value::I32s(types)),
        ]);
        md.extend(
            special_additions(&tj, &tc)
                .into_iter()
                .map(|(k, b)| (format!("tokenizer.ggml.add_{k}_token"), Value::Bool(b))),
        );
        md.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
    } else {
        let merges: Vec<String> = tj["model"]["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| match m {
                Json::String(s) => Some(s.clone()),
                Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
                _ => None,
            })
            .collect();
        md.extend([
            ("tokenizer.ggml.model".to_string(), Value::Str("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::Str(pre)),
            ("tokenizer.ggml.tokens".into(), Value::Strs(pieces)),
            ("tokenizer.ggml.token_type".into(), Value::I32s(types)),
            ("tokenizer.ggml.merges".into(), Value::Strs(merges)),
        ]);
        md.extend(
            special_additions(&tj, &tc)
                .into_iter()
                .map(|(k, b)| (format!("tokenizer.ggml.add_{k}_token"), Value::Bool(b))),
        );
    }
    for (key, name) in [
        ("bos_token_id", token_name("bos_token")),
        ("eos_token_id", token_name("eos_token")),
        ("unknown_token_id", token_name("unk_token")),
        ("padding_token_id", token_name("pad_token")),
    ] {
        if let Some(id) = id_of(name) {
            md.push((format!("tokenizer.ggml.{key}"), Value::U32(id as u32)));
        }
    }
    let template = match chat_template {
        Some(t) => Some(t.to_string()),
        None => chat_template_of(model)?,
    };
    if let Some(t) = template {
        let probe = pipeline_infer::chat::ChatTemplate::new(&t, "", &token_name("eos_token").unwrap_or_default());
        if let Some(eot) = probe.ok().and_then(|p| id_of(Some(p.end_of_turn))) {
            md.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(eot as u32)));
        }
        md.push(("tokenizer.chat_template".into(), Value::Str(t)));
    }
    Ok(md)
}

/// Which special tokens the tokenizer adds around a text
/// (`tokenizer.ggml.add_{bos,eos,sep}_token`), decided as llama.cpp's
/// converter decides them (gguf-py's `SpecialVocab`): from the
/// post-processor (each of a `Sequence`: `ByteLevel` adds none,
/// `RobertaProcessing` all three, a `TemplateProcessing` what its
/// templates start, end and separate with), then `add_<kind>_token` in
/// tokenizer_config.json for a kind the post-processor left open.
fn special_additions(tj: &Json, tc: &Json) -> Vec<(&'static str, bool)> {
    let mut add: Vec<(&'static str, bool)> = Vec::new();
    fn set(add: &mut Vec<(&'static str, bool)>, kind: &'static str, value: bool, overwrite: bool) {
        match add.iter_mut().find(|(k, _)| *k == kind) {
            Some(entry) if overwrite => entry.1 = value,
            Some(_) => {}
            None => add.push((kind, value)),
        }
    }
    let token = |k: &str| tc.get(k).and_then(Json::as_str);
    let (bos, cls) = (token("bos_token").or(token("cls_token")), token("cls_token"));
    let (eos, sep) = (token("eos_token").or(token("sep_token")), token("sep_token"));
    fn special(x: Option<&Json>) -> Option<&str> {
        x.and_then(|x| x["SpecialToken"]["id"].as_str())
    }
    let pp = &tj["post_processor"];
    let processors = match pp["processors"].as_array() {
        Some(list) => list.iter().collect(),
        None if pp.is_object() => vec![pp],
        None => Vec::new(),
    };
    for p in processors {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                set(&mut add, "bos", false, false);
                set(&mut add, "eos", false, false);
            }
            Some("RobertaProcessing") => {
                for kind in ["bos", "eos", "sep"] {
                    set(&mut add, kind, true, true);
                }
            }
            Some("TemplateProcessing") => {
                let single = p["single"].as_array().cloned().unwrap_or_default();
                let (mut first, mut last) = (None, None);
                if single.len() > 1 {
                    first = special(single.first());
                    if let Some(f) = first {
                        set(&mut add, "bos", Some(f) == bos || Some(f) == cls, true);
                    }
                    last = special(single.last());
                    if let Some(l) = last {
                        set(&mut add, "eos", Some(l) == eos, true);
                    }
                }
                let pair = p["pair"].as_array().cloned().unwrap_or_default();
                if !pair.is_empty() {
                    let start = usize::from(first.is_some() && special(pair.first()) == first);
                    let stop = pair.len() - usize::from(last.is_some() && special(pair.last()) == last);
                    let pair = &pair[start.min(stop)..stop];
                    fn seq(x: Option<&Json>) -> Option<&str> {
                        x.and_then(|x| x["Sequence"]["id"].as_str())
                    }
                    if pair.len() > 2 && seq(pair.first()) == Some("A") && seq(pair.last()) == Some("B") {
                        let middle = &pair[1..pair.len() - 1];
                        let separates = |x: Option<&str>| x.is_some() && (x == sep || x == eos);
                        let mut add_sep = separates(special(middle.first())) && last.is_none();
                        if middle.len() == 2 && separates(special(middle.get(1))) {
                            add_sep = true;
                        }
                        set(&mut add, "sep", add_sep, true);
                    }
                }
            }
            _ => {}
        }
    }
    for kind in ["bos", "eos", "sep"] {
        if let Some(b) = tc.get(format!("add_{kind}_token")).and_then(Json::as_bool) {
            set(&mut add, kind, b, false);
        }
    }
    add
}

/// The string `key` of a GGUF base's metadata (`None` for other bases).
fn gguf_string(model: &ModelFiles, key: &str) -> Result<Option<String>> {
    if !model.is_gguf() {
        return Ok(None);
    }
    let path = &model.weights[0];
    let mut f = std::fs::File::open(path).on("open", path)?;
    let c = candle_core::quantized::gguf_file::Content::read(&mut f)
        .map_err(|e| bad_file(path, format!("not a GGUF file: {e}")))?;
    Ok(c.metadata.get(key).and_then(|v| v.to_string().ok()).cloned())
}

/// The chat template a model directory carries (`tokenizer_config.json`'s
/// `chat_template`, else a `chat_template.jinja` file).
pub fn chat_template_of(model: &ModelFiles) -> Result<Option<String>> {
    let tc = model.tokenizer_config()?;
    Ok(match tc.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        _ => model.chat_template_file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_tensor_types_follow_llama_quantize() {
        use GgmlDType::*;
        let t = |target, name: &str, ne0| tensor_type(target, name, ne0, 2, 18, true);
        assert_eq!(t(QuantType::Q4KM, "blk.0.ffn_down.weight", 2048), Q6K, "use_more_bits layer 0");
        assert_eq!(t(QuantType::Q4KM, "blk.2.ffn_down.weight", 2048), Q4K);
        assert_eq!(t(QuantType::Q4KM, "blk.4.ffn_down.weight", 2048), Q6K);
        assert_eq!(t(QuantType::Q4KM, "blk.3.attn_q.weight", 640), Q5_0, "Q4_K falls back for 640-wide rows");
        assert_eq!(t(QuantType::Q4KM, "blk.0.attn_v.weight", 640), Q8_0, "Q6_K falls back to Q8_0");
        assert_eq!(t(QuantType::Q4KM, "token_embd.weight", 640), Q8_0);
        assert_eq!(t(QuantType::Q4KM, "token_embd.weight", 1024), Q6K, "the tied head of a 1024-wide model");
        assert_eq!(t(QuantType::Q4_0, "token_embd.weight", 640), Q8_0, "the tied head: Q6_K, which falls back");
        assert_eq!(t(QuantType::Q4_0, "token_embd.weight", 1024), Q6K);
        assert_eq!(t(QuantType::Q4_0, "blk.0.ffn_down.weight", 2048), Q4_0, "Q4_0 is not a mix");
        assert_eq!(tensor_type(QuantType::Q4_0, "token_embd.weight", 1024, 2, 18, false), Q4_0, "untied embeddings");
        assert_eq!(tensor_type(QuantType::Q4_0, "output.weight", 1024, 2, 18, false), Q6K, "the untied head");
        assert_eq!(t(QuantType::Q8_0, "token_embd.weight", 640), Q8_0);
        assert_eq!(t(QuantType::F16, "token_embd.weight", 640), F16);
        assert_eq!(t(QuantType::Q5KM, "blk.3.attn_q.weight", 640), Q5_1);
        assert_eq!(tensor_type(QuantType::Q8_0, "blk.0.attn_norm.weight", 640, 1, 18, true), F32, "1-D stays f32");
        assert_eq!(t(QuantType::Q8_0, "blk.0.attn_q.weight", 100), F16, "rows not a multiple of 32");
    }
}
