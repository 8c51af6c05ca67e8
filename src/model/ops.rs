//! Differentiable building blocks shared by the architectures.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward
//! pass (gradients silently stop there). On the CPU these use our fused
//! kernels with hand-written backward ([`super::fused`]); elsewhere, the
//! versions in [`composed`], built from candle ops that do have a backward.
//! Everything is f32.

use candle_core::{DType, Device, Result, Tensor};

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * w`.
/// Gemma stores `w - 1` and multiplies by `1 + w`: pass `offset = 1.0`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f64) -> Result<Tensor> {
    let w = if offset != 0.0 { (weight + offset)? } else { weight.clone() };
    if fused(x) { super::fused::rms_norm(x, &w, eps) } else { composed::rms_norm(x, &w, eps) }
}

/// GELU, tanh approximation.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused(x) { super::fused::gelu_tanh(x) } else { x.gelu() }
}

/// The same operations composed from candle primitives (each with a
/// backward pass): the fallback off the CPU, and the reference in tests.
pub mod composed {
    use candle_core::{D, Result, Tensor};

    pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
    }

    pub fn softmax(x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax(x, D::Minus1)
    }

    pub fn attention_probs(q: &Tensor, k: &Tensor, window: Option<usize>) -> Result<Tensor> {
        let (g, r, _) = q.dims3()?;
        let t = k.dim(1)?;
        let mask = super::attention_mask(t, 0, window, q.device())?;
        let scores = q.matmul(&k.t()?)?.reshape((g, r / t, t, t))?.broadcast_add(&mask)?;
        softmax(&scores)?.reshape((g, r, t))
    }

    pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        log_probs.gather(&targets.unsqueeze(1)?, 1)?.neg()?.mean_all()
    }

    /// `x·cos + rotate_half(x)·sin` for `x: [heads, T, D]`, tables `[T, D]`.
    pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
    }
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
        let (_, t, _) = x.dims3()?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        if fused(x) { super::fused::rope(x, &cos, &sin) } else { composed::rope(x, &cos, &sin) }
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

/// Attention of `t` new queries over cached keys: `q: [G, group·t, D]`
/// (scaled; rows are heads-of-a-group × t, position = row mod t) at
/// positions `start..start+t`, `k`, `v: [G, start+t, D]`. Returns
/// `[G, group·t, D]`; `window` adds a sliding-window limit. Without history
/// (`start = 0`) this is the training path. On the CPU only the visible band
/// of scores is computed ([`super::attention`]); elsewhere keys beyond the
/// sliding window are dropped before the product and a mask does the rest.
/// `softcap` caps the scores as `cap·tanh(s/cap)` (Gemma 2-style configs).
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    start: usize,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    if fused(q) && softcap.is_none() {
        let band = super::attention::Band { t, start, window };
        return super::attention::apply(&super::attention::probs(q, k, band)?, v, band);
    }
    if start == 0 && softcap.is_none() {
        return composed::attention_probs(q, k, window)?.matmul(v);
    }
    let (g, r, _) = q.dims3()?;
    let total = k.dim(1)?;
    // The earliest new query (at `start`) sees keys after `start - window`.
    let first = window.map_or(0, |w| (start + 1).saturating_sub(w));
    let (k, v) = (k.narrow(1, first, total - first)?, v.narrow(1, first, total - first)?);
    let seen = total - first;
    let mut scores = q.matmul(&k.t()?)?; // [G, group·t, seen]
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    if t > 1 {
        let mask = attention_mask(t, start, window, q.device())?.narrow(1, first, seen)?;
        scores = scores.reshape((g, r / t, t, seen))?.broadcast_add(&mask)?.reshape((g, r, seen))?;
    }
    softmax(&scores)?.matmul(&v)
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if fused(x) { super::fused::softmax(x) } else { composed::softmax(x) }
}

/// Mean cross-entropy of the logits `h·Wᵀ` (an LM head) against `targets`.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    if fused(h) {
        super::fused::linear_cross_entropy(h, w, targets)
    } else {
        let t = Tensor::new(targets, h.device())?;
        composed::cross_entropy(&super::lora::frozen_linear(h, w)?, &t)
    }
}

/// Mean cross-entropy of `logits: [N, V]` against `targets: [N]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused(logits) {
        super::fused::cross_entropy(logits, &targets.to_vec1::<u32>()?)
    } else {
        composed::cross_entropy(logits, targets)
    }
}
