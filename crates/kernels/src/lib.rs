//! CPU kernels as candle custom ops, each checked against a composed twin.
//!
//! - [`fused`]: RMSNorm, RoPE, softmax, GELU and (linear) cross-entropy as one
//!   pass each, with hand-written backward passes (candle's own fused ops
//!   have none);
//! - [`attention`]: causal attention computing only the visible band of
//!   scores (sliding windows included), forward and backward;
//! - [`fused_lora`]: a LoRA linear layer (base GEMM and rank-r update) as one
//!   op that keeps only its input and a one-bit dropout mask ([`keep`]);
//! - [`gemv`]: quantized GGUF blocks kept for decoding, and their
//!   matrix-vector products (a few input rows per pass over the weights);
//! - [`vmath`]: vectorised exp / GELU / dot products (AVX2 + FMA when the
//!   CPU has them, scalar otherwise);
//! - [`composed`]: the same operations built from candle primitives, the
//!   reference in tests and the path off the CPU.
//!
//! Nothing here knows about models: shapes and slices in, tensors out.

pub mod attention;
pub mod composed;
pub mod fused;
pub mod fused_lora;
pub mod gemv;
pub mod keep;
pub mod vmath;
