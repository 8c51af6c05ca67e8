//! The aarch64 tiles of [`Panels::tile`]: `sdot` (the dot-product
//! extension) by element on half a panel per call.

use super::{Format, PANEL, Panels, Q4K, Q5, Q6K, Q8, by_format};
use crate::quantized_input::Quantized;

impl Panels {
    /// [`Panels::tile_neon`] for `k` (1..=[`TILE`](super::TILE)) input rows.
    #[inline(always)]
    pub(super) unsafe fn tile_neon_k(&self, p: usize, half: usize, x: &Quantized, i0: usize, k: usize, y: &mut [f32]) {
        // SAFETY: as for `tile_neon`, which the caller checked the CPU for.
        unsafe {
            macro_rules! rows {
                ($f:ident) => {
                    match k {
                        1 => self.tile_neon::<1, $f>(p, half, x, i0, y),
                        2 => self.tile_neon::<2, $f>(p, half, x, i0, y),
                        3 => self.tile_neon::<3, $f>(p, half, x, i0, y),
                        _ => self.tile_neon::<4, $f>(p, half, x, i0, y),
                    }
                };
            }
            by_format!(self.format, rows)
        }
    }

    /// Rows `8·half..8·half + 8` of panel `p`, for `K` input rows. Each
    /// 64-byte weight vector `j` of a block is four 16-byte registers of
    /// four rows' values `4j..4j+4`; this half's two of them are loaded once
    /// and `sdot` by element multiplies each with the four matching input
    /// bytes of every input row (lane `j % 4` of a 16-byte input load), one
    /// `i32` lane per weight row. The sums are the portable path's integers.
    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn tile_neon<const K: usize, const F: u8>(
        &self,
        p: usize,
        half: usize,
        x: &Quantized,
        i0: usize,
        y: &mut [f32],
    ) {
        use std::arch::aarch64::*;
        let nb = self.nb;
        let per = if F == Q6K { 2 * PANEL } else { PANEL };
        // SAFETY: panel p's values, scales and (Q4_K) mins lie inside the
        // arrays, this half's 8 rows at offset 8·half of each 16; input row
        // i0 + r's nb·32 values, nb scales and nb block sums lie inside x's;
        // the stores stay inside y (checked).
        unsafe {
            let w = (self.values.as_ptr() as *const i8).add(p * nb * 32 * PANEL + half * 32);
            let s = self.scales.as_ptr().add(p * nb * per + half * 8);
            let mins = self.mins.as_ptr().wrapping_add(p * nb * PANEL + half * 8);
            let xq: [*const i8; K] = std::array::from_fn(|r| x.q.as_ptr().add((i0 + r) * nb * 32));
            let mut acc = [[vdupq_n_f32(0.0); 2]; K];
            for b in 0..nb {
                let mut dots = [[vdupq_n_s32(0); 2]; K];
                // Values 16·g..16·g + 16 of the block: weight vectors 4g..4g + 4.
                for g in 0..2 {
                    let xv: [int8x16_t; K] = std::array::from_fn(|r| vld1q_s8(xq[r].add(b * 32 + g * 16)));
                    let wv = |j: usize| {
                        let at = w.add((b * 8 + 4 * g + j) * 4 * PANEL);
                        [vld1q_s8(at), vld1q_s8(at.add(16))]
                    };
                    sdot_rows::<K, 0>(&mut dots, wv(0), &xv);
                    sdot_rows::<K, 1>(&mut dots, wv(1), &xv);
                    sdot_rows::<K, 2>(&mut dots, wv(2), &xv);
                    sdot_rows::<K, 3>(&mut dots, wv(3), &xv);
                    if F == Q6K {
                        // Each half block has its own scale.
                        let ws = [vld1q_f32(s.add(b * per + g * PANEL)), vld1q_f32(s.add(b * per + g * PANEL + 4))];
                        for r in 0..K {
                            let scale = vdupq_n_f32(x.d[(i0 + r) * nb + b]);
                            for q in 0..2 {
                                let sums = vcvtq_f32_s32(dots[r][q]);
                                acc[r][q] = vfmaq_f32(acc[r][q], sums, vmulq_f32(ws[q], scale));
                                dots[r][q] = vdupq_n_s32(0);
                            }
                        }
                    }
                }
                if F == Q6K {
                    continue;
                }
                let ws = [vld1q_f32(s.add(b * per)), vld1q_f32(s.add(b * per + 4))];
                for r in 0..K {
                    let at = (i0 + r) * nb + b;
                    let scale = vdupq_n_f32(x.d[at]);
                    for q in 0..2 {
                        let mut sums = dots[r][q];
                        if F == Q5 {
                            sums = vsubq_s32(sums, vdupq_n_s32(x.sums[at]));
                        }
                        acc[r][q] = vfmaq_f32(acc[r][q], vcvtq_f32_s32(sums), vmulq_f32(ws[q], scale));
                        if F == Q4K {
                            // − dmin·m · Σx: the block sums hold 16·Σx.
                            let sx = vdupq_n_f32(x.d[at] * (x.sums[at] / 16) as f32);
                            acc[r][q] = vfmsq_f32(acc[r][q], vld1q_f32(mins.add(b * PANEL + 4 * q)), sx);
                        }
                    }
                }
            }
            let first = p * PANEL + half * 8;
            let valid = (self.out - first).min(8);
            for (r, a) in acc.iter().enumerate() {
                let mut all = [0f32; 8];
                vst1q_f32(all.as_mut_ptr(), a[0]);
                vst1q_f32(all.as_mut_ptr().add(4), a[1]);
                y[r * self.out + first..][..valid].copy_from_slice(&all[..valid]);
            }
        }
    }
}

/// `dots[r][q] += Σ w[q]·x[r]` over groups of four bytes: `sdot` by element,
/// lane `L` of each input row's 16 bytes against the four weight rows of
/// each of `w`'s two registers.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot_rows<const K: usize, const L: i32>(
    dots: &mut [[std::arch::aarch64::int32x4_t; 2]; K],
    w: [std::arch::aarch64::int8x16_t; 2],
    x: &[std::arch::aarch64::int8x16_t; K],
) {
    for r in 0..K {
        for q in 0..2 {
            // SAFETY: registers only; the CPU has the dot-product extension.
            unsafe {
                std::arch::asm!(
                    "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{l}]",
                    acc = inout(vreg) dots[r][q],
                    w = in(vreg) w[q],
                    x = in(vreg) x[r],
                    l = const L,
                    options(pure, nomem, nostack, preserves_flags)
                );
            }
        }
    }
}
