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
            blis::gemm::<avx512::Avx512Bf16>(m, n, k, c, ldc, accumulate, a, b, alpha)
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
mod blis;

#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(target_arch = "x86_64")]
mod avx512;

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
