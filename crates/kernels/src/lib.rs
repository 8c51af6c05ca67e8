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
//!   a prompt's many rows go through `qgemm` (8-bit integer products,
//!   AVX-512 VNNI or AVX2);
//! - [`vmath`]: vectorised exp / GELU / dot products (AVX-512 or AVX2 + FMA
//!   when the CPU has them, portable otherwise);
//! - [`bf16`]: products of f32 activations with bf16 frozen weights
//!   (AMX tiles, AVX512-BF16 dot products, or widened to f32);
//! - [`team`]: threads that poll for decoding's many short parallel loops
//!   instead of sleeping between them;
//! - [`composed`]: the same operations built from candle primitives, the
//!   reference in tests and the path off the CPU.
//!
//! Nothing here knows about models: shapes and slices in, tensors out.

pub mod attention;
pub mod bf16;
pub mod composed;
pub mod fused;
pub mod fused_lora;
pub mod gemv;
pub mod keep;
pub(crate) mod qgemm;
pub mod team;
pub mod vmath;

/// The instruction paths the kernels take on this CPU, as `bench` and the
/// training log print them.
pub fn cpu_paths() -> String {
    format!(
        "vmath {}, quantized gemv {}, quantized prefill {}, bf16 gemm {}, f32 gemm {}",
        vmath::Tier::best().name(),
        gemv::path(),
        qgemm::Path::best().name(),
        bf16::path().name(),
        f32_gemm_path()
    )
}

/// What the `gemm` crate (f32 products) runs here: AVX-512 when it was built
/// with its `x86-v4` kernels and the CPU has AVX-512F, else AVX2 + FMA.
fn f32_gemm_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if cfg!(feature = "gemm-avx512") && has!("avx512f") {
            return "avx512f";
        }
        if has!("avx2") && has!("fma") {
            return "avx2+fma";
        }
    }
    "portable"
}
