//! The AVX2 tiles of [`Panels::tile`]: `maddubs` on half a panel (eight
//! weight rows) per call, signed values as `|w|` times `x·sign(w)`.

use super::{Format, PANEL, Panels, Q4K, Q5, Q6K, Q8, by_format};
use crate::quantized_input::Quantized;

impl Panels {
    /// [`Panels::tile_avx2`] for `k` (1..=[`TILE`](super::TILE)) input rows.
    #[inline(always)]
    pub(super) unsafe fn tile_avx2_k(&self, p: usize, half: usize, x: &Quantized, i0: usize, k: usize, y: &mut [f32]) {
        // SAFETY: as for `tile_avx2`, which the caller checked the CPU for.
        unsafe {
            macro_rules! rows {
                ($f:ident) => {
                    match k {
                        1 => self.tile_avx2::<1, $f>(p, half, x, i0, y),
                        2 => self.tile_avx2::<2, $f>(p, half, x, i0, y),
                        3 => self.tile_avx2::<3, $f>(p, half, x, i0, y),
                        _ => self.tile_avx2::<4, $f>(p, half, x, i0, y),
                    }
                };
            }
            by_format!(self.format, rows)
        }
    }

    /// Rows `8·half..8·half + 8` of panel `p`, for `K` input rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_avx2<const K: usize, const F: u8>(
        &self,
        p: usize,
        half: usize,
        x: &Quantized,
        i0: usize,
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let nb = self.nb;
        let unsigned = F == Q5 || F == Q4K;
        let per = if F == Q6K { 2 * PANEL } else { PANEL };
        // Pairs of products fit an i16 four vectors at a time for Q5_0
        // (≤ 2·31·127 each), Q4_K (2·15·127) and Q6_K (2·32·127), so they
        // are widened to i32 once per four; Q8_0's (2·127·127) at once.
        // Four vectors are 16 values: Q6_K's halves, each with its scale.
        let group = if F == Q8 { 1 } else { 4 };
        // SAFETY: panel p's values, scales and (Q4_K) mins lie inside the
        // arrays, this half's 8 rows at offset 8·half of each 16; input row
        // i0 + r's nb·32 values, nb scales and nb block sums lie inside x's;
        // the stores stay inside y (checked).
        unsafe {
            let w = self.values.as_ptr().add(p * nb * 32 * PANEL + half * 32);
            let s = self.scales.as_ptr().add(p * nb * per + half * 8);
            let mins = self.mins.as_ptr().wrapping_add(p * nb * PANEL + half * 8);
            let xq: [*const i8; K] = std::array::from_fn(|r| x.q.as_ptr().add((i0 + r) * nb * 32));
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); K];
            for b in 0..nb {
                let mut dots = [_mm256_setzero_si256(); K];
                for j0 in (0..8).step_by(group) {
                    let mut pairs = [_mm256_setzero_si256(); K];
                    for j in j0..j0 + group {
                        let wv = _mm256_loadu_si256(w.add((b * 8 + j) * 4 * PANEL) as *const __m256i);
                        let abs = if unsigned { wv } else { _mm256_sign_epi8(wv, wv) };
                        for r in 0..K {
                            let four = (xq[r].add(b * 32 + j * 4) as *const i32).read_unaligned();
                            let xv = _mm256_set1_epi32(four);
                            let xv = if unsigned { xv } else { _mm256_sign_epi8(xv, wv) };
                            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(abs, xv));
                        }
                    }
                    if F == Q6K {
                        // Each half block has its own scale.
                        let ws = _mm256_loadu_ps(s.add(b * per + (j0 / 4) * PANEL));
                        for r in 0..K {
                            let half = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[r], ones));
                            let scale = _mm256_mul_ps(ws, _mm256_set1_ps(x.d[(i0 + r) * nb + b]));
                            acc[r] = _mm256_fmadd_ps(half, scale, acc[r]);
                        }
                    } else {
                        for r in 0..K {
                            dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(pairs[r], ones));
                        }
                    }
                }
                if F == Q6K {
                    continue;
                }
                let ws = _mm256_loadu_ps(s.add(b * per));
                for r in 0..K {
                    let at = (i0 + r) * nb + b;
                    let mut sums = dots[r];
                    if F == Q5 {
                        sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(x.sums[at]));
                    }
                    let scale = _mm256_mul_ps(ws, _mm256_set1_ps(x.d[at]));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
                    if F == Q4K {
                        // − dmin·m · Σx: the block sums hold 16·Σx.
                        let sx = _mm256_set1_ps(x.d[at] * (x.sums[at] / 16) as f32);
                        acc[r] = _mm256_fnmadd_ps(_mm256_loadu_ps(mins.add(b * PANEL)), sx, acc[r]);
                    }
                }
            }
            let first = p * PANEL + half * 8;
            let valid = (self.out - first).min(8);
            for (r, a) in acc.iter().enumerate() {
                let row = &mut y[r * self.out + first..][..valid];
                if valid == 8 {
                    _mm256_storeu_ps(row.as_mut_ptr(), *a);
                } else {
                    let mut all = [0f32; 8];
                    _mm256_storeu_ps(all.as_mut_ptr(), *a);
                    row.copy_from_slice(&all[..valid]);
                }
            }
        }
    }
}
