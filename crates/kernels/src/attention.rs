//! Causal attention on the CPU that computes only the scores a query can see.
//!
//! A causal model's query at position `p` sees keys `first(p)..=p`, where
//! `first(p)` is 0 for a global layer and `p + 1 - window` for a
//! sliding-window one. Composed from plain matmuls, attention computes the
//! whole `T × T` score matrix and masks most of it away: at 2048 tokens half
//! of a global layer's products and three quarters of a 512-window layer's
//! are thrown away, forward and backward. Here the queries are cut into
//! blocks of [`BLOCK`] rows, and every product (`q·kᵀ`, `p·v` and the four of
//! the backward pass) runs only over the key columns the block's rows can
//! see, as independent single-threaded GEMMs spread over rayon's pool.
//!
//! Layouts follow [`crate::composed::attention_probs`]: `q: [G, R, D]`, where a
//! group's `R = H·t` rows are its `H` query heads one after another, each
//! with `t` positions `start..start+t`; `k`, `v: [G, total, D]` with
//! `total = start + t` (earlier positions come from a KV cache). The
//! probabilities `[G, R, total]` are zero outside each row's band.
//!
//! Two differentiable ops make an attention layer: [`probs`] (`softmax` of
//! the banded `q·kᵀ`) and [`apply`] (`p·v`). Each backward only reads and
//! writes inside the band; the gradient [`apply`] hands to `p` is exact
//! inside the band, which is all that [`probs`]'s backward reads.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Query rows per block: small enough that the wasted corner of a block on
/// the diagonal (or at the window's edge) stays a few percent of the work,
/// large enough for efficient GEMMs.
const BLOCK: usize = 64;

/// Blocks of at most this many rows (decoding: one) use plain dot products
/// instead of a GEMM, whose setup costs more than such a product.
const SMALL: usize = 4;

/// Which keys each query row of one head sees.
#[derive(Clone, Copy, Debug)]
pub struct Band {
    /// Query positions per head.
    pub t: usize,
    /// Position of the first query (keys before it come from a cache).
    pub start: usize,
    /// Sliding window, or `None` for global attention.
    pub window: Option<usize>,
}

impl Band {
    fn total(&self) -> usize {
        self.start + self.t
    }

    /// First key seen by the query at absolute position `pos`.
    fn first(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }

    /// Key columns `[lo, hi)` seen by any of the query rows `i0..i1`.
    fn cols(&self, i0: usize, i1: usize) -> (usize, usize) {
        (self.first(self.start + i0), self.start + i1)
    }

    /// Query rows `[lo, hi)` that see any of the keys `j0..j1`.
    fn rows(&self, j0: usize, j1: usize) -> (usize, usize) {
        let lo = j0.saturating_sub(self.start).min(self.t);
        let hi = match self.window {
            None => self.t,
            // Row i sees key j1 - 1 while first(start + i) <= j1 - 1.
            Some(w) => (j1 + w - 1).saturating_sub(self.start).min(self.t),
        };
        (lo, hi.max(lo))
    }

    /// Row blocks of one head: `(i0, i1)`.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + Clone + use<> {
        let t = self.t;
        (0..t.div_ceil(BLOCK)).map(move |b| (b * BLOCK, (b * BLOCK + BLOCK).min(t)))
    }

    fn key_blocks(&self) -> impl Iterator<Item = (usize, usize)> + Clone + use<> {
        let total = self.total();
        (0..total.div_ceil(BLOCK)).map(move |b| (b * BLOCK, (b * BLOCK + BLOCK).min(total)))
    }
}

/// A raw pointer that rayon tasks writing disjoint parts of one buffer share.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// A row-major view: pointer, row stride, column stride.
#[derive(Clone, Copy)]
struct View(*const f32, usize, usize);

