//! K-quant block encoders (Q4_K, Q5_K, Q6_K) as llama-quantize writes them.
//!
//! candle's encoders follow an older ggml (`make_qkx1_quants`, and an
//! iterative `make_qx_quants`); llama.cpp's reference encoders
//! (`quantize_row_q{4,5,6}_K_ref` in `ggml-quants.c`, which llama-quantize
//! runs without an importance matrix) search the scales and minima against
//! a weighted error instead. These are those encoders, step for step, so a
//! `q4_k_m` file of ours is the one llama-quantize makes from the same
//! weights (same perplexity in llama.cpp, `tests/runtimes.rs`). Other types
//! (Q8_0, Q4_0, Q5_0, Q5_1) are candle's, which match ggml's bit for bit.
//!
//! Layouts (little-endian, 256 values a block): Q4_K `d, dmin: f16,
//! scales[12], qs[128]`; Q5_K `d, dmin, scales[12], qh[32], qs[128]`; Q6_K
//! `ql[128], qh[64], scales[16]: i8, d: f16`.

use half::f16;

const QK_K: usize = 256;

/// ggml's `nearest_int`: round half to even through the float mantissa.
fn nearest_int(v: f32) -> i32 {
    debug_assert!(v.abs() <= 4_194_303.0);
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// `make_qkx2_quants`: the scale and (negated) minimum of `x` at `nmax`
/// levels, searched over `nstep` candidate scales around the range, the
/// quantized levels in `l`.
fn make_qkx2_quants(nmax: i32, x: &[f32], w: &[f32], l: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (w[0], w[0] * x[0]);
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        l[i] = nearest_int(iscale * (x[i] - min)).clamp(0, nmax) as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = li as u8;
            let lf = li as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `make_qx_quants` with `rmse_type = 1` (weights x²): the scale of the
/// symmetric levels `-nmax..nmax-1` of `x`, searched over 18 candidates.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < 1e-15 {
        l.fill(0);
        return 0.0;
    }
    let weighted = |iscale: f32, l: Option<&mut [i8]>| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        let mut out = l;
        for (i, &v) in x.iter().enumerate() {
            let li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            if let Some(l) = out.as_deref_mut() {
                l[i] = (li + nmax) as i8;
            }
            let w = v * v;
            sumlx += w * v * li as f32;
            suml2 += w * li as f32 * li as f32;
        }
        (sumlx, suml2)
    };
    let (mut sumlx, mut suml2) = weighted(-(nmax as f32) / max, Some(l));
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        (sumlx, suml2) = weighted(iscale, None);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            weighted(iscale, Some(l));
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q4_K and Q5_K's per-32 scales and minima: quantized to 6 bits against
/// the block's largest, packed into 12 bytes; returns `(d, dmin)`.
fn pack_scales_mins(scales: &[f32; 8], mins: &[f32; 8], out: &mut [u8; 12]) -> (f16, f16) {
    let max_scale = scales.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    let max_min = mins.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    *out = [0; 12];
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            out[j] = ls;
            out[j + 4] = lm;
        } else {
            out[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            out[j - 4] |= (ls >> 4) << 6;
            out[j] |= (lm >> 4) << 6;
        }
    }
    (f16::from_f32(max_scale / 63.0), f16::from_f32(max_min / 63.0))
}

fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The levels of one Q4_K / Q5_K block (`nmax` 15 or 31) and its header.
fn asymmetric_block(x: &[f32], nmax: i32, rmin: f32, nstep: i32, l: &mut [u8; QK_K]) -> (f16, f16, [u8; 12]) {
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let av_x = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
        (scales[j], mins[j]) = make_qkx2_quants(nmax, xs, &w, &mut l[32 * j..32 * j + 32], rmin, 0.1, nstep);
    }
    let mut packed = [0u8; 12];
    let (d, dmin) = pack_scales_mins(&scales, &mins, &mut packed);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed)
}

