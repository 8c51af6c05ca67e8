//! Quantized weights for decoding: matrix × (a few) vectors on the CPU.
//!
//! Decoding one token multiplies every weight matrix by one vector, so its
//! speed is how fast the weights stream from memory. A GGUF's quantized
//! blocks are 4–8× smaller than f32, and these kernels read them once per
//! decoding step with both cores (a batched step of several sequences
//! multiplies each weight block with up to four of its inputs per pass):
//!
//! - **Q8_0 and Q5_0** (most of Gemma 3's Q4_K_M file, and its 168M-weight
//!   LM head) are held as arrays of values and f16 scales per 32, 8 or 5
//!   bits per value as in the file. The input is quantized to `i8` per 32
//!   (f16 scale, exactly as llama.cpp's Q8_0 activations), and an AVX2
//!   kernel forms the integer dot products: a Q5_0 value `d·(q − 16)` is
//!   multiplied as the unsigned `q` (unsigned × signed is one instruction),
//!   and `16·Σx` per block, computed once with the quantized input, is
//!   subtracted afterwards; eight blocks' sums are scaled together, and
//!   eight rows' results reduced into one vector store. On aarch64 with the
//!   dot-product extension, `sdot` multiplies signed bytes (Q5_0 expanded
//!   to `q − 16`) and four blocks' sums are scaled together.
//! - **Q4_K and Q6_K** rows go through candle's block dot products.
//! - Other types, and other devices, use candle's `QMatMul`.
//!
//! Work is split into 64-row tasks over the spinning [`super::team`]
//! (rayon's sleeping workers cost a wake-up per product, candle's own
//! quantized matmul a second pool that spins next to rayon's). Layers that read the same input
//! (q, k, v; gate, up) go through [`QuantLinear::forward_many`]: the input
//! is quantized once and all their tasks share one parallel pass.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, BlockQ8K, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use half::f16;

pub use crate::quantized_input::path;
use crate::quantized_input::{Inputs, Quantized};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

/// A quantized `[out, in]` weight that multiplies inputs `[..., in]`.
pub struct QuantLinear {
    out: usize,
    inp: usize,
    /// Rows per parallel task ([`task_rows`]).
    rows: usize,
    kind: Kind,
    /// The weight repacked for many input rows ([`QuantLinear::with_prefill`]).
    panels: Option<super::qgemm::Panels>,
}

/// Up to this many input rows (a decoding step, batched or not) are
/// multiplied row by row, each exactly as it would be alone; more rows (a
/// prompt) go through the weight's prefill panels when it has them.
pub const MAX_DECODE_ROWS: usize = 16;

enum Kind {
    /// Blocks of 32 values with one f16 scale each (Q8_0, Q5_0).
    Q32(Blocks32),
    Q4K(Vec<BlockQ4K>),
    Q6K(Vec<BlockQ6K>),
    Candle(QMatMul),
}

const Q8_0_BYTES: usize = 34;
const Q5_0_BYTES: usize = 22;

impl QuantLinear {
    pub fn new(q: QTensor, device: &Device) -> Result<QuantLinear> {
        let (out, inp) = q.shape().dims2()?;
        let rows = task_rows(out, q.storage_size_in_bytes() / out.max(1));
        let kind = match q.dtype() {
            GgmlDType::Q8_0 | GgmlDType::Q5_0 if device.is_cpu() => Kind::Q32(Blocks32::new(&q.data()?, q.dtype())),
            GgmlDType::Q4K if device.is_cpu() => Kind::Q4K(blocks(&q.data()?)),
            GgmlDType::Q6K if device.is_cpu() => Kind::Q6K(blocks(&q.data()?)),
            // Candle's aarch64 block products use `sdot` unconditionally.
            _ if device.is_cpu() && !candle_simd_runs() => Kind::Candle(QMatMul::Tensor(q.dequantize(device)?)),
            _ => Kind::Candle(QMatMul::from_qtensor(q)?),
        };
        Ok(QuantLinear { out, inp, rows, kind, panels: None })
    }

