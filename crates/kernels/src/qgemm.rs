//! Prefill on quantized weights: a Q8_0 / Q5_0 / Q4_K / Q6_K matrix times
//! many rows with 8-bit integer dot products, as llama.cpp multiplies a
//! prompt.
//!
//! A prompt's products are bound by arithmetic, not by reading weights. An
//! f32 FMA does 8 (AVX2) or 16 (AVX-512) multiply-adds; AVX2's `maddubs`
//! (unsigned × signed bytes into pairs of `i16`) does 32, AVX-512 VNNI's
//! `vpdpbusd` 64 (into `i32` lanes, four products each). So with the input
//! quantized to `i8` per 32 values (f16 scale, as decoding and llama.cpp
//! quantize it) the products run on integers, and each block's sum is
//! scaled once.
//!
//! The weights are repacked once into [`Panels`] of sixteen rows: for each
//! block of 32 columns, eight 64-byte vectors, vector `j` holding values
//! `4j..4j+4` of each of the sixteen rows. One load then serves sixteen
//! rows (AVX2 takes each half of it for eight), and one broadcast of four
//! input bytes multiplies all of them: the kernel keeps a vector of row
//! sums per input row, with no horizontal reduction. Several input rows
//! share each weight load ([`TILE`], eight on AVX-512).
//!
//! Q5_0's values are kept unsigned (`q`, 0..31, value `q − 16`): the
//! products take them as they are and `16·Σx` per block is subtracted
//! afterwards, as in [`super::gemv`]; Q4_K's (0..15) likewise, less
//! `dmin·m·Σx`. Signed values (Q8_0, Q6_K's `q − 32`) are multiplied on
//! AVX2 as `|w|` times `x·sign(w)`, on AVX-512 as `w` times `x + 128` less
//! `128·Σw`. On aarch64 with the dot-product extension (Apple M1 and later,
//! Graviton 2 and later), `sdot` multiplies signed bytes by signed bytes, so
//! every format's values (unsigned ones are at most 31) multiply the input
//! as they are, half a panel per load ([`Panels::tile_neon`]). Every path
//! gives the same integer sums and adds them in the same order: the results
//! are equal bit for bit.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::quantized_input::Quantized;

/// Input rows multiplied per pass over a panel's weights.
const TILE: usize = 4;

/// Input rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// The weight formats with panels, and how their 32-value blocks multiply.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Format {
    /// `d·w`, `w` in −127..127.
    Q8_0,
    /// `d·(q − 16)`, `q` in 0..31 kept unsigned.
    Q5_0,
    /// `(d·sc)·q − dmin·m` per block of 32, `q` in 0..15.
    Q4K,
    /// `(d·sc)·(q − 32)` per half block of 16, `q − 32` kept signed.
    Q6K,
}