/// `quantize_row_q4_K_ref`: 144 bytes per 256 values.
pub fn q4_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 144);
    let mut l = [0u8; QK_K];
    for xb in x.chunks_exact(QK_K) {
        let (d, dmin, scales) = asymmetric_block(xb, 15, -1.0, 20, &mut l);
        out.extend(d.to_le_bytes());
        out.extend(dmin.to_le_bytes());
        out.extend(scales);
        for j in (0..QK_K).step_by(64) {
            out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
        }
    }
    out
}

/// `quantize_row_q5_K_ref`: 176 bytes per 256 values.
pub fn q5_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 176);
    let mut l = [0u8; QK_K];
    for xb in x.chunks_exact(QK_K) {
        let (d, dmin, scales) = asymmetric_block(xb, 31, -0.5, 15, &mut l);
        out.extend(d.to_le_bytes());
        out.extend(dmin.to_le_bytes());
        out.extend(scales);
        let (mut qh, mut ql) = ([0u8; 32], [0u8; 128]);
        let (mut m1, mut m2) = (1u8, 2u8);
        for (k, n) in (0..QK_K).step_by(64).enumerate() {
            for j in 0..32 {
                let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * k + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
        out.extend(qh);
        out.extend(ql);
    }
    out
}

/// `quantize_row_q6_K_ref`: 210 bytes per 256 values.
pub fn q6_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 210);
    for xb in x.chunks_exact(QK_K) {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..16 {
            let s = make_qx_quants(32, &xb[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < 1e-15 {
            out.extend([0u8; 210]);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        let sc: Vec<i8> = scales.iter().map(|&s| nearest_int(iscale * s).min(127) as i8).collect();
        for j in 0..16 {
            let dj = d.to_f32() * sc[j] as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(xb[16 * j + ii] / dj).clamp(-32, 31) + 32) as i8;
            }
        }
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for (k, j) in (0..QK_K).step_by(128).enumerate() {
            for i in 0..32 {
                let q = |o: usize| l[j + i + o] as u8;
                ql[64 * k + i] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
                ql[64 * k + i + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
                qh[32 * k + i] = (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
        out.extend(ql);
        out.extend(qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend(d.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 3.7, -3.7].map(nearest_int), [0, 2, 2, 0, -2, 4, -4]);
    }

    /// Each encoder's blocks decode (with candle's decoders) close to the
    /// input: a wrong layout or scale packing would not.
    #[test]
    fn blocks_decode_with_candles_decoders() {
        use candle_core::quantized::k_quants::{BlockQ4K, BlockQ5K, BlockQ6K, GgmlType};
        let x: Vec<f32> =
            (0..1024).map(|i| ((i as f32 * 0.731).sin() * 0.05) + if i % 97 == 0 { 0.3 } else { 0.0 }).collect();
        fn decode<T: GgmlType>(bytes: &[u8], n: usize) -> Vec<f32> {
            let size = std::mem::size_of::<T>();
            assert_eq!(bytes.len() % size, 0);
            let blocks: Vec<T> =
                bytes.chunks(size).map(|b| unsafe { std::ptr::read_unaligned(b.as_ptr() as *const T) }).collect();
            let mut y = vec![0f32; n];
            T::to_float(&blocks, &mut y);
            y
        }
        let rmse = |y: &[f32]| (x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / x.len() as f32).sqrt();
        let (e4, e5, e6) = (
            rmse(&decode::<BlockQ4K>(&q4_k(&x), 1024)),
            rmse(&decode::<BlockQ5K>(&q5_k(&x), 1024)),
            rmse(&decode::<BlockQ6K>(&q6_k(&x), 1024)),
        );
        assert!(e4 < 5e-3 && e5 < 2.5e-3 && e6 < 1.5e-3 && e6 < e5 && e5 < e4, "rmse q4_k {e4}, q5_k {e5}, q6_k {e6}");
    }
}