    /// [`QuantLinear::new`], and the weight also repacked for prefill
    /// ([`super::qgemm`]) when it is Q8_0, Q5_0, Q4_K or Q6_K on the CPU:
    /// one more byte per weight, kept for the layers a prompt multiplies in
    /// full (not the LM head, which a prompt needs at its last position only).
    pub fn with_prefill(q: QTensor, device: &Device) -> Result<QuantLinear> {
        let (out, inp) = q.shape().dims2()?;
        let panels = match super::qgemm::Format::of(q.dtype()) {
            Some(format) if device.is_cpu() => {
                let data = q.data()?;
                let row_bytes = data.len() / out.max(1);
                Some(super::qgemm::Panels::new(out, inp / 32, format, |r, b| {
                    super::qgemm::block32(format, &data[r * row_bytes..][..row_bytes], b)
                }))
            }
            _ => None,
        };
        let mut lin = QuantLinear::new(q, device)?;
        lin.panels = panels;
        Ok(lin)
    }

    /// Whether many input rows are multiplied on the quantized weight
    /// ([`QuantLinear::with_prefill`]) rather than needing an f32 copy.
    pub fn prefills(&self) -> bool {
        self.panels.is_some()
    }

    /// `x·Wᵀ` for `x: [..., in]`. Meant for a few rows (decoding one or a
    /// batch of sequences): each task reads its rows of `W` once and
    /// multiplies them with every input row while they are in cache.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [y] = QuantLinear::forward_many([self], x)?;
        Ok(y)
    }

    /// `x·Wᵢᵀ` for several weights that take the same input (q, k and v;
    /// gate and up): the input is quantized once and one parallel pass
    /// covers every weight's rows, so both cores stay busy through the
    /// smaller ones.
    pub fn forward_many<const N: usize>(ws: [&QuantLinear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let inp = ws[0].inp;
        if N > 1 && !ws.iter().all(|w| matches!(w.kind, Kind::Q32(_)) && w.inp == inp) {
            return try_map(ws, |w| w.forward(x));
        }
        if let Kind::Candle(m) = &ws[0].kind {
            return try_map(ws, |_| m.forward(x)); // N == 1
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let n = xs.len() / inp;
        if n > MAX_DECODE_ROWS && ws.iter().all(|w| w.panels.is_some()) {
            return prefill(ws, x, &xs);
        }
        let input = match &ws[0].kind {
            Kind::Q32(_) => Input::Q32(Quantized::new(&xs, inp)),
            _ => Input::Q8K(xs.chunks(inp).flat_map(|x| quantize_q8k(x)).collect()),
        };
        // Task c of weight i fills its rows c·rows.. of Wᵢ·xⱼ for every
        // input j, input by input.
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.out]).collect();
        let tasks: Vec<(&QuantLinear, usize, &mut [f32])> = ws
            .iter()
            .zip(&mut outs)
            .flat_map(|(w, out)| out.chunks_mut(w.rows * n).enumerate().map(move |(c, t)| (*w, c * w.rows, t)))
            .collect();
        super::team::for_each(tasks, |(w, r0, out)| match (&w.kind, &input) {
            (Kind::Q32(b), Input::Q32(x)) => {
                // Up to INPUTS_PER_PASS inputs share each pass over the rows.
                let rows = out.len() / n;
                for (g, y) in out.chunks_mut(INPUTS_PER_PASS * rows).enumerate() {
                    b.rows(r0, x.inputs(g * INPUTS_PER_PASS, y.len() / rows), y)
                }
            }
            (Kind::Q4K(b), Input::Q8K(x)) => rows_blocks(b, inp, x, r0, out),
            (Kind::Q6K(b), Input::Q8K(x)) => rows_blocks(b, inp, x, r0, out),
            _ => unreachable!("one kind of input per call"),
        });
        let mut dims = x.dims().to_vec();
        let ys = ws.iter().zip(outs).map(|(w, out)| {
            let y = if n == 1 { out } else { input_major(&out, n, w.out, w.rows) };
            *dims.last_mut().expect("at least 1-d") = w.out;
            Tensor::from_vec(y, dims.clone(), x.device())
        });
        try_map_iter(ys)
    }
}

