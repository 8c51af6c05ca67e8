//! The aarch64 kernels of [`super::Blocks32::rows`]: `sdot` (the
//! dot-product extension) on Q8_0 and Q5_0 blocks.

use half::f16;

use crate::quantized_input::Inputs;

/// `acc + Σ a·b` over groups of four signed bytes (`sdot`).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(
    mut acc: std::arch::aarch64::int32x4_t,
    a: std::arch::aarch64::int8x16_t,
    b: std::arch::aarch64::int8x16_t,
) -> std::arch::aarch64::int32x4_t {
    // SAFETY: registers only; the CPU has the dot-product extension.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn rows_i8_neon(v: &[i8], s: &[f16], r0: usize, x: Inputs<'_>, y: &mut [f32]) {
    use std::arch::aarch64::*;
    // SAFETY: block i's 32 values lie inside `v` (the caller's rows).
    let load = |i: usize| unsafe { [vld1q_s8(v.as_ptr().add(i * 32)), vld1q_s8(v.as_ptr().add(i * 32 + 16))] };
    // SAFETY: `load` stays inside the array for the rows the caller gave.
    unsafe { rows_neon(s, r0, x, y, load) }
}

/// Q5_0 blocks expanded to their signed values `q − 16`: the low nibbles
/// (values 0..16) and high ones (16..32), each with its fifth bit from
/// `hi` (bit j for value j).
#[target_feature(enable = "neon,dotprod")]
pub(super) unsafe fn rows_q5_neon(lo: &[u8], hi: &[u32], s: &[f16], r0: usize, x: Inputs<'_>, y: &mut [f32]) {
    use std::arch::aarch64::*;
    let low4 = vdupq_n_u8(0x0F);
    let sixteen = vdupq_n_u8(0x10);
    let bit = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201));
    // Byte 0 of the word to lanes 0..8 and byte 1 to 8..16; bytes 2 and 3.
    let spread = [
        vreinterpretq_u8_u64(vcombine_u64(vdup_n_u64(0), vdup_n_u64(0x0101010101010101))),
        vreinterpretq_u8_u64(vcombine_u64(vdup_n_u64(0x0202020202020202), vdup_n_u64(0x0303030303030303))),
    ];
    let load = |i: usize| {
        // SAFETY: block i's 16 nibble bytes lie inside `lo`.
        let nib = unsafe { vld1q_u8(lo.as_ptr().add(i * 16)) };
        let word = vreinterpretq_u8_u32(vdupq_n_u32(hi[i]));
        let halves = [vandq_u8(nib, low4), vshrq_n_u8::<4>(nib)];
        std::array::from_fn(|h| {
            let fifth = vandq_u8(vtstq_u8(vqtbl1q_u8(word, spread[h]), bit), sixteen);
            vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(halves[h], fifth)), vdupq_n_s8(16))
        })
    };
    // SAFETY: `load` stays inside the arrays for the rows the caller gave.
    unsafe { rows_neon(s, r0, x, y, load) }
}

/// Rows `r0..r0 + n` of `W·xᵢ` for signed weight blocks produced by
/// `load(j)` (block j = row·nb + b, two registers of 16 values) with f16
/// scales `s`, and 1 to [`INPUTS_PER_PASS`](super::INPUTS_PER_PASS) inputs `x`; `y` is `[k][n]`.
/// Blocks go four at a time: each is loaded once for every input, and per
/// input the four blocks' integer dot products are paired into one vector
/// of four sums, scaled by the four blocks' combined scales in one
/// multiply-add.
#[inline(always)]
pub(super) unsafe fn rows_neon(
    s: &[f16],
    r0: usize,
    x: Inputs<'_>,
    y: &mut [f32],
    load: impl Fn(usize) -> [std::arch::aarch64::int8x16_t; 2],
) {
    // SAFETY: as for `rows_neon_k`.
    unsafe {
        match x.count() {
            1 => rows_neon_k::<1>(s, r0, x, y, load),
            2 => rows_neon_k::<2>(s, r0, x, y, load),
            3 => rows_neon_k::<3>(s, r0, x, y, load),
            _ => rows_neon_k::<4>(s, r0, x, y, load),
        }
    }
}

/// [`rows_neon`] for exactly `K` inputs.
#[inline(always)]
pub(super) unsafe fn rows_neon_k<const K: usize>(
    s: &[f16],
    r0: usize,
    x: Inputs<'_>,
    y: &mut [f32],
    load: impl Fn(usize) -> [std::arch::aarch64::int8x16_t; 2],
) {
    use std::arch::aarch64::*;
    // SAFETY: inlined into callers compiled for NEON and the dot-product
    // extension; input k's 32 values of block b lie at (k·nb + b)·32 inside
    // x.q, and only blocks that exist are read.
    unsafe {
        let (nb, xq, xd) = (x.nb, x.q, x.d);
        let n = y.len() / K;
        for r in 0..n {
            let first = (r0 + r) * nb;
            let mut acc = [vdupq_n_f32(0.0); K];
            for b0 in (0..nb).step_by(4) {
                let m = (nb - b0).min(4);
                let mut d = [[vdupq_n_s32(0); 4]; K];
                for j in 0..m {
                    let wv = load(first + b0 + j);
                    for (k, dk) in d.iter_mut().enumerate() {
                        let at = xq.as_ptr().add((k * nb + b0 + j) * 32);
                        dk[j] = sdot(sdot(dk[j], wv[0], vld1q_s8(at)), wv[1], vld1q_s8(at.add(16)));
                    }
                }
                let ws: [f32; 4] = std::array::from_fn(|j| if j < m { s[first + b0 + j].to_f32() } else { 0.0 });
                let ws = vld1q_f32(ws.as_ptr());
                for (k, a) in acc.iter_mut().enumerate() {
                    let xs: [f32; 4] = std::array::from_fn(|j| if j < m { xd[k * nb + b0 + j] } else { 0.0 });
                    let sums = vpaddq_s32(vpaddq_s32(d[k][0], d[k][1]), vpaddq_s32(d[k][2], d[k][3]));
                    *a = vfmaq_f32(*a, vcvtq_f32_s32(sums), vmulq_f32(ws, vld1q_f32(xs.as_ptr())));
                }
            }
            for (k, a) in acc.iter().enumerate() {
                y[k * n + r] = vaddvq_f32(*a);
            }
        }
    }
}
