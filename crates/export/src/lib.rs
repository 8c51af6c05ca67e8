//! What leaves the cache for other programs, in their own formats:
//!
//! - [`merge`]: an adapter folded into its base, as a transformers model dir;
//! - [`quantize`]: GGUF files per quantization type, tensor types as
//!   llama-quantize picks them, the tokenizer and chat template as metadata;
//!   the adapter alone as a GGUF LoRA;
//! - [`modelfile`]: an Ollama Modelfile serving a GGUF with the trained
//!   template;
//! - [`gguf_writer`]: the GGUF v3 container llama.cpp and Ollama read;
//! - [`kquants`]: llama.cpp's reference K-quant encoders (files byte-equal to
//!   `llama-quantize`'s).

pub mod error;
pub mod gguf_writer;
pub mod kquants;
pub mod merge;
pub mod modelfile;
pub mod quantize;

pub use error::{Error, Result};
