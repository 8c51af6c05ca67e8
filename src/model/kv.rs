//! The key/value cache of incremental decoding.
//!
//! Each layer keeps its rotated keys and its values, `[kv_heads, T, head_dim]`,
//! in a buffer that grows by doubling, so a decode step appends one position
//! in place instead of copying the whole history. [`KvCache::truncate`]
//! forgets positions (e.g. to reuse a prompt's prefix after scoring a longer
//! text that starts with it).

use candle_core::{Result, Tensor};

/// Keys and values of one attention layer.
#[derive(Default)]
pub struct LayerKv {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl LayerKv {
    /// Appends `k`, `v` (`[kv_heads, t, head_dim]`) and returns the keys and
    /// values of every cached position, `[kv_heads, len + t, head_dim]`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let need = self.len + t;
        let cap = self.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0));
        if need > cap {
            let new_cap = need.max(cap * 2).max(64);
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let (h, _, d) = like.dims3()?;
                let buf = Tensor::zeros((h, new_cap, d), like.dtype(), like.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k, k)?);
            self.v = Some(grow(&self.v, v)?);
        }
        let (kb, vb) = (self.k.as_ref().expect("allocated"), self.v.as_ref().expect("allocated"));
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = need;
        Ok((kb.narrow(1, 0, need)?, vb.narrow(1, 0, need)?))
    }
}

/// The cache of a whole model: one [`LayerKv`] per layer.
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(layers: usize) -> KvCache {
        KvCache { layers: (0..layers).map(|_| LayerKv::default()).collect() }
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }
}
