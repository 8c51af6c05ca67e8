//! What leaves the cache for other programs, in their own formats:
//!
//! - [`gguf_writer`]: the GGUF v3 container llama.cpp and Ollama read;
//! - [`kquants`]: llama.cpp's reference K-quant encoders (files byte-equal to
//!   `llama-quantize`'s).

pub mod gguf_writer;
pub mod kquants;
