//! Elementwise math written so the compiler vectorises it: `exp` and the
//! GELU-tanh pair.
//!
//! `f32::exp` and `f32::tanh` are calls into libm, one element at a time;
//! in a prefill they made GELU alone ~13 % of the time. Here `exp` is the
//! classic Cephes range reduction (`x = n·ln2 + r`, a degree-6 polynomial for
//! `eʳ`, `2ⁿ` built in the exponent bits), accurate to ~2 ulp, branch-free
//! so that loops over slices become SIMD code. On x86-64 the loops are
//! compiled again for AVX2+FMA and for AVX-512 and the best [`Tier`] the CPU
//! has is picked at run time (aarch64 builds have NEON as their baseline,
//! which the portable loops vectorise to).

/// The instruction-set tiers the loops here are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Portable,
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/VL + FMA (x86-64-v4): 16-lane vectors.
    Avx512,
}

impl Tier {
    /// The best tier this CPU runs (detected once).
    pub fn best() -> Tier {
        static BEST: std::sync::OnceLock<Tier> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let all = Tier::available();
            *all.last().expect("portable is always there")
        })
    }

    /// Every tier this CPU runs, worst first.
    pub fn available() -> Vec<Tier> {
        #[allow(unused_mut)]
        let mut tiers = vec![Tier::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && crate::IsaCap::allows(crate::IsaCap::Avx2) {
                tiers.push(Tier::Avx2);
                if has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512vl")
                    && crate::IsaCap::allows(crate::IsaCap::Avx512)
                {
                    tiers.push(Tier::Avx512);
                }
            }
        }
        tiers
    }

    pub fn name(self) -> &'static str {
        match self {
            // aarch64's baseline has NEON, which the portable loops compile to.
            Tier::Portable if cfg!(target_arch = "aarch64") => "neon",
            Tier::Portable => "portable",
            Tier::Avx2 => "avx2+fma",
            Tier::Avx512 => "avx512",
        }
    }
}

/// Defines `pub fn $name` from a portable body, compiled again for each
/// x86-64 [`Tier`] and picked at run time (the best the CPU has), and
/// `$name::at(tier, …)`, the same at a given tier (tests run them all).
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) $body:block) => {
        simd_fn! { $(#[$m])* fn $name($($a: $t),*) -> () $body }
    };
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),*) -> $r:ty $body:block) => {
        $(#[$m])*
        pub fn $name($($a: $t),*) -> $r {
            $name::at(Tier::best(), $($a),*)
        }

        #[doc = concat!("[`", stringify!($name), "`] compiled for each [`Tier`].")]
        pub mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[inline(always)]
            fn portable($($a: $t),*) -> $r $body

            /// At `tier` (or the best below it that this CPU has).
            pub fn at(tier: Tier, $($a: $t),*) -> $r {
                let tier = tier.min(Tier::best());
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx2,fma")]
                    unsafe fn avx2($($a: $t),*) -> $r {
                        portable($($a),*)
                    }
                    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                    unsafe fn avx512($($a: $t),*) -> $r {
                        portable($($a),*)
                    }
                    // SAFETY: `tier` is at most what the CPU has (`Tier::best`).
                    match tier {
                        Tier::Avx512 => return unsafe { avx512($($a),*) },
                        Tier::Avx2 => return unsafe { avx2($($a),*) },
                        Tier::Portable => {}
                    }
                }
                let _ = tier;
                portable($($a),*)
            }
        }
    };
}

simd_fn! {
    /// `x ← softmax(x)`: `exp(x − max)`, normalised to sum 1.
    fn softmax_in_place(x: &mut [f32]) {
        let m = max(x);
        let mut acc = [0f32; 8];
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            for i in 0..8 {
                c[i] = exp(c[i] - m);
                acc[i] += c[i];
            }
        }
        let mut tail = 0f32;
        for v in chunks.into_remainder() {
            *v = exp(*v - m);
            tail += *v;
        }
        let inv = 1.0 / (acc.iter().sum::<f32>() + tail);
        x.iter_mut().for_each(|v| *v *= inv);
    }
}

simd_fn! {
    /// GELU (tanh approximation) of `x` into `y`: `x·σ(2u)`,
    /// `u = √(2/π)·(x + 0.044715·x³)` (since `½(1 + tanh u) = σ(2u)`).
    fn gelu_tanh(x: &[f32], y: &mut [f32]) {
        for (yv, &v) in y.iter_mut().zip(x) {
            *yv = v * gelu_gate(v);
        }
    }
}

simd_fn! {
    /// `dx = dy · d/dx GELU(x)` = `dy·(σ + 2x·σ(1−σ)·u')`, `σ = σ(2u)`.
    fn gelu_tanh_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let s = gelu_gate(v);
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * v * v);
            *o = g * (s + 2.0 * v * s * (1.0 - s) * du);
        }
    }
}

