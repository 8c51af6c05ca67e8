//! What a model family knows, reached through one trait.
//!
//! Each family keeps everything about itself in its own file: the
//! hyper-parameters of transformers' `config.json` (read and written), the
//! GGUF architecture name, hyper-parameter keys and tensor names, how a
//! tensor is stored in GGUF, llama.cpp's pre-tokenizer name, and how its
//! model is built, the random checkpoints it can write. [`crate::Arch`] is
//! generated from the one list in `arch.rs`: adding a family is its file
//! and a line there, and a family that leaves a piece of [`Family`] out does
//! not compile.

use candle_core::Tensor;

use crate::error::Result;
use crate::gguf_meta::{GgufMetadata, MetaValue};
use crate::{CausalLm, Weights};

/// One model family (Gemma 3, Qwen2/Qwen3, Llama): implemented by its
/// configuration type.
pub trait Family: std::fmt::Debug + Send + Sync {
    /// transformers' `model_type`s read as this family.
    fn model_types() -> &'static [&'static str]
    where
        Self: Sized;

    /// llama.cpp's `general.architecture` names read as this family.
    fn gguf_archs() -> &'static [&'static str]
    where
        Self: Sized;

    /// The configuration of a `config.json` whose `model_type` is one of
    /// [`Family::model_types`] (the text config of a multimodal one).
    fn from_hf_config(model_type: &str, config: serde_json::Value) -> serde_json::Result<Self>
    where
        Self: Sized;

    /// The configuration in a GGUF file's metadata.
    fn from_gguf(md: &GgufMetadata) -> Result<Self>
    where
        Self: Sized;

    /// The `config.json` transformers expects (for models whose weights came
    /// from a GGUF, which has none), with the field names and JSON types
    /// transformers writes.
    fn hf_config(&self) -> serde_json::Value;

    /// llama.cpp's architecture name (`general.architecture`).
    fn gguf_arch(&self) -> &'static str;

    /// The `<arch>.*` hyper-parameters llama.cpp's converter writes, or
    /// why this configuration cannot be written as a GGUF.
    fn gguf_hparams(&self) -> Result<Vec<(String, MetaValue)>>;

    /// Tensors llama.cpp reads besides the weights, by llama.cpp name
    /// (Llama 3.1+'s rotary factors, `rope_freqs.weight`), as its converter
    /// writes them from the configuration.
    fn gguf_extra_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Per-layer tensor names: llama.cpp's (`ffn_up`) and transformers'
    /// after `model.layers.N.` (`mlp.up_proj`).
    fn gguf_layer_names(&self) -> &'static [(&'static str, &'static str)];

    /// A tensor read from a GGUF file, as transformers holds it (`hf` its
    /// transformers name): Gemma's norms are stored as `1 + w`, Llama's q/k
    /// rows in llama.cpp's rotary order.
    fn tensor_from_gguf(&self, _hf: &str, t: Tensor) -> Result<Tensor> {
        Ok(t)
    }

    /// Whether [`Family::tensor_from_gguf`] reorders the rows of `hf` (its
    /// stored blocks then cannot multiply in transformers' order).
    fn gguf_rows_reordered(&self, _hf: &str) -> bool {
        false
    }

    /// The inverse of [`Family::tensor_from_gguf`].
    fn tensor_to_gguf(&self, _hf: &str, t: Tensor) -> Result<Tensor> {
        Ok(t)
    }

    /// llama.cpp's `tokenizer.ggml.pre` for this family's `tokenizer.json`
    /// (a GGUF base's own value wins), and the tokenizer model
    /// (`llama`: SentencePiece, `gpt2`: byte-level BPE).
    fn gguf_tokenizer(&self) -> (&'static str, &'static str);

    fn num_layers(&self) -> usize;

    /// The context length the configuration states.
    fn max_position_embeddings(&self) -> usize;

    /// The family's model on `weights`, with rotary tables for
    /// `max_positions`.
    fn build(&self, weights: &mut Weights, max_positions: usize) -> Result<Box<dyn CausalLm>>;

    /// The shapes `pipeline dev random-model --arch NAME` writes for this
    /// family, each with what it is: a tiny one for tests, real models'
    /// for speed and memory measurements without their weights.
    fn random_shapes() -> &'static [(&'static str, &'static str)]
    where
        Self: Sized;

    /// Writes a random-weight checkpoint of shape `name` (one of
    /// [`Family::random_shapes`]) in the real HF layout into `dir`, its
    /// weights stored as `dtype`, with the tokenizer files of `tokenizer`
    /// ([`crate::testing`]).
    fn write_random(
        name: &str,
        vocab_size: usize,
        dir: &std::path::Path,
        tokenizer: &std::path::Path,
        seed: u64,
        dtype: candle_core::DType,
    ) -> Result<()>
    where
        Self: Sized;
}

/// The transformers name of a llama.cpp tensor name under `layer_names`.
pub fn hf_name(layer_names: &[(&str, &str)], gguf_name: &str) -> Option<String> {
    match gguf_name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let hf = layer_names.iter().find(|(g, _)| *g == base)?.1;
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The llama.cpp name of a transformers tensor name (the inverse of
/// [`hf_name`]).
pub fn gguf_name(layer_names: &[(&str, &str)], hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (base, suffix) = rest.rsplit_once('.')?;
    let g = layer_names.iter().find(|(_, h)| *h == base)?.0;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}
