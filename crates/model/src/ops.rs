//! Differentiable building blocks shared by the architectures.
//!
//! candle's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward
//! pass (gradients silently stop there). On the CPU these use our fused
//! kernels with hand-written backward (`pipeline_kernels::fused`); elsewhere, the
//! versions in [`composed`], built from candle ops that do have a backward.
//! Everything is f32.

use candle_core::{DType, Device, Result, Tensor};
pub use pipeline_kernels::composed::{self, attention_mask};

fn fused(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * w`.
/// Gemma stores `w - 1` and multiplies by `1 + w`: pass `offset = 1.0`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, offset: f64) -> Result<Tensor> {
    let w = if offset != 0.0 { (weight + offset)? } else { weight.clone() };
    if fused(x) { pipeline_kernels::fused::rms_norm(x, &w, eps) } else { composed::rms_norm(x, &w, eps) }
}

/// GELU, tanh approximation.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused(x) { pipeline_kernels::fused::gelu_tanh(x) } else { x.gelu() }
}

/// Cos/sin tables for rotary embeddings (NEOX / HF "rotate_half" layout),
/// `[positions, head_dim]`.
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(base: f64, head_dim: usize, positions: usize, scale: f64, device: &Device) -> Result<Rope> {
        let (cos, sin) = composed::rope_tables(base, head_dim, positions, scale, device)?;
        Ok(Rope { cos, sin })
    }

    /// Tables for the given inverse frequencies (`head_dim / 2` of them).
    pub fn from_inv_freq(inv_freq: &[f32], positions: usize, device: &Device) -> Result<Rope> {
        let (cos, sin) = composed::rope_tables_from(inv_freq, positions, device)?;
        Ok(Rope { cos, sin })
    }

    /// Rotates `x: [heads, T, head_dim]` for positions `0..T` (offset `start`).
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        if fused(x) { pipeline_kernels::fused::rope(x, &cos, &sin) } else { composed::rope(x, &cos, &sin) }
    }
}

/// Attention of `t` new queries over cached keys: `q: [G, group·t, D]`
/// (scaled; rows are heads-of-a-group × t, position = row mod t) at
/// positions `start..start+t`, `k`, `v: [G, start+t, D]`. Returns
/// `[G, group·t, D]`; `window` adds a sliding-window limit. Without history
/// (`start = 0`) this is the training path. On the CPU only the visible band
/// of scores is computed ([`pipeline_kernels::attention`]); elsewhere keys beyond the
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
        let band = pipeline_kernels::attention::Band { t, start, window };
        if ![q, k, v].iter().any(|x| x.track_op()) {
            // Inference: no probabilities kept for a backward pass.
            return pipeline_kernels::attention::attend(q, k, v, band);
        }
        return pipeline_kernels::attention::apply(&pipeline_kernels::attention::probs(q, k, band)?, v, band);
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
    if fused(x) { pipeline_kernels::fused::softmax(x) } else { composed::softmax(x) }
}

/// Mean cross-entropy of the logits `h·Wᵀ` (an LM head) against `targets`.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    if fused(h) {
        pipeline_kernels::fused::linear_cross_entropy(h, w, targets)
    } else {
        let t = Tensor::new(targets, h.device())?;
        composed::cross_entropy(&crate::lora::frozen_linear(h, w)?, &t)
    }
}

/// Mean cross-entropy of `logits: [N, V]` against `targets: [N]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused(logits) {
        pipeline_kernels::fused::cross_entropy(logits, &targets.to_vec1::<u32>()?)
    } else {
        composed::cross_entropy(logits, targets)
    }
}
