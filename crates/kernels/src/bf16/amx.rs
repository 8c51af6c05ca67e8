//! The AMX-BF16 path (Intel Sapphire Rapids and later): `tdpbf16ps`
//! multiplies a 16×32 bf16 tile by a 16-pair × 16-column tile into a 16×16
//! f32 tile, 8,192 multiply-adds per instruction, as oneDNN does for
//! PyTorch's bf16 autocast on these CPUs.
//!
//! The operands are the AVX512-BF16 path's ([`super::avx512`]): `A` rounded
//! to bf16 in rows of k-pairs, `B` packed in 32-column panels of k-pairs,
//! both loadable as tiles as they are (a tile row is 64 bytes: 16 pairs of
//! `A`, or 16 columns of a panel's 32). Each micro-kernel keeps a 32×32 block
//! of `C` in four accumulator tiles and walks the k-pairs 16 at a time;
//! `A` and the panels are zero-padded to whole tiles.
//!
//! Tiles are reached with inline assembly (Rust's AMX intrinsics are not
//! stable); Linux hands them to a process that asks (`arch_prctl`), once.
//! The compiler never touches the tile registers, so their state only lives
//! between the `asm!` blocks of one micro-kernel call on one thread.

use super::avx512::{Avx512Bf16, NR, rounded_row};
use super::blis::{a_panels, pack_b, w_tail};
use super::{Operand, bf16};
use rayon::prelude::*;
use std::arch::asm;

/// Rows (and columns) of `C` per micro-kernel: 2×2 tiles of 16.
const MR: usize = 32;
/// k-pairs per tile step.
const KT: usize = 16;
/// k-pairs per packed block of `B` (a multiple of [`KT`]).
const KCP: usize = 256;
/// Columns per packed block of `B`.
const NC: usize = 512;
/// Rows of `C` per parallel task.
const MC: usize = 64;

