//! The x86-64 kernels of [`super::Blocks32::rows`]: AVX2 integer dot
//! products of 8-bit inputs with Q8_0 and Q5_0 blocks, eight rows at a time.

use half::f16;

use crate::quantized_input::Inputs;

/// How many 32-value blocks ahead of the one multiplied the kernels ask for
/// the weights (software prefetch): the rows of a task are one stream, but
/// the hardware prefetchers alone left the LM head at ~20 GB/s of the
/// ~30 GB/s two cores read (measured with `examples/gemv_speed.rs`).
const PREFETCH_BLOCKS: usize = 64;

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_i8_avx2(v: &[i8], s: &[f16], r0: usize, x: Inputs<'_>, y: &mut [f32]) {
    use std::arch::x86_64::*;
    // SAFETY (loads): block i's 32 values lie inside `v`.
    unsafe {
        rows_avx2::<false>(s, r0, x, y, |i| {
            // Weights stream from memory once per step: ask for them ahead.
            _mm_prefetch::<_MM_HINT_T0>(v.as_ptr().wrapping_add((i + PREFETCH_BLOCKS) * 32));
            _mm256_loadu_si256(v.as_ptr().add(i * 32) as *const __m256i)
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows_q5_avx2(lo: &[u8], hi: &[u32], s: &[f16], r0: usize, x: Inputs<'_>, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let low4 = _mm256_set1_epi8(0x0F);
    let sixteen = _mm256_set1_epi8(0x10);
    // Byte k of a 32-bit word, broadcast to bytes 8k..8k+8; then one bit each.
    let spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    let load = |i: usize| {
        _mm_prefetch::<_MM_HINT_T0>(lo.as_ptr().wrapping_add((i + PREFETCH_BLOCKS) * 16) as *const i8);
        // SAFETY: block i's 16 nibble bytes lie inside `lo`.
        let nib = unsafe { _mm_loadu_si128(lo.as_ptr().add(i * 16) as *const __m128i) };
        let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(nib, 4), nib), low4);
        // 0xFF in the bytes whose fifth bit is set.
        let bits = _mm256_shuffle_epi8(_mm256_set1_epi32(hi[i] as i32), spread);
        let set = _mm256_cmpeq_epi8(_mm256_or_si256(bits, bit), _mm256_set1_epi64x(-1));
        // The unsigned q (0..31); the kernel subtracts 16·Σx per block.
        _mm256_or_si256(nibbles, _mm256_and_si256(set, sixteen))
    };
    // SAFETY: `load` stays inside the arrays for the rows the caller gave.
    unsafe { rows_avx2::<true>(s, r0, x, y, load) }
}

/// Rows `r0..r0 + n` of `W·xᵢ` for `i8` weight blocks produced by `load(j)`
/// (block j = row·nb + b) with f16 scales `s`, and 1 to [`INPUTS_PER_PASS`](super::INPUTS_PER_PASS)
/// inputs `x`; `y` is `[k][n]`. `UNSIGNED`: `load` gives Q5_0's unsigned
/// `q` (0..31), whose value is `q − 16`.
///
/// Blocks go eight at a time: each weight block is loaded (and for Q5_0
/// expanded) once and multiplied with every input; per input, the eight
/// integer dot products are reduced into one vector of eight block sums,
/// scaled by the eight blocks' combined scales (F16C) in one multiply-add.
/// (Scaling each block on its own, with a broadcast and an FMA per block,
/// was 2–3× slower.) Rows go eight at a time too: their eight accumulators
/// are reduced into one vector of eight results the same way.
#[inline(always)]
pub(super) unsafe fn rows_avx2<const UNSIGNED: bool>(
    s: &[f16],
    r0: usize,
    x: Inputs<'_>,
    y: &mut [f32],
    load: impl Fn(usize) -> std::arch::x86_64::__m256i,
) {
    match x.count() {
        // SAFETY: as for `rows_k`.
        1 => unsafe { rows_k::<1, UNSIGNED>(s, r0, x, y, load) },
        2 => unsafe { rows_k::<2, UNSIGNED>(s, r0, x, y, load) },
        3 => unsafe { rows_k::<3, UNSIGNED>(s, r0, x, y, load) },
        _ => unsafe { rows_k::<4, UNSIGNED>(s, r0, x, y, load) },
    }
}

/// `[Σd0, Σd1, …, Σd7]` (lane i: the sum of vector i's lanes).
#[inline(always)]
unsafe fn sum8_i32(d: &[std::arch::x86_64::__m256i; 8]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: inlined into callers compiled for AVX2.
    unsafe {
        let s03 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3]));
        let s47 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7]));
        _mm256_add_epi32(_mm256_permute2x128_si256(s03, s47, 0x20), _mm256_permute2x128_si256(s03, s47, 0x31))
    }
}

