//! Inputs quantized as llama.cpp quantizes activations for its integer dot
//! products (Q8_0: `i8` per 32 values with an f16 scale), shared by the
//! decoding products ([`crate::gemv`]) and the prompt's panel products
//! ([`crate::qgemm`]), and which instruction set those products use on this
//! CPU ([`path`]).

use half::f16;

/// The instruction set the quantized products use on this CPU.
/// (Detected once.)
pub fn path() -> &'static str {
    static PATH: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    PATH.get_or_init(detect_path)
}

fn detect_path() -> &'static str {
    if !crate::IsaCap::allows_simd() {
        return "portable";
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        return "neon+dotprod";
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return "avx2+fma+f16c";
        }
    }
    "portable"
}

/// Inputs quantized to `i8` per 32 values exactly as llama.cpp's Q8_0
/// activations: scale `d = max|x|/127` kept as f16, values `round(x/d)`
/// with the unrounded `d`; plus each block's `16·Σq`, which turns the dot
/// product with Q5_0's unsigned `q` into the one with `q − 16`.
pub(crate) struct Quantized {
    pub(crate) q: Vec<i8>,
    pub(crate) d: Vec<f32>,
    /// `16·Σq` per block, then 8 zeros (the kernels read 8 at a time).
    pub(crate) sums: Vec<i32>,
    pub(crate) nb: usize,
    /// `q + 128` as bytes, made once for all the products that take it
    /// ([`Quantized::shifted`]).
    shifted: std::sync::OnceLock<Vec<u8>>,
}

impl Quantized {
    /// `x` holds inputs of `inp` values each. A prompt's many rows are
    /// quantized in parallel, in tasks of 64 rows.
    pub(crate) fn new(x: &[f32], inp: usize) -> Quantized {
        let blocks = x.len() / 32;
        let (mut q, mut d, mut sums) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks + 8]);
        let per_task = 64 * inp;
        let tasks: Vec<_> = x
            .chunks(per_task)
            .zip(q.chunks_mut(per_task))
            .zip(d.chunks_mut(per_task / 32))
            .zip(sums.chunks_mut(per_task / 32))
            .collect();
        crate::team::for_each(tasks, |(((x, q), d), sums)| quantize_blocks(x, q, d, sums));
        Quantized { q, d, sums, nb: inp / 32, shifted: std::sync::OnceLock::new() }
    }

    /// The values plus 128, as unsigned bytes (what AVX-512 VNNI's
    /// unsigned × signed products take for signed weights), computed on
    /// first use: the layers that share an input (q, k, v; gate, up) share
    /// the copy.
    pub(crate) fn shifted(&self) -> &[u8] {
        self.shifted.get_or_init(|| self.q.iter().map(|&v| (v as u8) ^ 0x80).collect())
    }

    /// Inputs `i..i + k`.
    pub(crate) fn inputs(&self, i: usize, k: usize) -> Inputs<'_> {
        let nb = self.nb;
        Inputs {
            q: &self.q[i * nb * 32..(i + k) * nb * 32],
            d: &self.d[i * nb..(i + k) * nb],
            sums: &self.sums[i * nb..],
            nb,
        }
    }
}

/// Blocks of 32 values of `x` into `q` (`round(x/d)`, ties to even as
/// llama.cpp's AVX2 quantization rounds), their scales `d = max|x|/127` (as
/// f16) into `d`, and `16·Σq` into `sums`, block by block.
fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    #[cfg(target_arch = "aarch64")]
    if path() == "neon+dotprod" {
        // SAFETY: the CPU has NEON; the slices hold x.len() / 32 blocks.
        return unsafe { quantize_blocks_neon(x, q, d, sums) };
    }
    #[cfg(target_arch = "x86_64")]
    {
        if path() == "avx2+fma+f16c" {
            // SAFETY: the CPU has AVX2; the slices hold x.len() / 32 blocks.
            return unsafe { quantize_blocks_avx2(x, q, d, sums) };
        }
    }
    quantize_blocks_portable(x, q, d, sums)
}