/// `dst (m×n, row stride dst_rs) (+)= a (m×k) · b (k×n)`, single-threaded.
///
/// # Safety
/// Every pointer must be valid for the extents its strides describe, and
/// no other thread may write the `dst` block.
unsafe fn mm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, accumulate: bool, a: View, b: View) {
    if m == 0 || n == 0 {
        return;
    }
    let s = |x: usize| x as isize;
    // gemm computes dst := alpha·dst + beta·a·b (alpha only read with read_dst).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst,
            1,
            s(dst_rs),
            accumulate,
            a.0,
            s(a.2),
            s(a.1),
            b.0,
            s(b.2),
            s(b.1),
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Dimensions of one call: groups, rows per group, head size, the band.
#[derive(Clone, Copy)]
struct Dims {
    g: usize,
    r: usize,
    d: usize,
    band: Band,
}

impl Dims {
    fn heads(&self) -> usize {
        self.r / self.band.t
    }

    /// Every `(group, head, row block)` work item.
    fn row_blocks(&self) -> Vec<RowBlock> {
        let mut items = Vec::new();
        for g in 0..self.g {
            for h in 0..self.heads() {
                items.extend(self.band.blocks().map(|(i0, i1)| {
                    let (c0, c1) = self.band.cols(i0, i1);
                    RowBlock { g, rows: i1 - i0, row0: g * self.r + h * self.band.t + i0, i0, c0, c1 }
                }));
            }
        }
        items
    }
}

/// One work item: `rows` query rows of one head from position `i0`, row
/// `row0` of the `[G·R, …]` layouts, and the key columns `c0..c1` they see.
#[derive(Clone, Copy)]
struct RowBlock {
    g: usize,
    rows: usize,
    row0: usize,
    i0: usize,
    c0: usize,
    c1: usize,
}

/// Runs `f` on every row block of `dims`, in parallel: the few small
/// blocks of a short continuation (at most [`SMALL`] positions; a
/// one-position decoding step has its own [`step_scores`] and
/// [`step_times`]) on the spinning [`super::team`], whose threads are awake
/// between decoding's matrix × vector products (rayon's would first have to
/// be woken), longer sequences' blocks over rayon's pool.
fn for_each_block(dims: Dims, f: impl Fn(RowBlock) + Sync + Send) {
    if dims.band.t <= SMALL {
        super::team::for_each(dims.row_blocks(), f)
    } else {
        dims.row_blocks().into_par_iter().for_each(f)
    }
}

/// `[G, R, total]`: `a·bᵀ` inside the band (`a: [G, R, D]`, `b: [G, total, D]`),
/// and, with `softmax`, the row-wise softmax over each row's visible keys.
/// Outside the band: 0.
fn band_scores(a: &[f32], b: &[f32], dims: Dims, softmax: bool) -> Vec<f32> {
    if dims.band.t == 1 {
        return step_scores(a, b, dims, softmax);
    }
    let Dims { g: _, r, d, band } = dims;
    let total = band.total();
    let mut out = vec![0f32; dims.g * r * total];
    let dst = Out(out.as_mut_ptr());
    for_each_block(dims, |RowBlock { g, rows, row0, i0, c0, c1 }| {
        let dst = dst;
        // SAFETY: this item alone writes rows row0..row0+rows of `out`;
        // reads stay inside `a` and `b`.
        unsafe {
            let block = dst.0.add(row0 * total + c0);
            if rows <= SMALL {
                let keys = &b[(g * total + c0) * d..(g * total + c1) * d];
                for i in 0..rows {
                    let row = std::slice::from_raw_parts_mut(block.add(i * total), c1 - c0);
                    super::vmath::dots(&a[(row0 + i) * d..][..d], keys, row);
                }
            } else {
                let a = View(a.as_ptr().add(row0 * d), d, 1);
                let bt = View(b.as_ptr().add((g * total + c0) * d), 1, d);
                mm(rows, c1 - c0, d, block, total, false, a, bt);
            }
            for i in 0..rows {
                let pos = band.start + i0 + i;
                let row = std::slice::from_raw_parts_mut(dst.0.add((row0 + i) * total), total);
                let lo = band.first(pos);
                row[c0..lo].fill(0.0);
                row[pos + 1..c1].fill(0.0);
                if softmax {
                    super::vmath::softmax_in_place(&mut row[lo..=pos]);
                }
            }
        }
    });
    out
}

/// Keys per block of a decoding step's products: 16 rows of 256 (16 KiB)
/// stay in L1 while every head of the group uses them.
const STEP_KEYS: usize = 16;

/// [`band_scores`] for a decoding step (one position, `R` = the group's
/// heads): every head's scores are [`super::vmath::dots`]'s, as with one
/// row block per head, but each block of keys is read from memory once
/// for all the heads of its group (the cache streams in once per step,
/// not once per head), and the key range is split over the
/// [`super::team`].
fn step_scores(a: &[f32], b: &[f32], dims: Dims, softmax: bool) -> Vec<f32> {
    let Dims { g: groups, r: heads, d, band } = dims;
    let (total, pos) = (band.total(), band.start);
    let lo = band.first(pos);
    let mut out = vec![0f32; groups * heads * total];
    let dst = Out(out.as_mut_ptr());
    let per_task = 16 * STEP_KEYS;
    let items: Vec<(usize, usize)> =
        (0..groups).flat_map(|g| (lo..=pos).step_by(per_task).map(move |j0| (g, j0))).collect();
    super::team::for_each(items, |(g, j0)| {
        let dst = dst;
        let j1 = (j0 + per_task).min(pos + 1);
        for k0 in (j0..j1).step_by(STEP_KEYS) {
            let k1 = (k0 + STEP_KEYS).min(j1);
            let keys = &b[(g * total + k0) * d..(g * total + k1) * d];
            for h in 0..heads {
                let row = g * heads + h;
                // SAFETY: this item alone writes columns j0..j1 of the
                // group's rows.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(row * total + k0), k1 - k0) };
                super::vmath::dots(&a[row * d..][..d], keys, o);
            }
        }
    });
    if softmax {
        let rows: Vec<&mut [f32]> = out.chunks_mut(total).map(|row| &mut row[lo..=pos]).collect();
        super::team::for_each(rows, super::vmath::softmax_in_place);
    }
    out
}

/// [`band_times`] for a decoding step: each head's output is
/// [`super::vmath::weighted_sum`]'s sum, in its order (value rows one after
/// another), taken a block of value rows at a time for all the heads of a
/// task, so that a block is read once per task; the group's heads are split
/// over the [`super::team`] in two halves.
fn step_times(p: &[f32], b: &[f32], dims: Dims) -> Vec<f32> {
    let Dims { g: groups, r: heads, d, band } = dims;
    let (total, pos) = (band.total(), band.start);
    let lo = band.first(pos);
    let mut out = vec![0f32; groups * heads * d];
    let half = heads.div_ceil(2);
    // (first row, its outputs): each group's heads in two halves.
    let items: Vec<(usize, &mut [f32])> = out
        .chunks_mut(heads * d)
        .enumerate()
        .flat_map(|(g, o)| {
            let (a, b) = o.split_at_mut(half * d);
            [(g * heads, a), (g * heads + half, b)]
        })
        .filter(|(_, o)| !o.is_empty())
        .collect();
    super::team::for_each(items, |(row0, o)| {
        let g = row0 / heads;
        for k0 in (lo..=pos).step_by(STEP_KEYS) {
            let k1 = (k0 + STEP_KEYS).min(pos + 1);
            let values = &b[(g * total + k0) * d..(g * total + k1) * d];
            for (i, oh) in o.chunks_mut(d).enumerate() {
                let row = row0 + i;
                super::vmath::weighted_sum_add(&p[row * total + k0..row * total + k1], values, oh);
            }
        }
    });
    out
}

/// `[G, R, D]`: `p·b` over the band (`p: [G, R, total]`, `b: [G, total, D]`).
fn band_times(p: &[f32], b: &[f32], dims: Dims) -> Vec<f32> {
    if dims.band.t == 1 {
        return step_times(p, b, dims);
    }
    let Dims { g: _, r, d, band } = dims;
    let total = band.total();
    let mut out = vec![0f32; dims.g * r * d];
    let dst = Out(out.as_mut_ptr());
    for_each_block(dims, |RowBlock { g, rows, row0, c0, c1, .. }| {
        let dst = dst;
        // SAFETY: this item alone writes rows row0..row0+rows of `out`.
        unsafe {
            if rows <= SMALL {
                let values = &b[(g * total + c0) * d..(g * total + c1) * d];
                for i in 0..rows {
                    let out = std::slice::from_raw_parts_mut(dst.0.add((row0 + i) * d), d);
                    super::vmath::weighted_sum(&p[(row0 + i) * total + c0..(row0 + i) * total + c1], values, out);
                }
            } else {
                let pv = View(p.as_ptr().add(row0 * total + c0), total, 1);
                let bv = View(b.as_ptr().add((g * total + c0) * d), d, 1);
                mm(rows, d, c1 - c0, dst.0.add(row0 * d), d, false, pv, bv);
            }
        }
    });
    out
}

/// `[G, total, D]`: `Σ_heads p_hᵀ·a_h` over the band (`p: [G, R, total]`,
/// `a: [G, R, D]`), the gradient of keys and values, which every head of a
/// group shares.
fn band_t_times(p: &[f32], a: &[f32], dims: Dims) -> Vec<f32> {
    let Dims { g: _, r, d, band } = dims;
    let (t, total) = (band.t, band.total());
    let mut out = vec![0f32; dims.g * total * d];
    let dst = Out(out.as_mut_ptr());
    let items: Vec<(usize, usize, usize)> =
        (0..dims.g).flat_map(|g| band.key_blocks().map(move |(j0, j1)| (g, j0, j1))).collect();
    items.into_par_iter().for_each(|(g, j0, j1)| {
        let (i0, i1) = band.rows(j0, j1);
        let dst = dst;
        for h in 0..dims.heads() {
            let row0 = g * r + h * t + i0;
            // SAFETY: this item alone writes key rows j0..j1 of group g.
            unsafe {
                let pt = View(p.as_ptr().add(row0 * total + j0), 1, total);
                let av = View(a.as_ptr().add(row0 * d), d, 1);
                mm(j1 - j0, d, i1 - i0, dst.0.add((g * total + j0) * d), d, true, pt, av);
            }
        }
    });
    out
}

/// `dS = P ∘ (dP − Σ_row dP·P)` inside the band: softmax's backward.
fn band_softmax_bwd(p: &[f32], dp: &[f32], dims: Dims) -> Vec<f32> {
    let Dims { g: _, r, d: _, band } = dims;
    let (t, total) = (band.t, band.total());
    let mut ds = vec![0f32; dims.g * r * total];
    ds.par_chunks_mut(total).enumerate().for_each(|(row, out)| {
        let pos = band.start + (row % r) % t;
        let lo = band.first(pos);
        let (pr, gr) = (&p[row * total..][lo..=pos], &dp[row * total..][lo..=pos]);
        let dot: f32 = pr.iter().zip(gr).map(|(a, b)| a * b).sum();
        for ((o, pv), g) in out[lo..=pos].iter_mut().zip(pr).zip(gr) {
            *o = pv * (g - dot);
        }
    });
    ds
}

impl Dims {
    fn new(g: usize, r: usize, d: usize, band: Band) -> Result<Dims> {
        if band.t == 0 || r % band.t != 0 {
            candle_core::bail!("banded attention: {r} rows are not heads × {} positions", band.t);
        }
        Ok(Dims { g, r, d, band })
    }

    /// For an input laid out `[G, R, D]`.
    fn of(l: &Layout, band: Band) -> Result<Dims> {
        let (g, r, d) = l.shape().dims3()?;
        Dims::new(g, r, d, band)
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("banded attention: inputs must be contiguous"),
    }
}

/// Attention probabilities `softmax(q·kᵀ)` over each query's visible keys,
/// `[G, R, total]`, zero elsewhere. `q` must already be scaled.
pub fn probs(q: &Tensor, k: &Tensor, band: Band) -> Result<Tensor> {
    q.contiguous()?.apply_op2(&k.contiguous()?, Probs(band))
}

/// `p·v` for probabilities from [`probs`] (same band): `[G, R, D]`.
pub fn apply(p: &Tensor, v: &Tensor, band: Band) -> Result<Tensor> {
    p.contiguous()?.apply_op2(&v.contiguous()?, Apply(band))
}

/// `softmax(q·kᵀ)·v` over the band, without a backward pass (inference):
/// `[G, R, D]`, the products of [`apply`] on [`probs`] (up to the order
/// in which the GEMM adds, which depends on the strides it is given). Each
/// block of query rows keeps its scores in a buffer of its own thread, so a
/// prompt never holds (nor zero-fills) the `[G, R, total]` probabilities,
/// 9 MB per head at 1500 positions of which a sliding window uses a third.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, band: Band) -> Result<Tensor> {
    if band.t <= SMALL {
        return apply(&probs(q, k, band)?, v, band);
    }
    q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &Attend(band))
}

