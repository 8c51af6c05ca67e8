//! Prefill on quantized weights: a Q8_0 / Q5_0 matrix times many rows with
//! 8-bit integer dot products, as llama.cpp multiplies a prompt.
//!
//! A prompt's products are bound by arithmetic, not by reading weights. An
//! f32 FMA does 8 multiply-adds; AVX2's `maddubs` (unsigned × signed bytes
//! into pairs of `i16`) does 32, so with the input quantized to `i8` per 32
//! values (f16 scale, as decoding and llama.cpp quantize it) the products run
//! on integers, and each block's sum is scaled once.
//!
//! The weights are repacked once into [`Panels`] of eight rows: for each
//! block of 32 columns, eight 32-byte vectors, vector `j` holding values
//! `4j..4j+4` of each of the eight rows. One load then serves eight rows, and
//! one broadcast of four input bytes multiplies all of them: the kernel
//! keeps a vector of eight row sums per input row, with no horizontal
//! reduction. Four input rows share each weight load ([`TILE`]).
//!
//! Q5_0's values are kept unsigned (`q`, 0..31, value `q − 16`): `maddubs`
//! takes them as they are and `16·Σx` per block is subtracted afterwards, as
//! in [`super::gemv`]. Q8_0's signed values are multiplied as `|w|` times
//! `x·sign(w)`.

use half::f16;

use super::gemv::Quantized;

/// Input rows multiplied per pass over a panel's weights.
const TILE: usize = 4;

/// Input rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// A `[out, in]` Q8_0 or Q5_0 weight repacked for [`Panels::matmul`].
pub(crate) struct Panels {
    out: usize,
    /// Blocks of 32 per row.
    nb: usize,
    /// Per panel of eight rows, per block: eight vectors of 32 bytes (see the
    /// module doc). Rows past `out` in the last panel are zero.
    values: Vec<u8>,
    /// Per panel, per block: the eight rows' scales.
    scales: Vec<f32>,
    /// Q5_0 (values `q`, meaning `q − 16`) rather than Q8_0 (`i8` values).
    unsigned: bool,
}

impl Panels {
    /// Repacks `out` rows of `nb` blocks; `block(i)` gives block `i`
    /// (`row·nb + b`): its f16 scale and its 32 values (`q − 16` for Q5_0).
    pub(crate) fn new(out: usize, nb: usize, unsigned: bool, block: impl Fn(usize) -> (f16, [i8; 32])) -> Panels {
        let panels = out.div_ceil(8);
        let mut values = vec![0u8; panels * nb * 256];
        let mut scales = vec![0f32; panels * nb * 8];
        for r in 0..out {
            let (p, lane) = (r / 8, r % 8);
            for b in 0..nb {
                let (d, q) = block(r * nb + b);
                let at = (p * nb + b) * 256;
                for (i, &v) in q.iter().enumerate() {
                    let (j, k) = (i / 4, i % 4);
                    values[at + j * 32 + lane * 4 + k] = if unsigned { (v + 16) as u8 } else { v as u8 };
                }
                scales[(p * nb + b) * 8 + lane] = d.to_f32();
            }
        }
        Panels { out, nb, values, scales, unsigned }
    }

    /// `y = x·Wᵀ` for the quantized input rows `x` (`[n][nb·32]`); `y` is
    /// `[n][out]`. Tasks of [`ROWS_PER_TASK`] input rows run on the
    /// [`super::team`]; each takes every panel in turn, which stays in cache
    /// while the task's rows multiply it.
    pub(crate) fn matmul(&self, x: &Quantized, y: &mut [f32]) {
        let n = y.len() / self.out;
        // Enough tasks for both cores on a short prompt too.
        let per_task = (n.div_ceil(8).div_ceil(TILE) * TILE).clamp(TILE, ROWS_PER_TASK);
        let tasks: Vec<(usize, &mut [f32])> =
            y.chunks_mut(per_task * self.out).enumerate().map(|(c, t)| (c * per_task, t)).collect();
        super::team::for_each(tasks, |(i0, yt)| {
            let rows = yt.len() / self.out;
            for p in 0..self.out.div_ceil(8) {
                let mut i = 0;
                while i < rows {
                    let k = (rows - i).min(TILE);
                    self.tile(p, x, i0 + i, k, &mut yt[i * self.out..]);
                    i += k;
                }
            }
        });
    }

