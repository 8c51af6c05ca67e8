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
//!   AVX-512 VNNI, AVX2 or aarch64's `sdot`);
//! - [`vmath`]: vectorised exp / GELU / dot products (AVX-512 or AVX2 + FMA
//!   when the CPU has them, NEON on aarch64, portable otherwise);
//! - [`bf16`]: products of f32 activations with bf16 frozen weights
//!   (AMX tiles, AVX512-BF16 or aarch64 BF16 dot products, or widened to
//!   f32);
//! - [`team`]: threads that poll for decoding's many short parallel loops
//!   instead of sleeping between them;
//! - [`composed`]: the same operations built from candle primitives, the
//!   reference in tests and the path off the CPU.
//!
//! Every instruction-set path is picked at run time from what the CPU has
//! (capped by [`IsaCap`]) and tested against the portable one.
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
pub(crate) mod quantized_input;
pub mod team;
pub mod vmath;

/// The most capable instruction set the kernels may use, whatever the CPU
/// has: `PIPELINE_MAX_CPU_ISA=portable|avx2|avx512` (as oneDNN's
/// `ONEDNN_MAX_CPU_ISA`), to reproduce an older machine's numbers and
/// speed on a newer one. `portable` also turns off the aarch64 dot-product
/// paths. Unset (or `native`): no limit. The `gemm` crate's f32 products
/// are not covered: they use AVX-512 when built with the `gemm-avx512`
/// feature and the CPU has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsaCap {
    Portable,
    Avx2,
    Avx512,
    Native,
}

impl IsaCap {
    /// The cap in force (read from the environment once).
    pub fn get() -> IsaCap {
        static CAP: std::sync::OnceLock<IsaCap> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| match std::env::var("PIPELINE_MAX_CPU_ISA") {
            Err(_) => IsaCap::Native,
            Ok(v) => IsaCap::parse(&v).unwrap_or_else(|| {
                tracing::warn!(
                    "PIPELINE_MAX_CPU_ISA={v:?} is not one of portable, avx2, avx512, native; \
                     the kernels use every instruction set the CPU has"
                );
                IsaCap::Native
            }),
        })
    }

    fn parse(v: &str) -> Option<IsaCap> {
        Some(match v.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => IsaCap::Portable,
            "avx2" => IsaCap::Avx2,
            "avx512" => IsaCap::Avx512,
            "" | "native" => IsaCap::Native,
            _ => return None,
        })
    }

    /// Whether paths of `isa` may run.
    pub fn allows(isa: IsaCap) -> bool {
        IsaCap::get() >= isa
    }

    /// Whether any path beyond the portable one may run (on aarch64, where
    /// there are no x86 levels, the NEON dot-product ones).
    pub fn allows_simd() -> bool {
        IsaCap::get() > IsaCap::Portable
    }

    fn name(self) -> &'static str {
        match self {
            IsaCap::Portable => "portable",
            IsaCap::Avx2 => "avx2",
            IsaCap::Avx512 => "avx512",
            IsaCap::Native => "native",
        }
    }
}

/// The instruction paths the kernels take on this CPU, as `bench` and the
/// training log print them.
pub fn cpu_paths() -> String {
    let cap = match IsaCap::get() {
        IsaCap::Native => String::new(),
        cap => format!(" (PIPELINE_MAX_CPU_ISA={})", cap.name()),
    };
    format!(
        "vmath {}, quantized gemv {}, quantized prefill {}, bf16 gemm {}, f32 gemm {}{cap}",
        vmath::Tier::best().name(),
        gemv::path(),
        qgemm::Path::best().name(),
        bf16::path().name(),
        f32_gemm_path()
    )
}

/// What the `gemm` crate (f32 products) runs here: AVX-512 when it was built
/// with its `x86-v4` kernels and the CPU has AVX-512F, else AVX2 + FMA; its
/// NEON kernels on aarch64.
fn f32_gemm_path() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        return "neon";
    }
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

#[cfg(test)]
mod tests {
    use super::IsaCap;

    #[test]
    fn isa_caps_parse_and_order() {
        assert_eq!(IsaCap::parse("AVX2"), Some(IsaCap::Avx2));
        assert_eq!(IsaCap::parse(" avx512 "), Some(IsaCap::Avx512));
        assert_eq!(IsaCap::parse("portable"), Some(IsaCap::Portable));
        assert_eq!(IsaCap::parse(""), Some(IsaCap::Native));
        assert_eq!(IsaCap::parse("sse2"), None);
        assert!(IsaCap::Portable < IsaCap::Avx2 && IsaCap::Avx2 < IsaCap::Avx512 && IsaCap::Avx512 < IsaCap::Native);
    }
}
