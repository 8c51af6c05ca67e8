//! A LoRA linear layer as one CPU op, with a hand-written backward pass.
//!
//! Composed from candle's primitives, `x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ` is six
//! ops whose outputs all stay alive until the backward pass (the masked
//! input, `x·Aᵀ`, the update, the scaled update, the base output, the sum):
//! at 2048 tokens that is ~40 % of Gemma 3's activation memory, and each op
//! is one more pass over memory, forward and backward. Here the update is
//! accumulated into the base output by the GEMM itself, and the op keeps
//! only what backward needs: `x` (shared with the other layers that read
//! it) and the dropout mask. Backward recomputes the masked input and the
//! rank-`r` product `u = (x⊙m)·Aᵀ`, which costs `r/out` of the forward.
//!
//! With `g = ∂L/∂y`:
//!
//! ```text
//! ∂B = s·gᵀ·u      ∂A = (s·g·B)ᵀ·(x⊙m)      ∂x = g·W + ((s·g·B)·A)⊙m
//! ```
//!
//! `LoraLinear` (pipeline-model) uses it for contiguous f32 CPU tensors and
//! falls back to the composed ops elsewhere; tests compare the two.

use std::ops::Deref;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use crate::keep::Keep;
use rayon::prelude::*;

/// `y = x·Wᵀ + bias + scale·((x⊙mask)·Aᵀ)·Bᵀ` for a 2-d `x`, differentiable in
/// `x`, `A` and `B` (`W`, the bias and the mask are constants). `W` is f32
/// or bf16 (mixed precision, [`crate::bf16`]); everything else is f32.
pub fn lora_linear(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    mask: Option<Keep>,
    scale: f64,
) -> Result<Tensor> {
    let op =
        LoraOp { w: w.contiguous()?, bias: bias.map(|b| b.to_vec1::<f32>()).transpose()?, mask, scale: scale as f32 };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// `scale·(x·Aᵀ)·Bᵀ` for inference on a few rows (decoding steps), each row
/// on its own with the same vector dot products: a row's update does not
/// depend on how many rows share the pass (a GEMM's does: it picks kernels
/// by shape). `x: [n, in]`, `a: [r, in]`, `b: [out, r]` → `[n, out]`.
pub fn lora_update_rows(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let (n, inp) = x.dims2()?;
    let (out, r) = b.dims2()?;
    let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
    let (gx, ga, gb) = (x.storage_and_layout(), a.storage_and_layout(), b.storage_and_layout());
    let (x, a, b) = (data(&gx)?, data(&ga)?, data(&gb)?);
    let mut y = vec![0f32; n * out];
    let mut u = vec![0f32; r];
    for (xr, yr) in x.chunks_exact(inp).zip(y.chunks_exact_mut(out)) {
        super::vmath::dots(xr, a, &mut u);
        super::vmath::dots(&u, b, yr);
        yr.iter_mut().for_each(|v| *v *= scale as f32);
    }
    Tensor::from_vec(y, (n, out), &candle_core::Device::Cpu)
}

struct LoraOp {
    w: Tensor,
    bias: Option<Vec<f32>>,
    mask: Option<Keep>,
    scale: f32,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("lora op: input must be contiguous"),
    }
}

/// The data of a contiguous f32 CPU tensor, borrowed: `t.storage_and_layout()`.
fn data<'a, G: Deref<Target = Storage>>((s, l): &'a (G, &Layout)) -> Result<&'a [f32]> {
    match &**s {
        Storage::Cpu(s) => slice(s, l),
        _ => candle_core::bail!("lora op: tensors must be on the CPU"),
    }
}

/// The frozen weight `W: [n, k]`, f32 or bf16 ([`crate::bf16`]).
enum Frozen<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

/// The data of a contiguous frozen weight on the CPU.
fn frozen<'a, G: Deref<Target = Storage>>((s, l): &'a (G, &Layout)) -> Result<Frozen<'a>> {
    match &**s {
        Storage::Cpu(CpuStorage::BF16(w)) => Ok(Frozen::Bf16(crate::bf16::contiguous(w, l)?)),
        Storage::Cpu(s) => Ok(Frozen::F32(slice(s, l)?)),
        _ => candle_core::bail!("lora op: tensors must be on the CPU"),
    }
}