/// [`sum8_i32`] for floats.
#[inline(always)]
unsafe fn sum8_f32(d: &[std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: inlined into callers compiled for AVX.
    unsafe {
        let s03 = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
        let s47 = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
        _mm256_add_ps(_mm256_permute2f128_ps(s03, s47, 0x20), _mm256_permute2f128_ps(s03, s47, 0x31))
    }
}

/// [`rows_avx2`] for exactly `K` inputs.
#[inline(always)]
pub(super) unsafe fn rows_k<const K: usize, const UNSIGNED: bool>(
    s: &[f16],
    r0: usize,
    x: Inputs<'_>,
    y: &mut [f32],
    load: impl Fn(usize) -> std::arch::x86_64::__m256i,
) {
    // SAFETY: inlined into callers compiled for AVX2/FMA/F16C; 8 scales
    // from any block lie inside `s` (which ends with 8 spare entries), as do
    // 8 block sums from any block inside `x.sums`; the inputs' values and
    // scales are read only for blocks that exist, and input k's 32 values
    // of block b lie at (k·nb + b)·32 inside x.q.
    unsafe {
        use std::arch::x86_64::*;
        let (nb, xq, xd) = (x.nb, x.q, x.d);
        let n = y.len() / K;
        let ones = _mm256_set1_epi16(1);
        let zero = _mm256_setzero_si256();
        // The accumulators of the last (up to) eight rows, per input.
        let mut last = [[_mm256_setzero_ps(); 8]; K];
        for r in 0..n {
            let first = (r0 + r) * nb;
            let mut acc = [_mm256_setzero_ps(); K];
            for b0 in (0..nb).step_by(8) {
                let m = (nb - b0).min(8);
                // Per input, the integer dot products of blocks b0..b0 + m.
                let mut d = [[zero; 8]; K];
                for j in 0..8 {
                    if j < m {
                        let wv = load(first + b0 + j);
                        if UNSIGNED {
                            for (k, dk) in d.iter_mut().enumerate() {
                                let xv = _mm256_loadu_si256(xq.as_ptr().add((k * nb + b0 + j) * 32) as *const __m256i);
                                dk[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
                            }
                        } else {
                            // |w| (unsigned) times x·sign(w): maddubs multiplies u8 by i8.
                            let abs = _mm256_sign_epi8(wv, wv);
                            for (k, dk) in d.iter_mut().enumerate() {
                                let xv = _mm256_loadu_si256(xq.as_ptr().add((k * nb + b0 + j) * 32) as *const __m256i);
                                dk[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(abs, _mm256_sign_epi8(xv, wv)), ones);
                            }
                        }
                    }
                }
                let ws = _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().add(first + b0) as *const __m128i));
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(m as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                for (k, a) in acc.iter_mut().enumerate() {
                    let xs = if m == 8 {
                        _mm256_loadu_ps(xd.as_ptr().add(k * nb + b0))
                    } else {
                        _mm256_maskload_ps(xd.as_ptr().add(k * nb + b0), mask)
                    };
                    let mut sums = sum8_i32(&d[k]);
                    if UNSIGNED {
                        let offset = _mm256_loadu_si256(x.sums.as_ptr().add(k * nb + b0) as *const __m256i);
                        sums = _mm256_sub_epi32(sums, offset);
                    }
                    *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(ws, xs), *a);
                }
            }
            for k in 0..K {
                last[k][r % 8] = acc[k];
            }
            if r % 8 == 7 {
                for (k, l) in last.iter().enumerate() {
                    _mm256_storeu_ps(y.as_mut_ptr().add(k * n + r - 7), sum8_f32(l));
                }
            }
        }
        // Rows after the last group of eight.
        for r in n - n % 8..n {
            for (k, l) in last.iter().enumerate() {
                let a = l[r % 8];
                let h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
                y[k * n + r] = _mm_cvtss_f32(h);
            }
        }
    }
}
