//! The aarch64 BF16 path's micro-kernel ([`super::blis`]): `bfdot`
//! multiplies a register of four columns' k-pairs by one row's k-pair
//! (broadcast) and adds each pair's two products to an f32 lane: 8
//! multiply-adds per instruction, twice an f32 FMA's 4.
use super::blis::{Kernel, Tile};
use std::arch::aarch64::*;

/// Rows of `C` per micro-kernel tile.
const MR: usize = 4;
/// Columns of `C` per tile (four 4-lane registers).
const NR: usize = 16;

/// The BF16 kernel (the CPU must have it: [`super::native_available`]).
pub(super) struct NeonBf16;

impl Kernel for NeonBf16 {
    const MR: usize = MR;
    const NR: usize = NR;

    unsafe fn tile(t: Tile) {
        let Tile { kcp, a, lda, b, c, ldc, mr, nr, load, alpha } = t;
        // SAFETY: the trait's contract.
        let out = unsafe { accumulate(kcp, a, lda, b) };
        for (r, o) in out.iter().enumerate().take(mr) {
            for (t, &v) in o.iter().enumerate().take(nr) {
                // SAFETY: (r, t) lies in the tile the caller gave.
                unsafe {
                    let dst = c.add(r * ldc + t);
                    *dst = if load { *dst + alpha * v } else { alpha * v };
                }
            }
        }
    }

    unsafe fn tile_t(t: Tile) {
        let Tile { kcp, a, lda, b, c, ldc, mr, nr, load, alpha } = t;
        // SAFETY: the trait's contract.
        let out = unsafe { accumulate(kcp, a, lda, b) };
        for t in 0..nr {
            for (r, o) in out.iter().enumerate().take(mr) {
                // SAFETY: (t, r) lies in the transposed tile the caller gave.
                unsafe {
                    let dst = c.add(t * ldc + r);
                    *dst = if load { *dst + alpha * o[t] } else { alpha * o[t] };
                }
            }
        }
    }
}

/// `acc + a₀b₀ + a₁b₁` per f32 lane, for the bf16 pairs of `a` and `b`.
#[inline]
#[target_feature(enable = "neon,bf16")]
unsafe fn bfdot(mut acc: float32x4_t, a: uint32x4_t, b: uint32x4_t) -> float32x4_t {
    // SAFETY: registers only; the CPU has BF16.
    unsafe {
        std::arch::asm!(
            "bfdot {acc:v}.4s, {a:v}.8h, {b:v}.8h",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// The `MR×NR` sums of one tile over `kcp` k-pairs (kept in registers
/// while `p` runs): `a` has MR rows `lda` words apart (read unaligned),
/// `b` is one packed panel.
#[target_feature(enable = "neon,bf16")]
unsafe fn accumulate(kcp: usize, a: *const u32, lda: usize, b: *const u32) -> [[f32; NR]; MR] {
    let mut acc = [[vdupq_n_f32(0.0); NR / 4]; MR];
    // SAFETY: the callers' (`tile`, `tile_t`) bounds.
    unsafe {
        for p in 0..kcp {
            let bv: [uint32x4_t; NR / 4] = std::array::from_fn(|q| vld1q_u32(b.add(p * NR + 4 * q)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = vdupq_n_u32(a.add(r * lda + p).read_unaligned());
                for (q, acc) in acc.iter_mut().enumerate() {
                    *acc = bfdot(*acc, bv[q], av);
                }
            }
        }
    }
    let mut out = [[0f32; NR]; MR];
    for (o, acc) in out.iter_mut().zip(&acc) {
        for (q, v) in acc.iter().enumerate() {
            // SAFETY: four floats at 4q lie inside the row of NR.
            unsafe { vst1q_f32(o.as_mut_ptr().add(4 * q), *v) };
        }
    }
    out
}