impl Format {
    pub(crate) fn of(dtype: GgmlDType) -> Option<Format> {
        Some(match dtype {
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q5_0 => Format::Q5_0,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    /// Values as unsigned bytes (`maddubs` takes them as they are) rather
    /// than signed ones (multiplied as `|w|` times `x·sign(w)`).
    fn unsigned(self) -> bool {
        matches!(self, Format::Q5_0 | Format::Q4K)
    }
}

/// One block of 32 values of a row, as a panel keeps it.
pub(crate) struct Block32 {
    /// The values, in the format's byte form ([`Format::unsigned`]).
    pub(crate) q: [u8; 32],
    /// The scale of the block (Q6_K: of its first and second 16 values).
    pub(crate) scale: [f32; 2],
    /// Q4_K's `dmin·m`, subtracted from every value.
    pub(crate) min: f32,
}

/// The 32-value block `b` of a GGUF row `row` (raw bytes) of `format`.
pub(crate) fn block32(format: Format, row: &[u8], b: usize) -> Block32 {
    let f = |i: usize| f16::from_le_bytes([row[i], row[i + 1]]).to_f32();
    match format {
        Format::Q8_0 => {
            let at = b * 34;
            Block32 { q: std::array::from_fn(|i| row[at + 2 + i]), scale: [f(at); 2], min: 0.0 }
        }
        Format::Q5_0 => {
            let at = b * 22;
            let qh = u32::from_le_bytes([row[at + 2], row[at + 3], row[at + 4], row[at + 5]]);
            let q = std::array::from_fn(|j| {
                let lo = row[at + 6 + j % 16];
                let nibble = if j < 16 { lo & 0x0F } else { lo >> 4 };
                nibble | ((((qh >> j) & 1) << 4) as u8)
            });
            Block32 { q, scale: [f(at); 2], min: 0.0 }
        }
        Format::Q4K => {
            // 144 bytes per 256: d, dmin, 12 bytes of 6-bit scales and
            // mins, 128 of nibbles (blocks 2j and 2j + 1 share 32 bytes).
            let (at, sub) = ((b / 8) * 144, b % 8);
            let (d, dmin, scales) = (f(at), f(at + 2), &row[at + 4..at + 16]);
            let (sc, m) = if sub < 4 {
                (scales[sub] & 63, scales[sub + 4] & 63)
            } else {
                (
                    (scales[sub + 4] & 0xF) | ((scales[sub - 4] >> 6) << 4),
                    (scales[sub + 4] >> 4) | ((scales[sub] >> 6) << 4),
                )
            };
            let qs = &row[at + 16 + (sub / 2) * 32..][..32];
            let q = std::array::from_fn(|l| if sub % 2 == 0 { qs[l] & 0xF } else { qs[l] >> 4 });
            Block32 { q, scale: [d * sc as f32; 2], min: dmin * m as f32 }
        }
        Format::Q6K => {
            // 210 bytes per 256: 128 of low nibbles, 64 of high bit pairs,
            // 16 signed scales (one per 16 values), d. Block `sub` is
            // quarter `sub % 4` of half `sub / 4`.
            let (at, sub) = ((b / 8) * 210, b % 8);
            let (half, quarter) = (sub / 4, sub % 4);
            let (ql, qh) = (&row[at + 64 * half..][..64], &row[at + 128 + 32 * half..][..32]);
            let d = f(at + 208);
            let q = std::array::from_fn(|l| {
                let low = if quarter % 2 == 0 { ql[l] & 0xF } else { ql[l + 32] & 0xF };
                let low = if quarter < 2 {
                    low
                } else if quarter == 2 {
                    ql[l] >> 4
                } else {
                    ql[l + 32] >> 4
                };
                let high = (qh[l] >> (2 * quarter)) & 3;
                ((low | (high << 4)) as i8 - 32) as u8
            });
            let sc = |k: usize| row[at + 192 + 8 * half + 2 * quarter + k] as i8;
            Block32 { q, scale: [d * sc(0) as f32, d * sc(1) as f32], min: 0.0 }
        }
    }
}

/// Weight rows per panel.
const PANEL: usize = 16;

/// The instruction set a prefill product runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Path {
    Portable,
    /// `maddubs` on 256-bit vectors, half a panel at a time.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// `vpdpbusd` on 512-bit vectors, a whole panel at a time.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512Vnni,
    /// `sdot` (aarch64 dot-product extension) on 128-bit vectors, half a
    /// panel at a time.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    NeonDot,
}

impl Path {
    /// The best path this CPU runs (detected once).
    pub(crate) fn best() -> Path {
        static BEST: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Path::available().last().expect("portable is always there"))
    }

    /// Every path this CPU runs, worst first.
    pub(crate) fn available() -> Vec<Path> {
        #[allow(unused_mut)]
        let mut paths = vec![Path::Portable];
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("dotprod") && crate::IsaCap::allows_simd() {
            paths.push(Path::NeonDot);
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") && crate::IsaCap::allows(crate::IsaCap::Avx2) {
                paths.push(Path::Avx2);
                if has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512vnni")
                    && crate::IsaCap::allows(crate::IsaCap::Avx512)
                {
                    paths.push(Path::Avx512Vnni);
                }
            }
        }
        paths
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            Path::Avx2 => "avx2",
            Path::Avx512Vnni => "avx512vnni",
            Path::NeonDot => "neon+dotprod",
        }
    }

    /// Input rows multiplied per pass over a panel's weights.
    fn tile_rows(self) -> usize {
        match self {
            Path::Avx512Vnni => 8,
            _ => TILE,
        }
    }
}

/// A `[out, in]` quantized weight repacked for [`Panels::matmul`].
pub(crate) struct Panels {
    out: usize,
    /// Blocks of 32 per row.
    nb: usize,
    /// Per panel of [`PANEL`] rows, per block: eight vectors of 64 bytes
    /// (see the module doc). Rows past `out` in the last panel are zero.
    values: Vec<u8>,
    /// Per panel, per block: the 16 rows' scales, then (Q6_K) the 16
    /// scales of the blocks' second halves.
    scales: Vec<f32>,
    /// Per panel, per block: the 16 rows' `dmin·m` (Q4_K only).
    mins: Vec<f32>,
    /// Signed values (Q8_0, Q6_K), per panel, per block, laid out as
    /// `scales`: `128·Σw` of the row's values, which the AVX-512 kernel
    /// subtracts after multiplying them by the input plus 128 (unsigned).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    bias: Vec<i32>,
    format: Format,
}

