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

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

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
                            *a = fma(dot(0, 16) as f32, self.scales[at + lane] * xd[b], *a);
                            *a = fma(dot(16, 32) as f32, self.scales[at + PANEL + lane] * xd[b], *a);
                        }
                        _ => {
                            let mut sum = dot(0, 32);
                            if self.format == Format::Q5_0 {
                                sum -= x.sums[(i0 + r) * nb + b];
                            }
                            *a = fma(sum as f32, self.scales[at + lane] * xd[b], *a);
                            if self.format == Format::Q4K {
                                let sx = xd[b] * (x.sums[(i0 + r) * nb + b] / 16) as f32;
                                *a = fma(-self.mins[(p * nb + b) * PANEL + lane], sx, *a);
                            }
                        }
                    }
                }
            }
            let valid = (self.out - p * PANEL).min(PANEL);
            y[r * self.out + p * PANEL..][..valid].copy_from_slice(&acc[..valid]);
        }
    }
}

/// `a·b + c` rounded once, as the SIMD paths' FMA instructions compute it.
/// Not `f32::mul_add`, which without the FMA target feature calls the C
/// library's `fmaf`, and mingw-w64's (Windows) is not correctly rounded:
/// the portable path then parted from the others by an ulp.
fn fma(a: f32, b: f32, c: f32) -> f32 {
    libm::fmaf(a, b, c)
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
