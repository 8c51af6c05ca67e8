//! Frozen weights kept in bf16 — half the memory of f32 — multiplied with
//! f32 activations: mixed precision as PyTorch's CPU autocast does it.
//!
//! A LoRA layer over a frozen `W: [n, k]` needs two products of it: the
//! forward `y = x·Wᵀ` and the backward `∂x = g·W` (`W` gets no gradient).
//! [`gemm`] computes `C (+)= α·A·B` for an f32 `A` and a bf16 `B` read with
//! any strides, by the path [`path`] picks once per process:
//!
//! - **AMX-BF16** (Intel Sapphire Rapids and later): 16×16 tiles of `C`
//!   accumulated by `tdpbf16ps` from the same packed operands, 8,192
//!   multiply-adds per instruction ([`amx`]); the LM head's `x·Wᵀ` on a
//!   few rows loads the weight's rows as tiles as they are, unpacked;
//! - **AVX512-BF16** (AMD Zen 4 and later, Intel Cooper Lake and later):
//!   `A` is rounded to bf16 (nearest-even) once per call, and `vdpbf16ps` multiplies pairs of bf16 and accumulates them in f32 —
//!   32 multiply-adds per instruction, twice an f32 FMA's 16. The loop nest
//!   is BLIS's: a `KC×NC` block of `B` is packed into `NR`-column panels of
//!   k-pairs, and each micro-kernel call keeps an `MR×NR` tile of `C` in
//!   registers while it walks `KC` (L1-resident `B` panel, L2-resident `A`
//!   rows);
//! - **NEON BF16** (aarch64 with BF16: Apple M2 and later, Graviton 3 and
//!   later): the same loop nest over `bfdot` micro-kernels (module `neon`);
//! - **widen** (every other CPU): `B` is widened to f32 `NC` columns at a
//!   time and multiplied by the `gemm` crate, so the memory saving holds
//!   everywhere; the speed is f32's.
//!
//! All accumulate in f32. The paths round differently (the native ones
//! round `A` too), so the precision a run used is part of its cache key
//! upstream, never swapped silently.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// How [`gemm`] multiplies on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// `tdpbf16ps` on AMX tiles (AMX-BF16), see [`amx`].
    Amx,
    /// `vdpbf16ps` micro-kernels (AVX512-BF16).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512Bf16,
    /// `bfdot` micro-kernels (aarch64 BF16: Apple M2 and later, Graviton 3
    /// and later).
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    NeonBf16,
    /// bf16 widened to f32, then the `gemm` crate.
    Widen,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Amx => "amx-bf16",
            Path::Avx512Bf16 => "avx512bf16",
            Path::NeonBf16 => "neon-bf16",
            Path::Widen => "widen-f32",
        }
    }
}

/// The fastest path this CPU runs (detected once).
pub fn path() -> Path {
    static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| *paths().first().expect("widen is always there"))
}

/// Every path this CPU runs, fastest first. `PIPELINE_BF16_WIDEN=1` leaves
/// only the widen path, `PIPELINE_BF16_NO_AMX=1` drops the AMX one.
pub fn paths() -> Vec<Path> {
    let mut paths = Vec::new();
    if std::env::var_os("PIPELINE_BF16_WIDEN").is_none() {
        #[cfg(target_arch = "x86_64")]
        if std::env::var_os("PIPELINE_BF16_NO_AMX").is_none() && amx::available() {
            paths.push(Path::Amx);
        }
        if native_available() {
            paths.push(if cfg!(target_arch = "aarch64") { Path::NeonBf16 } else { Path::Avx512Bf16 });
        }
    }
    paths.push(Path::Widen);
    paths
}

/// Whether the CPU has native bf16 dot products (AVX512-BF16; on aarch64
/// BF16's `bfdot`) and `PIPELINE_MAX_CPU_ISA` allows them.
pub fn native_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && crate::IsaCap::allows(crate::IsaCap::Avx512)
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("bf16") && crate::IsaCap::allows_simd()
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// A matrix operand: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Operand<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T: Copy> Operand<'a, T> {
    /// A row-major matrix with `cols` columns.
    pub fn rows(data: &'a [T], cols: usize) -> Self {
        Operand { data, rs: cols, cs: 1 }
    }
    /// The same matrix read transposed.
    pub fn t(self) -> Self {
        Operand { data: self.data, rs: self.cs, cs: self.rs }
    }
    fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.rs + j * self.cs]
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "bf16 gemm: operand {what} ({rows}×{cols}) out of bounds");
        }
    }
}

