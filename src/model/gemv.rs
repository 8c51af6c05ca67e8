//! Quantized weights for decoding: matrix × (a few) vectors on the CPU.
//!
//! Decoding one token multiplies every weight matrix by one vector, so its
//! speed is how fast the weights stream from memory. A GGUF's quantized
//! blocks are 4–8× smaller than f32, and these kernels read them once per
//! token with both cores:
//!
//! - **Q8_0 and Q5_0** (most of Gemma 3's Q4_K_M file, and its 168M-weight
//!   LM head) are held as plain `i8` values plus one f16 scale per 32; a
//!   Q5_0 value `d·(q − 16)` is exactly the `i8` value `q − 16` with the same
//!   scale, so nothing is lost. The input is quantized to `i8` per 32 (f16
//!   scale, exactly as llama.cpp's Q8_0 activations), and an AVX2 kernel forms the
//!   integer dot products.
//! - **Q4_K and Q6_K** rows go through candle's block dot products.
//! - Other types, and other devices, use candle's `QMatMul`.
//!
//! Work is split into row ranges over rayon's pool (candle's own quantized
//! matmul runs a second, spinning thread pool next to it, which on two
//! cores costs more than it gains).

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, GgmlType};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};
use half::f16;
use rayon::prelude::*;

/// A quantized `[out, in]` weight that multiplies inputs `[..., in]`.
pub struct QuantLinear {
    out: usize,
    inp: usize,
    kind: Kind,
}

enum Kind {
    /// `i8` values row-major, one f16 scale per 32 values.
    Q8 {
        qs: Vec<i8>,
        scales: Vec<f16>,
    },
    Q4K(Vec<BlockQ4K>),
    Q6K(Vec<BlockQ6K>),
    Candle(QMatMul),
}

const Q8_0_BYTES: usize = 34;
const Q5_0_BYTES: usize = 22;

impl QuantLinear {
    pub fn new(q: QTensor, device: &Device) -> Result<QuantLinear> {
        let (out, inp) = q.shape().dims2()?;
        let kind = match q.dtype() {
            GgmlDType::Q8_0 | GgmlDType::Q5_0 if device.is_cpu() => {
                let (qs, scales) = to_q8(&q.data()?, q.dtype(), out * inp);
                Kind::Q8 { qs, scales }
            }
            GgmlDType::Q4K if device.is_cpu() => Kind::Q4K(blocks(&q.data()?)),
            GgmlDType::Q6K if device.is_cpu() => Kind::Q6K(blocks(&q.data()?)),
            _ => Kind::Candle(QMatMul::from_qtensor(q)?),
        };
        Ok(QuantLinear { out, inp, kind })
    }

    /// `x·Wᵀ` for `x: [..., in]` (meant for a few rows: each is one pass over W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Kind::Candle(m) = &self.kind {
            return m.forward(x);
        }
        let mut dims = x.dims().to_vec();
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; xs.len() / self.inp * self.out];
        for (xr, yr) in xs.chunks(self.inp).zip(y.chunks_mut(self.out)) {
            match &self.kind {
                Kind::Q8 { qs, scales } => gemv_q8(qs, scales, self.inp, xr, yr),
                Kind::Q4K(b) => gemv_blocks(b, self.inp, xr, yr),
                Kind::Q6K(b) => gemv_blocks(b, self.inp, xr, yr),
                Kind::Candle(_) => unreachable!("handled above"),
            }
        }
        *dims.last_mut().expect("at least 1-d") = self.out;
        Tensor::from_vec(y, dims, x.device())
    }
}

/// Q8_0 or Q5_0 blocks → `i8` values and f16 scales.
fn to_q8(data: &[u8], dtype: GgmlDType, n: usize) -> (Vec<i8>, Vec<f16>) {
    let mut qs = Vec::with_capacity(n);
    let mut scales = Vec::with_capacity(n / 32);
    let block = if dtype == GgmlDType::Q8_0 { Q8_0_BYTES } else { Q5_0_BYTES };
    for b in data.chunks_exact(block) {
        scales.push(f16::from_le_bytes([b[0], b[1]]));
        if dtype == GgmlDType::Q8_0 {
            qs.extend(b[2..34].iter().map(|&v| v as i8));
        } else {
            // Q5_0: low 4 bits in qs (two per byte), the fifth bit in qh.
            let (qh, lo) = (u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22]);
            let mut vals = [0i8; 32];
            for j in 0..16 {
                let hi0 = (((qh >> j) << 4) & 0x10) as u8;
                let hi1 = ((qh >> (j + 12)) & 0x10) as u8;
                vals[j] = ((lo[j] & 0x0F) | hi0) as i8 - 16;
                vals[j + 16] = ((lo[j] >> 4) | hi1) as i8 - 16;
            }
            qs.extend_from_slice(&vals);
        }
    }
    (qs, scales)
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

/// Rows per rayon task: enough to amortise scheduling, small enough to
/// balance two cores.
const ROWS_PER_TASK: usize = 64;

