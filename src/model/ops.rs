//! Differentiable building blocks shared by the architectures.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward
//! pass (gradients silently stop there), so these are composed from ops that
//! do. Everything is f32.

use candle_core::{D, DType, Device, Result, Tensor};

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * w`.
/// Gemma stores `w - 1` and multiplies by `1 + w`: pass `offset = 1.0`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    let w = if offset != 0.0 { (weight + offset)? } else { weight.clone() };
    normed.broadcast_mul(&w)
}

/// Cos/sin tables for rotary embeddings (NEOX / HF "rotate_half" layout),
/// `[positions, head_dim]`.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(base: f64, head_dim: usize, positions: usize, scale: f64, device: &Device) -> Result<Rope> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| (1.0 / base.powf(2.0 * i as f64 / head_dim as f64) / scale) as f32).collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let t = Tensor::arange(0u32, positions as u32, device)?.to_dtype(DType::F32)?.reshape((positions, 1))?;
        let freqs = t.matmul(&inv_freq)?;
        let freqs = Tensor::cat(&[&freqs, &freqs], 1)?;
        Ok(Rope { cos: freqs.cos()?, sin: freqs.sin()? })
    }

    /// Rotates `x: [heads, T, head_dim]` for positions `0..T` (offset `start`).
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, t, d) = x.dims3()?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

/// Additive attention mask `[T, T_total]` for queries at positions
/// `start..start+T` over keys `0..start+T`: 0 where visible, -inf where not
/// (future tokens, and beyond `window` tokens back when given).
pub fn attention_mask(t: usize, start: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let total = start + t;
    let mut data = vec![0f32; t * total];
    for i in 0..t {
        let qpos = start + i;
        for j in 0..total {
            let future = j > qpos;
            let too_far = window.is_some_and(|w| qpos - j.min(qpos) >= w);
            if future || too_far {
                data[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_vec(data, (t, total), device)
}

/// Softmax over the last dimension, composed (differentiable).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Mean cross-entropy of `logits: [N, V]` against `targets: [N]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}