impl Panels {
    /// Repacks `out` rows of `nb` blocks of `format`; `block(r, b)` gives
    /// block `b` of row `r`.
    pub(crate) fn new(out: usize, nb: usize, format: Format, block: impl Fn(usize, usize) -> Block32) -> Panels {
        let panels = out.div_ceil(PANEL);
        let per = Panels::scales_per_block(format);
        let mut values = vec![0u8; panels * nb * 32 * PANEL];
        let mut scales = vec![0f32; panels * nb * per];
        let mut mins = vec![0f32; if format == Format::Q4K { panels * nb * PANEL } else { 0 }];
        let mut bias = vec![0i32; if format.unsigned() { 0 } else { panels * nb * per }];
        for r in 0..out {
            let (p, lane) = (r / PANEL, r % PANEL);
            for b in 0..nb {
                let blk = block(r, b);
                let at = (p * nb + b) * 32 * PANEL;
                for (i, &v) in blk.q.iter().enumerate() {
                    values[at + (i / 4) * 4 * PANEL + lane * 4 + i % 4] = v;
                }
                let s = (p * nb + b) * per + lane;
                scales[s] = blk.scale[0];
                if format == Format::Q6K {
                    scales[s + PANEL] = blk.scale[1];
                }
                if format == Format::Q4K {
                    mins[(p * nb + b) * PANEL + lane] = blk.min;
                }
                if !format.unsigned() {
                    let sum = |i: std::ops::Range<usize>| 128 * blk.q[i].iter().map(|&v| v as i8 as i32).sum::<i32>();
                    if format == Format::Q6K {
                        (bias[s], bias[s + PANEL]) = (sum(0..16), sum(16..32));
                    } else {
                        bias[s] = sum(0..32);
                    }
                }
            }
        }
        Panels { out, nb, values, scales, mins, bias, format }
    }

    /// Scales kept per panel and block: one per row, Q6_K two.
    fn scales_per_block(format: Format) -> usize {
        if format == Format::Q6K { 2 * PANEL } else { PANEL }
    }

    /// `y = x·Wᵀ` for the quantized input rows `x` (`[n][nb·32]`); `y` is
    /// `[n][out]`. Tasks of [`ROWS_PER_TASK`] input rows run on the
    /// [`super::team`]; each takes every panel in turn, which stays in cache
    /// while the task's rows multiply it.
    pub(crate) fn matmul(&self, x: &Quantized, y: &mut [f32]) {
        self.matmul_on(Path::best(), x, y)
    }

    /// [`Panels::matmul`] on `path` (which the CPU must have).
    fn matmul_on(&self, path: Path, x: &Quantized, y: &mut [f32]) {
        let n = y.len() / self.out;
        let tile = path.tile_rows();
        // The AVX-512 kernel multiplies signed values by the input plus 128.
        let shifted: &[u8] = if path == Path::Avx512Vnni && !self.format.unsigned() { x.shifted() } else { &[] };
        // Enough tasks for both cores on a short prompt too.
        let per_task = (n.div_ceil(8).div_ceil(tile) * tile).clamp(tile, ROWS_PER_TASK);
        let tasks: Vec<(usize, &mut [f32])> =
            y.chunks_mut(per_task * self.out).enumerate().map(|(c, t)| (c * per_task, t)).collect();
        super::team::for_each(tasks, |(i0, yt)| {
            let rows = yt.len() / self.out;
            for p in 0..self.out.div_ceil(PANEL) {
                let mut i = 0;
                while i < rows {
                    let k = (rows - i).min(tile);
                    self.tile(path, p, x, shifted, i0 + i, k, &mut yt[i * self.out..]);
                    i += k;
                }
            }
        });
    }

