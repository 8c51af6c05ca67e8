//! Fused CPU kernels with hand-written backward passes.
//!
//! Composed from candle's primitives, RMSNorm, softmax and RoPE take 5–7
//! passes over memory forward and more backward, and cost as much as the
//! matmuls (see `../shared/reference/candle-notes.md`). Each op here makes
//! one pass forward and one backward, row-parallel with rayon. They run on
//! contiguous f32 CPU tensors; `ops` of pipeline-model falls back to the composed
//! versions elsewhere, and tests compare the two.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The contiguous f32 data of a storage/layout pair.
fn data<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("fused op: input must be contiguous"),
    }
}

fn last_dim(l: &Layout) -> usize {
    *l.dims().last().unwrap_or(&1)
}

// ---------------------------------------------------------------- RMSNorm

/// `y = x / sqrt(mean(x²) + eps) · w` over the last dimension (`w` frozen,
/// any Gemma `1 + w` offset already applied).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let w: Vec<f32> = w.to_vec1()?;
    x.contiguous()?.apply_op1(RmsNorm { w, eps: eps as f32 })
}

struct RmsNorm {
    w: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let d = last_dim(l);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
            let r = self.inv_rms(xr);
            for ((yv, xv), wv) in yr.iter_mut().zip(xr).zip(&self.w) {
                *yv = xv * r * wv;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormBwd { w: self.w.clone(), eps: self.eps };
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &op)?))
    }
}

/// `dx = r·(w·dy − x̂·mean(w·dy·x̂))`, `x̂ = x·r`, `r = 1/rms(x)`.
struct RmsNormBwd {
    w: Vec<f32>,
    eps: f32,
}

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (data(s1, l1)?, data(s2, l2)?);
        let d = last_dim(l1);
        let norm = RmsNorm { w: vec![], eps: self.eps };
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d).zip(x.par_chunks(d).zip(dy.par_chunks(d))).for_each(|(dxr, (xr, dyr))| {
            let r = norm.inv_rms(xr);
            let dot = xr.iter().zip(dyr).zip(&self.w).map(|((xv, g), wv)| wv * g * xv * r).sum::<f32>() / d as f32;
            for (((o, xv), g), wv) in dxr.iter_mut().zip(xr).zip(dyr).zip(&self.w) {
                *o = r * (wv * g - xv * r * dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let d = last_dim(l);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
            yr.copy_from_slice(xr);
            super::vmath::softmax_in_place(yr);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwd)?))
    }
}

/// `dx = y·(dy − Σ dy·y)`.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (data(s1, l1)?, data(s2, l2)?);
        let d = last_dim(l1);
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(d).zip(y.par_chunks(d).zip(dy.par_chunks(d))).for_each(|(o, (yr, gr))| {
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((ov, yv), g) in o.iter_mut().zip(yr).zip(gr) {
                *ov = yv * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- RoPE

/// Rotary embedding of `x: [heads, T, D]` (HF rotate-half layout) with
/// `cos`/`sin: [T, D]` for these positions.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos: Vec<f32> = cos.flatten_all()?.to_vec1()?;
    let sin: Vec<f32> = sin.flatten_all()?.to_vec1()?;
    x.contiguous()?.apply_op1(Rope { cos, sin, inverse: false })
}

struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Apply the transpose (the backward): rotate by −θ.
    inverse: bool,
}

impl Rope {
    fn run(&self, x: &[f32], d: usize) -> Vec<f32> {
        let t = self.cos.len() / d;
        let half = d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().for_each(|(row, (yr, xr))| {
            let pos = row % t;
            let (c, s) = (&self.cos[pos * d..(pos + 1) * d], &self.sin[pos * d..(pos + 1) * d]);
            for i in 0..half {
                let (a, b) = (xr[i], xr[i + half]);
                yr[i] = a * c[i] - sign * b * s[i];
                yr[i + half] = b * c[i + half] + sign * a * s[i + half];
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.run(data(s, l)?, last_dim(l))), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // The rotation is orthogonal per pair (cos and sin of the pair's two
        // halves are equal), so its transpose is the rotation by −θ.
        let inv = Rope { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
        Ok(Some(dy.contiguous()?.apply_op1(inv)?))
    }
}

// ---------------------------------------------------------------- cross-entropy

/// Mean cross-entropy of `logits: [N, V]` against `targets` (one class per
/// row). One pass for the log-sum-exp, one backward pass for
/// `(softmax − onehot)/N`, instead of materialising `log_softmax`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy { targets: targets.to_vec() })
}

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let v = last_dim(l);
        let n = x.len() / v;
        let losses: Vec<f32> = x
            .par_chunks(v)
            .zip(&self.targets)
            .map(|(row, &t)| super::vmath::logsumexp(row) - row[t as usize])
            .collect();
        let mean = losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_scalar::<f32>()?;
        let op = CrossEntropyBwd { targets: self.targets.clone(), scale: g };
        Ok(Some(logits.apply_op1_no_bwd(&op)?))
    }
}

struct CrossEntropyBwd {
    targets: Vec<u32>,
    /// Upstream gradient of the mean loss.
    scale: f32,
}

impl CustomOp1 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let v = last_dim(l);
        let k = self.scale / (x.len() / v) as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v).zip(x.par_chunks(v).zip(&self.targets)).for_each(|(o, (row, &t))| {
            let sum = super::vmath::exp_shifted(row, super::vmath::max(row), o);
            let inv = k / sum;
            o.iter_mut().for_each(|p| *p *= inv);
            o[t as usize] -= k;
        });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

// ---------------------------------------------------------------- LM head + loss

/// Rows of logits computed at once by [`linear_cross_entropy`] while
/// training (a chunk of logits and its gradient, 64 MB each for a 262k
/// vocabulary, are alive at the step's memory peak).
const HEAD_CHUNK: usize = 64;