simd_fn! {
    /// `out[j] = q·k_j` for the rows `k_j` of `k` (row length `q.len()`).
    fn dots(q: &[f32], k: &[f32], out: &mut [f32]) {
        for (o, kr) in out.iter_mut().zip(k.chunks_exact(q.len())) {
            *o = dot(q, kr);
        }
    }
}

simd_fn! {
    /// `out = Σ_j p[j]·v_j` for the rows `v_j` of `v` (row length `out.len()`).
    fn weighted_sum(p: &[f32], v: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        add_weighted(p, v, out);
    }
}

simd_fn! {
    /// `out += Σ_j p[j]·v_j`, the rows added one after another: a
    /// [`weighted_sum`] taken over consecutive blocks of rows gives its bits.
    fn weighted_sum_add(p: &[f32], v: &[f32], out: &mut [f32]) {
        add_weighted(p, v, out);
    }
}

#[inline(always)]
fn add_weighted(p: &[f32], v: &[f32], out: &mut [f32]) {
    let d = out.len();
    for (&w, vr) in p.iter().zip(v.chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(vr) {
            *o += w * x;
        }
    }
}

simd_fn! {
    /// The largest element (−∞ for an empty slice).
    fn max(x: &[f32]) -> f32 {
        let mut m = [f32::NEG_INFINITY; 8];
        let chunks = x.chunks_exact(8);
        let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for c in chunks {
            for i in 0..8 {
                m[i] = m[i].max(c[i]);
            }
        }
        m.iter().copied().fold(tail, f32::max)
    }
}

simd_fn! {
    /// `out[i] = exp(x[i] − shift)`; returns their sum.
    fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        let mut acc = [0f32; 8];
        let mut oc = out.chunks_exact_mut(8);
        let mut xc = x.chunks_exact(8);
        for (o, c) in (&mut oc).zip(&mut xc) {
            for i in 0..8 {
                o[i] = exp(c[i] - shift);
                acc[i] += o[i];
            }
        }
        let mut tail = 0f32;
        for (o, &v) in oc.into_remainder().iter_mut().zip(xc.remainder()) {
            *o = exp(v - shift);
            tail += *o;
        }
        acc.iter().sum::<f32>() + tail
    }
}

simd_fn! {
    /// `ln Σ exp(x)`, computed stably (shifted by the maximum).
    fn logsumexp(x: &[f32]) -> f32 {
        let m = max(x);
        let mut acc = [0f32; 8];
        let chunks = x.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - m)).sum();
        for c in chunks {
            for i in 0..8 {
                acc[i] += exp(c[i] - m);
            }
        }
        m + (acc.iter().sum::<f32>() + tail).ln()
    }
}

/// `a·b` with eight partial sums, so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044_715;

#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in a few bits and the rest (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.3;
    let x = x.clamp(-87.3, 88.8);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    // 2ⁿ from the exponent bits: n is in [-126, 128] after the clamp, and
    // 2¹²⁸ is not an f32, so n = 128 is 2·2¹²⁷ (+∞ once past f32::MAX).
    let n1 = n.min(127.0);
    let scale = f32::from_bits(((n1 as i32 + 127) as u32) << 23);
    let y = er * scale * (n - n1 + 1.0);
    if below { 0.0 } else { y }
}