/// `C (m×n, row stride ldc) = [C +] α·A·B` for `A: m×k` (f32) and `B: k×n`
/// (bf16), on rayon's pool, by [`path`]'s method.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
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
    gemm_with(path(), m, n, k, c, ldc, accumulate, a, b, alpha)
}

/// [`gemm`] by a given path (tests run every path the CPU has).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    path: Path,
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
    a.check(m, k, "A");
    b.check(k, n, "B");
    assert!(m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(), "bf16 gemm: C out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.par_chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Amx if amx::available() => amx::gemm(m, n, k, c, ldc, accumulate, a, b, alpha),
        #[cfg(target_arch = "x86_64")]
        Path::Avx512Bf16 if native_available() => {
            blis::gemm::<native::Avx512Bf16>(m, n, k, c, ldc, accumulate, a, b, alpha)
        }
        #[cfg(target_arch = "aarch64")]
        Path::NeonBf16 if native_available() => blis::gemm::<neon::NeonBf16>(m, n, k, c, ldc, accumulate, a, b, alpha),
        _ => widen_gemm(m, n, k, c, ldc, accumulate, a, b, alpha),
    }
}

/// The block of `B` widened to f32 per `gemm` call on the widen path:
/// `WIDEN_KC × WIDEN_NC` (4 MiB), so that even the 262k-row LM head is
/// never widened whole.
const WIDEN_KC: usize = 2048;
const WIDEN_NC: usize = 512;