/// The same without gradients (eval loss). Each chunk's GEMM repacks the
/// whole `[V, H]` head weight, so larger chunks amortize that: for 200
/// rows at Gemma 3's 262k × 640, 256-row chunks take 25 % less time than
/// 64-row ones.
const HEAD_CHUNK_NO_GRAD: usize = 256;

/// Mean cross-entropy of `h·Wᵀ` (`h: [N, H]`, `W: [V, H]` frozen, f32 or
/// bf16) against `targets`, without ever holding the `[N, V]` logits. The logits are
/// formed chunk by chunk; since the loss is the end of the graph, each
/// chunk's gradient `(softmax − onehot)·W / N` is formed right away too (the
/// trick of Liger's fused linear cross-entropy), and backward only scales
/// the stored `[N, H]` gradient. Same two matmuls as the unfused head, one
/// chunk of logits in memory instead of all of them.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let n = h.dim(0)?;
    let track = h.track_op();
    let hd = h.detach();
    let mut total = 0f64;
    let mut grads = Vec::new();
    let chunk = if track { HEAD_CHUNK } else { HEAD_CHUNK_NO_GRAD };
    for start in (0..n).step_by(chunk) {
        let c = chunk.min(n - start);
        let t = &targets[start..start + c];
        let z = crate::bf16::linear(&hd.narrow(0, start, c)?, w)?;
        total += cross_entropy(&z, t)?.to_scalar::<f32>()? as f64 * c as f64;
        if track {
            // CrossEntropyBwd divides by its own row count: scale to 1/N overall.
            let op = CrossEntropyBwd { targets: t.to_vec(), scale: c as f32 / n as f32 };
            grads.push(crate::bf16::matmul(&z.apply_op1_no_bwd(&op)?, w)?);
        }
    }
    let loss = (total / n as f64) as f32;
    if !track {
        return Tensor::new(loss, h.device());
    }
    let grad = Tensor::cat(&grads, 0)?;
    h.apply_op1(LinearCrossEntropy { grad, loss })
}

struct LinearCrossEntropy {
    /// d loss / d h, computed in the forward pass.
    grad: Tensor,
    loss: f32,
}

impl CustomOp1 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![self.loss]), Shape::from(())))
    }

    fn bwd(&self, _h: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad.broadcast_mul(g)?))
    }
}

// ---------------------------------------------------------------- GELU

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluTanh)
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = data(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(yr, xr)| super::vmath::gelu_tanh(xr, yr));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluTanhBwd)?))
    }
}

struct GeluTanhBwd;

impl CustomOp2 for GeluTanhBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (data(s1, l1)?, data(s2, l2)?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(4096)
            .zip(x.par_chunks(4096).zip(dy.par_chunks(4096)))
            .for_each(|(o, (xr, gr))| super::vmath::gelu_tanh_bwd(xr, gr, o));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::composed;
    use candle_core::{Device, Tensor, Var};

    /// Deterministic values in [-2, 2).
    pub(crate) fn rand(shape: &[usize], seed: u32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> =
            (0..n as u32).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 500.0 - 2.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// Forward values and input gradients (under a random projection) agree.
    fn check(name: &str, shape: &[usize], fused: impl Fn(&Tensor) -> Tensor, reference: impl Fn(&Tensor) -> Tensor) {
        let x = Var::from_tensor(&rand(shape, 1)).unwrap();
        let (yf, yr) = (fused(x.as_tensor()), reference(x.as_tensor()));
        let r = (rand(&yf.dims().iter().copied().chain([1]).collect::<Vec<_>>(), 2).squeeze(yf.rank()).unwrap() + 2.5)
            .unwrap();
        assert!(max_diff(&yf, &yr) < 1e-5, "{name} forward differs by {}", max_diff(&yf, &yr));
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gr) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
        assert!(max_diff(gf, gr) < 1e-4, "{name} backward differs by {}", max_diff(gf, gr));
    }

    #[test]
    fn fused_ops_match_composed_ops() {
        let w = rand(&[48], 3);
        check(
            "rms_norm",
            &[5, 48],
            |x| super::rms_norm(x, &w, 1e-6).unwrap(),
            |x| composed::rms_norm(x, &w, 1e-6).unwrap(),
        );
        check("softmax", &[3, 7, 11], |x| super::softmax(x).unwrap(), |x| composed::softmax(x).unwrap());
        check("gelu", &[9, 33], |x| super::gelu_tanh(x).unwrap(), |x| x.gelu().unwrap());
        let targets = [3u32, 0, 10, 7, 1];
        let t = Tensor::new(&targets, &Device::Cpu).unwrap();
        let head = rand(&[23, 11], 9);
        let many: Vec<u32> = (0..150).map(|i| (i * 7 % 23) as u32).collect();
        let many_t = Tensor::new(many.as_slice(), &Device::Cpu).unwrap();
        check(
            "linear_cross_entropy",
            &[150, 11],
            |h| super::linear_cross_entropy(h, &head, &many).unwrap(),
            |h| crate::composed::cross_entropy(&h.matmul(&head.t().unwrap()).unwrap(), &many_t).unwrap(),
        );
        check(
            "cross_entropy",
            &[5, 11],
            |x| super::cross_entropy(x, &targets).unwrap(),
            |x| crate::composed::cross_entropy(x, &t).unwrap(),
        );
        let (cos, sin) = composed::rope_tables(10_000.0, 16, 12, 1.0, &Device::Cpu).unwrap();
        check(
            "rope",
            &[3, 12, 16],
            |x| super::rope(x, &cos, &sin).unwrap(),
            |x| composed::rope(x, &cos, &sin).unwrap(),
        );
    }
}
