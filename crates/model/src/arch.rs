//! [`Arch`]: one variant per model family, generated from the list at the
//! bottom of this file, and what dispatches to each family's [`Family`].
//! Adding a family is its file and one line here.

use crate::error::{Error, Result};
use crate::family::{Family, gguf_name, hf_name};
use crate::gguf_meta::GgufMetadata;
use crate::{CausalLm, Weights};

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
