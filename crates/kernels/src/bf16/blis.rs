//! The loop nest of the native paths (AVX512-BF16, NEON BF16), after
//! BLIS: bf16 pairs packed as `u32` words (element `2p` in the low half,
//! `2p+1` in the high half, as `vdpbf16ps` and `bfdot` pair them); a
//! `KC×NC` block of `B` packed into `NR`-column panels of k-pairs, and
//! each micro-kernel call keeping an `MR×NR` tile of `C` in registers
//! while it walks `KC`. A [`Kernel`] is one instruction set's tile.
use super::*;

/// k-pairs per packed block of `B` (512 values of k).
pub(super) const KCP: usize = 256;
/// Columns per packed block of `B`.
pub(super) const NC: usize = 512;
/// Rows of `C` per parallel task.
const MC: usize = 64;

/// One micro-kernel call: `C = [C +] α·Σ_p A[.., p]·B[p, ..]` over
/// `kcp` k-pairs; `a` reads MR rows `lda` words apart, `b` is one packed
/// panel, and only the first `mr` rows and `nr` columns of the tile at
/// `c` (rows `ldc` apart) are written.
#[derive(Clone, Copy)]
pub(super) struct Tile {
    pub kcp: usize,
    pub a: *const u32,
    pub lda: usize,
    pub b: *const u32,
    pub c: *mut f32,
    pub ldc: usize,
    pub mr: usize,
    pub nr: usize,
    pub load: bool,
    pub alpha: f32,
}

/// One instruction set's micro-kernel and operand preparation.
pub(super) trait Kernel {
    /// Rows of `C` per micro-kernel tile.
    const MR: usize;
    /// Columns of `C` per tile.
    const NR: usize;

    /// One `MR×NR` tile ([`Tile`]).
    ///
    /// # Safety
    /// The CPU has the kernel's instructions; `a` holds `kcp` words per
    /// row (MR rows), `b` `kcp·NR` words, and the `mr×nr` tile lies
    /// inside `c`.
    unsafe fn tile(t: Tile);

    /// [`Kernel::tile`] with the result transposed: tile row `r` (a row
    /// of `W`) is column `r` of `C`, tile column `t` (a row of `A`) is
    /// row `t`; `a` may be unaligned.
    ///
    /// # Safety
    /// As for [`Kernel::tile`], with `mr` columns and `nr` rows of `c`.
    unsafe fn tile_t(t: Tile);

    /// Row `i` of `A` (`k` values) as k-pairs rounded to bf16
    /// (nearest-even), into the first `⌈k/2⌉` words of `row`.
    fn rounded_row(a: Operand<f32>, i: usize, k: usize, row: &mut [u32]) {
        let kp = k.div_ceil(2);
        for (p, w) in row[..kp].iter_mut().enumerate() {
            let hi = if 2 * p + 1 < k { a.at(i, 2 * p + 1) } else { 0.0 };
            *w = pair(bf16::from_f32(a.at(i, 2 * p)), bf16::from_f32(hi));
        }
    }

    /// `panel[p][lane] = pair(B[2(p0+p)][j0+lane], B[2(p0+p)+1][j0+lane])`
    /// for `p < kcp`, a full panel of a `B` whose rows are contiguous and
    /// hold rows 2·(p0+p) + 1 < k.
    fn interleave_rows(b: Operand<bf16>, p0: usize, kcp: usize, j0: usize, panel: &mut [u32]) {
        for p in 0..kcp {
            let (r0, r1) = (2 * (p0 + p) * b.rs + j0, (2 * (p0 + p) + 1) * b.rs + j0);
            for (lane, w) in panel[p * Self::NR..(p + 1) * Self::NR].iter_mut().enumerate() {
                *w = pair(b.data[r0 + lane], b.data[r1 + lane]);
            }
        }
    }
}

/// Two bf16 as one word, `lo` first.
pub(super) fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

