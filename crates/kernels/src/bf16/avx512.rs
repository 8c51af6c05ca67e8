//! The AVX512-BF16 path's micro-kernel ([`super::blis`]): `vdpbf16ps`
//! on 16-lane registers, `A` rounded with `vcvtne2ps2bf16`.
use super::blis::{Kernel, Tile, pair};
use super::*;
use half::bf16;
use std::arch::x86_64::*;

/// Rows of `C` per micro-kernel tile.
const MR: usize = 8;
/// Columns of `C` per tile (two 16-lane registers).
pub(super) const NR: usize = 32;

/// The AVX512-BF16 kernel (the CPU must have it: [`native_available`]).
pub(super) struct Avx512Bf16;

impl Kernel for Avx512Bf16 {
    const MR: usize = MR;
    const NR: usize = NR;

    unsafe fn tile(t: Tile) {
        // SAFETY: the trait's contract.
        unsafe { tile(t) }
    }

    unsafe fn tile_t(t: Tile) {
        // SAFETY: the trait's contract.
        unsafe { tile_t(t) }
    }

    fn rounded_row(a: Operand<f32>, i: usize, k: usize, row: &mut [u32]) {
        rounded_row(a, i, k, row)
    }

    fn interleave_rows(b: Operand<bf16>, p0: usize, kcp: usize, j0: usize, panel: &mut [u32]) {
        // SAFETY: this kernel runs only where the CPU has AVX-512
        // (`native_available`); the caller guarantees the rows.
        unsafe { interleave_rows_avx512(b, p0, kcp, j0, panel) }
    }
}

/// `panel[p][lane] = pair(B[2(p0+p)][j0+lane], B[2(p0+p)+1][j0+lane])` for
/// `p < kcp`, a full panel of a `B` whose rows are contiguous.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_rows_avx512(b: Operand<bf16>, p0: usize, kcp: usize, j0: usize, panel: &mut [u32]) {
    // Word l of the low half pairs element l of both rows; the high half, l + 16.
    let lo: [u16; 32] = std::array::from_fn(|i| if i % 2 == 0 { i as u16 / 2 } else { 32 + i as u16 / 2 });
    let hi: [u16; 32] = std::array::from_fn(|i| lo[i] + 16);
    // SAFETY: the caller guarantees rows 2·(p0+p) and 2·(p0+p)+1 hold
    // columns j0..j0+32 for p < kcp, and `panel` holds kcp·NR words.
    unsafe {
        let (lo, hi) = (_mm512_loadu_si512(lo.as_ptr() as *const _), _mm512_loadu_si512(hi.as_ptr() as *const _));
        for p in 0..kcp {
            let r0 = b.data.as_ptr().add(2 * (p0 + p) * b.rs + j0);
            let (x, y) = (_mm512_loadu_si512(r0 as *const _), _mm512_loadu_si512(r0.add(b.rs) as *const _));
            let dst = panel.as_mut_ptr().add(p * NR);
            _mm512_storeu_si512(dst as *mut _, _mm512_permutex2var_epi16(x, lo, y));
            _mm512_storeu_si512(dst.add(16) as *mut _, _mm512_permutex2var_epi16(x, hi, y));
        }
    }
}

/// The `MR×NR` products of one tile over `kcp` k-pairs, in registers:
/// `a` has MR rows `lda` words apart (read unaligned: `W`'s own rows on
/// the swapped path), `b` one packed panel.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn accumulate(kcp: usize, a: *const u32, lda: usize, b: *const u32) -> [[__m512; 2]; MR] {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // SAFETY: the callers' (`tile`, `tile_t`) bounds.
    unsafe {
        for p in 0..kcp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(a.add(r * lda + p).read_unaligned() as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
    }
    acc
}

/// [`Kernel::tile_t`] on AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_t(t: Tile) {
    let Tile { kcp, a, lda, b, c, ldc, mr, nr, load, alpha } = t;
    let mut out = [[0f32; NR]; MR];
    // SAFETY: as for `tile`, with `mr` columns and `nr` rows of `c`.
    unsafe {
        let acc = accumulate(kcp, a, lda, b);
        for (o, acc) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), acc[1]);
        }
        for t in 0..nr {
            let row = c.add(t * ldc);
            for (r, o) in out.iter().enumerate().take(mr) {
                let v = alpha * o[t];
                *row.add(r) = if load { *row.add(r) + v } else { v };
            }
        }
    }
}

/// Row `i` of `A` (`k` values) as k-pairs rounded to bf16, into the
/// first `⌈k/2⌉` words of `row`. The CPU must have AVX512-BF16.
pub(super) fn rounded_row(a: Operand<f32>, i: usize, k: usize, row: &mut [u32]) {
    let kp = k.div_ceil(2);
    if a.cs == 1 {
        // SAFETY: the callers run only where `native_available()`.
        unsafe { round_row(&a.data[i * a.rs..i * a.rs + k], &mut row[..kp]) }
    } else {
        for (p, w) in row[..kp].iter_mut().enumerate() {
            let hi = if 2 * p + 1 < k { a.at(i, 2 * p + 1) } else { 0.0 };
            *w = pair(bf16::from_f32(a.at(i, 2 * p)), bf16::from_f32(hi));
        }
    }
}

/// `row[p] = pair(src[2p], src[2p+1])`, rounded to nearest-even.
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn round_row(src: &[f32], row: &mut [u32]) {
    let full = src.len() / 32;
    for blk in 0..full {
        // SAFETY: 32 floats at 32·blk lie inside `src`, 16 words inside `row`.
        unsafe {
            let lo = _mm512_loadu_ps(src.as_ptr().add(32 * blk));
            let hi = _mm512_loadu_ps(src.as_ptr().add(32 * blk + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(row.as_mut_ptr().add(16 * blk) as *mut _, v);
        }
    }
    for p in 16 * full..row.len() {
        let hi = if 2 * p + 1 < src.len() { src[2 * p + 1] } else { 0.0 };
        row[p] = pair(bf16::from_f32(src[2 * p]), bf16::from_f32(hi));
    }
}

/// [`Kernel::tile`] on AVX512-BF16: the sums stored from registers,
/// masked to the tile's `nr` columns.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile(t: Tile) {
    let Tile { kcp, a, lda, b, c, ldc, mr, nr, load, alpha } = t;
    // SAFETY (whole body): the caller guarantees `kcp` words per row of
    // `a` (MR rows), `kcp·NR` words of `b`, and the `mr×nr` tile of `c`.
    unsafe {
        let acc = accumulate(kcp, a, lda, b);
        let alpha = _mm512_set1_ps(alpha);
        let masks = [lanes(nr.min(16)), lanes(nr.saturating_sub(16))];
        for (r, acc) in acc.iter().enumerate().take(mr) {
            for h in 0..2 {
                if masks[h] == 0 {
                    continue;
                }
                let dst = c.add(r * ldc + 16 * h);
                let mut v = _mm512_mul_ps(acc[h], alpha);
                if load {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(masks[h], dst));
                }
                _mm512_mask_storeu_ps(dst, masks[h], v);
            }
        }
    }
}

/// A mask of the first `n` (≤ 16) lanes.
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 { 0xffff } else { (1u16 << n) - 1 }
}