/// [`QuantLinear::forward_many`] for a prompt: the input quantized once,
/// each weight's product on its [`super::qgemm::Panels`].
fn prefill<const N: usize>(ws: [&QuantLinear; N], x: &Tensor, xs: &[f32]) -> Result<[Tensor; N]> {
    let input = Quantized::new(xs, ws[0].inp);
    let n = xs.len() / ws[0].inp;
    let mut dims = x.dims().to_vec();
    try_map(ws, |w| {
        let mut y = vec![0f32; n * w.out];
        w.panels.as_ref().expect("checked").matmul(&input, &mut y);
        *dims.last_mut().expect("at least 1-d") = w.out;
        Tensor::from_vec(y, dims.clone(), x.device())
    })
}

/// `x·Wᵀ` for a few rows (decoding steps) on an f32 weight `w: [out, in]`,
/// `x: [..., in]`: each input row's products are [`super::vmath::dots`]'s,
/// whatever the number of rows, so a sequence's numbers in a batched step
/// are those it gets alone (a GEMM picks its kernel, and so its summation
/// order, by shape). Tasks of 64 weight rows run on the [`super::team`]; each
/// task's rows stay in cache while every input multiplies them.
pub fn f32_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let n = xs.len() / inp;
    let w = w.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let wd = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(s), Some((a, b))) => &s.as_slice::<f32>()?[a..b],
        _ => candle_core::bail!("f32_rows: the weight must be a contiguous f32 CPU tensor"),
    };
    let mut tasks = vec![0f32; n * out];
    let chunks: Vec<(usize, &mut [f32])> = tasks.chunks_mut(ROWS_PER_TASK * n).enumerate().collect();
    super::team::for_each(chunks, |(c, t)| {
        let rows = t.len() / n;
        let wc = &wd[c * ROWS_PER_TASK * inp..][..rows * inp];
        for (xi, yi) in xs.chunks_exact(inp).zip(t.chunks_mut(rows)) {
            super::vmath::dots(xi, wc, yi);
        }
    });
    let y = if n == 1 { tasks } else { input_major(&tasks, n, out, ROWS_PER_TASK) };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("at least 1-d") = out;
    Tensor::from_vec(y, dims, x.device())
}

/// The input of one [`QuantLinear::forward_many`] call, quantized as its
/// weights' kernels take it.
enum Input {
    Q32(Quantized),
    /// Candle's 8-bit blocks of 256 (what Q4_K and Q6_K multiply with).
    Q8K(Vec<BlockQ8K>),
}

fn quantize_q8k(x: &[f32]) -> Vec<BlockQ8K> {
    let mut q = vec![BlockQ8K::zeros(); x.len() / BlockQ8K::BLCK_SIZE];
    BlockQ8K::from_float(x, &mut q);
    q
}

/// Whether candle's own quantized block products run on this CPU: on
/// aarch64 they are compiled with the dot-product extension's `sdot`
/// whatever the CPU (an ARMv8.0 core such as the Raspberry Pi 4's Cortex-A72
/// stops on them with SIGILL), so there its plain-Rust products are used, or
/// the weight is dequantized. Elsewhere they choose by compile-time features.
fn candle_simd_runs() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        true
    }
}

/// `f` over an array of N items, giving N tensors or the first error.
pub fn try_map<T, const N: usize>(items: [T; N], f: impl FnMut(T) -> Result<Tensor>) -> Result<[Tensor; N]> {
    try_map_iter(items.into_iter().map(f))
}

fn try_map_iter<const N: usize>(ys: impl Iterator<Item = Result<Tensor>>) -> Result<[Tensor; N]> {
    let ys = ys.collect::<Result<Vec<_>>>()?;
    Ok(ys.try_into().unwrap_or_else(|_| unreachable!("N outputs")))
}

/// `[n, out]` from the per-task layout of [`QuantLinear::forward`] (task c,
/// of `task_rows` rows, holds its rows for input 0, then for input 1, …).
fn input_major(tasks: &[f32], n: usize, out: usize, task_rows: usize) -> Vec<f32> {
    let mut y = vec![0f32; n * out];
    for (c, chunk) in tasks.chunks(task_rows * n).enumerate() {
        let rows = chunk.len() / n;
        for (i, part) in chunk.chunks(rows).enumerate() {
            y[i * out + c * task_rows..][..rows].copy_from_slice(part);
        }
    }
    y
}