/// `σ(2u)` for GELU-tanh.
#[inline(always)]
fn gelu_gate(v: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (v + COEF * v * v * v);
    1.0 / (1.0 + exp(-2.0 * u))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test per tier: `$check(tier)`. A tier this CPU lacks is
    /// reported by the test harness as ignored, with the reason.
    macro_rules! per_tier {
        ($name:ident, $check:ident) => {
            mod $name {
                use super::*;

                #[test]
                fn portable() {
                    $check(Tier::Portable);
                }

                #[test]
                #[cfg_attr(not(cpu_avx2), ignore = "no AVX2+FMA on this CPU (or PIPELINE_MAX_CPU_ISA caps it): its vmath tier is not tested here")]
                fn avx2() {
                    require(Tier::Avx2);
                    $check(Tier::Avx2);
                }

                #[test]
                #[cfg_attr(not(cpu_avx512), ignore = "no AVX-512 on this CPU (or PIPELINE_MAX_CPU_ISA caps it): its vmath tier is not tested here")]
                fn avx512() {
                    require(Tier::Avx512);
                    $check(Tier::Avx512);
                }
            }
        };
    }

    /// The build found `tier` on this CPU: the kernels must offer it.
    fn require(tier: Tier) {
        assert!(Tier::available().contains(&tier), "the CPU has {} but the kernels do not offer it", tier.name());
    }

    per_tier!(exp_is_within_a_few_ulp_of_libm, exp_at);
    per_tier!(reductions_match_the_naive_ones, reductions_at);
    per_tier!(gelu_matches_the_tanh_formula_and_its_derivative, gelu_at);

    fn exp_at(tier: Tier) {
        let exp_shifted = |x: &[f32], s: f32, o: &mut [f32]| exp_shifted::at(tier, x, s, o);
        let mut worst = 0f32;
        for i in -870_000..887_000 {
            let x = i as f32 * 1e-4;
            let mut v = [0f32];
            exp_shifted(&[x], 0.0, &mut v);
            let want = x.exp();
            worst = worst.max(((v[0] - want) / want).abs());
        }
        assert!(worst < 5e-7, "{}: relative error {worst}", tier.name());
        let mut edges = [0f32; 7];
        exp_shifted(&[-1000.0, -87.0, 0.0, 88.0, 89.0, 1000.0, f32::NEG_INFINITY], 0.0, &mut edges);
        assert!(edges[0] == 0.0 && edges[6] == 0.0 && edges[1] > 0.0);
        assert_eq!(edges[2], 1.0);
        assert!(edges[3].is_finite() && edges[4].is_infinite() && edges[5].is_infinite());
    }

    fn reductions_at(tier: Tier) {
        let max = |x: &[f32]| max::at(tier, x);
        let exp_shifted = |x: &[f32], s: f32, o: &mut [f32]| exp_shifted::at(tier, x, s, o);
        let logsumexp = |x: &[f32]| logsumexp::at(tier, x);
        let softmax_in_place = |x: &mut [f32]| softmax_in_place::at(tier, x);
        for n in [1, 7, 8, 29, 1000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.37).collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m);
            let want: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
            let mut out = vec![0f32; n];
            let sum = exp_shifted(&x, m, &mut out);
            assert!(((sum as f64 - want) / want).abs() < 1e-6, "sum {sum} vs {want}");
            assert!(out.iter().zip(&x).all(|(o, &v)| (o - (v - m).exp()).abs() <= 1e-6 * (v - m).exp().max(1e-30)));
            let lse = logsumexp(&x) as f64;
            assert!((lse - (m as f64 + want.ln())).abs() < 1e-5, "logsumexp {lse}");
            let mut p = x.clone();
            softmax_in_place(&mut p);
            assert!(p.iter().zip(&x).all(|(&pv, &v)| ((pv as f64) - ((v - m) as f64).exp() / want).abs() < 1e-6));
            let (q, k): (Vec<f32>, Vec<f32>) = (x.iter().map(|v| v * 0.1).collect(), x.iter().rev().copied().collect());
            let mut d = [0f32];
            dots::at(tier, &q, &k, &mut d);
            let want_dot: f64 = q.iter().zip(&k).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((d[0] as f64 - want_dot).abs() < 1e-4 * (1.0 + want_dot.abs()), "{}: dot", tier.name());
            let mut ws = vec![0f32; 1];
            weighted_sum::at(tier, &q, &k, &mut ws);
            assert!((ws[0] as f64 - want_dot).abs() < 1e-4 * (1.0 + want_dot.abs()), "{}: weighted sum", tier.name());
        }
    }

    fn gelu_at(tier: Tier) {
        let gelu_tanh = |x: &[f32], y: &mut [f32]| gelu_tanh::at(tier, x, y);
        let gelu_tanh_bwd = |x: &[f32], dy: &[f32], dx: &mut [f32]| gelu_tanh_bwd::at(tier, x, dy, dx);
        let x: Vec<f32> = (-4000..4000).map(|i| i as f32 * 2e-3).collect();
        let mut y = vec![0f32; x.len()];
        gelu_tanh(&x, &mut y);
        let dy: Vec<f32> = x.iter().map(|v| 1.0 + v * 0.1).collect();
        let mut dx = vec![0f32; x.len()];
        gelu_tanh_bwd(&x, &dy, &mut dx);
        for ((&v, (&yv, &dxv)), &g) in x.iter().zip(y.iter().zip(&dx)).zip(&dy) {
            let (v64, g64) = (v as f64, g as f64);
            let inner = 0.797_884_560_802_865_4 * (v64 + 0.044_715 * v64.powi(3));
            let want = 0.5 * v64 * (1.0 + inner.tanh());
            assert!((yv as f64 - want).abs() < 2e-6 * (1.0 + want.abs()), "gelu({v}) = {yv}, want {want}");
            let t = inner.tanh();
            let d = 0.5 * (1.0 + t)
                + 0.5 * v64 * (1.0 - t * t) * 0.797_884_560_802_865_4 * (1.0 + 3.0 * 0.044_715 * v64 * v64);
            assert!((dxv as f64 - g64 * d).abs() < 5e-6 * (1.0 + (g64 * d).abs()), "gelu'({v})");
        }
    }
}