#[allow(clippy::too_many_arguments)]
/// [`super::gemm`] by the kernel `K`.
pub(super) fn gemm<K: Kernel>(
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
    if m <= SWAP_MAX_M && n >= 8 * m && b.rs == 1 && k % 2 == 0 && b.cs % 2 == 0 {
        return swapped::<K>(m, n, k, c, ldc, accumulate, a, b, alpha);
    }
    let kp = k.div_ceil(2);
    let m_pad = m.next_multiple_of(K::MR);
    // `A` rounded to bf16 once, row-major in k-pairs, zero-padded to
    // whole tiles (the micro-kernel always reads MR rows).
    let mut a16 = vec![0u32; m_pad * kp];
    a16.par_chunks_mut(kp).take(m).enumerate().for_each(|(i, row)| K::rounded_row(a, i, k, row));
    let c_addr = c.as_mut_ptr() as usize;
    let mut packed = vec![0u32; KCP * NC.min(n).next_multiple_of(K::NR)];
    for j0 in (0..n).step_by(NC) {
        let nc = NC.min(n - j0);
        let panels = nc.div_ceil(K::NR);
        for p0 in (0..kp).step_by(KCP) {
            let kcp = KCP.min(kp - p0);
            let bp = &mut packed[..panels * kcp * K::NR];
            bp.par_chunks_mut(kcp * K::NR).enumerate().for_each(|(q, panel)| {
                pack_b::<K>(b, k, p0, kcp, j0 + q * K::NR, (j0 + nc).min(j0 + q * K::NR + K::NR), panel)
            });
            let bp = &*bp;
            let load = accumulate || p0 > 0;
            let row_blocks = m.div_ceil(MC);
            // Enough tasks for every thread even when `m` is small (the LM
            // head's 64-row chunks): split columns as well as rows.
            let col_groups = (4 * rayon::current_num_threads()).div_ceil(row_blocks).clamp(1, panels);
            let per_group = panels.div_ceil(col_groups);
            (0..row_blocks * col_groups).into_par_iter().for_each(|task| {
                let (rb, cg) = (task / col_groups, task % col_groups);
                let rows = rb * MC..(rb * MC + MC).min(m);
                for q in cg * per_group..(cg * per_group + per_group).min(panels) {
                    let col = j0 + q * K::NR;
                    let nr = K::NR.min(j0 + nc - col);
                    let panel = &bp[q * kcp * K::NR..(q + 1) * kcp * K::NR];
                    for i in rows.clone().step_by(K::MR) {
                        let mr = K::MR.min(m - i);
                        // SAFETY: tiles of different tasks are disjoint;
                        // `a16` has `m_pad` rows; the tile's `mr×nr`
                        // elements lie inside `c` (checked by the caller).
                        unsafe {
                            K::tile(Tile {
                                kcp,
                                a: a16.as_ptr().add(i * kp + p0),
                                lda: kp,
                                b: panel.as_ptr(),
                                c: (c_addr as *mut f32).add(i * ldc + col),
                                ldc,
                                mr,
                                nr,
                                load,
                                alpha,
                            })
                        }
                    }
                }
            });
        }
    }
}

/// Packs `B[2·p0.., j0..j1]` (`kcp` k-pairs) into one panel: word
/// `[p][lane]` pairs `B[2p][j0+lane]` with `B[2p+1][j0+lane]`; lanes
/// past `j1` and k past the end are zero.
pub(super) fn pack_b<K: Kernel>(
    b: Operand<bf16>,
    k: usize,
    p0: usize,
    kcp: usize,
    j0: usize,
    j1: usize,
    panel: &mut [u32],
) {
    let zero = bf16::ZERO;
    let mut from = 0;
    if b.cs == 1 && j1 - j0 == K::NR {
        // Rows of `B` contiguous (the backward's `W`): interleave two rows
        // 32 columns at a time.
        from = kcp.min((k / 2).saturating_sub(p0));
        K::interleave_rows(b, p0, from, j0, panel);
    } else if b.rs == 1 && b.cs % 2 == 0 {
        // Columns of `B` contiguous (the forward's `Wᵀ`): column j's
        // k-pairs are consecutive words of `W`'s row j, copied a row at
        // a time (sequential reads) into the panel's column.
        from = kcp.min((k / 2).saturating_sub(p0));
        panel[..from * K::NR].fill(0);
        for (lane, j) in (j0..j1).enumerate() {
            let words = b.data[j * b.cs + 2 * p0..][..2 * from].chunks_exact(2);
            for (p, w) in words.enumerate() {
                panel[p * K::NR + lane] = pair(w[0], w[1]);
            }
        }
    }
    for p in from..kcp {
        let (k0, k1) = (2 * (p0 + p), 2 * (p0 + p) + 1);
        let dst = &mut panel[p * K::NR..(p + 1) * K::NR];
        for (lane, w) in dst.iter_mut().enumerate() {
            let j = j0 + lane;
            *w = if j < j1 { pair(b.at(k0, j), if k1 < k { b.at(k1, j) } else { zero }) } else { 0 };
        }
    }
}