/// Row-major blocks of 32 values with one f16 scale each, values kept as
/// the file has them: 8-bit (Q8_0) or 5-bit (Q5_0: a low nibble and a fifth
/// bit, value `(q − 16)`), split into plain arrays for aligned SIMD loads.
struct Blocks32 {
    scales: Vec<f16>,
    values: Values,
}

enum Values {
    I8(Vec<i8>),
    /// 16 bytes of nibbles per block (value j low, value j + 16 high) and
    /// the 32 fifth bits.
    Five {
        lo: Vec<u8>,
        hi: Vec<u32>,
    },
}

impl Blocks32 {
    fn new(data: &[u8], dtype: GgmlDType) -> Blocks32 {
        if dtype == GgmlDType::Q8_0 {
            let blocks = data.chunks_exact(Q8_0_BYTES);
            let scales = padded(blocks.clone().map(|b| f16::from_le_bytes([b[0], b[1]])));
            let values = blocks.flat_map(|b| b[2..34].iter().map(|&v| v as i8)).collect();
            Blocks32 { scales, values: Values::I8(values) }
        } else {
            let blocks = data.chunks_exact(Q5_0_BYTES);
            let scales = padded(blocks.clone().map(|b| f16::from_le_bytes([b[0], b[1]])));
            let hi = blocks.clone().map(|b| u32::from_le_bytes([b[2], b[3], b[4], b[5]])).collect();
            let lo = blocks.flat_map(|b| b[6..22].iter().copied()).collect();
            Blocks32 { scales, values: Values::Five { lo, hi } }
        }
    }

    /// The 32 values of block `i` (the portable path).
    fn block(&self, i: usize) -> [i8; 32] {
        match &self.values {
            Values::I8(v) => v[i * 32..(i + 1) * 32].try_into().expect("32 values"),
            Values::Five { lo, hi } => {
                let (lo, qh) = (&lo[i * 16..(i + 1) * 16], hi[i]);
                std::array::from_fn(|j| {
                    let nibble = if j < 16 { lo[j] & 0x0F } else { lo[j - 16] >> 4 };
                    (nibble | (((qh >> j) & 1) << 4) as u8) as i8 - 16
                })
            }
        }
    }

    /// Rows `r0..r0 + n` of `W·xᵢ` for the inputs `x` (at most
    /// [`INPUTS_PER_PASS`]); `y` gets `[k][n]`.
    fn rows(&self, r0: usize, x: Inputs<'_>, y: &mut [f32]) {
        #[cfg(target_arch = "aarch64")]
        if path() == "neon+dotprod" {
            // SAFETY: the CPU has the dot-product extension; the arrays
            // hold every block of rows r0..r0 + n.
            return unsafe {
                match &self.values {
                    Values::I8(v) => neon::rows_i8_neon(v, &self.scales, r0, x, y),
                    Values::Five { lo, hi } => neon::rows_q5_neon(lo, hi, &self.scales, r0, x, y),
                }
            };
        }
        #[cfg(target_arch = "x86_64")]
        {
            if path() == "avx2+fma+f16c" {
                // SAFETY: the CPU has the features `path` checked; the arrays
                // hold every block of rows r0..r0 + n.
                return unsafe {
                    match &self.values {
                        Values::I8(v) => avx2::rows_i8_avx2(v, &self.scales, r0, x, y),
                        Values::Five { lo, hi } => avx2::rows_q5_avx2(lo, hi, &self.scales, r0, x, y),
                    }
                };
            }
        }
        self.rows_portable(r0, x, y)
    }

    /// [`Blocks32::rows`] in plain Rust.
    fn rows_portable(&self, r0: usize, x: Inputs<'_>, y: &mut [f32]) {
        let nb = x.nb;
        let n = y.len() / x.count();
        for (i, yi) in y.chunks_mut(n).enumerate() {
            let (xq, xd) = (&x.q[i * nb * 32..(i + 1) * nb * 32], &x.d[i * nb..(i + 1) * nb]);
            for (r, yv) in yi.iter_mut().enumerate() {
                let mut acc = 0f32;
                for b in 0..nb {
                    let j = (r0 + r) * nb + b;
                    let dot: i32 =
                        self.block(j).iter().zip(&xq[b * 32..][..32]).map(|(&a, &c)| a as i32 * c as i32).sum();
                    acc += dot as f32 * (self.scales[j].to_f32() * xd[b]);
                }
                *yv = acc;
            }
        }
    }
}