/// Whether the CPU has AMX-BF16 and this process may use its tiles (asked
/// of the OS once).
pub(super) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7 exists on every x86-64 CPU that has AVX512-BF16,
        // checked first.
        let edx = super::native_available().then(|| std::arch::x86_64::__cpuid_count(7, 0).edx);
        let (bf16, tile) = edx.map_or((false, false), |e| ((e >> 22) & 1 == 1, (e >> 24) & 1 == 1));
        bf16 && tile && request_tiles()
    })
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`,
/// `XFEATURE_XTILEDATA`); granted for the whole process.
fn request_tiles() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The tile configuration (`ldtilecfg`'s 64 bytes): palette 1, all eight
/// tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Configures this thread's tiles for `f` and releases them after.
fn with_tiles<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: `available()` was checked by the caller (the CPU has AMX and
    // the process may use it); the configuration is valid for palette 1.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly)) };
    let r = f();
    // SAFETY: as above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    r
}

/// `out (32×32, row-major) = A·B` over `kcp` k-pairs (a multiple of
/// [`KT`]): `a` holds 32 rows `lda` words apart, `b` 32 columns, one word a
/// k-pair, `ldb` words a k-pair apart.
///
/// # Safety
/// Tiles configured on this thread ([`with_tiles`]); the reads stay inside
/// `a` (32 rows of `kcp` words) and `b` (`kcp` rows of 32 words); `out`
/// holds 1024 floats.
#[inline]
unsafe fn block(kcp: usize, a: *const u32, lda: usize, b: *const u32, ldb: usize, out: *mut f32) {
    // SAFETY: the caller's.
    unsafe {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
        for p in (0..kcp).step_by(KT) {
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a.add(p),
                a1 = in(reg) a.add(16 * lda + p),
                b0 = in(reg) b.add(p * ldb),
                b1 = in(reg) b.add(p * ldb + 16),
                lda = in(reg) lda * 4,
                ldb = in(reg) ldb * 4,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) out,
            c1 = in(reg) out.add(16),
            c2 = in(reg) out.add(16 * MR),
            c3 = in(reg) out.add(16 * MR + 16),
            s = in(reg) MR * 4,
            options(nostack),
        );
    }
}

/// `C = [C +] α·A·B` ([`super::gemm`]) on AMX tiles.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Operand<f32>,
    b: Operand<bf16>,
    alpha: f32,
) {
    if m <= SWAP_MAX_M && n >= 8 * m && b.rs == 1 && k % (2 * KT) == 0 && b.cs % 2 == 0 {
        return swapped(m, n, k, c, ldc, accumulate, a, b, alpha);
    }
    // `A` rounded to bf16, rows of k-pairs zero-padded to whole tiles.
    let kp = k.div_ceil(2).next_multiple_of(KT);
    let mut a16 = vec![0u32; m.next_multiple_of(MR) * kp];
    a16.par_chunks_mut(kp).take(m).enumerate().for_each(|(i, row)| rounded_row(a, i, k, row));
    let c_addr = c.as_mut_ptr() as usize;
    let mut packed = vec![0u32; KCP * NC.min(n).next_multiple_of(NR)];
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        let panels = nc.div_ceil(NR);
        for p0 in (0..kp).step_by(KCP) {
            let kcp = KCP.min(kp - p0);
            let bp = &mut packed[..panels * kcp * NR];
            bp.par_chunks_mut(kcp * NR).enumerate().for_each(|(q, panel)| {
                // Pairs past k (the padding to whole tiles) stay zero.
                let real = k.div_ceil(2).saturating_sub(p0).min(kcp);
                pack_b::<Avx512Bf16>(
                    b,
                    k,
                    p0,
                    real,
                    j0 + q * NR,
                    (j0 + nc).min(j0 + q * NR + NR),
                    &mut panel[..real * NR],
                );
                panel[real * NR..].fill(0);
            });
            let bp = &*bp;
            let load = accumulate || p0 > 0;
            let row_blocks = m.div_ceil(MC);
            let col_groups = (4 * rayon::current_num_threads()).div_ceil(row_blocks).clamp(1, panels);
            let per_group = panels.div_ceil(col_groups);
            (0..row_blocks * col_groups).into_par_iter().for_each(|task| {
                let (rb, cg) = (task / col_groups, task % col_groups);
                let rows = rb * MC..(rb * MC + MC).min(m);
                let mut out = [0f32; MR * MR];
                with_tiles(|| {
                    for q in cg * per_group..(cg * per_group + per_group).min(panels) {
                        let col = j0 + q * NR;
                        let nr = NR.min(j0 + nc - col);
                        for i in rows.clone().step_by(MR) {
                            // SAFETY: tiles configured; `a16` has whole tiles
                            // of rows and kp words a row; the panel holds kcp
                            // rows of NR words; `out` holds MR·MR floats.
                            unsafe {
                                block(
                                    kcp,
                                    a16.as_ptr().add(i * kp + p0),
                                    kp,
                                    bp.as_ptr().add(q * kcp * NR),
                                    NR,
                                    out.as_mut_ptr(),
                                )
                            };
                            // SAFETY: tiles of different tasks are disjoint
                            // and lie inside `c` (checked by the caller).
                            unsafe {
                                store(
                                    &out,
                                    (c_addr as *mut f32).add(i * ldc + col),
                                    ldc,
                                    MR.min(m - i),
                                    nr,
                                    false,
                                    load,
                                    alpha,
                                )
                            };
                        }
                    }
                });
            });
        }
    }
}

/// Writes `mr×nr` of the 32×32 `out` (`transposed`: `out[j][i]`) to `c`:
/// `c = [c +] α·out`.
///
/// # Safety
/// `c` holds `mr` rows of `nr` floats, `ldc` apart.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn store(
    out: &[f32; MR * MR],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    transposed: bool,
    load: bool,
    alpha: f32,
) {
    for r in 0..mr {
        // SAFETY: the caller's.
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), nr) };
        if transposed {
            for (j, v) in row.iter_mut().enumerate() {
                let o = alpha * out[j * MR + r];
                *v = if load { *v + o } else { o };
            }
        } else if load {
            row.iter_mut().zip(&out[r * MR..]).for_each(|(v, &o)| *v += alpha * o);
        } else {
            row.iter_mut().zip(&out[r * MR..]).for_each(|(v, &o)| *v = alpha * o);
        }
    }
}

/// Largest `m` multiplied with the operands swapped (see [`swapped`]): for
/// more rows, packing `B` once per call costs less than streaming the
/// packed `A` past every block of `W` (measured at the 270M's shapes).
const SWAP_MAX_M: usize = 256;

/// `C = [C +] α·A·Wᵀ` for few rows of `A` and a wide row-major `W` (the LM
/// head on a chunk of tokens) as `Cᵀ = W·Aᵀ`: `W`'s rows are already rows of
/// k-pairs, loaded as tiles straight from memory, and only the small `A` is
/// packed (as 32-row panels of k-pairs). Needs `k` a multiple of 32.
#[allow(clippy::too_many_arguments)]
fn swapped(
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    a: Operand<f32>,
    b: Operand<bf16>,
    alpha: f32,
) {
    let kp = k / 2;
    let ldw = b.cs / 2;
    let w = b.data.as_ptr() as usize;
    // The last rows of `W` in a whole zero-padded block, and `Aᵀ` as panels
    // of MR tokens: word [p][t] pairs A[t][2p], A[t][2p+1].
    let (full, tail) = w_tail(b, n, kp, MR);
    let panels = m.div_ceil(MR);
    let ap = a_panels(a, m, kp, MR);
    let c_addr = c.as_mut_ptr() as usize;
    const ROWS_PER_TASK: usize = 128;
    (0..n.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
        let rows = task * ROWS_PER_TASK..(task * ROWS_PER_TASK + ROWS_PER_TASK).min(n);
        let mut out = [0f32; MR * MR];
        with_tiles(|| {
            for j in rows.clone().step_by(MR) {
                let (src, lda) =
                    if j < full { ((w as *const u32).wrapping_add(j * ldw), ldw) } else { (tail.as_ptr(), kp) };
                for q in 0..panels {
                    // SAFETY: tiles configured; `W` rows j..j+MR (or the
                    // padded tail) hold kp words; the panel holds kp rows of
                    // MR words; `out` holds MR·MR floats.
                    unsafe { block(kp, src, lda, ap.as_ptr().add(q * kp * MR), MR, out.as_mut_ptr()) };
                    // SAFETY: tasks own disjoint columns of `C`; the
                    // transposed block lies inside `c`.
                    unsafe {
                        store(
                            &out,
                            (c_addr as *mut f32).add(q * MR * ldc + j),
                            ldc,
                            MR.min(m - q * MR),
                            MR.min(n - j),
                            true,
                            accumulate,
                            alpha,
                        )
                    };
                }
            }
        });
    });
}