impl Frozen<'_> {
    /// `y (m×n) = x·Wᵀ` for `x: m×k`.
    fn times_transposed(&self, m: usize, n: usize, k: usize, x: &[f32], y: &mut [f32]) {
        match *self {
            Frozen::F32(w) => gemm(m, n, k, y, false, mat(x, k), mat(w, k).t(), 1.0),
            Frozen::Bf16(w) => crate::bf16::times_transposed(m, n, k, x, w, y),
        }
    }

    /// `dx (m×k) = g·W` for `g: m×n`.
    fn times(&self, m: usize, k: usize, n: usize, g: &[f32], dx: &mut [f32]) {
        match *self {
            Frozen::F32(w) => gemm(m, k, n, dx, false, mat(g, n), mat(w, k), 1.0),
            Frozen::Bf16(w) => {
                use crate::bf16::Operand;
                crate::bf16::gemm(m, k, n, dx, k, false, Operand::rows(g, n), Operand::rows(w, k), 1.0)
            }
        }
    }
}

/// A row-major matrix operand: `data` holds `rows × cols`, read transposed
/// when `t` is set.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    cols: usize,
    t: bool,
}

fn mat(data: &[f32], cols: usize) -> Mat<'_> {
    Mat { data, cols, t: false }
}

impl<'a> Mat<'a> {
    fn t(self) -> Mat<'a> {
        Mat { t: !self.t, ..self }
    }
    /// (row stride, column stride) of the operand as read.
    fn strides(&self) -> (isize, isize) {
        if self.t { (1, self.cols as isize) } else { (self.cols as isize, 1) }
    }
}