/// The block scales followed by 8 zeros, so that the AVX2 kernel can load
/// eight scales from any block.
fn padded(scales: impl Iterator<Item = f16>) -> Vec<f16> {
    scales.chain([f16::ZERO; 8]).collect()
}

/// The raw bytes of a GGUF tensor as candle's block structs (which are
/// `repr(C)` mirrors of the GGUF layout).
fn blocks<T: GgmlType>(data: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let n = data.len() / size;
    let mut out = vec![T::zeros(); n];
    // SAFETY: `out` holds n plain-data blocks of `size` bytes each, and
    // `data` has at least n·size bytes.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out.as_mut_ptr() as *mut u8, n * size) };
    out
}

/// Rows per task for a weight of `out` rows of `row_bytes` each: about
/// 128 KiB of weights, so that each task is a long sequential stream
/// (the LM head's 262 144 rows in 64-row tasks of 43 KB read at ~20 GB/s,
/// in 192-row ones at ~30), but at least 32 tasks to balance the cores
/// over a small layer, and at least 64 rows; a multiple of 8 (the
/// kernels store eight rows at a time).
fn task_rows(out: usize, row_bytes: usize) -> usize {
    let rows = ((128 << 10) / row_bytes.max(1)).min(out / 32).max(64);
    rows / 8 * 8
}

/// Rows per task of the f32 products ([`f32_rows`]).
const ROWS_PER_TASK: usize = 64;

/// Inputs multiplied in one pass over a task's rows of `W` (a batched
/// decoding step has several): each weight block is loaded once for all.
const INPUTS_PER_PASS: usize = 4;