    /// Panel `p`'s outputs for input rows `i0..i0 + k` (`k ≤` the path's
    /// tile rows), written to `y[r·out + 16p..]` for input `i0 + r`;
    /// `shifted` is `x.q` plus 128 as bytes where the path needs it.
    #[allow(clippy::too_many_arguments)]
    fn tile(&self, path: Path, p: usize, x: &Quantized, shifted: &[u8], i0: usize, k: usize, y: &mut [f32]) {
        // The halves (8 rows each) of the panel that hold rows, for the
        // paths that take half a panel per call.
        let halves = (0..2).filter(|half| self.out > p * PANEL + half * 8);
        // SAFETY (every arm): the CPU has the path's instructions
        // (`Path::available`); panel p and input rows i0..i0 + k exist, y
        // holds k rows of `out`, and `shifted` holds x.q shifted for the
        // signed formats where the path takes it.
        match path {
            #[cfg(target_arch = "x86_64")]
            Path::Avx2 => {
                for half in halves {
                    unsafe { self.tile_avx2_k(p, half, x, i0, k, y) }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx512Vnni => unsafe { self.tile_avx512_k(p, x, shifted, i0, k, y) },
            #[cfg(target_arch = "aarch64")]
            Path::NeonDot => {
                for half in halves {
                    unsafe { self.tile_neon_k(p, half, x, i0, k, y) }
                }
            }
            _ => {
                let _ = (halves, shifted);
                self.tile_portable(p, x, i0, k, y)
            }
        }
    }

    /// [`Panels::tile`] in plain Rust: the same integer sums, scaled and
    /// added block by block in the same order.
    fn tile_portable(&self, p: usize, x: &Quantized, i0: usize, k: usize, y: &mut [f32]) {
        let (nb, w) = (self.nb, &self.values[p * self.nb * 32 * PANEL..]);
        let per = Panels::scales_per_block(self.format);
        for r in 0..k {
            let (xq, xd) = (&x.q[(i0 + r) * nb * 32..], &x.d[(i0 + r) * nb..]);
            let mut acc = [0f32; PANEL];
            for b in 0..nb {
                let at = (p * nb + b) * per;
                for (lane, a) in acc.iter_mut().enumerate() {
                    let dot = |i0: usize, i1: usize| -> i32 {
                        (i0..i1)
                            .map(|i| {
                                let v = w[b * 32 * PANEL + (i / 4) * 4 * PANEL + lane * 4 + i % 4];
                                let v = if self.format.unsigned() { v as i32 } else { v as i8 as i32 };
                                v * xq[b * 32 + i] as i32
                            })
                            .sum()
                    };
                    match self.format {
                        Format::Q6K => {
                            *a = (dot(0, 16) as f32).mul_add(self.scales[at + lane] * xd[b], *a);
                            *a = (dot(16, 32) as f32).mul_add(self.scales[at + PANEL + lane] * xd[b], *a);
                        }
                        _ => {
                            let mut sum = dot(0, 32);
                            if self.format == Format::Q5_0 {
                                sum -= x.sums[(i0 + r) * nb + b];
                            }
                            *a = (sum as f32).mul_add(self.scales[at + lane] * xd[b], *a);
                            if self.format == Format::Q4K {
                                let sx = xd[b] * (x.sums[(i0 + r) * nb + b] / 16) as f32;
                                *a = (-self.mins[(p * nb + b) * PANEL + lane]).mul_add(sx, *a);
                            }
                        }
                    }
                }
            }
            let valid = (self.out - p * PANEL).min(PANEL);
            y[r * self.out + p * PANEL..][..valid].copy_from_slice(&acc[..valid]);
        }
    }

    /// [`Panels::tile_avx2`] for `k` (1..=[`TILE`]) input rows.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tile_avx2_k(&self, p: usize, half: usize, x: &Quantized, i0: usize, k: usize, y: &mut [f32]) {
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
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2<const K: usize, const F: u8>(
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

    /// [`Panels::tile_avx512`] for `k` (1..=8) input rows.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tile_avx512_k(&self, p: usize, x: &Quantized, shifted: &[u8], i0: usize, k: usize, y: &mut [f32]) {
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
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_avx512<const K: usize, const F: u8>(
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

    /// [`Panels::tile_neon`] for `k` (1..=[`TILE`]) input rows.
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn tile_neon_k(&self, p: usize, half: usize, x: &Quantized, i0: usize, k: usize, y: &mut [f32]) {
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
    #[cfg(target_arch = "aarch64")]
    #[target_feature(enable = "neon,dotprod")]
    unsafe fn tile_neon<const K: usize, const F: u8>(
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
#[cfg(target_arch = "aarch64")]
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

/// `$rows!(F)` for the kernels' const parameter `F` of `format`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! by_format {
    ($format:expr, $rows:ident) => {
        match $format {
            Format::Q8_0 => $rows!(Q8),
            Format::Q5_0 => $rows!(Q5),
            Format::Q4K => $rows!(Q4K),
            Format::Q6K => $rows!(Q6K),
        }
    };
}
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
use by_format;

/// [`Format`]s as the kernel's const parameter.
const Q8: u8 = 0;
const Q5: u8 = 1;
const Q4K: u8 = 2;
const Q6K: u8 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    fn rows(n: usize, inp: usize, seed: usize) -> Vec<f32> {
        (0..n * inp).map(|i| (((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2).collect()
    }

    /// For every format: the blocks read from the GGUF bytes give candle's
    /// dequantized values exactly (`scale·q − min`), and every SIMD path
    /// this CPU has gives the portable sums bit for bit: each tile size, a
    /// last panel of 3 rows (19 outputs) and one with a partial second half
    /// (27), and whole products of 21 input rows.
    #[test]
    fn blocks_dequantize_as_candle_and_portable_panels_multiply() {
        dequantize_and_compare(None);
    }

    #[test]
    #[cfg_attr(
        not(cpu_avx2),
        ignore = "no AVX2 on this CPU (or PIPELINE_MAX_CPU_ISA caps it): its prefill tiles are not tested here"
    )]
    fn avx2_tiles_equal_the_portable_ones() {
        dequantize_and_compare(Some(Path::Avx2));
    }

    #[test]
    #[cfg_attr(
        not(cpu_avx512vnni),
        ignore = "no AVX-512 VNNI on this CPU (or PIPELINE_MAX_CPU_ISA caps it): its prefill tiles are not tested here"
    )]
    fn avx512_vnni_tiles_equal_the_portable_ones() {
        dequantize_and_compare(Some(Path::Avx512Vnni));
    }

    /// Cross-built, the machine that runs the test is not known when it is
    /// built: a CPU without `sdot` says so and returns.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_dot_tiles_equal_the_portable_ones() {
        if !Path::available().contains(&Path::NeonDot) {
            eprintln!("SKIPPED: the NEON dot-product prefill path (this CPU has no sdot)");
            return;
        }
        dequantize_and_compare(Some(Path::NeonDot));
    }

    /// Blocks dequantize as candle's; with `simd`, that path's tiles and
    /// whole products equal the portable ones bit for bit.
    fn dequantize_and_compare(simd: Option<Path>) {
        let inp = 512;
        if let Some(path) = simd {
            let paths = Path::available();
            assert!(paths.contains(&path), "the CPU has the {path:?} path but the kernels do not offer it ({paths:?})");
        }
        for out in [19, 27] {
            for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
                let w = Tensor::from_vec(rows(out, inp, 1), (out, inp), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let deq: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let data = q.data().unwrap();
                let row_bytes = data.len() / out;
                let format = Format::of(dtype).unwrap();
                let block = |r: usize, b: usize| block32(format, &data[r * row_bytes..][..row_bytes], b);
                for r in 0..out {
                    for b in 0..inp / 32 {
                        let blk = block(r, b);
                        for (i, &v) in blk.q.iter().enumerate() {
                            let v = match format {
                                Format::Q5_0 => v as f32 - 16.0,
                                Format::Q4K => v as f32,
                                _ => v as i8 as f32,
                            };
                            let got = blk.scale[i / 16] * v - blk.min;
                            assert_eq!(got, deq[r * inp + b * 32 + i], "{dtype:?}: row {r}, value {}", b * 32 + i);
                        }
                    }
                }
                let panels = Panels::new(out, inp / 32, format, block);
                let x = Quantized::new(&rows(21, inp, 3), inp);
                let mut want = vec![0f32; 21 * out];
                panels.matmul_on(Path::Portable, &x, &mut want);
                if let Some(path) = simd {
                    let shifted: Vec<u8> = x.q.iter().map(|&v| (v as u8) ^ 0x80).collect();
                    for k in 1..=path.tile_rows() {
                        for i0 in [0, 21 - k] {
                            for p in 0..out.div_ceil(PANEL) {
                                let (mut simd, mut portable) = (vec![0f32; k * out], vec![0f32; k * out]);
                                panels.tile(path, p, &x, &shifted, i0, k, &mut simd);
                                panels.tile_portable(p, &x, i0, k, &mut portable);
                                assert_eq!(simd, portable, "{path:?} {dtype:?}: {k} rows from {i0}, panel {p}");
                            }
                        }
                    }
                    let mut got = vec![0f32; 21 * out];
                    panels.matmul_on(path, &x, &mut got);
                    assert_eq!(got, want, "{path:?} {dtype:?}: {out} outputs");
                }
            }
        }
    }
}