struct Attend(Band);

impl candle_core::CustomOp3 for Attend {
    fn name(&self) -> &'static str {
        "banded-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(l1, self.0)?;
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let Dims { g: _, r, d, band } = dims;
        let total = band.total();
        let mut out = vec![0f32; dims.g * r * d];
        let dst = Out(out.as_mut_ptr());
        thread_local! {
            static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        for_each_block(dims, |RowBlock { g, rows, row0, i0, c0, c1 }| {
            let dst = dst;
            let w = c1 - c0;
            SCORES.with_borrow_mut(|scores| {
                scores.resize(rows * w, 0.0);
                // SAFETY: this item alone writes rows row0..row0+rows of
                // `out`; reads stay inside q, k, v and the block's buffer.
                unsafe {
                    let a = View(q.as_ptr().add(row0 * d), d, 1);
                    let kt = View(k.as_ptr().add((g * total + c0) * d), 1, d);
                    mm(rows, w, d, scores.as_mut_ptr(), w, false, a, kt);
                    for (i, row) in scores.chunks_exact_mut(w).enumerate() {
                        let pos = band.start + i0 + i;
                        let lo = band.first(pos);
                        row[..lo - c0].fill(0.0);
                        row[pos + 1 - c0..].fill(0.0);
                        super::vmath::softmax_in_place(&mut row[lo - c0..=pos - c0]);
                    }
                    let p = View(scores.as_ptr(), w, 1);
                    let values = View(v.as_ptr().add((g * total + c0) * d), d, 1);
                    mm(rows, d, w, dst.0.add(row0 * d), d, false, p, values);
                }
            })
        });
        Ok((CpuStorage::F32(out), Shape::from((dims.g, r, d))))
    }
}