/// Largest `m` multiplied with the operands swapped (see [`swapped`]).
pub(super) const SWAP_MAX_M: usize = 256;

/// `C = [C +] α·A·Wᵀ` for few rows of `A` and a wide row-major `W`
/// (`B = Wᵀ`: the LM head on a 64-row chunk) computed as
/// `Cᵀ = W·Aᵀ`: `W`'s rows are already k-pairs, so the micro-kernel
/// broadcasts them straight from memory and only the small `A` is
/// packed — packing all of `W` per call would cost as much as the
/// product.
#[allow(clippy::too_many_arguments)]
fn swapped<K: Kernel>(
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
    // The last rows of `W` in a whole zero-padded group (the
    // micro-kernel always reads MR rows).
    let (full, tail) = w_tail(b, n, kp, K::MR);
    let panels = m.div_ceil(K::NR);
    let ap = a_panels(a, m, kp, K::NR);
    let c_addr = c.as_mut_ptr() as usize;
    const ROWS_PER_TASK: usize = 64;
    (0..n.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
        let rows = task * ROWS_PER_TASK..(task * ROWS_PER_TASK + ROWS_PER_TASK).min(n);
        for p0 in (0..kp).step_by(KCP) {
            let kcp = KCP.min(kp - p0);
            for j in rows.clone().step_by(K::MR) {
                let (src, lda) = if j < full {
                    ((w as *const u32).wrapping_add(j * ldw + p0), ldw)
                } else {
                    (tail.as_ptr().wrapping_add(p0), kp)
                };
                for q in 0..panels {
                    // SAFETY: `W` rows j..j+MR (or the padded tail) hold
                    // kp words from p0; the panel holds kp·NR words; the
                    // transposed tile lies inside `c`; tasks own disjoint
                    // columns of `C`.
                    unsafe {
                        K::tile_t(Tile {
                            kcp,
                            a: src,
                            lda,
                            b: ap.as_ptr().add(q * kp * K::NR + p0 * K::NR),
                            c: (c_addr as *mut f32).add(q * K::NR * ldc + j),
                            ldc,
                            mr: K::MR.min(n - j),
                            nr: K::NR.min(m - q * K::NR),
                            load: accumulate || p0 > 0,
                            alpha,
                        })
                    }
                }
            }
        }
    });
}

/// For the swapped products (`B = Wᵀ`, `W` row-major with `kp` k-pairs
/// a row): the rows of `W` past the last whole group of `group`, as
/// k-pairs in a zero-padded group of `group` rows, and where they start.
pub(super) fn w_tail(b: Operand<bf16>, n: usize, kp: usize, group: usize) -> (usize, Vec<u32>) {
    let full = n / group * group;
    let mut tail = vec![0u32; group * kp];
    for (r, j) in (full..n).enumerate() {
        for p in 0..kp {
            tail[r * kp + p] = pair(b.at(2 * p, j), b.at(2 * p + 1, j));
        }
    }
    (full, tail)
}

/// `Aᵀ` (`m` rows of `2·kp` values) rounded to bf16 as panels of
/// `width` rows: word `[q][p][t]` pairs `A[q·width + t][2p..2p+2]`.
pub(super) fn a_panels(a: Operand<f32>, m: usize, kp: usize, width: usize) -> Vec<u32> {
    let mut ap = vec![0u32; m.div_ceil(width) * kp * width];
    ap.par_chunks_mut(kp * width).enumerate().for_each(|(q, panel)| {
        for t in q * width..(q * width + width).min(m) {
            for p in 0..kp {
                panel[p * width + t - q * width] =
                    pair(bf16::from_f32(a.at(t, 2 * p)), bf16::from_f32(a.at(t, 2 * p + 1)));
            }
        }
    });
    ap
}