    /// Panel `p`'s eight outputs for input rows `i0..i0 + k` (`k ≤ TILE`),
    /// written to `y[r·out + 8p..]` for input `i0 + r`.
    fn tile(&self, p: usize, x: &Quantized, i0: usize, k: usize, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if super::gemv::path() == "avx2+fma+f16c" {
                // SAFETY: the CPU has AVX2, FMA and F16C; panel p and input
                // rows i0..i0 + k exist, and y holds k rows of `out`.
                unsafe {
                    match (k, self.unsigned) {
                        (1, true) => self.tile_avx2::<1, true>(p, x, i0, y),
                        (2, true) => self.tile_avx2::<2, true>(p, x, i0, y),
                        (3, true) => self.tile_avx2::<3, true>(p, x, i0, y),
                        (_, true) => self.tile_avx2::<4, true>(p, x, i0, y),
                        (1, false) => self.tile_avx2::<1, false>(p, x, i0, y),
                        (2, false) => self.tile_avx2::<2, false>(p, x, i0, y),
                        (3, false) => self.tile_avx2::<3, false>(p, x, i0, y),
                        (_, false) => self.tile_avx2::<4, false>(p, x, i0, y),
                    }
                }
                return;
            }
        }
        self.tile_portable(p, x, i0, k, y)
    }

    /// [`Panels::tile`] in plain Rust: the same integer sums, scaled and
    /// added block by block in the same order.
    fn tile_portable(&self, p: usize, x: &Quantized, i0: usize, k: usize, y: &mut [f32]) {
        let (nb, w) = (self.nb, &self.values[p * self.nb * 256..]);
        for r in 0..k {
            let (xq, xd) = (&x.q[(i0 + r) * nb * 32..], &x.d[(i0 + r) * nb..]);
            let mut acc = [0f32; 8];
            for b in 0..nb {
                for (lane, a) in acc.iter_mut().enumerate() {
                    let mut dot = 0i32;
                    for i in 0..32 {
                        let v = w[b * 256 + (i / 4) * 32 + lane * 4 + i % 4];
                        let v = if self.unsigned { v as i32 - 16 } else { v as i8 as i32 };
                        dot += v * xq[b * 32 + i] as i32;
                    }
                    *a = (dot as f32).mul_add(self.scales[(p * nb + b) * 8 + lane] * xd[b], *a);
                }
            }
            let valid = (self.out - p * 8).min(8);
            y[r * self.out + p * 8..][..valid].copy_from_slice(&acc[..valid]);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<const K: usize, const UNSIGNED: bool>(
        &self,
        p: usize,
        x: &Quantized,
        i0: usize,
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let nb = self.nb;
        // SAFETY: panel p's nb·256 values and nb·8 scales lie inside the
        // arrays; input row i0 + r's nb·32 values, nb scales and nb block
        // sums lie inside x's; the stores stay inside y (checked).
        unsafe {
            let w = self.values.as_ptr().add(p * nb * 256);
            let s = self.scales.as_ptr().add(p * nb * 8);
            let xq: [*const i8; K] = std::array::from_fn(|r| x.q.as_ptr().add((i0 + r) * nb * 32));
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); K];
            for b in 0..nb {
                let mut dots = [_mm256_setzero_si256(); K];
                // Q5_0's pairs of products are at most 2·31·127 in magnitude:
                // four of them still fit an i16, so they are widened to i32
                // once per four vectors. Q8_0's (up to 2·127·127) are
                // widened at once.
                let group = if UNSIGNED { 4 } else { 1 };
                for j0 in (0..8).step_by(group) {
                    let mut pairs = [_mm256_setzero_si256(); K];
                    for j in j0..j0 + group {
                        let wv = _mm256_loadu_si256(w.add((b * 8 + j) * 32) as *const __m256i);
                        let abs = if UNSIGNED { wv } else { _mm256_sign_epi8(wv, wv) };
                        for r in 0..K {
                            let four = (xq[r].add(b * 32 + j * 4) as *const i32).read_unaligned();
                            let xv = _mm256_set1_epi32(four);
                            let xv = if UNSIGNED { xv } else { _mm256_sign_epi8(xv, wv) };
                            pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(abs, xv));
                        }
                    }
                    for r in 0..K {
                        dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(pairs[r], ones));
                    }
                }
                let ws = _mm256_loadu_ps(s.add(b * 8));
                for r in 0..K {
                    let at = (i0 + r) * nb + b;
                    let mut sums = dots[r];
                    if UNSIGNED {
                        sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(x.sums[at]));
                    }
                    let scale = _mm256_mul_ps(ws, _mm256_set1_ps(x.d[at]));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
                }
            }
            let valid = (self.out - p * 8).min(8);
            for (r, a) in acc.iter().enumerate() {
                let row = &mut y[r * self.out + p * 8..][..valid];
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, inp: usize, seed: usize) -> Vec<f32> {
        (0..n * inp).map(|i| (((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2).collect()
    }

    /// The SIMD tile gives the portable sums bit for bit, for both value
    /// kinds, 1–4 input rows, and a last panel of 3 rows.
    #[test]
    fn simd_tiles_equal_the_portable_ones() {
        let (out, nb) = (19, 5);
        for unsigned in [false, true] {
            let w = rows(out, nb * 32, 1);
            let block = |i: usize| {
                let v = &w[i * 32..][..32];
                let d = v.iter().fold(0f32, |m, x| m.max(x.abs())) / if unsigned { 15.0 } else { 127.0 };
                let q = std::array::from_fn(|j| {
                    let q = (v[j] / d).round() as i32;
                    if unsigned { q.clamp(-16, 15) as i8 } else { q as i8 }
                });
                (f16::from_f32(d), q)
            };
            let panels = Panels::new(out, nb, unsigned, block);
            let x = Quantized::new(&rows(7, nb * 32, 3), nb * 32);
            for k in 1..=TILE {
                for i0 in [0, 7 - k] {
                    for p in 0..out.div_ceil(8) {
                        let (mut simd, mut portable) = (vec![0f32; k * out], vec![0f32; k * out]);
                        panels.tile(p, &x, i0, k, &mut simd);
                        panels.tile_portable(p, &x, i0, k, &mut portable);
                        assert_eq!(simd, portable, "unsigned {unsigned}, {k} rows from {i0}, panel {p}");
                    }
                }
            }
        }
    }
}