/// The task of [`QuantLinear::forward_many`] from row `r0` on for a
/// K-quant `W` (blocks of 256), through candle's dot products.
fn rows_blocks<T: GgmlType<VecDotType = BlockQ8K>>(w: &[T], inp: usize, xq: &[BlockQ8K], r0: usize, out: &mut [f32]) {
    let nb = inp / T::BLCK_SIZE;
    let n = xq.len() / nb;
    let dot = if candle_simd_runs() { T::vec_dot } else { T::vec_dot_unopt };
    for (i, y) in out.chunks_mut(out.len() / n).enumerate() {
        for (j, yv) in y.iter_mut().enumerate() {
            let r = r0 + j;
            *yv = dot(inp, &w[r * nb..(r + 1) * nb], &xq[i * nb..(i + 1) * nb]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantized_input::tests::simd_under_test;

    fn weights(out: usize, inp: usize) -> Tensor {
        let v: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2).collect();
        Tensor::from_vec(v, (out, inp), &Device::Cpu).unwrap()
    }

    /// The SIMD decoding kernel (AVX2 or NEON dot products) gives the
    /// portable one's results up to the order of float additions: Q8_0 and
    /// Q5_0, 1 to 4 inputs per pass, 11 blocks a row (a partial group of
    /// blocks on every path) and 13 rows (a partial group of eight).
    #[test]
    #[cfg_attr(
        all(target_arch = "x86_64", not(cpu_avx2)),
        ignore = "no AVX2 on this CPU (or PIPELINE_MAX_CPU_ISA caps it): the SIMD path is not tested here"
    )]
    fn simd_decoding_rows_equal_the_portable_ones() {
        if !simd_under_test("simd_decoding_rows_equal_the_portable_ones") {
            return;
        }
        let (out, inp) = (13, 11 * 32);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let q = QTensor::quantize(&weights(out, inp), dtype).unwrap();
            let blocks = Blocks32::new(&q.data().unwrap(), dtype);
            for k in 1..=INPUTS_PER_PASS {
                let x: Vec<f32> = (0..k * inp).map(|i| ((i * 31 % 97) as f32 / 97.0 - 0.5) * 2.0).collect();
                let xq = Quantized::new(&x, inp);
                for r0 in [0, 5] {
                    let n = out - r0;
                    let (mut simd, mut portable) = (vec![0f32; k * n], vec![0f32; k * n]);
                    blocks.rows(r0, xq.inputs(0, k), &mut simd);
                    blocks.rows_portable(r0, xq.inputs(0, k), &mut portable);
                    for (i, (a, b)) in simd.iter().zip(&portable).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                            "{dtype:?}, {k} inputs, from row {r0}: [{i}] {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// A prompt's rows (more than [`MAX_DECODE_ROWS`]) multiplied on the
    /// prefill panels agree with the dequantized weights times the input (up
    /// to the input's 8-bit quantization), and each row gets the numbers
    /// it gets in any other prompt: 17, 40 and 133 rows (a last tile of 1),
    /// 203 output rows (a last panel of 3).
    #[test]
    fn prefill_matches_the_dequantized_product() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let (out, inp) = (203, 512);
            let q = QTensor::quantize(&weights(out, inp), dtype).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap();
            let lin = QuantLinear::with_prefill(q, &Device::Cpu).unwrap();
            assert!(lin.prefills());
            let all: Vec<f32> = (0..133 * inp).map(|i| ((i * 31 % 97) as f32 / 97.0 - 0.5) * 2.0).collect();
            let x = Tensor::from_vec(all, (133, inp), &Device::Cpu).unwrap();
            let full = lin.forward(&x).unwrap();
            for rows in [17, 40, 133] {
                let x = x.narrow(0, 133 - rows, rows).unwrap();
                let got = lin.forward(&x).unwrap();
                let want = x.matmul(&deq.t().unwrap()).unwrap();
                let err: f32 = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(err < 0.01 * scale, "{dtype:?} × {rows} rows: error {err} (scale {scale})");
                let tail = full.narrow(0, 133 - rows, rows).unwrap();
                let same: f32 = (&got - &tail).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert_eq!(same, 0.0, "{dtype:?}: a row's products depend on the prompt around it");
                // The decoding kernel, on the same quantized input, differs
                // only in the order of its float additions. (K-quants decode
                // with candle's 256-value input blocks, prefill with 32.)
                if matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K) {
                    continue;
                }
                let decoded = Tensor::cat(
                    &(0..rows)
                        .step_by(8)
                        .map(|i| lin.forward(&x.narrow(0, i, 8.min(rows - i)).unwrap()).unwrap())
                        .collect::<Vec<_>>(),
                    0,
                )
                .unwrap();
                let err: f32 = (&got - &decoded).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(err < 1e-5 * scale, "{dtype:?} × {rows} rows: {err} from the decoding kernel (scale {scale})");
            }
        }
    }

    /// Each kind agrees with the dequantized weights times the input (up to
    /// the input's own 8-bit quantization), for 1, 3 and 9 rows; 203
    /// output rows leave a last task of 11 (a group of eight and 3 more),
    /// 4099 rows make tasks of 128 rows ([`task_rows`]) and a last one of 3.
    #[test]
    fn matches_the_dequantized_product() {
        let kinds = [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q4_0];
        let shapes =
            kinds.map(|d| (d, 203, 512)).into_iter().chain([(GgmlDType::Q8_0, 4099, 256), (GgmlDType::Q4K, 4099, 256)]);
        assert_eq!(task_rows(4099, 272), 128);
        for (dtype, out, inp) in shapes {
            let q = QTensor::quantize(&weights(out, inp), dtype).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap();
            let lin = QuantLinear::new(q, &Device::Cpu).unwrap();
            for rows in [1, 3, 9] {
                let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 31 % 97) as f32 / 97.0 - 0.5) * 2.0).collect();
                let x = Tensor::from_vec(x, (rows, inp), &Device::Cpu).unwrap();
                let got = lin.forward(&x).unwrap();
                let want = x.matmul(&deq.t().unwrap()).unwrap();
                let err: f32 = (&got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(err < 0.01 * scale, "{dtype:?} × {rows} rows: error {err} (scale {scale})");
            }
        }
    }
}
