//! The operations of [`crate::fused`] composed from candle primitives (each
//! with a backward pass): the fallback off the CPU, and the reference every
//! fused kernel is tested against.

use candle_core::{D, Device, Result, Tensor};

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
    let mask = attention_mask(t, 0, window, q.device())?;
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

/// Cos/sin tables `[positions, head_dim]` for rotary embeddings (NEOX / HF
/// "rotate_half" layout), frequencies `1/base^(2i/d)` divided by `scale`.
pub fn rope_tables(
    base: f64,
    head_dim: usize,
    positions: usize,
    scale: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> =
        (0..half).map(|i| (1.0 / base.powf(2.0 * i as f64 / head_dim as f64) / scale) as f32).collect();
    rope_tables_from(&inv_freq, positions, device)
}

/// [`rope_tables`] for given inverse frequencies (`head_dim / 2` of them).
pub fn rope_tables_from(inv_freq: &[f32], positions: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq.to_vec(), (1, half), device)?;
    let t =
        Tensor::arange(0u32, positions as u32, device)?.to_dtype(candle_core::DType::F32)?.reshape((positions, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    let freqs = Tensor::cat(&[&freqs, &freqs], 1)?;
    Ok((freqs.cos()?, freqs.sin()?))
}