/// bf16 → f32 is exact: the bf16 bits are the f32's upper half. Written as
/// a shift so the compiler vectorises it (`half`'s `to_f32` per element
/// does not).
fn widen(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

#[allow(clippy::too_many_arguments)]
fn widen_gemm(
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
    let mut wide = vec![0f32; WIDEN_KC.min(k) * WIDEN_NC.min(n)];
    for j0 in (0..n).step_by(WIDEN_NC) {
        let nc = WIDEN_NC.min(n - j0);
        for p0 in (0..k).step_by(WIDEN_KC) {
            let kc = WIDEN_KC.min(k - p0);
            // The block `B[p0..p0+kc, j0..j0+nc]` in f32, laid out as `B`
            // runs in memory so that every copy is a contiguous run: rows
            // of `B` (`g·W`, `W` row-major), or rows of `Bᵀ` (`x·Wᵀ`: the
            // weight's own rows). `(rs, cs)` are the block's strides.
            let wide = &mut wide[..kc * nc];
            let (rs, cs) = if b.cs == 1 {
                wide.par_chunks_mut(nc)
                    .enumerate()
                    .for_each(|(i, row)| widen(&b.data[(p0 + i) * b.rs + j0..][..nc], row));
                (nc, 1)
            } else if b.rs == 1 {
                wide.par_chunks_mut(kc)
                    .enumerate()
                    .for_each(|(j, col)| widen(&b.data[(j0 + j) * b.cs + p0..][..kc], col));
                (1, kc)
            } else {
                wide.par_chunks_mut(nc).enumerate().for_each(|(i, row)| {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = b.at(p0 + i, j0 + j).to_f32();
                    }
                });
                (nc, 1)
            };
            let parallelism = if m * nc * kc >= 1 << 18 {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            } else {
                gemm::Parallelism::None
            };
            // SAFETY: `check` above bounds every element of `A` the strides
            // reach (columns p0..p0+kc of it here); the destination block
            // `C[.., j0..j0+nc]` lies inside `c`, and the block's strides
            // `(rs, cs)` stay inside `wide` (kc × nc elements).
            unsafe {
                gemm::gemm(
                    m,
                    nc,
                    kc,
                    c.as_mut_ptr().add(j0),
                    1,
                    ldc as isize,
                    // Later k-blocks add to what the first one wrote.
                    accumulate || p0 > 0,
                    a.data.as_ptr().add(p0 * a.cs),
                    a.cs as isize,
                    a.rs as isize,
                    wide.as_ptr(),
                    cs as isize,
                    rs as isize,
                    1.0,
                    alpha,
                    false,
                    false,
                    false,
                    parallelism,
                )
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod blis {
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
}

#[cfg(target_arch = "aarch64")]
mod neon {
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
}

#[cfg(target_arch = "x86_64")]
mod native {
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
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(a.add(r * lda + p).read_unaligned() as i32));
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
}

// ---------------------------------------------------------------- tensors

/// `x·Wᵀ` for `x: [m, k]` (f32) and a frozen `W: [n, k]` of any float dtype
/// (f32 goes through candle's matmul; bf16 on the CPU through [`gemm`]).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() != DType::BF16 || !w.device().is_cpu() {
        return x.matmul(&w.t()?);
    }
    let (m, k) = x.dims2()?;
    let n = w.dim(0)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let mut y = vec![0f32; m * n];
    with_data(&x, &w, |xd, wd| times_transposed(m, n, k, xd, wd, &mut y))?;
    Tensor::from_vec(y, (m, n), x.device())
}

/// `y (m×n) = x·Wᵀ` for row-major `x: m×k` and `W: n×k`, on slices.
pub fn times_transposed(m: usize, n: usize, k: usize, x: &[f32], w: &[bf16], y: &mut [f32]) {
    gemm(m, n, k, y, n, false, Operand::rows(x, k), Operand::rows(w, k).t(), 1.0);
}

/// `g·W` for `g: [m, n]` (f32) and a frozen `W: [n, k]` of any float dtype.
pub fn matmul(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.dtype() != DType::BF16 || !w.device().is_cpu() {
        return g.matmul(w);
    }
    let (m, n) = g.dims2()?;
    let k = w.dim(1)?;
    let (g, w) = (g.contiguous()?, w.contiguous()?);
    let mut y = vec![0f32; m * k];
    with_data(&g, &w, |gd, wd| gemm(m, k, n, &mut y, k, false, Operand::rows(gd, n), Operand::rows(wd, k), 1.0))?;
    Tensor::from_vec(y, (m, k), g.device())
}

/// Runs `f` on the data of a contiguous f32 CPU tensor and a bf16 one.
fn with_data<R>(x: &Tensor, w: &Tensor, f: impl FnOnce(&[f32], &[bf16]) -> R) -> Result<R> {
    let ((sx, lx), (sw, lw)) = (x.storage_and_layout(), w.storage_and_layout());
    match (&*sx, &*sw) {
        (Storage::Cpu(CpuStorage::F32(xd)), Storage::Cpu(CpuStorage::BF16(wd))) => {
            Ok(f(contiguous(xd, lx)?, contiguous(wd, lw)?))
        }
        _ => candle_core::bail!("bf16 linear: expected f32 activations and bf16 weights on the CPU"),
    }
}

/// The elements of a contiguous layout.
pub fn contiguous<'a, T>(data: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("bf16 linear: tensor must be contiguous"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `C = [C0 +] α·A·B` in f64 from `A` as the path reads it (rounded to
    /// bf16 on the native path) and the bf16 `B`.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        c0: Option<&[f32]>,
        a: Operand<f32>,
        b: Operand<bf16>,
        alpha: f32,
        round_a: bool,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if round_a { bf16::from_f32(a.at(i, p)).to_f32() } else { a.at(i, p) };
                    s += av as f64 * b.at(p, j).to_f32() as f64;
                }
                c[i * n + j] = (alpha as f64 * s + c0.map_or(0.0, |c0| c0[i * n + j] as f64)) as f32;
            }
        }
        c
    }

    /// Every path this CPU has (and the native path's swapped form for few
    /// rows and a wide `Wᵀ`), on shapes with partial tiles, odd k, both
    /// layouts of `B` (`Wᵀ` for the forward, `W` for the backward), several
    /// k-blocks and column blocks, with and without accumulation.
    #[test]
    fn widen_path_matches_the_f64_reference() {
        matches_the_f64_reference(Path::Widen);
    }

    #[test]
    #[cfg_attr(
        not(cpu_avx512bf16),
        ignore = "no AVX512-BF16 on this CPU (or PIPELINE_MAX_CPU_ISA caps it): that bf16 path is not tested here"
    )]
    fn avx512_bf16_path_matches_the_f64_reference() {
        matches_the_f64_reference(Path::Avx512Bf16);
    }

    #[test]
    #[cfg_attr(
        not(cpu_amx),
        ignore = "no AMX on this CPU (or PIPELINE_MAX_CPU_ISA caps it): the AMX bf16 path is not tested here"
    )]
    fn amx_path_matches_the_f64_reference() {
        matches_the_f64_reference(Path::Amx);
    }

    /// Cross-built, the machine that runs the test is not known when it is
    /// built: a CPU without `bfdot` says so and returns.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_bf16_path_matches_the_f64_reference() {
        if !paths().contains(&Path::NeonBf16) {
            eprintln!("SKIPPED: the neon-bf16 path (this CPU has no bfdot)");
            return;
        }
        matches_the_f64_reference(Path::NeonBf16);
    }

    fn matches_the_f64_reference(path: Path) {
        let paths = paths();
        assert!(
            paths.contains(&path),
            "the CPU has the {} path but the kernels do not offer it ({paths:?})",
            path.name()
        );
        {
            for &(m, n, k) in &[
                (1, 1, 1),
                (7, 33, 5),
                (13, 70, 600),
                (70, 530, 1030),
                (3, 17, 2),
                (5, 83, 38),
                (40, 700, 520),
                (64, 2048, 64),
                (3, 520, 4200),
                (64, 300, 640),
                (33, 1100, 96),
                (300, 70, 640),
            ] {
                for transposed in [false, true] {
                    let av = values(m * k, 1);
                    let bv: Vec<bf16> = values(k * n, 2).into_iter().map(bf16::from_f32).collect();
                    let a = Operand::rows(&av, k);
                    // B as k×n: either stored row-major, or stored n×k and read transposed.
                    let b = if transposed { Operand::rows(&bv, k).t() } else { Operand::rows(&bv, n) };
                    for accumulate in [false, true] {
                        let c0 = values(m * n, 3);
                        let mut c = c0.clone();
                        gemm_with(path, m, n, k, &mut c, n, accumulate, a, b, 0.5);
                        let want = reference(m, n, k, accumulate.then_some(&c0), a, b, 0.5, path != Path::Widen);
                        let worst = c.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                        // f32 accumulation of up to ~1000 products of size ≤ 1.
                        let tol = 1e-5 * (k as f32).max(1.0) + 1e-5;
                        assert!(
                            worst <= tol,
                            "{} path, {m}×{n}×{k}, transposed B {transposed}, accumulate {accumulate}: off by {worst} (> {tol})",
                            path.name()
                        );
                    }
                }
            }
        }
    }

    /// The tensor entry points equal candle's matmul on the widened weight
    /// (up to the rounding of the activations on the native path).
    #[test]
    fn linear_and_matmul_match_candle_on_the_widened_weight() {
        let dev = candle_core::Device::Cpu;
        let (m, n, k) = (37, 45, 130);
        let x = Tensor::from_vec(values(m * k, 5), (m, k), &dev).unwrap();
        let g = Tensor::from_vec(values(m * n, 6), (m, n), &dev).unwrap();
        let w = Tensor::from_vec(values(n * k, 7), (n, k), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let wide = w.to_dtype(DType::F32).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let y = linear(&x, &w).unwrap();
        assert!(diff(&y, &x.matmul(&wide.t().unwrap()).unwrap()) < 0.05);
        let dx = matmul(&g, &w).unwrap();
        assert!(diff(&dx, &g.matmul(&wide).unwrap()) < 0.05);
        // f32 weights take candle's own matmul.
        assert!(diff(&linear(&x, &wide).unwrap(), &x.matmul(&wide.t().unwrap()).unwrap()) == 0.0);
    }
}
