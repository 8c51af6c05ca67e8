//! One-bit dropout masks: which elements of a LoRA input dropout keeps.

use candle_core::{Result, Shape, Tensor};

/// A dropout mask, one bit per element: a kept element is scaled by
/// `1/(1-p)`, a dropped one zeroed. (An f32 mask would be 32× larger, and
/// training keeps one per LoRA layer until the backward pass.)
#[derive(Clone, Debug)]
pub struct Keep {
    bits: Vec<u64>,
    len: usize,
    scale: f32,
}

/// Elements per parallel task of [`Keep`]'s passes (a multiple of 64).
const KEEP_CHUNK: usize = 1 << 14;

impl Keep {
    /// A mask whose element `i` is kept when the `i`-th call of `kept` says so.
    pub fn from_fn(len: usize, p: f32, mut kept: impl FnMut() -> bool) -> Keep {
        let mut bits = vec![0u64; len.div_ceil(64)];
        for i in 0..len {
            bits[i / 64] |= u64::from(kept()) << (i % 64);
        }
        Keep { bits, len, scale: 1.0 / (1.0 - p) }
    }

    /// A mask from its words: bit `i % 64` of `bits[i / 64]` keeps element
    /// `i` (bits past `len` are ignored).
    pub fn from_bits(mut bits: Vec<u64>, len: usize, p: f32) -> Keep {
        assert_eq!(bits.len(), len.div_ceil(64), "a mask of {len} elements has {} words", len.div_ceil(64));
        if len % 64 != 0 {
            *bits.last_mut().expect("len > 0") &= (1u64 << (len % 64)) - 1;
        }
        Keep { bits, len, scale: 1.0 / (1.0 - p) }
    }

    /// The mask as `{0, 1/(1-p)}` values.
    pub fn to_tensor(&self, shape: &Shape, device: &candle_core::Device) -> Result<Tensor> {
        let data: Vec<f32> = (0..self.len).map(|i| self.value(i)).collect();
        Tensor::from_vec(data, shape.clone(), device)
    }

    fn value(&self, i: usize) -> f32 {
        if self.bits[i / 64] >> (i % 64) & 1 == 1 { self.scale } else { 0.0 }
    }

    /// `out[i] = x[i]·mask[i]`.
    pub fn mul_into(&self, x: &[f32], out: &mut [f32]) {
        self.zip_apply(x, out, |o, x, m| *o = x * m);
    }

    /// `out[i] += t[i]·mask[i]`.
    pub fn fma_into(&self, t: &[f32], out: &mut [f32]) {
        self.zip_apply(t, out, |o, t, m| *o += t * m);
    }

    fn zip_apply(&self, x: &[f32], out: &mut [f32], f: impl Fn(&mut f32, f32, f32) + Sync) {
        use rayon::prelude::*;
        assert!(x.len() == self.len && out.len() == self.len, "dropout mask of another size");
        out.par_chunks_mut(KEEP_CHUNK).zip(x.par_chunks(KEEP_CHUNK)).enumerate().for_each(|(c, (out, x))| {
            let words = &self.bits[c * KEEP_CHUNK / 64..];
            for (w, (out, x)) in words.iter().zip(out.chunks_mut(64).zip(x.chunks(64))) {
                for (j, (o, &x)) in out.iter_mut().zip(x).enumerate() {
                    f(o, x, if w >> j & 1 == 1 { self.scale } else { 0.0 });
                }
            }
        });
    }
}
