//! The AVX-512 VNNI tiles of [`Panels::tile`]: `vpdpbusd` on a whole
//! panel (sixteen weight rows) per call, up to eight input rows.

use super::{Format, PANEL, Panels, Q4K, Q5, Q6K, Q8, by_format};
use crate::quantized_input::Quantized;

impl Panels {
    /// [`Panels::tile_avx512`] for `k` (1..=8) input rows.
    #[inline(always)]
    pub(super) unsafe fn tile_avx512_k(
        &self,
        p: usize,
        x: &Quantized,
        shifted: &[u8],
        i0: usize,
        k: usize,
        y: &mut [f32],
    ) {
        // SAFETY: as for `tile_avx512`, which the caller checked the CPU for.
        unsafe {
            macro_rules! rows {
                ($f:ident) => {
                    match k {
                        1 => self.tile_avx512::<1, $f>(p, x, shifted, i0, y),
                        2 => self.tile_avx512::<2, $f>(p, x, shifted, i0, y),
                        3 => self.tile_avx512::<3, $f>(p, x, shifted, i0, y),
                        4 => self.tile_avx512::<4, $f>(p, x, shifted, i0, y),
                        5 => self.tile_avx512::<5, $f>(p, x, shifted, i0, y),
                        6 => self.tile_avx512::<6, $f>(p, x, shifted, i0, y),
                        7 => self.tile_avx512::<7, $f>(p, x, shifted, i0, y),
                        _ => self.tile_avx512::<8, $f>(p, x, shifted, i0, y),
                    }
                };
            }
            by_format!(self.format, rows)
        }
    }

    /// Panel `p`'s 16 rows for `K` input rows: `vpdpbusd` multiplies
    /// unsigned by signed bytes and adds each four products to an `i32`
    /// lane, one lane per weight row. Unsigned values (Q5_0, Q4_K) multiply
    /// the input as it is; signed ones (Q8_0, Q6_K) multiply the input plus
    /// 128 (`shifted`), and `128·Σw` ([`Panels::bias`]) is subtracted. The
    /// integer sums are those of the other paths, scaled in the same order.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_avx512<const K: usize, const F: u8>(
        &self,
        p: usize,
        x: &Quantized,
        shifted: &[u8],
        i0: usize,
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let nb = self.nb;
        let unsigned = F == Q5 || F == Q4K;
        let per = if F == Q6K { 2 * PANEL } else { PANEL };
        // SAFETY: panel p's nb·512 values, nb·per scales, (Q4_K) nb·16 mins
        // and (Q8_0, Q6_K) nb·per biases lie inside the arrays; input row
        // i0 + r's nb·32 values (in x.q, or shifted for the signed formats),
        // nb scales and nb block sums lie inside x's; the stores stay inside
        // y (checked).
        unsafe {
            let w = self.values.as_ptr().add(p * nb * 32 * PANEL);
            let s = self.scales.as_ptr().add(p * nb * per);
            let mins = self.mins.as_ptr().wrapping_add(p * nb * PANEL);
            let bias = self.bias.as_ptr().wrapping_add(p * nb * per);
            let xq: [*const u8; K] = std::array::from_fn(|r| {
                let at = (i0 + r) * nb * 32;
                if unsigned { x.q.as_ptr().add(at) as *const u8 } else { shifted.as_ptr().add(at) }
            });
            let mut acc = [_mm512_setzero_ps(); K];
            for b in 0..nb {
                // Q6_K: the first and second 16 values of the block.
                let mut dots = [[_mm512_setzero_si512(); K]; 2];
                for j in 0..8 {
                    let wv = _mm512_loadu_si512(w.add((b * 8 + j) * 4 * PANEL) as *const __m512i);
                    let d = if F == Q6K { j / 4 } else { 0 };
                    for r in 0..K {
                        let xv = _mm512_set1_epi32((xq[r].add(b * 32 + j * 4) as *const i32).read_unaligned());
                        dots[d][r] = if unsigned {
                            _mm512_dpbusd_epi32(dots[d][r], wv, xv)
                        } else {
                            _mm512_dpbusd_epi32(dots[d][r], xv, wv)
                        };
                    }
                }
                let halves = if F == Q6K { 2 } else { 1 };
                for (h, dots) in dots.iter().enumerate().take(halves) {
                    let ws = _mm512_loadu_ps(s.add(b * per + h * PANEL));
                    let wb = if unsigned {
                        _mm512_setzero_si512()
                    } else {
                        _mm512_loadu_si512(bias.add(b * per + h * PANEL) as *const __m512i)
                    };
                    for r in 0..K {
                        let at = (i0 + r) * nb + b;
                        let mut sums = dots[r];
                        if F == Q5 {
                            sums = _mm512_sub_epi32(sums, _mm512_set1_epi32(x.sums[at]));
                        } else if !unsigned {
                            sums = _mm512_sub_epi32(sums, wb);
                        }
                        let scale = _mm512_mul_ps(ws, _mm512_set1_ps(x.d[at]));
                        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scale, acc[r]);
                        if F == Q4K {
                            let sx = _mm512_set1_ps(x.d[at] * (x.sums[at] / 16) as f32);
                            acc[r] = _mm512_fnmadd_ps(_mm512_loadu_ps(mins.add(b * PANEL)), sx, acc[r]);
                        }
                    }
                }
            }
            let valid = (self.out - p * PANEL).min(PANEL);
            let mask: __mmask16 = if valid == PANEL { !0 } else { (1u16 << valid) - 1 };
            for (r, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(r * self.out + p * PANEL), mask, *a);
            }
        }
    }
}