/// `y = W·x` for a K-quant `W` (blocks of 256), through candle's dot products.
fn gemv_blocks<T: GgmlType>(w: &[T], inp: usize, x: &[f32], y: &mut [f32]) {
    let nb = inp / T::BLCK_SIZE;
    let mut xq = vec![T::VecDotType::zeros(); nb];
    T::VecDotType::from_float(x, &mut xq);
    y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, ys)| {
        for (i, yv) in ys.iter_mut().enumerate() {
            let r = c * ROWS_PER_TASK + i;
            *yv = T::vec_dot(inp, &w[r * nb..(r + 1) * nb], &xq);
        }
    });
}

/// `x` quantized to `i8` per 32 values exactly as llama.cpp's Q8_0
/// activations: scale `d = max|x|/127` kept as f16, values `round(x/d)`
/// with the unrounded `d`.
fn quantize_input(x: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; x.len() / 32];
    for ((xb, qb), db) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(&mut d) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        *db = f16::from_f32(scale).to_f32();
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (qv, v) in qb.iter_mut().zip(xb) {
            *qv = (v * inv).round() as i8;
        }
    }
    (q, d)
}

/// `y = W·x` for `W` as `i8` values with f16 scales per 32.
fn gemv_q8(qs: &[i8], scales: &[f16], inp: usize, x: &[f32], y: &mut [f32]) {
    let nb = inp / 32;
    let (xq, xd) = quantize_input(x);
    y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, ys)| {
        let r0 = c * ROWS_PER_TASK;
        let w = &qs[r0 * inp..(r0 + ys.len()) * inp];
        let s = &scales[r0 * nb..(r0 + ys.len()) * nb];
        rows_q8(w, s, &xq, &xd, ys);
    });
}

/// One task's rows of [`gemv_q8`].
fn rows_q8(w: &[i8], s: &[f16], xq: &[i8], xd: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has the features just checked; slices are sized
            // by the caller (rows × inp values, rows × inp/32 scales).
            return unsafe { rows_q8_avx2(w, s, xq, xd, y) };
        }
    }
    let nb = xd.len();
    for (r, yv) in y.iter_mut().enumerate() {
        let mut acc = 0f32;
        for b in 0..nb {
            let wb = &w[(r * nb + b) * 32..][..32];
            let dot: i32 = wb.iter().zip(&xq[b * 32..][..32]).map(|(&a, &c)| a as i32 * c as i32).sum();
            acc += dot as f32 * (s[r * nb + b].to_f32() * xd[b]);
        }
        *yv = acc;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8_avx2(w: &[i8], s: &[f16], xq: &[i8], xd: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = xd.len();
    let ones = _mm256_set1_epi16(1);
    // The row's block scales times the input's, 8 at a time (F16C).
    let mut scale = vec![0f32; nb.next_multiple_of(8)];
    let mut s16 = vec![f16::ZERO; nb.next_multiple_of(8)];
    let mut x32 = vec![0f32; nb.next_multiple_of(8)];
    x32[..nb].copy_from_slice(xd);
    for (r, yv) in y.iter_mut().enumerate() {
        let wr = &w[r * nb * 32..(r + 1) * nb * 32];
        s16[..nb].copy_from_slice(&s[r * nb..(r + 1) * nb]);
        for i in (0..nb).step_by(8) {
            // SAFETY: the buffers hold a multiple of 8 values.
            unsafe {
                let h = _mm_loadu_si128(s16.as_ptr().add(i) as *const __m128i);
                let v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(x32.as_ptr().add(i)));
                _mm256_storeu_ps(scale.as_mut_ptr().add(i), v);
            }
        }
        // Two accumulators (even and odd blocks) to overlap the FMA latency.
        let mut acc = [_mm256_setzero_ps(); 2];
        for b in 0..nb {
            // SAFETY: 32 values at b·32 lie inside wr and xq.
            let (wv, xv) = unsafe {
                (
                    _mm256_loadu_si256(wr.as_ptr().add(b * 32) as *const __m256i),
                    _mm256_loadu_si256(xq.as_ptr().add(b * 32) as *const __m256i),
                )
            };
            // |w| (unsigned) times x·sign(w): maddubs multiplies u8 by i8.
            let prod = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
            acc[b & 1] = _mm256_fmadd_ps(dot, _mm256_set1_ps(scale[b]), acc[b & 1]);
        }
        let acc = _mm256_add_ps(acc[0], acc[1]);
        let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
        *yv = _mm_cvtss_f32(h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(out: usize, inp: usize) -> Tensor {
        let v: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2).collect();
        Tensor::from_vec(v, (out, inp), &Device::Cpu).unwrap()
    }

    /// Each kind agrees with the dequantized weights times the input (up to
    /// the input's own 8-bit quantization), for 1 and 3 rows.
    #[test]
    fn matches_the_dequantized_product() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q4_0] {
            let (out, inp) = (200, 512);
            let q = QTensor::quantize(&weights(out, inp), dtype).unwrap();
            let deq = q.dequantize(&Device::Cpu).unwrap();
            let lin = QuantLinear::new(q, &Device::Cpu).unwrap();
            for rows in [1, 3] {
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