struct Probs(Band);

impl CustomOp2 for Probs {
    fn name(&self) -> &'static str {
        "banded-attention-probs"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(l1, self.0)?;
        let p = band_scores(slice(s1, l1)?, slice(s2, l2)?, dims, true);
        Ok((CpuStorage::F32(p), Shape::from((dims.g, dims.r, self.0.total()))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, p: &Tensor, dp: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = p.apply_op2_no_bwd(&dp.contiguous()?, &Kernel::SoftmaxBwd(self.0))?;
        let dq = ds.apply_op2_no_bwd(k, &Kernel::Times(self.0))?;
        let dk = ds.apply_op2_no_bwd(q, &Kernel::TransposeTimes(self.0))?;
        Ok((Some(dq), Some(dk)))
    }
}

struct Apply(Band);

impl CustomOp2 for Apply {
    fn name(&self) -> &'static str {
        "banded-attention-apply"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        Kernel::Times(self.0).cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(&self, p: &Tensor, v: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        let dp = dout.apply_op2_no_bwd(v, &Kernel::Scores(self.0))?;
        let dv = p.apply_op2_no_bwd(&dout, &Kernel::TransposeTimes(self.0))?;
        Ok((Some(dp), Some(dv)))
    }
}

/// The banded products as (non-differentiable) ops of the backward passes.
enum Kernel {
    /// `a·bᵀ` in the band, `[G, R, total]`.
    Scores(Band),
    /// `p·b`, `[G, R, D]`.
    Times(Band),
    /// `Σ_heads pᵀ·a`, `[G, total, D]`.
    TransposeTimes(Band),
    /// Softmax backward from `p` and `dp`, `[G, R, total]`.
    SoftmaxBwd(Band),
}

impl CustomOp2 for Kernel {
    fn name(&self) -> &'static str {
        match self {
            Kernel::Scores(_) => "banded-scores",
            Kernel::Times(_) => "banded-times",
            Kernel::TransposeTimes(_) => "banded-transpose-times",
            Kernel::SoftmaxBwd(_) => "banded-softmax-bwd",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, y) = (slice(s1, l1)?, slice(s2, l2)?);
        // Rows come from the first input, the head size from the second.
        let (g, r, _) = l1.shape().dims3()?;
        let d = *l2.dims().last().unwrap_or(&0);
        let (out, shape) = match *self {
            Kernel::Scores(band) => {
                let dims = Dims::of(l1, band)?;
                (band_scores(x, y, dims, false), Shape::from((g, r, band.total())))
            }
            Kernel::Times(band) => (band_times(x, y, Dims::new(g, r, d, band)?), Shape::from((g, r, d))),
            Kernel::TransposeTimes(band) => {
                (band_t_times(x, y, Dims::new(g, r, d, band)?), Shape::from((g, band.total(), d)))
            }
            Kernel::SoftmaxBwd(band) => (band_softmax_bwd(x, y, Dims::new(g, r, d, band)?), l1.shape().clone()),
        };
        Ok((CpuStorage::F32(out), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::{max_diff, rand};
    use candle_core::{Device, Var};

    /// A decoding step's probabilities and outputs are, bit for bit, those
    /// of one query row at a time (`dots`, `softmax_in_place`,
    /// `weighted_sum` over the row's visible keys), for odd and even head
    /// counts, several groups, global and sliding layers.
    #[test]
    fn a_decoding_step_sums_as_one_row_at_a_time() {
        for (groups, heads, d, start, window) in
            [(1, 4, 256, 1499, None), (2, 3, 64, 700, Some(512)), (1, 1, 32, 0, None)]
        {
            let band = Band { t: 1, start, window };
            let total = band.total();
            let q: Vec<f32> = (0..groups * heads * d).map(|i| ((i * 7919 % 101) as f32 - 50.0) * 0.01).collect();
            let k: Vec<f32> = (0..groups * total * d).map(|i| ((i * 104_729 % 211) as f32 - 105.0) * 0.013).collect();
            let dims = Dims::new(groups, heads, d, band).unwrap();
            let p = band_scores(&q, &k, dims, true);
            let out = band_times(&p, &k, dims);
            let lo = band.first(start);
            for g in 0..groups {
                for h in 0..heads {
                    let row = g * heads + h;
                    let keys = &k[(g * total + lo) * d..(g * total + total) * d];
                    let mut want = vec![0f32; total - lo];
                    crate::vmath::dots(&q[row * d..][..d], keys, &mut want);
                    crate::vmath::softmax_in_place(&mut want);
                    assert_eq!(&p[row * total + lo..(row + 1) * total], &want[..], "probs, row {row}");
                    assert!(p[row * total..row * total + lo].iter().all(|&v| v == 0.0));
                    let mut o = vec![0f32; d];
                    crate::vmath::weighted_sum(&want, keys, &mut o);
                    assert_eq!(&out[row * d..(row + 1) * d], &o[..], "outputs, row {row}");
                }
            }
        }
    }

    /// The reference: full scores, additive mask, softmax, `p·v`, composed
    /// from candle ops (each with its own backward).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, band: Band) -> Tensor {
        let (g, r, _) = q.dims3().unwrap();
        let (t, total) = (band.t, band.total());
        let mask = crate::composed::attention_mask(t, band.start, band.window, &Device::Cpu).unwrap();
        let s = q.matmul(&k.t().unwrap()).unwrap().reshape((g, r / t, t, total)).unwrap();
        let s = s.broadcast_add(&mask).unwrap().reshape((g, r, total)).unwrap();
        candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap().matmul(v).unwrap()
    }

    /// Outputs and the gradients of q, k, v agree with the reference, for
    /// global and windowed bands, with and without cached history, across
    /// block boundaries.
    #[test]
    fn matches_masked_full_attention() {
        for (t, start, window, heads) in
            [(150, 0, None, 2), (150, 0, Some(40), 2), (130, 0, Some(64), 1), (70, 45, Some(50), 3), (1, 99, None, 4)]
        {
            let band = Band { t, start, window };
            let total = start + t;
            let q = Var::from_tensor(&rand(&[2, heads * t, 16], 1)).unwrap();
            let k = Var::from_tensor(&rand(&[2, total, 16], 2)).unwrap();
            let v = Var::from_tensor(&rand(&[2, total, 16], 3)).unwrap();
            let ours = apply(&probs(q.as_tensor(), k.as_tensor(), band).unwrap(), v.as_tensor(), band).unwrap();
            let want = reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), band);
            assert!(max_diff(&ours, &want) < 1e-5, "{band:?}: output differs by {}", max_diff(&ours, &want));
            // Inference's fused pass: the same products (the GEMM may add
            // in another order for its other strides).
            let fused = attend(q.as_tensor(), k.as_tensor(), v.as_tensor(), band).unwrap();
            assert!(max_diff(&fused, &ours) < 1e-6, "{band:?}: attend differs by {}", max_diff(&fused, &ours));
            let proj = rand(&[2, heads * t, 16], 4);
            let go = (ours * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let gw = (want * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (go.get(x.as_tensor()).unwrap(), gw.get(x.as_tensor()).unwrap());
                assert!(max_diff(a, b) < 1e-4, "{band:?}: d{name} differs by {}", max_diff(a, b));
            }
        }
    }
}
