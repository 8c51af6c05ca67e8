//! What a model family knows, reached through one trait.
//!
//! Each family keeps everything about itself in its own file: the
//! hyper-parameters of transformers' `config.json` (read and written), the
//! GGUF architecture name, hyper-parameter keys and tensor names, how a
//! tensor is stored in GGUF, llama.cpp's pre-tokenizer name, and how its
//! model is built. [`Arch`] is generated from the one list at the bottom of
//! this file: adding a family is its file and a line there, and a family
//! that leaves a piece of [`Family`] out does not compile.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::gguf::{GgufMetadata, MetaValue};
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

/// Generates [`Arch`], one variant per family, and its dispatch.
macro_rules! families {
    ($($variant:ident($config:ty)),+ $(,)?) => {
        /// The architecture of a model, from its `config.json` or GGUF
        /// metadata: one variant per [`Family`].
        #[derive(Debug, Clone)]
        pub enum Arch {
            $($variant($config)),+
        }

        impl Arch {
            /// The family, for everything it knows.
            pub fn family(&self) -> &dyn Family {
                match self {
                    $(Arch::$variant(c) => c),+
                }
            }

            /// Every `model_type` read, for messages.
            pub fn model_types() -> Vec<&'static str> {
                [$(<$config as Family>::model_types()),+].concat()
            }

            /// Every GGUF architecture read, for messages.
            pub fn gguf_archs() -> Vec<&'static str> {
                [$(<$config as Family>::gguf_archs()),+].concat()
            }

            /// The family whose `model_types` holds `model_type`.
            fn parse_hf(model_type: &str, v: serde_json::Value) -> Option<serde_json::Result<Arch>> {
                $(if <$config as Family>::model_types().contains(&model_type) {
                    return Some(<$config as Family>::from_hf_config(model_type, v).map(Arch::$variant));
                })+
                None
            }

            /// Every family's random-checkpoint shapes (name, what it is).
            pub fn random_shapes() -> Vec<(&'static str, &'static str)> {
                [$(<$config as Family>::random_shapes()),+].concat()
            }

            /// Writes a random checkpoint of shape `name`
            /// ([`Family::write_random`] of the family that has it).
            pub fn write_random(
                name: &str,
                vocab_size: usize,
                dir: &std::path::Path,
                tokenizer: &std::path::Path,
                seed: u64,
                dtype: candle_core::DType,
            ) -> Result<()> {
                $(if <$config as Family>::random_shapes().iter().any(|(n, _)| *n == name) {
                    return <$config as Family>::write_random(name, vocab_size, dir, tokenizer, seed, dtype);
                })+
                let known: Vec<&str> = Arch::random_shapes().iter().map(|(n, _)| *n).collect();
                Err(Error::Unsupported(format!("no random shape `{name}` (known: {})", known.join(", "))))
            }

            /// The family whose `gguf_archs` holds the file's architecture.
            pub fn from_gguf(md: &GgufMetadata) -> Result<Arch> {
                $(if <$config as Family>::gguf_archs().contains(&md.arch.as_str()) {
                    return <$config as Family>::from_gguf(md).map(Arch::$variant);
                })+
                Err(Error::Unsupported(format!(
                    "{}: GGUF architecture `{}` is not supported (supported: {})",
                    md.path.display(),
                    md.arch,
                    Arch::gguf_archs().join(", ")
                )))
            }
        }
    };
}

impl Arch {
    /// The configuration of a `config.json` (parsed, its `text_config` for
    /// a multimodal checkpoint); `path` names it in errors.
    pub fn from_hf_config(v: serde_json::Value, path: &std::path::Path) -> Result<Arch> {
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or_default().to_string();
        match Arch::parse_hf(&model_type, v) {
            Some(Ok(arch)) => Ok(arch),
            Some(Err(e)) => Err(crate::error::bad_file(path, format!("not a valid {model_type} config: {e}"))),
            None => Err(Error::Unsupported(format!(
                "{}: model_type `{model_type}` is not supported (supported: {})",
                path.display(),
                Arch::model_types().join(", ")
            ))),
        }
    }

    /// See [`Family::hf_config`]; `null` fields are left out.
    pub fn hf_config(&self) -> serde_json::Value {
        let mut v = self.family().hf_config();
        if let Some(o) = v.as_object_mut() {
            o.retain(|_, x| !x.is_null());
        }
        v
    }

    pub fn max_position_embeddings(&self) -> usize {
        self.family().max_position_embeddings()
    }

    /// The architecture's model on `weights`.
    pub fn build(self, weights: &mut Weights, max_positions: usize) -> Result<Box<dyn CausalLm>> {
        self.family().build(weights, max_positions)
    }

    /// llama.cpp's name of transformers tensor `hf`.
    pub fn gguf_tensor_name(&self, hf: &str) -> Option<String> {
        gguf_name(self.family().gguf_layer_names(), hf)
    }

    /// transformers' name of llama.cpp tensor `gguf`.
    pub fn hf_tensor_name(&self, gguf: &str) -> Option<String> {
        hf_name(self.family().gguf_layer_names(), gguf)
    }
}

families! {
    Gemma3(crate::gemma3::Config),
    Qwen(crate::qwen::Config),
    Llama(crate::llama::Config),
}