/// `dst (m×n) = [dst +] beta·a·b` with `a: m×k`, `b: k×n` (as read), on
/// rayon's pool when the product is large enough to split.
fn gemm(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, a: Mat, b: Mat, beta: f32) {
    assert!(dst.len() >= m * n && a.data.len() >= m * k && b.data.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let ((a_rs, a_cs), (b_rs, b_cs)) = (a.strides(), b.strides());
    // SAFETY: the extents checked above cover every element the strides
    // reach; `dst` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `x⊙mask`, or `x` itself without a mask.
fn masked<'a>(x: &'a [f32], mask: Option<&Keep>, buf: &'a mut Vec<f32>) -> &'a [f32] {
    match mask {
        None => x,
        Some(m) => {
            buf.resize(x.len(), 0.0);
            m.mul_into(x, buf);
            buf
        }
    }
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (slice(sx, lx)?, slice(sa, la)?, slice(sb, lb)?);
        let (m, k) = lx.shape().dims2()?;
        let (r, n) = (la.dims()[0], lb.dims()[0]);
        let (w, mask) = (self.w.storage_and_layout(), self.mask.as_ref());
        let w = frozen(&w)?;
        let mut y = vec![0f32; m * n];
        w.times_transposed(m, n, k, x, &mut y);
        if let Some(bias) = &self.bias {
            y.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(bias).for_each(|(y, b)| *y += b));
        }
        let mut buf = Vec::new();
        let xm = masked(x, mask, &mut buf);
        let mut u = vec![0f32; m * r];
        gemm(m, r, k, &mut u, false, mat(xm, k), mat(a, k).t(), 1.0);
        gemm(m, n, r, &mut y, true, mat(&u, r), mat(b, r).t(), self.scale);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = x.dims2()?;
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let g = g.contiguous()?;
        let guards = [x, a, b, &g].map(|t| t.storage_and_layout());
        let [xd, ad, bd, gd] = [0, 1, 2, 3].map(|i| data(&guards[i]));
        let (xd, ad, bd, gd) = (xd?, ad?, bd?, gd?);
        let w = self.w.storage_and_layout();
        let w = frozen(&w)?;
        let mask = self.mask.as_ref();
        let mut buf = Vec::new();
        let xm = masked(xd, mask, &mut buf);
        let mut u = vec![0f32; m * r];
        gemm(m, r, k, &mut u, false, mat(xm, k), mat(ad, k).t(), 1.0);
        // du = s·g·B, ∂B = s·gᵀ·u, ∂A = duᵀ·(x⊙m).
        let mut du = vec![0f32; m * r];
        gemm(m, r, n, &mut du, false, mat(gd, n), mat(bd, r), self.scale);
        let mut db = vec![0f32; n * r];
        gemm(n, r, m, &mut db, false, mat(gd, n).t(), mat(&u, r), self.scale);
        let mut da = vec![0f32; r * k];
        gemm(r, k, m, &mut da, false, mat(&du, r).t(), mat(xm, k), 1.0);
        // ∂x = g·W + (du·A)⊙m.
        let mut dx = vec![0f32; m * k];
        w.times(m, k, n, gd, &mut dx);
        match mask {
            None => gemm(m, k, r, &mut dx, true, mat(&du, r), mat(ad, k), 1.0),
            Some(mask) => {
                let mut t = buf;
                t.resize(m * k, 0.0);
                gemm(m, k, r, &mut t, false, mat(&du, r), mat(ad, k), 1.0);
                mask.fma_into(&t, &mut dx);
            }
        }
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (m, k), dev)?),
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (n, r), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::{max_diff, rand};
    use candle_core::{Device, Var};

    /// Output and the gradients of `x`, `A` and `B` (under a random
    /// projection of the output) equal those of the composed ops, with and
    /// without a dropout mask and a bias, for a row count that is not a
    /// multiple of a mask word.
    #[test]
    fn matches_the_composed_lora_linear() {
        let (m, k, r, n, s) = (70, 33, 4, 9, 2.0);
        let w = rand(&[n, k], 3);
        let bias = rand(&[n], 4);
        let proj = rand(&[m, n], 5);
        let mut draws = (0u32..).map(|i| i.wrapping_mul(2_654_435_761) % 10 >= 3);
        let mask = Keep::from_fn(m * k, 0.3, || draws.next().unwrap());
        for (mask, bias) in [(None, None), (Some(mask.clone()), Some(&bias)), (Some(mask), None)] {
            let vars = [rand(&[m, k], 1), rand(&[r, k], 6), rand(&[n, r], 7)].map(|t| Var::from_tensor(&t).unwrap());
            let [x, a, b] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
            let fused = lora_linear(&x, &a, &b, &w, bias, mask.clone(), s).unwrap();
            let xm = match &mask {
                Some(mask) => (&x * mask.to_tensor(x.shape(), &Device::Cpu).unwrap()).unwrap(),
                None => x.clone(),
            };
            let mut composed = x.matmul(&w.t().unwrap()).unwrap();
            if let Some(bias) = bias {
                composed = composed.broadcast_add(bias).unwrap();
            }
            let delta = xm.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap();
            let composed = (composed + (delta * s).unwrap()).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-4, "forward differs by {}", max_diff(&fused, &composed));
            let gf = (fused * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = (composed * &proj).unwrap().sum_all().unwrap().backward().unwrap();
            for (var, name) in vars.iter().zip(["x", "A", "B"]) {
                let (f, c) = (gf.get(var).unwrap(), gc.get(var).unwrap());
                assert!(max_diff(f, c) < 1e-3, "∂{name} differs by {}", max_diff(f, c));
            }
        }
    }

    /// With a bf16 `W` (mixed precision) the output and gradients equal the
    /// composed ops on the widened weight, to bf16 rounding of the input.
    #[test]
    fn a_bf16_weight_matches_the_composed_ops_on_its_f32_widening() {
        let (m, k, r, n, s) = (70, 64, 4, 40, 2.0);
        let w16 = rand(&[n, k], 3).to_dtype(candle_core::DType::BF16).unwrap();
        let w = w16.to_dtype(candle_core::DType::F32).unwrap();
        let proj = rand(&[m, n], 5);
        let vars = [rand(&[m, k], 1), rand(&[r, k], 6), rand(&[n, r], 7)].map(|t| Var::from_tensor(&t).unwrap());
        let [x, a, b] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
        let fused = lora_linear(&x, &a, &b, &w16, None, None, s).unwrap();
        let delta = x.matmul(&a.t().unwrap()).unwrap().matmul(&b.t().unwrap()).unwrap();
        let composed = (x.matmul(&w.t().unwrap()).unwrap() + (delta * s).unwrap()).unwrap();
        assert!(max_diff(&fused, &composed) < 0.05, "forward differs by {}", max_diff(&fused, &composed));
        let gf = (fused * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composed * &proj).unwrap().sum_all().unwrap().backward().unwrap();
        for (var, name) in vars.iter().zip(["x", "A", "B"]) {
            let (f, c) = (gf.get(var).unwrap(), gc.get(var).unwrap());
            // bf16 keeps 8 bits: within 1 % of the gradient's scale.
            let scale = c.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(max_diff(f, c) < 0.01 * scale, "∂{name} differs by {} (scale {scale})", max_diff(f, c));
        }
    }

    #[test]
    fn a_keep_mask_scales_kept_elements_and_zeroes_the_others() {
        let mut i = 0;
        let mask = Keep::from_fn(130, 0.5, || {
            i += 1;
            i % 3 == 0
        });
        let x: Vec<f32> = (0..130).map(|i| i as f32).collect();
        let mut out = vec![0.0; 130];
        mask.mul_into(&x, &mut out);
        let t: Vec<f32> = mask.to_tensor(&Shape::from(130), &Device::Cpu).unwrap().to_vec1().unwrap();
        for j in 0..130 {
            let expected = if (j + 1) % 3 == 0 { 2.0 * x[j] } else { 0.0 };
            assert_eq!((out[j], t[j] * x[j]), (expected, expected), "element {j}");
        }
        mask.fma_into(&x, &mut out);
        assert_eq!(out[2], 8.0);
    }
}