/// [`quantize_blocks`] in plain Rust.
fn quantize_blocks_portable(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    for (((xb, qb), db), sb) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(d).zip(sums) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        *db = f16::from_f32(scale).to_f32();
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (qv, v) in qb.iter_mut().zip(xb) {
            *qv = (v * inv).round_ties_even() as i8;
        }
        *sb = 16 * qb.iter().map(|&v| v as i32).sum::<i32>();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    for (((xb, qb), db), sb) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(d).zip(sums) {
        // SAFETY: each block has 32 values and 32 bytes.
        unsafe {
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xb.as_ptr().add(8 * i)));
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let scale = amax / 127.0;
            *db = f16::from_f32(scale).to_f32();
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            // Products rounded to nearest (ties to even), as i32.
            let i = v.map(|v| {
                _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                    v, inv,
                )))
            });
            let total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
            let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
            let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
            *sb = 16 * _mm_cvtsi128_si32(t);
            // i32 → i16 → i8 packs interleave 128-bit lanes; undo it.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qb.as_mut_ptr() as *mut __m256i, ordered);
        }
    }
}

/// Some consecutive inputs of a [`Quantized`] batch, `nb` blocks each.
#[derive(Clone, Copy)]
pub(crate) struct Inputs<'a> {
    pub(crate) q: &'a [i8],
    pub(crate) d: &'a [f32],
    /// From the first input's first block to the end of the padded array.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(crate) sums: &'a [i32],
    pub(crate) nb: usize,
}

impl Inputs<'_> {
    pub(crate) fn count(&self) -> usize {
        self.d.len() / self.nb
    }
}

/// [`quantize_blocks`] on NEON: the same values, scales and sums
/// (`vcvtnq` rounds to nearest, ties to even).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn quantize_blocks_neon(x: &[f32], q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    use std::arch::aarch64::*;
    for (((xb, qb), db), sb) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(d).zip(sums) {
        // SAFETY: each block has 32 values and 32 bytes.
        unsafe {
            let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(xb.as_ptr().add(4 * i)));
            let mut m = vabsq_f32(v[0]);
            for vi in &v[1..] {
                m = vmaxq_f32(m, vabsq_f32(*vi));
            }
            let scale = vmaxvq_f32(m) / 127.0;
            *db = f16::from_f32(scale).to_f32();
            let inv = vdupq_n_f32(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let i: [int32x4_t; 8] = std::array::from_fn(|j| vcvtnq_s32_f32(vmulq_f32(v[j], inv)));
            let mut total = i[0];
            for ij in &i[1..] {
                total = vaddq_s32(total, *ij);
            }
            *sb = 16 * vaddvq_s32(total);
            for h in 0..2 {
                let w = |j: usize| vcombine_s16(vqmovn_s32(i[4 * h + 2 * j]), vqmovn_s32(i[4 * h + 2 * j + 1]));
                vst1q_s8(qb.as_mut_ptr().add(16 * h), vcombine_s8(vqmovn_s16(w(0)), vqmovn_s16(w(1))));
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether this test has a SIMD path to test: on x86-64 the build says
    /// the CPU has AVX2, and the kernels must then use it (the test is
    /// ignored otherwise); cross-built for aarch64, a CPU without `sdot`
    /// says so and the test returns.
    pub(crate) fn simd_under_test(test: &str) -> bool {
        if cfg!(target_arch = "aarch64") && path() == "portable" {
            eprintln!("SKIPPED {test}: this CPU has no SIMD path for it");
            return false;
        }
        assert_ne!(path(), "portable", "{test}: the CPU has AVX2 but the kernels do not use it");
        true
    }

    /// The AVX2 (or NEON) quantization of the input gives the portable
    /// one's values, scales and sums bit for bit, ties (x/d exactly k + ½)
    /// included.
    #[test]
    #[cfg_attr(
        all(target_arch = "x86_64", not(cpu_avx2)),
        ignore = "no AVX2 on this CPU (or PIPELINE_MAX_CPU_ISA caps it): the SIMD path is not tested here"
    )]
    fn simd_quantization_equals_the_portable_one() {
        let mut x: Vec<f32> = (0..64 * 32).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0).collect();
        // A block whose scale is 1 (max 127) and whose values end in ½.
        for (j, v) in x[..32].iter_mut().enumerate() {
            *v = if j == 0 { 127.0 } else { j as f32 - 60.5 };
        }
        x[32..64].fill(0.0);
        let blocks = x.len() / 32;
        let run = |simd: bool| {
            let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; blocks], vec![0i32; blocks]);
            if simd {
                quantize_blocks(&x, &mut q, &mut d, &mut s)
            } else {
                quantize_blocks_portable(&x, &mut q, &mut d, &mut s)
            }
            (q, d, s)
        };
        if !simd_under_test("simd_quantization_equals_the_portable_one") {
            return;
        }
        let (simd, portable) = (run(true), run(false));
        assert_eq!(simd, portable);
        assert_eq!(&portable.0[1..4], &[-60, -58, -58], "ties go to even");
    }
}
